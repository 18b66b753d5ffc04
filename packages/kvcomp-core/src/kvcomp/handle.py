"""``kvcomp.enable(model, config=None, hash_weights=None, **kwargs) -> KVCompHandle``.

    handle = kvcomp.enable(model)            # adapter by model.config.model_type
    model.generate(**inputs)                 # decodes with kvcomp, no extra arguments
    cache = handle.new_cache()               # hand-written loops: model(ids, past_key_values=cache)
    handle.stats                             # blocks attended / available of the latest cache
    handle.disable()                         # the model's own attention, bit-identical outputs

``config``: a ``KVCompConfig``, a path to a JSON config, the name of a config the adapter
ships (``kvcomp-qwen``: "qwen3-8b", ...), or None: ``adapter.default_config(model)`` (ratio 0.1,
chunk 128, 128 bits, first two layers dense, must_select [0, -2, -1], threshold 2048), logged.
``hash_weights``: a ``HashWeights``, a path to a safetensors file of them, or None: from the
config (seeded random, or the config's trained file). Keyword arguments: ``debug=True`` keeps
every layer's last block_idx and per-step counts on the caches; ``offload=OffloadConfig(...)``
(``kvcomp.offload``; a dict of its fields or True also work) makes every new cache an
``OffloadCache``: the sparse layers' K/V in host memory, codes and a block cache in HBM.

What enable does (and disable undoes):
  * registers the "kvcomp" attention and mask functions (``kvcomp.attention``) and switches
    the model to them with ``model.set_attn_implementation("kvcomp")``; the previous
    implementation still serves prefill (and dense steps when it was "eager");
  * puts a ``LayerBinding`` on every attention module (``module._kvcomp``): the layer's hash
    weights moved once to that module's device, expanded per query head once;
  * installs a forward pre-hook (with kwargs) and a forward hook on ``model.base_model``:
    before each forward it replaces a missing or empty ``DynamicCache`` with a new
    ``KVCompCache`` (this is how ``generate`` ends up on kvcomp in every transformers 5.x:
    generate keeps whatever cache the model returns), hands the 2-D ``attention_mask`` to the
    cache (padding removal) and marks the forward's cache for the mask function.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from kvcomp import attention as attn
from kvcomp.cache import KVCompCache, summarize
from kvcomp.config import ConfigError, KVCompConfig
from kvcomp.hashing import HashWeights
from kvcomp.policy import LayerPolicy

__all__ = ["enable", "KVCompHandle", "resolve_config", "resolve_hash_weights"]

log = logging.getLogger("kvcomp")


def enable(model, config=None, hash_weights=None, **kwargs) -> KVCompHandle:
    """Patch ``model`` (a transformers model) for kvcomp decoding; see the module docstring."""
    from kvcomp.adapters import get_adapter

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(f"enable() needs a transformers model with config.model_type, got {type(model).__name__}")
    return get_adapter(model_type).enable(model, config, hash_weights, **kwargs)


def resolve_config(adapter, model, config) -> KVCompConfig:
    """KVCompConfig | path | shipped config name | None -> KVCompConfig (None: the adapter's
    default for the model, logged)."""
    if config is None:
        cfg = adapter.default_config(model)
        log.info("kvcomp: no config given, using the default for this model: %s", cfg.summary())
        return cfg
    if isinstance(config, KVCompConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_file():
            return KVCompConfig.from_json(path)
        shipped = adapter.shipped_configs()
        if str(config) in shipped:
            return KVCompConfig.from_json(shipped[str(config)])
        names = ", ".join(sorted(shipped)) or "none"
        raise ConfigError(
            f"config: {str(config)!r} is neither a file nor a config shipped by the "
            f"{adapter.name or type(adapter).__name__} adapter (shipped: {names})"
        )
    raise TypeError(
        f"config must be a KVCompConfig, a path, a shipped config name or None, got {type(config).__name__}"
    )


def resolve_hash_weights(hash_weights, config: KVCompConfig, *, num_kv_heads: int) -> HashWeights:
    """HashWeights | safetensors path | None -> HashWeights checked against the config/model."""
    if hash_weights is None:
        return HashWeights.from_config(config, num_kv_heads)
    if isinstance(hash_weights, (str, os.PathLike)):
        hash_weights = HashWeights.load(hash_weights)
    if not isinstance(hash_weights, HashWeights):
        raise TypeError(
            f"hash_weights must be a HashWeights, a safetensors path or None, got {type(hash_weights).__name__}"
        )
    hash_weights.check_against(
        num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads,
        head_dim=config.head_dim, bits=config.hash_bits,
    )
    return hash_weights


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class KVCompHandle:
    """An active kvcomp patch of one model (made by ``enable``).

    Attributes: ``model``, ``adapter``, ``config`` (KVCompConfig), ``policy`` (LayerPolicy),
    ``hash_weights`` (HashWeights), ``enabled``; ``stats`` of the latest cache."""

    def __init__(self, model, adapter, config: KVCompConfig, hash_weights: HashWeights, *,
                 debug: bool = False, offload=None):
        from kvcomp.offload import OffloadConfig

        self.offload = OffloadConfig.coerce(offload)
        self.model = model
        self.adapter = adapter
        self.config = config
        self.policy = LayerPolicy(config)
        self.hash_weights = hash_weights
        self.debug = bool(debug)
        self.enabled = False
        self._hooks: list = []
        self._modules: list[torch.nn.Module] = []
        self._last_cache = None
        self._last_stats = None
        self._install()

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        model = self.model
        other = getattr(model, "_kvcomp_handle", None)
        if other is not None and other.enabled:
            raise RuntimeError("kvcomp is already enabled on this model: call handle.disable() first")
        prev = model.config._attn_implementation or "sdpa"
        if prev == attn.ATTN_NAME:
            raise RuntimeError("the model already uses the 'kvcomp' attention without a live handle")
        modules = self.adapter.attention_modules(model)
        windows = self.adapter.sliding_windows(model)
        compute = set(self.policy.compute_layers)
        for i in self.policy.reuse_layers:
            src = self.policy.source(i)
            if windows[src] is not None and windows[i] is None:
                raise ConfigError(
                    f"top_k_index_reuse: layer {i} reuses layer {src}, a sliding-window layer "
                    "(always dense, it makes no selection)"
                )
        self.code_weights: list[torch.Tensor | None] = []
        attn.register()
        for i, module in enumerate(modules):
            kv_w = None
            if i in compute and windows[i] is None:
                kv_w = self.hash_weights.layer(i, device=_module_device(module), dtype=torch.float32)
                kv_w = kv_w.contiguous()
            self.code_weights.append(kv_w)
            module._kvcomp = attn.LayerBinding(
                layer_idx=i, handle=self, fallback=prev, kv_weight=kv_w,
                sliding_window=windows[i],
            )
        self._modules = modules
        self._windows = windows
        self._prev_impl = prev
        attn._FALLBACK_BY_CONFIG[id(model.config)] = prev
        self._activate(model, attn.ATTN_NAME)

    def _activate(self, model, attn_name: str) -> None:
        """Switch the model to the attention function ``attn_name`` and install the forward
        hooks (the last step of ``_install``, shared by family handles)."""
        model.set_attn_implementation(attn_name)
        if model.config._attn_implementation != attn_name:
            self._remove_bindings()
            raise RuntimeError(
                f"{type(model).__name__} refused attn_implementation='{attn_name}' (it does not "
                "use transformers' AttentionInterface)"
            )
        base = model.base_model
        self._sig = inspect.signature(base.forward)
        self._hooks.append(base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(base.register_forward_hook(self._post_hook, always_call=True))
        model._kvcomp_handle = self
        self.enabled = True

    def _remove_bindings(self) -> None:
        for m in self._modules:
            if hasattr(m, "_kvcomp"):
                del m._kvcomp
        attn._FALLBACK_BY_CONFIG.pop(id(self.model.config), None)

    def disable(self) -> None:
        """Give the model back its own attention implementation; remove hooks and bindings."""
        if not self.enabled:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.model.set_attn_implementation(self._prev_impl)
        self._remove_bindings()
        self.model._kvcomp_handle = None
        self.enabled = False

    # ------------------------------------------------------------------ caches
    def new_cache(self, *, static: bool = False, max_cache_len: int | None = None,
                  offload="handle") -> KVCompCache:
        """A fresh KVCompCache for this model (pass it as past_key_values / cache).

        ``static=True``: a ``KVCompStaticCache`` preallocated to ``max_cache_len`` tokens per
        sequence (prompt included), whose decode step can be captured in a CUDA graph
        (``compile_decode``); batches without padding only.
        ``offload``: an ``OffloadConfig`` (or dict / True) for an ``OffloadCache`` whose sparse
        layers keep K/V in host memory, None for K/V in HBM; default: the handle's setting."""
        if not self.enabled:
            raise RuntimeError("this kvcomp handle was disabled")
        from kvcomp.offload import OffloadCache, OffloadConfig

        offload = self.offload if isinstance(offload, str) and offload == "handle" else OffloadConfig.coerce(offload)
        if offload is not None and static:
            raise ValueError("new_cache: offload and static=True cannot be combined")
        kw = dict(chunk_size=self.config.chunk_size, code_weights=self.code_weights,
                  sliding_windows=self._windows, debug=self.debug, token_score=self.config.token_score)
        if static:
            from kvcomp.static_cache import KVCompStaticCache

            if max_cache_len is None:
                raise ValueError("new_cache(static=True) needs max_cache_len= (tokens per sequence)")
            cache = KVCompStaticCache(self.config.num_hidden_layers, max_cache_len=max_cache_len,
                                      seq_len_threshold=self.config.seq_len_threshold, **kw)
        elif max_cache_len is not None:
            raise ValueError("max_cache_len is a setting of static caches: pass static=True")
        elif offload is not None:
            layers = [i for i in self.policy.sparse_layers if self._windows[i] is None]
            cache = OffloadCache(self.config.num_hidden_layers, offload=offload, offload_layers=layers, **kw)
        else:
            cache = KVCompCache(self.config.num_hidden_layers, **kw)
        self._note(cache)
        return cache

    def compile_decode(self, **kwargs):
        """Replay one-token decode steps on static caches (``new_cache(static=True, ...)``) from
        CUDA graphs: a ``kvcomp.graphs.DecodeGraphs`` on the model (``.remove()`` undoes it;
        keyword arguments go to it)."""
        from kvcomp.graphs import DecodeGraphs

        return DecodeGraphs(self.model, **kwargs)

    def _note(self, cache: KVCompCache) -> None:
        self._last_cache = weakref.ref(cache)
        self._last_stats = cache.layer_stats

    @property
    def last_cache(self) -> KVCompCache | None:
        return self._last_cache() if self._last_cache is not None else None

    @property
    def stats(self) -> dict:
        """Decode-step counters of the latest cache this handle made or saw (``KVCompCache.stats``;
        they outlive the cache), or {} before any."""
        stats = self._last_stats
        if stats is None and self.last_cache is not None:
            stats = self.last_cache.layer_stats
        return summarize(stats) if stats is not None else {}

    # ------------------------------------------------------------------ hooks
    def _cache_key(self, kwargs: dict) -> str:
        for name in ("cache", "past_key_values"):
            if name in kwargs:
                return name
        return "cache" if "cache" in self._sig.parameters else "past_key_values"

    def _pre_hook(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers.cache_utils import DynamicCache

        if args:
            bound = self._sig.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            extra = kwargs.pop("kwargs", None)
            if isinstance(extra, dict):
                kwargs.update(extra)
            args = ()
        key = self._cache_key(kwargs)
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        empty_dynamic = type(cache) is DynamicCache and cache.get_seq_length() == 0
        if (cache is None and use_cache) or empty_dynamic:
            cache = self.new_cache()
            kwargs[key] = cache
        if isinstance(cache, KVCompCache):
            ids = kwargs.get("input_ids")
            x = ids if ids is not None else kwargs.get("inputs_embeds")
            cache.begin_step(kwargs.get("attention_mask"), int(x.shape[1]))
            self._note(cache)
        attn.forward_scope.enter(cache)
        return args, kwargs

    def _post_hook(self, module, args, output: Any) -> None:
        cache = attn.forward_scope.current()
        attn.forward_scope.exit()
        if isinstance(cache, KVCompCache):
            cache.end_step()
