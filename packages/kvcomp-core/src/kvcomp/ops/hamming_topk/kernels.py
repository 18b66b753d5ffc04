"""Triton kernels of ``hamming_topk``: fused token scoring + block reduction, then selection.

Stage 1, ``_block_keys_kernel``, grid (B * Hkv, SPLITS): a program scans a range of blocks of one
(sequence, kv-head), only blocks below ``ceil(seq_len / chunk)`` (no work over padding), scores
every token from its packed code (token scores stay in registers) and writes one int32 *key* per
block to a small buffer [B, Hkv, NB]: the block max, or for "mean" the fp32 mean mapped to an
int32 with the same order. Three exact-or-cheaper forms of the group score (FORM):

* ``FORM_XOR`` (direct): ``sum_g (BITS - 2 popc(q_g ^ k))``, G popcounts per word. With one
  row, the *majority* code (bit b set iff more than half of the G query codes have it) gives the
  cheaper ``mode="majority"`` score ``BITS - 2 popc(m ^ k)``, one popcount per word.
* ``FORM_PLANES`` (exact, cheaper for G >= 8): with c_b the number of the group's query codes
  with bit b set and k_b the key bit,
      sum_g (BITS - 2 Ham(q_g, k)) = G*BITS - 2*sum_b c_b - 2G*popc(k) + 4*sum_b c_b k_b,
  and c_b is written in P = bit_length(G) bit-planes, so sum_b c_b k_b =
  sum_p 2^p popc(plane_p & k): P + 1 popcounts per word instead of G, integer and exact.

Stage 2, ``_select_kernel``, grid (B * Hkv): per row, a binary search over the key values finds
the threshold T such that ``count`` keys are >= T (must-select blocks get a key above every real
one), then one pass in index order keeps every key > T and the lowest-index keys == T up to
``count``, and writes their indices ascending (prefix sums give the output slots), then -1 up to
K. This is exactly the reference's order (score descending, lower index first on ties).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.ops._common import interpreting

FORM_XOR = 0
FORM_PLANES = 1

# 128 threads x 2 tokens x one 16-byte code each: enough bytes in flight per program
BLOCK_T = 256
# blocks per program are chosen so that about this many programs run (4 waves of 132 SMs)
TARGET_PROGRAMS = 528
SCAN_WARPS = 4
# the selection keeps a row's keys in registers up to this many blocks, else it re-reads tiles
SELECT_BLOCK_MAX = 2048


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
def _block_keys_kernel(
    q_ptr, k_ptr, len_ptr, key_ptr,
    Hkv, NB_OUT, BLOCKS_PER_PROG,
    sqb, sqh, sqw,
    skb, skh, skt, skw,
    G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
    FORM: tl.constexpr, MAJORITY: tl.constexpr, R_PAD: tl.constexpr,
    CHUNK: tl.constexpr, CP: tl.constexpr, N_SUB: tl.constexpr,
    MEAN: tl.constexpr, K_CONTIG: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    n_blocks = (seq_len + CHUNK - 1) // CHUNK
    blk_lo = tl.program_id(1) * BLOCKS_PER_PROG
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_PROG, n_blocks)
    NBT: tl.constexpr = BLOCK_T // CP  # blocks per tile

    wv = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    w_ok = wv < W
    bit = tl.arange(0, 32)  # [32]
    rv = tl.arange(0, R_PAD)  # [R_PAD]
    BITS: tl.constexpr = 32 * W
    q_base = q_ptr + b * sqb + (h * G) * sqh

    # ---- prologue: the rows each key code is combined with, their weights and the base score
    if FORM == 0 and not MAJORITY:
        rows = tl.load(
            q_base + rv[:, None] * sqh + wv[None, :] * sqw,
            mask=(rv[:, None] < G) & w_ok[None, :], other=0,
        )  # [R_PAD, BLOCK_W]
        coef = tl.where(rv < G, -2, 0)  # [R_PAD]
        base = G * BITS
    else:
        cnt = tl.zeros([BLOCK_W, 32], dtype=tl.int32)  # c_b: query codes with bit b set
        for g in range(G):
            qg = tl.load(q_base + g * sqh + wv * sqw, mask=w_ok, other=0)  # [BLOCK_W]
            cnt += (qg[:, None] >> bit[None, :]) & 1
        if MAJORITY:
            # distinct bits: their sum is their OR
            maj = tl.sum(tl.where(2 * cnt > G, 1, 0) << bit[None, :], 1)
            rows = tl.zeros([R_PAD, BLOCK_W], dtype=tl.int32) + maj[None, :]  # R_PAD == 1
            coef = tl.full([R_PAD], -2, dtype=tl.int32)
            base = BITS
        else:
            planes = tl.sum(
                ((cnt[None, :, :] >> rv[:, None, None]) & 1) << bit[None, None, :], 2
            )  # [R_PAD, BLOCK_W]: plane p holds bit p of every c_b (distinct bits: sum == OR)
            rows = planes
            coef = 4 << rv  # [R_PAD]; planes p >= bit_length(G) are all zero
            base = G * BITS - 2 * tl.sum(tl.sum(cnt, 1), 0)

    i = tl.arange(0, BLOCK_T)
    bl = i // CP  # block within the tile
    c = i % CP  # token within the (sub-)block
    k_base = k_ptr + b * skb + h * skh
    for blk0 in range(blk_lo, blk_hi, NBT):
        blk = blk0 + bl  # [BLOCK_T]
        if MEAN:
            run = tl.zeros([NBT], dtype=tl.int32)
        else:
            run = tl.full([NBT], -2147483648, dtype=tl.int32)
        n_ok = tl.zeros([NBT], dtype=tl.int32)
        for s in tl.static_range(N_SUB):
            in_blk = s * CP + c
            t = blk * CHUNK + in_blk  # [BLOCK_T]
            ok = (in_blk < CHUNK) & (t < seq_len) & (blk < blk_hi)
            if K_CONTIG:
                offs = t[:, None].to(tl.int64) * W + wv[None, :]
            else:
                offs = t[:, None].to(tl.int64) * skt + wv[None, :] * skw
            kc = tl.load(k_base + offs, mask=ok[:, None] & w_ok[None, :], other=0)  # [BLOCK_T, BLOCK_W]
            if FORM == 0:
                x = rows[None, :, :] ^ kc[:, None, :]  # [BLOCK_T, R_PAD, BLOCK_W]
            else:
                x = rows[None, :, :] & kc[:, None, :]
            pc = tl.sum(_popc(x, USE_ASM), 2)  # [BLOCK_T, R_PAD]
            score = base + tl.sum(pc * coef[None, :], 1)  # [BLOCK_T]
            if FORM == 1:
                score -= (2 * G) * tl.sum(_popc(kc, USE_ASM), 1)
            s2 = tl.reshape(score, [NBT, CP])
            ok2 = tl.reshape(ok, [NBT, CP])
            if MEAN:
                run += tl.sum(tl.where(ok2, s2, 0), 1)
                n_ok += tl.sum(ok2.to(tl.int32), 1)
            else:
                run = tl.maximum(run, tl.max(tl.where(ok2, s2, -2147483648), 1))
        if MEAN:
            mean = tl.math.div_rn(run.to(tl.float32), tl.maximum(n_ok, 1).to(tl.float32))
            bits = mean.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # same order as the floats
        else:
            key = run
        bo = blk0 + tl.arange(0, NBT)
        tl.store(key_ptr + pid * NB_OUT + bo, key, mask=bo < blk_hi)


@triton.jit
def _row_keys(key_row, must_ptr, start, n, must_key, M: tl.constexpr, BLOCK: tl.constexpr):
    """Keys of blocks [start, start + BLOCK) of one row: (key int64, is_must, is_real)."""
    idx = start + tl.arange(0, BLOCK)
    real = idx < n
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
    Hkv, NB_IN, K,
    sob, soh,
    CHUNK: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    key_row = key_ptr + pid * NB_IN
    out_row = out_ptr + b * sob + h * soh
    seq_len = tl.load(len_ptr + b).to(tl.int64)
    n = (seq_len + CHUNK - 1) // CHUNK
    kb = tl.load(kb_ptr + b).to(tl.int64)
    INF: tl.constexpr = 1 << 40

    # pass 1: number of must-select blocks, range of the other keys
    n_must = tl.zeros([], dtype=tl.int64)
    kmin = tl.full([], INF, dtype=tl.int64)
    kmax = tl.full([], -INF, dtype=tl.int64)
    for start in range(0, n, BLOCK):
        key, must, real = _row_keys(key_row, must_ptr, start, n, 0, M, BLOCK)
        other = real & ~must
        n_must += tl.sum(must.to(tl.int64), 0)
        kmin = tl.minimum(kmin, tl.min(tl.where(other, key, INF), 0))
        kmax = tl.maximum(kmax, tl.max(tl.where(other, key, -INF), 0))
    count = tl.minimum(tl.minimum(n, tl.maximum(kb, n_must)), K)
    must_key = kmax + 1  # above every real key
    lo = tl.minimum(kmin, must_key)
    hi = must_key
    if SINGLE:
        key1, must1, real1 = _row_keys(key_row, must_ptr, 0, n, must_key, M, BLOCK)

    # binary search: the largest T with #(key >= T) >= count  (invariant holds for lo)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if SINGLE:
            ge = tl.sum((real1 & (key1 >= mid)).to(tl.int64), 0)
        else:
            ge = tl.zeros([], dtype=tl.int64)
            for start in range(0, n, BLOCK):
                key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK)
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
            key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK)
            n_gt += tl.sum((real & (key > thr)).to(tl.int64), 0)
    need_ties = count - n_gt

    # pass 3: write the kept indices ascending
    ties_before = tl.zeros([], dtype=tl.int64)
    kept_before = tl.zeros([], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        if SINGLE:
            key, real = key1, real1
        else:
            key, must, real = _row_keys(key_row, must_ptr, start, n, must_key, M, BLOCK)
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


def _form(G: int, mode: str) -> tuple[int, bool, int]:
    """(FORM, MAJORITY, R_PAD) for a group of G query codes and a scoring mode."""
    if mode == "majority":
        return FORM_XOR, True, 1
    planes = G.bit_length()  # c_b in [0, G] needs this many bits
    if mode == "exact_planes" or (mode == "exact" and planes + 1 < G):
        return FORM_PLANES, False, triton.next_power_of_2(planes)
    return FORM_XOR, False, triton.next_power_of_2(G)


def block_keys_triton(
    q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor,
    chunk_size: int, chunk_repre: str, mode: str = "exact", out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1: int32 [B, Hkv, NB] block keys (NB = ceil(Lmax / chunk)); entries of blocks at or
    past a sequence's ``ceil(seq_len / chunk)`` are not written. ``out``: a contiguous buffer of
    that shape to write into."""
    B, Hq, W = q_codes.shape
    _, Hkv, Lmax, _ = k_codes.shape
    G = Hq // Hkv
    nb = max(1, triton.cdiv(Lmax, chunk_size))
    keys = out if out is not None else torch.empty(B, Hkv, nb, dtype=torch.int32, device=q_codes.device)
    if B * Hkv == 0:
        return keys
    form, majority, r_pad = _form(G, mode)
    block_w = triton.next_power_of_2(W)
    block_t = max(BLOCK_T // block_w * 4, 32) if block_w > 4 else BLOCK_T
    cp = min(triton.next_power_of_2(chunk_size), block_t)
    nbt = block_t // cp
    n_sub = triton.cdiv(chunk_size, cp)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, B * Hkv), triton.cdiv(nb, nbt)))
    per_prog = triton.cdiv(triton.cdiv(nb, splits), nbt) * nbt
    splits = triton.cdiv(nb, per_prog)
    k_contig = k_codes.stride(3) == 1 and k_codes.stride(2) == W
    _block_keys_kernel[(B * Hkv, splits)](
        q_codes, k_codes, seq_lens, keys,
        Hkv, nb, per_prog,
        *q_codes.stride(), *k_codes.stride(),
        G=G, W=W, BLOCK_W=block_w, FORM=form, MAJORITY=majority, R_PAD=r_pad,
        CHUNK=chunk_size, CP=cp, N_SUB=n_sub, MEAN=chunk_repre == "mean",
        K_CONTIG=k_contig, USE_ASM=not interpreting(), BLOCK_T=block_t,
        num_warps=SCAN_WARPS,
    )
    return keys


_MUST_CACHE: dict = {}


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
    keys: torch.Tensor, seq_lens: torch.Tensor, k_blocks: torch.Tensor, K: int,
    chunk_size: int, must_select: tuple[int, ...], out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2: int32 [B, Hkv, K] selection from stage 1's keys (written into ``out`` if given;
    every entry is written)."""
    B, Hkv, nb = keys.shape
    if out is None:
        out = torch.empty(B, Hkv, K, dtype=torch.int32, device=keys.device)
    if B * Hkv == 0:
        return out
    must = _must_tensor(tuple(must_select), keys.device)
    block = min(triton.next_power_of_2(max(nb, K)), SELECT_BLOCK_MAX)
    block = max(block, 16)
    _select_kernel[(B * Hkv,)](
        keys, seq_lens, k_blocks, must, out,
        Hkv, nb, K, out.stride(0), out.stride(1),
        CHUNK=chunk_size, M=len(must_select), BLOCK=block, SINGLE=nb <= block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out


def hamming_topk_triton(
    q_codes: torch.Tensor, k_codes: torch.Tensor, seq_lens: torch.Tensor, k_blocks: torch.Tensor,
    K: int, chunk_size: int, must_select: tuple[int, ...], chunk_repre: str, mode: str = "exact",
) -> torch.Tensor:
    """See ``kvcomp.ops.hamming_topk``; ``mode`` picks the group score form (exact or majority)."""
    keys = block_keys_triton(q_codes, k_codes, seq_lens, chunk_size, chunk_repre, mode)
    return select_triton(keys, seq_lens, k_blocks, K, chunk_size, must_select)
