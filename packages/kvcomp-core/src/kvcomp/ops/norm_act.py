"""``rms_norm``, ``add_rms_norm``, ``silu_mul``, ``rope``: a decoder layer's small elementwise
ops as one kernel each.

Both compute what the transformers modules compute, in the same precisions, so that a model
whose RMSNorm / gated-MLP forwards call them (``kvcomp.fusion.FusedDecode``) decodes like
the original up to float rounding (a reduction may add in another order):

    rms_norm(x, weight, eps)  [..., N] -> weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)
                              (x32 = x in fp32; the product in the promoted dtype of weight
                              and x, as torch's ``weight * h``)
    add_rms_norm(x, residual, weight, eps)
                              -> (rms_norm(s, weight, eps), s) with s = residual + x (both
                              [..., N] of one dtype, the sum rounded to it as torch's add):
                              a decoder layer's residual add and the next norm in one kernel
    head_rms_norm_(y, wq, wk, hq, hk, eps)
                              y [M, >= (hq + hk) * D] (rows of a merged q|k|v projection):
                              the first hq heads of D dims normalised with wq [D], the next hk
                              with wk [D], in place (a model's per-head q / k norms, Qwen3),
                              one launch; each head exactly as ``rms_norm`` computes it
    silu_mul(gate, up)        [..., I] x2 -> silu(gate) * up   (silu in fp32, rounded to gate's
                              dtype, then the product rounded to the promoted dtype)
    rope(q, k, cos, sin)      q [B, Hq, T, D], k [B, Hkv, T, D], cos / sin [B or 1, T, D] ->
                              (q * cos + rotate_half(q) * sin, the same for k), rotate_half(x) =
                              cat(-x[..., D/2:], x[..., :D/2]); each product and the sum
                              rounded to the dtype as torch does; outputs contiguous [B, H, T, D].
                              Compiled without floating-point contraction (ROPE_LAUNCH): with it,
                              the compiler turns a product and the sum into one fma (one
                              rounding where torch has two), which made it differ from torch on
                              the H200

The Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1) take any input whose
last dim is contiguous; one program per row (rms_norm) or per 1024 elements (silu_mul). The
torch references are the same formulas.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, check_tensor, device_guard, use_triton

__all__ = ["add_rms_norm", "add_rms_norm_ref", "head_rms_norm_", "head_rms_norm_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref", "silu_mul", "silu_mul_ref"]

try:
    import triton
    import triton.language as tl

    from kvcomp.ops._pdl import pdl_args, pdl_enter
except ImportError:  # pragma: no cover - the references still work
    triton = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    s = residual + x
    return rms_norm_ref(s, weight, eps), s


def head_rms_norm_ref(y: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, hq: int, hk: int,
                      eps: float) -> torch.Tensor:
    D = wq.shape[0]
    q = y[:, : hq * D].reshape(-1, hq, D)
    k = y[:, hq * D: (hq + hk) * D].reshape(-1, hk, D)
    y[:, : hq * D] = rms_norm_ref(q, wq, eps).reshape(-1, hq * D)
    y[:, hq * D: (hq + hk) * D] = rms_norm_ref(k, wk, eps).reshape(-1, hk * D)
    return y


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, sx, sy, eps, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
        pdl_enter(PDL)
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
    def _head_rms_norm_kernel(y_ptr, wq_ptr, wk_ptr, HQ, HK, D, sy, eps, BLOCK: tl.constexpr,
                              PDL: tl.constexpr = False):
        """Program (m, h): head h of row m of y, with wq for h < HQ else wk; in place."""
        pdl_enter(PDL)
        m = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        ptr = y_ptr + m * sy + h * D + cols
        x = tl.load(ptr, mask=ok, other=0.0)
        hf = x.to(tl.float32)
        var = tl.sum(hf * hf, 0) / D
        hf = (hf * tl.math.rsqrt(var + eps)).to(x.dtype)
        if h < HQ:
            w = tl.load(wq_ptr + cols, mask=ok, other=0.0)
        else:
            w = tl.load(wk_ptr + cols, mask=ok, other=0.0)
        out = w.to(tl.float32) * hf.to(tl.float32)
        tl.store(ptr, out.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, N, sx, sr, sy, ss, eps,
                             BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0)
        r = tl.load(r_ptr + row * sr + cols, mask=ok, other=0.0)
        s = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * ss + cols, s, mask=ok)
        h = s.to(tl.float32)
        var = tl.sum(h * h, 0) / N
        h = (h * tl.math.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = w.to(tl.float32) * h.to(tl.float32)
        tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, width, sg, su, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
        pdl_enter(PDL)
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

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, c_ptr, s_ptr, qo_ptr, ko_ptr, NQ, Hq, Hkv, T,
        sqb, sqh, sqt, skb, skh, skt, scb, sct, ssb, sst,
        HALF: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Programs [0, NQ) rotate the rows (b, h, t) of q, the next ones those of k; outputs
        contiguous [B, H, T, D] (row r = (b * H + h) * T + t)."""
        pdl_enter(PDL)
        pid = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        ok = j < HALF
        if pid < NQ:
            t = pid % T
            h = (pid // T) % Hq
            b = pid // (T * Hq)
            _rope_row(q_ptr + b * sqb + h * sqh + t * sqt, qo_ptr + pid * (2 * HALF),
                      c_ptr + b * scb + t * sct, s_ptr + b * ssb + t * sst, j, ok, HALF)
        else:
            r = pid - NQ
            t = r % T
            h = (r // T) % Hkv
            b = r // (T * Hkv)
            _rope_row(k_ptr + b * skb + h * skh + t * skt, ko_ptr + r * (2 * HALF),
                      c_ptr + b * scb + t * sct, s_ptr + b * ssb + t * sst, j, ok, HALF)

    @triton.jit
    def _rope_row(x_ptr, o_ptr, c_row, s_row, j, ok, HALF: tl.constexpr):
        x1 = tl.load(x_ptr + j, mask=ok, other=0.0)
        x2 = tl.load(x_ptr + HALF + j, mask=ok, other=0.0)
        c1 = tl.load(c_row + j, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + HALF + j, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + j, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + HALF + j, mask=ok, other=0.0).to(tl.float32)
        dt = x1.dtype
        # x * cos and rotate_half(x) * sin, each rounded to the dtype, then their sum
        a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
        a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
        b1 = (-(x2.to(tl.float32) * s1)).to(dt).to(tl.float32)  # (-x2) * s1: rounding is odd
        b2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
        tl.store(o_ptr + j, (a1 + b1).to(o_ptr.dtype.element_ty), mask=ok)
        tl.store(o_ptr + HALF + j, (a2 + b2).to(o_ptr.dtype.element_ty), mask=ok)


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
            BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4, **pdl_args(x, "norm"),
        )
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for x / residual [..., N] of one dtype (module doc)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if residual.shape != x.shape or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} must be one "
                         f"shape [..., N] and weight {tuple(weight.shape)} [N]")
    if not use_triton(backend, x, residual, weight) or triton is None or x.numel() == 0:
        return add_rms_norm_ref(x, residual, weight, float(eps))
    x2, r2 = _rows(x), _rows(residual)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    N = x2.shape[1]
    with device_guard(x):
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), y, s, N, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
            float(eps), BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4,
            **pdl_args(x, "norm"),
        )
    return y.view(x.shape), s.view(x.shape)


def head_rms_norm_(y: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, hq: int, hk: int, eps: float,
                   *, backend: str = "auto") -> torch.Tensor:
    """Per-head RMSNorm of the q and k heads of a merged projection y [M, N], in place (module
    doc). The weights must have y's dtype (the result is written back into y)."""
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("wq", wq, ndim=1, dtypes=(y.dtype,), device=y.device)
    check_tensor("wk", wk, ndim=1, dtypes=(y.dtype,), device=y.device)
    D = wq.shape[0]
    if wk.shape[0] != D or (hq + hk) * D > y.shape[1] or y.stride(1) != 1 or min(hq, hk) < 0:
        raise ValueError(f"head_rms_norm_: y {tuple(y.shape)} (last dim contiguous) must hold "
                         f"{hq} + {hk} heads of wq / wk's {tuple(wq.shape)} / {tuple(wk.shape)} dims")
    if not use_triton(backend, y, wq, wk) or triton is None or y.numel() == 0 or hq + hk == 0:
        return head_rms_norm_ref(y, wq, wk, hq, hk, float(eps))
    with device_guard(y):
        _head_rms_norm_kernel[(y.shape[0], hq + hk)](
            y, wq.contiguous(), wk.contiguous(), hq, hk, D, y.stride(0), float(eps),
            BLOCK=triton.next_power_of_2(D), num_warps=4, **pdl_args(y, "norm"),
        )
    return y


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
            **pdl_args(gate, "norm"),
        )
    return y.view(gate.shape)


# launch options of _rope_kernel: no fp contraction (module doc; tests/core/test_kernels_compile.py
# checks the PTX for it)
ROPE_LAUNCH = dict(num_warps=1, enable_fp_fusion=False)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hkv, T, D] with cos / sin [B, T, D] (or
    [1, T, D], shared by the batch) (module doc) -> (q_embed, k_embed), contiguous."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("cos", cos, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("sin", sin, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    B, Hq, T, D = q.shape
    if (k.shape[0] != B or k.shape[2:] != (T, D) or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D)
            or sin.shape != cos.shape or D % 2):
        raise ValueError(f"rope: q {tuple(q.shape)} [B, Hq, T, D] with D even, k {tuple(k.shape)} "
                         f"[B, Hkv, T, D], cos {tuple(cos.shape)} / sin {tuple(sin.shape)} [B or 1, T, D]")
    same = q.dtype == k.dtype == cos.dtype == sin.dtype
    if not same or not use_triton(backend, q, k, cos, sin) or triton is None or q.numel() * k.numel() == 0:
        return rope_ref(q, k, cos, sin)
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    Hkv = k.shape[1]
    qo = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(B, Hkv, T, D, dtype=k.dtype, device=q.device)
    nq = B * Hq * T
    with device_guard(q):
        _rope_kernel[(nq + B * Hkv * T,)](
            q, k, cos, sin, qo, ko, nq, Hq, Hkv, T,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
            HALF=D // 2, BLOCK=max(16, triton.next_power_of_2(D // 2)), **ROPE_LAUNCH,
            **pdl_args(q, "norm"),
        )
    return qo, ko
