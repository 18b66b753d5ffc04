"""Experiment (issue 8): why perplexity does not follow captured mass (SmolLM2, 2K).

At 2K the block-rank weights with ``centered_norm`` keep more attention mass than random weights
with ``centered_norm`` yet have the worse perplexity. The eval's per-layer output error
(``smollm2_eval_blockrank.json``) shows the trained selection with the higher output error in
layers 2-9 and the lower one from layer 10 on. This script attributes the NLL difference to
layer groups by swapping weights: each spec uses the trained weights on some sparse layers and
random weights on the others (``centered_norm``, one budget), and reports the NLL of every spec
paired per position against random + centered_norm (so the s.e. is that of the difference).

    OMP_NUM_THREADS=1 python tools/experiments/ppl_vs_mass.py \
        --trained docs/results/smollm2-blockrank-128.safetensors --split 10

Same documents and positions as ``kvcomp eval --context 2048 --window 512 --docs 8`` (held-out
essays), chunk 16, 128 bits, layers 0-1 dense, must-select (0, -2, -1).
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", required=True, help="HashWeights file (the block-rank weights)")
    ap.add_argument("--split", type=int, nargs="+", default=[10],
                    help="layer boundaries of the swapped groups (e.g. 10: layers 2-9 and 10-29)")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--docs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kvcomp.eval.loading import load_model, load_texts, make_documents
    from kvcomp.eval.nll import evaluate_documents
    from kvcomp.eval.window import SparseSpec
    from kvcomp.hashing import HashWeights

    t0 = time.time()
    model, tok = load_model("smollm2")
    n_layers = model.config.num_hidden_layers
    trained = HashWeights.load(args.trained)
    rnd = HashWeights.random(n_layers, trained.num_kv_heads, trained.head_dim, trained.bits, seed=0)
    bounds = [2] + sorted(args.split) + [n_layers]
    groups = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def mixed(trained_layers) -> list[torch.Tensor]:
        return [(trained if i in trained_layers else rnd).layer(i) for i in range(n_layers)]

    common = dict(method="hash", ratio=args.budget, token_score="centered_norm", chunk_size=16,
                  dense_layers=frozenset({0, 1}))
    specs = [SparseSpec(weights=rnd, label="random", **common),
             SparseSpec(weights=trained, label="trained", **common)]
    for g in groups:
        specs.append(SparseSpec(weights=mixed(set(g)), label=f"trained on {g.start}-{g.stop - 1}", **common))
    specs.append(SparseSpec(method="oracle", ratio=args.budget, chunk_size=16, dense_layers=frozenset({0, 1}),
                            label="oracle"))
    docs = make_documents(load_texts(["essays:heldout"]), tok, args.context, args.docs)
    rec = evaluate_documents(model, docs, specs, window=args.window, progress=False,
                             log=lambda m: print(m, flush=True))
    nll = {name: torch.cat([rec[d][name]["nll"] for d in sorted(rec)]) for name in rec[0]}
    n = nll["dense"].numel()
    base = nll["random"]
    print(f"\n{n} positions, budget {args.budget:g}, centered_norm; {time.time() - t0:.0f}s")
    print("| selection | ppl vs dense | NLL - NLL(random) (± s.e.) |\n|---|---|---|")
    for name, v in nll.items():
        if name == "dense":
            continue
        inc = math.exp(float((v - nll["dense"]).mean())) - 1
        d = (v - base).double()
        print(f"| {name} | {inc:+.2%} | {float(d.mean()):+.4f} ± {float(d.std()) / math.sqrt(n):.4f} |")


if __name__ == "__main__":
    main()
