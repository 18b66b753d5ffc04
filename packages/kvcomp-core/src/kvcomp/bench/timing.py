"""Timing, bandwidth and verification helpers shared by the ``kvcomp bench`` benchmarks.

* ``cuda_time_us(fn)``: median device time of one ``fn()`` in microseconds from CUDA events,
  back-to-back calls in a CUDA graph (or eager), rotating over input sets.
* ``copy_bandwidth_gbs()``: device-to-device copy bandwidth in GB/s, bytes read + written.
* ``attention_ref_fp64`` / ``attention_ref_lowp`` / ``attention_close``: flash-attention's
  tolerance rule (kernel error <= 2x the error of the same-precision torch computation against
  an fp64 reference, plus a small atol), over a boolean token mask.
* ``progress(msg)``: a stage line on stderr with the seconds since import; ``positive_ints``:
  the argparse type of comma-separated positive ints (``--lengths 32768,131072``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """A stage line on stderr with the seconds since start (shows where a slow run spends time)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def positive_ints(text: str) -> list[int]:
    """argparse type: "8,32" -> [8, 32]; anything else (empty, non-int, < 1) is a usage error."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return vals


def kernel_bench_refusal(name: str, reps: int) -> int | None:
    """The exit code with which ``kvcomp bench NAME`` refuses to run (after saying why): 1
    without a CUDA GPU, 2 for fewer than 5 timed repetitions; None when it can run."""
    if not torch.cuda.is_available():
        print(f"kvcomp bench {name} measures GPU kernels and needs a CUDA GPU; none is visible.")
        return 1
    if reps < 5:
        print(f"kvcomp bench {name}: --reps must be >= 5")
        return 2
    return None


class VerificationError(AssertionError):
    """A kernel result differs from its reference: benchmarks refuse to report a speedup."""


def cuda_time_us(
    fn: Callable[[], object] | Sequence[Callable[[], object]],
    *, warmup: int = 3, reps: int = 50, graph: bool = True, min_calls: int = 8,
    warm_ms: float = 30.0,
) -> float:
    """Median device time of one call, in microseconds, from CUDA events.

    ``fn`` may be a list of calls on different input sets (rotate them so that repeated calls do
    not find their inputs in L2). The list is repeated to at least ``min_calls`` calls per timed
    repetition and the time of a repetition is divided by its number of calls, so the device
    queue stays full and host launch latency is not counted. With ``graph`` (default) the calls
    are captured once into one CUDA graph, as a served model replays its decode step, and each
    repetition replays it; without, they are launched eagerly (launch overheads included).
    Before the timed repetitions the calls run for at least ``warm_ms`` milliseconds of wall time:
    a kernel timed right after a pause (its Triton compile, a host-side check) otherwise ran on
    clocks that had dropped (session 19: the first variant timed after its compile read 5-7%
    slow on the H200, 24.89 against 23.23 us for the same attention later in the process)."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    calls = fns * max(1, -(-min_calls // len(fns)))
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()

    def run_all():
        for f in calls:
            f()

    run = run_all
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()
            stream.synchronize()
            with torch.cuda.graph(g, stream=stream):
                run_all()
        torch.cuda.current_stream().wait_stream(stream)
        run = g.replay
    t_end = time.perf_counter() + warm_ms / 1000
    while True:
        run()
        torch.cuda.synchronize()
        if time.perf_counter() >= t_end:
            break
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    per_rep = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    return 1000.0 * per_rep / len(calls)


def copy_bandwidth_gbs(nbytes: int = 2 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 B/s), counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.int32, device=device).random_()
    dst = torch.empty_like(src)
    t = cuda_time_us(lambda: dst.copy_(src), warmup=3, reps=20, graph=False, min_calls=1)
    return 2 * src.numel() * 4 / (t * 1e-6) / 1e9


def attention_ref_fp64(q, k, v, mask, scale):
    """q [B, Hq, D], k/v [B, Hkv, L, D], mask bool [B, Hkv, L] -> float64 [B, Hq, D]; rows
    without any attended token are zeros."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = torch.einsum("bhgd,bhld->bhgl", q.double().view(B, Hkv, G, D), k.double()) * scale
    s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgl,bhld->bhgd", p, v.double()).reshape(B, Hq, v.shape[-1])


def attention_ref_lowp(q, k, v, mask, scale):
    """The same attention computed the way plain torch does it in q's dtype (scores and
    probabilities rounded to that dtype): the yardstick of the tolerance rule."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = torch.einsum("bhgd,bhld->bhgl", q.view(B, Hkv, G, D), k) * scale
    s = s.float().masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(v.dtype)
    return torch.einsum("bhgl,bhld->bhgd", p, v).reshape(B, Hq, v.shape[-1])


def attention_close(out, ref64, reflowp, *, atol: float = 1e-5) -> tuple[bool, float, float]:
    """flash-attention's rule: max|out - ref64| <= 2 * max|reflowp - ref64| + atol.
    Returns (ok, kernel error, torch same-precision error); NaN anywhere fails."""
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (reflowp.double() - ref64).abs().max().item() if out.numel() else 0.0
    ok = bool(torch.isfinite(out).all().item()) and err <= 2 * base + atol
    return ok, err, base
