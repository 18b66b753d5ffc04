"""``l2_prefetch``: bring a tensor's bytes into the GPU's L2 cache before a kernel reads them.

    l2_prefetch(t, nbytes=None, *, mode="bulk", programs=16)
        t        any CUDA tensor whose elements are one contiguous block of memory
        nbytes   how many bytes from t's first element (default: all of t), rounded down to
                 whole 128-byte lines; 0 prefetches nothing
        mode     "bulk": 4 KB per instruction (``cp.async.bulk.prefetch.L2``, the TMA unit,
                 sm_90+; "line" where t's address is not 16-byte aligned); "line": one
                 128-byte line per instruction, marked evict-last
                 (``prefetch.global.L2::evict_last``, sm_80+)

    start_l2_prefetch(t, nbytes) -> torch.cuda.Event | None
        the same on a side stream that first waits for the current stream: the prefetch then
        overlaps whatever the current stream runs next; ``current_stream().wait_event(ev)``
        (or ``join_l2_prefetch(ev)``) joins it. Both are capturable in a CUDA graph (the side
        stream becomes a parallel branch).

Why: a decode step of a sparse layer at B = 1 is a chain of latency-bound kernels (encode the
query, scan the codes, attend to 2048 tokens) that leaves most of the HBM bandwidth idle for
~15 us, after which the output projection streams its 32 MB weight at the bandwidth. Started
after the q|k|v projection, a prefetch of that weight reads it during the chain, and the
projection then reads L2. (The same idea as prefetching the MLP's weights during attention in
vllm-ascend; measured in ``docs/benchmarks/e2e.md``.)

A prefetch is a hint: it changes no values, the instructions have no completion to wait for
(the kernel ends when they are issued), and lines can be evicted before they are used. On the
CPU, under the Triton interpreter, or with mode "bulk" below sm_90 it does nothing (there is
no L2 to fill), after the same input checks.
"""

from __future__ import annotations

import functools

import torch

from kvcomp.ops._common import interpreting, triton_available

__all__ = ["l2_prefetch", "start_l2_prefetch", "join_l2_prefetch", "MODES"]

MODES = ("bulk", "line")
LINE = 128  # bytes of an L2 line
BULK = 4096  # bytes per bulk prefetch instruction
BLOCK = 128  # instructions per program per loop iteration (one per thread of 4 warps)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton nothing is prefetched
    triton = None

if triton is not None:

    @triton.jit
    def _l2_prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr,
                            BLOCK: tl.constexpr, BULK_MODE: tl.constexpr):
        """Program p issues chunks [p * PER_PROG, (p + 1) * PER_PROG) of CHUNK bytes each from
        ``base`` (a uint8 pointer), those that start below ``nbytes`` (a multiple of 128)."""
        pid = tl.program_id(0)
        size = tl.full([BLOCK], CHUNK, tl.int32)
        for i in range(0, PER_PROG, BLOCK):
            off = (pid * PER_PROG + i + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
            live = (off < nbytes).to(tl.int32)
            if BULK_MODE:
                # the last chunk may be shorter than CHUNK (nbytes is a multiple of 128 only)
                n = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
                n = tl.where(live != 0, n, size)
                tl.inline_asm_elementwise(
                    "{\n.reg .pred p;\nsetp.ne.b32 p, $3, 0;\n"
                    "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}",
                    "=r,l,r,r", [base + off, n, live], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{\n.reg .pred p;\nsetp.ne.b32 p, $2, 0;\n"
                    "@p prefetch.global.L2::evict_last [$1];\nmov.u32 $0, 0;\n}",
                    "=r,l,r", [base + off, live], dtype=tl.int32, is_pure=False, pack=1)


def _span_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check(t, nbytes, mode: str, programs: int) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"l2_prefetch: t must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"l2_prefetch: t must be contiguous (one block of memory), got shape "
                         f"{tuple(t.shape)} with strides {t.stride()}")
    if mode not in MODES:
        raise ValueError(f"l2_prefetch: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(programs, int) or programs < 1:
        raise ValueError(f"l2_prefetch: programs must be an int >= 1, got {programs!r}")
    span = _span_bytes(t)
    if nbytes is None:
        nbytes = span
    if not isinstance(nbytes, int) or not 0 <= nbytes <= span:
        raise ValueError(f"l2_prefetch: nbytes must be an int in [0, {span}] (t's bytes), got {nbytes!r}")
    return nbytes // LINE * LINE


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _runs(t: torch.Tensor, mode: str) -> bool:
    if t.device.type != "cuda" or interpreting() or not triton_available():
        return False
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= (
        (9, 0) if mode == "bulk" else (8, 0))


def l2_prefetch(t: torch.Tensor, nbytes: int | None = None, *, mode: str = "bulk", programs: int = 16) -> None:
    """Prefetch the first ``nbytes`` of ``t`` into L2 on the current stream (module doc)."""
    n = _check(t, nbytes, mode, programs)
    if n == 0 or not _runs(t, mode):
        return
    if mode == "bulk" and t.data_ptr() % 16:
        mode = "line"  # the bulk instruction needs a 16-byte aligned address
    chunk = BULK if mode == "bulk" else LINE
    chunks = -(-n // chunk)
    per_prog = -(-chunks // (programs * BLOCK)) * BLOCK
    grid = (-(-chunks // per_prog),)
    base = t.view(-1).view(torch.uint8) if t.dim() else t.view(1).view(torch.uint8)
    with torch.cuda.device(t.device):
        _l2_prefetch_kernel[grid](base, n, CHUNK=chunk, PER_PROG=per_prog, BLOCK=BLOCK,
                                  BULK_MODE=mode == "bulk", num_warps=4)


_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(index)
    if s is None:
        s = _SIDE[index] = torch.cuda.Stream(device=index)
    return s


def start_l2_prefetch(t: torch.Tensor, nbytes: int | None = None, *, mode: str = "bulk",
                      programs: int = 16) -> torch.cuda.Event | None:
    """``l2_prefetch`` on a side stream after the current stream's work so far; returns the
    event to join (None where nothing was launched: CPU, interpreter, nbytes rounding to 0)."""
    n = _check(t, nbytes, mode, programs)
    if n == 0 or not _runs(t, mode):
        return None
    main = torch.cuda.current_stream(t.device)
    side = _side_stream(t.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        l2_prefetch(t, n, mode=mode, programs=programs)
        done = torch.cuda.Event()
        done.record(side)
    return done


def join_l2_prefetch(event: torch.cuda.Event | None) -> None:
    """Make the current stream wait for a ``start_l2_prefetch`` (no-op for None)."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)
