"""``sparse_decode_attention``: exact attention of one decode query over selected KV blocks.

    out = sparse_decode_attention(q, k_cache, v_cache, block_idx, seq_lens,
                                  chunk_size=128, scale=None)
        q          [B, Hq, D]          float16 / bfloat16 / float32; or [B, Hq, T, D]: T queries
                                       per sequence (speculative decoding: the last T tokens,
                                       query t at token seq_len - T + t attends to the selected
                                       tokens below seq_len - T + t + 1); out is then
                                       [B, Hq, T, D]. One selection serves the T queries (for
                                       ``hamming_topk`` pass their codes as [B, Hq * T, W]:
                                       the group of a kv-head is then its G * T query rows)
        k_cache    [B, Hkv, Lmax, D]   same dtype as q (any strides with a unit last stride)
        v_cache    [B, Hkv, Lmax, D]
        block_idx  [B, Hkv, K]         int32 block indices (-1 entries are skipped), e.g. from
                                       ``hamming_topk``; a block covers tokens
                                       [i * chunk_size, (i + 1) * chunk_size)
        seq_lens   [B]                 int real lengths; tokens t >= seq_lens[b] never attend
        scale      float, default 1 / sqrt(D)
        out        [B, Hq, D]          q's dtype; zeros for a row that selects no token
                                       (pass ``out=`` to write into an existing tensor, e.g. a
                                       CUDA-graph buffer)

Softmax is exact over the union of the selected blocks' valid tokens: with every block
selected it equals dense attention. Query head j reads kv-head j // (Hq // Hkv).

Paged KV (as in vLLM): pass ``block_table`` [B, max_pages] int32 and page pools
``k_cache`` / ``v_cache`` [num_pages, Hkv, page_size, D]; token t of sequence b is row
t % page_size of page block_table[b, t // page_size] (seq_lens <= max_pages * page_size). The
contiguous path is compiled without it (a constexpr), so it costs nothing there.
"""

from __future__ import annotations

import math

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.sparse_decode_attention.reference import sparse_decode_attention_ref

__all__ = ["sparse_decode_attention", "sparse_decode_attention_ref"]


def _check_paged(q, k_cache, block_table):
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=q.device)
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table {tuple(block_table.shape)} must be [B={q.shape[0]}, max_pages]")
    if k_cache.dim() != 4 or k_cache.shape[3] != q.shape[-1]:
        raise ValueError(
            f"paged k_cache {tuple(k_cache.shape)} must be [num_pages, Hkv, page_size, D={q.shape[-1]}]"
        )


def _gather_pages(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_pages, Hkv, page, D] pool + [B, max_pages] table -> contiguous [B, Hkv, L, D]."""
    B, P = block_table.shape
    x = pool[block_table.long()]  # [B, P, Hkv, page, D]
    return x.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], P * pool.shape[2], pool.shape[3])


def _check(q, k_cache, v_cache, block_idx, seq_lens, chunk_size, paged=False):
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] < 1):
        raise ValueError(f"q must be [B, Hq, D] or [B, Hq, T, D] with T >= 1, got shape {tuple(q.shape)}")
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    check_tensor("block_idx", block_idx, ndim=3, dtypes=(torch.int32,), device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=dev)
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    if (not paged and k_cache.shape[0] != B) or k_cache.shape[3] != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} must be [B={B}, Hkv, Lmax, D={D}]")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv-heads ({Hkv})")
    if block_idx.shape[:2] != (B, Hkv):
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B={B}, Hkv={Hkv}, K]")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, batch is {B}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    chunk_size: int = 128,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
    _prefetch: bool = False,
    _select=None,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, block_idx, seq_lens, chunk_size, paged=block_table is not None)
    if block_table is not None:
        _check_paged(q, k_cache, block_table)
    if out is not None:
        check_tensor("out", out, ndim=q.dim(), dtypes=(q.dtype,), device=q.device)
        if out.shape != q.shape:
            raise ValueError(f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if use_triton(backend, q, k_cache, v_cache, block_idx, seq_lens):
        from kvcomp.ops.sparse_decode_attention.kernels import sparse_decode_attention_triton

        with device_guard(q):
            return sparse_decode_attention_triton(
                q, k_cache, v_cache, block_idx, seq_lens.contiguous(), chunk_size, float(scale), out=out,
                block_table=block_table, prefetch=_prefetch, select=_select,
            )
    if _select is not None:  # not the Triton path after all: the selection first
        _select.run()
    if block_table is not None:
        k_cache, v_cache = _gather_pages(k_cache, block_table), _gather_pages(v_cache, block_table)
    res = sparse_decode_attention_ref(q, k_cache, v_cache, block_idx, seq_lens, chunk_size, float(scale))
    return res if out is None else out.copy_(res)
