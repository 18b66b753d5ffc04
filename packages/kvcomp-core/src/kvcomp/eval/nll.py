"""Teacher-forced NLL / perplexity where every scored position attends as a decode step would.

For each document ids [T]: the first ``T - window - 1`` tokens are prefilled densely; the next
``window`` tokens are fed as a window (``kvcomp.eval.window``), position t predicting token
t + 1, so the last ``window`` tokens are scored. Each ``SparseSpec`` (method x budget x query
mode) is one window pass over the same prefilled cache; the dense pass (optionally carrying a
``FidelityProbe``) is the baseline. Results keep per-position NLLs so that differences against
dense are paired and their standard errors honest.
"""

from __future__ import annotations

import math
import time

import torch

from kvcomp.eval.window import SparseSpec, prefill, window_logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V], targets [N] -> float64 [N] negative log-likelihoods."""
    return -torch.log_softmax(logits.double(), -1).gather(1, targets.view(-1, 1)).squeeze(1)


def evaluate_nll(
    model,
    documents: list[torch.Tensor],
    specs: list[SparseSpec],
    *,
    window: int = 512,
    probe=None,
    progress: bool = True,
    log=None,
    on_document=None,
) -> dict:
    """Per-position NLLs of ``documents`` for dense and every spec.

    Returns {"dense": {"nll": [P] float64, "argmax": [P]}, spec.name: {...}, "positions": P,
    "seconds": s}, P = window x number of documents. ``on_document(partial)`` is called after
    each document with the result so far (same format), e.g. to save partial results."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate spec names: {names}")
    out = {"dense": {"nll": [], "argmax": []}, **{n: {"nll": [], "argmax": [], "attended": 0,
                                                      "available": 0} for n in names}}
    t0 = time.perf_counter()
    docs = documents
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(docs) * (len(specs) + 1), desc="nll windows", unit="pass")
    for d, ids in enumerate(docs):
        ids = ids.view(-1)
        T = ids.numel()
        if T < window + 2:
            raise ValueError(f"document {d} has {T} tokens; window {window} needs at least {window + 2}")
        cache = prefill(model, ids[: T - window - 1])
        inp, tgt = ids[T - window - 1 : T - 1], ids[T - window :]
        logits, _ = window_logits(model, cache, inp, SparseSpec(method="dense"), probe=probe)
        out["dense"]["nll"].append(token_nll(logits, tgt.to(logits.device)).cpu())
        out["dense"]["argmax"].append(logits.argmax(-1).cpu())
        if bar is not None:
            bar.update(1)
        for spec in specs:
            logits, stats = window_logits(model, cache, inp, spec)
            out[spec.name]["nll"].append(token_nll(logits, tgt.to(logits.device)).cpu())
            out[spec.name]["argmax"].append(logits.argmax(-1).cpu())
            out[spec.name]["attended"] += stats["attended"]
            out[spec.name]["available"] += stats["available"]
            if bar is not None:
                bar.update(1)
        if log is not None:
            log(f"doc {d + 1}/{len(docs)} done, {time.perf_counter() - t0:.0f}s")
        del cache
        if on_document is not None and d + 1 < len(docs):
            on_document(_finish(out, t0))
    if bar is not None:
        bar.close()
    return _finish(out, t0)


def _finish(out: dict, t0: float) -> dict:
    res = {}
    for name, v in out.items():
        res[name] = {**v, "nll": torch.cat(v["nll"]), "argmax": torch.cat(v["argmax"])}
    res["positions"] = int(res["dense"]["nll"].numel())
    res["seconds"] = time.perf_counter() - t0
    return res


def summarize_nll(result: dict) -> dict:
    """Perplexities and paired differences against dense, with standard errors over positions.

    For each spec: ``ppl``, ``ppl_increase`` = exp(mean(nll) - mean(nll_dense)) - 1 and its se
    (delta method on the paired per-position difference), ``top1_agreement`` with dense's argmax
    (and its se), ``attended_share`` (blocks attended / blocks available, sparse layers)."""
    dense = result["dense"]["nll"]
    n = dense.numel()
    summary = {"positions": n, "dense": {"nll": float(dense.mean()), "nll_se": float(dense.std() / math.sqrt(n)),
                                         "ppl": math.exp(float(dense.mean()))}}
    for name, v in result.items():
        if name in ("dense", "positions", "seconds"):
            continue
        diff = (v["nll"] - dense).double()
        md = float(diff.mean())
        se = float(diff.std() / math.sqrt(n))
        agree = (v["argmax"] == result["dense"]["argmax"]).double()
        summary[name] = {
            "nll": float(v["nll"].mean()),
            "ppl": math.exp(float(v["nll"].mean())),
            "nll_diff": md,
            "nll_diff_se": se,
            "ppl_increase": math.exp(md) - 1.0,
            "ppl_increase_se": math.exp(md) * se,
            "top1_agreement": float(agree.mean()),
            "top1_agreement_se": float(agree.std() / math.sqrt(n)),
            "attended_share": v["attended"] / v["available"] if v.get("available") else None,
        }
    return summary
