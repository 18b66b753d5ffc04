"""Triton kernels of ``hamming_topk``: fused token scoring + block reduction, then selection.

Stage 1, ``_block_keys_kernel``, grid (B * Hkv, SPLITS): a program scans a range of blocks of one
(sequence, kv-head), only blocks below ``ceil(seq_len / chunk)`` (no work over padding), scores
every token from its packed code (token scores stay in registers) and writes one int32 *key* per
block to a small buffer [B, Hkv, NB]: the block max, or for "mean" the fp32 mean mapped to an
int32 with the same order. With per-token weights (``k_scale``, e.g. key norms) a token's value
is ``float32(score) * float32(k_scale[t])`` (one IEEE multiply, -0.0 read as +0.0), the block key
is the fp32 max mapped the same way. The exact-or-cheaper forms of the group score (FORM):

* ``FORM_XOR`` (direct): ``sum_g (BITS - 2 popc(q_g ^ k))``, G popcounts per word. With one
  row, the *majority* code (bit b set iff more than half of the G query codes have it) gives the
  cheaper ``mode="majority"`` score ``BITS - 2 popc(m ^ k)``, one popcount per word.
* ``FORM_PLANES`` (exact, cheaper for G >= 8): with c_b the number of the group's query codes
  with bit b set and k_b the key bit,
      sum_g (BITS - 2 Ham(q_g, k)) = G*BITS - 2*sum_b c_b - 2G*popc(k) + 4*sum_b c_b k_b,
  and c_b is written in P = bit_length(G) bit-planes, so sum_b c_b k_b =
  sum_p 2^p popc(plane_p & k): P + 1 popcounts per word instead of G, integer and exact.
* ``FORM_SIGNED`` (exact, even G; the default where it is the fewest popcounts):
      sum_g Ham(q_g, k) = sum_b c_b + 2 * sum_b k_b (G/2 - c_b),
  and G/2 - c_b (in [-G/2, G/2]) is written in P = bit_length(G) planes of two's complement
  (the top plane weighs -2^(P-1)): P popcounts per word, no popc(k) term (3 at G = 4, 4 at G = 8).

The planes (and the majority code) are derived from the G query codes by every scan program
(``_group_rows``, ``ROWS_IN_SCAN``), not in a launch of their own. All launches take
programmatic dependent launch on sm_90+ (``kvcomp.ops._pdl``). Where it applies (signed planes,
"max" blocks: ``mma_scan`` for 128-bit codes, ``mma_wide`` for other even widths and groups up
to 254), stage 1 is a tensor-core scan instead: the planes' popcounts as 1-bit MMAs, the same
keys and histogram counts.

Stage 2, ``_select_kernel`` (``select_kernels.py``), grid (B * Hkv): per row, a binary (or
ARITY-ary) search over the key values finds the threshold T such that ``count`` keys are >= T
(must-select blocks get a key above every real one), then one pass in index order keeps every
key > T and the lowest-index keys == T up to ``count``, and writes their indices ascending
(prefix sums give the output slots), then -1 up to K. This is exactly the reference's order
(score descending, lower index first on ties).

Histogram threshold (``HIST_SELECT``, the default where it applies: chunk_repre "max", no
``k_scale``): the block keys are then small integers, |key| <= S = G * BITS (BITS for
majority), so the scan also counts each row's keys, except the must-select blocks', into a
histogram of NBINS = next_pow2(2S + 1) int32 bins by atomics (a few per program). Stage 2
(``_select_row_hist``) reads that row's histogram once and zeroes it for the next launch (no
extra launch, graph-safe); one suffix sum gives T (the bin where the count of keys >= it first
reaches what is needed) and the number of keys above T, one reduction picks them out, and one
prefix sum over the keys of (tie at T, above T or must-select) gives every kept block's output
slot: three dependent block-wide steps instead of ~log2(2S) search rounds and the passes above.
The same selection as the search (tested). Used up to HIST_MAX_BINS bins and HIST_MAX_ROWS rows
(B * Hkv): with many rows the scan's atomics cost more than the search rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvcomp.ops._common import StreamScratch, interpreting
from kvcomp.ops._pdl import pdl_args, pdl_enter
from kvcomp.ops.hamming_topk.select_kernels import _select_kernel, _select_row, _select_row_hist

FORM_XOR = 0
FORM_PLANES = 1
FORM_SIGNED = 2
# the majority code / bit-planes are computed by every scan program from its kv-head's G query
# codes (a few hundred integer ops) instead of in a launch of their own (``_query_rows_kernel``,
# kept for the benchmark's before / after)
ROWS_IN_SCAN = True
# the scan derives those rows bit-sliced (``_sliced_rows``: every thread from the whole query
# codes, ripple-carry adders of bitwise ops), not with the cross-thread reductions of
# ``_group_rows`` (barriers between the wait and the first popcount). H200, 128K, 2048 tokens,
# B = 1: 17.7 against 18.4 us for the step (session 8)
SLICED_ROWS = True
# ... for groups whose per-bit counts c_b in [0, G] take at most this many bits (G <= 31; larger
# groups keep ``_group_rows`` in the SIMT scan). ``_sliced_rows`` itself takes up to 7 bits
# (G <= 127); the tensor-core scan uses it for the G x T rows of verify steps (``MMA_MAX_G``)
SLICED_MAX_BITS = 5
# "exact" takes the signed planes (bit_length(G) popcounts a word, even G) where that is the
# fewest; False: the choice before them (direct, or planes + popc(k))
SIGNED_PLANES = True

# tokens per tile at 128-bit codes (8 KB of codes); scaled for other code widths
BLOCK_T = 512
# blocks per program are chosen so that at least this many programs run: one tile per program
# up to 8192 tiles (B = 4 at 128K), so the whole scan is in flight at once; above, 2+ tiles a
# program spread its fixed costs (the group rows, lengths, addresses): B = 8 at 128K, 2048
# tokens, 81.4 against 83.1 us (H200, session 8; 4 tiles: 81.4, 8: 88.5; B = 1 / 4 unchanged)
TARGET_PROGRAMS = 8192
SCAN_WARPS = 4
# the selection keeps a row's keys in registers up to this many blocks, else it re-reads tiles
SELECT_BLOCK_MAX = 2048
# warps of a stage-2 program (None: 4 below 1024 blocks a row, else 8; at 1024 blocks (128K of
# chunk 128) 8 warps took hamming_topk to 39.4 against 39.9 us at B = 8 for Qwen3-32B, the same
# at B = 1 and for Qwen3-8B: H200, session 10)
SELECT_WARPS = None
# candidates per round of the threshold search (2 = binary, the default: measured on the H200,
# a 16-ary search's [BLOCK, 16] reductions cost more than the rounds they save), used up to
# ARITY_BLOCK_MAX blocks a row
SELECT_ARITY = 2
ARITY_BLOCK_MAX = 1024
# run the selection inside the scan's launch (last program of each row) instead of a 2nd kernel;
# off: measured 3x slower on the H200 (one small program then does a row's whole selection
# after the scan, with the scan's 4 warps and L2-only reads), kept for the record and tested
FUSED_SELECT = False
# ... but with the histogram threshold (few rows, "max" without k_scale), where stage 2 is one
# suffix sum and one prefix sum: the row's last scan program runs it (no second launch)
FUSED_HIST_SELECT = False
# register cap (ptxas .maxnreg) of that fused launch, or None: the selection's arrays would
# otherwise set the register count, and with it the occupancy, of every scan program
FUSED_HIST_MAXNREG = None
# stage 2 finds the threshold from a histogram the scan fills (module doc), when keys fit
HIST_SELECT = True
HIST_MAX_BINS = 8192
# wider score ranges (MLA: 128 heads x 576 bits, 36865 values a row) take the histogram with
# bins of several values (KSTEP doubled until NBINS <= HIST_MAX_BINS): stage 2 then searches T's
# bin for T (log2(KSTEP) rounds) instead of the whole key range. Off: slower on the H200 (MLA,
# 128K, hamming_topk at B = 1 / 4 / 8: 21.7 / 33.4 / 45.9 us against 20.3 / 31.9 / 43.0 for the
# search; session 16, tools/experiments/mla_profile.py), kept tested for the record
HIST_COARSE = False
# ... and only for few (sequence, kv-head) rows, where stage 2's latency is the cost. Measured on
# the H200 at 128K: B = 1 (8 rows) 13.5 vs 14.3 us for the whole hamming_topk (G = 4) and 16.6
# vs 17.2 (G = 8); B = 8 (64 rows, G = 8) 68.6 vs 65.1 us: the scan's atomics then cost more
# than the search rounds they save. Session 7, with stage 2 in the attention's prologue
# (decode_step): B = 4 (32 rows) at 128K, 2048 tokens, 48.5 vs 53.7 us for the step (G = 4),
# 55.8 vs 59.7 (G = 8); 10%: 100.0 vs 104.2, 105.6 vs 110.4
HIST_MAX_ROWS = 32
# ... and up to this many where the tensor-core scan (``mma_scan``) takes the call: B = 8 at
# 8 kv-heads (64 rows), 128K, 2048 tokens, hamming_topk 39.3 against 42.7 us (H200, session 9;
# its atomics are one a block from one lane). The SIMT scans keep 32, the limit they were timed
# with (above: at 64 rows their atomics cost more than the search rounds they save)
HIST_MAX_ROWS_MMA = 64
# bins of 4 scores for the exact score of an even G (``_hist_args``): half the bins of stage 2's
# suffix sum, the same selection (tested). H200, 128K, 2048 tokens, hamming_topk (session 10):
# Qwen3-32B (G = 8, 1024 bins instead of 2048) 39.9 against 41.0 us at B = 8, 11.8 against 12.4
# at B = 1; Qwen3-8B (G = 4) 38.7 both at B = 8
HIST_STEP4 = True
# stage 2 of the histogram path by one suffix sum + one prefix sum (``_select_row_hist``); False:
# the previous stage 2 (must blocks' keys taken out of the histogram, then the search's passes),
# kept for the benchmark's before / after
HIST_COMPACT = True
# keys a tile of the selection in the attention's prologue (``DeferredSelect``) holds: the
# attention's own registers come on top, so smaller than SELECT_BLOCK_MAX
ATTN_SELECT_BLOCK_MAX = 1024
# PDL for the scan / the stage-2 kernel up to this many rows (None: ``_pdl.DECODE_MAX_ROWS``)
SCAN_PDL_MAX_ROWS = None
# ... the stage-2 launch (the selection on its own: ``hamming_topk``; ``decode_step`` runs it in the
# attention's prologue): 16. Session 19: with PDL at 64 rows, scan + selection at B = 8 (128K)
# went from 39.1 to 40.5-40.8 us (80-81% -> 77-78% of copy): the stage-2 programs, launched
# early, wait on the SMs during the scan
SELECT_PDL_MAX_ROWS = 16
# "lse" with the queries given (decode_step, the cache's decode): every scan program computes
# its row's q_scale from q (False: lse_query_scale's torch ops first, as before session 8, and
# no early loads in the scan; the benchmark times both)
QS_IN_SCAN = True


@triton.jit
def _popc(x, USE_ASM: tl.constexpr):
    """Bit count of int32 words (as int32)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        v = x.to(tl.uint32, bitcast=True)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _group_rows(
    q_base, sqh, sqw, G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr, R: tl.constexpr,
    R_PAD: tl.constexpr, FORM: tl.constexpr, MAJORITY: tl.constexpr,
):
    """The R code-sized rows a kv-head's scan combines each key code with, from its G query codes
    at q_base + g * sqh + w * sqw: the majority code, or bit-planes of the per-bit counts c_b
    (FORM_PLANES) or of G / 2 - c_b in two's complement (FORM_SIGNED). -> (rows [R_PAD, BLOCK_W]
    int32, row r in row r; base: the constant part of the score, int32)."""
    wv = tl.arange(0, BLOCK_W)
    w_ok = wv < W
    bit = tl.arange(0, 32)
    cnt = tl.zeros([BLOCK_W, 32], dtype=tl.int32)  # c_b: the group's codes with bit b set
    for g in range(G):
        qg = tl.load(q_base + g * sqh + wv * sqw, mask=w_ok, other=0)  # [BLOCK_W]
        cnt += (qg[:, None] >> bit[None, :]) & 1
    ridx = tl.arange(0, R_PAD)[:, None]
    rows = tl.zeros([R_PAD, BLOCK_W], dtype=tl.int32)
    if MAJORITY:
        maj = tl.sum(tl.where(2 * cnt > G, 1, 0) << bit[None, :], 1)  # distinct bits: sum == OR
        rows = tl.where(ridx == 0, maj[None, :], rows)
        base = 32 * W + tl.zeros([], dtype=tl.int32)
    else:
        if FORM == 2:
            val = G // 2 - cnt  # in [-G/2, G/2]: R = bit_length(G) bits of two's complement
        else:
            val = cnt
        for p in tl.static_range(R):
            plane = tl.sum(((val >> p) & 1) << bit[None, :], 1)  # [BLOCK_W]: bit p of each val_b
            rows = tl.where(ridx == p, plane[None, :], rows)
        base = G * 32 * W - 2 * tl.sum(tl.sum(cnt, 1), 0)
    return rows, base


@triton.jit
def _row_of(p0, p1, p2, p3, p4, p5, p6, r: tl.constexpr):
    """Row r (a constexpr) of ``_sliced_rows``' planes."""
    if r == 0:
        row = p0
    elif r == 1:
        row = p1
    elif r == 2:
        row = p2
    elif r == 3:
        row = p3
    elif r == 4:
        row = p4
    elif r == 5:
        row = p5
    else:
        row = p6
    return row


@triton.jit
def _half_add(a, b):
    """Bit-sliced half adder: (sum, carry) planes of a + b for every bit position."""
    return a ^ b, a & b


@triton.jit
def _add_bit(n, carry, KBIT: tl.constexpr):
    """Bit-sliced full adder of n + carry + a constant bit: (sum, carry out) planes."""
    if KBIT:
        total = ~(n ^ carry)
        out = n | carry
    else:
        total = n ^ carry
        out = n & carry
    return total, out


@triton.jit
def _sliced_rows(
    q_base, sqh, sqw, w4, G: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
    FORM: tl.constexpr, MAJORITY: tl.constexpr, USE_ASM: tl.constexpr,
):
    """``_group_rows`` without cross-thread work: the G query codes are loaded whole by every
    thread (w4: the word indices, a [1, 1, BLOCK_W] arange in the SIMT scan's tile layout, or
    one word a lane in the MMA scan) and the per-bit counts c_b are kept bit-sliced (plane p =
    bit p of every c_b, a code-sized word), summed by ripple-carry adders of bitwise ops.
    -> (rows 0..6 shaped as w4, int32, only the first R meaningful (R <= 7: G <= 127); n_set:
    sum_g popc(q_g) per word, whose total ``_sliced_base`` turns into ``_group_rows``' base)."""
    # bits of c_b in [0, G]
    NC: tl.constexpr = 1 + (G >= 2) + (G >= 4) + (G >= 8) + (G >= 16) + (G >= 32) + (G >= 64)
    w_ok = w4 < W
    zero = tl.zeros_like(w4)
    c0 = zero
    c1 = zero
    c2 = zero
    c3 = zero
    c4 = zero
    c5 = zero
    c6 = zero
    n_set = zero  # per word: sum over g of popc(q_g); summed, sum_b c_b
    for g in tl.static_range(G):
        qg = tl.load(q_base + g * sqh + w4 * sqw, mask=w_ok, other=0)
        n_set += _popc(qg, USE_ASM)
        c0, carry = _half_add(c0, qg)  # c += q_g, bit-sliced: a ripple of half adders
        if NC > 1:
            c1, carry = _half_add(c1, carry)
        if NC > 2:
            c2, carry = _half_add(c2, carry)
        if NC > 3:
            c3, carry = _half_add(c3, carry)
        if NC > 4:
            c4, carry = _half_add(c4, carry)
        if NC > 5:
            c5, carry = _half_add(c5, carry)
        if NC > 6:
            c6 = c6 ^ carry  # (the top bit: c_b <= G < 128 never carries out of it)
    if MAJORITY:  # bit b set iff c_b > G // 2: compare the planes with the constant, top down
        gt = zero
        eq = ~zero
        for pp in tl.static_range(NC):
            cp = _row_of(c0, c1, c2, c3, c4, c5, c6, NC - 1 - pp)
            if ((G // 2) >> (NC - 1 - pp)) & 1:
                eq = eq & cp
            else:
                gt = gt | (eq & cp)
                eq = eq & ~cp
        c0 = gt
    elif FORM == 2:  # G / 2 - c_b in R-bit two's complement: ~c + (G / 2 + 1), bit-sliced (R = NC)
        K: tl.constexpr = G // 2 + 1
        c0, carry = _add_bit(~c0, zero, K & 1)
        if R > 1:
            c1, carry = _add_bit(~c1, carry, (K >> 1) & 1)
        if R > 2:
            c2, carry = _add_bit(~c2, carry, (K >> 2) & 1)
        if R > 3:
            c3, carry = _add_bit(~c3, carry, (K >> 3) & 1)
        if R > 4:
            c4, carry = _add_bit(~c4, carry, (K >> 4) & 1)
        if R > 5:
            c5, carry = _add_bit(~c5, carry, (K >> 5) & 1)
        if R > 6:
            c6, carry = _add_bit(~c6, carry, (K >> 6) & 1)
    return c0, c1, c2, c3, c4, c5, c6, n_set


@triton.jit
def _sliced_base(n_set_total, G: tl.constexpr, W: tl.constexpr, MAJORITY: tl.constexpr):
    """The constant part of the score from sum_g popc(q_g) over all words (``_group_rows``)."""
    if MAJORITY:
        return 32 * W + n_set_total * 0
    else:
        return G * 32 * W - 2 * n_set_total


@triton.jit
def _scan_program(len_ptr, Hkv, BLOCKS_PER_PROG, CHUNK: tl.constexpr):
    """A scan program's row and blocks, grid (B * Hkv, splits): (pid = b * Hkv + h as int64, b,
    h, seq_len, the row's block count, its first block, the end of its blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    n_blocks = (seq_len + CHUNK - 1) // CHUNK
    blk_lo = tl.program_id(1) * BLOCKS_PER_PROG
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_PROG, n_blocks)
    return pid, b, h, seq_len, n_blocks, blk_lo, blk_hi


@triton.jit
def _query_rows_kernel(
    q_ptr, rows_ptr, base_ptr,
    Hkv, sqb, sqh, sqw,
    G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr, R: tl.constexpr,
    MAJORITY: tl.constexpr, PDL: tl.constexpr = False, FORM: tl.constexpr = 1,
    R_PAD: tl.constexpr = 4,
):
    """Per (b, kv-head): ``_group_rows`` -> rows [B * Hkv, R, W] and base [B * Hkv] (the rows
    in their own launch: the path before ``ROWS_IN_SCAN``, kept for the benchmark)."""
    pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    rows, base = _group_rows(q_ptr + b * sqb + (h * G) * sqh, sqh, sqw, G, W, BLOCK_W, R, R_PAD,
                             FORM, MAJORITY)
    ridx = tl.arange(0, R_PAD)[:, None]
    wv = tl.arange(0, BLOCK_W)[None, :]
    tl.store(rows_ptr + (pid * R + ridx) * W + wv, rows, mask=(ridx < R) & (wv < W))
    tl.store(base_ptr + pid, base)


@triton.jit
def _block_keys_kernel(
    rows_ptr, base_ptr, k_ptr, len_ptr, key_ptr, scale_ptr, qs_ptr, lse_c,
    Hkv, NB_OUT, BLOCKS_PER_PROG,
    srb, srh, srr, srw,
    skb, skh, skt, skw,
    ssb, ssh, sst,
    G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
    FORM: tl.constexpr, R: tl.constexpr, HAS_BASE: tl.constexpr,
    CHUNK: tl.constexpr, CP: tl.constexpr, N_SUB: tl.constexpr, NBT: tl.constexpr,
    MEAN: tl.constexpr, K_CONTIG: tl.constexpr, USE_ASM: tl.constexpr, HAS_SCALE: tl.constexpr,
    cnt_ptr=None, kb_ptr=None, must_ptr=None, out_ptr=None, K=0, KB_CONST=0, sob=0, soh=0,
    FUSED: tl.constexpr = False, M: tl.constexpr = 0, SEL_BLOCK: tl.constexpr = 16,
    SINGLE: tl.constexpr = True, KB_TENSOR: tl.constexpr = False, ARITY: tl.constexpr = 2,
    hist_ptr=None, HIST: tl.constexpr = False, KMIN: tl.constexpr = 0, NBINS: tl.constexpr = 1,
    LSE: tl.constexpr = False, PDL: tl.constexpr = False, ROWS_IN: tl.constexpr = False,
    MAJORITY: tl.constexpr = False, R_PAD: tl.constexpr = 1, EARLY: tl.constexpr = False,
    KSTEP: tl.constexpr = 1, SLICED: tl.constexpr = False,
    q_ptr=None, sqb=0, sqr=0, sqd=0, q_inv_sqrt_d=1.0, QS_FROM_Q: tl.constexpr = False,
    QG: tl.constexpr = 1, QG_P: tl.constexpr = 1, QD: tl.constexpr = 1, QD_P: tl.constexpr = 1,
):
    """Block keys of blocks [pid1 * BLOCKS_PER_PROG, ...) of one (b, kv-head), NBT blocks per
    tile of [NBT, CP, W] codes. Score of a token = base + sum_r coef_r * popc(OP(row_r, k))
    (+ -2G popc(k) in the planes form); rows r at rows_ptr + b*srb + h*srh + r*srr, or with
    ROWS_IN computed here (``_group_rows``, FORM / MAJORITY) from the G query codes there (the
    query codes' strides: row g at + g*srr). HAS_SCALE:
    the token's value is float32(score) * float32(scale[b, h, t]) and the key is the block max of
    those, mapped to an int32 of the same order. LSE: the token's value is the logit estimate
    sin(float32(score) * lse_c) (* scale[b, h, t]) * qs[b, h] and the key is the block's
    log-sum-exp of those (online over the sub-blocks), mapped the same way. PDL: programmatic
    dependent launch (``kvcomp.ops._pdl``); with EARLY (only the query codes come from the
    previous launch, ``decode_step``) the lengths and the first key-code tile are loaded before
    the wait, so that they are in flight while the query is still being encoded. HIST: bin of a
    key = (key - KMIN) // KSTEP (the scores are even: KSTEP = 2 halves the bins). SLICED (with
    ROWS_IN): the rows by ``_sliced_rows`` instead of ``_group_rows``. QS_FROM_Q
    (with LSE): the query scale is computed here from the QG query rows [QD] of the kv-head at
    q_ptr + b*sqb + (h*QG + g)*sqr + d*sqd (mean of their fp32 norms, times q_inv_sqrt_d, as
    ``lse_query_scale``) instead of read from qs_ptr: no launches between the encode and the
    scan, and q (an older input) may be read before the wait."""
    if not EARLY:
        pdl_enter(PDL)
    pid, b, h, seq_len, n_blocks, blk_lo, blk_hi = _scan_program(len_ptr, Hkv, BLOCKS_PER_PROG, CHUNK)
    BITS: tl.constexpr = 32 * W

    wv = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    r_base = rows_ptr + b * srb + h * srh
    ridx = tl.arange(0, R_PAD)[:, None]
    if ROWS_IN and not EARLY:  # the derived rows in registers, row r picked out below
        if SLICED:
            p0, p1, p2, p3, p4, p5, p6, n_set = _sliced_rows(r_base, srr, srw, wv[None, None, :], G, W, R,
                                                             FORM, MAJORITY, USE_ASM)
            base = _sliced_base(tl.sum(tl.sum(tl.sum(n_set, 2), 1), 0), G, W, MAJORITY)
        else:
            rows2, base = _group_rows(r_base, srr, srw, G, W, BLOCK_W, R, R_PAD, FORM, MAJORITY)
    elif HAS_BASE:
        base = tl.load(base_ptr + pid)
    else:
        base = R * BITS  # direct form over R = G query codes, or majority
    bi = tl.arange(0, NBT)[:, None, None]  # [NBT, 1, 1] block within the tile
    ci = tl.arange(0, CP)[None, :, None]  # [1, CP, 1] token within the (sub-)block
    w3 = wv[None, None, :]  # [1, 1, BLOCK_W]
    k_base = k_ptr + b * skb + h * skh
    s_base = scale_ptr + b * ssb + h * ssh
    bi2 = tl.arange(0, NBT)[:, None]  # [NBT, 1]
    ci2 = tl.arange(0, CP)[None, :]  # [1, CP]
    if LSE:
        if QS_FROM_Q:
            qg = tl.arange(0, QG_P)[:, None]
            qd = tl.arange(0, QD_P)[None, :]
            qv = tl.load(q_ptr + b * sqb + (h * QG + qg) * sqr + qd * sqd,
                         mask=(qg < QG) & (qd < QD), other=0.0).to(tl.float32)  # [QG_P, QD_P]
            qs = tl.sum(tl.sqrt(tl.sum(qv * qv, 1)), 0) / QG * q_inv_sqrt_d
        else:
            qs = tl.load(qs_ptr + pid)
    for blk0 in range(blk_lo, blk_hi, NBT):
        blk = blk0 + bi
        if MEAN:
            run = tl.zeros([NBT], dtype=tl.int32)
        else:
            run = tl.full([NBT], -2147483648, dtype=tl.int32)
        frun = tl.full([NBT], float("-inf"), dtype=tl.float32)
        lsum = tl.zeros([NBT], dtype=tl.float32)  # LSE: sum of exp(x - frun)
        n_ok = tl.zeros([NBT], dtype=tl.int32)
        for s in tl.static_range(N_SUB):
            in_blk = s * CP + ci
            t = blk * CHUNK + in_blk  # [NBT, CP, 1]
            ok = (in_blk < CHUNK) & (t < seq_len) & (blk < blk_hi)
            if K_CONTIG:
                offs = t.to(tl.int64) * W + w3
            else:
                offs = t.to(tl.int64) * skt + w3 * skw
            kc = tl.load(k_base + offs, mask=ok & (w3 < W), other=0)  # [NBT, CP, BLOCK_W]
            if EARLY and s == 0:  # the query codes are the previous launch's: wait for them now
                pdl_enter(PDL)  # (again each tile: no-op after the first)
                if ROWS_IN:
                    if SLICED:
                        p0, p1, p2, p3, p4, p5, p6, n_set = _sliced_rows(r_base, srr, srw, w3, G, W, R,
                                                                         FORM, MAJORITY, USE_ASM)
                        base = _sliced_base(tl.sum(tl.sum(tl.sum(n_set, 2), 1), 0), G, W, MAJORITY)
                    else:
                        rows2, base = _group_rows(r_base, srr, srw, G, W, BLOCK_W, R, R_PAD, FORM, MAJORITY)
            acc = tl.zeros([NBT, CP, BLOCK_W], dtype=tl.int32)
            for r in tl.static_range(R):
                if ROWS_IN and SLICED:
                    row = _row_of(p0, p1, p2, p3, p4, p5, p6, r)  # [1, 1, BLOCK_W]
                elif ROWS_IN:
                    row = tl.sum(tl.where(ridx == r, rows2, 0), 0)[None, None, :]  # [1, 1, BLOCK_W]
                else:
                    row = tl.load(r_base + r * srr + w3 * srw, mask=w3 < W, other=0)
                if FORM == 0:
                    acc += _popc(row ^ kc, USE_ASM)
                elif FORM == 2 and r == R - 1:  # the sign plane of two's complement
                    acc -= _popc(row & kc, USE_ASM) << r
                else:
                    acc += _popc(row & kc, USE_ASM) << r
            if FORM == 0:
                score = base - 2 * tl.sum(acc, 2)  # [NBT, CP]
            elif FORM == 2:
                score = base - 4 * tl.sum(acc, 2)
            else:
                score = base + 4 * tl.sum(acc, 2) - (2 * G) * tl.sum(_popc(kc, USE_ASM), 2)
            ok2 = tl.sum(ok.to(tl.int32), 2) > 0  # [NBT, CP]
            if HAS_SCALE:
                t2 = (blk0 + bi2) * CHUNK + s * CP + ci2  # [NBT, CP]
                sc = tl.load(s_base + t2.to(tl.int64) * sst, mask=ok2, other=0.0).to(tl.float32)
            if LSE:  # the reference's order: sin(s * c), * scale, * qs; online log-sum-exp
                x = tl.sin(score.to(tl.float32) * lse_c)
                if HAS_SCALE:
                    x = x * sc
                x = tl.where(ok2, x * qs, float("-inf"))
                m_new = tl.maximum(frun, tl.max(x, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                lsum = lsum * tl.exp(frun - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
                frun = m_new
            elif HAS_SCALE:  # one fp32 multiply per token, as the reference; max in fp32
                val = score.to(tl.float32) * sc
                val = tl.where(val == 0.0, 0.0, val)  # -0.0 -> +0.0: equal scores, equal keys
                frun = tl.maximum(frun, tl.max(tl.where(ok2, val, float("-inf")), 1))
            elif MEAN:
                run += tl.sum(tl.where(ok2, score, 0), 1)
                n_ok += tl.sum(ok2.to(tl.int32), 1)
            else:
                run = tl.maximum(run, tl.max(tl.where(ok2, score, -2147483648), 1))
        if LSE:
            f = frun + tl.log(tl.maximum(lsum, 1e-30))  # a real block's lsum >= 1
            f = tl.where(f == 0.0, 0.0, f)  # -0.0 -> +0.0
            bits = f.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # same order as the floats
        elif HAS_SCALE:
            bits = frun.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # same order as the floats
        elif MEAN:
            mean = tl.math.div_rn(run.to(tl.float32), tl.maximum(n_ok, 1).to(tl.float32))
            bits = mean.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # same order as the floats
        else:
            key = run
        bo = blk0 + tl.arange(0, NBT)
        tl.store(key_ptr + pid * NB_OUT + bo, key, mask=bo < blk_hi)
        if HIST:  # count the other (not must-select) keys into the row's histogram: stage 2
            # finds T from it
            counted = bo < blk_hi
            for jm in tl.static_range(M):
                mj = tl.load(must_ptr + jm)
                counted = counted & (bo != tl.where(mj >= 0, mj, n_blocks + mj))
            tl.atomic_add(hist_ptr + pid * NBINS + (key - KMIN) // KSTEP, 1, mask=counted, sem="relaxed")
    if FUSED:
        # the row's last program to finish runs the selection: every program of the row counts
        # in once its keys are stored (barrier, then a gpu-scope acq_rel atomic), the last one
        # reads all keys through L2 and resets the counter for the next launch
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(1) - 1:
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
            if KB_TENSOR:
                kb = tl.load(kb_ptr + b).to(tl.int64)
            else:
                kb = KB_CONST + tl.zeros([], dtype=tl.int64)
            if HIST:  # the histogram stage 2 (every program's counts are in: acq_rel ticket)
                _select_row_hist(key_ptr + pid * NB_OUT, out_ptr + b * sob + h * soh, must_ptr,
                                 seq_len.to(tl.int64), kb, K, hist_ptr + pid * NBINS, NB_OUT, CHUNK, M,
                                 SEL_BLOCK, SINGLE, KMIN, NBINS, True, KSTEP, 0, K, True)
            else:
                _select_row(key_ptr + pid * NB_OUT, out_ptr + b * sob + h * soh, must_ptr,
                            seq_len.to(tl.int64), kb, K, CHUNK, M, SEL_BLOCK, SINGLE, ARITY, True)


def _form(G: int, mode: str) -> tuple[int, bool, int]:
    """(FORM, MAJORITY, R: rows per token) for a group of G query codes and a scoring mode:
    popcounts a code word costs R (direct, signed planes) or R + 1 (planes)."""
    if mode == "majority":
        return FORM_XOR, True, 1
    planes = G.bit_length()  # c_b in [0, G] needs this many bits, G / 2 - c_b too (signed)
    if mode == "exact_signed":
        if G % 2:
            raise ValueError(f"mode 'exact_signed' needs an even group size G, got G = {G}")
        return FORM_SIGNED, False, planes
    if mode == "exact_planes":
        return FORM_PLANES, False, planes
    if mode == "exact" and SIGNED_PLANES and G % 2 == 0 and planes < G:
        return FORM_SIGNED, False, planes
    if mode == "exact" and planes + 1 < G:
        return FORM_PLANES, False, planes
    return FORM_XOR, False, G


def block_keys_triton(
    q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor,
    chunk_size: int, chunk_repre: str, mode: str = "exact", out: torch.Tensor | None = None,
    select: dict | None = None, k_scale: torch.Tensor | None = None, hist: dict | None = None,
    q_scale: torch.Tensor | None = None, prefetch: bool = False, q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1: int32 [B, Hkv, NB] block keys (NB = ceil(Lmax / chunk)); entries of blocks at or
    past a sequence's ``ceil(seq_len / chunk)`` are not written. ``out``: a contiguous buffer of
    that shape to write into. ``select``: launch arguments of the fused selection (the last
    program of each row runs stage 2 itself; see ``hamming_topk_triton``). ``k_scale``
    [B, Hkv, Lmax] float (any strides): per-token weights of the scores ("max" or "lse"); with
    "max" the keys are then the order-preserving int32 images of the fp32 block maxima. ``hist``: launch
    arguments of the histogram threshold (``_hist_args`` without COMPACT; with ``must_ptr`` /
    ``M``, the must-select blocks are left out): the keys are also counted there.
    ``chunk_repre="lse"`` needs ``q_scale`` [B * Hkv] float32 (contiguous): the keys are the
    order-preserving int32 images of the fp32 block log-sum-exps of the logit estimates.
    ``prefetch``: only q_codes were written by the previous launch (``decode_step``): with PDL
    the scan loads lengths and key codes before it waits for them (EARLY). ``q`` [B, Hkv * QG, D]
    (any strides; "lse" instead of q_scale): the post-RoPE queries, QG rows per kv-head, from
    which every scan program computes its row's q_scale (``lse_query_scale``, to rounding)."""
    if k_scale is not None and chunk_repre == "mean":
        raise ValueError("k_scale needs chunk_repre 'max' or 'lse'")
    if q is not None and not QS_IN_SCAN:
        from kvcomp.ops.query_codes import lse_query_scale

        q_scale, q = lse_query_scale(q, k_codes.shape[1]), None
    if (chunk_repre == "lse") != (q_scale is not None or q is not None) or (q_scale is not None and q is not None):
        raise ValueError("chunk_repre='lse' needs one of q_scale and q (and they need 'lse')")
    B, Hq, W = q_codes.shape
    _, Hkv, Lmax, _ = k_codes.shape
    G = Hq // Hkv
    nb = max(1, triton.cdiv(Lmax, chunk_size))
    dev = q_codes.device
    keys = out if out is not None else torch.empty(B, Hkv, nb, dtype=torch.int32, device=dev)
    if B * Hkv == 0:
        return keys
    form, majority, R = _form(G, mode)
    block_w = triton.next_power_of_2(W)
    r_pad = triton.next_power_of_2(R)
    derived = form != FORM_XOR or majority
    rows_in = derived and ROWS_IN_SCAN
    if not derived or rows_in:
        # the query codes themselves: row r of kv-head h is query head h * G + r (the direct
        # form's rows; with rows_in the scan derives its rows from them)
        rows, base = q_codes, q_codes
        srb, srh, srr, srw = q_codes.stride(0), G * q_codes.stride(1), q_codes.stride(1), q_codes.stride(2)
    else:
        rows = torch.empty(B, Hkv, R, W, dtype=torch.int32, device=dev)
        base = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
        _query_rows_kernel[(B * Hkv,)](
            q_codes, rows, base, Hkv, *q_codes.stride(),
            G=G, W=W, BLOCK_W=block_w, R=R, MAJORITY=majority, FORM=form, R_PAD=r_pad, num_warps=1,
            **pdl_args(q_codes, "rows", rows=B * Hkv),
        )
        srb, srh, srr, srw = rows.stride()
    block_t = max(BLOCK_T * 4 // block_w, 32)  # tokens per tile, ~BLOCK_T * 16 bytes of codes
    cp = min(triton.next_power_of_2(chunk_size), block_t)
    nbt = block_t // cp
    n_sub = triton.cdiv(chunk_size, cp)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, B * Hkv), triton.cdiv(nb, nbt)))
    per_prog = triton.cdiv(triton.cdiv(nb, splits), nbt) * nbt
    splits = triton.cdiv(nb, per_prog)
    k_contig = k_codes.stride(3) == 1 and k_codes.stride(2) == W
    lse_range = (1 if majority else G) * 32 * W  # the score's range S (reference: lse_logits_ref)
    pdl = pdl_args(k_codes, "scan", rows=B * Hkv, max_rows=SCAN_PDL_MAX_ROWS)
    # with "lse", q_scale read from a tensor may be the previous launch's output: no EARLY then
    early = bool(pdl) and prefetch and (q_scale is None) and (not derived or rows_in)
    qa = {}
    if q is not None:
        if q.dim() != 3 or q.shape[0] != B or q.shape[1] % Hkv:
            raise ValueError(f"q must be [B, Hkv * QG, D] = [{B}, {Hkv} * QG, D], got {tuple(q.shape)}")
        qg, qd = q.shape[1] // Hkv, q.shape[2]
        qa = dict(q_ptr=q, sqb=q.stride(0), sqr=q.stride(1), sqd=q.stride(2), q_inv_sqrt_d=1.0 / qd**0.5,
                  QS_FROM_Q=True, QG=qg, QG_P=triton.next_power_of_2(qg), QD=qd,
                  QD_P=triton.next_power_of_2(qd))
    if _mma_scan_takes(q_codes, k_codes, chunk_size, chunk_repre, mode, k_scale, q, q_scale, select):
        from kvcomp.ops.hamming_topk import mma_scan, mma_wide  # (they import this module)

        if W != 4:
            return mma_wide.block_keys_wide(q_codes, k_codes, seq_lens, chunk_size, R, keys, hist)
        return mma_scan.block_keys_mma(q_codes, k_codes, seq_lens, chunk_size, R, keys, hist, pdl, early)
    _block_keys_kernel[(B * Hkv, splits)](
        rows, base, k_codes, seq_lens, keys, k_scale if k_scale is not None else keys,
        q_scale if q_scale is not None else keys, float(torch.pi / (2 * lse_range)),
        Hkv, nb, per_prog,
        srb, srh, srr, srw, *k_codes.stride(),
        *(k_scale.stride() if k_scale is not None else (0, 0, 0)),
        G=G, W=W, BLOCK_W=block_w, FORM=form, R=R, HAS_BASE=base is not q_codes,
        CHUNK=chunk_size, CP=cp, N_SUB=n_sub, NBT=nbt, MEAN=chunk_repre == "mean",
        K_CONTIG=k_contig, USE_ASM=not interpreting(), HAS_SCALE=k_scale is not None,
        LSE=chunk_repre == "lse", num_warps=SCAN_WARPS,
        **(select or {}), **(hist or {}), **pdl,
        ROWS_IN=rows_in, MAJORITY=majority, R_PAD=r_pad, EARLY=early, SLICED=SLICED_ROWS and G.bit_length() <= SLICED_MAX_BITS, **qa,
    )
    return keys


def _mma_scan_takes(q_codes, k_codes, chunk_size, chunk_repre, mode, k_scale, q, q_scale, select) -> bool:
    """Whether ``block_keys_triton`` runs a tensor-core scan for these arguments: ``mma_scan``
    (128-bit codes, the rows derived in the scan) or ``mma_wide`` (other even widths)."""
    from kvcomp.ops.hamming_topk import mma_scan, mma_wide  # (they import this module)

    Hkv = k_codes.shape[1]
    G = q_codes.shape[1] // max(Hkv, 1)
    form, majority, _ = _form(G, mode)
    if k_codes.shape[3] != 4:
        weighted = k_scale is not None or q is not None or q_scale is not None
        return mma_wide.wide_applies(k_codes, G, form, majority, chunk_size, chunk_repre, weighted, select,
                                     interpreting())
    return ROWS_IN_SCAN and mma_scan.mma_applies(k_codes, G, form, majority, chunk_size, chunk_repre, k_scale, q,
                                                 q_scale, select, interpreting())


_MUST_CACHE: dict = {}
# zeroed per (device, stream), left zeroed by the kernels that use them (StreamScratch)
_COUNTERS = StreamScratch(1024)
_HISTS = StreamScratch(1 << 16)


def _hist_args(G: int, W: int, mode: str, rows: int, device: torch.device, mma: bool = False) -> dict | None:
    """Launch arguments of the histogram threshold (module doc), or None where it does not
    apply: keys in [-S, S] with S = G * BITS (BITS for majority) need NBINS = next_pow2(2S + 1)
    bins per row. The zeroed buffer is kept per (device, stream) and grown as needed (the
    outgrown one is kept alive); each stage-2 program zeroes its row after reading it. ``mma``:
    the tensor-core scan takes the call (``HIST_MAX_ROWS_MMA`` rows)."""
    S = (1 if mode == "majority" else G) * 32 * W
    # every score, so every key, is even (a sum of BITS - 2 * Hamming): one bin per even value
    # in the prefix-sum stage 2 (KSTEP = 2), one per value in the previous one. For the exact
    # score of an even G, sum_g Ham(q_g, k) = sum_b c_b + sum_b k_b (G - 2 c_b) has the parity
    # of sum_b c_b whatever k is, so a row's scores (and keys) are all congruent mod 4: bins of
    # 4 (HIST_STEP4) still hold one distinct key each, and stage 2 compares bins, not keys
    kstep = 2 if HIST_COMPACT else 1
    if HIST_STEP4 and HIST_COMPACT and mode != "majority" and G % 2 == 0:
        kstep = 4
    nbins = triton.next_power_of_2(2 * S // kstep + 1)
    coarse = False
    while HIST_COARSE and HIST_COMPACT and nbins > HIST_MAX_BINS:  # bins of several values
        kstep, coarse = 2 * kstep, True
        nbins = triton.next_power_of_2(2 * S // kstep + 1)
    if not HIST_SELECT or nbins > HIST_MAX_BINS or rows == 0 or rows > (HIST_MAX_ROWS_MMA if mma else HIST_MAX_ROWS):
        return None
    t = _HISTS.get(rows * nbins, device)
    args = dict(hist_ptr=t, HIST=True, KMIN=-S, NBINS=nbins, COMPACT=HIST_COMPACT, KSTEP=kstep)
    if coarse:
        args["COARSE"] = True
    return args


def _row_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters of the fused selection, one per row (the last program of a row
    resets its counter)."""
    return _COUNTERS.get(n, device)


def _must_tensor(must_select: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The must-select entries as a device int32 tensor, made once per (entries, device) so that
    later calls (and CUDA-graph capture) copy nothing from the host."""
    key = (must_select, str(device))
    t = _MUST_CACHE.get(key)
    if t is None:
        t = torch.tensor(must_select or (0,), dtype=torch.int32, device=device)
        _MUST_CACHE[key] = t
    return t


def select_triton(
    keys: torch.Tensor, seq_lens: torch.Tensor, k_blocks: torch.Tensor | int, K: int,
    chunk_size: int, must_select: tuple[int, ...], out: torch.Tensor | None = None,
    hist: dict | None = None,
) -> torch.Tensor:
    """Stage 2: int32 [B, Hkv, K] selection from stage 1's keys (written into ``out`` if given;
    every entry is written). ``hist``: ``_hist_args``' launch arguments, the histogram the scan
    filled (read once, then zeroed; with COMPACT the scan left the must blocks out of it)."""
    B, Hkv, nb = keys.shape
    if out is None:
        out = torch.empty(B, Hkv, K, dtype=torch.int32, device=keys.device)
    if B * Hkv == 0:
        return out
    must = _must_tensor(tuple(must_select), keys.device)
    block = min(triton.next_power_of_2(max(nb, K)), SELECT_BLOCK_MAX)
    block = max(block, 16)
    if block >= 1 << 15:  # _select_row_hist packs two counts < block into an int32
        raise ValueError(f"SELECT_BLOCK_MAX must be < 32768, got {SELECT_BLOCK_MAX}")
    kb_tensor = isinstance(k_blocks, torch.Tensor)
    _select_kernel[(B * Hkv,)](
        keys, seq_lens, k_blocks if kb_tensor else seq_lens, must, out,
        Hkv, nb, K, 0 if kb_tensor else int(k_blocks), out.stride(0), out.stride(1),
        CHUNK=chunk_size, M=len(must_select), BLOCK=block, SINGLE=nb <= block, KB_TENSOR=kb_tensor,
        ARITY=SELECT_ARITY if block <= ARITY_BLOCK_MAX else 2,
        num_warps=SELECT_WARPS or (4 if block < 1024 else 8), **(hist or {}),
        **pdl_args(keys, "select", rows=B * Hkv, max_rows=SELECT_PDL_MAX_ROWS),
    )
    return out


@dataclass
class DeferredSelect:
    """Stage 2 of the histogram path not launched yet: ``hamming_topk_triton(defer=True)``
    returns it after the scan, and ``sparse_decode_attention_triton`` runs the selection in the
    prologue of its programs instead (each writes its own share of ``out``, the row's last
    program zeroes the histogram), one launch fewer in a decode step; or calls ``run()`` where
    it cannot. ``out`` [B, Hkv, K] int32 (contiguous) is the selection once either has run."""

    keys: torch.Tensor  # [B, Hkv, NB] int32 block keys (stage 1)
    seq_lens: torch.Tensor
    k_blocks: torch.Tensor | int
    K: int
    chunk_size: int
    must_select: tuple[int, ...]
    hist: dict  # _hist_args' launch arguments (COMPACT), the histogram the scan filled
    out: torch.Tensor

    def run(self) -> torch.Tensor:
        """Stage 2 as its own launch (``select_triton``) into ``out``."""
        return select_triton(self.keys, self.seq_lens, self.k_blocks, self.K, self.chunk_size,
                             self.must_select, out=self.out, hist=self.hist)

    def kernel_args(self) -> dict:
        """Launch arguments of the prologue selection (``_sparse_decode_split_kernel``'s SEL)."""
        nb = self.keys.shape[2]
        kb_tensor = isinstance(self.k_blocks, torch.Tensor)
        block = max(min(triton.next_power_of_2(max(nb, self.K)), ATTN_SELECT_BLOCK_MAX), 16)
        return dict(
            sel_key_ptr=self.keys, sel_hist_ptr=self.hist["hist_ptr"],
            sel_must_ptr=_must_tensor(self.must_select, self.keys.device),
            sel_kb_ptr=self.k_blocks if kb_tensor else self.seq_lens, SEL_NB=nb,
            SEL_KB=0 if kb_tensor else int(self.k_blocks), SEL=True, SEL_M=len(self.must_select),
            SEL_BLOCK=block, SEL_SINGLE=nb <= block, SEL_KB_TENSOR=kb_tensor,
            SEL_KMIN=self.hist["KMIN"], SEL_NBINS=self.hist["NBINS"], SEL_KSTEP=self.hist["KSTEP"],
        )


def hamming_topk_triton(
    q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor,
    k_blocks: torch.Tensor | int,
    K: int, chunk_size: int, must_select: tuple[int, ...], chunk_repre: str, mode: str = "exact",
    k_scale: torch.Tensor | None = None, q_scale: torch.Tensor | None = None, prefetch: bool = False,
    defer: bool = False, q: torch.Tensor | None = None,
) -> torch.Tensor | DeferredSelect:
    """See ``kvcomp.ops.hamming_topk``; ``mode`` picks the group score form (exact or majority),
    ``k_scale`` weights the token scores, ``q_scale`` [B, Hkv] (contiguous) is the query part of
    the "lse" logits, or ``q`` [B, Hkv * QG, D] the queries it is computed from inside the scan
    (``block_keys_triton``). With FUSED_SELECT, or FUSED_HIST_SELECT where the histogram threshold
    applies, the selection runs in the scan's launch (no second kernel). ``defer``: where the
    histogram path applies, return a ``DeferredSelect`` after the scan instead of launching
    stage 2 (``decode_step``: the attention runs it)."""
    hist = None
    if chunk_repre == "max" and k_scale is None and not FUSED_SELECT:
        B, Hkv, _, W = k_codes.shape
        mma = not FUSED_HIST_SELECT and _mma_scan_takes(q_codes, k_codes, chunk_size, chunk_repre, mode, k_scale, q,
                                                         q_scale, None)
        hist = _hist_args(q_codes.shape[1] // max(Hkv, 1), W, mode, B * Hkv, q_codes.device, mma)
    # coarse bins (``HIST_COARSE``): stage 2 in its own launch (the fused and the deferred selections
    # take one value a bin)
    coarse = hist is not None and hist.get("COARSE", False)
    fused_hist = FUSED_HIST_SELECT and hist is not None and hist["COMPACT"] and not coarse
    if not (FUSED_SELECT or fused_hist):
        scan_hist = hist
        if hist is not None and hist["COMPACT"]:  # the scan leaves the must blocks out
            scan_hist = dict(hist, must_ptr=_must_tensor(tuple(must_select), q_codes.device),
                             M=len(must_select))
        if scan_hist is not None:
            scan_hist = {k: v for k, v in scan_hist.items() if k not in ("COMPACT", "COARSE")}
        keys = block_keys_triton(q_codes, k_codes, seq_lens, chunk_size, chunk_repre, mode,
                                 k_scale=k_scale, hist=scan_hist, q_scale=q_scale, prefetch=prefetch, q=q)
        if defer and hist is not None and hist["COMPACT"] and not coarse:
            out = torch.empty(keys.shape[0], keys.shape[1], K, dtype=torch.int32, device=keys.device)
            return DeferredSelect(keys, seq_lens, k_blocks, K, chunk_size, tuple(must_select),
                                  {k: v for k, v in hist.items() if k != "COMPACT"}, out)
        return select_triton(keys, seq_lens, k_blocks, K, chunk_size, must_select, hist=hist)
    B, Hkv = k_codes.shape[0], k_codes.shape[1]
    nb = max(1, triton.cdiv(k_codes.shape[2], chunk_size))
    out = torch.empty(B, Hkv, K, dtype=torch.int32, device=q_codes.device)
    block = max(min(triton.next_power_of_2(max(nb, K)), SELECT_BLOCK_MAX), 16)
    kb_tensor = isinstance(k_blocks, torch.Tensor)
    select = dict(
        cnt_ptr=_row_counters(B * Hkv, q_codes.device), kb_ptr=k_blocks if kb_tensor else seq_lens,
        must_ptr=_must_tensor(tuple(must_select), q_codes.device), out_ptr=out, K=K,
        KB_CONST=0 if kb_tensor else int(k_blocks), sob=out.stride(0), soh=out.stride(1),
        FUSED=True, M=len(must_select), SEL_BLOCK=block, SINGLE=nb <= block,
        KB_TENSOR=kb_tensor, ARITY=SELECT_ARITY if block <= ARITY_BLOCK_MAX else 2,
    )
    if fused_hist:  # the scan counts the other keys, the last program reads the histogram
        select.update({k: v for k, v in hist.items() if k != "COMPACT"})
        if FUSED_HIST_MAXNREG and not interpreting():
            select["maxnreg"] = FUSED_HIST_MAXNREG
    block_keys_triton(q_codes, k_codes, seq_lens, chunk_size, chunk_repre, mode, select=select,
                      k_scale=k_scale, q_scale=q_scale, prefetch=prefetch, q=q)
    return out
