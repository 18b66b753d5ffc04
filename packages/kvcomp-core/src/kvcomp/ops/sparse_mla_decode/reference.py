"""Reference sparse MLA decode in latent space (absorbed form), fp32 math."""

from __future__ import annotations

import torch

from kvcomp.ops._blocks import selected_token_mask


def sparse_mla_decode_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    block_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """q_lat [B, H, R], q_pe [B, H, P], ckv [B, L, R], kpe [B, L, P], block_idx [B, 1, K]
    -> [B, H, R] = softmax((q_lat . ckv + q_pe . kpe) * scale) . ckv over selected tokens."""
    L = ckv.shape[1]
    mask = selected_token_mask(block_idx, seq_lens, L, chunk_size)  # [B, 1, L]
    s = torch.einsum("bhr,blr->bhl", q_lat.float(), ckv.float())
    s = (s + torch.einsum("bhp,blp->bhl", q_pe.float(), kpe.float())) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    # rows never attended may hold anything (NaN included): zero them so 0 * NaN cannot leak
    c = ckv.float().masked_fill(~mask[:, 0, :, None], 0.0)
    return torch.einsum("bhl,blr->bhr", p, c).to(q_lat.dtype)
