"""The kvcomp attention function and mask function, registered with transformers under "kvcomp".

``kvcomp_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs)``
    query [B, Hq, T, D] (post-RoPE), key/value as returned by ``KVCompCache.update``;
    returns (out [B, T, Hq, D], None) like transformers' own attention functions.

Per call, in this order:
    * no ``KVCompLayer`` behind ``key`` (no kvcomp cache, e.g. ``use_cache=False``), or the
      layer's first update (prefill): the model's previous attention implementation, with the
      mask transformers built (sdpa/eager/... exactly as before ``enable``);
    * T > 1 with a past ("extend") other than a verify step (below), sliding-window layers,
      and decode steps the policy makes dense (ratio 1.0 or the longest sequence below the
      threshold): dense attention over the compacted cache with a mask built from
      ``seq_lens`` (none when no mask is needed, so a dense decode is bit-identical to the
      unpatched model's);
    * decode (T == 1), policy mode "compute": ``encode_query`` (config.query_aggregation) ->
      ``hamming_topk`` (k_blocks from ``LayerPolicy.k_blocks_tensor``, width from
      ``max_k_blocks``) -> ``sparse_decode_attention`` through ``layer.attend_blocks`` (the
      layer's storage step: K/V in HBM, or host-offloaded by ``kvcomp.offload``); the
      block_idx is kept on the cache layer for the layers that reuse it;
    * decode, mode "reuse": the source layer's block_idx of this same step;
    * a verify step (``is_verify_step``: 2 to ``MAX_VERIFY_QUERIES`` new tokens, all real,
      e.g. the draft of prompt-lookup or assisted generation, whose new tokens lie in
      must-selected blocks) is attended like a decode step: one selection from the G x T
      (head, query) rows of each kv-head, then ``sparse_decode_attention`` with q
      [B, Hq, T, D], causal among the new tokens.
Sequences of a batch below the threshold get all their blocks (``k_blocks_tensor``).

Per-module settings come from ``module._kvcomp`` (a ``LayerBinding`` that ``kvcomp.enable``
sets on every attention module and ``disable`` removes).

The mask function ("kvcomp" in ``AttentionMaskInterface``) returns the previous
implementation's mask, except for forwards that run on a ``KVCompCache`` with a past, where
it returns None (the attention function builds what it needs from ``seq_lens``).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from kvcomp.cache import KVCompCache, KVCompLayer, layer_for_key
from kvcomp.ops import hamming_topk, sparse_decode_attention
from kvcomp.ops.hamming_topk import split_deferred
from kvcomp.ops.query_codes import encode_query

__all__ = ["ATTN_NAME", "MAX_VERIFY_QUERIES", "LayerBinding", "forward_scope", "is_verify_step",
           "kvcomp_attention", "kvcomp_mask", "register", "static_query_weight"]

ATTN_NAME = "kvcomp"
# the most new tokens a step may have and still share one selection (a verify step); longer
# extends (e.g. a prompt fed in pieces) want a selection per query and attend densely
MAX_VERIFY_QUERIES = 8
_FORWARD = threading.local()
# static decode: a step's k_blocks by one gather from a per-cache table of the policy's rule
# (False: the rule's ~40 tensor ops in every step, as before session 13; benchmarks time both)
K_BLOCKS_TABLE = True
# previous attention implementation per model config (configs are not hashable: keyed by id)
_FALLBACK_BY_CONFIG: dict[int, str] = {}


@dataclass
class LayerBinding:
    """What the attention function needs for one attention module.

    kv_weight  [Hkv, D, BITS] float32 on the module's device (layers that compute a selection;
                              a kv-head's G query heads are hashed with its row)
    """

    layer_idx: int
    handle: Any  # the KVCompHandle: .config (KVCompConfig), .policy (LayerPolicy)
    fallback: str
    kv_weight: torch.Tensor | None = None
    sliding_window: int | None = None


class forward_scope:
    """Context of one model forward: which cache it runs on (set by enable's hooks)."""

    @staticmethod
    def enter(cache) -> None:
        stack = getattr(_FORWARD, "stack", None)
        if stack is None:
            stack = _FORWARD.stack = []
        stack.append(cache)

    @staticmethod
    def exit() -> None:
        stack = getattr(_FORWARD, "stack", None)
        if stack:
            stack.pop()

    @staticmethod
    def current():
        stack = getattr(_FORWARD, "stack", None)
        return stack[-1] if stack else None


def fallback_function(module, name: str):
    """The attention function registered as ``name`` (the model's own eager one for "eager")."""
    if name == "sdpa":
        return sdpa_attention_forward
    if name == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(
                f"{type(module).__name__} has no eager_attention_forward in its module; "
                "load the model with attn_implementation='sdpa' before kvcomp.enable"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def kvcomp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    binding: LayerBinding | None = getattr(module, "_kvcomp", None)
    fallback = binding.fallback if binding is not None else "sdpa"
    layer = layer_for_key(key) if binding is not None else None
    if layer is None or layer.step_kind == "prefill":
        fn = fallback_function(module, fallback)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    decode = layer.step_kind == "decode"
    if decode and getattr(layer, "is_static", False):
        return _static_decode(module, query, layer, binding, scaling, kwargs), None
    sparse_ok = decode or is_verify_step(layer, query.shape[2], binding.handle.config)
    if sparse_ok and binding.sliding_window is None:
        policy = binding.handle.policy
        mode = policy.mode(binding.layer_idx, layer.max_len)
        if mode != "dense":
            return _sparse_decode(query, layer, binding, mode, scaling), None
    out = _dense_cached(module, query, layer, binding.sliding_window, fallback, scaling, kwargs)
    if decode:
        layer.record_step("dense", None)
    return out, None


def is_verify_step(layer: KVCompLayer, T: int, config) -> bool:
    """Whether an extend step of ``T`` new tokens on ``layer`` may attend sparsely with one
    selection: 1 < T <= MAX_VERIFY_QUERIES, every new token real (no padding in the step), a
    dynamic cache layer, and each sequence's new tokens inside blocks that
    ``config.must_select_blocks`` always selects (so each query sees itself and the new
    tokens before it, whatever the hash ranks). Host lengths only: no sync."""
    if layer.step_kind != "extend" or not 1 < T <= MAX_VERIFY_QUERIES or getattr(layer, "is_static", False):
        return False
    if not layer.step_all_real:
        return False
    c, must = config.chunk_size, set(config.must_select_blocks)
    for n in set(layer.lens):
        nb = -(-n // c)
        if any(b not in must and b - nb not in must for b in range((n - T) // c, nb)):
            return False
    return True


def _dense_cached(module, query, layer: KVCompLayer, window, fallback, scaling, kwargs):
    """Exact attention over the compacted cache of ``layer``."""
    L = layer.max_len
    k, v = layer.keys_buf[:, :, :L], layer.values_buf[:, :, :L]
    mask = compacted_mask(layer, L, k.device, window)
    return dense_attention(module, query, k, v, mask, fallback, scaling, kwargs)


def compacted_mask(layer, L: int, device, window: int | None = None):
    """bool [B, 1, T, L] or None: over a compacted cache (each sequence's tokens at 0..len-1),
    query t of sequence b sees the stored tokens j <= layer.step_query_pos[b, t] (and
    j > qpos - window on sliding layers). None where nothing is masked (a decode step of
    equal lengths), which keeps dense decoding bit-identical to the model's own."""
    if window is not None and L <= window:
        window = None  # every stored token is inside the window: no restriction
    if layer.step_kind == "decode" and len(set(layer.lens)) <= 1 and window is None:
        return None
    qpos = layer.step_query_pos  # [B, T]
    j = torch.arange(L, device=device).view(1, 1, L)
    mask = j <= qpos.unsqueeze(-1)
    if window is not None:
        mask &= j > (qpos.unsqueeze(-1) - window)
    return mask.unsqueeze(1)


def dense_attention(module, query, key, value, mask, fallback: str, scaling, kwargs):
    """Exact attention through the model's previous implementation ("eager" or sdpa for any
    other): query [B, H, T, D], key / value [B, Hkv, L, D], mask bool [B, 1, T, L] or None."""
    if fallback == "eager":
        fn = fallback_function(module, "eager")
        if mask is not None:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
    else:
        fn = sdpa_attention_forward
    kw = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("is_causal", "position_bias")}
    out, _ = fn(module, query, key, value, mask, scaling=scaling, dropout=0.0, **kw)
    return out


def _sparse_decode(query, layer: KVCompLayer, binding: LayerBinding, mode: str, scaling: float):
    handle = binding.handle
    cfg, policy = handle.config, handle.policy
    i = binding.layer_idx
    L = layer.max_len
    T = query.shape[2]  # 1 (decode) or a verify step's new tokens
    q = query[:, :, 0, :].contiguous() if T == 1 else query.contiguous()  # [B, Hq, (T,) D]
    seq_lens = layer.seq_lens
    if mode == "compute":
        if layer.codes_buf is None:
            raise RuntimeError(f"layer {i} computes a selection but its cache layer keeps no key codes")
        q_codes = encode_query(q, binding.kv_weight, cfg.query_aggregation)
        lens = layer.lens  # host copy of seq_lens: one length needs no tensor ops (eager host time)
        k_blocks = policy.k_blocks(i, lens[0]) if len(set(lens)) == 1 else policy.k_blocks_tensor(i, seq_lens)
        block_idx = hamming_topk(
            q_codes,
            layer.codes_buf[:, :, :L],
            seq_lens,
            k_blocks=k_blocks,
            max_blocks=policy.max_k_blocks(i, L),
            chunk_size=cfg.chunk_size,
            must_select=tuple(cfg.must_select_blocks),
            chunk_repre=cfg.chunk_repre_method,
            k_scale=layer.norms_buf[:, :, :L] if layer.norms_buf is not None else None,
            _q=q if cfg.chunk_repre_method == "lse" else None,  # "lse": q_scale inside the scan
        )
        layer.step_block_idx = block_idx
        layer.step_block_idx_update = layer.updates
    else:  # reuse
        cache: KVCompCache = layer._cache_ref()
        j = policy.source(i)
        src = cache.layers[j]
        if src.step_block_idx is None or src.step_block_idx_update != layer.updates:
            raise RuntimeError(
                f"layer {i} reuses layer {j}'s selection, but layer {j} made none at this step"
            )
        block_idx = src.step_block_idx.to(q.device)
    out = layer.attend_blocks(q, block_idx, chunk_size=cfg.chunk_size, scale=float(scaling))
    layer.record_step(mode, block_idx)
    return out.unsqueeze(1) if T == 1 else out.transpose(1, 2)  # [B, T, Hq, D]


def _static_decode(module, query, layer, binding: LayerBinding, scaling: float, kwargs):
    """Decode step on a ``KVCompStaticLayer`` (``kvcomp.static_cache``): tensor ops on the full
    buffers only (no host sync, shapes fixed by max_cache_len), so it can run in a CUDA graph.
    Sparse layers at or above the threshold select with ``k_blocks_tensor``; dense layers and
    steps below the threshold (one length for the whole static batch, known on the host)
    attend to every real block with the same kernel; sliding-window layers use the dense
    fallback with a mask made from ``seq_lens``."""
    handle = binding.handle
    cfg, policy = handle.config, handle.policy
    cache = layer._cache_ref()
    i = binding.layer_idx
    q = query[:, :, 0, :].contiguous()  # [B, Hq, D]
    seq_lens = layer.seq_lens  # [B] int32, the new token included
    B, Hkv, cap = layer.keys_buf.shape[:3]
    dev = q.device
    if binding.sliding_window is not None:
        w = binding.sliding_window
        j = torch.arange(cap, device=dev).view(1, cap)
        n = seq_lens.to(torch.long).view(B, 1)
        mask = ((j < n) & (j >= n - w)).view(B, 1, 1, cap)
        return dense_attention(module, query, layer.keys_buf, layer.values_buf, mask,
                               binding.fallback, scaling, kwargs)
    deferred = None  # a selection whose stage 2 the attention runs (hamming_topk's _defer)
    if policy.mode(i, layer.padded_len) == "dense":  # a dense layer, or below the threshold
        nb = -(-cap // cfg.chunk_size)

        def all_blocks():
            idx = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, nb)
            n_blk = ((seq_lens + cfg.chunk_size - 1) // cfg.chunk_size).view(B, 1, 1)
            return torch.where(idx < n_blk, idx, -1).expand(B, Hkv, nb).contiguous()

        block_idx = cache.step_shared(("all_blocks", dev, Hkv), all_blocks)
    elif policy.source(i) != i:
        src = cache.layers[policy.source(i)]
        if src.step_block_idx is None or src.step_block_idx_update != layer.updates:
            raise RuntimeError(f"layer {i} reuses layer {policy.source(i)}'s selection, but it made none at this step")
        block_idx = src.step_block_idx.to(dev)
    else:
        if layer.codes_buf is None:
            raise RuntimeError(f"layer {i} computes a selection but its cache layer keeps no key codes")
        made = layer.step_query_codes  # by the update (update_rotary), for this very query?
        if made is not None and made[0] is query:
            q_codes = made[1]
        else:
            q_codes = encode_query(q, binding.kv_weight, cfg.query_aggregation)
        ratio_key = "budget" if cfg.top_k_budget_tokens is not None else cfg.top_k_ratio_per_layer[i]
        # the policy's rule for every length, tabulated once per cache (~40 tiny tensor ops);
        # a step then reads its row with one gather
        if K_BLOCKS_TABLE:
            table = cache.persistent(("k_blocks", ratio_key, dev), lambda: policy.k_blocks_tensor(
                i, torch.arange(cap + 1, device=dev, dtype=torch.int32)))
            k_blocks = cache.step_shared(("k_blocks", ratio_key, dev), lambda: table.index_select(0, seq_lens))
        else:
            k_blocks = cache.step_shared(("k_blocks", ratio_key, dev), lambda: policy.k_blocks_tensor(i, seq_lens))
        # stage 2 of the selection may be left to the attention's prologue (as in decode_step)
        sel = hamming_topk(
            q_codes, layer.codes_buf, seq_lens, k_blocks=k_blocks,
            max_blocks=policy.max_k_blocks(i, cap), chunk_size=cfg.chunk_size,
            must_select=tuple(cfg.must_select_blocks), chunk_repre=cfg.chunk_repre_method,
            k_scale=layer.norms_buf, _defer=True,
            _q=q if cfg.chunk_repre_method == "lse" else None,  # "lse": q_scale inside the scan
        )
        block_idx, deferred = split_deferred(sel)
        layer.step_block_idx = block_idx
        layer.step_block_idx_update = layer.updates
    out = sparse_decode_attention(q, layer.keys_buf, layer.values_buf, block_idx, seq_lens,
                                  chunk_size=cfg.chunk_size, scale=float(scaling),
                                  _select=deferred)
    return out.unsqueeze(1)  # [B, 1, Hq, D]


def static_query_weight(module: torch.nn.Module, layer) -> torch.Tensor | None:
    """The hash weight [Hkv, D, BITS] whose query codes the next decode step of the static
    ``layer`` will compute in ``module``'s attention (``_static_decode``'s selection), or None
    (a dense step, a reused selection, another query aggregation): what a fused update
    (``KVCompStaticLayer.update_rotary``) needs to make them in its own launch."""
    binding: LayerBinding | None = getattr(module, "_kvcomp", None)
    if binding is None or binding.sliding_window is not None or layer.codes_buf is None:
        return None
    cfg, policy = binding.handle.config, binding.handle.policy
    i = binding.layer_idx
    if cfg.query_aggregation != "sum" or policy.source(i) != i:
        return None
    if policy.mode(i, layer.padded_len + 1) == "dense":
        return None
    return binding.kv_weight


def kvcomp_mask(*args, **kwargs):
    """Mask function for "kvcomp": the previous implementation's mask (prefill, forwards
    without a kvcomp cache), or None on a kvcomp cache with a past (not used there)."""
    q_offset = kwargs.get("q_offset", 0)
    if isinstance(forward_scope.current(), KVCompCache) and not (
        isinstance(q_offset, int) and q_offset == 0
    ):
        return None
    config = kwargs.get("config")
    name = _FALLBACK_BY_CONFIG.get(id(config), "sdpa") if config is not None else "sdpa"
    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name, sdpa_mask)
    return fn(*args, **kwargs)


def register() -> None:
    """Register "kvcomp" with transformers' AttentionInterface and AttentionMaskInterface."""
    AttentionInterface.register(ATTN_NAME, kvcomp_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvcomp_mask)
