"""``sparse_mla_decode``: MLA (DeepSeek) decode over selected blocks, in latent space.

    out = sparse_mla_decode(q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size=128, scale=s)
        q_lat      [B, H, R]      absorbed query (q_nope @ W_UK), R = kv_lora_rank (512)
        q_pe       [B, H, P]      RoPE part of the query, P = qk_rope_head_dim (64)
        ckv        [B, Lmax, R]   latent cache (after kv_a_layernorm), q_lat's dtype
        kpe        [B, Lmax, P]   post-RoPE key cache
        block_idx  [B, 1, K]      int32, one selection per sequence for all heads (-1 skipped)
        seq_lens   [B]            int real lengths
        scale      float          the attention module's own scaling (YaRN mscale included)
        out        [B, H, R]      softmax((q_lat . ckv + q_pe . kpe) * scale) . ckv; the caller
                                  applies W_UV and o_proj. Zeros for a row with no token.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.sparse_mla_decode.reference import sparse_mla_decode_ref

__all__ = ["sparse_mla_decode", "sparse_mla_decode_ref"]


def _check(q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size, scale):
    check_tensor("q_lat", q_lat, ndim=3, dtypes=FLOAT_DTYPES)
    dev, dt = q_lat.device, q_lat.dtype
    check_tensor("q_pe", q_pe, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("ckv", ckv, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("kpe", kpe, ndim=3, dtypes=(dt,), device=dev)
    check_tensor("block_idx", block_idx, ndim=3, dtypes=(torch.int32,), device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=dev)
    B, H, R = q_lat.shape
    P = q_pe.shape[2]
    if q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} must be [B={B}, H={H}, P]")
    if ckv.shape[0] != B or ckv.shape[2] != R:
        raise ValueError(f"ckv {tuple(ckv.shape)} must be [B={B}, Lmax, R={R}]")
    if kpe.shape != (B, ckv.shape[1], P):
        raise ValueError(f"kpe {tuple(kpe.shape)} must be [B={B}, Lmax={ckv.shape[1]}, P={P}]")
    if block_idx.shape[:2] != (B, 1):
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B={B}, 1, K]")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, batch is {B}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive float (the module's scaling), got {scale!r}")


def sparse_mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    block_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    chunk_size: int = 128,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    _check(q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size, scale)
    if use_triton(backend, q_lat, q_pe, ckv, kpe, block_idx, seq_lens):
        from kvcomp.ops.sparse_mla_decode.kernels import sparse_mla_decode_triton

        with device_guard(q_lat):
            return sparse_mla_decode_triton(
                q_lat, q_pe, ckv, kpe, block_idx, seq_lens.contiguous(), chunk_size, float(scale)
            )
    return sparse_mla_decode_ref(q_lat, q_pe, ckv, kpe, block_idx, seq_lens, chunk_size, float(scale))
