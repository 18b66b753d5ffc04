"""The exact group score on the tensor cores: the Hamming scan's popcounts as 1-bit MMAs.

The signed-planes form (``kernels`` module doc) scores a token k as
``base - 4 * sum_p coef_p * popc(plane_p & k)`` over R planes (coef 2^p, the top one -2^(R-1)).
Every ``popc(plane_p & k)`` of 16 tokens and up to 8 planes is one
``mma.sync.m16n8k128.row.col.s32.b1.b1.s32.and.popc``: A = 16 token codes of 128 bits (rows),
B = the planes (columns), D[token, plane] = popc(k & plane). On sm_90 that replaces 12 POPC a
token (G = 4, 3 planes x 4 words; 16 at G = 8) by 1/16 of an MMA: the scan no longer waits on
the popcount pipe (16 a clock an SM), which set its pace at large batches.

Fragments (PTX ISA, m16n8k128 .b1; lane = 4 * gid + tid): a lane holds word ``tid`` of tokens
``gid`` and ``gid + 8`` (A), word ``tid`` of plane ``gid`` (B, zero for gid >= R) and gets
D[gid][2 tid], D[gid][2 tid + 1], D[gid + 8][2 tid], D[gid + 8][2 tid + 1]. A lane weights its
two columns, two butterfly shuffles sum the quad (every plane of a token), a warp max reduces a
block. So a block is scanned by one warp: chunks of 16 to 128 tokens share a 128-token warp
tile (8 MMAs), a chunk of 256 or 512 is one warp tile of chunk / 16 MMAs; the block reductions
never leave the warp. Each program runs NWARPS warps over consecutive blocks, as the SIMT scan's tiles.

The kernel works on 1-D tensors of one element a thread (``[NWARPS * 32]``), with the lane index
from ``%laneid`` (opaque to Triton's contiguity analysis, so the loads stay one word a lane and
the layout one element a thread, as the fragments need). Applies to 128-bit codes, exact mode
with even G <= 64 (signed planes, up to 7 of the MMA's 8 columns), chunk_repre "max" without
per-token weights, contiguous codes and chunks of 16, 32, 64, 128, 256 or 512 tokens
(``mma_form_ok``); everything else, and
the CPU interpreter, take the SIMT scan. Same keys and histogram counts as the SIMT scan, bit
for bit (the GPU tests compare both with the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.ops._pdl import pdl_enter
from kvcomp.ops.hamming_topk.kernels import _scan_program, _sliced_base, _sliced_rows

# take the tensor-core scan where it applies (False: the SIMT scan everywhere)
MMA_SCAN = True
# groups of at most this many query codes (signed planes of G <= 127 fit the B operand's 8
# columns; 64 is what the GPU tests run: a group's codes are an unrolled loop of G loads). Session
# 20: 31 before, so a verify step's G x T = 32 rows took the SIMT scan. H200, 128K, B = 8,
# Qwen3-8B, T = 8: selection 76.5 -> 49.0 us, verify step 128.9 -> 91.1 us (decode.md)
MMA_MAX_G = 64
MMA_WARPS = 4
# at least this many programs; above, several warp tiles a program (as kernels.TARGET_PROGRAMS).
# H200, 128K, 2048 tokens, B = 8 (16384 warp tiles; session 14, two runs each): 4096 (four tiles
# a program, the query planes derived half as often) against 8192: hamming_topk 38.5 / 39.2
# against 39.8 / 41.1 us and the step 67.3 / 67.3 against 68.2 / 68.4 for Qwen3-32B, 38.8 / 39.4
# against 39.2 / 41.4 and 65.2 / 65.2 against 65.3 / 65.4 for Qwen3-8B; one tile a program
# (16384) 74.9 / 70.6 us. B = 4 at 128K (8192 tiles, two a program now): kvcomp's e2e step 6.85
# against 6.79-6.84 ms (equal); B = 1 and 2 keep one tile a program
MMA_TARGET_PROGRAMS = 4096
# chunks up to 128: a program's first warp tile of key codes is loaded before the query codes
# (and before the PDL wait where EARLY applies), overlapping the two memory round trips
# (H200, 128K, hamming_topk: B = 1 11.4-11.7 against 13.2 us; B = 8 38.6-38.8 against 38.8. Also
# loading the next warp tile's codes before a tile's MMAs, 32 loads a lane in flight, was slower
# at B = 1 and 8: 12.2 and 42.0 us; session 10, decode.md)
MMA_FIRST_EARLY = True
# register cap (ptxas .maxnreg) of the scan's programs, or None (the compiler's choice: 48 for
# sm_90, so 10 programs of 4 warps an SM and the 2048 programs of 128K at B = 1 in ~1.5 waves;
# 32 would fit 16 an SM, one wave, at the price of spills)
MMA_MAXNREG = None


@triton.jit
def _lane_id(like):
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _shfl_xor1(x):
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;", "=r,r", [x],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _shfl_xor2(x):
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;", "=r,r", [x],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _warp_max(x):
    return tl.inline_asm_elementwise("redux.sync.max.s32 $0, $1, 0xffffffff;", "=r,r", [x],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mma_and_popc(a0, a1, b0, zero):
    """D = popc(A & B) of one m16n8k128 1-bit MMA, per lane (d0, d1, d2, d3)."""
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc "
        "{$0, $1, $2, $3}, {$4, $5}, {$6}, {$7, $7, $7, $7};",
        "=r,=r,=r,=r,r,r,r,r", [a0, a1, b0, zero],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _plane_weight(n, R: tl.constexpr):
    """coef of plane n in the signed form (0 past the R planes)."""
    w = tl.where(n < R - 1, 1 << n, 0)
    return tl.where(n == R - 1, -(1 << (R - 1)), w)


@triton.jit
def _ld(k_row, t, tid, t_hi):
    """Word ``tid`` of token ``t`` (0 at or past ``t_hi``)."""
    return tl.load(k_row + t.to(tl.int64) * 4 + tid, mask=t < t_hi, other=0)


@triton.jit
def _load8(k_row, tok, gid, tid, t_hi):
    """The A fragments of 8 MMAs over tokens [tok, tok + 128): (a0, a1) of MMA m are word ``tid``
    of tokens tok + 16 m + gid and tok + 16 m + gid + 8. Issued together, before any MMA: 16
    loads a lane in flight (interleaved with the MMAs, ptxas kept 4-6)."""
    t = tok + gid
    return (_ld(k_row, t, tid, t_hi), _ld(k_row, t + 8, tid, t_hi),
            _ld(k_row, t + 16, tid, t_hi), _ld(k_row, t + 24, tid, t_hi),
            _ld(k_row, t + 32, tid, t_hi), _ld(k_row, t + 40, tid, t_hi),
            _ld(k_row, t + 48, tid, t_hi), _ld(k_row, t + 56, tid, t_hi),
            _ld(k_row, t + 64, tid, t_hi), _ld(k_row, t + 72, tid, t_hi),
            _ld(k_row, t + 80, tid, t_hi), _ld(k_row, t + 88, tid, t_hi),
            _ld(k_row, t + 96, tid, t_hi), _ld(k_row, t + 104, tid, t_hi),
            _ld(k_row, t + 112, tid, t_hi), _ld(k_row, t + 120, tid, t_hi))


@triton.jit
def _mma_max(a0, a1, t, t_hi, bq, zero, w_lo, w_hi, base):
    """The larger exact score of the lane's two tokens t and t + 8 of one MMA (every lane of a
    quad gets its tokens' scores; int32 min for tokens at or past ``t_hi``)."""
    d0, d1, d2, d3 = _mma_and_popc(a0, a1, bq, zero)
    return _pair_max(d0, d1, d2, d3, t, t_hi, w_lo, w_hi, base)


@triton.jit
def _pair_max(d0, d1, d2, d3, t, t_hi, w_lo, w_hi, base):
    """From a lane's MMA outputs (popcounts of planes 2 tid and 2 tid + 1 for tokens t and t + 8):
    the larger exact score of its two tokens, int32 min for tokens at or past ``t_hi``."""
    sa = w_lo * d0 + w_hi * d1  # token t's planes 2 tid, 2 tid + 1; token t + 8's
    sb = w_lo * d2 + w_hi * d3
    sa = sa + _shfl_xor1(sa)
    sb = sb + _shfl_xor1(sb)
    sa = sa + _shfl_xor2(sa)  # every plane of the token: the quad's sum
    sb = sb + _shfl_xor2(sb)
    sa = tl.where(t < t_hi, base - 4 * sa, -2147483648)
    sb = tl.where(t + 8 < t_hi, base - 4 * sb, -2147483648)
    return tl.maximum(sa, sb)


@triton.jit
def _max4(a, b, c, d):
    return tl.maximum(tl.maximum(a, b), tl.maximum(c, d))


@triton.jit
def _tile8_max(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
               tok, gid, t_hi, bq, zero, w_lo, w_hi, base):
    """Per-lane score maxima of the 8 MMAs of ``_load8``'s fragments (tokens from ``tok``)."""
    t = tok + gid
    return (_mma_max(x0, x1, t, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x2, x3, t + 16, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x4, x5, t + 32, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x6, x7, t + 48, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x8, x9, t + 64, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x10, x11, t + 80, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x12, x13, t + 96, t_hi, bq, zero, w_lo, w_hi, base),
            _mma_max(x14, x15, t + 112, t_hi, bq, zero, w_lo, w_hi, base))


@triton.jit
def _emit(run, blk, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row,
          HIST: tl.constexpr, M: tl.constexpr, KMIN: tl.constexpr, KSTEP: tl.constexpr):
    """Block ``blk``'s key, the warp max of ``run``, stored by lane 0 (blocks below ``blk_hi``)
    and counted in the row's histogram unless it is a must-select block."""
    out_ok = (lane == 0) & (blk < blk_hi)
    counted = out_ok
    if HIST:  # the must-select entries first: their loads overlap the reduction
        for jm in tl.static_range(M):
            mj = tl.load(must_ptr + jm)
            counted = counted & (blk != tl.where(mj >= 0, mj, n_blocks + mj))
    key = _warp_max(run)
    tl.store(key_row + blk, key, mask=out_ok)
    if HIST:
        tl.atomic_add(hist_row + (key - KMIN) // KSTEP, 1, mask=counted, sem="relaxed")


@triton.jit
def _emit8(r0, r1, r2, r3, r4, r5, r6, r7, blk, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row,
           MPB: tl.constexpr, HIST: tl.constexpr, M: tl.constexpr, KMIN: tl.constexpr, KSTEP: tl.constexpr):
    """The keys of a 128-token warp tile's blocks (MPB MMAs a block: 8, 4, 2 or 1) from the
    maxima of its 8 MMAs, blocks blk, blk + 1, ..."""
    if MPB == 8:
        _emit(tl.maximum(_max4(r0, r1, r2, r3), _max4(r4, r5, r6, r7)), blk, lane, blk_hi, n_blocks, key_row,
              must_ptr, hist_row, HIST, M, KMIN, KSTEP)
    elif MPB == 4:
        _emit(_max4(r0, r1, r2, r3), blk, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(_max4(r4, r5, r6, r7), blk + 1, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN,
              KSTEP)
    elif MPB == 2:
        _emit(tl.maximum(r0, r1), blk, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(tl.maximum(r2, r3), blk + 1, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN,
              KSTEP)
        _emit(tl.maximum(r4, r5), blk + 2, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN,
              KSTEP)
        _emit(tl.maximum(r6, r7), blk + 3, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN,
              KSTEP)
    else:
        _emit(r0, blk, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r1, blk + 1, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r2, blk + 2, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r3, blk + 3, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r4, blk + 4, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r5, blk + 5, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r6, blk + 6, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)
        _emit(r7, blk + 7, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)


@triton.jit
def _block_keys_mma_kernel(
    q_ptr, k_ptr, len_ptr, key_ptr,
    Hkv, NB_OUT, BLOCKS_PER_PROG,
    sqb, sqh, sqw, skb, skh,
    G: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, NWARPS: tl.constexpr,
    must_ptr=None, hist_ptr=None, HIST: tl.constexpr = False, M: tl.constexpr = 0,
    KMIN: tl.constexpr = 0, NBINS: tl.constexpr = 1, KSTEP: tl.constexpr = 1,
    PDL: tl.constexpr = False, EARLY: tl.constexpr = False, FIRST_EARLY: tl.constexpr = True,
):
    """Block keys (the block max of the exact score, int32) of blocks [pid1 * BLOCKS_PER_PROG,
    ...) of row (b, kv-head) = pid0, into key_ptr + pid0 * NB_OUT; the query codes of row
    (b, h) at q_ptr + b*sqb + (h*G + g)*sqh + w*sqw, the key codes contiguous [L, 4] at
    k_ptr + b*skb + h*skh. HIST: as the SIMT scan (must-select blocks left out). EARLY (PDL;
    only the query codes are the previous launch's): the lengths, and with FIRST_EARLY the
    first warp tile's key codes, are loaded before the wait. FIRST_EARLY (chunks up to 128):
    the first warp tile's codes are loaded before the query codes and the planes, so the
    program's two memory round trips overlap (B = 1 is one wave of programs: latency).
    Every per-lane value is a [T] tensor of one element a thread (the default 1-D layout),
    the lane index from %laneid: 2-D tiles would let Triton pick layouts whose threads hold
    several columns, which the warp-wide MMA and shuffles cannot take."""
    if not EARLY:
        pdl_enter(PDL)
    pid, b, h, seq_len, n_blocks, blk_lo, blk_hi = _scan_program(len_ptr, Hkv, BLOCKS_PER_PROG, CHUNK)
    t_hi = tl.minimum(seq_len, blk_hi * CHUNK)
    WT: tl.constexpr = 128 if CHUNK < 128 else CHUNK  # tokens of a warp tile
    NM: tl.constexpr = WT // 16  # MMAs of a warp tile
    BPW: tl.constexpr = WT // CHUNK  # blocks of a warp tile
    MPB: tl.constexpr = CHUNK // 16 if CHUNK < 128 else NM  # MMAs of a block
    T: tl.constexpr = NWARPS * 32
    STEP: tl.constexpr = NWARPS * BPW  # blocks of a program tile

    i = tl.arange(0, T)
    lane = _lane_id(i)  # opaque to the contiguity analysis: the loads stay one word a lane
    warp = i // 32
    gid = lane // 4
    tid = lane % 4
    k_row = k_ptr + b * skb + h * skh
    key_row = key_ptr + pid * NB_OUT
    if HIST:
        hist_row = hist_ptr + pid * NBINS
    else:
        hist_row = hist_ptr
    if WT == 128 and FIRST_EARLY:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load8(
            k_row, (blk_lo + warp * BPW) * CHUNK, gid, tid, t_hi)
    if EARLY:
        pdl_enter(PDL)
    # the planes: this lane's word (tid) of plane gid, bit-sliced from the G query codes' word tid
    p0, p1, p2, p3, p4, p5, p6, n_set = _sliced_rows(q_ptr + b * sqb + (h * G) * sqh, sqh, sqw, tid, G, 4,
                                                     R, 2, False, True)
    n_all = n_set + _shfl_xor1(n_set)
    n_all = n_all + _shfl_xor2(n_all)  # sum over the quad's 4 words
    base = _sliced_base(n_all, G, 4, False)
    bq = tl.where(gid == 0, p0, tl.where(gid == 1, p1, tl.where(gid == 2, p2, tl.where(gid == 3, p3, tl.where(
        gid == 4, p4, tl.where(gid == 5, p5, p6))))))
    bq = tl.where(gid < R, bq, 0)
    w_lo = _plane_weight(2 * tid, R)
    w_hi = _plane_weight(2 * tid + 1, R)
    zero = tl.zeros_like(i)
    for blk0 in range(blk_lo, blk_hi, STEP):
        blk_w = blk0 + warp * BPW  # this warp's first block
        tok_w = blk_w * CHUNK  # and token
        if WT == 128:  # 8 MMAs: 16 loads a lane, then the MMAs
            if FIRST_EARLY:
                if blk0 != blk_lo:
                    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load8(
                        k_row, tok_w, gid, tid, t_hi)
            else:
                x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load8(
                    k_row, tok_w, gid, tid, t_hi)
            r0, r1, r2, r3, r4, r5, r6, r7 = _tile8_max(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13,
                                                        x14, x15, tok_w, gid, t_hi, bq, zero, w_lo, w_hi, base)
            _emit8(r0, r1, r2, r3, r4, r5, r6, r7, blk_w, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row,
                   MPB, HIST, M, KMIN, KSTEP)
        else:  # one block of chunk / 16 MMAs, in groups of 8
            run = tl.full([T], -2147483648, dtype=tl.int32)
            for g in tl.static_range(NM // 8):
                tok = tok_w + g * 128
                y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = _load8(
                    k_row, tok, gid, tid, t_hi)
                r0, r1, r2, r3, r4, r5, r6, r7 = _tile8_max(y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12,
                                                            y13, y14, y15, tok, gid, t_hi, bq, zero, w_lo, w_hi,
                                                            base)
                run = tl.maximum(run, tl.maximum(_max4(r0, r1, r2, r3), _max4(r4, r5, r6, r7)))
            _emit(run, blk_w, lane, blk_hi, n_blocks, key_row, must_ptr, hist_row, HIST, M, KMIN, KSTEP)


def mma_form_ok(W: int, G: int, form: int, majority: bool, chunk_size: int, chunk_repre: str,
                weighted: bool, contiguous: bool) -> bool:
    """The scoring cases the tensor-core scan computes (module doc): W = 4 words, the signed
    planes (form 2) of G <= ``MMA_MAX_G`` query codes (64; G x T rows of a verify step), "max"
    blocks of tokens without weights (no k_scale, no "lse" query scale), codes contiguous [L, 4],
    chunks of 16-512 tokens that divide or are divided by 128 (those tested on the GPU; a larger
    chunk's warp tile unrolls chunk / 16 MMAs)."""
    chunk_ok = chunk_size in (16, 32, 64, 128, 256, 512)
    return (W == 4 and form == 2 and not majority and G <= MMA_MAX_G and chunk_ok
            and chunk_repre == "max" and not weighted and contiguous)


def mma_applies(k_codes: torch.Tensor, G: int, form: int, majority: bool, chunk_size: int, chunk_repre: str,
                k_scale, q, q_scale, select, interpreting: bool) -> bool:
    """Whether the tensor-core scan takes this call: ``MMA_SCAN``, a CUDA device of sm_80+, not
    the interpreter, no fused selection, and ``mma_form_ok``."""
    if not MMA_SCAN or interpreting or not k_codes.is_cuda or select is not None:
        return False
    if torch.cuda.get_device_capability(k_codes.device) < (8, 0):
        return False
    return mma_form_ok(k_codes.shape[3], G, form, majority, chunk_size, chunk_repre,
                       k_scale is not None or q is not None or q_scale is not None,
                       k_codes.stride(3) == 1 and k_codes.stride(2) == 4)


def block_keys_mma(q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor, chunk_size: int,
                   R: int, keys: torch.Tensor, hist: dict | None, pdl: dict, early: bool) -> torch.Tensor:
    """Launch ``_block_keys_mma_kernel`` (``mma_applies`` must hold): keys [B, Hkv, NB] int32;
    ``early``: as the SIMT scan's EARLY (the lengths and, for chunks up to 128, the first warp tile
    of key codes are loaded before the PDL wait)."""
    B, Hq, _ = q_codes.shape
    _, Hkv, Lmax, _ = k_codes.shape
    nb = keys.shape[2]
    bpt = MMA_WARPS * max(1, 128 // chunk_size)  # blocks of a program's tile (one warp tile each warp)
    splits = max(1, min(triton.cdiv(MMA_TARGET_PROGRAMS, B * Hkv), triton.cdiv(nb, bpt)))
    per_prog = triton.cdiv(triton.cdiv(nb, splits), bpt) * bpt
    splits = triton.cdiv(nb, per_prog)
    _block_keys_mma_kernel[(B * Hkv, splits)](
        q_codes, k_codes, seq_lens, keys, Hkv, nb, per_prog,
        q_codes.stride(0), q_codes.stride(1), q_codes.stride(2), k_codes.stride(0), k_codes.stride(1),
        G=Hq // Hkv, R=R, CHUNK=chunk_size, NWARPS=MMA_WARPS, num_warps=MMA_WARPS,
        EARLY=early, FIRST_EARLY=MMA_FIRST_EARLY, **(hist or {}), **pdl,
        **({"maxnreg": MMA_MAXNREG} if MMA_MAXNREG else {}),
    )
    return keys
