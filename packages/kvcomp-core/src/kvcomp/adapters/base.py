"""The adapter interface: what a model family must provide to kvcomp.

An adapter is found by ``model.config.model_type`` through the entry-point group
``kvcomp.adapters`` (``kvcomp.adapters.registry``). Family packages subclass ``Adapter`` and
override only what really differs from the GQA path in core.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any


class Adapter(abc.ABC):
    """Base class of model-family adapters.

    Attributes:
        name:         short family name shown by ``kvcomp adapters`` (e.g. "qwen")
        model_types:  the transformers ``model_type`` values this adapter serves
        configs_dir:  folder of shipped JSON configs, loadable by file stem (or None)
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    configs_dir: Path | None = None

    def shipped_configs(self) -> dict[str, Path]:
        """{config name: path} of the JSON configs this family ships."""
        if self.configs_dir is None or not Path(self.configs_dir).is_dir():
            return {}
        return {p.stem: p for p in sorted(Path(self.configs_dir).glob("*.json"))}

    #: attributes that mark a decoder layer's attention module (besides an int ``layer_idx``)
    attention_attrs: tuple[str, ...] = ("q_proj", "k_proj")

    @staticmethod
    def text_config(model: Any):
        """The decoder's config (the text config of a multimodal model)."""
        cfg = model.config
        get = getattr(cfg, "get_text_config", None)
        return get(decoder=True) if callable(get) else cfg

    def attention_modules(self, model: Any) -> list:
        """The attention module of every decoder layer, indexed by ``layer_idx``: the modules
        with an int ``layer_idx`` and every attribute of ``attention_attrs``."""
        n = self.text_config(model).num_hidden_layers
        found: dict[int, Any] = {}
        for mod in model.modules():
            idx = getattr(mod, "layer_idx", None)
            if isinstance(idx, int) and all(hasattr(mod, a) for a in self.attention_attrs):
                if idx in found:
                    raise ValueError(f"two attention modules claim layer_idx {idx}")
                found[idx] = mod
        if sorted(found) != list(range(n)):
            raise ValueError(
                f"expected one attention module (with {', '.join(self.attention_attrs)}, layer_idx) "
                f"per layer 0..{n - 1}, found layers {sorted(found)}"
            )
        return [found[i] for i in range(n)]

    @abc.abstractmethod
    def default_config(self, model: Any):
        """A KVCompConfig derived from the model (used when enable() gets no config)."""

    @abc.abstractmethod
    def check_config(self, config, model: Any) -> None:
        """Raise kvcomp.ConfigError if the config does not fit the model."""

    @abc.abstractmethod
    def enable(self, model: Any, config, hash_weights=None, **kwargs):
        """Patch the model for kvcomp decoding; return a handle with new_cache() and disable()."""


class GQAAdapter(Adapter):
    """The shared path of GQA decoder models (llama, mistral, qwen2/3 and their MoE variants).

    Their attention modules carry ``layer_idx``, call ``cache.update(k, v, layer_idx)`` with
    post-RoPE (and post q/k-norm) keys [B, Hkv, T, D], then the function registered in
    transformers' ``AttentionInterface`` under ``config._attn_implementation``. Family
    adapters override only what differs (``name``, ``model_types``, ``configs_dir``).
    """

    name = "gqa"

    # ------------------------------------------------------------------ model facts
    def geometry(self, model: Any) -> dict:
        """{"num_layers", "num_heads", "num_kv_heads", "head_dim"} from the model config."""
        c = self.text_config(model)
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return {"num_layers": c.num_hidden_layers, "num_heads": heads, "num_kv_heads": kv,
                "head_dim": head_dim}

    def sliding_windows(self, model: Any) -> list:
        """Per layer, the sliding window of a sliding-attention layer (kept dense) or None."""
        c = self.text_config(model)
        n = c.num_hidden_layers
        window = getattr(c, "sliding_window", None)
        types = getattr(c, "layer_types", None)
        if types is not None:
            return [window if t == "sliding_attention" and window else None for t in types[:n]]
        if window and getattr(c, "use_sliding_window", True):
            return [window] * n
        return [None] * n

    # ------------------------------------------------------------------ Adapter API
    def default_config(self, model: Any):
        from kvcomp.config import KVCompConfig

        g = self.geometry(model)
        name = getattr(model.config, "_name_or_path", "") or getattr(model.config, "model_type", "model")
        return KVCompConfig.default(name, g["num_layers"], g["head_dim"])

    def check_config(self, config, model: Any) -> None:
        from kvcomp.config import ConfigError, KVCompConfig

        if not isinstance(config, KVCompConfig):
            raise TypeError(f"config must be a KVCompConfig, got {type(config).__name__}")
        g = self.geometry(model)
        mt = getattr(model.config, "model_type", "?")
        problems = []
        if config.is_mla:
            problems.append(f"is_mla: the config is for an MLA model, {mt} is GQA")
        if config.num_hidden_layers != g["num_layers"]:
            problems.append(
                f"num_hidden_layers: the config has {config.num_hidden_layers}, the model has {g['num_layers']}"
            )
        if not config.is_mla and config.head_dim != g["head_dim"]:
            problems.append(f"head_dim: the config has {config.head_dim}, the model has {g['head_dim']}")
        if problems:
            raise ConfigError(
                f"config {config.model_name!r} does not fit this {mt} model "
                f"({g['num_heads']} heads, {g['num_kv_heads']} kv-heads): " + "; ".join(problems)
            )

    def enable(self, model: Any, config=None, hash_weights=None, **kwargs):
        from kvcomp.handle import KVCompHandle, resolve_config, resolve_hash_weights

        cfg = resolve_config(self, model, config)
        self.check_config(cfg, model)
        hw = resolve_hash_weights(hash_weights, cfg, num_kv_heads=self.geometry(model)["num_kv_heads"])
        return KVCompHandle(model, self, cfg, hw, **kwargs)
