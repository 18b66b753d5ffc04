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

    @abc.abstractmethod
    def default_config(self, model: Any):
        """A KVCompConfig derived from the model (used when enable() gets no config)."""

    @abc.abstractmethod
    def check_config(self, config, model: Any) -> None:
        """Raise kvcomp.ConfigError if the config does not fit the model."""

    @abc.abstractmethod
    def enable(self, model: Any, config, hash_weights=None, **kwargs):
        """Patch the model for kvcomp decoding; return a handle with new_cache() and disable()."""
