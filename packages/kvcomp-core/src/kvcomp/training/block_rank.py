"""Block-rank hash training: fit each (layer, kv-head) projection so that kvcomp's
``token_score="centered_norm"`` selection ranks blocks as the true attention does.

The HATA loss scores token pairs; kvcomp selects blocks. This objective works at the level of
the selection. For a training query position t (sampled from the second half of a document,
as the HATA recipe does) of one kv-head's group of G query heads:

* target: the true attention mass of each block of ``chunk`` keys (softmax of ``q_g . k / sqrt(D)``
  over j <= t, averaged over the group), renormalised over the blocks that the selection ranks
  (those visible at t minus the must-select ones, which are always attended);
* relaxed score: ``centered_norm``'s token score ``||k - mu|| * sum_g <s(q_g W), s((k - mu) W)>``
  with ``s = sign`` relaxed to ``tanh(beta * x / std(x))`` (std over the batch per column, so
  beta is scale-free), mu the mean key of the document's first half (the "prefill"); the block
  score is a soft max of its tokens' scores (``tau * logsumexp(x / tau)``, kvcomp's
  ``chunk_repre="max"``), or with ``pool="lse"`` (for ``chunk_repre="lse"``) the log-sum-exp of
  the relaxed logit estimates ``sin(pi/2 s / (G B)) * ||k - mu|| * mean_g ||q_g|| / sqrt(D)``
  (s the relaxed group score above without the norm), as ``kvcomp.ops.hamming_topk`` ranks;
* loss (ListNet): cross-entropy between the target and ``softmax(block score / T)`` over the
  ranked blocks, T a learned temperature.

Adam from the given init (kvcomp's seeded random orthogonal weights), ``steps`` steps, each on
one document (in turn) with all its sampled queries and all its keys. The returned columns have
unit norm (signs do not depend on the scale). Deterministic for a seed on one device.

Parameterisations (``param``):

* ``"free"``: every entry of W [D, B] is fitted. A free projection of post-RoPE vectors is not
  RoPE-equivariant: it learns the phases of the slow RoPE frequencies at the positions it saw,
  and at other positions (e.g. SmolLM2's 8K context after fitting on 2K + 4K) it is worse than
  the random init.
* ``"rope-scale"``: W = S R with R = W0 fixed and S = diag(s) a per-RoPE-plane scale (the
  ``rotate_half`` layout of HF transformers: dims i and i + r/2 of the rotary part, r =
  ``rotary_dim``, share s_i; the dims past r each have their own), fitted as log s. S commutes
  with every RoPE rotation, so ``(x R_t) S = (x S) R_t`` and what is learned (a re-weighting of
  the frequency bands in the hash's angle: ``<q S, k S> = sum_i s_i^2 <q_i, k_i>``) holds at every
  position. D/2 numbers per (layer, kv-head). With ``free_planes = n > 0`` the n slowest planes
  (the last n of the rotary part, i in [r/2 - n, r/2)) get a free [2n, 2n] block of S on their
  dims instead of their scales: not equivariant, but these planes turn by little over the served
  context (SmolLM2, theta 1e5, D 64: plane i turns by ``8192 * 1e5^(-i/32)`` rad over 8K
  positions, below 1 rad for i >= 26, so n = 6), so what is learned there holds nearly everywhere.

Data: ``collect_groups`` captures post-RoPE q/k with ``kvcomp.training.collect.capture_qk`` and
keeps, per (layer, kv-head) and document, the group's queries at the sampled positions
``q [G, n, D]``, all keys ``k [T, D]`` and the positions ``t [n]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvcomp.training.collect import CapturedGQA, captured_documents

MUST_SELECT = (0, -2, -1)
PARAMS = ("free", "rope-scale")
POOLS = ("max", "lse")


@dataclass
class GroupSet:
    """One (layer, kv-head)'s training data, per document d: ``q[d]`` [G, n, D] float32 (the
    group's queries at the sampled positions), ``k[d]`` [T, D] float32, ``t[d]`` [n] int64."""

    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return len(self.q)


def collect_groups(
    model, documents: list[torch.Tensor], *, layers=None, n_queries: int = 256, seed: int = 0,
    progress: bool = False,
) -> dict[tuple[int, str], GroupSet]:
    """GroupSets keyed by (layer, ``"h{i}"``) over ``documents`` ([T] int64 token tensors; GQA
    models only). Query positions of document d come from the generator of
    ``collect_pairs`` (seeded with (seed, d)), the same for every layer."""
    out: dict[tuple[int, str], GroupSet] = {}
    for positions, captured in captured_documents(model, documents, layers=layers, n_queries=n_queries,
                                                  seed=seed, progress=progress):
        for layer, cap in captured.items():
            if not isinstance(cap, CapturedGQA):
                raise ValueError("the block-rank objective is for GQA models; this model is MLA")
            Hkv = cap.k.shape[0]
            G = cap.q.shape[0] // Hkv
            for h in range(Hkv):
                gs = out.setdefault((layer, f"h{h}"), GroupSet())
                gs.q.append(cap.q[h * G : (h + 1) * G, positions].contiguous())
                gs.k.append(cap.k[h].contiguous())
                gs.t.append(positions.clone())
    return out


def block_targets(q: torch.Tensor, k: torch.Tensor, t: torch.Tensor, chunk: int,
                  must_select=MUST_SELECT) -> tuple[torch.Tensor, torch.Tensor]:
    """q [P, G, n, D], k [P, T, D], t [n] -> (target [P, n, NB] float32: each row the true block
    mass renormalised over the ranked blocks, ranked [n, NB] bool: blocks visible at t that are
    not must-select)."""
    P, G, n, D = q.shape
    T = k.shape[1]
    nb = -(-T // chunk)
    s = torch.einsum("pgnd,ptd->pgnt", q, k) * D**-0.5
    s = s.masked_fill(torch.arange(T, device=k.device).view(1, 1, 1, T) > t.view(1, 1, n, 1), -math.inf)
    p = torch.softmax(s, -1).mean(1)  # [P, n, T]
    mass = torch.nn.functional.pad(p, (0, nb * chunk - T)).view(P, n, nb, chunk).sum(-1)
    nbt = (t + chunk) // chunk  # blocks visible at t
    ranked = torch.arange(nb, device=k.device).view(1, nb) < nbt.view(n, 1)
    rows = torch.arange(n, device=k.device)
    for m in must_select:
        ranked[rows, torch.full_like(t, m) if m >= 0 else (nbt + m).clamp(min=0)] = False
    target = mass * ranked
    return target / target.sum(-1, keepdim=True).clamp(min=1e-12), ranked


def relaxed_block_scores(W: torch.Tensor, q: torch.Tensor, kc: torch.Tensor, t: torch.Tensor,
                         chunk: int, beta: float, tau: float, pool: str = "max") -> torch.Tensor:
    """W [P, D, B], q [P, G, n, D], kc [P, T, D] (centred keys), t [n] -> [P, n, NB]: the soft
    block max of ``||kc|| * sum_g <tanh(beta q_g W / std), tanh(beta kc W / std)>``, scaled
    by 1 / (G * B * mean ||kc||) (so that tau is comparable across layers); ``pool="lse"``: the
    block log-sum-exp of the relaxed logit estimates (module docstring; tau unused)."""
    P, G, n, D = q.shape
    T = kc.shape[1]
    B = W.shape[-1]
    wn = W / W.norm(dim=1, keepdim=True)
    pq = torch.einsum("pgnd,pdb->pgnb", q, wn)
    pk = torch.einsum("ptd,pdb->ptb", kc, wn)
    sq = torch.tanh(beta * pq / pq.std(dim=(1, 2), keepdim=True).clamp(min=1e-12)).sum(1)
    sk = torch.tanh(beta * pk / pk.std(dim=1, keepdim=True).clamp(min=1e-12))
    norms = kc.norm(dim=-1)  # [P, T]
    raw = torch.einsum("pnb,ptb->pnt", sq, sk)  # relaxed group score, in [-G B, G B]
    nb = -(-T // chunk)
    future = torch.arange(T, device=kc.device).view(1, 1, T) > t.view(1, n, 1)
    if pool == "lse":
        qn = q.norm(dim=-1).mean(1) * D**-0.5  # [P, n]: the group's mean ||q|| / sqrt(D)
        x = torch.sin(raw * (math.pi / (2 * G * B))) * norms.unsqueeze(1) * qn.unsqueeze(-1)
        x = x.masked_fill(future, -1e4)
        x = torch.nn.functional.pad(x, (0, nb * chunk - T), value=-1e4).view(P, n, nb, chunk)
        return torch.logsumexp(x, -1)
    sc = raw * norms.unsqueeze(1) / (G * B * norms.mean(1).view(P, 1, 1))
    sc = sc.masked_fill(future, -1e4)
    sc = torch.nn.functional.pad(sc, (0, nb * chunk - T), value=-1e4).view(P, n, nb, chunk)
    return tau * torch.logsumexp(sc / tau, -1)


def block_rank_loss(block_scores: torch.Tensor, target: torch.Tensor, ranked: torch.Tensor,
                    log_temp: torch.Tensor) -> torch.Tensor:
    """ListNet cross-entropy of the target block distribution [P, n, NB] against
    softmax(block_scores / exp(log_temp)) over the ranked blocks; mean over P and n."""
    logits = (block_scores / log_temp.exp()).masked_fill(~ranked.unsqueeze(0), -1e4)
    return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()


def rope_scale_index(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """int64 [head_dim]: the scale parameter of each dim under ``param="rope-scale"``: dims i and
    i + r/2 (i < r/2, r = rotary_dim, default head_dim) share parameter i (one RoPE plane of HF's
    ``rotate_half`` layout); each dim d >= r (not rotated) has its own, r/2 + d - r."""
    r = head_dim if rotary_dim is None else rotary_dim
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be an int >= 1, got {head_dim!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2 or r > head_dim:
        raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], got {r!r}")
    half = r // 2
    idx = torch.arange(head_dim)
    idx[:r] = torch.arange(r) % half
    idx[r:] = torch.arange(head_dim - r) + half
    return idx


def fit_block_rank(
    groups: list[GroupSet], W0: torch.Tensor, *, steps: int, lr: float, beta: float, tau: float,
    chunk: int, device: str | torch.device = "cpu", progress=None, layer: int = 0,
    param: str = "free", rotary_dim: int | None = None, free_planes: int = 0, pool: str = "max",
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Fit P projections together (the kv-heads of a layer; their losses add, gradients stay
    separate). ``groups``: P GroupSets with identical document shapes; W0 [P, D, B] float32
    (the init, and R of ``param="rope-scale"``; ``rotary_dim``: its RoPE dims, default D;
    ``free_planes``: the slowest planes with a free block, rope-scale only).
    Returns (W [P, D, B] float32 on CPU with unit-norm columns, per-step loss history)."""
    P = len(groups)
    if W0.dim() != 3 or W0.shape[0] != P:
        raise ValueError(f"W0 must be [{P}, D, BITS], got {tuple(W0.shape)}")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    half = (rotary_dim or W0.shape[1]) // 2
    if isinstance(free_planes, bool) or not isinstance(free_planes, int) or not 0 <= free_planes <= half:
        raise ValueError(f"free_planes must be an int in [0, {half}] (the RoPE planes), got {free_planes!r}")
    if free_planes and param != "rope-scale":
        raise ValueError("free_planes is a setting of param='rope-scale'")
    ref = groups[0]
    if ref.num_docs == 0:
        raise ValueError("fit_block_rank: no documents")
    for gs in groups[1:]:
        if gs.num_docs != ref.num_docs or any(a.shape != b.shape for a, b in zip(gs.q + gs.k, ref.q + ref.k)):
            raise ValueError("fit_block_rank: group sets must have identical document shapes")
    data = []
    for d in range(ref.num_docs):
        q = torch.stack([gs.q[d] for gs in groups]).to(device)  # [P, G, n, D]
        k = torch.stack([gs.k[d] for gs in groups]).to(device)  # [P, T, D]
        t = ref.t[d].to(device)
        kc = k - k[:, : max(1, k.shape[1] // 2)].mean(1, keepdim=True)
        target, ranked = block_targets(q, k, t, chunk)
        data.append((q, kc, t, target, ranked))
    log_temp = torch.zeros((), device=device, requires_grad=True)
    if param == "free":
        W = W0.detach().clone().float().to(device).requires_grad_(True)
        fitted = W
        extra = []
    else:  # W = S R: S = diag(s), s = exp(log_s) per RoPE plane, + A on the slow planes' dims
        R = W0.detach().float().to(device)
        idx = rope_scale_index(R.shape[1], rotary_dim).to(device)
        fitted = torch.zeros(P, int(idx.max()) + 1, device=device, requires_grad=True)
        planes = torch.arange(half - free_planes, half, device=device)
        slow = torch.cat([planes, planes + half])
        block = torch.zeros(P, len(slow), len(slow), device=device, requires_grad=True)
        extra = [block] if free_planes else []

    def weights() -> torch.Tensor:
        if param == "free":
            return fitted
        w = fitted.exp()[:, idx].unsqueeze(-1) * R
        return w.index_add(1, slow, block @ R[:, slow]) if free_planes else w

    opt = torch.optim.Adam([fitted, log_temp, *extra], lr=lr)
    history = []
    for step in range(steps):
        q, kc, t, target, ranked = data[step % len(data)]
        bs = relaxed_block_scores(weights(), q, kc, t, chunk, beta, tau, pool)
        loss = block_rank_loss(bs, target, ranked, log_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"loss": float(loss.detach()), "temp": float(log_temp.detach().exp())})
        if progress is not None:
            progress.set_postfix(layer=layer, step=step, loss=f"{history[-1]['loss']:.4f}", refresh=False)
    with torch.no_grad():
        W = weights().detach()
    return (W / W.norm(dim=1, keepdim=True)).float().cpu(), history
