"""kvcomp: hash-aware top-k sparse attention (KVComp / HATA) for long-context decoding.

Public surface (names are stable, see docs/ARCHITECTURE in the repo):

    kvcomp.KVCompConfig, kvcomp.ConfigError     the config (seed JSON format), validated
    kvcomp.ops.hash_encode / hamming_topk / sparse_decode_attention / sparse_mla_decode
    kvcomp.enable(model, config=None, hash_weights=None, offload=None) -> handle
    kvcomp.OffloadConfig                        K/V of sparse layers in host memory (kvcomp.offload)
    kvcomp.adapters.available()

Heavy or optional parts (transformers integration) are imported lazily on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "KVCompConfig": "kvcomp.config",
    "ConfigError": "kvcomp.config",
    "enable": "kvcomp.handle",
    "KVCompHandle": "kvcomp.handle",
    "HashWeights": "kvcomp.hashing",
    "OffloadConfig": "kvcomp.offload",
}
_SUBMODULES = {"ops", "adapters", "hashing", "config", "policy", "training", "eval", "cli", "offload",
               "graphs", "static_cache", "distributed"}

__all__ = ["__version__", *sorted(_LAZY), *sorted(_SUBMODULES)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kvcomp.{name}")
    raise AttributeError(f"module 'kvcomp' has no attribute {name!r}")


def __dir__():
    return __all__
