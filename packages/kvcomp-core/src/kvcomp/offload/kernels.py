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
