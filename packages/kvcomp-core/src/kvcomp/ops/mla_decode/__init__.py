"""``mla_decode``: dense MLA (DeepSeek) decode in latent space, the baseline of the sparse op.

    out = mla_decode(q_lat, q_pe, ckv, kpe, seq_lens, scale=s)
        q_lat     [B, H, R]      absorbed query (q_nope @ W_UK), R = kv_lora_rank (512)
        q_pe      [B, H, P]      RoPE part of the query, P = qk_rope_head_dim (64)
        ckv       [B, Lmax, R]   latent cache (after kv_a_layernorm), q_lat's dtype
        kpe       [B, Lmax, P]   post-RoPE key cache, q_lat's dtype
        seq_lens  [B]            int real lengths; rows t >= seq_lens[b] are never read
        scale     float          the attention module's own scaling (YaRN mscale included)
        out       [B, H, R]      softmax((q_lat . ckv + q_pe . kpe) * scale) . ckv, q_lat's
                                 dtype; the caller applies W_UV and o_proj. Zeros if length 0.

Byte floor (bf16, R=512, P=64): ckv + kpe = 1152 bytes per token; 151 MB per sequence at
128K tokens, so a B=1 step at 128K cannot beat ~36 us at 4.2 TB/s.
Same math as ``sparse_mla_decode`` with every block selected; CUDA tensors run the split-K
Triton kernel, other tensors the fp32 reference.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.mla_decode.reference import mla_decode_ref

__all__ = ["mla_decode", "mla_decode_ref"]


def _check(q_lat, q_pe, ckv, kpe, seq_lens, scale):
    check_tensor("q_lat", q_lat, ndim=3, dtypes=FLOAT_DTYPES)
    dev, dt = q_lat.device, q_lat.dtype
    check_tensor("q_pe", q_pe, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("ckv", ckv, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("kpe", kpe, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=dev)
    B, H, R = q_lat.shape
    P = q_pe.shape[2]
    if q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} must be [B={B}, H={H}, P]")
    if ckv.shape[0] != B or ckv.shape[2] != R:
        raise ValueError(f"ckv {tuple(ckv.shape)} must be [B={B}, Lmax, R={R}]")
    if kpe.shape != (B, ckv.shape[1], P):
        raise ValueError(f"kpe {tuple(kpe.shape)} must be [B={B}, Lmax={ckv.shape[1]}, P={P}]")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, batch is {B}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive float (the module's scaling), got {scale!r}")


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    _check(q_lat, q_pe, ckv, kpe, seq_lens, scale)
    if use_triton(backend, q_lat, q_pe, ckv, kpe, seq_lens):
        from kvcomp.ops.mla_decode.kernels import mla_decode_triton

        with device_guard(q_lat):
            return mla_decode_triton(q_lat, q_pe, ckv, kpe, seq_lens.contiguous(), float(scale))
    return mla_decode_ref(q_lat, q_pe, ckv, kpe, seq_lens, float(scale))
