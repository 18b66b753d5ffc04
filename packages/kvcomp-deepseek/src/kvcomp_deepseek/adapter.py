"""``DeepseekAdapter``: kvcomp for DeepSeek-V2 / V2-Lite / V3 / R1 (``model_type`` deepseek_v2,
deepseek_v3), multi-head latent attention.

    import kvcomp
    handle = kvcomp.enable(model, "deepseek-v3")     # or a KVCompConfig / JSON path / None
    model.generate(**inputs)
    handle.disable()

What differs from the GQA path of core (see ``kvcomp_deepseek.attention`` and ``.cache``):
the cache holds the latent (c_kv, k_pe) and split codes [hash(c_kv) | hash(k_pe)] instead of
per-head K/V; a sparse decode step runs in latent space (weight absorption) with one selection
per sequence shared by all heads (G = num_attention_heads); hash weights are
``HashWeights`` of kind "mla" (``latent(i)`` [1, R, bits_kv], ``rope(i)`` [1, P, bits_rope]).
Layers with ratio 1.0 stay dense. The multi-token-prediction (MTP) module of V3/R1 checkpoints
is not part of transformers' ``DeepseekV3ForCausalLM`` (``num_hidden_layers`` = 61 excludes
it), so it is never patched and stays dense wherever it runs.

Needs a transformers release whose DeepSeek attention caches the latent and expands it with
``expand_kv`` (5.17 and later); older releases (expanded K/V in the cache) fail at enable().
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from kvcomp.adapters.base import Adapter
from kvcomp.attention import _FALLBACK_BY_CONFIG
from kvcomp.config import ConfigError, KVCompConfig
from kvcomp.handle import KVCompHandle, resolve_config
from kvcomp.hashing import HashWeights
from kvcomp.policy import LayerPolicy

from kvcomp_deepseek import attention as mla
from kvcomp_deepseek.cache import MLACache

__all__ = ["DeepseekAdapter", "DeepseekHandle", "check_transformers"]

_NEEDED = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "scaling",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "num_heads")


def check_transformers(module) -> None:
    """Raise RuntimeError unless ``module`` is a DeepSeek attention that caches the latent."""
    import transformers

    cls = type(module)
    missing = [a for a in _NEEDED if not hasattr(module, a)]
    src = ""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        pass
    if missing or not callable(getattr(cls, "expand_kv", None)) or "expand_kv(" not in src:
        what = f"missing {', '.join(missing)}" if missing else "no expand_kv (it caches expanded K/V)"
        raise RuntimeError(
            f"kvcomp-deepseek: {cls.__module__}.{cls.__name__} of transformers "
            f"{transformers.__version__} is not supported ({what}); it needs a release whose "
            "DeepSeek attention caches the MLA latent and expands it with expand_kv() "
            "(transformers 5.17 or later)"
        )


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class DeepseekHandle(KVCompHandle):
    """``KVCompHandle`` for MLA models: "kvcomp_mla" attention, instance ``expand_kv`` on every
    attention module, ``MLACache`` caches. ``disable()`` restores the model (bit-identical)."""

    def __init__(self, model, adapter, config: KVCompConfig, hash_weights: HashWeights, *,
                 debug: bool = False):
        super().__init__(model, adapter, config, hash_weights, debug=debug)

    def _install(self) -> None:
        model = self.model
        other = getattr(model, "_kvcomp_handle", None)
        if other is not None and other.enabled:
            raise RuntimeError("kvcomp is already enabled on this model: call handle.disable() first")
        prev = model.config._attn_implementation or "sdpa"
        if prev in (mla.ATTN_NAME, "kvcomp"):
            raise RuntimeError(f"the model already uses the {prev!r} attention without a live handle")
        modules = self.adapter.attention_modules(model)
        for m in modules:
            check_transformers(m)
        self.policy = LayerPolicy(self.config)
        compute = set(self.policy.compute_layers)
        self.mla_weights: list = []
        mla.register()
        for i, module in enumerate(modules):
            w_lat = w_rope = None
            if i in compute:
                dev = _module_device(module)
                w_lat = self.hash_weights.latent(i, device=dev, dtype=torch.float32)[0].contiguous()
                w_rope = self.hash_weights.rope(i, device=dev, dtype=torch.float32)[0].contiguous()
            self.mla_weights.append((w_lat, w_rope) if w_lat is not None else None)
            module._kvcomp = mla.MLABinding(layer_idx=i, handle=self, fallback=prev,
                                            w_lat=w_lat, w_rope=w_rope)
            module.expand_kv = mla.patched_expand_kv(module)
        self._modules = modules
        self._prev_impl = prev
        _FALLBACK_BY_CONFIG[id(model.config)] = prev
        self._activate(model, mla.ATTN_NAME)

    def _remove_bindings(self) -> None:
        for m in self._modules:
            if "expand_kv" in m.__dict__:
                del m.expand_kv
        super()._remove_bindings()

    def new_cache(self, *, static: bool = False, max_cache_len: int | None = None):
        """A fresh ``MLACache`` for this model (pass it as past_key_values / cache).

        ``static=True``: an ``MLAStaticCache`` preallocated to ``max_cache_len`` tokens per
        sequence (prompt included) whose one-token decode step can be captured in a CUDA
        graph (``compile_decode``); batches without padding only."""
        if not self.enabled:
            raise RuntimeError("this kvcomp handle was disabled")
        import weakref

        if static:
            from kvcomp_deepseek.static_cache import MLAStaticCache

            if max_cache_len is None:
                raise ValueError("new_cache(static=True) needs max_cache_len= (tokens per sequence)")
            cache = MLAStaticCache(self.config.num_hidden_layers, max_cache_len=max_cache_len,
                                   chunk_size=self.config.chunk_size, hash_weights=self.mla_weights,
                                   seq_len_threshold=self.config.seq_len_threshold, debug=self.debug)
        elif max_cache_len is not None:
            raise ValueError("max_cache_len is a setting of static caches: pass static=True")
        else:
            cache = MLACache(self.config.num_hidden_layers, chunk_size=self.config.chunk_size,
                             hash_weights=self.mla_weights, debug=self.debug)
        self._last_cache = weakref.ref(cache)
        return cache


class DeepseekAdapter(Adapter):
    """DeepSeek-V2 / V3 (and R1, V2-Lite: same model types), MLA."""

    name = "deepseek"
    model_types = ("deepseek_v2", "deepseek_v3")
    attention_attrs = ("kv_a_proj_with_mqa",)
    configs_dir = Path(__file__).parent / "configs"

    def geometry(self, model: Any) -> dict:
        """{"num_layers", "num_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
        "v_head_dim", "q_lora_rank"} from the model config."""
        c = self.text_config(model)
        return {
            "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads,
            "kv_lora_rank": c.kv_lora_rank,
            "qk_rope_head_dim": c.qk_rope_head_dim,
            "qk_nope_head_dim": c.qk_nope_head_dim,
            "v_head_dim": c.v_head_dim,
            "q_lora_rank": getattr(c, "q_lora_rank", None),
        }

    def default_config(self, model: Any) -> KVCompConfig:
        g = self.geometry(model)
        name = getattr(model.config, "_name_or_path", "") or getattr(model.config, "model_type", "model")
        return KVCompConfig.default_mla(name, g["num_layers"], g["kv_lora_rank"],
                                        g["qk_rope_head_dim"], top_k_budget_tokens=2048)

    def check_config(self, config, model: Any) -> None:
        if not isinstance(config, KVCompConfig):
            raise TypeError(f"config must be a KVCompConfig, got {type(config).__name__}")
        g = self.geometry(model)
        mt = getattr(model.config, "model_type", "?")
        problems = []
        if not config.is_mla:
            problems.append(f"is_mla: the config is for a GQA model, {mt} uses MLA (set is_mla true)")
        if config.num_hidden_layers != g["num_layers"]:
            problems.append(f"num_hidden_layers: the config has {config.num_hidden_layers}, "
                            f"the model has {g['num_layers']}")
        if config.is_mla:
            for f in ("kv_lora_rank", "qk_rope_head_dim"):
                if getattr(config, f) != g[f]:
                    problems.append(f"{f}: the config has {getattr(config, f)}, the model has {g[f]}")
        if problems:
            raise ConfigError(f"config {config.model_name!r} does not fit this {mt} model: "
                              + "; ".join(problems))

    def resolve_hash_weights(self, hash_weights, config: KVCompConfig) -> HashWeights:
        if hash_weights is None:
            return HashWeights.from_config(config)
        if isinstance(hash_weights, (str, Path)):
            hash_weights = HashWeights.load(hash_weights)
        if not isinstance(hash_weights, HashWeights):
            raise TypeError(f"hash_weights must be a HashWeights, a safetensors path or None, "
                            f"got {type(hash_weights).__name__}")
        if hash_weights.kind != "mla":
            raise ConfigError(f"hash_weights: kind {hash_weights.kind!r}, an MLA model needs 'mla'")
        hash_weights.check_against(num_layers=config.num_hidden_layers,
                                   kv_lora_rank=config.kv_lora_rank,
                                   qk_rope_head_dim=config.qk_rope_head_dim,
                                   bits_kv=config.hash_bits_kv_lora,
                                   bits_rope=config.hash_bits_qk_rope)
        return hash_weights

    def enable(self, model: Any, config=None, hash_weights=None, **kwargs) -> DeepseekHandle:
        cfg = resolve_config(self, model, config)
        self.check_config(cfg, model)
        hw = self.resolve_hash_weights(hash_weights, cfg)
        return DeepseekHandle(model, self, cfg, hw, **kwargs)
