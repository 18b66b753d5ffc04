"""Reference sparse decode attention: exact softmax over the selected blocks' tokens, fp32 math.

Only the selected tokens are gathered (work and memory proportional to the selection, so this
is also a usable CPU path); tokens never attended are never read.
"""

from __future__ import annotations

import torch

from kvcomp.ops._blocks import gather_rows, selected_token_index


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

    A block listed twice counts once; a row with no selected token (seq_len 0) gives zeros.
    q [B, Hq, T, D]: T queries per sequence, query t at token seq_len - T + t, attending to the
    selected tokens below seq_len - T + t + 1 -> [B, Hq, T, D]."""
    if q.dim() == 4:
        T = q.shape[2]
        lens = seq_lens.to(torch.int64)
        return torch.stack([
            sparse_decode_attention_ref(q[:, :, t], k_cache, v_cache, block_idx,
                                        (lens - (T - 1 - t)).clamp_min(0), chunk_size, scale)
            for t in range(T)], dim=2)
    B, Hq, D = q.shape
    Hkv, L, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    G = Hq // Hkv
    tok, valid = selected_token_index(block_idx, seq_lens, L, chunk_size)  # [B, Hkv, N]
    kg = gather_rows(k_cache, tok).float()
    vg = gather_rows(v_cache, tok).float()
    vg = vg.masked_fill(~valid.unsqueeze(-1), 0.0)  # slots gathered from row 0: never counted
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().view(B, Hkv, G, D), kg) * scale
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", p, vg)
    return out.reshape(B, Hq, Dv).to(q.dtype)
