"""Triton kernel of ``hash_encode``: projection, sign and bit-packing fused in one pass.

One program writes ``WPP`` 32-bit code words of ``BLOCK_N`` rows of one (batch, head) (32 rows x
2 words by default, ``_tile_config``): it multiplies the rows (upcast to fp32 as the reference
does) by the words' 32 WPP columns of the head's projection ([D, 32 WPP], fp32) in slices of at
most 128 dims (a [BLOCK_N, D] tile for D = 512, the MLA latent, would not fit the registers: a
first version with whole rows and all words unrolled did not finish compiling in minutes),
takes ``> 0`` and ORs bit j into bit j of its word. The rows are re-read once per group of WPP
words, from L2. fp32 rows use IEEE fp32 products: codes equal the reference's except where a
projection is within fp32 rounding of 0. fp16 / bf16 rows are exact in tf32, so the product
runs on the tensor cores in tf32 with only the (fp32) weight rounded to 10 mantissa bits: a bit
may then differ from the fp32 reference where ``|x.w| <= 2**-11 * sum_i |x_i w_i|`` (tested);
with 16-bit weights (exact in tf32) the codes are those of the fp32 reference. Codes are int32,
bit b of the code in word b // 32 at bit b % 32 (LSB first).

Decode-sized inputs (a few rows per head, e.g. one query token) take ``_hash_encode_row_kernel``
instead: one program per (row, head, word), a [D] x [D, 32] product by broadcast-multiply and a
tree sum in fp32, no matrix unit (what a one-row tl.dot would waste).

With ``HAS_BIAS`` bit j is ``proj_j > bias_j`` (fp32 compare) instead of ``proj_j > 0``: the sign
of ``(x - mu) @ W`` for ``bias = mu @ W`` without forming ``x - mu``; the bias row is read with
strides (0 along a shared batch / head dim).

Grouped weights (``hash_encode(enable_gqa=True)``: a GQA layer's query heads hashed with their
kv-head's projection): head h reads weight row ``h // HG``, so the G query heads of a kv-head
share one [D, BITS] row instead of G copies of it (8x fewer weight bytes for G = 8).

``hash_encode_split`` (MLA's latent + RoPE parts): with ``SPLIT`` both kernels take a second
input x2 with its own weight w2, whose words follow x's; the tile kernel picks each program's
input (pointers, strides, width) by its word group, so one product loop serves both.

Both kernels serve the cache's append path: with ``HAS_POS`` the codes of row t of
sequence b go to row ``positions[b] + t`` of the code cache (rows >= Lmax are not written).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvcomp.ops._common import interpreting
from kvcomp.ops._pdl import pdl_args, pdl_enter


@triton.jit
def _hash_encode_kernel(
    x_ptr, w_ptr, out_ptr, pos_ptr, bias_ptr,
    N, D, H, L_out, HG,
    sxb, sxh, sxn, sxd,
    swh, swd, swk,
    sob, soh, son, sow,
    sbb, sbh, sbk,
    HAS_POS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TF32: tl.constexpr,
    W1=1, WPP: tl.constexpr = 1,
    x2_ptr=None, w2_ptr=None, D2=0, W2=0, sx2b=0, sx2h=0, sx2n=0, sx2d=0, sw2h=0, sw2d=0, sw2k=0,
    SPLIT: tl.constexpr = False,
):
    """Program (row block, b * H + h, g) writes words g * WPP .. g * WPP + WPP - 1 of x's W1 words
    (a [BLOCK_N, BLOCK_K] x [BLOCK_K, 32 * WPP] product a step). SPLIT (``hash_encode_split``):
    after x's ceil(W1 / WPP) word groups come those of a second input x2 [.., D2] with its own
    weight w2 (W2 words, written after x's W1): one product loop, its pointers picked per
    program (both inputs of one dtype, both weights of one dtype)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2)  # the group of WPP code words this program writes
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    cols = tl.arange(0, 32 * WPP)  # the group's weight columns, from its first
    if SPLIT:
        G1 = (W1 + WPP - 1) // WPP
        is2 = g >= G1
        gp = tl.where(is2, g - G1, g)  # the group within its input
        n_words = tl.where(is2, W2, W1)
        word0 = tl.where(is2, W1, 0) + gp * WPP  # its first output word
        x_base = tl.where(is2, x2_ptr + b * sx2b + h * sx2h, x_ptr + b * sxb + h * sxh)
        w_base = tl.where(is2, w2_ptr + (h // HG) * sw2h, w_ptr + (h // HG) * swh)
        sn = tl.where(is2, sx2n, sxn)
        sd = tl.where(is2, sx2d, sxd)
        s_wd = tl.where(is2, sw2d, swd)
        s_wk = tl.where(is2, sw2k, swk)
        dd = tl.where(is2, D2, D)
    else:
        gp = g
        n_words = W1
        word0 = g * WPP
        x_base = x_ptr + b * sxb + h * sxh
        w_base = w_ptr + (h // HG) * swh
        sn = sxn
        sd = sxd
        s_wd = swd
        s_wk = swk
        dd = D
    col = gp * (32 * WPP) + cols  # [32 * WPP] columns of the input's weight
    col_ok = col < n_words * 32
    x_rows = x_base + rows[:, None].to(tl.int64) * sn  # [BLOCK_N, 1]
    w_cols = w_base + col[None, :] * s_wk  # [1, 32 * WPP]
    proj = tl.zeros([BLOCK_N, 32 * WPP], dtype=tl.float32)
    for k0 in range(0, dd, BLOCK_K):  # [BLOCK_N, BLOCK_K] x [BLOCK_K, 32 WPP] a step: few registers
        dims = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + dims[None, :] * sd, mask=row_ok[:, None] & (dims[None, :] < dd),
                    other=0.0).to(tl.float32)
        wt = tl.load(w_cols + dims[:, None] * s_wd, mask=(dims[:, None] < dd) & col_ok[None, :],
                     other=0.0).to(tl.float32)
        if TF32:  # 16-bit rows are exact in tf32; only the weight is rounded (10-bit mantissa)
            proj += tl.dot(x, wt, input_precision="tf32")
        else:
            proj += tl.dot(x, wt, input_precision="ieee")
    if HAS_POS:
        out_rows = tl.load(pos_ptr + b).to(tl.int64) + rows
        out_ok = row_ok & (out_rows < L_out) & (out_rows >= 0)
    else:
        out_rows = rows.to(tl.int64)
        out_ok = row_ok
    bit = cols % 32
    if HAS_BIAS:  # bit = proj > bias (fp32 compare): the sign of x.w - bias
        thr = tl.load(bias_ptr + b * sbb + h * sbh + col * sbk, mask=col_ok, other=0.0)  # fp32
        bits = tl.where(proj > thr[None, :], 1, 0).to(tl.int32) << bit[None, :]  # [BLOCK_N, 32 WPP]
    else:
        bits = tl.where(proj > 0, 1, 0).to(tl.int32) << bit[None, :]
    # distinct bits in a word, so their sum is their OR (wraps to int32)
    words = tl.sum(tl.reshape(bits, [BLOCK_N, WPP, 32]), 2)  # [BLOCK_N, WPP]
    wi = tl.arange(0, WPP)
    w_ok = (gp * WPP + wi) < n_words
    tl.store(out_ptr + b * sob + h * soh + out_rows[:, None] * son + (word0 + wi)[None, :] * sow, words,
             mask=out_ok[:, None] & w_ok[None, :])


@triton.jit
def _proj_row(x_row, w_base, col0, D, sxd, swd, swk, BLOCK_D: tl.constexpr):
    """[32] fp32 projections of one row (at ``x_row``, D dims) on weight columns col0 .. col0 + 31
    (broadcast-multiply and a tree sum, no matrix unit)."""
    dims = tl.arange(0, BLOCK_D)
    bit = tl.arange(0, 32)
    x = tl.load(x_row + dims * sxd, mask=dims < D, other=0.0)
    wt = tl.load(w_base + dims[:, None] * swd + (col0 + bit)[None, :] * swk, mask=dims[:, None] < D,
                 other=0.0).to(tl.float32)  # [BLOCK_D, 32]
    return tl.sum(x.to(tl.float32)[:, None] * wt, 0)


@triton.jit
def _hash_encode_row_kernel(
    x_ptr, w_ptr, out_ptr, pos_ptr, bias_ptr,
    D, H, L_out, HG,
    sxb, sxh, sxn, sxd,
    swh, swd, swk,
    sob, soh, son, sow,
    sbb, sbh, sbk,
    HAS_POS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    kc_ptr=None, v_ptr=None, vc_ptr=None,
    skb=0, skh=0, skn=0, svb=0, svh=0, svn=0, svd=0, svcb=0, svch=0, svcn=0,
    COPY: tl.constexpr = False, CODES: tl.constexpr = True, V_PROG: tl.constexpr = 0,
    DV=0, BLOCK_DV: tl.constexpr = 16, PDL: tl.constexpr = False,
    x2_ptr=None, w2_ptr=None, D2=0, W1=0, sx2b=0, sx2h=0, sx2n=0, sx2d=0, sw2h=0, sw2d=0, sw2k=0,
    SPLIT: tl.constexpr = False, BLOCK_D2: tl.constexpr = 16,
):
    """With COPY (the cache's append, HAS_POS): row n of x is also stored in the key cache kc
    and row n of v in the value cache vc, at row pos[b] + n (program w == 0 stores the key,
    w == V_PROG the value row of DV dims; last dims contiguous); without CODES only the copies run.
    SPLIT (``hash_encode_split``, no COPY): words >= W1 are x2's (D2 dims, weight w2).
    PDL: programmatic dependent launch (``kvcomp.ops._pdl``)."""
    pdl_enter(PDL)
    n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    w = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    bit = tl.arange(0, 32)  # [32]
    if not SPLIT:
        x = tl.load(x_ptr + b * sxb + h * sxh + n * sxn + dims * sxd, mask=dims < D, other=0.0)
    if COPY:
        row = tl.load(pos_ptr + b).to(tl.int64) + n + tl.zeros([BLOCK_D], dtype=tl.int64)
        ok = (dims < D) & (row < L_out) & (row >= 0)
        if w == 0:
            tl.store(kc_ptr + b * skb + h * skh + row * skn + dims, x.to(kc_ptr.dtype.element_ty), mask=ok)
        if w == V_PROG:
            dv = tl.arange(0, BLOCK_DV)
            rowv = tl.load(pos_ptr + b).to(tl.int64) + n + tl.zeros([BLOCK_DV], dtype=tl.int64)
            okv = (dv < DV) & (rowv < L_out) & (rowv >= 0)
            v = tl.load(v_ptr + b * svb + h * svh + n * svn + dv * svd, mask=dv < DV, other=0.0)
            tl.store(vc_ptr + b * svcb + h * svch + rowv * svcn + dv, v.to(vc_ptr.dtype.element_ty), mask=okv)
    if not CODES:
        return
    if SPLIT:
        if w >= W1:
            proj = _proj_row(x2_ptr + b * sx2b + h * sx2h + n * sx2n, w2_ptr + (h // HG) * sw2h,
                             (w - W1) * 32, D2, sx2d, sw2d, sw2k, BLOCK_D2)
        else:
            proj = _proj_row(x_ptr + b * sxb + h * sxh + n * sxn, w_ptr + (h // HG) * swh, w * 32,
                             D, sxd, swd, swk, BLOCK_D)
    else:
        wt = tl.load(
            w_ptr + (h // HG) * swh + dims[:, None] * swd + (w * 32 + bit)[None, :] * swk,
            mask=dims[:, None] < D, other=0.0,
        ).to(tl.float32)  # [BLOCK_D, 32]
        proj = tl.sum(x.to(tl.float32)[:, None] * wt, 0)  # [32]
    if HAS_BIAS:
        thr = tl.load(bias_ptr + b * sbb + h * sbh + (w * 32 + bit) * sbk)  # [32] fp32
    else:
        thr = tl.zeros([32], dtype=tl.float32)
    word = tl.sum(tl.where(proj > thr, 1, 0).to(tl.int32) << bit, 0)  # distinct bits: sum == OR
    if HAS_POS:
        row = tl.load(pos_ptr + b).to(tl.int64) + n
        tl.store(out_ptr + b * sob + h * soh + row * son + w * sow, word,
                 mask=(row < L_out) & (row >= 0))
    else:
        tl.store(out_ptr + b * sob + h * soh + n * son + w * sow, word)


# at most this many rows per (batch, head) take the one-row kernel
ROW_KERNEL_MAX_ROWS = 8
# warps of a one-row program (a [D] x [D, 32] product) for D <= 128. One: on the H200 the decode
# step's query encode at 128K, B = 1 gave steps of 17.5 / 19.7 us (Qwen3-8B / 32B) against 17.9 /
# 19.9 with 4 warps (docs/benchmarks/decode.md, session 13); the bench's enc_w* variants time
# others. Wider rows (the MLA latent, D = 512: a [512, 32] fp32 tile) keep 4 warps, as measured
ROW_KERNEL_WARPS = 1


def _row_warps(block_d: int) -> int:
    return ROW_KERNEL_WARPS if block_d <= 128 else 4


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, bit) strides of a bias [BITS], [H, BITS] or [B, H, BITS]; 0 where shared."""
    if bias is None:
        return 0, 0, 0
    if bias.dim() == 1:
        return 0, 0, bias.stride(0)
    if bias.dim() == 2:
        return 0, bias.stride(0), bias.stride(1)
    return bias.stride(0), bias.stride(1), bias.stride(2)


def _launch(
    x4: torch.Tensor, w3: torch.Tensor, out4: torch.Tensor, pos: torch.Tensor | None,
    bias: torch.Tensor | None = None, part2: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """x4 [B, H, N, D], w3 [H / G, D, BITS] (head h uses w3[h // G]; G = H for one shared row),
    out4 [B, H, L_out, W], bias None or fp32 [BITS] / [H, BITS] / [B, H, BITS]. part2 (x4b [B, H,
    N, D2], w3b [H / G, D2, BITS2]): the words after x4's are x4b's codes (``hash_encode_split``;
    no bias)."""
    B, H, N, D = x4.shape
    W1 = w3.shape[-1] // 32
    W = W1 + (part2[1].shape[-1] // 32 if part2 is not None else 0)
    if N == 0 or B * H == 0:
        return
    block_d = max(16, triton.next_power_of_2(D))
    swh = w3.stride(0) if w3.shape[0] > 1 else 0
    hg = max(1, H // w3.shape[0])  # heads per weight row
    sb = _bias_strides(bias)
    bias_arg = bias if bias is not None else out4
    split, block_d2 = {}, 16
    if part2 is not None:
        x4b, w3b = part2
        block_d2 = max(16, triton.next_power_of_2(x4b.shape[3]))
        split = dict(x2_ptr=x4b, w2_ptr=w3b, D2=x4b.shape[3], sx2b=x4b.stride(0), sx2h=x4b.stride(1),
                     sx2n=x4b.stride(2), sx2d=x4b.stride(3), sw2h=w3b.stride(0) if w3b.shape[0] > 1 else 0,
                     sw2d=w3b.stride(1), sw2k=w3b.stride(2), SPLIT=True)
    if N <= ROW_KERNEL_MAX_ROWS:
        _hash_encode_row_kernel[(N, B * H, W)](
            x4, w3, out4, pos if pos is not None else out4, bias_arg,
            D, H, out4.shape[2], hg,
            *x4.stride(), swh, w3.stride(1), w3.stride(2), *out4.stride(), *sb,
            HAS_POS=pos is not None, HAS_BIAS=bias is not None, BLOCK_D=block_d,
            num_warps=_row_warps(max(block_d, block_d2)),
            **(dict(split, W1=W1, BLOCK_D2=block_d2) if split else {}), **pdl_args(x4, "encode"),
        )
        return
    n_groups, block_n, wpp = _tile_config(N, B * H, W1, W - W1, x4.device)
    _hash_encode_kernel[(triton.cdiv(N, block_n), B * H, n_groups)](
        x4, w3, out4, pos if pos is not None else out4, bias_arg,
        N, D, H, out4.shape[2], hg,
        *x4.stride(), swh, w3.stride(1), w3.stride(2), *out4.stride(), *sb,
        HAS_POS=pos is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=min(max(block_d, block_d2), 128),
        TF32=x4.dtype in (torch.float16, torch.bfloat16) and not interpreting(), num_warps=4,
        W1=W1, WPP=wpp, **(dict(split, W2=W - W1) if split else {}),
    )


# the tile kernel's (rows, code words) a program: None picks by size (``_tile_config``); set
# both to time others (tools/experiments/mla_profile.py --parts encode)
TILE_BLOCK_N: int | None = None
TILE_WPP: int | None = None


def _tile_config(N: int, BH: int, W1: int, W2: int, device: torch.device) -> tuple[int, int, int]:
    """(word groups, rows, words) a program of the tile kernel for N rows of BH (batch, head)
    pairs and W1 (+ W2) code words: 32 rows x 2 words, or smaller tiles where that leaves fewer
    than 2 programs an SM. H200, session 17 (docs/benchmarks/mla.md), us: 32 x 2 was the fastest
    tile for MLA's split query codes at B = 8 / 32 (13.3 / 31.5; 64 x 1, the tile before, 19.4 /
    52.4), a 32K-token latent's split codes (203 against 376) and a Qwen3-8B layer's 32K keys (186
    against 314); at B = 1 (128 rows) 16 x 1 (8.3; 32 x 2 9.0). 64-row tiles were slower at every
    size, 4 words a program no faster than 2."""
    def groups(wpp: int) -> int:
        return triton.cdiv(W1, wpp) + triton.cdiv(W2, wpp)

    if TILE_BLOCK_N is not None and TILE_WPP is not None:
        return groups(TILE_WPP), TILE_BLOCK_N, TILE_WPP
    want = 2 * _sm_count(device)
    for wpp, block_n in ((2, 32), (1, 32), (1, 16)):
        if triton.cdiv(N, block_n) * BH * groups(wpp) >= want:
            return groups(wpp), block_n, wpp
    return groups(1), 16, 1


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA); read once per device, not per launch."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _as_4d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(x4 [B, H, N, D], w3 [H', D, BITS]) views for ``_launch`` of x [..., D] with weight [D, BITS]
    (bias None / [BITS]: all rows one head), or x [B, H, *, D] with a per-head / per-sequence
    bias or a per-head weight [H', D, BITS]."""
    D = weight.shape[-2]
    if weight.dim() == 2 and (bias is None or bias.dim() == 1):
        return x.reshape(1, 1, -1, D), weight.unsqueeze(0)
    if weight.dim() == 2:  # shared weight, bias per head (and sequence): x is [B, H, *, D]
        return x.reshape(x.shape[0], x.shape[1], -1, D), weight.unsqueeze(0)
    return x.reshape(x.shape[0], x.shape[1], -1, D), weight


def hash_encode_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., D] with weight [D, BITS], or x [B, H, *, D] with weight [H, D, BITS] (or
    [H / G, D, BITS]: head h uses row h // G) or with a per-head / per-sequence bias -> int32
    [..., BITS // 32]."""
    W = weight.shape[-1] // 32
    x4, w3 = _as_4d(x, weight, bias)
    out = torch.empty(*x.shape[:-1], W, dtype=torch.int32, device=x.device)
    _launch(x4, w3, out.view(*x4.shape[:3], W), None, bias)
    return out


def hash_encode_split_triton(
    x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor, w2: torch.Tensor,
    out: torch.Tensor | None = None, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """[hash(x1, w1) | hash(x2, w2)] in one launch (``hash_encode_split``; the caller checked
    that x1 and x2 share their leading dims and w1 and w2 their form). Into out [B, H, Lmax, W]
    at rows positions[b] + t when given (x [B, H, T, D])."""
    W = (w1.shape[-1] + w2.shape[-1]) // 32
    if out is None:
        x4a, w3a = _as_4d(x1, w1, None)
        x4b, w3b = _as_4d(x2, w2, None)
        res = torch.empty(*x1.shape[:-1], W, dtype=torch.int32, device=x1.device)
        _launch(x4a, w3a, res.view(*x4a.shape[:3], W), None, None, (x4b, w3b))
        return res
    w3a = w1.unsqueeze(0) if w1.dim() == 2 else w1
    w3b = w2.unsqueeze(0) if w2.dim() == 2 else w2
    _launch(x1, w3a, out, positions, None, (x2, w3b))
    return out


def append_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
    positions: torch.Tensor, weight: torch.Tensor | None = None, codes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """One launch for a decode-sized append (T <= ROW_KERNEL_MAX_ROWS): k [B, H, T, D] / v
    [B, H, T, Dv] into k_buf / v_buf [B, H, Lmax, D / Dv] (last dims contiguous) at rows positions[b] + t, and with
    ``codes`` [B, H, Lmax, W] their key codes (weight [D, BITS] or [H, D, BITS], bias as
    ``hash_encode``)."""
    B, H, T, D = k.shape
    if T == 0 or B * H == 0:
        return
    has_codes = codes is not None
    W = codes.shape[-1] if has_codes else 1
    if has_codes:
        w3 = weight.unsqueeze(0) if weight.dim() == 2 else weight
        swh = w3.stride(0) if w3.shape[0] > 1 else 0
        wargs = (w3, codes)
        wstr = (swh, w3.stride(1), w3.stride(2), *codes.stride())
    else:
        wargs = (k_buf, k_buf)
        wstr = (0,) * 7
    _hash_encode_row_kernel[(T, B * H, W)](
        k, *wargs, positions, bias if bias is not None else k_buf,
        D, H, k_buf.shape[2], 1,
        *k.stride(), *wstr, *_bias_strides(bias),
        HAS_POS=True, HAS_BIAS=bias is not None, BLOCK_D=max(16, triton.next_power_of_2(D)),
        kc_ptr=k_buf, v_ptr=v, vc_ptr=v_buf,
        skb=k_buf.stride(0), skh=k_buf.stride(1), skn=k_buf.stride(2),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
        svcb=v_buf.stride(0), svch=v_buf.stride(1), svcn=v_buf.stride(2),
        COPY=True, CODES=has_codes, V_PROG=min(1, W - 1), DV=v.shape[3],
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])), num_warps=_row_warps(max(16, triton.next_power_of_2(D))),
        **pdl_args(k, "encode"),
    )


def hash_encode_into_triton(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, positions: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of x [B, H, T, D] written into out [B, H, Lmax, W] at rows positions[b] + t."""
    w3 = weight.unsqueeze(0) if weight.dim() == 2 else weight
    _launch(x, w3, out, positions, bias)
    return out
