"""Triton kernel of ``fetch_pages``: copy the missing K/V pages from host memory into the pool.

``_fetch_pages_kernel``, grid (R * K, cdiv(PAGE, BLOCK)): program (e, t) handles selection entry
e = r * K + k and the t-th BLOCK elements of its page. Entries that are not misses load and
store nothing (masked), so the launch has a fixed shape and reads only the missing pages over
PCIe; no host synchronisation. The host pages are read through the device-visible view of the
pinned host tensors (``kvcomp.offload.host.device_view``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program: 2 KB of bf16 per tensor, 16-byte loads on 4 warps
WARPS = 4


@triton.jit
def _fetch_pages_kernel(
    hk_ptr, hv_ptr, pk_ptr, pv_ptr, sel_ptr, slot_ptr, miss_ptr,
    K, row_stride, PAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """hk/hv: host K/V [R, cap, D] (row r at r * row_stride, a page = PAGE contiguous elements);
    pk/pv: pool [S, PAGE]; sel/slot/miss: [R * K] block, global slot, miss flag (int8)."""
    e = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    r = e // K
    n = tl.load(miss_ptr + e).to(tl.int64) * PAGE  # elements to copy: PAGE on a miss, else 0
    blk = tl.maximum(tl.load(sel_ptr + e).to(tl.int64), 0)
    slot = tl.maximum(tl.load(slot_ptr + e).to(tl.int64), 0)
    off = t * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = off < n
    src = r * row_stride + blk * PAGE + off
    dst = slot * PAGE + off
    kx = tl.load(hk_ptr + src, mask=ok)
    vx = tl.load(hv_ptr + src, mask=ok)
    tl.store(pk_ptr + dst, kx, mask=ok)
    tl.store(pv_ptr + dst, vx, mask=ok)


def fetch_pages_triton(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk: int) -> None:
    """See ``kvcomp.offload.copy.fetch_pages`` (same arguments, all checked there)."""
    R, K = sel.shape
    D = host_k.shape[-1]
    page = chunk * D
    if R * K == 0 or page == 0:
        return
    grid = (R * K, triton.cdiv(page, BLOCK))
    _fetch_pages_kernel[grid](
        host_k, host_v, pool_k, pool_v, sel.contiguous(), slots.contiguous(),
        miss.to(torch.int8).contiguous(),
        K, host_k.stride(0), PAGE=page, BLOCK=BLOCK, num_warps=WARPS,
    )


@triton.jit(do_not_specialize=["step"])  # the step number changes every call: one compile
def _assign_kernel(
    sel_ptr, table_ptr, owner_ptr, last_ptr, slot_out_ptr, miss_out_ptr, hits_ptr, misses_ptr,
    K, C, step, s_sel, s_tab, s_own, s_last,
    K_PAD: tl.constexpr, C_PAD: tl.constexpr,
):
    """One program per row r: ``BlockCache.assign`` (see block_cache.py) in one launch.
    Everything is computed from the row's state as loaded, then each location is stored once
    (no read after write inside the program)."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    j = tl.arange(0, C_PAD)
    k_ok = k < K
    j_ok = j < C
    s = tl.load(sel_ptr + r * s_sel + k, mask=k_ok, other=-1)  # [K_PAD] selected blocks
    valid = s >= 0
    blk = tl.maximum(s, 0).to(tl.int64)
    cur = tl.load(table_ptr + r * s_tab + blk, mask=valid, other=-1)  # [K_PAD] global slot
    hit = valid & (cur >= 0)
    miss = valid & (cur < 0)
    loc = cur.to(tl.int64) - r * C  # [K_PAD] local slot of a hit
    lu = tl.load(last_ptr + r * s_last + j, mask=j_ok, other=0)  # [C_PAD] int64
    own = tl.load(owner_ptr + r * s_own + j, mask=j_ok, other=-1)  # [C_PAD]
    hit_slot = tl.max(((loc[:, None] == j[None, :]) & hit[:, None]).to(tl.int32), 0) > 0  # [C_PAD]
    stepv = tl.zeros([C_PAD], dtype=tl.int64) + step  # (a scalar 1 arrives as a constexpr)
    lu1 = tl.where(hit_slot, stepv, lu)
    # rank of slot j in ascending (last use, index) order, over the row's C slots
    before = (lu1[None, :] < lu1[:, None]) | ((lu1[None, :] == lu1[:, None]) & (j[None, :] < j[:, None]))
    rank = tl.sum((before & j_ok[None, :]).to(tl.int32), 1)  # [C_PAD]
    mrank = tl.cumsum(miss.to(tl.int32), 0) - 1  # [K_PAD] i-th miss of the row
    match = (rank[None, :] == mrank[:, None]) & j_ok[None, :] & miss[:, None]  # [K_PAD, C_PAD]
    victim = tl.sum(tl.where(match, j[None, :], 0), 1).to(tl.int64)  # [K_PAD] local slot
    old = tl.sum(tl.where(match, own[None, :], 0), 1)  # [K_PAD] block the victim held
    is_victim = tl.max(match.to(tl.int32), 0) > 0  # [C_PAD]
    new_owner = tl.sum(tl.where(match, s[:, None], 0), 0)  # [C_PAD]
    tl.store(table_ptr + r * s_tab + tl.maximum(old, 0).to(tl.int64), -1, mask=miss & (old >= 0))
    glob = r * C + victim
    tl.store(table_ptr + r * s_tab + blk, glob.to(tl.int32), mask=miss)
    tl.store(owner_ptr + r * s_own + j, tl.where(is_victim, new_owner, own), mask=j_ok)
    tl.store(last_ptr + r * s_last + j, tl.where(is_victim, stepv, lu1), mask=j_ok)
    slot = tl.where(hit, cur.to(tl.int64), tl.where(miss, glob, -1))
    tl.store(slot_out_ptr + r * K + k, slot.to(tl.int32), mask=k_ok)
    tl.store(miss_out_ptr + r * K + k, miss.to(tl.int8), mask=k_ok)
    tl.atomic_add(hits_ptr, tl.sum(hit.to(tl.int64), 0))
    tl.atomic_add(misses_ptr, tl.sum(miss.to(tl.int64), 0))


ASSIGN_MAX_SLOTS = 256  # [C_PAD, C_PAD] comparison tile per program: beyond this, torch ops


def assign_triton(bc, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``BlockCache.assign`` in one launch (state tensors of ``bc`` updated in place); returns
    (global slots int32 [R, K], miss bool [R, K]). ``bc.step`` is already this step's number."""
    R, K = sel.shape
    slots = torch.empty(R, K, dtype=torch.int32, device=sel.device)
    miss = torch.empty(R, K, dtype=torch.int8, device=sel.device)
    if R * K == 0:
        return slots, miss.bool()
    sel = sel.contiguous()
    _assign_kernel[(R,)](
        sel, bc.table, bc.owner, bc.last_use, slots, miss, bc.hits, bc.misses,
        K, bc.slots, bc.step, sel.stride(0), bc.table.stride(0), bc.owner.stride(0),
        bc.last_use.stride(0),
        K_PAD=max(2, triton.next_power_of_2(K)), C_PAD=max(2, triton.next_power_of_2(bc.slots)),
        num_warps=4,
    )
    return slots, miss.view(torch.bool)
