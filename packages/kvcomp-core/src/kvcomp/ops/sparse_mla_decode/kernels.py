"""Triton kernels of MLA decode in latent space (absorbed form): split-K flash-decoding.

One latent "kv-head" is shared by all H query heads (MQA). Stage 1: a program owns a tile of
BLOCK_H heads and a contiguous range of (virtual) token positions of one sequence; it loads each
[BLOCK_T, R] tile of ckv and [BLOCK_T, P] tile of kpe once for its BLOCK_H heads, computes
q_lat . ckv + q_pe . kpe with tl.dot (fp32 accumulation), runs an online softmax and writes a
normalised partial output [BLOCK_H, R] (fp32) plus its log2-sum-exp. Stage 2 merges the splits.

The same stage-1 body serves both ops:
    SPARSE=True   virtual position j = k * chunk_size + c walks the selected blocks:
                  token = block_idx[b, 0, k] * chunk_size + c  (k-th entry -1: skipped)
    SPARSE=False  virtual position j is the token itself (dense decode over t < seq_lens[b])

Byte floor of a dense step (bf16, R=512, P=64): 1152 bytes per token (ckv + kpe), i.e.
151 MB per sequence at 128K tokens. Both launches take programmatic dependent launch on sm_90+
up to ``PDL_MAX_ROWS`` sequences (``kvcomp.ops._pdl``; bit-identical, GPU test).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvcomp.ops._common import interpreting
from kvcomp.ops._pdl import pdl_args, pdl_enter

LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(
    Q_LAT, Q_PE, CKV, KPE, BLOCK_IDX, SEQ_LENS, O_PART, LSE_PART,
    scale_log2,  # module scaling * log2(e)
    H, n_virtual, per_split, chunk_size,
    s_qlb, s_qlh, s_qlr,
    s_qpb, s_qph, s_qpp,
    s_cb, s_cl, s_cr,
    s_kb, s_kl, s_kp,
    s_bib, s_bik,
    s_ob, s_oh, s_os,
    s_lb, s_lh,
    R: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    SPARSE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid_h = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + pid_b).to(tl.int64)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_p = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    mask_h = offs_h < H
    mask_r = offs_r < R
    mask_p = offs_p < P

    q = tl.load(
        Q_LAT + pid_b * s_qlb + offs_h[:, None] * s_qlh + offs_r[None, :] * s_qlr,
        mask=mask_h[:, None] & mask_r[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_R]
    qp = tl.load(
        Q_PE + pid_b * s_qpb + offs_h[:, None] * s_qph + offs_p[None, :] * s_qpp,
        mask=mask_h[:, None] & mask_p[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_P]

    if SPARSE:
        end_v = n_virtual
    else:
        end_v = tl.minimum(n_virtual, seq_len)
    start = pid_s * per_split
    end = tl.minimum(start + per_split, end_v)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

    for j0 in range(start, end, BLOCK_T):
        offs_j = j0 + tl.arange(0, BLOCK_T)  # [BLOCK_T] virtual positions
        in_range = offs_j < end
        if SPARSE:
            kk = offs_j // chunk_size
            blk = tl.load(BLOCK_IDX + pid_b * s_bib + kk * s_bik, mask=in_range, other=-1)
            tok = blk.to(tl.int64) * chunk_size + (offs_j - kk * chunk_size)
            valid = in_range & (blk >= 0) & (tok < seq_len)
        else:
            tok = offs_j
            valid = in_range
        kv = tl.load(
            CKV + pid_b * s_cb + tok[:, None] * s_cl + offs_r[None, :] * s_cr,
            mask=valid[:, None] & mask_r[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_R]
        pe = tl.load(
            KPE + pid_b * s_kb + tok[:, None] * s_kl + offs_p[None, :] * s_kp,
            mask=valid[:, None] & mask_p[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_P]
        if IEEE:  # fp32 inputs (and the interpreter, whose bf16 tl.dot is wrong): exact fp32
            s = tl.dot(q.to(tl.float32), tl.trans(kv.to(tl.float32)), input_precision="ieee")
            s = tl.dot(qp.to(tl.float32), tl.trans(pe.to(tl.float32)), acc=s, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kv))
            s = tl.dot(qp, tl.trans(pe), acc=s)  # [BLOCK_H, BLOCK_T] fp32
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_H]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_H, BLOCK_T]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            p_in = p.to(kv.dtype).to(tl.float32)  # same rounding of p as on the GPU path
            acc = tl.dot(p_in, kv.to(tl.float32), acc=acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(kv.dtype), kv, acc=acc * alpha[:, None])  # [BLOCK_H, BLOCK_R]
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        O_PART + pid_b * s_ob + offs_h[:, None] * s_oh + pid_s * s_os + offs_r[None, :],
        out, mask=mask_h[:, None] & mask_r[None, :],
    )
    tl.store(LSE_PART + pid_b * s_lb + offs_h * s_lh + pid_s, lse, mask=mask_h)


@triton.jit
def _mla_merge_kernel(
    O_PART, LSE_PART, OUT,
    H, n_splits,
    s_ob, s_oh, s_os,
    s_lb, s_lh,
    s_outb, s_outh, s_outr,
    R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[b, h, r-tile] = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m); zeros when every split
    is empty. Grid (H, B, cdiv(R, BLOCK_R)); all splits are loaded at once (no serial loop)."""
    pdl_enter(PDL)
    pid_h = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    mask_s = offs_s < n_splits
    mask_r = offs_r < R
    lse = tl.load(LSE_PART + pid_b * s_lb + pid_h * s_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # [BLOCK_S], 0 for empty or missing splits
    denom = tl.sum(w, axis=0)
    o = tl.load(
        O_PART + pid_b * s_ob + pid_h * s_oh + offs_s[:, None] * s_os + offs_r[None, :],
        mask=(mask_s & (w > 0.0))[:, None] & mask_r[None, :], other=0.0,
    )  # [BLOCK_S, BLOCK_R]
    out = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + pid_b * s_outb + pid_h * s_outh + offs_r * s_outr, out.to(OUT.dtype.element_ty),
             mask=mask_r)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _smem_optin(index: int) -> int:
    """Shared memory a program may opt in to (bytes): 227 KB on sm_90, 163 KB on an A100."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:  # older torch: by architecture
        smem = 232448 if (props.major, props.minor) >= (9, 0) else 101376
    return smem


# dense decode on GPUs with >= this much shared memory a program (sm_90) and >= 64 heads: 64
# heads x 64 tokens on 8 warps, two stages (221 KB of shared memory at R = 512). H200, 128K, 128
# heads, R = 512 (session 16, tools/experiments/mla_profile.py): 178 / 592 / 1582 us at B = 1 /
# 4 / 8 against 237 / 1414 / 2194 with the previous defaults (32 x 32 on 4 warps below B = 8,
# 64 x 32 on 8 warps from B = 8). Also measured there, slower in every tile tried: the kv tile
# as the A operand of q.k and the queries as B (in shared memory, out of the registers)
DENSE_WIDE_SMEM = 224 * 1024
# PDL up to this many sequences (the GQA decode kernels' ``_pdl.DECODE_MAX_ROWS`` went from 16
# to 64 in session 19, measured for them only; the MLA kernels keep 16, as measured)
PDL_MAX_ROWS = 16


def _launch_config(B: int, H: int, R: int, sparse: bool, on_gpu: bool,
                   block_h, block_t, num_warps, num_stages, smem: int = 0, lowp: bool = True):
    """Tile sizes: BLOCK_H heads share one kv tile (tl.dot needs >= 16 rows). Defaults from the
    H200 sweeps (docs/benchmarks/mla.md): dense decode where a program may take ``smem`` >=
    DENSE_WIDE_SMEM bytes of shared memory (sm_90) with R >= 256, H >= 64 and 16-bit inputs
    (``lowp``): 64 heads x 64 tokens on 8 warps; else 32 heads x 32 tokens on 4 warps, and 64 heads on 8 warps for dense
    decode of a batch >= 8 (halves the kv re-reads); sparse decode of one sequence: 16 heads a
    program (twice the programs; H200, session 17: 23.0 against 25.9 us at 128 heads, 2048
    tokens; slower from B = 4: 41.5 against 35.0 in session 16, 96 against 53 at B = 8)."""
    wide = on_gpu and lowp and not sparse and R >= 256 and H >= 64 and smem >= DENSE_WIDE_SMEM
    big = on_gpu and not sparse and B >= 8 and R >= 256
    if block_h is None and on_gpu and sparse and B == 1 and R >= 256:
        block_h = 16
    if block_h is None:
        block_h = 64 if (big or wide) else (32 if R >= 256 else 64)
        block_h = min(block_h, max(16, triton.next_power_of_2(H)))
    if block_t is None:
        block_t = 64 if wide else (32 if on_gpu else 16)
    if num_warps is None:
        num_warps = 8 if (big or wide) else 4
    if num_stages is None:
        num_stages = 2
    return block_h, block_t, num_warps, num_stages


def mla_decode_launch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    block_idx: torch.Tensor | None,
    seq_lens: torch.Tensor,
    chunk_size: int,
    scale: float,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Shared launcher. block_idx [B, 1, K] int32 (sparse) or None (dense over t < seq_lens).

    q_lat [B, H, R], q_pe [B, H, P], ckv [B, Lmax, R], kpe [B, Lmax, P] (one float dtype),
    seq_lens [B] int -> [B, H, R] in q_lat's dtype. Any strides are accepted.
    """
    B, H, R = q_lat.shape
    P = q_pe.shape[2]
    dev = q_lat.device
    on_gpu = dev.type == "cuda"
    sparse = block_idx is not None
    n_virtual = block_idx.shape[2] * chunk_size if sparse else ckv.shape[1]
    smem = _smem_optin(dev.index or 0) if on_gpu and not interpreting() else 0
    block_h, block_t, num_warps, num_stages = _launch_config(
        B, H, R, sparse, on_gpu, block_h, block_t, num_warps, num_stages, smem,
        q_lat.dtype in (torch.float16, torch.bfloat16),
    )
    n_htiles = triton.cdiv(H, block_h)
    if num_splits is None:
        # enough programs to fill the chip twice over, each with >= 4 token tiles of work
        target = 2 * _sm_count(dev.index or 0) if on_gpu and not interpreting() else 2
        max_splits = max(1, triton.cdiv(n_virtual, 4 * block_t))
        num_splits = max(1, min(max_splits, triton.cdiv(target, B * n_htiles)))
    per_split = triton.cdiv(max(n_virtual, 1), num_splits)
    per_split = triton.cdiv(per_split, block_t) * block_t
    num_splits = max(1, triton.cdiv(max(n_virtual, 1), per_split))

    o_part = torch.empty(B, H, num_splits, R, device=dev, dtype=torch.float32)
    lse_part = torch.empty(B, H, num_splits, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, R, device=dev, dtype=q_lat.dtype)
    bidx = block_idx if sparse else seq_lens  # dummy pointer when dense (never read)
    s_bib, s_bik = (block_idx.stride(0), block_idx.stride(2)) if sparse else (0, 0)
    ieee = q_lat.dtype == torch.float32 or interpreting()

    if B == 0 or H == 0:
        return out.zero_()
    pdl = pdl_args(q_lat, "attention", rows=B, max_rows=PDL_MAX_ROWS)  # one latent kv-head: B (sequence, kv-head) rows
    _mla_decode_split_kernel[(n_htiles, num_splits, B)](
        q_lat, q_pe, ckv, kpe, bidx, seq_lens, o_part, lse_part,
        float(scale) * LOG2E,
        H, n_virtual, per_split, chunk_size,
        *q_lat.stride(), *q_pe.stride(), *ckv.stride(), *kpe.stride(),
        s_bib, s_bik,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        R=R, P=P,
        BLOCK_R=triton.next_power_of_2(R), BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_H=block_h, BLOCK_T=block_t, SPARSE=sparse, IEEE=ieee,
        num_warps=num_warps, num_stages=num_stages, **pdl,
    )
    block_s = max(2, triton.next_power_of_2(num_splits))
    merge_r = max(16, min(triton.next_power_of_2(R), 8192 // block_s))  # <= 8K fp32 per program
    _mla_merge_kernel[(H, B, triton.cdiv(R, merge_r))](
        o_part, lse_part, out,
        H, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        *out.stride(),
        R=R, BLOCK_R=merge_r, BLOCK_S=block_s,
        num_warps=4, **pdl,
    )
    return out


def sparse_mla_decode_triton(
    q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size, scale, **tuning
) -> torch.Tensor:
    """Sparse MLA decode over the blocks of block_idx [B, 1, K] (see the package docstring)."""
    return mla_decode_launch(q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size, scale, **tuning)
