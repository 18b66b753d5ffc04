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

    codes = hash_encode_split(xs, weights, out=None, positions=None)
        xs       sequence of P inputs [..., D_p] (the same leading dims)
        weights  sequence of P projections, all [D_p, BITS_p] or all [H, D_p, BITS_p]
        codes    [..., sum_p BITS_p // 32] int32: part 0's words, then part 1's, ...

The split code of MLA (``hash_bits`` "512+64": the latent and the RoPE part of a key or query
hashed separately, one code): equal to ``torch.cat([hash_encode(x_p, w_p) ...], -1)``. Two
parts of one dtype (with weights of one dtype) take one launch on the CUDA path; otherwise each
part is encoded on its own and written into its words of the output. ``out=`` / ``positions=``
as in ``hash_encode`` (x_p [B, H, T, D_p], out [B, H, Lmax, sum W_p]). No bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.hash_encode.reference import (
    hash_encode_into_ref,
    hash_encode_ref,
    hash_encode_split_ref,
)

__all__ = ["hash_encode", "hash_encode_ref", "hash_encode_split", "hash_encode_split_ref"]


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
    extra = () if bias is None else (bias,)
    if _check_out(x, weight.shape[-1] // 32, out, positions, "hash_encode"):
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


def _check_out(x: torch.Tensor, W: int, out: torch.Tensor | None, positions: torch.Tensor | None,
               op: str) -> bool:
    """Validate ``out=`` / ``positions=`` (the cache-append form) for x [B, H, T, D] and W code
    words; False when neither is given."""
    if (out is None) != (positions is None):
        raise ValueError(f"{op}: pass both out= and positions= (or neither)")
    if out is None:
        return False
    check_tensor("out", out, ndim=4, dtypes=(torch.int32,), device=x.device)
    check_tensor("positions", positions, ndim=1, dtypes=INT_DTYPES, device=x.device)
    if x.dim() != 4 or out.shape[:2] != x.shape[:2] or out.shape[3] != W:
        raise ValueError(
            f"out {tuple(out.shape)} must be [B, H, Lmax, {W}] for x {tuple(x.shape)} [B, H, T, D]"
        )
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries, batch is {x.shape[0]}")
    return True


def hash_encode_split(
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    xs, weights = tuple(xs), tuple(weights)
    if not xs or len(xs) != len(weights):
        raise ValueError(f"hash_encode_split: {len(xs)} inputs and {len(weights)} weights; need as many, >= 1")
    for p, (x, w) in enumerate(zip(xs, weights)):
        try:
            _check(x, w, None)
        except (TypeError, ValueError) as e:
            raise type(e)(f"hash_encode_split part {p}: {e}") from None
    if any(x.shape[:-1] != xs[0].shape[:-1] for x in xs) or any(x.device != xs[0].device for x in xs):
        raise ValueError(
            f"hash_encode_split: inputs must share their leading dims and device, got "
            f"{[tuple(x.shape) for x in xs]} on {[str(x.device) for x in xs]}"
        )
    if any(w.dim() != weights[0].dim() or (w.dim() == 3 and w.shape[0] != weights[0].shape[0]) for w in weights):
        raise ValueError(
            f"hash_encode_split: weights must all be [D_p, BITS_p] or all [H, D_p, BITS_p], got "
            f"{[tuple(w.shape) for w in weights]}"
        )
    words = [w.shape[-1] // 32 for w in weights]
    into = _check_out(xs[0], sum(words), out, positions, "hash_encode_split")
    fused = (len(xs) == 2 and xs[0].dtype == xs[1].dtype and weights[0].dtype == weights[1].dtype
             and use_triton(backend, *xs, *weights, *((out,) if into else ())))
    if fused:
        from kvcomp.ops.hash_encode.kernels import hash_encode_split_triton

        with device_guard(xs[0]):
            return hash_encode_split_triton(xs[0], weights[0], xs[1], weights[1], out if into else None,
                                            positions.contiguous() if into else None)
    res = out if into else torch.empty(*xs[0].shape[:-1], sum(words), dtype=torch.int32, device=xs[0].device)
    w0 = 0
    for x, w, n in zip(xs, weights, words):  # one launch a part, each into its words of res
        part = res[..., w0:w0 + n]
        if into:
            hash_encode(x, w, out=part, positions=positions, backend=backend)
        else:
            part.copy_(hash_encode(x, w, backend=backend))
        w0 += n
    return res


def _per_head(x: torch.Tensor, weight: torch.Tensor, gqa: bool) -> torch.Tensor:
    """The references' weight: with ``gqa``, [Hkv, D, BITS] repeated to x's heads (row j // G)."""
    return weight.repeat_interleave(x.shape[1] // weight.shape[0], dim=0) if gqa else weight
