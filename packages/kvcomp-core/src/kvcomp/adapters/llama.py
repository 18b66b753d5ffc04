"""Built-in adapter for llama and mistral (``model_type`` "llama", "mistral"): the GQA path
of core, registered through the ``kvcomp.adapters`` entry points like any family package.
Mistral's sliding window (when its config sets one) keeps those layers dense."""

from __future__ import annotations

from kvcomp.adapters.base import GQAAdapter

__all__ = ["LlamaAdapter"]


class LlamaAdapter(GQAAdapter):
    name = "llama"
    model_types = ("llama", "mistral")
