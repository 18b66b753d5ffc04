"""Reference hash encoding: sign of a projection, bit-packed. Pure torch, fp32 math."""

from __future__ import annotations

import torch

from kvcomp.ops._common import pack_bits


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 projection. weight [D, BITS] -> x @ W; weight [H, D, BITS] -> per head, x [B, H, *, D]."""
    xf = x.float()
    wf = weight.float()
    if wf.dim() == 2:
        return xf @ wf
    B, H = xf.shape[0], xf.shape[1]
    flat = xf.reshape(B, H, -1, xf.shape[-1])  # [B, H, N, D]
    proj = torch.einsum("bhnd,hdk->bhnk", flat, wf)  # [B, H, N, BITS]
    return proj.reshape(*xf.shape[:-1], wf.shape[-1])


def hash_encode_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] float, weight [D, BITS] or [H, D, BITS] -> int32 [..., BITS // 32]."""
    return pack_bits(project(x, weight) > 0)


def hash_encode_into_ref(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Codes of x [B, H, T, D] written to out [B, H, Lmax, W] at rows positions[b] + t."""
    codes = hash_encode_ref(x, weight)  # [B, H, T, W]
    B, H, T, W = codes.shape
    rows = positions.to(torch.long).view(B, 1, 1) + torch.arange(T, device=x.device).view(1, 1, T)
    idx = rows.expand(B, H, T).unsqueeze(-1).expand(B, H, T, W)
    out.scatter_(2, idx, codes)
    return out
