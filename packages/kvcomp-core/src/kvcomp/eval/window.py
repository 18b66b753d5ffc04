"""A window of decode steps in one forward pass: the attention function ``kvcomp_eval``.

The text before the window is prefilled densely (transformers' SDPA, a DynamicCache), exactly
as kvcomp prefills. The window's N tokens then go through the model in one call with the
attention function registered here; for each window position t (absolute position in the
sequence) and each layer it

* attends densely over keys 0..t when the layer is dense (``SparseSpec.dense_layers``), when
  ``t + 1 < threshold``, or for ``method="dense"``;
* else selects blocks over keys 0..t as the decode step at t would (``kvcomp.eval.selection``:
  ``hash_encode`` of the keys, ``encode_query`` + ``hamming_topk``'s selection, or the oracle)
  and attends exactly (fp32 softmax) over the selected blocks' tokens only.

So the hidden state of window position t is what kvcomp's decode step at t computes given the
same cache contents; since later window tokens feed on earlier ones only through the (dense,
prefilled-or-teacher-forced) K/V, the window equals step-by-step decoding of the same tokens
(tested against real decoding through the kvcomp cache).

With a ``FidelityProbe`` attached the pass stays dense and the probe measures, per layer and
position, the attention mass and the output error of each selection method at each budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from kvcomp.eval import selection as sel

EVAL_NAME = "kvcomp_eval"


@dataclass
class SparseSpec:
    """How a window attends. ``method``: "dense", "hash" (needs ``weights``: a HashWeights or a
    list of per-layer [Hkv, D, BITS] tensors) or "oracle"."""

    method: str = "dense"
    ratio: float = 0.1
    weights: object = None
    query_mode: str = "sum"
    chunk_size: int = 16
    must_select: tuple[int, ...] = (0, -2, -1)
    chunk_repre: str = "max"
    dense_layers: frozenset[int] = frozenset({0, 1})
    threshold: int = 0
    label: str | None = None  # overrides ``name`` (e.g. "trained-sum@0.1")
    token_score: str = "hamming"  # or "centered_norm" (KVCompConfig.token_score)

    def __post_init__(self):
        if self.method not in ("dense", "hash", "oracle"):
            raise ValueError(f"SparseSpec.method must be dense / hash / oracle, got {self.method!r}")
        if self.method == "hash" and self.weights is None:
            raise ValueError("SparseSpec.method='hash' needs weights=")
        if self.token_score not in ("hamming", "centered_norm"):
            raise ValueError(f"SparseSpec.token_score must be hamming / centered_norm, got {self.token_score!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"SparseSpec.ratio must be in (0, 1], got {self.ratio}")
        self.dense_layers = frozenset(self.dense_layers)

    def layer_weight(self, layer: int) -> torch.Tensor:
        return layer_weight(self.weights, layer)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.method == "dense":
            return "dense"
        tag = self.method if self.method == "oracle" else f"hash-{self.query_mode}"
        return f"{tag}@{self.ratio:g}"


def layer_weight(weights, layer: int) -> torch.Tensor:
    if hasattr(weights, "layer"):
        return weights.layer(layer).float()
    return weights[layer].float()


@dataclass
class _State:
    spec: SparseSpec
    probe: object = None
    pos_chunk: int = 128
    stats: dict = field(default_factory=lambda: {"attended": 0, "available": 0})


_ACTIVE: list[_State] = []


def _eval_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, L, D] (L = prefix + N) -> ([1, N, Hq, Dv], None)."""
    state = _ACTIVE[-1]
    spec = state.spec
    if query.shape[0] != 1:
        raise ValueError(f"kvcomp_eval runs one sequence at a time, got batch {query.shape[0]}")
    _, Hq, N, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    G = Hq // Hkv
    layer = module.layer_idx
    scale = scaling if scaling is not None else D**-0.5
    q_all = query[0].transpose(0, 1).float()  # [N, Hq, D]
    k = key[0].float()  # [Hkv, L, D]
    v = value[0].float()  # [Hkv, L, Dv]
    positions = torch.arange(L - N, L, device=query.device)
    sparse = spec.method != "dense" and layer not in spec.dense_layers
    k_codes = k_norms = None
    if sparse and spec.method == "hash":
        w = spec.layer_weight(layer).to(k.device)
        k_codes, k_norms = sel.key_codes(k, w, spec.token_score, L - N)  # [Hkv, L, W], [Hkv, L]
    if state.probe is not None:
        state.probe.prepare_layer(layer, k, prefix_len=L - N)
    out = torch.empty(N, Hq, v.shape[-1], dtype=torch.float32, device=query.device)
    for s in range(0, N, state.pos_chunk):
        e = min(N, s + state.pos_chunk)
        q = q_all[s:e]  # [c, Hq, D]
        c = e - s
        seq_lens = positions[s:e] + 1
        # query head j reads kv-head j // G
        logits = torch.einsum("chgd,hld->chgl", q.view(c, Hkv, G, D), k).reshape(c, Hq, L) * scale
        causal = torch.arange(L, device=k.device).view(1, 1, L) < seq_lens.view(c, 1, 1)
        if state.probe is not None:
            p_dense = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
            state.probe.observe(layer, q, k, v, p_dense, seq_lens)
        if not sparse or (seq_lens < spec.threshold).all():
            mask = causal
        else:
            if spec.method == "hash":
                block_idx = sel.hash_select(q, k_codes, spec.layer_weight(layer).to(k.device), seq_lens,
                                            spec.ratio, chunk_size=spec.chunk_size,
                                            must_select=spec.must_select, chunk_repre=spec.chunk_repre,
                                            query_mode=spec.query_mode, k_norms=k_norms)
            else:
                p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
                mass = sel.block_mass(p, Hkv, spec.chunk_size)
                block_idx = sel.select_from_block_scores(mass, seq_lens, spec.ratio,
                                                         chunk_size=spec.chunk_size,
                                                         must_select=spec.must_select)
            mask = sel.token_mask(block_idx, seq_lens, L, spec.chunk_size, Hq)
            below = seq_lens < spec.threshold
            if below.any():
                mask = torch.where(below.view(c, 1, 1), causal, mask)
            nb = (seq_lens + spec.chunk_size - 1) // spec.chunk_size
            state.stats["attended"] += int((block_idx >= 0).sum())
            state.stats["available"] += int(nb.sum()) * Hkv
        p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).view(c, Hkv, G, L)
        out[s:e] = torch.einsum("chgl,hld->chgd", p, v).reshape(c, Hq, -1)
    return out.to(query.dtype).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EVAL_NAME, _eval_attention)


@contextlib.contextmanager
def eval_attention(model, spec: SparseSpec, *, probe=None, pos_chunk: int = 128):
    """Within the block, ``model`` attends through ``kvcomp_eval`` with ``spec``."""
    from kvcomp.training.collect import attention_implementation

    _register()
    state = _State(spec=spec, probe=probe, pos_chunk=pos_chunk)
    _ACTIVE.append(state)
    try:
        with attention_implementation(model, EVAL_NAME):
            yield state
    finally:
        _ACTIVE.pop()


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """Dense prefill of ids [T] with the model's own attention -> DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids.view(1, -1).to(model.device), past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def window_logits(model, cache, window_ids: torch.Tensor, spec: SparseSpec, *, probe=None,
                  pos_chunk: int = 128) -> tuple[torch.Tensor, dict]:
    """Logits [N, V] (float32) of the window tokens ``window_ids`` [N] given the prefilled
    ``cache``, every window position attending as a decode step under ``spec``. The cache is
    cropped back to its prefix length afterwards, so it can serve the next spec."""
    prefix_len = cache.get_seq_length()
    try:
        with eval_attention(model, spec, probe=probe, pos_chunk=pos_chunk) as state:
            out = model(input_ids=window_ids.view(1, -1).to(model.device), past_key_values=cache,
                        use_cache=True)
    finally:
        crop_cache(cache, prefix_len)
    return out.logits[0].float(), dict(state.stats)


def crop_cache(cache, length: int) -> None:
    """Cut a DynamicCache back to its first ``length`` tokens (the meaning of ``crop(int)``
    changed across transformers 5.x releases, so the layers are sliced directly)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
