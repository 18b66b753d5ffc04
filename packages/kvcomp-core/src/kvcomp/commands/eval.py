"""``kvcomp eval``: accuracy of kvcomp's block selection on held-out text.

    kvcomp eval --model smollm2 --hash-weights W.safetensors --json eval.json --plots docs/results

Three measurements, each optional (``--skip-*``), all on documents of ``--context`` tokens cut
from ``--data`` (default: the held-out essays, ``essays:heldout``):

1. fidelity: per layer, captured attention mass and output relative error of the random hash,
   the trained hash (``--hash-weights``) in each query aggregation mode, and the oracle, at
   every budget, over the last ``--window`` positions of each document (dense hidden states);
2. nll: teacher-forced perplexity where each of those positions attends as a decode step
   (its own selection over its own prefix), dense vs random / trained / oracle at every budget,
   plus the other aggregation modes at ``--mode-budgets``;
3. tasks: RULER-style synthetic tasks (``kvcomp.eval.tasks``) in ``--task-haystacks``
   haystacks of ``--task-context`` tokens, dense vs each selection at ``--task-budget``.

The first ``--dense-layers`` layers stay dense (as kvcomp's default config). The JSON is
rewritten after each stage; ``--plots DIR`` writes report.md and PNGs there.

Several processes: ``accelerate launch --multi_gpu --num_processes N -m kvcomp.cli eval ...``
(or ``torchrun --nproc_per_node N``) gives document i and haystack i to rank i % N (rank r on
cuda:{LOCAL_RANK} with ``--device cuda``); rank 0 gathers the per-document results and alone
writes the JSON, report and plots, whose numbers equal a one-process run's (only ``seconds`` and
``processes`` differ). Partial saves happen in one-process runs only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="fidelity, decode-faithful perplexity and synthetic tasks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'smollm2', an HF folder or a .gguf file")
    p.add_argument("--hash-weights", default=None, help="trained HashWeights (.safetensors)")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--plots", default=None, help="folder for report.md and PNG plots")
    p.add_argument("--data", nargs="+", default=["essays:heldout"], help="held-out texts")
    p.add_argument("--context", type=int, default=4096, help="tokens per document")
    p.add_argument("--window", type=int, default=512, help="scored positions per document")
    p.add_argument("--docs", type=int, default=8, help="number of documents")
    p.add_argument("--budgets", type=_floats, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--mode-budgets", type=_floats, default=[0.1],
                   help="budgets at which majority / mean aggregation are also scored (nll)")
    p.add_argument("--modes", default="sum,majority,mean")
    p.add_argument("--token-scores", default="hamming",
                   help="comma list of hamming / centered_norm (KVCompConfig.token_score); "
                        "centered_norm methods are named '<weights>+cn-...'")
    p.add_argument("--error-budgets", type=_floats, default=None,
                   help="budgets at which the output relative error is measured (default: all)")
    p.add_argument("--chunk", type=int, default=16, help="chunk (block) size in tokens")
    p.add_argument("--chunk-repre", default="max", choices=("max", "lse"),
                   help="block score of the hash selections (KVCompConfig.chunk_repre_method)")
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--dense-layers", type=int, default=2, help="the first N layers stay dense")
    p.add_argument("--seed", type=int, default=0, help="seed of the random hash weights")
    p.add_argument("--task-haystacks", type=int, default=4)
    p.add_argument("--task-context", type=int, default=4096)
    p.add_argument("--task-budget", type=float, default=0.2)
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--skip-nll", action="store_true")
    p.add_argument("--skip-tasks", action="store_true")
    p.add_argument("--no-random", action="store_true", help="leave out the random hash")
    p.add_argument("--no-oracle", action="store_true", help="leave out the oracle selection")
    p.add_argument("--nll-budgets", type=_floats, default=None,
                   help="budgets of the perplexity runs (default: --budgets)")
    p.add_argument("--merge", default=None,
                   help="a JSON of an earlier run (same setup) whose sections are merged into this one")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda (under a launcher: cuda:{LOCAL_RANK}) or cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


_TAG = {"hamming": "", "centered_norm": "+cn"}  # method-name tag of each token score


def run(args) -> int:
    from kvcomp import distributed
    from kvcomp.hashing import HashWeights

    if args.docs < 1 or (not args.skip_tasks and args.task_haystacks < 1):
        print("error: --docs and --task-haystacks must be >= 1 (use --skip-* to leave a stage out)",
              file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("sum", "majority", "mean")]
    if bad or "sum" not in modes:
        print(f"error: --modes must list sum plus any of majority, mean; got {args.modes!r}", file=sys.stderr)
        return 1
    token_scores = [t for t in args.token_scores.split(",") if t]
    if not token_scores or any(t not in _TAG for t in token_scores) or len(set(token_scores)) < len(token_scores):
        print(f"error: --token-scores must list hamming and/or centered_norm; got {args.token_scores!r}",
              file=sys.stderr)
        return 1
    if any(not 0 < b <= 1 for b in args.budgets + args.mode_budgets + [args.task_budget]):
        print("error: budgets must be in (0, 1]", file=sys.stderr)
        return 1
    try:
        from kvcomp.eval.loading import load_texts

        texts = load_texts(args.data)
        trained = HashWeights.load(args.hash_weights) if args.hash_weights else None
        device = distributed.local_device(args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ctx = distributed.init()
    rc = _run(args, ctx, device, texts, trained, modes, token_scores)
    distributed.finish(ctx)
    return rc


def _run(args, ctx, device: str, texts, trained, modes: list[str], token_scores: list[str]) -> int:
    from kvcomp import distributed
    from kvcomp.eval.fidelity import FidelityProbe, HashMethod
    from kvcomp.eval.loading import load_model, make_documents
    from kvcomp.eval.nll import combine_documents, evaluate_documents, summarize_nll
    from kvcomp.eval.report import merge_results, write_report
    from kvcomp.eval.tasks import build_haystacks, combine_scores, score_haystacks, summarize_tasks
    from kvcomp.eval.window import SparseSpec
    from kvcomp.hashing import HashWeights
    from kvcomp.training.trainer import ModelGeometry

    progress = not args.no_progress and ctx.is_main
    t_start = time.perf_counter()
    model, tok = load_model(args.model, device=device)
    geo = ModelGeometry.of(model)
    if geo.is_mla:
        print("error: kvcomp eval measures GQA models (MLA selection is evaluated by kvcomp bench mla)",
              file=sys.stderr)
        return 1
    if trained is not None:
        try:
            trained.check_against(num_layers=geo.num_layers, num_kv_heads=geo.num_kv_heads,
                                  head_dim=geo.head_dim, bits=args.bits)
        except ValueError as e:
            print(f"error: --hash-weights: {e}", file=sys.stderr)
            return 1
    random_hw = HashWeights.random(geo.num_layers, geo.num_kv_heads, geo.head_dim, args.bits,
                                   seed=args.seed, model_name=geo.model_name)
    weight_sets = ([] if args.no_random else [("random", random_hw)]) + ([("trained", trained)] if trained else [])
    if not weight_sets:
        print("error: nothing to evaluate (--no-random without --hash-weights)", file=sys.stderr)
        return 1
    dense_layers = frozenset(range(args.dense_layers))
    sparse_layers = [i for i in range(geo.num_layers) if i not in dense_layers]
    common = dict(chunk_size=args.chunk, dense_layers=dense_layers)
    hash_common = dict(common, chunk_repre=args.chunk_repre)
    docs = make_documents(texts, tok, args.context, args.docs)
    results: dict = {"setup": {
        "model": args.model, "hash_weights": args.hash_weights, "data": args.data,
        "context": args.context, "window": args.window, "documents": len(docs),
        "chunk_size": args.chunk, "chunk_repre": args.chunk_repre, "bits": args.bits, "budgets": args.budgets,
        "dense_layers": sorted(dense_layers), "must_select": [0, -2, -1], "random_seed": args.seed,
        "token_scores": token_scores},
        "processes": ctx.world}

    earlier = None
    if args.merge:
        with open(args.merge) as f:
            earlier = json.load(f)

    def save(stage: str) -> None:
        if not ctx.is_main:
            return
        results.setdefault("seconds", {})[stage] = round(time.perf_counter() - t_start, 1)
        out = merge_results(earlier, results, check="partial" not in stage) if earlier else results
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        if args.plots:
            write_report(out, args.plots)

    def log(msg: str) -> None:
        if progress:
            print(f"[kvcomp eval] {msg}", file=sys.stderr)

    probe = None
    if not args.skip_fidelity:
        methods = [HashMethod(f"{n}{_TAG[t]}-{m}", w, m, t)
                   for t in token_scores for n, w in weight_sets for m in modes]
        probe = FidelityProbe(methods, ratios=tuple(args.budgets), chunk_size=args.chunk,
                              chunk_repre=args.chunk_repre, oracle=not args.no_oracle,
                              error_ratios=tuple(args.error_budgets) if args.error_budgets is not None else None)
    specs = []
    if not args.skip_nll:
        for b in args.nll_budgets if args.nll_budgets is not None else args.budgets:
            for t in token_scores:
                for n, w in weight_sets:
                    specs.append(SparseSpec(method="hash", ratio=b, weights=w, token_score=t,
                                            label=f"{n}{_TAG[t]}-sum@{b:g}", **hash_common))
            if not args.no_oracle:
                specs.append(SparseSpec(method="oracle", ratio=b, **common))
        best_name, best = weight_sets[-1]  # trained when given
        for b in args.mode_budgets:
            for m in modes:
                if m != "sum":
                    specs.append(SparseSpec(method="hash", ratio=b, weights=best, query_mode=m,
                                            label=f"{best_name}-{m}@{b:g}", **hash_common))
    def record(res: dict, stage: str) -> None:
        results["setup"]["positions"] = res["positions"]
        if probe is not None:
            results["fidelity"] = probe.summary(sparse_layers)
        if specs:
            results["nll"] = summarize_nll(res)
        save(stage)

    if probe is not None or specs:
        t_nll = time.perf_counter()
        partial = None
        if not ctx.active:
            partial = lambda recs: record(combine_documents(recs, time.perf_counter() - t_nll), "nll (partial)")
        records = evaluate_documents(model, docs, specs, indices=distributed.shard(len(docs), ctx),
                                     window=args.window, probe=probe, progress=progress, log=log,
                                     on_document=partial)
        gathered = distributed.gather((records, probe.state() if probe is not None else None), ctx)
        if ctx.is_main:
            united: dict = {}
            for r, (recs, state) in enumerate(gathered):
                united.update(recs)
                if r > 0 and probe is not None:
                    probe.merge_state(state)
            record(combine_documents(united, time.perf_counter() - t_nll), "nll")
    if not args.skip_tasks:
        hs = build_haystacks(texts, tok, n=args.task_haystacks, context_tokens=args.task_context, seed=args.seed)
        tspecs = [SparseSpec(method="hash", ratio=args.task_budget, weights=w, token_score=t,
                             label=f"{n}{_TAG[t]}-sum@{args.task_budget:g}", **hash_common)
                  for t in token_scores for n, w in weight_sets]
        if not args.no_oracle:
            tspecs.append(SparseSpec(method="oracle", ratio=args.task_budget, **common))
        scores = score_haystacks(model, tok, hs, tspecs, indices=distributed.shard(len(hs), ctx),
                                 progress=progress)
        gathered = distributed.gather(scores, ctx)
        if ctx.is_main:
            united = {}
            for part in gathered:
                united.update(part)
            results["tasks"] = summarize_tasks(combine_scores(united))
            results["setup"]["task_haystacks"] = args.task_haystacks
            results["setup"]["task_context"] = args.task_context
            save("tasks")
    if not ctx.is_main:
        return 0
    print(f"wrote {args.json} ({time.perf_counter() - t_start:.0f}s)")
    return 0
