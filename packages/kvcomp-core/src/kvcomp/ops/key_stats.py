"""What the cache stores for centred, norm-weighted block selection (issue 8).

Hashing the centred key ``k - mu`` (mu: the mean key of the layer and kv-head) and weighting each
token's integer group score by ``||k - mu||`` brings the hash selection closer to the oracle
(docs/results/smollm2.md). ``q . (k - mu)`` ranks the keys of one query exactly as ``q . k``
does, so centring changes the estimate, not the target. These helpers compute the three things
that takes, in pure torch (they run once per prefill / appended token, beside the codes):

    mu    = key_mean(k, seq_lens)
        k         [B, Hkv, L, D]   float16 / bfloat16 / float32, rows t >= seq_lens[b] ignored
        seq_lens  [B]              int32 / int64
        mu        [B, Hkv, D]      float32, the mean of each sequence's real rows per kv-head
                                   (a sequence of length 0 gets zeros)

    bias  = hash_bias(mu, weight)
        mu        [Hkv, D] (one mean per kv-head, e.g. from calibration) or [B, Hkv, D]
        weight    [Hkv, D, BITS]   per-kv-head projections, or [D, BITS] shared
        bias      [Hkv, BITS] or [B, Hkv, BITS] float32 = mu @ W (fp32 products):
                  ``hash_encode(k, weight, bias=bias)`` is then the code of ``k - mu``

    norms = key_norms(k, mu=None)
        k         [B, Hkv, T, D]   float16 / bfloat16 / float32
        mu        None (raw norms), [Hkv, D] or [B, Hkv, D]
        norms     [B, Hkv, T]      float16: ``||k - mu||`` computed in fp32 (difference, sum of
                  squares, sqrt), rounded to nearest fp16; values above the fp16 maximum
                  saturate at 65504 instead of becoming inf. Pass as ``hamming_topk(k_scale=)``.

    key_norms(k, mu, out=norm_cache, positions=pos)
        writes the norms of k [B, Hkv, T, D] into out [B, Hkv, Lmax] (float16) at rows
        pos[b] + t (pos [B] int; every row must be < Lmax) and returns out: the append path.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, INT_DTYPES, check_tensor

__all__ = ["key_mean", "hash_bias", "key_norms", "FP16_MAX"]

FP16_MAX = 65504.0


def key_mean(k: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """fp32 [B, Hkv, D] mean of k [B, Hkv, L, D] over rows t < seq_lens[b] (see the module doc)."""
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, device=k.device)
    B, _, L, _ = k.shape
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, k has batch {B}")
    lens = seq_lens.to(torch.long).clamp(min=0, max=L)
    valid = torch.arange(L, device=k.device).view(1, L) < lens.view(B, 1)  # [B, L]
    kf = k.float().masked_fill(~valid.view(B, 1, L, 1), 0.0)  # padding rows may hold anything
    total = kf.sum(2)  # [B, Hkv, D]
    return total / lens.clamp(min=1).to(torch.float32).view(B, 1, 1)


def _check_mu(mu: torch.Tensor, hkv: int, d: int, device, batch: int | None) -> None:
    check_tensor("mu", mu, dtypes=FLOAT_DTYPES, device=device)
    ok = (mu.dim() == 2 and tuple(mu.shape) == (hkv, d)) or (
        mu.dim() == 3 and mu.shape[1:] == (hkv, d) and (batch is None or mu.shape[0] == batch)
    )
    if not ok:
        lead = "B, " if batch is None else f"B={batch}, "
        raise ValueError(
            f"mu must be [Hkv, D] = ({hkv}, {d}) or [{lead}Hkv, D], got shape {tuple(mu.shape)}"
        )


def hash_bias(mu: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``mu @ W`` per kv-head: [Hkv, BITS] or [B, Hkv, BITS] (see the module doc)."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be [D, BITS] or [Hkv, D, BITS], got shape {tuple(weight.shape)}")
    check_tensor("mu", mu, dtypes=FLOAT_DTYPES, device=weight.device)
    if mu.dim() not in (2, 3):
        raise ValueError(f"mu must be [Hkv, D] or [B, Hkv, D], got shape {tuple(mu.shape)}")
    if weight.dim() == 3:
        _check_mu(mu, weight.shape[0], weight.shape[1], weight.device, None)
    elif mu.shape[-1] != weight.shape[0]:
        raise ValueError(f"mu {tuple(mu.shape)} last dim != weight head_dim {weight.shape[0]}")
    mf, wf = mu.float(), weight.float()
    if wf.dim() == 2:
        return (mf @ wf).contiguous()
    if mf.dim() == 2:
        return torch.einsum("hd,hdk->hk", mf, wf).contiguous()
    return torch.einsum("bhd,hdk->bhk", mf, wf).contiguous()


def key_norms(
    k: torch.Tensor,
    mu: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp16 [B, Hkv, T] ``||k - mu||`` of k [B, Hkv, T, D], or written into ``out`` at
    ``positions`` (see the module doc)."""
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, T, D = k.shape
    if mu is not None:
        _check_mu(mu, H, D, k.device, B)
    if (out is None) != (positions is None):
        raise ValueError("key_norms: pass both out= and positions= (or neither)")
    kf = k.float()
    if mu is not None:
        mf = mu.float()
        kf = kf - (mf.view(1, H, 1, D) if mf.dim() == 2 else mf.view(B, H, 1, D))
    norms = kf.square().sum(-1).sqrt().clamp(max=FP16_MAX).to(torch.float16)  # [B, H, T]
    if out is None:
        return norms
    check_tensor("out", out, ndim=3, dtypes=(torch.float16,), device=k.device)
    check_tensor("positions", positions, ndim=1, dtypes=INT_DTYPES, device=k.device)
    if tuple(out.shape[:2]) != (B, H):
        raise ValueError(f"out {tuple(out.shape)} must be [B, Hkv, Lmax] with B, Hkv = {B}, {H}")
    if positions.shape[0] != B:
        raise ValueError(f"positions has {positions.shape[0]} entries, batch is {B}")
    rows = positions.to(torch.long).view(B, 1, 1) + torch.arange(T, device=k.device).view(1, 1, T)
    out.scatter_(2, rows.expand(B, H, T), norms)
    return out
