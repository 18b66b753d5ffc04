"""One sparse decode step of one attention layer: encode the query, select blocks, attend.

    out, block_idx = decode_step(q, q_weight, k_codes, k_cache, v_cache, seq_lens,
                                 k_blocks=..., max_blocks=..., chunk_size=128,
                                 must_select=(0, -2, -1), chunk_repre="max", scale=None)
        q          [B, Hq, D]            float16 / bfloat16 / float32, post-RoPE decode queries;
                                         or [B, Hq, T, D]: the last T tokens of each sequence
                                         (a speculative-decoding verify step): one selection
                                         from all G x T query rows of a kv-head, attention
                                         causal among the T tokens (``sparse_decode_attention``)
        q_weight   [Hkv, D, BITS]        the kv-heads' hash projections: query head j is hashed
                                         with row j // G (read once per kv-head); or
                   [Hq, D, BITS]         one per query head
        k_codes    [B, Hkv, Lmax, W]     int32 key-code cache (W = BITS // 32)
        k_cache    [B, Hkv, Lmax, D]     q's dtype
        v_cache    [B, Hkv, Lmax, D]
        seq_lens   [B]                   int real lengths (the new token included)
        k_blocks   int, or [B] int tensor: blocks to attend per sequence, must-select included
        max_blocks int, the output width K (required with a tensor k_blocks: no host read)
        mode       "exact" (default) or "majority": the group score of ``hamming_topk``
        k_scale    [B, Hkv, Lmax] float, optional per-token weights of the scores (the key
                   norms ``||k - mu||`` of centred codes, ``kvcomp.ops.key_stats``); needs
                   chunk_repre "max" or "lse". The query codes are unchanged (no query bias).
        chunk_repre "max", "mean" or "lse" (blocks ranked by the log-sum-exp of estimated
                   logits; the query norms come from q: ``lse_query_scale``, computed inside
                   the scan)
        out        q's shape and dtype
        block_idx  [B, Hkv, K]           int32, ascending, -1 padding (``hamming_topk``)

The same three public ops the integration calls, in a row: ``hash_encode`` -> ``hamming_topk``
-> ``sparse_decode_attention``. Each kernel reads only its predecessor's output and older
tensors, so with programmatic dependent launch (``kvcomp.ops._pdl``, sm_90+) the scan loads the
key codes and the attention its queries before waiting for the previous kernel (``_prefetch``).
Where ``hamming_topk``'s stage 2 is the histogram one (few rows, "max" without k_scale) and the
attention merges its splits in the same launch, the attention's programs run stage 2 in their
prologue (``_defer``: ``hamming_topk.kernels.DeferredSelect``): three launches instead of four.
On CUDA tensors it launches kernels only (no host-device synchronisation, no allocation that
depends on device values), so a step can be captured in a CUDA graph and replayed with new q /
caches / seq_lens written into the captured tensors.
"""

from __future__ import annotations

import torch

from kvcomp.ops.hamming_topk import hamming_topk, split_deferred
from kvcomp.ops.hash_encode import hash_encode
from kvcomp.ops.sparse_decode_attention import sparse_decode_attention

__all__ = ["decode_step"]


def decode_step(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    k_codes: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_blocks,
    max_blocks: int | None = None,
    chunk_size: int = 128,
    must_select=(0, -2, -1),
    chunk_repre: str = "max",
    scale: float | None = None,
    mode: str = "exact",
    k_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    if (q.dim() not in (3, 4) or q_weight.dim() != 3 or k_codes.dim() != 4
            or q_weight.shape[0] not in (q.shape[1], k_codes.shape[1])):
        raise ValueError(
            f"decode_step needs q [B, Hq, D] or [B, Hq, T, D], q_weight [Hkv, D, BITS] or [Hq, D, "
            f"BITS] and k_codes [B, Hkv, Lmax, W], got q {tuple(q.shape)}, q_weight "
            f"{tuple(q_weight.shape)} and k_codes {tuple(k_codes.shape)}"
        )
    if isinstance(k_blocks, torch.Tensor) and max_blocks is None:
        raise ValueError("decode_step: a tensor k_blocks needs max_blocks= (no host read allowed)")
    q_codes = hash_encode(q, q_weight, enable_gqa=q_weight.shape[0] != q.shape[1],
                          backend=backend)  # [B, Hq, W] or [B, Hq, T, W]
    if q.dim() == 4:  # the kv-head's group: its G query heads x T queries
        q_codes = q_codes.reshape(q.shape[0], q.shape[1] * q.shape[2], q_codes.shape[-1])
    sel = hamming_topk(
        q_codes, k_codes, seq_lens, k_blocks=k_blocks, chunk_size=chunk_size,
        must_select=must_select, chunk_repre=chunk_repre, max_blocks=max_blocks, mode=mode,
        k_scale=k_scale, backend=backend, _prefetch=True, _defer=q.dim() == 3,
        _q=q if chunk_repre == "lse" else None,  # "lse": the scan computes q_scale from q
    )
    block_idx, deferred = split_deferred(sel)  # stage 2 may be left to the attention's prologue
    out = sparse_decode_attention(
        q, k_cache, v_cache, block_idx, seq_lens, chunk_size=chunk_size, scale=scale,
        backend=backend, _prefetch=True, _select=deferred,
    )
    return out, block_idx
