"""Stage 2 of ``hamming_topk``: the selection of each (sequence, kv-head) row from its block keys.

``_select_kernel`` (grid B * Hkv) runs one row a program; the tensor-core and SIMT scans'
fused selection and ``sparse_decode_attention``'s prologue call the row functions directly:

* ``_select_row_hist``: the histogram threshold (the keys' histogram that the scan filled by
  atomics): one suffix sum gives the threshold and the count above it, one prefix sum over the
  keys gives every kept block's output slot (``kernels`` module doc, "Histogram threshold");
* ``_select_row``: the binary (or ARITY-ary) search over the key values, then the passes that
  keep the keys above the threshold and the lowest-index ties.

Both give the reference's selection: score descending, lower block index first on ties,
must-select blocks always, indices written ascending, -1 after the kept ones.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvcomp.ops._pdl import pdl_enter


@triton.jit
def _row_keys(
    key_row, must_ptr, start, n, must_key, M: tl.constexpr, BLOCK: tl.constexpr,
    CG: tl.constexpr = False,
):
    """Keys of blocks [start, start + BLOCK) of one row: (key int64, is_must, is_real). CG: read
    through L2 only (keys written by other programs of the same launch)."""
    idx = start + tl.arange(0, BLOCK)
    real = idx < n
    if CG:
        key = tl.load(key_row + idx, mask=real, other=0, cache_modifier=".cg").to(tl.int64)
    else:
        key = tl.load(key_row + idx, mask=real, other=0).to(tl.int64)
    must = tl.zeros([BLOCK], dtype=tl.int1)
    for j in tl.static_range(M):
        m = tl.load(must_ptr + j)
        pos = tl.where(m >= 0, m, n + m)
        must = must | (idx == pos)
    must = must & real
    key = tl.where(must, must_key, key)
    return key, must, real


@triton.jit
def _select_kernel(
    key_ptr, len_ptr, kb_ptr, must_ptr, out_ptr,
    Hkv, NB_IN, K, KB_CONST,
    sob, soh,
    CHUNK: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
    KB_TENSOR: tl.constexpr, ARITY: tl.constexpr,
    hist_ptr=None, HIST: tl.constexpr = False, KMIN: tl.constexpr = 0, NBINS: tl.constexpr = 1,
    COMPACT: tl.constexpr = True, PDL: tl.constexpr = False, KSTEP: tl.constexpr = 1,
    COARSE: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    seq_len = tl.load(len_ptr + b).to(tl.int64)
    if KB_TENSOR:
        kb = tl.load(kb_ptr + b).to(tl.int64)
    else:
        kb = KB_CONST + tl.zeros([], dtype=tl.int64)  # KB_CONST may be specialised to 1
    if HIST and COMPACT:
        _select_row_hist(key_ptr + pid * NB_IN, out_ptr + b * sob + h * soh, must_ptr, seq_len, kb,
                         K, hist_ptr + pid * NBINS, NB_IN, CHUNK, M, BLOCK, SINGLE, KMIN, NBINS, False, KSTEP,
                         0, K, True, COARSE)
    elif HIST:
        _select_row(key_ptr + pid * NB_IN, out_ptr + b * sob + h * soh, must_ptr, seq_len, kb, K,
                    CHUNK, M, BLOCK, SINGLE, ARITY, False, hist_ptr + pid * NBINS, True, KMIN, NBINS)
    else:
        _select_row(key_ptr + pid * NB_IN, out_ptr + b * sob + h * soh, must_ptr, seq_len, kb, K,
                    CHUNK, M, BLOCK, SINGLE, ARITY, False)


@triton.jit
def _pack2(hi, lo, WIDE: tl.constexpr):
    """Two non-negative counts in one integer: (hi << 32) + lo as int64 if WIDE, else
    (hi << 16) + lo as int32 (both < 2^15). Sums and prefix sums of packed values add the fields."""
    if WIDE:
        return (hi.to(tl.int64) << 32) + lo.to(tl.int64)
    else:
        return (hi.to(tl.int32) << 16) + lo.to(tl.int32)


@triton.jit
def _unpack2(x, WIDE: tl.constexpr):
    """(hi, lo) of ``_pack2``."""
    if WIDE:
        hi = x >> 32
    else:
        hi = x >> 16
    if WIDE:
        lo = x - (hi << 32)
    else:
        lo = x - (hi << 16)
    return hi, lo


@triton.jit
def _must_entry(must_ptr, n, jm: tl.constexpr):
    """(block, counts) of must-select entry jm in a row of n blocks (in n's integer type):
    negative entries count from the end; it counts when inside [0, n) and not named by an
    earlier entry (a block named twice counts once)."""
    mj = tl.load(must_ptr + jm).to(n.dtype)
    pj = tl.where(mj >= 0, mj, n + mj)
    take = (pj >= 0) & (pj < n)
    for im in tl.static_range(jm):
        mi = tl.load(must_ptr + im).to(n.dtype)
        pi = tl.where(mi >= 0, mi, n + mi)
        take = take & (pi != pj)
    return pj, take


@triton.jit
def _row_keys32(key_row, must_ptr, start, n, nb_row, M: tl.constexpr, BLOCK: tl.constexpr, CG: tl.constexpr):
    """``_row_keys`` in int32 (the histogram path's keys and counts fit it): keys of blocks
    [start, start + BLOCK) of one row with n blocks (int32), whether each is must-select, whether
    it is real. Must-select keys are left as they are (the caller keeps those blocks anyway).
    The loads are masked by the row's buffer length nb_row, not by n: a bound the JIT knows to
    be a multiple of 16 keeps whole vectors in or out, so the keys load 16 bytes at a time (the
    keys past n are read and not used)."""
    idx = start + tl.arange(0, BLOCK)
    real = idx < n
    if CG:
        key = tl.load(key_row + idx, mask=idx < nb_row, other=0, cache_modifier=".cg")
    else:
        key = tl.load(key_row + idx, mask=idx < nb_row, other=0)
    must = tl.zeros([BLOCK], dtype=tl.int1)
    for j in tl.static_range(M):
        m = tl.load(must_ptr + j)
        must = must | (idx == tl.where(m >= 0, m, n + m))
    return key, must & real, real


@triton.jit
def _select_row_hist(
    key_row, out_row, must_ptr, seq_len, kb, K, hist_row, nb_row,
    CHUNK: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
    KMIN: tl.constexpr, NBINS: tl.constexpr, CG: tl.constexpr, KSTEP: tl.constexpr,
    slot_lo, slot_hi, ZERO: tl.constexpr, COARSE: tl.constexpr = False, PAD: tl.constexpr = 0,
):
    """Selection of one (b, kv-head) row from its block keys and the histogram of its other
    (not must-select) keys that the scan filled. Writes output slots [slot_lo, slot_hi) only
    (of [0, K): the whole row, or one attention program's share, ``sparse_decode_attention``'s
    selection in the prologue). ZERO: zeroes the histogram for the next launch (else the
    caller does, once every reader is done). CG: keys and histogram read through L2 only
    (written by other programs of the same launch). nb_row: the length of the row's key buffer
    (>= its blocks). PAD: the -1 padding's tile (a power of two at least slot_hi - slot_lo
    saves the BLOCK-wide one; 0: BLOCK).
    Two scans and one reduction in a chain: the threshold T and the number of other keys above
    it from one suffix sum of the histogram, then every kept block's output slot from one
    prefix sum over the keys that counts (ties at T, keys above T or must-select) at once.
    Same selection as ``_select_row`` and the reference (ties at T: lowest index first).
    COARSE: a bin holds KSTEP consecutive key values, several of them distinct (scores too wide
    for one bin a value, MLA's): T's bin only bounds T, a binary search over that bin's values
    (log2(KSTEP) rounds over the bin's keys) finds it.
    Counts, keys and block indices are int32 (keys are at most G x BITS in magnitude) and keys
    are compared with a bin's bounds, not divided into bins: the prologue of every attention
    program runs this, several programs an SM at once, so its instruction count is its time
    (session 21, sm_90: 952 -> 773 SASS instructions a thread in that prologue; decode.md)."""
    n = ((seq_len + CHUNK - 1) // CHUNK).to(tl.int32)
    kb = kb.to(tl.int32)
    if SINGLE:  # issued first: these loads overlap the histogram's
        key1, must1, real1 = _row_keys32(key_row, must_ptr, 0, n, nb_row, M, BLOCK, CG)
    n_must = tl.zeros([], dtype=tl.int32)  # distinct must-select blocks inside [0, n)
    for jm in tl.static_range(M):
        pj, take = _must_entry(must_ptr, n, jm)
        n_must += take.to(tl.int32)
    count = tl.minimum(tl.minimum(n, tl.maximum(kb, n_must)), K)
    need = count - n_must  # taken from the other blocks, best keys first
    jb = tl.arange(0, NBINS)
    # [NBINS]: #(other keys in bin jb: [KMIN + KSTEP jb, KMIN + KSTEP (jb + 1))), then zeroed for
    # the next launch once every thread's reads are done (barrier): without it one thread could
    # clear a bin another has not read yet (seen on the H200 when the zeroing went in index
    # order; a layout that replicates elements over threads would do the same), a race the
    # interpreter cannot show. Read in ascending order (16-byte loads)
    hist_ptrs = hist_row + jb
    if CG:
        hist = tl.load(hist_ptrs, cache_modifier=".cg")
    else:
        hist = tl.load(hist_ptrs)
    if ZERO:
        tl.debug_barrier()
        tl.store(hist_ptrs, tl.zeros([NBINS], dtype=tl.int32))
    at_least = tl.cumsum(hist, 0, reverse=True)  # [NBINS] #(other keys >= the bin's key)
    above = at_least - hist  # #(other keys > the bin's key)
    # T's bin is the one where the count first reaches `need` (exactly one when need > 0)
    hit = (at_least >= need) & (above < need)
    # (bin, count) in one int32 when the row is one tile: bins < HIST_MAX_BINS, counts < BLOCK < 2^15
    t_bin, n_above = _unpack2(tl.sum(tl.where(hit, _pack2(jb, above, not SINGLE), 0), 0), not SINGLE)
    # T's bin (else above every bin); a row's keys are congruent mod KSTEP (``_hist_args``), so
    # a bin holds one distinct key and bins order keys as keys do: a key's bin is above T's iff
    # the key reaches T's bin's upper bound (no division a key)
    thr = tl.where(need > 0, t_bin.to(tl.int32), NBINS)
    need_ties = tl.where(need > 0, need - n_above.to(tl.int32), 0)  # keys in T's bin to keep
    b_lo = KMIN + thr * KSTEP  # T's bin: keys in [b_lo, b_hi); above every key when need == 0
    b_hi = b_lo + KSTEP
    vthr = b_lo
    if COARSE:  # T = the largest value in T's bin with #(the bin's other keys >= T) >= need_ties
        lo = b_lo  # the invariant holds at lo; with need == 0 above every key, no round
        hi = tl.where(need > 0, b_hi - 1, b_lo)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            ge = tl.zeros([], dtype=tl.int32)
            for start in range(0, n, BLOCK):
                if SINGLE:
                    key, must, real = key1, must1, real1
                else:
                    key, must, real = _row_keys32(key_row, must_ptr, start, n, nb_row, M, BLOCK, CG)
                cand = real & ~must & (key >= b_lo) & (key < b_hi) & (key >= mid)
                ge += tl.sum(cand.to(tl.int32), 0)
            if ge >= need_ties:
                lo = mid
            else:
                hi = mid - 1
        vthr = lo
        n_gt = tl.zeros([], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            if SINGLE:
                key, must, real = key1, must1, real1
            else:
                key, must, real = _row_keys32(key_row, must_ptr, start, n, nb_row, M, BLOCK, CG)
            n_gt += tl.sum((real & ~must & (key > vthr) & (key < b_hi)).to(tl.int32), 0)
        need_ties = tl.where(need > 0, need_ties - n_gt, 0)

    # compaction: slot of a kept block = #(kept before it) = #(gt before) + min(#(ties before),
    # need_ties); both counts from one prefix sum of (tie, gt) packed in one integer (16-bit
    # fields of an int32 when the row is one tile: counts < BLOCK < 2^15)
    zero = tl.zeros([], dtype=tl.int32)
    carry = _pack2(zero, zero, not SINGLE)
    for start in range(0, n, BLOCK):
        if SINGLE:
            key, must, real = key1, must1, real1
        else:
            key, must, real = _row_keys32(key_row, must_ptr, start, n, nb_row, M, BLOCK, CG)
        if COARSE:
            gt = real & (must | (key >= b_hi) | (~must & (key > vthr)))
            tie = real & ~must & (key == vthr)
        else:
            gt = real & (must | (key >= b_hi))
            tie = real & ~must & (key >= b_lo) & (key < b_hi)
        v = _pack2(tie, gt, not SINGLE)
        ties_b, gt_b = _unpack2(carry + tl.cumsum(v, 0) - v, not SINGLE)
        keep = gt | (tie & (ties_b < need_ties))
        slot = gt_b + tl.minimum(ties_b, need_ties)
        idx = start + tl.arange(0, BLOCK)
        tl.store(out_row + slot, idx, mask=keep & (slot >= slot_lo) & (slot < slot_hi))
        if not SINGLE:
            carry += tl.sum(v, 0)
    PADW: tl.constexpr = BLOCK if PAD == 0 else PAD
    for start in range(slot_lo, slot_hi, PADW):  # -1 padding after the kept ones
        jo = start + tl.arange(0, PADW)
        tl.store(out_row + jo, tl.full([PADW], -1, dtype=tl.int32), mask=(jo >= count) & (jo < slot_hi))


@triton.jit
def _select_row(
    key_row, out_row, must_ptr, seq_len, kb, K,
    CHUNK: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
    ARITY: tl.constexpr, CG: tl.constexpr,
    hist_row=None, HIST: tl.constexpr = False, KMIN: tl.constexpr = 0, NBINS: tl.constexpr = 1,
):
    """Selection of one (b, kv-head) row from its block keys (see the module docstring). HIST:
    the previous histogram stage 2 (HIST_COMPACT off: the scan counted every key, the must
    blocks' keys are taken out here, then the passes of the search path)."""
    n = (seq_len + CHUNK - 1) // CHUNK
    INF: tl.constexpr = 1 << 40

    if HIST:
        # the row's histogram of keys (every real block, must-select ones included), zeroed
        # for the next launch; T from its suffix sums once the must blocks' keys are taken out
        bins = tl.arange(0, NBINS)
        hist = tl.load(hist_row + bins)
        tl.debug_barrier()  # every thread's reads before the zeroing (see _select_row_hist)
        tl.store(hist_row + bins, tl.zeros([NBINS], dtype=tl.int32))
        n_must = tl.zeros([], dtype=tl.int64)
        for jm in tl.static_range(M):
            pj, take = _must_entry(must_ptr, n, jm)
            kj = tl.load(key_row + tl.where(take, pj, 0), mask=take, other=KMIN)
            hist -= ((bins == (kj - KMIN)) & take).to(tl.int32)
            n_must += take.to(tl.int64)
        count = tl.minimum(tl.minimum(n, tl.maximum(kb, n_must)), K)
        need = count - n_must  # from the other blocks
        at_least = tl.sum(hist, 0) - (tl.cumsum(hist, 0) - hist)  # [NBINS] #(other keys >= bin)
        n_ok = tl.sum((at_least >= need).to(tl.int64), 0)  # non-increasing: bins 0 .. n_ok - 1
        must_key = tl.zeros([], dtype=tl.int64) + (KMIN + NBINS)  # above every possible key
        lo = tl.where(need > 0, KMIN + n_ok - 1, must_key)
        hi = lo  # the search below has nothing left to do
    else:
        # pass 1: number of must-select blocks, range of the other keys
        n_must = tl.zeros([], dtype=tl.int64)
        kmin = tl.full([], INF, dtype=tl.int64)
        kmax = tl.full([], -INF, dtype=tl.int64)
        for start in range(0, n, BLOCK):
            key, must, real = _row_keys(key_row, must_ptr, start, n, 0, M, BLOCK, CG)
            other = real & ~must
            n_must += tl.sum(must.to(tl.int64), 0)
            kmin = tl.minimum(kmin, tl.min(tl.where(other, key, INF), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(other, key, -INF), 0))
        count = tl.minimum(tl.minimum(n, tl.maximum(kb, n_must)), K)
        must_key = kmax + 1  # above every real key
        lo = tl.minimum(kmin, must_key)
        hi = must_key
    if SINGLE:
        key1, must1, real1 = _row_keys(key_row, must_ptr, 0, n, must_key, M, BLOCK, CG)

    # search for the largest T with #(key >= T) >= count  (the invariant holds for lo)
    if SINGLE and ARITY > 2:
        # ARITY-ary: count against ARITY candidates lo + j * step at once, keep the last that
        # still holds; ~log_ARITY(range) rounds of one [BLOCK, ARITY] reduction each
        jv = tl.arange(0, ARITY)
        while lo < hi:
            step = (hi - lo + ARITY) // ARITY
            cand = lo + jv.to(tl.int64) * step  # [ARITY] ascending, cand[0] == lo
            hit = (key1[:, None] >= cand[None, :]) & real1[:, None]  # [BLOCK, ARITY]
            holds = tl.sum(hit.to(tl.int32), 0) >= count  # [ARITY]: true for j <= j*
            j_star = tl.sum(holds.to(tl.int64), 0) - 1
            hi = tl.minimum(hi, lo + (j_star + 1) * step - 1)
            lo = lo + j_star * step
    while lo < hi:  # binary (what is left of it after the ARITY-ary rounds: nothing)
        mid = lo + (hi - lo + 1) // 2
        if SINGLE:
            ge = tl.sum((real1 & (key1 >= mid)).to(tl.int64), 0)
        else:
            ge = tl.zeros([], dtype=tl.int64)
            for start in range(0, n, BLOCK):
                key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK, CG)
                ge += tl.sum((real & (key >= mid)).to(tl.int64), 0)
        if ge >= count:
            lo = mid
        else:
            hi = mid - 1
    thr = lo

    # pass 2: how many are strictly above T; the rest of `count` comes from ties, lowest first
    if SINGLE:
        n_gt = tl.sum((real1 & (key1 > thr)).to(tl.int64), 0)
    else:
        n_gt = tl.zeros([], dtype=tl.int64)
        for start in range(0, n, BLOCK):
            key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK, CG)
            n_gt += tl.sum((real & (key > thr)).to(tl.int64), 0)
    need_ties = count - n_gt

    # pass 3: write the kept indices ascending
    ties_before = tl.zeros([], dtype=tl.int64)
    kept_before = tl.zeros([], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        if SINGLE:
            key, real = key1, real1
        else:
            key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK, CG)
        tie = (real & (key == thr)).to(tl.int64)
        tie_rank = ties_before + tl.cumsum(tie, 0) - 1
        keep = real & ((key > thr) | ((tie > 0) & (tie_rank < need_ties)))
        slot = kept_before + tl.cumsum(keep.to(tl.int64), 0) - 1
        idx = start + tl.arange(0, BLOCK)
        tl.store(out_row + slot, idx.to(tl.int32), mask=keep & (slot < K))
        ties_before += tl.sum(tie, 0)
        kept_before += tl.sum(keep.to(tl.int64), 0)
    # -1 padding after the kept ones
    for start in range(0, K, BLOCK):
        j = start + tl.arange(0, BLOCK)
        tl.store(out_row + j, tl.full([BLOCK], -1, dtype=tl.int32), mask=(j >= count) & (j < K))
