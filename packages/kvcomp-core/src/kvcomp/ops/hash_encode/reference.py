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


def broadcast_bias(bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fp32 bias [BITS], [H, BITS] or [B, H, BITS] -> a view that broadcasts against the
    projection [..., BITS] of x (x [B, H, *, D] for the last two)."""
    if bias.dim() == 1:
        return bias
    lead = (1,) * (x.dim() - 3)  # the row dims * of x [B, H, *, D]
    if bias.dim() == 2:
        return bias.view(bias.shape[0], *lead, bias.shape[1])
    return bias.view(bias.shape[0], bias.shape[1], *lead, bias.shape[2])


def hash_encode_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., D] float, weight [D, BITS] or [H, D, BITS] -> int32 [..., BITS // 32].

    Bit b is ``proj[..., b] > bias[..., b]`` (fp32 compare; bias None: ``> 0``)."""
    proj = project(x, weight)
    if bias is None:
        return pack_bits(proj > 0)
    return pack_bits(proj > broadcast_bias(bias, x))


def hash_encode_into_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    positions: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of x [B, H, T, D] written to out [B, H, Lmax, W] at rows positions[b] + t; rows
    outside [0, Lmax) are not written (as the kernel)."""
    codes = hash_encode_ref(x, weight, bias)  # [B, H, T, W]
    B, H, T, W = codes.shape
    rows = positions.to(torch.long).view(B, 1) + torch.arange(T, device=x.device).view(1, T)  # [B, T]
    b, t = ((rows >= 0) & (rows < out.shape[2])).nonzero(as_tuple=True)
    out[b, :, rows[b, t]] = codes[b, :, t]  # [n, H, W] each
    return out


def hash_encode_split_ref(xs, weights) -> torch.Tensor:
    """[hash_encode_ref(x_0, w_0) | hash_encode_ref(x_1, w_1) | ...] along the last (word) dim."""
    return torch.cat([hash_encode_ref(x, w) for x, w in zip(xs, weights)], dim=-1)
