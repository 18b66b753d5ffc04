"""Reference sparse decode attention: exact softmax over the selected blocks' tokens, fp32 math."""

from __future__ import annotations

import torch

from kvcomp.ops._blocks import selected_token_mask


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, L, D], block_idx [B, Hkv, K] -> [B, Hq, D] (q's dtype).

    A row with no selected token (seq_len 0) gives zeros."""
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    mask = selected_token_mask(block_idx, seq_lens, L, chunk_size)  # [B, Hkv, L]
    qf = q.float().view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhld->bhgl", qf, k_cache.float()) * scale
    s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    # rows never attended may hold anything (NaN included): zero them so 0 * NaN cannot leak
    v = v_cache.float().masked_fill(~mask.unsqueeze(-1), 0.0)
    out = torch.einsum("bhgl,bhld->bhgd", p, v)
    return out.reshape(B, Hq, v_cache.shape[-1]).to(q.dtype)
