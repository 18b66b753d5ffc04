"""``rms_norm`` and ``silu_mul``: a decoder layer's small elementwise ops as one kernel each.

Both compute what the transformers modules compute, in the same precisions, so that a model
whose RMSNorm / gated-MLP forwards call them (``kvcomp.fusion.FusedDecode``) decodes like
the original up to float rounding (a reduction may add in another order):

    rms_norm(x, weight, eps)  [..., N] -> weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)
                              (x32 = x in fp32; the product in the promoted dtype of weight
                              and x, as torch's ``weight * h``)
    silu_mul(gate, up)        [..., I] x2 -> silu(gate) * up   (silu in fp32, rounded to gate's
                              dtype, then the product rounded to the promoted dtype)

The Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1) take any input whose
last dim is contiguous; one program per row (rms_norm) or per 1024 elements (silu_mul). The
torch references are the same formulas.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, check_tensor, device_guard, use_triton

__all__ = ["rms_norm", "rms_norm_ref", "silu_mul", "silu_mul_ref"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the references still work
    triton = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, sx, sy, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0)
        h = x.to(tl.float32)
        var = tl.sum(h * h, 0) / N
        h = (h * tl.math.rsqrt(var + eps)).to(x.dtype)  # torch.rsqrt: rsqrtf
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = w.to(tl.float32) * h.to(tl.float32)
        tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, width, sg, su, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        r = i // width
        c = i % width
        g = tl.load(g_ptr + r * sg + c, mask=ok, other=0.0)
        u = tl.load(u_ptr + r * su + c, mask=ok, other=0.0)
        g32 = g.to(tl.float32)
        a = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
        y = a.to(tl.float32) * u.to(tl.float32)
        tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., N] with weight [N] (module doc) -> [..., N] in the promoted dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N] for x {tuple(x.shape)} [..., N]")
    if not use_triton(backend, x, weight) or triton is None or x.numel() == 0:
        return rms_norm_ref(x, weight, float(eps))
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    N = x2.shape[1]
    with device_guard(x):
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, N, x2.stride(0), y.stride(0), float(eps),
            BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4,
        )
    return y.view(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate / up [..., I] of one shape (module doc)."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if not use_triton(backend, gate, up) or triton is None or gate.numel() == 0:
        return silu_mul_ref(gate, up)
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n, BLOCK = y.numel(), 1024
    with device_guard(gate):
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](
            g2, u2, y, n, g2.shape[1], g2.stride(0), u2.stride(0), BLOCK=BLOCK, num_warps=4,
        )
    return y.view(gate.shape)
