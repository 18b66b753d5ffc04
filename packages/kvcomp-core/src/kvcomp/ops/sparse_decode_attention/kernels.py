"""Triton kernels of ``sparse_decode_attention``: split-K flash-decoding over selected blocks.

The selected tokens of a (sequence, kv-head) form a virtual sequence: virtual token v is token
``v % CHUNK`` of the block ``block_idx[b, h, v // CHUNK]`` (skipped when that entry is -1 or the
token is at or past seq_len). ``_sparse_decode_split_kernel``, grid (B * Hkv, SPLITS), walks one
share of that virtual sequence in tiles of BLOCK_N tokens: it gathers each K/V tile once for all
G query heads of the kv-head (the G rows padded to 16 for tl.dot), keeps an online softmax in
fp32 (log2 domain) and writes its partial (m, l, acc) to [B, Hq, SPLITS(, D)] fp32 buffers.
``_merge_kernel``, grid (B * Hq,), combines the splits by log-sum-exp and writes the output in
q's dtype; a row without any attended token gets zeros.

Where a tile lies in one block (CHUNK a multiple of BLOCK_N), the tile's block entry is one
scalar loaded a loop step ahead (``BLK_SCALAR``); the same tiles in the same order as with the
per-token entries, so the same output bit for bit.

Fused merge (``FUSED_MERGE``, the default while a row's partials are at most
``FUSED_MERGE_MAX_BYTES``): no second launch. After storing its partials, each
split program takes a ticket from an int32 counter of its (sequence, kv-head) (a CTA barrier,
then one gpu-scope acq_rel ``atomic_add``); the program that draws the last ticket (SPLITS - 1)
has every other split's partials visible, merges the G query rows of its kv-head itself (same
log-sum-exp as ``_merge_kernel``, reading the partials through L2) and resets the counter to 0,
so the next launch, or the next replay of a captured CUDA graph, starts from zero. The counters
(``_tickets``) are allocated once per (device, stream) and kept; calls that run concurrently on
one stream's counters would race, calls on one stream are ordered.

Entries of block_idx are expected to be distinct (as hamming_topk returns them); a repeated
entry would be attended twice. Nothing here reads a length on the host: CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvcomp.ops._common import StreamScratch, interpreting
from kvcomp.ops._pdl import pdl_args, pdl_enter
from kvcomp.ops.hamming_topk.kernels import DeferredSelect
from kvcomp.ops.hamming_topk.select_kernels import _select_row_hist

# about two waves of programs on a 132-SM H200
TARGET_PROGRAMS = 264
# ... but this many from MANY_ROWS (sequence, kv-head) rows, for groups of at most MANY_MAX_G
# query heads: shorter splits that spread the work more evenly over the SMs (B = 8: 64 rows x 8
# splits of 4 tiles instead of 5 of 7, where 3 programs fit an SM). Session 17, H200, 128K
# (decode.md "Session 17"), the attention alone (tools/experiments/read_floor.py --gather), us
# at 264 / 512 programs, G = 4: B = 8 2048 tokens 26.1 / 24.6, 10% 125.5 / 117.5, 30% 328.7 /
# 290.6; B = 4 (32 rows) 16.3 / 15.5, 10% 69.2 / 62.8; fewer rows gained nothing (B = 2, 16
# rows: 10.4 / 10.5, 10% 33.9 / 37.5). ``decode_step`` at B = 8, 2048 tokens, same process
# (tools/experiments/attn_plan_ab.py): Qwen3-8B (G = 4) 65.6 / 64.4; Qwen3-32B (G = 8) 67.5 /
# 73.8, which kept G = 8 on 264 then. Session 18 found the cause: with the selection's stage 2
# in the prologue the kernel took more than 128 registers, 3 programs an SM, two waves of 512
# (MANY_MAXNREG). With that cap, Qwen3-32B at B = 8 (tools/experiments/attn_pipeline.py call
# 9, us, 264 / 512): step 2048 tokens 64.6-65.9 / 65.6-66.1, 10% 150.9-151.0 / 147.5-148.0, 30%
# 349.1-349.6 / 335.8-336.2; the attention alone 24.50 / 23.66-23.91. So G <= 8 take 512.
# The plan depends on shapes only, so that ``decode_step`` and the attention alone stay
# bit-identical.
TARGET_PROGRAMS_MANY = 512
MANY_ROWS = 32
MANY_MAX_G = 8
MIN_TILES_PER_SPLIT = 1
# tile of tokens per step for head_dim <= 128 (halved above), warps and pipeline stages
TILE_N = 64
# ... but this many where a split would hold several TILE_N tiles and the launch has at most
# LONG_TILE_MAX_ROWS (sequence, kv-head) rows (large selections at small batch: fewer, longer loop
# steps; head_dim <= 128); None: TILE_N always. Session 11, H200, 128K, decode step with 128- vs
# 64-token tiles: B = 1 (8 rows) 31.2 vs 36.8 us at 10% (103 blocks), 56.1 vs 67.1 at 30%
# (Qwen3-8B); but B = 8 (64 rows, 5 splits of ~40 tiles) 185.3 vs 155.2 and 456.2 vs 364.0
LONG_TILE_N = 128
LONG_TILE_MAX_ROWS = 16
WARPS = 4
STAGES = 2
# ... but one stage where a split is a single tile (nothing to pipeline): measured on the H200 at
# 128K, 2048 tokens, B = 1 (32 splits of one tile): 18.3 vs 18.9 us for the decode step; where
# splits hold several tiles (10% budgets) one stage for all was 4 us slower (decode.md, session 7)
ONE_TILE_STAGES = 1
# where a token tile lies in one selected block (chunk_size a multiple of the tile), load each
# tile's block entry one loop step ahead as a scalar (``BLK_SCALAR``) instead of per token in the
# step: the K / V addresses then wait on no load of their own step (before, each step began with
# a synchronous load of the tile's entries). Same tiles, same math: bit-identical outputs.
# Session 18, H200, 128K, the attention alone in one process, us, per-token / scalar
# (tools/experiments/attn_pipeline.py call 3; decode.md "Session 18"): Qwen3-8B B = 8 2048 tokens
# 23.16 / 22.50, B = 4 14.59 / 14.19, B = 1 10% 21.54 / 21.13; Qwen3-32B B = 8 25.32 / 24.34;
# `kvcomp bench decode`: B = 8 30% 293.2 / 292.9, Qwen3-32B 30% 328.3 / 311.0. With 3 stages
# the pipeliner then double-buffers K / V (two [BLOCK_N, D] buffers each, 72 KB, 150 registers:
# 3 programs an SM) and that was slower: 27.5 against 22.7 us at B = 8 (STAGES stays 2)
SCALAR_BLOCKS = True
# Timed on the H200 and removed (decode.md "Session 19" / "Session 20"; git history has the code):
# the next tile's K / V prefetched into registers during each step (B = 8 23.23 -> 51.77 us,
# spills at the register cap; B = 1 10% 21.14 -> 43.05), and a row's tiles dealt out evenly over
# more splits (B = 1 10%: 264 / 256 programs on every SM, 20.97 -> 22.28 / 21.33 us: the loop
# is bound by the aggregate bandwidth, not by the busiest SM's tiles). Timed and not adopted
# (session 22): half the work a program in one wave at B = 8, 1024 programs of 2 warps on
# 32-token tiles (WARPS = 2, TILE_N = 32, TARGET_PROGRAMS_MANY = 1024): G = 8 23.35 -> 26.1 us,
# G = 4 22.69 -> 23.4 (tools/experiments/attn_pipeline.py, decode.md "Session 22")
# a register cap for the split kernel (ptxas maxnreg; None: the compiler's choice), for tuning
MAXNREG = None
# ... and this cap where the plan aims at TARGET_PROGRAMS_MANY: 4 programs of 4 warps an SM
# (65536 registers), so that the 512 programs run in one wave. Session 18, H200, 128K, B = 8,
# Qwen3-8B: with SCALAR_BLOCKS and the selection in the prologue (decode_step) the compiler took
# more than 128 (3 programs an SM) and the step went 64.0 -> 67.7-68.9 us at 2048 tokens, 145.7
# -> 173.8 at 10%; capped at 128 (no spills): 63.3 / 145.2. The attention alone: 22.71 against
# 22.47-22.50 us uncapped (decode.md "Session 18")
MANY_MAXNREG = 128
# PDL for launches of at most this many (sequence, kv-head) rows (None: ``_pdl.DECODE_MAX_ROWS``)
PDL_MAX_ROWS = None
# tests set this to fill the split buffers with NaN first, so that an unwritten entry shows
POISON_SCRATCH = False
# profiling hook (CUDA only, off: None): an int64 tensor [>= programs, TIMELINE_COLS] on the device.
# Each split program of the next launches then records its row (pid * SPLITS + split) of it: the
# %globaltimer (ns) at its start, before its loop (after the prologue: the query, the selection
# with SEL), after its last tile's softmax update, after its ticket (fused merge) and at its end;
# its SM (%smid), its ticket (-1 unfused), its tiles, and the %globaltimer right after its PDL
# wait (column 8; with EARLY after the query's loads, else before them). The
# outputs are unchanged; tools/experiments/attn_timeline.py reads it (where the launch's time goes)
TIMELINE = None
TIMELINE_COLS = 16
# merge the splits inside the split kernel (last program of each row, module doc) instead of a
# second launch; False keeps the two-kernel path (benchmarks time both)
FUSED_MERGE = True
# ... while one row's partials (G * SPLITS * D fp32, what its merging program reads alone) are at
# most this many bytes; above, the merge kernel's B * Hq programs are faster. Measured on the H200
# at 128K, 2048 tokens, D = 128 (docs/benchmarks/decode.md): G = 4 x 32 splits (64 KB) fused 7.0
# vs 7.9 us, G = 8 x 32 splits (128 KB) fused 9.0 vs 8.0 us (session 11, no L2 reuse: decode step
# 21.5 vs 19.9 us); B = 8 (5 splits) fused 1.4 us faster. Partials in q's 16-bit dtype (half the
# bytes, as FlashInfer's merge states) were tried in session 11 and made the fused path slower
# (Qwen3-8B, B = 1: step 22.1 vs 19.0 us; B = 8: attention 26.7 vs 24.3 us): fp32 stays
FUSED_MERGE_MAX_BYTES = 64 << 10
# where a row's partials would exceed that, plan fewer, longer splits so that they do not (the
# fused merge instead of a second launch): for Qwen3-32B at B = 1 (G = 8: 16 splits of 128
# tokens instead of 32 of 64 at 2048 tokens). Timed in session 11: decode step 20.6 vs 19.9 us,
# off (the bench's attn_fit variant)
FUSED_MERGE_FIT = False
# where a row's partials exceed FUSED_MERGE_MAX_BYTES, merge in two levels inside the split
# kernel instead of a second launch: the last program of each group of this many splits merges
# the group's partials into one (m, l, acc) per row, the last group's merger merges the groups
# (``_sparse_decode_split_kernel``'s TWO_LEVEL). None: one level (a merge launch above the
# limit). Built in session 11 for G = 8 at B = 1 (128 KB of partials a row: 32 KB and 16 KB on
# the serial path instead); GPU-tested and timed in session 12: Qwen3-32B's step 20.9 against
# 20.0 us (decode.md): off (bench: merge2)
MERGE_GROUP_SPLITS = None
# elements of acc ([G rows, splits, D] fp32) the fused merge loads per step: 4096 = 32 registers
# a thread at 4 warps. (Session 11 tried a merge one split at a time, [G, D] elementwise steps:
# 6-10x fewer CTA barriers in the PTX, but slower on the H200: 24.6 vs 17.9 us for the Qwen3-8B
# step at 128K, B = 1; decode.md)
MERGE_TILE_ELEMS = 4096
# warps of a merge-launch program (one (sequence, q-head) row, its [S_PAD, BLOCK_D] fp32 partials
# loaded at once) for tiles of up to 8192 elements: one measured 17.8 against 19.4 us (2 warps),
# 19.7 (4) and 21.2 (8) for Qwen3-32B's step at 128K, B = 1, 2048 tokens ([32, 128]), and 32.7 /
# 57.1 against 35.7 / 59.9 us (4 warps) at 10% / 30% ([64, 128]; decode.md, session 13). Larger
# tiles (more splits: fewer rows) get a warp per 8192 elements, up to 8 (not measured)
MERGE_WARPS = 1
# run a deferred histogram selection (``decode_step``, few rows) in the split programs' prologue
# instead of its own launch; False: ``DeferredSelect.run()`` first (the benchmark's before)
SELECT_IN_PROLOGUE = True
# ... also where the merge is its own launch (partials above the fused merge's limit, e.g. G = 8
# at B = 1): the merge kernel then zeroes the histogram (it runs after every reader). Built in
# session 11; GPU-tested and timed in session 12: Qwen3-32B's step 20.2 against 20.0 us: off
# (the bench's sel_unfused)
SELECT_IN_PROLOGUE_UNFUSED = False
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" of the running max, so that exp2(m - m_new) is safe


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
    Hkv, K_ENT, TOK_PER_SPLIT, SPLITS, scale_log2,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sik,
    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    tbl_ptr=None, stb=0, stp=0, PAGED: tl.constexpr = False, PAGE: tl.constexpr = 1,
    out_ptr=None, sob=0, soh=0, sod=0, ticket_ptr=None, FUSED: tl.constexpr = False,
    G_R: tl.constexpr = 1, S_PAD: tl.constexpr = 1, S_TILE: tl.constexpr = 1,
    m1_ptr=None, l1_ptr=None, acc1_ptr=None, gticket_ptr=None, GROUP=1, NG=1,
    TWO_LEVEL: tl.constexpr = False, L1_PAD: tl.constexpr = 1, L1_TILE: tl.constexpr = 1,
    T_Q: tl.constexpr = 1, PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
    sel_key_ptr=None, sel_hist_ptr=None, sel_must_ptr=None, sel_kb_ptr=None, SEL_NB=0, SEL_KB=0,
    SEL: tl.constexpr = False, SEL_M: tl.constexpr = 0, SEL_BLOCK: tl.constexpr = 16,
    SEL_SINGLE: tl.constexpr = True, SEL_KB_TENSOR: tl.constexpr = False,
    SEL_KMIN: tl.constexpr = 0, SEL_NBINS: tl.constexpr = 1, SEL_KSTEP: tl.constexpr = 1,
    SEL_PAD: tl.constexpr = 0, BLK_SCALAR: tl.constexpr = False,
    tline_ptr=None, TLINE: tl.constexpr = False, TLINE_COLS: tl.constexpr = 16,
):
    """With T_Q > 1 the G rows of a kv-head are G / T_Q query heads x T_Q queries (row r is query
    r % T_Q), query t being the sequence's token seq_len - T_Q + t: it attends to tokens below
    seq_len - T_Q + t + 1 only (causal among the new tokens). With PAGED, k/v are page pools
    [pages, Hkv, PAGE, D] (strides skb.. = page, head, row, dim) and token t of sequence b lives
    in page tbl[b, t // PAGE] at row t % PAGE. With FUSED, the last of the row's SPLITS programs
    merges the partials into out [B, Hq, D] (strides sob, soh, sod) and resets
    ticket[b * Hkv + h] (module doc). PDL: programmatic dependent launch (``kvcomp.ops._pdl``);
    with EARLY (only block_idx comes from the previous launch, ``decode_step``) the length and
    the queries are loaded before the wait. SEL (with FUSED, T_Q = 1): block_idx is not written
    yet; every program first runs ``hamming_topk``'s histogram stage 2 for its row from the
    scan's block keys and histogram and writes its own share of block_idx (the entries of its
    tokens), and the row's merging program zeroes the histogram
    (``hamming_topk.kernels.DeferredSelect``). The split plan is the same as without SEL, so is
    the output, bit for bit. TLINE: record the program's timeline (``TIMELINE``)."""
    if TLINE:
        t_start = _globaltimer(tl.program_id(1))
    if not EARLY:
        pdl_enter(PDL)
        if TLINE:
            t_wait = _globaltimer(tl.program_id(1))
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    seq_len = tl.load(len_ptr + b).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    q = tl.load(
        q_ptr + b * sqb + (h * G + g[:, None]) * sqh + d[None, :] * sqd,
        mask=g_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [G_PAD, BLOCK_D]
    if PAGED:
        k_base = k_ptr + h * skh
        v_base = v_ptr + h * svh
    else:
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
    i_base = idx_ptr + b * sib + h * sih

    # this split's virtual tokens (TOK_PER_SPLIT each, the last split cut at the end)
    v_lo = split * TOK_PER_SPLIT
    v_hi = tl.minimum(v_lo + TOK_PER_SPLIT, K_ENT * CHUNK)
    if EARLY:  # the selection is the previous launch's: wait for it now
        pdl_enter(PDL)
        if TLINE:
            t_wait = _globaltimer(split)
    if SEL:  # this program's share of block_idx from the scan's keys and histogram
        if SEL_KB_TENSOR:
            kb = tl.load(sel_kb_ptr + b).to(tl.int64)
        else:
            kb = SEL_KB + tl.zeros([], dtype=tl.int64)  # SEL_KB may be specialised to 1
        # the entries of this split's virtual tokens; a block cut by a split boundary (CHUNK not
        # dividing a split) is written by both of its splits, with the same value
        _select_row_hist(sel_key_ptr + pid * SEL_NB, i_base, sel_must_ptr, seq_len, kb, K_ENT,
                         sel_hist_ptr + pid * SEL_NBINS, SEL_NB, CHUNK, SEL_M, SEL_BLOCK, SEL_SINGLE,
                         SEL_KMIN, SEL_NBINS, False, SEL_KSTEP,
                         v_lo // CHUNK, (v_hi + CHUNK - 1) // CHUNK, False, False, SEL_PAD)
        tl.debug_barrier()  # the share's stores before any thread reads them below
    if TLINE:
        t_pro = _globaltimer(split)
    m_i = tl.full([G_PAD], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    if BLK_SCALAR:  # the first tile's block entry (a tile lies in one block: CHUNK % BLOCK_N == 0)
        nblk = tl.load(i_base + (tl.minimum(v_lo, v_hi - 1) // CHUNK) * sik)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        if BLK_SCALAR:
            # this tile's entry was loaded one step ahead: its K / V addresses do not wait on a
            # load of this step, so the compiler's pipeliner can issue them a step ahead too
            t, ok = _tile_tokens(nblk, v0, v_hi, seq_len, BLOCK_N, CHUNK)
            # the next tile's entry (clamped to the split's last: a valid address, unused)
            nblk = tl.load(i_base + (tl.minimum(v0 + BLOCK_N, v_hi - 1) // CHUNK) * sik)
        else:
            vt = v0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] virtual tokens
            in_range = vt < v_hi
            blk = tl.load(i_base + (vt // CHUNK) * sik, mask=in_range, other=-1).to(tl.int64)
            t = blk * CHUNK + vt % CHUNK  # [BLOCK_N] real token positions
            ok = in_range & (blk >= 0) & (t < seq_len)
        kt, vt_ = _load_tile(k_base, v_base, t, ok, d, d_ok, skt, skd, svt, svd, skb, svb,
                             tbl_ptr, b, stb, stp, PAGED, PAGE)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        elif DOT_F32:  # the interpreter's bf16 tl.dot is wrong (triton 3.9): same math in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))  # [G_PAD, BLOCK_N] fp32
        if T_Q > 1:  # query row g sees tokens < seq_len - T_Q + 1 + g % T_Q
            lim = seq_len - T_Q + 1 + (g % T_Q)
            s = tl.where(ok[None, :] & (t[None, :] < lim[:, None]), s * scale_log2, float("-inf"))
        else:
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, vt_, input_precision="ieee")
        elif DOT_F32:
            pv = tl.dot(p.to(vt_.dtype).to(tl.float32), vt_.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt_.dtype), vt_)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if TLINE:  # after the last update (the timer read waits for l_i)
        t_loop = _globaltimer(tl.max(l_i, 0).to(tl.int32))
    row = (b * Hkv * G + h * G + g) * SPLITS + split  # [G_PAD] index into [B, Hq, SPLITS]
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    merged = 0.0  # (the timeline's dependency on the last program's merge)
    if FUSED:
        # every thread's partial stores come before the ticket (barrier), and the acq_rel atomic
        # publishes them gpu-wide; the last ticket sees every split's partials
        tl.debug_barrier()
        row0 = b * Hkv * G + h * G
        out_base = out_ptr + b * sob + (h * G) * soh
        if TWO_LEVEL:  # the last program of this split's group merges the group's partials
            grp = split // GROUP
            g_lo = grp * GROUP
            g_n = tl.minimum(GROUP, SPLITS - g_lo)
            gt = tl.atomic_add(gticket_ptr + pid * NG + grp, 1, sem="acq_rel", scope="gpu")
            if TLINE:
                t_ticket = _globaltimer(gt)
            if gt == g_n - 1:
                tl.atomic_xchg(gticket_ptr + pid * NG + grp, 0, sem="relaxed", scope="gpu")
                gr = tl.arange(0, G_R)
                m1, l1, o1 = _merge_range(m_ptr, l_ptr, acc_ptr, row0 + gr, gr < G, SPLITS, g_lo, g_n,
                                          D, G_R, L1_PAD, L1_TILE, BLOCK_D)
                r1 = (row0 + gr) * NG + grp  # [G_R] into [B, Hq, NG]
                tl.store(m1_ptr + r1, m1, mask=gr < G)
                tl.store(l1_ptr + r1, l1, mask=gr < G)
                tl.store(acc1_ptr + r1[:, None] * D + d[None, :], o1, mask=(gr < G)[:, None] & d_ok[None, :])
                tl.debug_barrier()
                ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if ticket == NG - 1:  # every group is merged (so every program has read the histogram)
                    merged = _last_merge(ticket_ptr, pid, sel_hist_ptr, m1_ptr, l1_ptr, acc1_ptr,
                                out_base, row0, NG, soh, sod, G, D, G_R, S_PAD, S_TILE, BLOCK_D, SEL, SEL_NBINS)
        else:
            ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if TLINE:
                t_ticket = _globaltimer(ticket)
            if ticket == SPLITS - 1:  # every program of the row is done (and has read the histogram)
                merged = _last_merge(ticket_ptr, pid, sel_hist_ptr, m_ptr, l_ptr, acc_ptr,
                            out_base, row0, SPLITS, soh, sod, G, D, G_R, S_PAD, S_TILE, BLOCK_D, SEL, SEL_NBINS)
    if TLINE:
        if FUSED:  # (t_ticket: read right after the atomic)
            if TWO_LEVEL:
                tk = gt
            else:
                tk = ticket
        else:
            t_ticket = t_loop
            tk = -1
        t_end = _globaltimer(tk + (merged != 0.0).to(tl.int32))
        tb = tline_ptr + (pid * SPLITS + split) * TLINE_COLS
        tl.store(tb, t_start)
        tl.store(tb + 1, t_pro)
        tl.store(tb + 2, t_loop)
        tl.store(tb + 3, t_ticket)
        tl.store(tb + 4, t_end)
        tl.store(tb + 5, _smid(tk).to(tl.int64))
        tl.store(tb + 6, tk.to(tl.int64))
        tl.store(tb + 7, ((v_hi - v_lo + BLOCK_N - 1) // BLOCK_N).to(tl.int64))
        tl.store(tb + 8, t_wait)


@triton.jit
def _globaltimer(dep):
    """The GPU's global nanosecond timer, read after ``dep`` (an int32 scalar) is computed."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _smid(dep):
    """The SM this program runs on."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _tile_tokens(entry, v0, v_hi, seq_len, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """(t, ok) of the tile of virtual tokens v0 .. v0 + BLOCK_N - 1 that lies in the selected
    block ``entry`` (a scalar, -1: none): real token positions [BLOCK_N] int64 and whether each
    is attended (below v_hi, a selected block, below seq_len)."""
    vt = v0 + tl.arange(0, BLOCK_N)
    blk = entry.to(tl.int64) + tl.zeros([BLOCK_N], dtype=tl.int64)  # a splat of the scalar
    t = blk * CHUNK + vt % CHUNK
    return t, (vt < v_hi) & (blk >= 0) & (t < seq_len)


@triton.jit
def _load_tile(k_base, v_base, t, ok, d, d_ok, skt, skd, svt, svd, skb, svb,
               tbl_ptr, b, stb, stp, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The K and V rows of tokens t ([BLOCK_N], zeros where not ok) -> two [BLOCK_N, BLOCK_D]
    tiles; with PAGED, token t of sequence b is row t % PAGE of page tbl[b, t // PAGE]."""
    if PAGED:
        page = tl.load(tbl_ptr + b * stb + (t // PAGE) * stp, mask=ok, other=0).to(tl.int64)
        k_rows = page * skb + (t % PAGE) * skt  # [BLOCK_N]
        v_rows = page * svb + (t % PAGE) * svt
    else:
        k_rows = t * skt
        v_rows = t * svt
    mask = ok[:, None] & d_ok[None, :]
    kt = tl.load(k_base + k_rows[:, None] + d[None, :] * skd, mask=mask, other=0.0)
    # V is gathered right after K (same rows): both loads are in flight before the dots
    vt = tl.load(v_base + v_rows[:, None] + d[None, :] * svd, mask=mask, other=0.0)
    return kt, vt


@triton.jit
def _last_merge(
    ticket_ptr, pid, hist_ptr, m_ptr, l_ptr, acc_ptr, out_base, row0, N, soh, sod,
    G: tl.constexpr, D: tl.constexpr, G_R: tl.constexpr, S_PAD: tl.constexpr, S_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, SEL: tl.constexpr, SEL_NBINS: tl.constexpr,
):
    """What the last program of row pid does: reset its ticket for the next launch, zero the
    row's selection histogram (SEL), merge the N partial states into the output. Returns the
    sum of the rows' denominators (the timeline hook's dependency: known after the merge)."""
    tl.atomic_xchg(ticket_ptr + pid, 0, sem="relaxed", scope="gpu")
    if SEL:
        tl.store(hist_ptr + pid * SEL_NBINS + tl.arange(0, SEL_NBINS), tl.zeros([SEL_NBINS], dtype=tl.int32))
    return _merge_group(m_ptr, l_ptr, acc_ptr, out_base, row0, N, soh, sod, G, D, G_R, S_PAD, S_TILE, BLOCK_D)


@triton.jit
def _merge_group(
    m_ptr, l_ptr, acc_ptr, out_base, row0, SPLITS, soh, sod,
    G: tl.constexpr, D: tl.constexpr, G_R: tl.constexpr, S_PAD: tl.constexpr,
    S_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Log-sum-exp merge of the G query rows row0 .. row0 + G - 1 (partials m, l [rows, SPLITS],
    acc [rows, SPLITS, D] fp32, log2 domain; stored by other programs of this launch, so read
    through L2 only) into out_base + g * soh + d * sod (zeros for a row without any attended
    token)."""
    g = tl.arange(0, G_R)
    g_ok = g < G
    d = tl.arange(0, BLOCK_D)
    _, denom, o = _merge_range(m_ptr, l_ptr, acc_ptr, row0 + g, g_ok, SPLITS, 0, SPLITS,
                               D, G_R, S_PAD, S_TILE, BLOCK_D)
    o = tl.where(denom[:, None] > 0, o / tl.where(denom > 0, denom, 1.0)[:, None], 0.0)
    tl.store(out_base + g[:, None] * soh + d[None, :] * sod, o.to(out_base.dtype.element_ty),
             mask=g_ok[:, None] & (d < D)[None, :])
    return tl.sum(denom, 0)


@triton.jit
def _merge_range(
    m_ptr, l_ptr, acc_ptr, rows, g_ok, STRIDE, s_lo, s_n,
    D: tl.constexpr, G_R: tl.constexpr, S_PAD: tl.constexpr, S_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The merged state (m, l [G_R], acc [G_R, BLOCK_D], unnormalised, log2 domain) of splits
    s_lo .. s_lo + s_n - 1 (s_n <= S_PAD) of the rows (partials m, l [rows, STRIDE], acc [rows,
    STRIDE, D]). All rows at once, S_TILE splits per step; with few steps they are unrolled, so
    every load is in flight together (about two L2 round trips)."""
    s = tl.arange(0, S_PAD)
    m = tl.load(m_ptr + rows[:, None] * STRIDE + s_lo + s[None, :], mask=g_ok[:, None] & (s < s_n)[None, :],
                other=NEG_BIG, cache_modifier=".cg")  # [G_R, S_PAD]
    m_all = tl.max(m, 1)  # [G_R]
    denom = tl.zeros([G_R], dtype=tl.float32)
    o = tl.zeros([G_R, BLOCK_D], dtype=tl.float32)
    N_TILES: tl.constexpr = S_PAD // S_TILE
    if N_TILES <= 8:
        for t in tl.static_range(N_TILES):
            denom, o = _merge_tile(m_ptr, l_ptr, acc_ptr, rows, g_ok, m_all, t * S_TILE, STRIDE, s_lo, s_n,
                                   denom, o, D, G_R, S_TILE, BLOCK_D)
    else:
        for s0 in tl.range(0, s_n, S_TILE):
            denom, o = _merge_tile(m_ptr, l_ptr, acc_ptr, rows, g_ok, m_all, s0, STRIDE, s_lo, s_n,
                                   denom, o, D, G_R, S_TILE, BLOCK_D)
    return m_all, denom, o


@triton.jit
def _merge_tile(
    m_ptr, l_ptr, acc_ptr, rows, g_ok, m_all, s0, STRIDE, s_lo, s_n, denom, o,
    D: tl.constexpr, G_R: tl.constexpr, S_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Splits s_lo + [s0, s0 + S_TILE) (below s_lo + s_n) of _merge_range's rows added into
    (denom [G_R], o [G_R, BLOCK_D])."""
    st = s0 + tl.arange(0, S_TILE)
    d = tl.arange(0, BLOCK_D)
    ok2 = g_ok[:, None] & (st < s_n)[None, :]  # [G_R, S_TILE]
    off = rows[:, None] * STRIDE + s_lo + st[None, :]
    mt = tl.load(m_ptr + off, mask=ok2, other=NEG_BIG, cache_modifier=".cg")
    lt = tl.load(l_ptr + off, mask=ok2, other=0.0, cache_modifier=".cg")
    at = tl.load(acc_ptr + off[:, :, None] * D + d[None, None, :],
                 mask=ok2[:, :, None] & (d < D)[None, None, :], other=0.0,
                 cache_modifier=".cg")  # [G_R, S_TILE, BLOCK_D]
    w = tl.exp2(mt - m_all[:, None])  # [G_R, S_TILE]
    denom = denom + tl.sum(lt * w, 1)
    o = o + tl.sum(at * w[:, :, None], 1)
    return denom, o


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    Hq, SPLITS, sob, soh, sod,
    D: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
    hist_ptr=None, G_H=1, NBINS: tl.constexpr = 1, HIST: tl.constexpr = False,
):
    """With HIST (the split kernel ran a deferred selection in its prologue), the first query
    head of each kv-head's group (hq % G_H == 0) also zeroes that (sequence, kv-head) row's
    selection histogram [NBINS] int32 for the next scan: every split program read it before
    this launch began."""
    pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hq
    hq = pid % Hq
    if HIST:
        if hq % G_H == 0:
            row = b * (Hq // G_H) + hq // G_H
            tl.store(hist_ptr + row * NBINS + tl.arange(0, NBINS), tl.zeros([NBINS], dtype=tl.int32))
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < SPLITS
    d_ok = d < D
    m = tl.load(m_ptr + pid * SPLITS + s, mask=s_ok, other=NEG_BIG)  # [S_PAD]
    l = tl.load(l_ptr + pid * SPLITS + s, mask=s_ok, other=0.0)
    acc = tl.load(
        acc_ptr + (pid * SPLITS + s[:, None]) * D + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [S_PAD, BLOCK_D]
    m_all = tl.max(m, 0)
    w = tl.exp2(m - m_all)
    denom = tl.sum(l * w, 0)
    o = tl.sum(acc * w[:, None], 0)  # [BLOCK_D]
    o = tl.where(denom > 0, o / tl.where(denom > 0, denom, 1.0), 0.0)
    tl.store(out_ptr + b * sob + hq * soh + d * sod, o.to(out_ptr.dtype.element_ty), mask=d_ok)


# ticket counters of the fused merge, one per (sequence, kv-head) row; the merging program resets
# its row's counter (kvcomp.ops._common.StreamScratch)
_TICKETS = StreamScratch(1024)


def _tickets(rows: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ticket counters of the fused merge for ``rows`` (sequence, kv-head) rows."""
    return _TICKETS.get(rows, device)


# group ticket counters of the two-level merge, one per (sequence, kv-head, group of splits)
_GROUP_TICKETS = StreamScratch(1024)


def _group_tickets(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ticket counters of the two-level merge's groups (MERGE_GROUP_SPLITS)."""
    return _GROUP_TICKETS.get(n, device)


def _partials(B: int, Hq: int, n: int, D: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Partial states of n splits (or groups) per query row: m, l [B, Hq, n] and acc [B, Hq, n, D]
    fp32 (NaN-filled under POISON_SCRATCH, so that an unwritten entry shows)."""
    m = torch.empty(B, Hq, n, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, n, D, dtype=torch.float32, device=device)
    if POISON_SCRATCH:
        for t in (m, l, acc):
            t.fill_(float("nan"))
    return m, l, acc


def _two_level_group(G: int, D: int, splits: int) -> int | None:
    """Splits per first-level group where the two-level fused merge applies (MERGE_GROUP_SPLITS
    set, and a group's and the groups' partials each within FUSED_MERGE_MAX_BYTES), else None."""
    if not MERGE_GROUP_SPLITS or splits <= MERGE_GROUP_SPLITS:
        return None
    group = int(MERGE_GROUP_SPLITS)
    row = G * D * 4  # one split's partials of a row
    if group * row > FUSED_MERGE_MAX_BYTES or triton.cdiv(splits, group) * row > FUSED_MERGE_MAX_BYTES:
        return None
    return group


def _timeline_args(programs: int, device: torch.device) -> dict:
    """The split kernel's TLINE arguments where ``TIMELINE`` is set (checked), else {}."""
    tline = TIMELINE
    if tline is None:
        return {}
    if interpreting() or device.type != "cuda":
        raise ValueError("sparse_decode_attention kernels.TIMELINE: the timer reads need a CUDA GPU "
                         "(not the Triton interpreter); set TIMELINE = None")
    if (not isinstance(tline, torch.Tensor) or tline.dtype != torch.int64 or tline.device != device
            or not tline.is_contiguous() or tline.numel() < programs * TIMELINE_COLS):
        raise ValueError(f"sparse_decode_attention kernels.TIMELINE must be a contiguous int64 tensor "
                         f"on {device} of at least {programs} x {TIMELINE_COLS} elements (this launch's "
                         f"programs), got "
                         f"{getattr(tline, 'dtype', type(tline))} {tuple(getattr(tline, 'shape', ()))} "
                         f"on {getattr(tline, 'device', '?')}")
    return dict(tline_ptr=tline, TLINE=True, TLINE_COLS=TIMELINE_COLS)


def _many(B: int, Hkv: int, G: int) -> bool:
    """Whether the plan aims at TARGET_PROGRAMS_MANY (MANY_ROWS rows or more, groups of at most
    MANY_MAX_G query heads)."""
    return G <= MANY_MAX_G and B * Hkv >= MANY_ROWS


def _maxnreg(B: int, Hkv: int, G: int) -> int | None:
    """The split kernel's register cap: MAXNREG, else MANY_MAXNREG for the many-program plan."""
    if interpreting():
        return None
    return MAXNREG or (MANY_MAXNREG if _many(B, Hkv, G) else None)


def _plan(B: int, Hkv: int, K: int, chunk: int, D: int, max_splits: int | None = None,
          G: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, tokens per split, splits) from shapes only (no device reads); at most
    ``max_splits`` splits when given; G query heads a kv-head (TARGET_PROGRAMS_MANY from
    MANY_ROWS rows where G <= MANY_MAX_G)."""
    block_n = TILE_N if D <= 128 else TILE_N // 2
    virtual = K * chunk
    while True:
        tiles = triton.cdiv(virtual, block_n)
        target = TARGET_PROGRAMS_MANY if _many(B, Hkv, G) else TARGET_PROGRAMS
        splits = max(1, min(triton.cdiv(target, max(B * Hkv, 1)), triton.cdiv(tiles, MIN_TILES_PER_SPLIT)))
        if max_splits is not None:
            splits = max(1, min(splits, max_splits))
        if (LONG_TILE_N and D <= 128 and block_n < LONG_TILE_N and B * Hkv <= LONG_TILE_MAX_ROWS
                and triton.cdiv(tiles, splits) > 1):
            block_n = LONG_TILE_N  # several tiles a split: plan again with the long tiles
            continue
        break
    per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(virtual, per_split)
    return block_n, per_split, splits


def sparse_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_idx: torch.Tensor,
    seq_lens: torch.Tensor, chunk_size: int, scale: float, out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None, _t_q: int = 1, prefetch: bool = False,
    select: DeferredSelect | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, Lmax, D], block_idx [B, Hkv, K] int32, seq_lens [B] -> [B, Hq, D]
    (written into ``out`` [B, Hq, D] of q's dtype, any strides, when given). With ``block_table``
    [B, max_pages] int32, k/v are page pools [num_pages, Hkv, page_size, D]. q [B, Hq, T, D]:
    T queries per sequence (the last T tokens, causal among themselves) -> [B, Hq, T, D].
    ``select``: block_idx (= ``select.out``) is still to be selected from the scan's keys: the
    programs do it in their prologue where the fused merge applies (one launch fewer), else
    ``select.run()`` first."""
    if select is not None and (q.dim() == 4 or block_table is not None or not SELECT_IN_PROLOGUE
                               or select.out is not block_idx or not block_idx.is_contiguous()
                               or q.numel() == 0 or block_idx.shape[2] == 0):
        select.run()
        select = None
    if q.dim() == 4:
        B, Hq, T, D = q.shape
        if out is not None and not out.is_contiguous():  # the rows are (head, query) pairs of a view
            return out.copy_(sparse_decode_attention_triton(q, k_cache, v_cache, block_idx, seq_lens,
                                                            chunk_size, scale, block_table=block_table,
                                                            prefetch=prefetch))
        o3 = sparse_decode_attention_triton(
            q.reshape(B, Hq * T, D), k_cache, v_cache, block_idx, seq_lens, chunk_size, scale,
            out=None if out is None else out.view(B, Hq * T, D), block_table=block_table, _t_q=T,
            prefetch=prefetch)
        return o3.view(B, Hq, T, D)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    K = block_idx.shape[2]
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B * Hq == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    block_n, per_split, splits = _plan(B, Hkv, K, chunk_size, D, G=G)
    if FUSED_MERGE and FUSED_MERGE_FIT and G * splits * D * 4 > FUSED_MERGE_MAX_BYTES:
        # fewer, longer splits whose partials the fused merge takes (not a second launch)
        block_n, per_split, splits = _plan(B, Hkv, K, chunk_size, D, max(1, FUSED_MERGE_MAX_BYTES // (G * D * 4)),
                                           G=G)
    m, l, acc = _partials(B, Hq, splits, D, q.device)
    block_d = max(16, triton.next_power_of_2(D))
    paged = {}
    if block_table is not None:
        paged = dict(tbl_ptr=block_table, stb=block_table.stride(0), stp=block_table.stride(1),
                     PAGED=True, PAGE=k_cache.shape[2])
    s_pad = max(2, triton.next_power_of_2(splits))
    fuse = FUSED_MERGE and G * splits * D * 4 <= FUSED_MERGE_MAX_BYTES
    group = _two_level_group(G, D, splits) if FUSED_MERGE and not fuse else None
    fuse = fuse or group is not None
    if select is not None and not fuse and not SELECT_IN_PROLOGUE_UNFUSED:
        select.run()  # the merging program zeroes the histogram: none here, nor the merge kernel
        select = None
    fused = {}
    if fuse:
        g_r = triton.next_power_of_2(G)
        tile = max(1, triton.next_power_of_2(MERGE_TILE_ELEMS // (g_r * block_d) + 1) // 2)  # splits a step
        fused = dict(out_ptr=out, sob=out.stride(0), soh=out.stride(1), sod=out.stride(2),
                     ticket_ptr=_tickets(B * Hkv, q.device), FUSED=True, G_R=g_r, S_PAD=s_pad,
                     S_TILE=min(s_pad, tile))
        if group is not None:  # two levels: groups of `group` splits, then the groups
            ng = triton.cdiv(splits, group)
            m1, l1, acc1 = _partials(B, Hq, ng, D, q.device)
            l1_pad = max(2, triton.next_power_of_2(group))
            ng_pad = max(2, triton.next_power_of_2(ng))
            fused.update(m1_ptr=m1, l1_ptr=l1, acc1_ptr=acc1, gticket_ptr=_group_tickets(B * Hkv * ng, q.device),
                         GROUP=group, NG=ng, TWO_LEVEL=True, L1_PAD=l1_pad, L1_TILE=min(l1_pad, tile),
                         S_PAD=ng_pad, S_TILE=min(ng_pad, tile))
    pdl = pdl_args(q, "attention", rows=B * Hkv, max_rows=PDL_MAX_ROWS)  # few rows only (kvcomp.ops._pdl)
    scalar = SCALAR_BLOCKS and chunk_size % block_n == 0
    _sparse_decode_split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, block_idx, seq_lens, m, l, acc,
        Hkv, K, per_split, splits, scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_idx.stride(),
        G=G, D=D, G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d,
        BLOCK_N=block_n, CHUNK=chunk_size, IEEE=q.dtype == torch.float32, DOT_F32=interpreting(),
        **paged, **fused, T_Q=_t_q, **pdl, EARLY=bool(pdl) and prefetch,
        # (the prologue selection's share: at most per_split / chunk + 1 blocks, cut at both ends)
        **(dict(select.kernel_args(), SEL_PAD=triton.next_power_of_2(triton.cdiv(per_split, chunk_size) + 1))
           if select is not None else {}),
        BLK_SCALAR=scalar, **_timeline_args(B * Hkv * splits, q.device),
        **({"maxnreg": r} if (r := _maxnreg(B, Hkv, G)) else {}),
        num_warps=WARPS,
        num_stages=ONE_TILE_STAGES if per_split <= block_n else STAGES,
    )
    if not fuse:
        hist = {} if select is None else dict(  # the prologue read it: the merge zeroes it
            hist_ptr=select.hist["hist_ptr"], NBINS=select.hist["NBINS"], G_H=G, HIST=True)
        _merge_kernel[(B * Hq,)](
            m, l, acc, out, Hq, splits, *out.stride(),
            D=D, S_PAD=s_pad, BLOCK_D=block_d,
            num_warps=max(MERGE_WARPS, min(8, s_pad * block_d // 8192)), **pdl, **hist,
        )
    return out
