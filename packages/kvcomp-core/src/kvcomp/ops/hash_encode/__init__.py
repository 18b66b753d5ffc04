"""``hash_encode``: the binary hash code of keys or queries.

    codes = hash_encode(x, weight, bias=None, enable_gqa=False)
        x       [..., D]          float16 / bfloat16 / float32
        weight  [D, BITS]         one projection for all rows, or
                [H, D, BITS]      one per head; then x is [B, H, *, D] (dim 1 is the head)
                [Hkv, D, BITS]    with enable_gqa=True: x is [B, Hkv * G, *, D] and head j uses
                                  weight[j // G] (a GQA layer's query heads hashed with their
                                  kv-head's projection; the same codes as the weight repeated G
                                  times per head, read once per kv-head)
        bias    None, or float32 (any strides) one of
                [BITS]            shared by every row
                [H, BITS]         per head; x is [B, H, *, D]
                [B, H, BITS]      per sequence and head; x is [B, H, *, D]
        codes   [..., BITS // 32] int32

    hash_encode(x, weight, bias=None, out=code_cache, positions=pos)
        writes the codes of x [B, H, T, D] into out [B, H, Lmax, BITS // 32] at rows
        pos[b] + t (pos [B] int) and returns out: the cache's append path.

Bit layout: bit b is ``(x @ W)[..., b] > bias[..., b]`` (projection in fp32, fp32 compare; bias
None: ``> 0``), stored in word b // 32 at bit b % 32, least significant bit first. With
``bias = mu @ W`` (``kvcomp.ops.key_stats.hash_bias``) the codes are those of the centred rows
``x - mu`` without forming them: equal to ``hash_encode(x - mu, W)`` whenever both projections
are exact (e.g. dyadic inputs), else up to rounding where ``|(x - mu) . w_b|`` is near 0.
Exact for fp32 inputs; for half inputs a bit can differ from the fp32 reference only where
|x . w_b - bias_b| is within rounding of zero.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.hash_encode.reference import hash_encode_into_ref, hash_encode_ref

__all__ = ["hash_encode", "hash_encode_ref"]


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gqa: bool = False) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be [D, BITS] or [H, D, BITS], got shape {tuple(weight.shape)}")
    D, bits = weight.shape[-2], weight.shape[-1]
    if bits % 32 or bits == 0:
        raise ValueError(f"weight has {bits} bits (last dim); must be a positive multiple of 32")
    if x.dim() < 1 or x.shape[-1] != D:
        raise ValueError(f"x last dim {tuple(x.shape)[-1:]} != weight head_dim {D}")
    if gqa:
        if weight.dim() != 3 or x.dim() < 3 or weight.shape[0] == 0 or x.shape[1] % weight.shape[0]:
            raise ValueError(
                f"enable_gqa needs weight [Hkv, D, BITS] and x [B, Hkv * G, *, D] (heads a multiple "
                f"of the weight's), got weight {tuple(weight.shape)} and x {tuple(x.shape)}"
            )
    elif weight.dim() == 3 and (x.dim() < 3 or x.shape[1] != weight.shape[0]):
        raise ValueError(
            f"per-head weight {tuple(weight.shape)} needs x [B, H, *, D] with H={weight.shape[0]}, "
            f"got x {tuple(x.shape)}"
        )
    if bias is None:
        return
    check_tensor("bias", bias, dtypes=(torch.float32,), device=x.device)
    if bias.dim() not in (1, 2, 3) or bias.shape[-1] != bits:
        raise ValueError(
            f"bias must be [BITS], [H, BITS] or [B, H, BITS] with BITS={bits}, got shape "
            f"{tuple(bias.shape)}"
        )
    if bias.dim() >= 2:
        want = tuple(x.shape[:2]) if bias.dim() == 3 else tuple(x.shape[1:2])
        if x.dim() < 3 or tuple(bias.shape[:-1]) != want:
            what = "[B, H, BITS]" if bias.dim() == 3 else "[H, BITS]"
            raise ValueError(
                f"bias {what} of shape {tuple(bias.shape)} needs x [B, H, *, D] with matching "
                f"{'B, H' if bias.dim() == 3 else 'H'}, got x {tuple(x.shape)}"
            )


def hash_encode(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    _check(x, weight, bias, enable_gqa)
    if (out is None) != (positions is None):
        raise ValueError("hash_encode: pass both out= and positions= (or neither)")
    extra = () if bias is None else (bias,)
    if out is not None:
        W = weight.shape[-1] // 32
        check_tensor("out", out, ndim=4, dtypes=(torch.int32,), device=x.device)
        check_tensor("positions", positions, ndim=1, dtypes=INT_DTYPES, device=x.device)
        if x.dim() != 4 or out.shape[:2] != x.shape[:2] or out.shape[3] != W:
            raise ValueError(
                f"out {tuple(out.shape)} must be [B, H, Lmax, {W}] for x {tuple(x.shape)} [B, H, T, D]"
            )
        if positions.shape[0] != x.shape[0]:
            raise ValueError(f"positions has {positions.shape[0]} entries, batch is {x.shape[0]}")
        if use_triton(backend, x, weight, out, *extra):
            from kvcomp.ops.hash_encode.kernels import hash_encode_into_triton

            with device_guard(x):
                return hash_encode_into_triton(x, weight, out, positions.contiguous(), bias)
        return hash_encode_into_ref(x, _per_head(x, weight, enable_gqa), out, positions, bias)
    if use_triton(backend, x, weight, *extra):
        from kvcomp.ops.hash_encode.kernels import hash_encode_triton

        with device_guard(x):
            return hash_encode_triton(x, weight, bias)
    return hash_encode_ref(x, _per_head(x, weight, enable_gqa), bias)


def _per_head(x: torch.Tensor, weight: torch.Tensor, gqa: bool) -> torch.Tensor:
    """The references' weight: with ``gqa``, [Hkv, D, BITS] repeated to x's heads (row j // G)."""
    return weight.repeat_interleave(x.shape[1] // weight.shape[0], dim=0) if gqa else weight
