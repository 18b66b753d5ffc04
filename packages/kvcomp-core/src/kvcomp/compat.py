"""Small shims over transformers releases kvcomp supports (5.17 on the GPU machine, 5.2x in CI).

transformers 5.2x renamed the cache argument and output field of model forwards from
``past_key_values`` to ``cache`` (the old name is deprecated, to be removed in 5.40)."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes the KV cache: "cache" or "past_key_values"."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The cache a model forward returned (``output.cache`` or ``output.past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
