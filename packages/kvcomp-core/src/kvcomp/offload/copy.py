"""``fetch_pages``: copy the missing K/V blocks of one step from host storage into the pool.

    fetch_pages(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk_size, backend="auto")
        host_k / host_v  [R, cap, D]         host K/V of R = B * Hkv rows (sequence b, kv-head h
                                             at row b * Hkv + h), cap a multiple of chunk_size;
                                             on CUDA the device-visible view of pinned memory
        pool_k / pool_v  [S, 1, chunk, D]    page pool in HBM (contiguous), same dtype
        sel              [R, K] int32        selected blocks (-1 padding)
        slots            [R, K] int32        global pool slot of each selected block
        miss             [R, K] bool         True where the block must be copied
    For every (r, k) with miss: pool[slots[r, k], 0] = host[r, sel[r, k] * chunk : + chunk].

Backends: "triton" (``kernels._fetch_pages_kernel``: a fixed-shape masked launch, reads only
the missing pages, no host synchronisation; on CPU tensors under TRITON_INTERPRET=1) and
"reference" (torch indexing over the list of misses: one host read of that list; exact, the
CPU path). "auto": Triton on CUDA tensors, else the reference.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import check_tensor, use_triton

__all__ = ["fetch_pages", "fetch_pages_ref"]


def _check(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk):
    check_tensor("host_k", host_k, ndim=3)
    dev = host_k.device
    check_tensor("host_v", host_v, ndim=3, dtypes=(host_k.dtype,), device=dev)
    check_tensor("pool_k", pool_k, ndim=4, dtypes=(host_k.dtype,), device=dev)
    check_tensor("pool_v", pool_v, ndim=4, dtypes=(host_k.dtype,), device=dev)
    check_tensor("sel", sel, ndim=2, dtypes=(torch.int32,), device=dev)
    check_tensor("slots", slots, ndim=2, dtypes=(torch.int32,), device=dev)
    check_tensor("miss", miss, ndim=2, dtypes=(torch.bool,), device=dev)
    R, cap, D = host_k.shape
    if host_v.shape != host_k.shape:
        raise ValueError(f"host_v {tuple(host_v.shape)} does not match host_k {tuple(host_k.shape)}")
    if not isinstance(chunk, int) or chunk < 1 or cap % chunk:
        raise ValueError(f"host capacity {cap} must be a multiple of chunk_size {chunk!r} (an int >= 1)")
    if host_k.stride(2) != 1 or host_k.stride(1) != D or host_v.stride() != host_k.stride():
        raise ValueError("host_k / host_v must have contiguous rows ([R, cap, D] with strides [*, D, 1])")
    if pool_k.shape[1:] != (1, chunk, D) or pool_v.shape != pool_k.shape:
        raise ValueError(
            f"pool_k {tuple(pool_k.shape)} / pool_v {tuple(pool_v.shape)} must be [S, 1, {chunk}, {D}]"
        )
    if not (pool_k.is_contiguous() and pool_v.is_contiguous()):
        raise ValueError("pool_k / pool_v must be contiguous")
    if sel.shape[0] != R or slots.shape != sel.shape or miss.shape != sel.shape:
        raise ValueError(
            f"sel {tuple(sel.shape)}, slots {tuple(slots.shape)}, miss {tuple(miss.shape)} must all be [R={R}, K]"
        )


def fetch_pages_ref(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk: int) -> None:
    """Torch reference of ``fetch_pages`` (indexing over the misses; reads their list)."""
    r, k = miss.nonzero(as_tuple=True)
    if r.numel() == 0:
        return
    R, cap, D = host_k.shape
    blk = sel[r, k].to(torch.long)
    dst = slots[r, k].to(torch.long)
    pool_k[dst, 0] = host_k.view(R, cap // chunk, chunk, D)[r, blk]
    pool_v[dst, 0] = host_v.view(R, cap // chunk, chunk, D)[r, blk]


def fetch_pages(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk_size: int, *,
                backend: str = "auto") -> None:
    """Copy the missing pages into the pool in place (see the module docstring)."""
    _check(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk_size)
    if use_triton(backend, host_k, pool_k, sel):
        from kvcomp.offload.kernels import fetch_pages_triton

        fetch_pages_triton(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk_size)
        return
    fetch_pages_ref(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk_size)
