"""Reference sparse MLA decode in latent space (absorbed form), fp32 math.

Only the selected tokens are gathered; tokens never attended are never read."""

from __future__ import annotations

import torch

from kvcomp.ops._blocks import gather_rows, selected_token_index


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
    tok, valid = selected_token_index(block_idx, seq_lens, ckv.shape[1], chunk_size)
    tok, valid = tok[:, 0], valid[:, 0]  # [B, N]: one selection for all heads
    c = gather_rows(ckv, tok).float()
    c = c.masked_fill(~valid.unsqueeze(-1), 0.0)
    kp = gather_rows(kpe, tok).float()
    s = torch.einsum("bhr,bnr->bhn", q_lat.float(), c)
    s = (s + torch.einsum("bhp,bnp->bhn", q_pe.float(), kp)) * scale
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhn,bnr->bhr", p, c).to(q_lat.dtype)
