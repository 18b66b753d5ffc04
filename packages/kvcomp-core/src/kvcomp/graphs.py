"""``DecodeGraphs``: replay a causal LM's one-token decode forward from CUDA graphs.

    graphs = DecodeGraphs(model)            # or handle.compile_decode()
    cache = handle.new_cache(static=True, max_cache_len=N)   # or transformers' StaticCache
    model.generate(ids, past_key_values=cache, max_new_tokens=...)   # decode steps replay
    graphs.remove()                          # model.forward is the model's own again

``DecodeGraphs`` puts a wrapper in ``model.forward`` (an instance attribute; ``remove`` deletes
it). A call is replayed from a graph when it is a one-token decode step on a CUDA device over a
static cache with a past: ``input_ids`` [B, 1] (no ``inputs_embeds``) and as cache (keyword
``past_key_values`` or ``cache``) a ``kvcomp.static_cache.KVCompStaticCache`` or a transformers
``StaticCache`` of full-attention layers (the dense baseline: the same treatment). Any other
call runs the model eagerly, unchanged.

One graph per (cache, batch size, ``KVCompStaticCache.decode_phase()``: below / at or above the
threshold), captured at the first such step: the current state is saved,
``warmup`` eager steps run on a side stream (kernels compile, lazy buffers appear), the state is
put back, the step is captured into a graph (all graphs share one memory pool), and the state
is put back again. Each later step copies the step's inputs into the graph's static buffers
and replays:

    ids   int64 [B, 1]        the new tokens
    pos   int64 [B, 1]        position ids (``position_ids`` if given, else the cache length)
    mask  bool  [B, 1, 1, L]  the 4-D mask passed to the model (transformers uses a 4-D mask
                              as given): for a transformers StaticCache L = max_cache_len and
                              the given 2-D ``attention_mask`` fills the first columns (else
                              "row <= position"); for kvcomp L = 1, all True (its static
                              decode builds what it needs from ``seq_lens``)
The returned output is the captured one with ``logits`` cloned (the next replay overwrites
the graph's buffer). Before a step on a kvcomp cache, ``KVCompStaticCache.fill_codes()`` encodes
(eagerly, once) the key codes that steps below the threshold left unwritten; after a replay
``KVCompStaticCache.advance(1)`` moves the cache's host mirrors (the device state moved inside
the graph).

Without CUDA (tests, CPU) the same path runs with the same static buffers, eagerly: everything
but the capture itself is exercised.
"""

from __future__ import annotations

import copy
import weakref

import torch

__all__ = ["DecodeGraphs"]


def _hf_static_layers(cache):
    """The layers of a transformers StaticCache whose decode is graph-safe, else None."""
    try:
        from transformers.cache_utils import StaticCache, StaticLayer
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(cache, StaticCache):
        return None
    layers = list(cache.layers)
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return None
    return layers


class _Entry:
    """One captured decode step: its static inputs, the graph and the captured output."""

    def __init__(self, cache, B: int, dev: torch.device, mask_len: int | None):
        self.cache_ref = weakref.ref(cache)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.mask = torch.ones(B, 1, 1, mask_len, dtype=torch.bool, device=dev)
        self.rows = torch.arange(mask_len, device=dev).view(1, 1, 1, mask_len)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None
        self.version = None


class DecodeGraphs:
    """CUDA-graph replay of one-token decode steps of ``model`` (see the module docstring).

    Args:
        model:   a transformers causal LM (kvcomp-enabled or not)
        warmup:  eager steps before each capture (>= 1)
        enabled: capture and replay graphs (default: when CUDA is available); False runs the
                 static-buffer path eagerly (for tests and debugging)
        fuse:    also run decode steps through ``kvcomp.fusion.FusedDecode`` (norms, RoPE,
                 merged projections as one kernel each; removed by ``remove``): True, or a
                 dict of its keyword arguments (e.g. ``{"linear": False}``); the fused kernels
                 compile in the warm-up steps, before the capture
    """

    def __init__(self, model, *, warmup: int = 2, enabled: bool | None = None, fuse: bool | dict = False):
        if "forward" in model.__dict__:
            raise RuntimeError("model.forward is already wrapped (DecodeGraphs active?): remove() it first")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup!r}")
        self.model = model
        self.warmup = int(warmup)
        self.enabled = torch.cuda.is_available() if enabled is None else bool(enabled)
        self._forward = model.forward  # the bound original
        self._entries: dict[tuple, _Entry] = {}
        self._pool = None
        self.replays = 0
        self.captures = 0
        self.fused = None
        if fuse:
            from kvcomp.fusion import FusedDecode

            if not isinstance(fuse, dict) and fuse is not True:
                raise TypeError(f"fuse must be a bool or a dict of FusedDecode arguments, got {fuse!r}")
            self.fused = FusedDecode(model, **(fuse if isinstance(fuse, dict) else {}))
        model.forward = self._wrapped

    def remove(self) -> None:
        """Put the model's own forward back and free the graphs."""
        if self.model.__dict__.get("forward") == self._wrapped:
            del self.model.__dict__["forward"]
        if self.fused is not None:
            self.fused.remove()
            self.fused = None
        self.clear()

    def clear(self) -> None:
        """Drop every captured graph (their memory goes back to the pool)."""
        self._entries.clear()
        self._pool = None

    # ------------------------------------------------------------------ dispatch
    def _static_cache(self, kwargs: dict):
        """(cache kwarg name, cache, kind) if the call is a graph-able decode step, else None."""
        from kvcomp.static_cache import KVCompStaticCache

        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
            return None
        if kwargs.get("inputs_embeds") is not None or kwargs.get("labels") is not None:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False:
            return None
        if self.enabled and (ids.device.type != "cuda" or torch.cuda.is_current_stream_capturing()):
            return None
        for name in ("past_key_values", "cache"):
            cache = kwargs.get(name)
            if cache is None:
                continue
            if isinstance(cache, KVCompStaticCache):
                if cache.host_len > 0 and cache.length is not None:
                    return name, cache, "kvcomp"
                return None
            layers = _hf_static_layers(cache)
            if layers is not None and all(layer.is_initialized for layer in layers):
                return name, cache, "hf"
            return None
        return None

    def _wrapped(self, *args, **kwargs):
        found = None if args else self._static_cache(kwargs)
        if found is None:
            return self._forward(*args, **kwargs)
        name, cache, kind = found
        ids = kwargs["input_ids"]
        B = ids.shape[0]
        if kind == "kvcomp" and cache.host_len + 1 > cache.max_cache_len:
            raise ValueError(f"static kvcomp cache is full (max_cache_len={cache.max_cache_len})")
        key = (id(cache), B, ids.device, cache.decode_phase() if kind == "kvcomp" else None)
        entry = self._entries.get(key)
        version = self._version(cache, kind)
        if entry is not None and (entry.cache_ref() is not cache or entry.version != version):
            entry = None
        if entry is None:
            mask_len = cache.layers[0].max_cache_len if kind == "hf" else 1
            entry = _Entry(cache, B, ids.device, mask_len)
            entry.version = version
            self._entries[key] = entry
        if kind == "kvcomp":
            cache.fill_codes()  # codes that steps below the threshold deferred (eager, once)
        self._load_inputs(entry, cache, kind, kwargs)
        call = self._call_kwargs(entry, cache, name, kind)
        if not self.enabled:
            out = self._forward(**call)
        else:
            if entry.graph is None:
                self._capture(entry, cache, kind, call)
            entry.graph.replay()
            out = entry.out
            if kind == "kvcomp":
                cache.advance(1)
            self.replays += 1
        res = copy.copy(out)
        res["logits"] = out.logits.clone()
        return res

    @staticmethod
    def _version(cache, kind):
        if kind == "kvcomp":
            return cache.storage_version, cache.layers[0].keys_buf.data_ptr()
        return tuple(layer.keys.data_ptr() for layer in cache.layers[:1])

    def _load_inputs(self, entry: _Entry, cache, kind: str, kwargs: dict) -> None:
        entry.ids.copy_(kwargs["input_ids"])
        pos = kwargs.get("position_ids")
        if pos is not None:
            entry.pos.copy_(pos.view(-1, 1).expand_as(entry.pos) if pos.numel() == 1 else pos)
        elif kind == "kvcomp":
            entry.pos.fill_(cache.host_len)
        else:
            entry.pos.copy_(cache.layers[0].cumulative_length.view(1, 1).expand_as(entry.pos))
        if kind == "kvcomp":
            return
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            cols = am.shape[1]
            if cols > entry.mask.shape[-1]:
                raise ValueError(f"attention_mask has {cols} columns, the static cache holds {entry.mask.shape[-1]}")
            entry.mask.zero_()
            entry.mask[:, 0, 0, :cols].copy_(am)
        else:
            torch.le(entry.rows, entry.pos.view(-1, 1, 1, 1), out=entry.mask)

    def _call_kwargs(self, entry: _Entry, cache, name: str, kind: str) -> dict:
        return {
            "input_ids": entry.ids, "position_ids": entry.pos, name: cache, "use_cache": True,
            "attention_mask": entry.mask, "return_dict": True,
        }

    # ------------------------------------------------------------------ capture
    @staticmethod
    def _checkpoint(cache, kind: str):
        if kind == "kvcomp":
            return cache.checkpoint()
        return [layer.cumulative_length.clone() for layer in cache.layers]

    @staticmethod
    def _restore(cache, kind: str, state) -> None:
        if kind == "kvcomp":
            cache.restore(state)
        else:
            for layer, n in zip(cache.layers, state):
                layer.cumulative_length.copy_(n)

    def _capture(self, entry: _Entry, cache, kind: str, call: dict) -> None:
        state = self._checkpoint(cache, kind)
        stream = torch.cuda.Stream(device=entry.ids.device)
        stream.wait_stream(torch.cuda.current_stream(entry.ids.device))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self._forward(**call)
                    self._restore(cache, kind, state)
                stream.synchronize()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    out = self._forward(**call)
        finally:
            torch.cuda.current_stream(entry.ids.device).wait_stream(stream)
            self._restore(cache, kind, state)
        entry.graph, entry.out = graph, out
        self.captures += 1
