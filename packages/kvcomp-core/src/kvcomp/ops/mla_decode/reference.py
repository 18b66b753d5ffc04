"""Reference dense MLA decode in latent space (absorbed form), fp32 math."""

from __future__ import annotations

import torch


def mla_decode_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_lat [B, H, R], q_pe [B, H, P], ckv [B, L, R], kpe [B, L, P], seq_lens [B]
    -> [B, H, R] = softmax((q_lat . ckv + q_pe . kpe) * scale) . ckv over tokens t < seq_lens[b]
    (zeros for a sequence of length 0), in q_lat's dtype."""
    L = ckv.shape[1]
    valid = torch.arange(L, device=ckv.device).view(1, 1, L) < seq_lens.to(torch.long).view(-1, 1, 1)
    s = torch.einsum("bhr,blr->bhl", q_lat.float(), ckv.float())
    s = (s + torch.einsum("bhp,blp->bhl", q_pe.float(), kpe.float())) * scale
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhl,blr->bhr", p, ckv.float()).to(q_lat.dtype)
