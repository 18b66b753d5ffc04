"""Training pairs for HATA hash training, collected from a real model on real text.

Capture. ``capture_qk(model, input_ids, layers)`` runs one forward pass with a capturing attention
function registered with transformers' ``AttentionInterface`` (name ``"kvcomp_capture"``): it
sees exactly the tensors the model attends with, i.e. queries and keys *after* q/k-norm and
RoPE, which is what sits in the KV cache and what kvcomp hashes. It records them and computes
the layer's output with transformers' own SDPA function, so the forward pass is unchanged.

    GQA layer  ->  CapturedGQA(q [Hq, T, D], k [Hkv, T, D])                float32, batch row 0
    MLA layer  ->  CapturedMLA(q_lat [H, T, R], q_pe [H, T, P],
                               ckv [T, R], kpe [T, P])                     float32

For MLA (DeepSeek-V2/V3) the latent ``ckv`` is the output of ``kv_a_layernorm`` (what the
cache stores), ``kpe`` the rotated shared rope key, ``q_pe`` the rotated query rope part and
``q_lat = q_nope @ W_UK`` the absorbed query (W_UK from ``kv_b_proj``), so that
``q . k == q_lat . ckv + q_pe . kpe`` for every head.

Pairs and labels (the paper's recipe, ALGORITHM.md section 2). For a document of T tokens,
``n_queries`` query positions t are drawn (seeded) from the second half [T // 2, T); every query
head's query at t is scored against all keys j <= t by the true attention logit q . k_j. The top
10% keys (``ceil(pos_frac * (t + 1))``) are positives labelled linearly from 20 (best) down to
1; every other key j <= t is a negative labelled -1; keys j > t are not pairs (label 0).
Labels are stored compactly: the positive key indices in rank order (``pos_idx``, -1 padded)
and the query positions; ``dense_labels`` expands them to an [N, T] matrix when training.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

CAPTURE_NAME = "kvcomp_capture"
POS_LABEL_MAX = 20.0
POS_LABEL_MIN = 1.0
NEG_LABEL = -1.0


@dataclass
class CapturedGQA:
    q: torch.Tensor  # [Hq, T, D] float32
    k: torch.Tensor  # [Hkv, T, D] float32


@dataclass
class CapturedMLA:
    q_lat: torch.Tensor  # [H, T, R] float32
    q_pe: torch.Tensor  # [H, T, P]
    ckv: torch.Tensor  # [T, R]
    kpe: torch.Tensor  # [T, P]


def is_mla_module(module) -> bool:
    return hasattr(module, "kv_lora_rank") and hasattr(module, "kv_b_proj")


class _CaptureState:
    def __init__(self, layers):
        self.layers = None if layers is None else set(layers)
        self.out: dict[int, CapturedGQA | CapturedMLA] = {}
        self.ckv: dict[int, torch.Tensor] = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


_ACTIVE: list[_CaptureState] = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function: record post-RoPE q/k of batch row 0, then transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    if state is not None and layer is not None and state.wants(layer):
        if is_mla_module(module):
            nope = module.qk_nope_head_dim
            H = query.shape[1]
            w_kv = module.kv_b_proj.weight.float().view(H, nope + module.v_head_dim, module.kv_lora_rank)
            w_uk = w_kv[:, :nope, :]  # [H, nope, R]
            q_nope = query[0, :, :, :nope].float()  # [H, T, nope]
            state.out[layer] = CapturedMLA(
                q_lat=torch.einsum("htn,hnr->htr", q_nope, w_uk).detach().cpu(),
                q_pe=query[0, :, :, nope:].float().detach().cpu(),
                ckv=state.ckv.pop(layer)[0].float().detach().cpu(),
                kpe=key[0, 0, :, nope:].float().detach().cpu(),
            )
        else:
            state.out[layer] = CapturedGQA(
                q=query[0].float().detach().cpu(), k=key[0].float().detach().cpu()
            )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily switch ``model`` to the registered attention function ``name``."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]


@torch.no_grad()
def capture_qk(model, input_ids: torch.Tensor, layers=None) -> dict[int, CapturedGQA | CapturedMLA]:
    """One forward pass over ``input_ids`` [1, T] (or [T]); returns {layer: captured q/k}.

    ``layers``: iterable of layer indices to keep (default all). The model's outputs are those of
    its SDPA attention; its attention implementation is restored afterwards."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(input_ids.shape)}")
    _register()
    state = _CaptureState(layers)
    hooks = []
    for mod in _attention_modules(model):
        if is_mla_module(mod) and state.wants(mod.layer_idx):
            idx = mod.layer_idx
            hooks.append(
                mod.kv_a_layernorm.register_forward_hook(
                    lambda _m, _i, out, idx=idx: state.ckv.__setitem__(idx, out.detach())
                )
            )
    _ACTIVE.append(state)
    try:
        with attention_implementation(model, CAPTURE_NAME):
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        _ACTIVE.pop()
        for h in hooks:
            h.remove()
    return state.out


@dataclass
class PairSet:
    """Training pairs of one projection (one layer and kv-head, or one MLA part), per document.

    For document d: ``q[d]`` [N_d, Dx] float32 (queries of every query head of the group, stacked),
    ``k[d]`` [T_d, Dx] float32 (all keys of the document), ``t[d]`` [N_d] int64 (each query's
    position: it pairs with keys j <= t), ``pos_idx[d]`` [N_d, P_d] int64 (its positive keys,
    best first, -1 padded)."""

    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    pos_idx: list[torch.Tensor] = field(default_factory=list)

    def add(self, q, k, t, pos_idx) -> None:
        self.q.append(q)
        self.k.append(k)
        self.t.append(t)
        self.pos_idx.append(pos_idx)

    @property
    def num_docs(self) -> int:
        return len(self.q)

    def num_pairs(self) -> int:
        return int(sum((t + 1).sum() for t in self.t))


def dense_labels(t: torch.Tensor, pos_idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Graded labels [N, num_keys] float32: positives 20 -> 1 by rank, other keys j <= t -1,
    keys j > t 0 (no pair)."""
    N, P = pos_idx.shape
    keys = torch.arange(num_keys).view(1, -1)
    S = torch.where(keys <= t.view(-1, 1), NEG_LABEL, 0.0).to(torch.float32)
    n_pos = (pos_idx >= 0).sum(1)  # [N]
    rank = torch.arange(P).view(1, -1).float()
    denom = (n_pos - 1).clamp(min=1).view(-1, 1).float()
    grade = POS_LABEL_MAX - (POS_LABEL_MAX - POS_LABEL_MIN) * rank / denom  # [N, P]
    grade = torch.where(n_pos.view(-1, 1) == 1, torch.full_like(grade, POS_LABEL_MAX), grade)
    valid = pos_idx >= 0
    rows = torch.arange(N).view(-1, 1).expand(N, P)
    S[rows[valid], pos_idx[valid]] = grade[valid]
    return S


def sample_positions(T: int, n_queries: int, generator: torch.Generator) -> torch.Tensor:
    """``n_queries`` distinct positions from the second half [T // 2, T), sorted (int64)."""
    lo = T // 2
    n = min(n_queries, T - lo)
    return (torch.randperm(T - lo, generator=generator)[:n] + lo).sort().values


def positives(scores: torch.Tensor, t: torch.Tensor, pos_frac: float) -> torch.Tensor:
    """scores [N, T] (logits of each query vs every key), t [N] positions -> pos_idx [N, P]:
    the top ``ceil(pos_frac * (t + 1))`` keys among j <= t, best first, -1 padded."""
    N, T = scores.shape
    n_pos = torch.ceil(pos_frac * (t + 1).double()).long().clamp(min=1)
    P = int(n_pos.max())
    masked = scores.masked_fill(torch.arange(T).view(1, -1) > t.view(-1, 1), float("-inf"))
    top = masked.topk(P, dim=1, sorted=True).indices  # [N, P]
    return torch.where(torch.arange(P).view(1, -1) < n_pos.view(-1, 1), top, torch.full_like(top, -1))


def add_document_pairs(
    captured: dict[int, CapturedGQA | CapturedMLA],
    pairs: dict[tuple[int, str], PairSet],
    positions: torch.Tensor,
    *,
    pos_frac: float = 0.1,
) -> None:
    """Turn one document's captured q/k into pairs, appended to ``pairs`` keyed by
    (layer, part): part ``"h{i}"`` for GQA kv-head i, ``"latent"`` / ``"rope"`` for MLA."""
    for layer, cap in captured.items():
        if isinstance(cap, CapturedGQA):
            Hq, T, D = cap.q.shape
            Hkv = cap.k.shape[0]
            G = Hq // Hkv
            for h in range(Hkv):
                qg = cap.q[h * G : (h + 1) * G, positions]  # [G, n, D]
                kh = cap.k[h]  # [T, D]
                q = qg.reshape(-1, D)
                t = positions.repeat(G)
                pos = positives(q @ kh.T, t, pos_frac)
                pairs.setdefault((layer, f"h{h}"), PairSet()).add(q.contiguous(), kh.contiguous(), t, pos)
        else:
            H, T, R = cap.q_lat.shape
            q_lat = cap.q_lat[:, positions].reshape(-1, R)
            q_pe = cap.q_pe[:, positions].reshape(-1, cap.q_pe.shape[-1])
            t = positions.repeat(H)
            # labels from the true logits (nope + rope); both parts learn the same ranking
            pos = positives(q_lat @ cap.ckv.T + q_pe @ cap.kpe.T, t, pos_frac)
            pairs.setdefault((layer, "latent"), PairSet()).add(q_lat.contiguous(), cap.ckv.contiguous(), t, pos)
            pairs.setdefault((layer, "rope"), PairSet()).add(q_pe.contiguous(), cap.kpe.contiguous(), t, pos)


def collect_pairs(
    model,
    documents: list[torch.Tensor],
    *,
    layers=None,
    n_queries: int = 32,
    pos_frac: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> dict[tuple[int, str], PairSet]:
    """Pairs of every (layer, part) over ``documents`` (each a [T] int64 token tensor).

    Query positions of document d come from a generator seeded with (seed, d), the same for
    every layer, so the result does not depend on which layers a process collects."""
    if not 0.0 < pos_frac < 1.0:
        raise ValueError(f"pos_frac must be in (0, 1), got {pos_frac}")
    pairs: dict[tuple[int, str], PairSet] = {}
    for positions, captured in captured_documents(model, documents, layers=layers, n_queries=n_queries,
                                                  seed=seed, progress=progress):
        add_document_pairs(captured, pairs, positions, pos_frac=pos_frac)
    return pairs


def captured_documents(model, documents: list[torch.Tensor], *, layers=None, n_queries: int, seed: int,
                       progress: bool = False):
    """For each document d ([T] int64 token ids, T >= 4): (positions [n_queries] int64, its
    ``capture_qk`` by layer). The positions come from a generator seeded with (seed, d), the
    same for every layer, so a result does not depend on which layers a process collects.
    n_queries is checked at the call, before any document is read."""
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    it = documents
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(documents, desc="collect q/k", unit="doc")

    def each():
        for d, ids in enumerate(it):
            ids = ids.view(-1)
            if ids.numel() < 4:
                raise ValueError(f"document {d} has {ids.numel()} tokens; need at least 4")
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + d)
            yield sample_positions(ids.numel(), n_queries, gen), capture_qk(model, ids, layers)

    return each()


def expected_positives(t: int, pos_frac: float) -> int:
    """Number of positive keys for a query at position t (used by tests and docs)."""
    return max(1, math.ceil(pos_frac * (t + 1)))
