"""Token masks from block selections (shared by the attention references)."""

from __future__ import annotations

import torch


def selected_token_mask(
    block_idx: torch.Tensor, seq_lens: torch.Tensor, L: int, chunk_size: int
) -> torch.Tensor:
    """block_idx [B, H, K] (-1 = none) -> bool [B, H, L]: token t is attended iff its block
    t // chunk_size is selected and t < seq_lens[b]."""
    B, H, K = block_idx.shape
    nb = -(-L // chunk_size)
    blk = block_idx.to(torch.long)
    hit = torch.zeros(B, H, nb + 1, dtype=torch.bool, device=block_idx.device)
    # -1 and out-of-range indices land in the spare slot nb, which is dropped
    slot = torch.where((blk >= 0) & (blk < nb), blk, torch.full_like(blk, nb))
    hit.scatter_(2, slot, torch.ones_like(slot, dtype=torch.bool))
    tok = hit[..., :nb].repeat_interleave(chunk_size, dim=2)[..., :L]
    valid = torch.arange(L, device=block_idx.device).view(1, 1, L) < seq_lens.to(torch.long).view(B, 1, 1)
    return tok & valid
