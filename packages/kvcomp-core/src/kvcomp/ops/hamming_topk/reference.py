"""Reference Hamming scoring, block reduction and top-k selection. Pure torch, exact.

Definitions (the one source of truth every kernel is tested against):

* token score  s[b, h, t] = sum over the G query heads g of kv-head h of (BITS - 2 * popc(q_g ^ k_t))
  (int32, exact; G = Hq // Hkv, query head j belongs to kv-head j // G)
  with k_scale [B, Hkv, L] (per-token weights, e.g. the key norms ||k - mu||):
  s[b, h, t] = float32(s) * float32(k_scale[b, h, t]), ONE fp32 multiply (so every backend gets
  the same bits), -0.0 read as +0.0
* block score  "max":  max of s over the block's valid tokens (t < seq_lens[b]), int32 (float32
                       with k_scale)
               "mean": float32(sum of s over valid tokens) / float32(count of valid tokens)
                       (int scores only: a float sum depends on the summation order)
               "lse":  log-sum-exp over the valid tokens of the logit estimates (``lse_logits_ref``)
                       x = sin(float32(s) * float32(pi / (2 S))) * k_scale * q_scale[b, h]
                       (S = G * BITS, the score's range: (BITS - 2 Ham) / BITS estimates
                       1 - 2 angle / pi, so the sine inverts SimHash's collision probability
                       into cos(angle); k_scale = ||k - mu|| (1 without it) and q_scale the
                       group's mean ||q|| / sqrt(D) (``kvcomp.ops.query_codes.lse_query_scale``)
                       make it q . (k - mu) / sqrt(D)): the log of the block's estimated
                       attention mass, computed in float64 here; kernels agree up to rounding
                       (their selection may differ only between blocks whose scores are that close)
* selection    per (b, h) with n = ceil(seq_lens[b] / chunk_size) real blocks:
               must-select blocks first (entries m of must_select with -n <= m < n, m % n),
               then the best-scoring other blocks; among equal scores the lower block index wins;
               count = min(n, max(k_blocks[b], #must-select)), at most K (the output width)
* output       int32 [B, Hkv, K], the selected block indices ascending, then -1 padding
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import word_popcounts


def token_scores_ref(
    q_codes: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """q_codes [B, Hq, W], k_codes [B, Hkv, L, W] -> int32 [B, Hkv, L] group-summed scores;
    with k_scale [B, Hkv, L] (float) -> float32 [B, Hkv, L], each score times its token's weight."""
    B, Hq, W = q_codes.shape
    Hkv, L = k_codes.shape[1], k_codes.shape[2]
    G = Hq // Hkv
    bits = 32 * W
    q = q_codes.view(B, Hkv, 1, G, W)
    k = k_codes.unsqueeze(3)  # [B, Hkv, L, 1, W]
    # sum over g of (bits - 2 popc(q_g ^ k)) = G bits - 2 (popcounts of a token's G x W words)
    ham = word_popcounts(torch.bitwise_xor(k, q)).view(B, Hkv, L, G * W).sum(-1, dtype=torch.int32)
    s = G * bits - 2 * ham
    if k_scale is None:
        return s
    prod = s.to(torch.float32) * k_scale.to(torch.float32)
    return torch.where(prod == 0, torch.zeros_like(prod), prod)  # -0.0 -> +0.0


def lse_logits_ref(scores: torch.Tensor, score_range: int, q_scale: torch.Tensor,
                   k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """int32 group scores [B, Hkv, L] -> float32 logit estimates for chunk_repre="lse" (module
    docstring): sin(float32(s) * float32(pi / (2 * score_range))) * k_scale * q_scale, in that
    order; q_scale float32 [B, Hkv], k_scale [B, Hkv, L] or None."""
    c = torch.tensor(torch.pi / (2 * score_range), dtype=torch.float32)
    x = torch.sin(scores.to(torch.float32) * c)
    if k_scale is not None:
        x = x * k_scale.to(torch.float32)
    return x * q_scale.to(torch.float32).unsqueeze(-1)


def block_scores_ref(
    token_scores: torch.Tensor, seq_lens: torch.Tensor, chunk_size: int, chunk_repre: str
) -> torch.Tensor:
    """int32 or float32 [B, Hkv, L] -> float64 [B, Hkv, NB] (NB = ceil(L / chunk)); -inf for
    empty blocks. float64 holds int32 and float32 scores exactly. "mean" takes int32 scores only."""
    B, H, L = token_scores.shape
    nb = -(-L // chunk_size)
    pad = nb * chunk_size - L
    t = torch.arange(nb * chunk_size, device=token_scores.device)
    valid = t.view(1, -1) < seq_lens.to(torch.long).view(-1, 1)  # [B, NB*C]
    valid = valid.view(B, 1, nb, chunk_size)
    s = torch.nn.functional.pad(token_scores, (0, pad)).view(B, H, nb, chunk_size)
    if chunk_repre == "max" and s.is_floating_point():
        out = s.to(torch.float64).masked_fill(~valid, float("-inf")).max(-1).values
    elif chunk_repre == "max":
        s = s.to(torch.int64).masked_fill(~valid, -(2**62))
        out = s.max(-1).values.to(torch.float64)
    elif chunk_repre == "mean" and s.is_floating_point():
        raise ValueError("chunk_repre='mean' needs int32 token scores (no k_scale): a float sum "
                         "depends on the summation order")
    elif chunk_repre == "mean":
        total = (s.to(torch.int64) * valid).sum(-1)
        count = valid.sum(-1).expand(B, H, nb)
        out = (total.to(torch.float32) / count.clamp(min=1).to(torch.float32)).to(torch.float64)
    elif chunk_repre == "lse":  # token logits (scores times lse_query_scale): log of the block's mass
        out = torch.logsumexp(s.to(torch.float64).masked_fill(~valid, float("-inf")), -1)
    else:
        raise ValueError(f"chunk_repre must be 'max', 'mean' or 'lse', got {chunk_repre!r}")
    empty = ~valid.any(-1).expand(B, H, nb)
    return out.masked_fill(empty, float("-inf"))


def select_blocks_ref(
    block_scores: torch.Tensor,
    seq_lens: torch.Tensor,
    k_blocks: torch.Tensor,
    K: int,
    chunk_size: int,
    must_select: tuple[int, ...],
) -> torch.Tensor:
    """float64 [B, H, NB] scores -> int32 [B, H, K] selection (see module docstring)."""
    B, H, NB = block_scores.shape
    dev = block_scores.device
    n = (seq_lens.to(torch.long) + chunk_size - 1) // chunk_size  # [B]
    idx = torch.arange(NB, device=dev)
    must = torch.zeros(B, NB, dtype=torch.bool, device=dev)
    for m in must_select:
        pos = n + m if m < 0 else torch.full_like(n, m)  # no host tensor: graph-capturable
        ok = (pos >= 0) & (pos < n)
        must |= ok.view(B, 1) & (idx.view(1, NB) == pos.view(B, 1))
    n_must = must.sum(-1)  # [B]
    count = torch.minimum(n, torch.maximum(k_blocks.to(torch.long), n_must)).clamp(max=K)
    key = block_scores.masked_fill(must.view(B, 1, NB), float("inf"))
    key = key.masked_fill((idx.view(1, NB) >= n.view(B, 1)).view(B, 1, NB), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # ties: lower index
    width = min(K, NB)
    chosen = order[..., :width]
    keep = torch.arange(width, device=dev).view(1, 1, width) < count.view(B, 1, 1)
    big = torch.iinfo(torch.int64).max
    chosen = torch.where(keep, chosen, torch.full_like(chosen, big)).sort(-1).values
    chosen = torch.where(chosen == big, torch.full_like(chosen, -1), chosen)
    out = torch.full((B, H, K), -1, dtype=torch.int32, device=dev)
    out[..., :width] = chosen.to(torch.int32)
    return out


def hamming_topk_ref(
    q_codes: torch.Tensor,
    k_codes: torch.Tensor,
    seq_lens: torch.Tensor,
    k_blocks: torch.Tensor,
    K: int,
    chunk_size: int,
    must_select: tuple[int, ...],
    chunk_repre: str,
    k_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    if chunk_repre == "lse":
        rows = q_codes.shape[1] // k_codes.shape[1]
        s = lse_logits_ref(token_scores_ref(q_codes, k_codes), rows * 32 * q_codes.shape[2], q_scale, k_scale)
    else:
        s = token_scores_ref(q_codes, k_codes, k_scale)
    bs = block_scores_ref(s, seq_lens, chunk_size, chunk_repre)
    return select_blocks_ref(bs, seq_lens, k_blocks, K, chunk_size, must_select)
