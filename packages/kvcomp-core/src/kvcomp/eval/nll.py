"""Teacher-forced NLL / perplexity where every scored position attends as a decode step would.

For each document ids [T]: the first ``T - window - 1`` tokens are prefilled densely; the next
``window`` tokens are fed as a window (``kvcomp.eval.window``), position t predicting token
t + 1, so the last ``window`` tokens are scored. Each ``SparseSpec`` (method x budget x query
mode) is one window pass over the same prefilled cache; the dense pass (optionally carrying a
``FidelityProbe``) is the baseline. Results keep per-position NLLs so that differences against
dense are paired and their standard errors honest.

Documents are independent: ``evaluate_documents`` scores any subset of them (one process's
share under ``kvcomp.distributed``) and ``combine_documents`` unites the subsets in document
order, so a split run gives the numbers of a one-process run exactly.
"""

from __future__ import annotations

import math
import time

import torch

from kvcomp.eval.window import SparseSpec, prefill, window_logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V], targets [N] -> float64 [N] negative log-likelihoods."""
    return -torch.log_softmax(logits.double(), -1).gather(1, targets.view(-1, 1)).squeeze(1)


def evaluate_documents(
    model,
    documents: list[torch.Tensor],
    specs: list[SparseSpec],
    *,
    indices: list[int] | None = None,
    window: int = 512,
    probe=None,
    progress: bool = True,
    log=None,
    on_document=None,
) -> dict[int, dict]:
    """Per-position NLLs of the documents ``indices`` (default: all) for dense and every spec.

    Returns {document index: record}, a record being {"dense": {"nll": [window] float64,
    "argmax": [window] int64}, spec.name: {"nll", "argmax", "attended", "available"}} (CPU
    tensors). A ``probe`` observes each document's dense pass under that document's index
    (``probe.document``). ``on_document(records)`` is called after each document but the last
    with the records so far, e.g. to save partial results."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate spec names: {names}")
    indices = list(range(len(documents))) if indices is None else list(indices)
    for d in indices:
        if not 0 <= d < len(documents):
            raise ValueError(f"document index {d} out of range [0, {len(documents)})")
    t0 = time.perf_counter()
    records: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices) * (len(specs) + 1), desc="nll windows", unit="pass")
    for n_done, d in enumerate(indices, 1):
        ids = documents[d].view(-1)
        T = ids.numel()
        if T < window + 2:
            raise ValueError(f"document {d} has {T} tokens; window {window} needs at least {window + 2}")
        cache = prefill(model, ids[: T - window - 1])
        inp, tgt = ids[T - window - 1 : T - 1], ids[T - window :]
        if probe is not None:
            probe.document = d
        logits, _ = window_logits(model, cache, inp, SparseSpec(method="dense"), probe=probe)
        rec = {"dense": {"nll": token_nll(logits, tgt.to(logits.device)).cpu(), "argmax": logits.argmax(-1).cpu()}}
        if bar is not None:
            bar.update(1)
        for spec in specs:
            logits, stats = window_logits(model, cache, inp, spec)
            rec[spec.name] = {"nll": token_nll(logits, tgt.to(logits.device)).cpu(),
                              "argmax": logits.argmax(-1).cpu(),
                              "attended": stats["attended"], "available": stats["available"]}
            if bar is not None:
                bar.update(1)
        records[d] = rec
        if log is not None:
            log(f"doc {n_done}/{len(indices)} done, {time.perf_counter() - t0:.0f}s")
        del cache
        if on_document is not None and n_done < len(indices):
            on_document(dict(records))
    if bar is not None:
        bar.close()
    return records


def combine_documents(records: dict[int, dict], seconds: float = 0.0) -> dict:
    """Records of ``evaluate_documents`` (from one or several processes, united) -> the result
    of ``evaluate_nll``: per-position values concatenated in document order, block counts
    summed. The same documents give the same result however they were split."""
    if not records:
        raise ValueError("combine_documents: no documents")
    order = sorted(records)
    names = list(records[order[0]])
    res: dict = {}
    for name in names:
        parts = [records[d][name] for d in order]
        entry = {"nll": torch.cat([p["nll"] for p in parts]), "argmax": torch.cat([p["argmax"] for p in parts])}
        if name != "dense":
            entry["attended"] = sum(p["attended"] for p in parts)
            entry["available"] = sum(p["available"] for p in parts)
        res[name] = entry
    res["positions"] = int(res["dense"]["nll"].numel())
    res["seconds"] = seconds
    return res


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
    t0 = time.perf_counter()
    partial = None
    if on_document is not None:
        partial = lambda recs: on_document(combine_documents(recs, time.perf_counter() - t0))
    records = evaluate_documents(model, documents, specs, window=window, probe=probe, progress=progress,
                                 log=log, on_document=partial)
    return combine_documents(records, time.perf_counter() - t0)


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
