"""``rope_append``: what a decode step does between the q|k|v projection and the attention, in
one kernel: the per-head q / k RMSNorms (Qwen3), the rotary embedding, the cache append of the
rotated key and the value (and the key's code), and the query codes.

    q_rot, q_codes = rope_append(q, k, v, cos, sin, k_buf, v_buf, positions, *,
                                 q_norm=None, k_norm=None, eps=1e-6,
                                 codes=None, k_weight=None, k_bias=None, q_weight=None)
        q           [B, Hq, 1, D]      raw query projections of one new token per sequence (any
                                       strides, last dim contiguous: e.g. views of a merged
                                       q|k|v output); float16 / bfloat16 / float32
        k, v        [B, Hkv, 1, D / Dv] raw key / value projections, q's dtype
        cos, sin    [B or 1, 1, D]     the rotary embedding of the new token (q's dtype)
        k_buf, v_buf [B, Hkv, Lmax, D / Dv] the caches (last dim contiguous), written at row
                                       positions[b]
        positions   [B] int            the row of each sequence's new token
        q_norm, k_norm [D]             per-head RMSNorm weights applied before the rotation
                                       (q's dtype), or None (no norm)
        codes       [B, Hkv, Lmax, W]  optional int32 code cache: the rotated key's code goes to
                                       row positions[b] (``k_weight`` [Hkv, D, BITS] or [D, BITS]
                                       fp32, ``k_bias`` as ``hash_encode``'s)
        q_weight    [Hkv, D, BITS]     optional fp32: the query codes, head j hashed with row
                                       j // G (``hash_encode(q_rot, q_weight, enable_gqa=True)``)
        q_rot       [B, Hq, 1, D]      contiguous, q's dtype
        q_codes     [B, Hq, W] int32, or None without q_weight

Each step is the math of the op it replaces, in the same precisions: ``rms_norm`` of each head
(rounded to the dtype), ``rope`` (each product and the sum rounded to the dtype, compiled
without fp contraction as ``kvcomp.ops.norm_act.rope``), ``append_kv``, ``hash_encode`` of the
rotated rows (fp32 products). The reference is those ops' references in a row; the kernel
differs from it only by the order of float sums (a norm's mean of squares, a code's
projection): a code bit may differ where its projection is within rounding of 0.

Where it pays: a decode step of a fused decoder (``kvcomp.fusion.FusedDecode`` on a static
kvcomp cache) ran four launches here (q / k norms, RoPE, append, query encode), each a few
microseconds of latency at B = 1; this is one. One program per (sequence, head, code word):
B * (Hq + Hkv) * W programs (W = 1 without codes). Nothing reads a length on the host:
graph-safe. ``early=True`` (PDL, ``kvcomp.ops._pdl``): the caller guarantees that only q, k and
v come from the previous launch; cos / sin, positions and the weights are then loaded before
the wait.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.append_kv import append_kv_ref
from kvcomp.ops.hash_encode import _check, hash_encode
from kvcomp.ops.norm_act import ROPE_LAUNCH, rms_norm_ref, rope_ref

__all__ = ["rope_append", "rope_append_ref"]

try:
    import triton
    import triton.language as tl

    from kvcomp.ops._pdl import pdl_args, pdl_enter
except ImportError:  # pragma: no cover - the reference still works
    triton = None


def rope_append_ref(q, k, v, cos, sin, k_buf, v_buf, positions, *, q_norm=None, k_norm=None,
                    eps=1e-6, codes=None, k_weight=None, k_bias=None, q_weight=None):
    """``rope_append`` as the ops it fuses, in torch (module doc)."""
    if q_norm is not None:
        q = rms_norm_ref(q, q_norm, eps).to(q.dtype)
    if k_norm is not None:
        k = rms_norm_ref(k, k_norm, eps).to(k.dtype)
    q_rot, k_rot = rope_ref(q, k, cos, sin)
    append_kv_ref(k_rot, v, k_buf, v_buf, positions)
    if codes is not None:
        hash_encode(k_rot, k_weight, bias=k_bias, out=codes, positions=positions, backend="reference")
    q_codes = None
    if q_weight is not None:
        q_codes = hash_encode(q_rot, q_weight, enable_gqa=True, backend="reference").flatten(2)
    return q_rot.contiguous(), q_codes


if triton is not None:

    @triton.jit
    def _rope_append_kernel(
        q_ptr, k_ptr, v_ptr, c_ptr, s_ptr, pos_ptr, kb_ptr, vb_ptr, qo_ptr,
        qn_ptr, kn_ptr, kw_ptr, code_ptr, bias_ptr, qw_ptr, qc_ptr,
        Hq, Hkv, G, L_out, DV, eps,
        sqb, sqh, skb, skh, svb, svh, scb, ssb,
        skbb, skbh, skbn, svbb, svbh, svbn,
        swh, swd, swk, sqwh, sqwd, sqwk,
        scdb, scdh, scdn, sbb, sbh, sbk,
        HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr, W: tl.constexpr,
        NORM: tl.constexpr, CODES: tl.constexpr, QCODES: tl.constexpr, HAS_BIAS: tl.constexpr,
        EARLY: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Program (b * (Hq + Hkv) + head, w): head < Hq is query head ``head``, else key head
        ``head - Hq`` (which also stores the key row for w == 0 and the value row for the last
        w); w is the code word it computes."""
        if not EARLY:
            pdl_enter(PDL)
        pid = tl.program_id(0).to(tl.int64)
        w = tl.program_id(1)
        b = pid // (Hq + Hkv)
        hh = pid % (Hq + Hkv)
        j = tl.arange(0, BLOCK)
        ok = j < HALF
        bit = tl.arange(0, 32)
        row = tl.load(pos_ptr + b).to(tl.int64)
        c1 = tl.load(c_ptr + b * scb + j, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + b * scb + HALF + j, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + b * ssb + j, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + b * ssb + HALF + j, mask=ok, other=0.0).to(tl.float32)
        is_q = hh < Hq
        if is_q:
            x_row = q_ptr + b * sqb + hh * sqh
            n_row = qn_ptr
            w_row = qw_ptr + (hh // G) * sqwh
            sd = sqwd
            sk = sqwk
        else:
            x_row = k_ptr + b * skb + (hh - Hq) * skh
            n_row = kn_ptr
            w_row = kw_ptr + (hh - Hq) * swh
            sd = swd
            sk = swk
        if NORM:
            nw1 = tl.load(n_row + j, mask=ok, other=0.0).to(tl.float32)
            nw2 = tl.load(n_row + HALF + j, mask=ok, other=0.0).to(tl.float32)
        cols = w * 32 + bit
        if CODES or QCODES:  # this word's columns of the projection, split at HALF like the row
            if CODES and QCODES:
                wmask = ok[:, None]
            elif QCODES:  # (vector compares: the interpreter takes no scalar in a mask)
                wmask = (ok & ((hh + tl.zeros([BLOCK], dtype=tl.int64)) < Hq))[:, None]
            else:
                wmask = (ok & ((hh + tl.zeros([BLOCK], dtype=tl.int64)) >= Hq))[:, None]
            wt1 = tl.load(w_row + j[:, None] * sd + cols[None, :] * sk, mask=wmask,
                          other=0.0).to(tl.float32)  # [BLOCK, 32]
            wt2 = tl.load(w_row + (HALF + j)[:, None] * sd + cols[None, :] * sk, mask=wmask,
                          other=0.0).to(tl.float32)
        if EARLY:
            pdl_enter(PDL)
        x1 = tl.load(x_row + j, mask=ok, other=0.0)
        x2 = tl.load(x_row + HALF + j, mask=ok, other=0.0)
        dt = x1.dtype
        if NORM:  # rms_norm of the head: the normalised row rounded, times the weight, rounded
            h1 = x1.to(tl.float32)
            h2 = x2.to(tl.float32)
            var = (tl.sum(h1 * h1, 0) + tl.sum(h2 * h2, 0)) / (2 * HALF)
            r = tl.math.rsqrt(var + eps)
            x1 = (nw1 * (h1 * r).to(dt).to(tl.float32)).to(dt)
            x2 = (nw2 * (h2 * r).to(dt).to(tl.float32)).to(dt)
        # x * cos + rotate_half(x) * sin, each product and the sum rounded (kvcomp.ops.rope)
        a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
        a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
        b1 = (-(x2.to(tl.float32) * s1)).to(dt).to(tl.float32)
        b2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
        r1 = (a1 + b1).to(dt)
        r2 = (a2 + b2).to(dt)
        if is_q:
            if w == 0:
                o_row = qo_ptr + (b * Hq + hh) * (2 * HALF)
                tl.store(o_row + j, r1, mask=ok)
                tl.store(o_row + HALF + j, r2, mask=ok)
        else:
            h = hh - Hq
            if w == 0:
                k_dst = kb_ptr + b * skbb + h * skbh + row * skbn
                rowv = row + tl.zeros([BLOCK], dtype=tl.int64)
                kmask = ok & (rowv < L_out) & (rowv >= 0)
                tl.store(k_dst + j, r1.to(kb_ptr.dtype.element_ty), mask=kmask)
                tl.store(k_dst + HALF + j, r2.to(kb_ptr.dtype.element_ty), mask=kmask)
            if w == W - 1:
                dv = tl.arange(0, BLOCK_DV)
                rowd = row + tl.zeros([BLOCK_DV], dtype=tl.int64)
                vv = tl.load(v_ptr + b * svb + h * svh + dv, mask=dv < DV, other=0.0)
                tl.store(vb_ptr + b * svbb + h * svbh + row * svbn + dv, vv.to(vb_ptr.dtype.element_ty),
                         mask=(dv < DV) & (rowd < L_out) & (rowd >= 0))
        if CODES or QCODES:
            proj = tl.sum(r1.to(tl.float32)[:, None] * wt1, 0) + tl.sum(r2.to(tl.float32)[:, None] * wt2, 0)
            if is_q:
                word = tl.sum(tl.where(proj > 0, 1, 0).to(tl.int32) << bit, 0)  # distinct bits: sum == OR
                if QCODES:
                    tl.store(qc_ptr + (b * Hq + hh) * W + w, word)
            else:
                if HAS_BIAS:
                    thr = tl.load(bias_ptr + b * sbb + (hh - Hq) * sbh + cols * sbk)
                else:
                    thr = tl.zeros([32], dtype=tl.float32)
                word = tl.sum(tl.where(proj > thr, 1, 0).to(tl.int32) << bit, 0)
                if CODES:
                    tl.store(code_ptr + b * scdb + (hh - Hq) * scdh + row * scdn + w, word,
                             mask=(row < L_out) & (row >= 0))


def _launch_options(D: int) -> dict:
    """``rope``'s options (no fp contraction, one warp) for head_dim <= 128 in every mode: on the
    H200 one warp was the fastest with codes too (Qwen3-8B, B = 1 / 4, key and query codes: 2.00 /
    2.58 us against 2.22 / 3.47 with 4 warps and 3.21 / 7.25 with 8;
    ``tools/experiments/rope_append_speed.py``, docs/benchmarks/e2e.md session 13). Wider heads
    take 4 warps (a program's [D / 2, 32] x 2 fp32 projection tiles would not fit one warp's
    registers; not measured)."""
    return dict(ROPE_LAUNCH) if D <= 128 else {**ROPE_LAUNCH, "num_warps": 4}


def _check_args(q, k, v, cos, sin, k_buf, v_buf, positions, q_norm, k_norm, codes, k_weight, k_bias,
                q_weight) -> int:
    """Validate (module doc); returns W (code words; 0 without codes)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    dev, dt = q.device, q.dtype
    for name, t in (("k", k), ("v", v), ("k_buf", k_buf), ("v_buf", v_buf)):
        check_tensor(name, t, ndim=4, dtypes=(dt,), device=dev)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("positions", positions, ndim=1, dtypes=INT_DTYPES, device=dev)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if (T != 1 or k.shape != (B, Hkv, 1, D) or v.shape[:3] != (B, Hkv, 1) or Hkv == 0 or Hq % Hkv
            or D % 2 or cos.shape[0] not in (1, B) or cos.shape[1:] != (1, D) or sin.shape != cos.shape
            or k_buf.shape[:2] != (B, Hkv) or k_buf.shape[3] != D or v_buf.shape[:3] != k_buf.shape[:3]
            or v_buf.shape[3] != v.shape[3] or positions.shape[0] != B):
        raise ValueError(
            f"rope_append: q {tuple(q.shape)} must be [B, Hq, 1, D] (one new token, D even), k / v "
            f"{tuple(k.shape)} / {tuple(v.shape)} [B, Hkv, 1, D / Dv] with Hq a multiple of Hkv, cos / "
            f"sin {tuple(cos.shape)} / {tuple(sin.shape)} [B or 1, 1, D], k_buf / v_buf "
            f"{tuple(k_buf.shape)} / {tuple(v_buf.shape)} [B, Hkv, Lmax, D / Dv], positions "
            f"{tuple(positions.shape)} [B]")
    for name, nw in (("q_norm", q_norm), ("k_norm", k_norm)):
        if nw is not None:
            check_tensor(name, nw, ndim=1, dtypes=(dt,), device=dev)
            if nw.shape[0] != D:
                raise ValueError(f"{name} {tuple(nw.shape)} must be [D={D}]")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rope_append: pass both q_norm= and k_norm= (or neither)")
    if (codes is None) != (k_weight is None):
        raise ValueError("rope_append: pass both codes= and k_weight= (or neither)")
    W = 0
    if codes is not None:
        check_tensor("codes", codes, ndim=4, dtypes=(torch.int32,), device=dev)
        _check(k, k_weight, k_bias)
        W = k_weight.shape[-1] // 32
        if codes.shape[:3] != k_buf.shape[:3] or codes.shape[3] != W:
            raise ValueError(f"codes {tuple(codes.shape)} must be [B, Hkv, Lmax, W={W}] for k_buf "
                             f"{tuple(k_buf.shape)} and k_weight {tuple(k_weight.shape)}")
    if q_weight is not None:
        _check(q, q_weight, None, gqa=True)
        if q_weight.shape[0] != Hkv:
            raise ValueError(f"q_weight {tuple(q_weight.shape)} must be [Hkv={Hkv}, D, BITS]")
        Wq = q_weight.shape[-1] // 32
        if W and Wq != W:
            raise ValueError(f"q_weight has {Wq} code words, k_weight {W}: they must match")
        W = Wq
    return W


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_buf: torch.Tensor, v_buf: torch.Tensor, positions: torch.Tensor, *,
                q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                codes: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                k_bias: torch.Tensor | None = None, q_weight: torch.Tensor | None = None,
                early: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norms, rotary embedding, cache append and query codes of a decode step (module doc)."""
    W = _check_args(q, k, v, cos, sin, k_buf, v_buf, positions, q_norm, k_norm, codes, k_weight, k_bias,
                    q_weight)
    extra = [t for t in (q_norm, k_norm, codes, k_weight, k_bias, q_weight) if t is not None]
    kernel = (triton is not None and use_triton(backend, q, k, v, cos, sin, k_buf, v_buf, positions, *extra)
              and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin, k_buf, v_buf)))
    if not kernel:
        return rope_append_ref(q, k, v, cos, sin, k_buf, v_buf, positions, q_norm=q_norm, k_norm=k_norm,
                               eps=eps, codes=codes, k_weight=k_weight, k_bias=k_bias, q_weight=q_weight)
    from kvcomp.ops.hash_encode.kernels import _bias_strides

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    q_rot = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    q_codes = torch.empty(B, Hq, W, dtype=torch.int32, device=q.device) if q_weight is not None else None
    kw = k_weight.float() if k_weight is not None else None
    if kw is not None and kw.dim() == 2:
        kw = kw.unsqueeze(0)
    qw = q_weight.float() if q_weight is not None else None
    kws = (kw.stride(0) if kw.shape[0] > 1 else 0, kw.stride(1), kw.stride(2)) if kw is not None else None
    qws = tuple(qw.stride()) if qw is not None else None
    # a missing weight takes the other's strides: the kernel's two branches then agree on them
    # (a unit stride specialised in both), and its loads stay vectorised
    kws, qws = kws or qws or (0, 0, 0), qws or kws or (0, 0, 0)
    cds = (codes.stride(0), codes.stride(1), codes.stride(2)) if codes is not None else (0, 0, 0)
    dummy = q_rot
    # the two weight pointers meet in one branch of the kernel: a missing one stands in for the
    # other (one pointer type); with neither, both are the same dummy (no allocation per step)
    wdummy = kw if kw is not None else (qw if qw is not None else dummy)
    with device_guard(q):
        _rope_append_kernel[(B * (Hq + Hkv), max(W, 1))](
            q, k, v, cos, sin, positions, k_buf, v_buf, q_rot,
            q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy,
            kw if kw is not None else wdummy, codes if codes is not None else dummy,
            k_bias if k_bias is not None else dummy, qw if qw is not None else wdummy,
            q_codes if q_codes is not None else dummy,
            Hq, Hkv, Hq // Hkv, k_buf.shape[2], v.shape[3], float(eps),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0) if cos.shape[0] > 1 else 0, sin.stride(0) if sin.shape[0] > 1 else 0,
            k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
            v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
            *kws, *qws, *cds, *_bias_strides(k_bias),
            HALF=D // 2, BLOCK=max(16, triton.next_power_of_2(D // 2)),
            BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])), W=max(W, 1),
            NORM=q_norm is not None, CODES=codes is not None, QCODES=q_weight is not None,
            HAS_BIAS=k_bias is not None, EARLY=bool(early), **_launch_options(D), **pdl_args(q, "norm"),
        )
    return q_rot, q_codes
