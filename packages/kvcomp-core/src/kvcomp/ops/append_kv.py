"""``append_kv``: a static cache's append (keys, values and key codes) as one kernel.

    append_kv(k, v, k_buf, v_buf, positions, *, codes=None, weight=None, bias=None)
        k, v        [B, H, T, D / Dv]   new keys / values (any strides; Dv may differ from D,
                                        as the MLA latent / rope parts do)
        k_buf, v_buf [B, H, Lmax, D / Dv] the caches (last dim contiguous), written at rows
                                        positions[b] + t; positions[b] + T <= Lmax is required
        positions   [B] int             first row of each sequence's new tokens
        codes       [B, H, Lmax, W]     optional int32 code cache: the codes of k go to the same
                                        rows, exactly ``hash_encode(k, weight, bias=bias,
                                        out=codes, positions=positions)``

A decode step (T <= ``ROW_KERNEL_MAX_ROWS``) on CUDA runs one launch (``hash_encode``'s one-row
kernel, which also stores the key and value rows) where the cache ran three (two
``index_copy_`` and the encode); longer inputs (prefill) take the copies and ``hash_encode``.
The reference is the same writes in torch. Nothing reads a length on the host: graph-safe.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor, device_guard, use_triton
from kvcomp.ops.hash_encode import _check, hash_encode

__all__ = ["append_kv", "append_kv_ref"]


def append_kv_ref(k, v, k_buf, v_buf, positions, *, codes=None, weight=None, bias=None):
    """The writes of ``append_kv`` in torch (one index_put per cache)."""
    B, H, T, D = k.shape
    rows = positions.to(torch.long).view(B, 1) + torch.arange(T, device=k.device)  # [B, T]
    b = torch.arange(B, device=k.device).view(B, 1)
    k_buf.permute(0, 2, 1, 3).index_put_((b, rows), k.permute(0, 2, 1, 3).to(k_buf.dtype))
    v_buf.permute(0, 2, 1, 3).index_put_((b, rows), v.permute(0, 2, 1, 3).to(v_buf.dtype))
    if codes is not None:
        hash_encode(k, weight, bias=bias, out=codes, positions=positions, backend="reference")


def append_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
              positions: torch.Tensor, *, codes: torch.Tensor | None = None,
              weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              backend: str = "auto") -> None:
    """Write k / v (and the codes of k) into the caches (module doc)."""
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=k.device)
    check_tensor("k_buf", k_buf, ndim=4, dtypes=(k.dtype,), device=k.device)
    check_tensor("v_buf", v_buf, ndim=4, dtypes=(v.dtype,), device=k.device)
    check_tensor("positions", positions, ndim=1, dtypes=INT_DTYPES, device=k.device)
    B, H, T, D = k.shape
    if (v.shape[:3] != k.shape[:3] or k_buf.shape[:2] != (B, H) or k_buf.shape[3] != D
            or v_buf.shape[:3] != k_buf.shape[:3] or v_buf.shape[3] != v.shape[3] or positions.shape[0] != B):
        raise ValueError(f"append_kv: k / v {tuple(k.shape)} and {tuple(v.shape)} must be [B, H, T, D / Dv], "
                         f"k_buf / v_buf {tuple(k_buf.shape)} and {tuple(v_buf.shape)} [B, H, Lmax, D / Dv], "
                         f"positions {tuple(positions.shape)} [B]")
    if (codes is None) != (weight is None):
        raise ValueError("append_kv: pass both codes= and weight= (or neither)")
    if codes is not None:
        check_tensor("codes", codes, ndim=4, dtypes=(torch.int32,), device=k.device)
        if codes.shape[:3] != k_buf.shape[:3]:
            raise ValueError(f"codes {tuple(codes.shape)} must be [B, H, Lmax, W] for k_buf {tuple(k_buf.shape)}")
    extra = [t for t in (codes, weight, bias) if t is not None]
    kernel = (use_triton(backend, k, v, k_buf, v_buf, *extra)
              and k_buf.stride(3) == 1 and v_buf.stride(3) == 1)
    if kernel:  # (Triton is optional: imported only when its kernels run)
        from kvcomp.ops.hash_encode.kernels import ROW_KERNEL_MAX_ROWS, append_kv_triton

        kernel = T <= ROW_KERNEL_MAX_ROWS
    if not kernel:
        if codes is not None:  # validates weight / bias as hash_encode does
            hash_encode(k, weight, bias=bias, out=codes, positions=positions, backend=backend)
        append_kv_ref(k, v, k_buf, v_buf, positions)
        return
    if codes is not None:
        _check(k, weight, bias)
        if codes.shape[3] * 32 != weight.shape[-1]:
            raise ValueError(f"codes have {codes.shape[3]} words, weight {tuple(weight.shape)} gives "
                             f"{weight.shape[-1] // 32}")
    with device_guard(k):
        append_kv_triton(k, v, k_buf, v_buf, positions.contiguous(), weight, codes, bias)
