"""Experiment: what sharing one selection among a verify step's T queries costs (SmolLM2, CPU).

A verify step (``kvcomp.attention.is_verify_step``: the draft of prompt-lookup or assisted
generation) makes one selection per kv-head from its G x T (head, query) rows instead of one per
token. This script measures the cost through the real integration (``kvcomp.enable``, a
``KVCompCache``, ``model(...)``): for each held-out document, the first ``context - window``
tokens are prefilled, then the last ``window`` tokens are fed teacher-forced in steps of T
tokens (T = 1 is plain decoding), and each position's next-token NLL and argmax are compared
with the dense model's on the same document. Greedy verification accepts a draft token iff it
is the argmax of the verify logits, so top-1 agreement with dense is what decides the output.

    OMP_NUM_THREADS=1 python tools/experiments/verify_quality.py --steps 1 2 4 8

Same documents and positions as ``kvcomp eval --context 2048 --window 512 --docs 8`` (held-out
essays); chunk 16, 128 random bits, layers 0-1 dense, must-select (0, -2, -1).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="tokens per forward (T)")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--token-score", default="centered_norm", choices=["hamming", "centered_norm"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the per-T summary here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import kvcomp
    from kvcomp.attention import MAX_VERIFY_QUERIES
    from kvcomp.config import KVCompConfig
    from kvcomp.eval.loading import load_model, load_texts, make_documents

    if any(not 1 <= t <= MAX_VERIFY_QUERIES for t in args.steps):
        raise SystemExit(f"--steps must be in 1..{MAX_VERIFY_QUERIES}")
    t0 = time.time()
    model, tok = load_model("smollm2")
    mc = model.config
    docs = make_documents(load_texts(["essays:heldout"]), tok, args.context, args.docs)
    cfg = KVCompConfig.default(mc.model_type, mc.num_hidden_layers, mc.head_dim, ratio=args.budget,
                               chunk_size=16, bits=128, threshold=256, token_score=args.token_score)
    P = args.context - args.window
    nll = {t: [] for t in args.steps}
    top1 = {t: [] for t in args.steps}
    dense_nll = []
    with torch.no_grad():
        for d, ids in enumerate(docs):
            ids = ids.view(1, -1)
            logits = model(ids).logits[0, P - 1 : -1].float()  # predicts tokens P .. context-1
            target = ids[0, P:]
            dense_nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
            dense_arg = logits.argmax(-1)
            h = kvcomp.enable(model, cfg)
            for T in args.steps:
                cache = h.new_cache()
                out = model(ids[:, :P], cache=cache, use_cache=True)
                rows = [out.logits[0, -1:].float()]
                for s in range(P, args.context - 1, T):
                    e = min(s + T, args.context - 1)
                    rows.append(model(ids[:, s:e], cache=cache, use_cache=True).logits[0].float())
                got = torch.cat(rows)  # predicts tokens P .. context-1
                nll[T].append(torch.nn.functional.cross_entropy(got, target, reduction="none"))
                top1[T].append((got.argmax(-1) == dense_arg).float())
            h.disable()
            print(f"doc {d + 1}/{len(docs)} done, {time.time() - t0:.0f}s", flush=True)
    base = torch.cat(dense_nll)
    n = base.numel()
    summary = {"positions": n, "budget": args.budget, "token_score": args.token_score,
               "context": args.context, "dense_ppl": math.exp(base.mean().item()), "steps": {}}
    first = torch.cat(nll[args.steps[0]])
    print(f"{n} positions; dense perplexity {summary['dense_ppl']:.3f}")
    print(f"| T | ppl vs dense | top-1 agreement | NLL vs T = {args.steps[0]} (paired) |")
    print("|---|---|---|---|")
    for T in args.steps:
        x = torch.cat(nll[T])
        diff = x - base
        rel = math.exp(diff.mean().item()) - 1
        se = diff.std().item() / math.sqrt(n)
        agree = torch.cat(top1[T]).mean().item()
        vs = x - first
        summary["steps"][T] = {"ppl_increase": rel, "nll_diff_se": se, "top1": agree,
                               "nll_vs_first": vs.mean().item(), "nll_vs_first_se": vs.std().item() / math.sqrt(n)}
        print(f"| {T} | {100 * rel:+.2f}% ± {100 * se:.2f} | {agree:.3f} | "
              f"{vs.mean().item():+.4f} ± {vs.std().item() / math.sqrt(n):.4f} nats |")
    print(f"{time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
