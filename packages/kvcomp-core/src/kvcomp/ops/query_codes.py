"""Query codes for a decode step: how a kv-head's G query heads become the codes that
``hamming_topk`` scores against the key codes.

    q_codes = encode_query(q, kv_weight, mode="sum")
        q          [B, Hq, D]         float, post-RoPE decode queries (one token per sequence),
                   or [B, Hq, T, D]   T queries per sequence (a speculative-decoding verify step):
                                      the group of a kv-head is then its G x T (head, query)
                                      rows, head-major, and "sum" returns [B, Hq * T, W]
        kv_weight  [Hkv, D, BITS]     the layer's per-kv-head hash projections
        mode
          "sum"      (exact, the paper's):  every query head hashed with its kv-head's W
                     (``hash_encode(enable_gqa=True)``: W read once per kv-head, not expanded)
                     -> int32 [B, Hq, W]; hamming_topk sums BITS - 2*Ham over the group
          "majority": bit b = sign of the group's summed ±1 signs (ties -> 0)
                     -> int32 [B, Hkv, W]; one code per kv-head (G = 1 for hamming_topk)
          "mean":    the group's queries averaged, then hashed -> int32 [B, Hkv, W]

"majority" and "mean" cost one popcount per word in the scan instead of G, at some recall:
measure (kvcomp eval) before choosing them.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import pack_bits
from kvcomp.ops.hash_encode import hash_encode
from kvcomp.ops.hash_encode.reference import project

QUERY_MODES = ("sum", "majority", "mean")


def encode_query(
    q: torch.Tensor,
    kv_weight: torch.Tensor,
    mode: str = "sum",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [B, Hq, D] or [B, Hq, T, D], got shape {tuple(q.shape)}")
    if kv_weight.dim() != 3:
        raise ValueError(f"kv_weight must be [Hkv, D, BITS], got shape {tuple(kv_weight.shape)}")
    if mode not in QUERY_MODES:
        raise ValueError(f"query aggregation mode must be one of {QUERY_MODES}, got {mode!r}")
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    T = q.shape[2] if q.dim() == 4 else 1
    Hkv = kv_weight.shape[0]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv-heads ({Hkv})")
    G = Hq // Hkv * T  # rows of a kv-head's group
    if mode == "sum":
        return hash_encode(q, kv_weight, enable_gqa=True, backend=backend).reshape(B, Hq * T, -1)
    if mode == "mean":
        qm = q.float().reshape(B, Hkv, G, D).mean(2).to(q.dtype)
        return hash_encode(qm, kv_weight, backend=backend)
    # majority: per-bit vote of the group's signs
    # a kv-head's G (head, query) rows against its own projection (no per-head copy of W)
    signs = project(q.reshape(B, Hkv, G, D), kv_weight) > 0  # [B, Hkv, G, BITS]
    votes = signs.sum(2) * 2 - G  # positive where most heads say 1
    return pack_bits(votes > 0)


def lse_query_scale(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """float32 [B, Hkv]: the mean query norm of each kv-head's group over sqrt(D), the query's
    part of ``hamming_topk(chunk_repre="lse")``'s logit estimates (``q_scale=``); over the G x T
    rows for q [B, Hq, T, D]."""
    B, D = q.shape[0], q.shape[-1]
    return q.float().norm(dim=-1).reshape(B, num_kv_heads, -1).mean(-1) * (1.0 / D**0.5)
