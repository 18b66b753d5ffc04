"""The exact group score on the tensor cores for wide codes and large groups (MLA: 576-bit split
codes, 128 query heads on one latent kv-head).

``mma_scan`` takes 128-bit codes and groups of up to 30 query codes, with the query planes
derived inside every scan program. DeepSeek's codes are 18 words and its group is all 128 heads:
there the SIMT scan derived the planes from 128 query codes in every program (a chain of 128
loads) and spent 42-59 us on 9.4 MB of codes at B = 1 (H200, 128K). Here:

* ``_signed_planes_kernel`` (grid (B * Hkv, W)) computes a row's R = bit_length(G) signed
  planes once: plane p, word w holds bit p of ``v_b = G / 2 - c_b`` (two's complement) for the
  32 bits b of word w, c_b = the number of the row's G query codes with bit b set. One load of
  G words and two reductions a program.
* ``_block_keys_wide_kernel`` scores 16 tokens at a time with 1-bit MMAs
  (``mma.sync.m16n8k128 ... and.popc``, accumulating): with ``v_b`` the exact score is
      sum_g (BITS - 2 Ham(q_g, k)) = 2 sum_b v_b - 4 sum_b k_b v_b,
      sum_b k_b v_b = sum_p coef_p popc(plane_p & k)    (coef 2^p, the top plane -2^(R-1)),
  so one MMA of 128 code bits gives every plane's popcount for 16 tokens (R <= 8 planes: the
  MMA's 8 columns). The MMA's K index is any permutation of the code's bits as long as A (key
  codes) and B (planes) use the same one: a lane loads 8 bytes of a token (words 8s + 2 tid and
  8s + 2 tid + 1) and feeds the low word to one MMA and the high word to the next, so a token of
  W words costs a lane ceil(W / 8) loads and 2 ceil(W / 8) MMAs per 16 tokens (MLA: 3 loads,
  6 MMAs). ``2 sum_b v_b`` (the score's constant) is a warp sum of the planes' popcounts.

Block keys, histogram counts and the block reductions are ``mma_scan``'s (same fragments, same
``_emit``), bit for bit the SIMT scan's keys (GPU tests). Applies (``wide_applies``) to even
W in [2, 32] other than 4, the signed planes of an even G with bit_length(G) <= 8 (G <= 254),
"max" blocks without weights, contiguous 8-byte aligned codes, chunks of 16-512 tokens; the
CPU interpreter runs the planes kernel (tested against torch) but not the scan (inline PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.ops._pdl import pdl_args, pdl_enter
from kvcomp.ops.hamming_topk.kernels import _popc, _scan_program
from kvcomp.ops.hamming_topk.mma_scan import (
    _emit,
    _emit8,
    _lane_id,
    _max4,
    _pair_max,
    _plane_weight,
)

# take the wide tensor-core scan where it applies (False: the SIMT scan). H200, MLA geometry at
# 128K, hamming_topk (session 16, tools/experiments/mla_profile.py, same process): 20.7 / 32.3 /
# 43.6 us at B = 1 / 4 / 8 against 68.6 / 155.0 / 252.8 with the SIMT scan
MMA_WIDE = True
# warps a program (8: equal within 1 us there)
WIDE_WARPS = 4
# at least this many programs (several warp tiles a program above), as mma_scan's (16384: equal
# there; 1024: equal at B = 1 / 4, 47.2 against 43.6 us at B = 8)
WIDE_TARGET_PROGRAMS = 4096
MAX_WORDS = 32  # 2 * 4 segments of 8 bytes: 8 B fragments a lane


@triton.jit
def _signed_planes_kernel(
    q_ptr, planes_ptr, Hkv, sqb, sqh, sqw,
    G: tl.constexpr, G_PAD: tl.constexpr, W: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """planes[pid, p, w] (int32 [B * Hkv, R, W]) = bit p of G / 2 - c_b for the bits b of word w,
    c_b counted over query heads h * G .. h * G + G - 1 of sequence b (pid = b * Hkv + h)."""
    pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    g = tl.arange(0, G_PAD)
    q = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + w * sqw, mask=g < G, other=0)  # [G_PAD]
    bit = tl.arange(0, 32)
    cnt = tl.sum((q[:, None] >> bit[None, :]) & 1, axis=0)  # [32]: c_b
    v = G // 2 - cnt  # in [-G/2, G/2]: R bits of two's complement
    p = tl.arange(0, R_PAD)
    words = tl.sum(((v[None, :] >> p[:, None]) & 1) << bit[None, :], axis=1)  # distinct bits: sum == OR
    tl.store(planes_ptr + (pid * R + p) * W + w, words, mask=p < R)


@triton.jit
def _warp_sum(x):
    return tl.inline_asm_elementwise("redux.sync.add.s32 $0, $1, 0xffffffff;", "=r,r", [x],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mma_acc(a0, a1, b0, c0, c1, c2, c3):
    """D = C + popc(A & B) of one m16n8k128 1-bit MMA, per lane (d0, d1, d2, d3)."""
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
        "{$0, $1, $2, $3}, {$4, $5}, {$6}, {$7, $8, $9, $10};",
        "=r,=r,=r,=r,r,r,r,r,r,r,r", [a0, a1, b0, c0, c1, c2, c3],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _words2(k64, t, s: tl.constexpr, tid, t_hi, W2: tl.constexpr):
    """Words 8 s + 2 tid and 8 s + 2 tid + 1 of token t's code, one 8-byte load (0 at or past
    t_hi or past the code)."""
    col = 4 * s + tid  # in 8-byte units
    v = tl.load(k64 + t.to(tl.int64) * W2 + col, mask=(t < t_hi) & (col < W2), other=0)
    return v.to(tl.int32), (v >> 32).to(tl.int32)


@triton.jit
def _seg(k64, t, s: tl.constexpr, tid, t_hi, W2: tl.constexpr, bl, bh, d0, d1, d2, d3):
    """The two MMAs of segment s (8 words) for the lane's tokens t and t + 8."""
    a0l, a0h = _words2(k64, t, s, tid, t_hi, W2)
    a1l, a1h = _words2(k64, t + 8, s, tid, t_hi, W2)
    d0, d1, d2, d3 = _mma_acc(a0l, a1l, bl, d0, d1, d2, d3)
    return _mma_acc(a0h, a1h, bh, d0, d1, d2, d3)


@triton.jit
def _group_max(k64, t, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base,
               W2: tl.constexpr, NS: tl.constexpr):
    """The larger exact score of the lane's tokens t and t + 8 (16 tokens a warp: every lane of a
    quad gets its tokens' scores; int32 min for tokens at or past ``t_hi``)."""
    d0, d1, d2, d3 = _seg(k64, t, 0, tid, t_hi, W2, b0, b1, zero, zero, zero, zero)
    if NS > 1:
        d0, d1, d2, d3 = _seg(k64, t, 1, tid, t_hi, W2, b2, b3, d0, d1, d2, d3)
    if NS > 2:
        d0, d1, d2, d3 = _seg(k64, t, 2, tid, t_hi, W2, b4, b5, d0, d1, d2, d3)
    if NS > 3:
        d0, d1, d2, d3 = _seg(k64, t, 3, tid, t_hi, W2, b6, b7, d0, d1, d2, d3)
    return _pair_max(d0, d1, d2, d3, t, t_hi, w_lo, w_hi, base)


@triton.jit
def _tile8(k64, tok, gid, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base,
           W2: tl.constexpr, NS: tl.constexpr):
    """Per-lane score maxima of the 8 MMA groups of tokens [tok, tok + 128)."""
    t = tok + gid
    return (_group_max(k64, t, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 16, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 32, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 48, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 64, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 80, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 96, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS),
            _group_max(k64, t + 112, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7, zero, w_lo, w_hi, base, W2, NS))


@triton.jit
def _plane_word(prow, col, ok, W: tl.constexpr):
    return tl.load(prow + col, mask=ok & (col < W), other=0)


@triton.jit
def _block_keys_wide_kernel(
    planes_ptr, k_ptr, len_ptr, key_ptr,
    Hkv, NB_OUT, BLOCKS_PER_PROG, skb, skh,
    W: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, NWARPS: tl.constexpr,
    must_ptr=None, hist_ptr=None, HIST: tl.constexpr = False, M: tl.constexpr = 0,
    KMIN: tl.constexpr = 0, NBINS: tl.constexpr = 1, KSTEP: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Block keys (the block max of the exact score, int32) of blocks [pid1 * BLOCKS_PER_PROG,
    ...) of row (b, kv-head) = pid0, into key_ptr + pid0 * NB_OUT, from the row's planes
    (``_signed_planes_kernel``) and the key codes contiguous [L, W] at k_ptr + b*skb + h*skh
    (8-byte aligned). HIST: as ``mma_scan`` (must-select blocks left out). Per-lane values are
    [T] tensors of one element a thread, the lane index from %laneid (``mma_scan``'s doc)."""
    pdl_enter(PDL)
    pid, b, h, seq_len, n_blocks, blk_lo, blk_hi = _scan_program(len_ptr, Hkv, BLOCKS_PER_PROG, CHUNK)
    t_hi = tl.minimum(seq_len, blk_hi * CHUNK)
    WT: tl.constexpr = 128 if CHUNK < 128 else CHUNK  # tokens of a warp tile
    NM: tl.constexpr = WT // 16  # MMA groups of a warp tile
    BPW: tl.constexpr = WT // CHUNK  # blocks of a warp tile
    MPB: tl.constexpr = CHUNK // 16 if CHUNK < 128 else NM  # MMA groups of a block
    T: tl.constexpr = NWARPS * 32
    STEP: tl.constexpr = NWARPS * BPW  # blocks of a program tile
    W2: tl.constexpr = W // 2  # 8-byte units of a code
    NS: tl.constexpr = (W + 7) // 8  # segments of 8 words

    i = tl.arange(0, T)
    lane = _lane_id(i)
    warp = i // 32
    gid = lane // 4
    tid = lane % 4
    k64 = (k_ptr + b * skb + h * skh).to(tl.pointer_type(tl.int64))
    key_row = key_ptr + pid * NB_OUT
    if HIST:
        hist_row = hist_ptr + pid * NBINS
    else:
        hist_row = hist_ptr
    # B fragments: plane gid's words 8 s + 2 tid (+ 1) of the segments s (zero past R or W)
    prow = planes_ptr + (pid * R + gid) * W
    pok = gid < R
    c0 = 2 * tid
    b0 = _plane_word(prow, c0, pok, W)
    b1 = _plane_word(prow, c0 + 1, pok, W)
    b2 = _plane_word(prow, c0 + 8, pok, W)
    b3 = _plane_word(prow, c0 + 9, pok, W)
    b4 = _plane_word(prow, c0 + 16, pok, W)
    b5 = _plane_word(prow, c0 + 17, pok, W)
    b6 = _plane_word(prow, c0 + 24, pok, W)
    b7 = _plane_word(prow, c0 + 25, pok, W)
    # 2 sum_b v_b: every (plane, word) is held by one lane of each warp
    npop = (_popc(b0, True) + _popc(b1, True) + _popc(b2, True) + _popc(b3, True) + _popc(b4, True)
            + _popc(b5, True) + _popc(b6, True) + _popc(b7, True))
    base = 2 * _warp_sum(_plane_weight(gid, R) * npop)
    w_lo = _plane_weight(2 * tid, R)
    w_hi = _plane_weight(2 * tid + 1, R)
    zero = tl.zeros_like(i)
    for blk0 in range(blk_lo, blk_hi, STEP):
        blk_w = blk0 + warp * BPW  # this warp's first block
        tok_w = blk_w * CHUNK  # and token
        if WT == 128:
            r0, r1, r2, r3, r4, r5, r6, r7 = _tile8(k64, tok_w, gid, tid, t_hi, b0, b1, b2, b3, b4, b5, b6, b7,
                                                    zero, w_lo, w_hi, base, W2, NS)
            _emit8(r0, r1, r2, r3, r4, r5, r6, r7, blk_w, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row,
                   MPB, HIST, M, KMIN, KSTEP)
        else:  # one block of chunk / 16 MMA groups, 8 at a time
            run = tl.full([T], -2147483648, dtype=tl.int32)
            for g in tl.static_range(NM // 8):
                r0, r1, r2, r3, r4, r5, r6, r7 = _tile8(k64, tok_w + g * 128, gid, tid, t_hi, b0, b1, b2, b3, b4,
                                                        b5, b6, b7, zero, w_lo, w_hi, base, W2, NS)
                run = tl.maximum(run, tl.maximum(_max4(r0, r1, r2, r3), _max4(r4, r5, r6, r7)))
            _emit(run, blk_w, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)


def wide_form_ok(W: int, G: int, form: int, majority: bool, chunk_size: int, chunk_repre: str,
                 weighted: bool) -> bool:
    """The scoring cases ``_block_keys_wide_kernel`` computes (module doc); the layout and device
    conditions are ``wide_applies``'."""
    return (W % 2 == 0 and 2 <= W <= MAX_WORDS and W != 4 and form == 2 and not majority
            and 4 <= G and G.bit_length() <= 8 and chunk_size in (16, 32, 64, 128, 256, 512)
            and chunk_repre == "max" and not weighted)


def wide_applies(k_codes: torch.Tensor, G: int, form: int, majority: bool, chunk_size: int, chunk_repre: str,
                 weighted: bool, select, interpreting: bool) -> bool:
    """Whether the wide tensor-core scan takes this call: ``MMA_WIDE``, sm_80+, not the
    interpreter, no fused selection, ``wide_form_ok``, codes contiguous [L, W] with 8-byte aligned
    rows."""
    if not MMA_WIDE or interpreting or not k_codes.is_cuda or select is not None:
        return False
    if torch.cuda.get_device_capability(k_codes.device) < (8, 0):
        return False
    W = k_codes.shape[3]
    aligned = (k_codes.data_ptr() % 8 == 0 and k_codes.stride(0) % 2 == 0 and k_codes.stride(1) % 2 == 0)
    return (wide_form_ok(W, G, form, majority, chunk_size, chunk_repre, weighted) and aligned
            and k_codes.stride(3) == 1 and k_codes.stride(2) == W)


def signed_planes(q_codes: torch.Tensor, Hkv: int, R: int, pdl: dict | None = None) -> torch.Tensor:
    """int32 [B * Hkv, R, W]: the signed planes of each (sequence, kv-head)'s G = Hq / Hkv query
    codes (``_signed_planes_kernel``); any strides."""
    B, Hq, W = q_codes.shape
    G = Hq // Hkv
    planes = torch.empty(B * Hkv, R, W, dtype=torch.int32, device=q_codes.device)
    if B * Hkv:
        _signed_planes_kernel[(B * Hkv, W)](
            q_codes, planes, Hkv, *q_codes.stride(), G=G, G_PAD=max(2, triton.next_power_of_2(G)), W=W, R=R,
            R_PAD=max(2, triton.next_power_of_2(R)), num_warps=4, **(pdl or {}),
        )
    return planes


def block_keys_wide(q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor, chunk_size: int,
                    R: int, keys: torch.Tensor, hist: dict | None) -> torch.Tensor:
    """The planes, then ``_block_keys_wide_kernel`` (``wide_applies`` must hold): keys [B, Hkv, NB]."""
    B, Hq, W = q_codes.shape
    _, Hkv, _, _ = k_codes.shape
    planes = signed_planes(q_codes, Hkv, R, pdl_args(q_codes, "rows", rows=B * Hkv))
    nb = keys.shape[2]
    bpt = WIDE_WARPS * max(1, 128 // chunk_size)  # blocks of a program's tile
    splits = max(1, min(triton.cdiv(WIDE_TARGET_PROGRAMS, B * Hkv), triton.cdiv(nb, bpt)))
    per_prog = triton.cdiv(triton.cdiv(nb, splits), bpt) * bpt
    splits = triton.cdiv(nb, per_prog)
    _block_keys_wide_kernel[(B * Hkv, splits)](
        planes, k_codes, seq_lens, keys, Hkv, nb, per_prog, k_codes.stride(0), k_codes.stride(1),
        W=W, R=R, CHUNK=chunk_size, NWARPS=WIDE_WARPS, num_warps=WIDE_WARPS, **(hist or {}),
        **pdl_args(k_codes, "scan", rows=B * Hkv),
    )
    return keys
