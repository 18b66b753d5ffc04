"""The HATA hash-training loss (ALGORITHM.md section 2), with the paper's names.

Relaxed hash: ``h(x) = 2 * sigmoid(sigma * x @ W) - 1`` in (-1, 1) (sign(x @ W) as sigma grows).

    L = eps    * similarity     sum_ij s_ij * ||h(q_i) - h(k_j)||^2 / n_pairs
      + eta    * balance        ||mean_j h(k_j)||^2
      + lambda * decorrelation  ||W^T W - I||_F

Defaults eps 0.01, eta 2, lambda 1 as in the paper (its reference code swaps the names of eta
and lambda; these are the paper's). Normalization (ours, the paper writes plain sums): the
similarity sum is divided by the number of pairs (s_ij != 0) and the balance term uses the
mean code instead of the sum, so that the weights mean the same for any batch size or document
length and SGD at lr 0.1 is stable. ``s_ij`` > 0 pulls a pair together (positives, 20 -> 1),
< 0 pushes it apart (negatives, -1), 0 ignores it (keys after the query).

With BITS > D (e.g. 128 bits of a 64-d head) ``W^T W`` has rank D and cannot reach I; the term
then keeps W a partial isometry (its D singular values near 1), which is what the random
orthogonal initialisation already is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossWeights:
    eps: float = 0.01  # similarity
    eta: float = 2.0  # bit balance
    lam: float = 1.0  # decorrelation
    sigma: float = 0.1  # relaxation sharpness
    # "distance": the paper's ||h(q) - h(k)||^2; "inner": only its cross term -2 h(q).h(k)
    # (equal up to a constant for binary codes, where ||h||^2 = BITS; without the norm terms the
    # relaxed loss cannot lower itself by shrinking or saturating codes instead of ranking keys)
    similarity: str = "distance"


def relaxed_hash(x: torch.Tensor, W: torch.Tensor, sigma: float) -> torch.Tensor:
    """x [..., N, D], W [..., D, BITS] -> [..., N, BITS] in (-1, 1)."""
    return 2.0 * torch.sigmoid(sigma * (x @ W)) - 1.0


def similarity_term(hq: torch.Tensor, hk: torch.Tensor, S: torch.Tensor, form: str = "distance") -> torch.Tensor:
    """sum_ij S_ij ||hq_i - hk_j||^2 / #(S_ij != 0) per batch entry ("distance"), or only the
    cross term sum_ij S_ij (-2 hq_i . hk_j) / #pairs ("inner").

    hq [..., N, BITS], hk [..., M, BITS], S [..., N, M] -> [...] (no N x M x BITS tensor:
    ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b)."""
    if form not in ("distance", "inner"):
        raise ValueError(f"similarity form must be 'distance' or 'inner', got {form!r}")
    cross = hq @ hk.transpose(-1, -2)  # [..., N, M]
    total = -2.0 * (S * cross).sum((-1, -2))
    if form == "distance":
        qq = (hq * hq).sum(-1)  # [..., N]
        kk = (hk * hk).sum(-1)  # [..., M]
        total = total + (S.sum(-1) * qq).sum(-1) + (S.sum(-2) * kk).sum(-1)
    n_pairs = (S != 0).sum((-1, -2)).clamp(min=1)
    return total / n_pairs


def balance_term(hk: torch.Tensor) -> torch.Tensor:
    """||mean_j hk_j||^2: zero when every bit is +1 and -1 equally often. [..., M, BITS] -> [...]."""
    return hk.mean(-2).pow(2).sum(-1)


def decorrelation_term(W: torch.Tensor) -> torch.Tensor:
    """||W^T W - I||_F per projection. W [..., D, BITS] -> [...]."""
    bits = W.shape[-1]
    eye = torch.eye(bits, dtype=W.dtype, device=W.device)
    return (W.transpose(-1, -2) @ W - eye).pow(2).sum((-1, -2)).sqrt()


def hata_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    S: torch.Tensor,
    W: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The HATA loss summed over independent projections.

    q [P, N, D] queries, k [P, M, D] keys, S [P, N, M] labels, W [P, D, BITS] (P projections
    trained together; their losses add, so their gradients stay independent). Returns the scalar
    loss and its three parts (floats, summed over P) for logging."""
    hq = relaxed_hash(q, W, weights.sigma)
    hk = relaxed_hash(k, W, weights.sigma)
    sim = similarity_term(hq, hk, S, weights.similarity)
    bal = balance_term(hk)
    dec = decorrelation_term(W)
    loss = (weights.eps * sim + weights.eta * bal + weights.lam * dec).sum()
    parts = {"similarity": float(sim.detach().sum()), "balance": float(bal.detach().sum()),
             "decorrelation": float(dec.detach().sum())}
    return loss, parts
