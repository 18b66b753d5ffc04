"""Shared helpers of the ops: input checks with clear messages, backend choice, bit tricks."""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

_np_bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2.0
BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Decide the backend. ``auto``: Triton for CUDA tensors (or KVCOMP_BACKEND=triton), else
    the reference. ``triton`` forces the kernels (on CPU only under TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "auto":
        env = os.environ.get("KVCOMP_BACKEND", "auto")
        if env == "reference":
            return False
        if env != "triton" and not all(t.is_cuda for t in tensors):
            return False
    if not triton_available():
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return False
    if not all(t.is_cuda for t in tensors) and not interpreting():
        if backend == "triton" or os.environ.get("KVCOMP_BACKEND") == "triton":
            raise RuntimeError(
                "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
            )
        return False
    return True


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def same_device(a, b) -> bool:
    """Device equality with a bare "cuda" read as the current CUDA device ("cuda" == "cuda:0"
    while cuda:0 is current)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        cur = torch.cuda.current_device()
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a == b


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a Triton launch (a no-op off CUDA or when it already
    is). Triton launches on the *current* device and stream, not on the tensors' device: a model
    split over GPUs by ``device_map`` never switches devices, so every op's Triton path runs
    under this guard."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int32, torch.int64)


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Bit count of each int32 word (int32 in [0, 32]); SWAR in int32, exact.

    Two's-complement wrap-around makes every step equal to its uint32 counterpart, and each
    shifted term is masked, so arithmetic (sign-extending) shifts are harmless."""
    v = x.to(torch.int32)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


def word_popcounts(x: torch.Tensor) -> torch.Tensor:
    """Bit count of each int32 word of x, exact: on the CPU numpy's ``bitwise_count`` (one
    vectorised pass, uint8; numpy >= 2.0), elsewhere ``popcount32`` (int32). Sum the result
    with an explicit dtype."""
    if x.device.type == "cpu" and _np_bitwise_count is not None:
        return torch.from_numpy(_np_bitwise_count(x.to(torch.int32).contiguous().numpy().view(np.uint32)))
    return popcount32(x)


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> bool [..., 32 * W], bit b of the code at position b."""
    shifts = torch.arange(32, device=codes.device, dtype=torch.int64)
    bits = (codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * 32).bool()


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., BITS] (BITS % 32 == 0) -> int32 [..., BITS // 32], LSB first."""
    nbits = bits.shape[-1]
    if nbits % 32:
        raise ValueError(f"number of bits must be a multiple of 32, got {nbits}")
    if bits.device.type == "cpu" and bits.dtype == torch.bool:
        # numpy's packbits (LSB first): 8 bits a byte, 4 bytes a little-endian word; one pass
        # (a token's code ~9x faster than the shifts below, what the CPU decode path calls)
        packed = np.packbits(bits.contiguous().numpy(), axis=-1, bitorder="little")
        return torch.from_numpy(np.ascontiguousarray(packed).view("<i4").astype(np.int32, copy=False))
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    words = (bits.reshape(*bits.shape[:-1], nbits // 32, 32).to(torch.int64) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


class StreamScratch:
    """Zeroed int32 device buffers kept per (device, stream) and grown on demand.

    For kernels that count into a buffer and leave it zeroed when they finish (ticket counters,
    histograms): every later launch on that stream, and every replay of a CUDA graph that
    captured one, finds it at zero. A buffer outgrown by a larger launch is kept alive, since a
    captured graph may still point at it."""

    def __init__(self, min_numel: int):
        self.min_numel = int(min_numel)
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        """A zeroed int32 buffer of at least ``numel`` elements for the current stream of ``device``."""
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (str(device), stream)
        t = self._bufs.get(key)
        if t is None or t.numel() < numel:
            if t is not None:
                self._retired.append(t)
            t = torch.zeros(max(numel, self.min_numel), dtype=torch.int32, device=device)
            self._bufs[key] = t
        return t
