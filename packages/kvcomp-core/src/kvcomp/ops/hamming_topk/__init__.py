"""``hamming_topk``: pick the KV blocks each (sequence, kv-head) attends to at a decode step.

    block_idx = hamming_topk(q_codes, k_codes, seq_lens, k_blocks=..., chunk_size=128,
                             must_select=(0, -2, -1), chunk_repre="max", k_scale=None)
        q_codes   [B, Hq, W]        int32 query codes (W = BITS // 32)
        k_codes   [B, Hkv, Lmax, W] int32 key-code cache; rows t >= seq_lens[b] are ignored
        seq_lens  [B]               int32/int64 real lengths (ragged batch)
        k_blocks  int, or [B] int tensor: blocks per sequence including the must-select ones
                  (capped at the sequence's block count)
        k_scale   [B, Hkv, Lmax]    optional float per-token weights of the scores (below)
        q_scale   [B, Hkv]          float32, chunk_repre="lse" only: the group's mean ||q|| /
                                    sqrt(D) (``kvcomp.ops.query_codes.lse_query_scale``)
        block_idx [B, Hkv, K]       int32, ascending block indices, -1 padding

    K, the output width, is ``max(k_blocks, len(must_select))`` for an int k_blocks; for a
    tensor pass ``max_blocks=`` (no host sync), else ``int(k_blocks.max())`` is read.
    Hq % Hkv == 0 and query head j belongs to kv-head j // (Hq // Hkv).

Scores are exact int32 (``BITS - 2 * Hamming`` summed over a kv-head's query heads), block
score is the max (or mean) over the block's valid tokens, ties go to the lower block index.
Full definition: ``kvcomp.ops.hamming_topk.reference``.

``chunk_repre="lse"`` ranks a block by its estimated attention mass instead of its best token:
each token's score becomes a logit estimate ``sin(pi/2 * s / (G * BITS)) * k_scale * q_scale``
(the sine inverts SimHash's collision probability into the cosine; with ``k_scale = ||k - mu||``
and ``q_scale = mean ||q|| / sqrt(D)`` it estimates ``q . (k - mu) / sqrt(D)``) and the block
score is the log-sum-exp of the block's logits. Float sums depend on their order: backends agree
up to rounding, and their selections only differ between blocks whose scores are that close.
Measured on SmolLM2 (``docs/results/smollm2.md``): more captured attention mass than "max" at
every budget. ``decode_step`` and the cache's decode pass the post-RoPE queries instead
(private ``_q=q``, [B, Hq, D] or [B, Hq, T, D]): the Triton scan then computes q_scale itself
(one launch fewer per torch op of ``lse_query_scale``, equal to it up to rounding), the
reference calls ``lse_query_scale``.

``k_scale`` [B, Hkv, Lmax] float16 / bfloat16 / float32 (any strides; finite values), optional:
per-token weights of the scores, e.g. the key norms ``||k - mu||`` of centred keys
(``kvcomp.ops.key_stats``). A token's score is then ``float32(int score) * float32(k_scale)``,
one fp32 multiply, so every backend computes the same bits; the block score is the max of those
("mean" with k_scale is rejected: a float mean depends on the summation order; with "lse" the
weight multiplies the logit estimate, below). Every ``mode`` combines with it; the selection rule is unchanged.

``mode`` picks how a kv-head's G query codes are combined:
    "exact"     (default) the sum above, exact. The kernel computes it directly (G popcounts
                per code word), from bit-planes of the per-bit counts c_b (bit_length(G) + 1
                popcounts) or, for even G, from the two's-complement bit-planes of G / 2 - c_b
                (bit_length(G) popcounts: 3 instead of 4 at G = 4), whichever is cheapest; all
                are exact integer sums, the same scores. On sm_80+ GPUs, for "max" blocks
                without weights and even G, the signed planes' popcounts run as 1-bit
                tensor-core MMAs (the same scores): ``mma_scan`` for 128-bit codes (G <= 30),
                ``mma_wide`` for other even word counts up to 32 and G <= 254 (MLA's 576-bit
                split codes with 128 heads).
    "majority"  cheaper approximation: one code per kv-head whose bit b is set iff more than
                half of the G query codes have it (ties -> 0), scored ``BITS - 2 * Hamming``;
                equals ``hamming_topk(majority_codes(q_codes, Hkv), ...)`` with G = 1.
    "exact_direct" / "exact_planes" / "exact_signed" (even G) force one exact form (benchmarks).
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_tensor,
    device_guard,
    pack_bits,
    unpack_bits,
    use_triton,
)
from kvcomp.ops.hamming_topk.reference import hamming_topk_ref, token_scores_ref
from kvcomp.ops.query_codes import lse_query_scale

__all__ = ["hamming_topk", "hamming_topk_ref", "majority_codes", "token_scores_ref"]

CHUNK_REPRE = ("max", "mean", "lse")
MODES = ("exact", "majority", "exact_direct", "exact_planes", "exact_signed")


def majority_codes(q_codes: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """int32 [B, Hq, W] -> int32 [B, Hkv, W]: bit b set iff more than half of the kv-head's G
    query codes have bit b set (ties -> 0). Pure torch; the reference of ``mode="majority"``."""
    B, Hq, W = q_codes.shape
    G = Hq // num_kv_heads
    ones = unpack_bits(q_codes).view(B, num_kv_heads, G, 32 * W).sum(2)  # [B, Hkv, BITS]
    return pack_bits(2 * ones > G)


def _prepare(q_codes, k_codes, seq_lens, k_blocks, chunk_size, must_select, chunk_repre, max_blocks):
    check_tensor("q_codes", q_codes, ndim=3, dtypes=(torch.int32,))
    check_tensor("k_codes", k_codes, ndim=4, dtypes=(torch.int32,), device=q_codes.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=q_codes.device)
    B, Hq, W = q_codes.shape
    if k_codes.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(
            f"batch mismatch: q_codes {tuple(q_codes.shape)}, k_codes {tuple(k_codes.shape)}, "
            f"seq_lens {tuple(seq_lens.shape)}"
        )
    Hkv = k_codes.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv-heads ({Hkv})")
    if k_codes.shape[3] != W:
        raise ValueError(f"q_codes have {W} words per code, k_codes {k_codes.shape[3]}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if chunk_repre not in CHUNK_REPRE:
        raise ValueError(f"chunk_repre must be one of {CHUNK_REPRE}, got {chunk_repre!r}")
    must = tuple(must_select)
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in must):
        raise TypeError(f"must_select entries must be ints, got {must!r}")
    if isinstance(k_blocks, torch.Tensor):
        check_tensor("k_blocks", k_blocks, ndim=1, dtypes=INT_DTYPES, device=q_codes.device)
        if k_blocks.shape[0] != B:
            raise ValueError(f"k_blocks has {k_blocks.shape[0]} entries, batch is {B}")
        K = int(max_blocks) if max_blocks is not None else int(k_blocks.max().item())
        kb = k_blocks
    elif isinstance(k_blocks, int) and not isinstance(k_blocks, bool):
        if k_blocks < 1:
            raise ValueError(f"k_blocks must be >= 1, got {k_blocks}")
        K = k_blocks if max_blocks is None else int(max_blocks)
        kb = k_blocks
    else:
        raise TypeError(f"k_blocks must be an int or a [B] int tensor, got {type(k_blocks).__name__}")
    K = max(K, len(set(must)), 1)
    return must, kb, K


def split_deferred(sel) -> tuple[torch.Tensor, object]:
    """``hamming_topk(..., _defer=True)``'s result -> (block_idx, the deferred selection or
    None): block_idx is written once the deferred selection runs, which
    ``sparse_decode_attention(..., _select=)`` does (in its prologue, or as a launch first)."""
    if isinstance(sel, torch.Tensor):
        return sel, None
    return sel.out, sel


def hamming_topk(
    q_codes: torch.Tensor,
    k_codes: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_blocks,
    chunk_size: int = 128,
    must_select=(0, -2, -1),
    chunk_repre: str = "max",
    max_blocks: int | None = None,
    mode: str = "exact",
    k_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    backend: str = "auto",
    _prefetch: bool = False,
    _defer: bool = False,
    _q: torch.Tensor | None = None,
):
    must, kb, K = _prepare(
        q_codes, k_codes, seq_lens, k_blocks, chunk_size, must_select, chunk_repre, max_blocks
    )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    extra = ()
    if k_scale is not None:
        _check_scale(k_scale, k_codes, chunk_repre)
        extra = (k_scale,)
    q2 = None
    if _q is not None:  # "lse": q_scale from the queries, inside the scan (decode_step)
        if q_scale is not None or chunk_repre != "lse":
            raise ValueError("_q replaces q_scale, with chunk_repre='lse' only")
        check_tensor("q", _q, dtypes=FLOAT_DTYPES, device=k_codes.device)
        if _q.dim() not in (3, 4) or _q.shape[0] != k_codes.shape[0] or _q.shape[1] % k_codes.shape[1]:
            raise ValueError(f"q must be [B, Hq, D] or [B, Hq, T, D] with B = {k_codes.shape[0]} and Hq a "
                             f"multiple of Hkv = {k_codes.shape[1]}, got {tuple(_q.shape)}")
        q2 = _q if _q.dim() == 3 else _q.reshape(_q.shape[0], -1, _q.shape[-1])
    else:
        _check_q_scale(q_scale, k_codes, chunk_repre)
    if q_scale is not None:
        extra = (*extra, q_scale)
    if q2 is not None:
        extra = (*extra, q2)
    if use_triton(backend, q_codes, k_codes, seq_lens, *extra):
        from kvcomp.ops.hamming_topk.kernels import hamming_topk_triton

        if isinstance(kb, torch.Tensor):
            kb = kb.contiguous()  # the kernels read kb[b], seq_lens[b] at unit stride
        with device_guard(q_codes):
            return hamming_topk_triton(
                q_codes, k_codes, seq_lens.contiguous(), kb, K, chunk_size, must, chunk_repre, mode, k_scale,
                q_scale=None if q_scale is None else q_scale.contiguous(), prefetch=_prefetch,
                defer=_defer, q=q2,
            )
    if q2 is not None:
        q_scale = lse_query_scale(_q, k_codes.shape[1])
    if mode == "majority":
        q_codes = majority_codes(q_codes, k_codes.shape[1])
    if not isinstance(kb, torch.Tensor):
        kb = torch.full((q_codes.shape[0],), kb, dtype=torch.int32, device=q_codes.device)
    return hamming_topk_ref(
        q_codes, k_codes, seq_lens, kb, K, chunk_size, must, chunk_repre, k_scale, q_scale
    )


def _check_q_scale(q_scale, k_codes: torch.Tensor, chunk_repre: str) -> None:
    if chunk_repre != "lse":
        if q_scale is not None:
            raise ValueError(f"q_scale is for chunk_repre='lse' only (got chunk_repre={chunk_repre!r})")
        return
    if q_scale is None:
        raise ValueError("chunk_repre='lse' needs q_scale [B, Hkv] (kvcomp.ops.query_codes.lse_query_scale)")
    check_tensor("q_scale", q_scale, ndim=2, dtypes=(torch.float32,), device=k_codes.device)
    if tuple(q_scale.shape) != tuple(k_codes.shape[:2]):
        raise ValueError(f"q_scale must be [B, Hkv] = {tuple(k_codes.shape[:2])}, got {tuple(q_scale.shape)}")


def _check_scale(k_scale, k_codes: torch.Tensor, chunk_repre: str) -> None:
    check_tensor("k_scale", k_scale, ndim=3, dtypes=FLOAT_DTYPES, device=k_codes.device)
    if tuple(k_scale.shape) != tuple(k_codes.shape[:3]):
        raise ValueError(
            f"k_scale must be [B, Hkv, Lmax] = {tuple(k_codes.shape[:3])} like k_codes, got "
            f"{tuple(k_scale.shape)}"
        )
    if chunk_repre == "mean":
        raise ValueError(
            "k_scale needs chunk_repre 'max' or 'lse' (got 'mean'): the mean of float scores "
            "depends on the summation order, so no two backends would agree"
        )
