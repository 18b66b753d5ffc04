"""Block selection for many decode positions at once, as a decode step would make it.

A window of N consecutive query positions of one sequence is treated as a batch of N decode
steps: position t sees the keys 0..t (``seq_lens = t + 1``), and each step selects its own
blocks. The selection is kvcomp's, bit for bit:

* hash: key codes from ``kvcomp.ops.hash_encode``, query codes from
  ``kvcomp.ops.query_codes.encode_query`` (mode sum / majority / mean), then the selection of
  ``kvcomp.ops.hamming_topk`` (its reference block scoring and top-k with must-select).
  The token scores are computed through the identity
  ``sum_g (BITS - 2 * Ham(q_g, k)) = <sum_g s(q_g), s(k)>`` (s in {-1, +1}) as one fp32 matrix
  product, exact (|score| <= G * BITS < 2**24), instead of materialising N copies of the key
  codes for the op: ``tests/core/test_eval.py`` checks ``torch.equal`` against
  ``hamming_topk`` itself.
* oracle: the blocks with the largest true attention mass (softmax probabilities summed over
  the kv-head's query heads and the block's tokens), with the same must-select blocks and the
  same count, so that "oracle at 10%" and "hash at 10%" attend the same number of blocks.

Block count per step: ``k = ceil(ratio * ceil((t + 1) / chunk))`` (at least the must-select
blocks, at most all), as ``kvcomp.policy.LayerPolicy.k_blocks``.
"""

from __future__ import annotations

import math

import torch

from kvcomp.ops._blocks import selected_token_mask
from kvcomp.ops._common import unpack_bits
from kvcomp.ops.hamming_topk.reference import block_scores_ref, select_blocks_ref


def k_blocks_for(seq_lens: torch.Tensor, ratio: float, chunk_size: int) -> torch.Tensor:
    """[N] int64 blocks to select for sequences of ``seq_lens`` tokens at ``ratio``."""
    n = (seq_lens.to(torch.long) + chunk_size - 1) // chunk_size
    if ratio >= 1.0:
        return n
    k = torch.tensor([math.ceil(ratio * int(v)) for v in n.tolist()], dtype=torch.long)
    return k.to(seq_lens.device)


def max_k(seq_lens: torch.Tensor, ratio: float, chunk_size: int, must_select) -> int:
    return max(int(k_blocks_for(seq_lens, ratio, chunk_size).max()), len(set(must_select)), 1)


def scale_scores(scores: torch.Tensor, k_norms: torch.Tensor | None) -> torch.Tensor:
    """int32 [N, Hkv, L] scores times fp16 [Hkv, L] norms (one fp32 multiply), or unchanged."""
    if k_norms is None:
        return scores
    return scores.to(torch.float32) * k_norms.to(torch.float32).unsqueeze(0)


def lse_logits(scores: torch.Tensor, q: torch.Tensor, rows: int, bits: int,
               k_norms: torch.Tensor | None) -> torch.Tensor:
    """int32 [N, Hkv, L] group scores of ``rows`` query codes per kv-head -> float32 logit
    estimates of ``hamming_topk(chunk_repre="lse")`` (q [N, Hq, D] post-RoPE queries, k_norms
    [Hkv, L] or None)."""
    from kvcomp.ops.hamming_topk.reference import lse_logits_ref
    from kvcomp.ops.query_codes import lse_query_scale

    return lse_logits_ref(scores, rows * bits, lse_query_scale(q, scores.shape[1]), k_norms)


def code_token_scores(q_codes: torch.Tensor, k_codes: torch.Tensor) -> torch.Tensor:
    """q_codes [N, Hc, W] (Hc a multiple of Hkv), k_codes [Hkv, L, W] -> int32 [N, Hkv, L]:
    the group-summed ``BITS - 2 * Hamming`` of ``hamming_topk``, for each of N query rows
    against one shared key-code cache."""
    N, Hc, W = q_codes.shape
    Hkv = k_codes.shape[0]
    sq = unpack_bits(q_codes).to(torch.float32) * 2 - 1  # [N, Hc, BITS]
    sq = sq.view(N, Hkv, Hc // Hkv, 32 * W).sum(2)  # [N, Hkv, BITS]
    sk = unpack_bits(k_codes).to(torch.float32) * 2 - 1  # [Hkv, L, BITS]
    return torch.einsum("nhb,hlb->nhl", sq, sk).round().to(torch.int32)


def select_from_token_scores(
    token_scores: torch.Tensor,
    seq_lens: torch.Tensor,
    ratio: float,
    *,
    chunk_size: int,
    must_select=(0, -2, -1),
    chunk_repre: str = "max",
) -> torch.Tensor:
    """int32 [N, Hkv, L] token scores -> int32 [N, Hkv, K] block indices (hamming_topk's rule)."""
    kb = k_blocks_for(seq_lens, ratio, chunk_size)
    K = max(int(kb.max()), len(set(must_select)), 1)
    bs = block_scores_ref(token_scores, seq_lens, chunk_size, chunk_repre)
    return select_blocks_ref(bs, seq_lens, kb, K, chunk_size, tuple(must_select))


def select_from_block_scores(
    block_scores: torch.Tensor,
    seq_lens: torch.Tensor,
    ratio: float,
    *,
    chunk_size: int,
    must_select=(0, -2, -1),
) -> torch.Tensor:
    """float [N, Hkv, NB] block scores (e.g. attention mass) -> int32 [N, Hkv, K]."""
    kb = k_blocks_for(seq_lens, ratio, chunk_size)
    K = max(int(kb.max()), len(set(must_select)), 1)
    n = (seq_lens.to(torch.long) + chunk_size - 1) // chunk_size
    nb = block_scores.shape[-1]
    real = torch.arange(nb, device=block_scores.device).view(1, 1, nb) < n.view(-1, 1, 1)
    bs = block_scores.to(torch.float64).masked_fill(~real, float("-inf"))
    return select_blocks_ref(bs, seq_lens, kb, K, chunk_size, tuple(must_select))


def block_mass(probs: torch.Tensor, num_kv_heads: int, chunk_size: int) -> torch.Tensor:
    """probs [N, Hq, L] (softmax rows) -> float32 [N, Hkv, NB]: attention mass per block,
    summed over each kv-head's query heads."""
    N, Hq, L = probs.shape
    g = probs.view(N, num_kv_heads, Hq // num_kv_heads, L).sum(2)  # [N, Hkv, L]
    nb = -(-L // chunk_size)
    g = torch.nn.functional.pad(g, (0, nb * chunk_size - L))
    return g.view(N, num_kv_heads, nb, chunk_size).sum(-1)


def key_codes(k: torch.Tensor, kv_weight: torch.Tensor, token_score: str = "hamming",
              prefix_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The key side of a selection, as the kvcomp cache stores it: k [Hkv, L, D] (fp32),
    kv_weight [Hkv, D, BITS] -> (codes int32 [Hkv, L, W], norms fp16 [Hkv, L] or None).
    ``token_score="centered_norm"``: codes of ``k - mu`` and ``||k - mu||``, mu = the mean of
    the first ``prefix_len`` keys (the prefill, as the cache's first update) per kv-head."""
    from kvcomp.ops.hash_encode import hash_encode
    from kvcomp.ops.key_stats import hash_bias, key_norms

    if token_score == "hamming":
        return hash_encode(k.unsqueeze(0), kv_weight)[0], None
    if token_score != "centered_norm":
        raise ValueError(f"token_score must be 'hamming' or 'centered_norm', got {token_score!r}")
    if not prefix_len:
        raise ValueError("token_score 'centered_norm' needs the prefill length (prefix_len >= 1)")
    mu = k[:, :prefix_len].float().mean(1)  # [Hkv, D]
    codes = hash_encode(k.unsqueeze(0), kv_weight, bias=hash_bias(mu, kv_weight))[0]
    return codes, key_norms(k.unsqueeze(0), mu)[0]


def hash_select(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    kv_weight: torch.Tensor,
    seq_lens: torch.Tensor,
    ratio: float,
    *,
    chunk_size: int,
    must_select=(0, -2, -1),
    chunk_repre: str = "max",
    query_mode: str = "sum",
    k_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hash selection of N decode positions: q [N, Hq, D] post-RoPE queries, k_codes
    [Hkv, L, W] the key codes, kv_weight [Hkv, D, BITS] -> int32 [N, Hkv, K]. ``k_norms``
    [Hkv, L] (``key_codes``): token scores are ``float32(score) * float32(norm)``, as
    ``hamming_topk(k_scale=)``. ``chunk_repre="lse"``: the scores become logit estimates
    (``lse_logits``) and a block scores their log-sum-exp."""
    from kvcomp.ops.query_codes import encode_query

    q_codes = encode_query(q.contiguous(), kv_weight, query_mode)
    raw = code_token_scores(q_codes, k_codes)
    if chunk_repre == "lse":
        scores = lse_logits(raw, q, q_codes.shape[1] // k_codes.shape[0], kv_weight.shape[-1], k_norms)
    else:
        scores = scale_scores(raw, k_norms)
    return select_from_token_scores(scores, seq_lens, ratio, chunk_size=chunk_size,
                                    must_select=must_select, chunk_repre=chunk_repre)


def token_mask(block_idx: torch.Tensor, seq_lens: torch.Tensor, L: int, chunk_size: int,
               num_q_heads: int) -> torch.Tensor:
    """int32 [N, Hkv, K] -> bool [N, Hq, L]: the tokens each query head attends to."""
    m = selected_token_mask(block_idx, seq_lens, L, chunk_size)  # [N, Hkv, L]
    return m.repeat_interleave(num_q_heads // m.shape[1], dim=1)
