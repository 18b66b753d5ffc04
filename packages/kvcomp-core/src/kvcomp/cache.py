"""``KVCompCache``: a transformers ``Cache`` that keeps K/V compacted per sequence plus key codes.

Storage of one layer (``KVCompLayer``), allocated on the device of the first keys it receives:

    keys_buf    [B, Hkv, capacity, D]  the keys' dtype; sequence b's real tokens at rows
                                       0 .. lens[b]-1, in order, rows beyond are zeros or stale
    values_buf  [B, Hkv, capacity, D]
    codes_buf   [B, Hkv, capacity, W]  int32 key codes (W = BITS // 32, layout of
                                       ``kvcomp.ops.hash_encode``), only on layers given hash
                                       weights (the layers that compute their own selection)
    seq_lens    [B] int32 on the layer's device; ``lens`` is its host mirror (list of int)

``capacity`` grows by whole chunks (to at least 1.5x, rounded up to a multiple of
``chunk_size``): one copy per growth, never a ``torch.cat`` per step. Unused rows are zeros, so
kernels that read a whole tile never meet NaN.

Padding is removed on the way in: ``KVCompCache.begin_step(attention_mask, q_len)`` (called by
the forward pre-hook ``kvcomp.enable`` installs) hands over the 2-D mask of the step; a token
whose mask column is 0 is not stored. Each sequence's block grid therefore starts at its own
first token, and a left-padded batch selects the same blocks as each prompt alone. Positions
stay the model's: ``get_seq_length()`` returns the padded length (columns seen) that
transformers uses for position ids and mask sizes.

What ``update()`` returns (and the attention function receives as key/value):
    prefill (nothing cached before): the new states as given, in the padded layout that
        transformers' prefill mask describes (prefill runs the model's own dense attention);
    later steps: views ``keys_buf[:, :, :max(lens)]`` / ``values_buf[...]`` of the compacted
        storage; the attention function reads ``seq_lens`` from the layer.
How the attention function finds the layer: ``update()`` records the layer in a thread-local
slot together with a weak reference to the key tensor it returned; ``layer_for_key(key)``
gives the layer back only if the attention function got exactly that tensor (transformers
calls update() and then the attention function of the same layer, with no other update in
between). A forward without a ``KVCompCache`` thus never matches a stale layer.

Observability: per layer, decode steps by mode and the KV blocks attended vs available
(summed over sequences and kv-heads) accumulate on the device without host syncs;
``KVCompCache.stats`` reads them. With ``debug=True`` each layer keeps the last ``block_idx``
and the per-step counts.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcomp.ops import hash_encode, sparse_decode_attention
from kvcomp.ops.key_stats import hash_bias, key_mean, key_norms

__all__ = ["KVCompCache", "KVCompLayer", "LayerStats", "layer_for_key", "summarize"]

_GROWTH = 1.5
_ACTIVE = threading.local()


def layer_for_key(key: torch.Tensor) -> KVCompLayer | None:
    """The ``KVCompLayer`` whose latest ``update()`` returned exactly ``key`` (same object), else None."""
    ref = getattr(_ACTIVE, "layer", None)
    layer = ref() if ref is not None else None  # weak: a finished cache is not kept alive
    if layer is None or layer._returned_key is None:
        return None
    return layer if layer._returned_key() is key else None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class KVCompLayer(CacheLayerMixin):
    """One decoder layer's compacted K/V (+ codes) storage. See the module docstring."""

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        layer_idx: int,
        *,
        chunk_size: int,
        code_weight: torch.Tensor | None = None,
        sliding_window: int | None = None,
        cache: KVCompCache | None = None,
        debug: bool = False,
        centered_norm: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        # token_score "centered_norm": codes of k - mu (mu: mean key of each sequence's first
        # update, per kv-head) and an fp16 ||k - mu|| per token, the selection's k_scale
        self.centered_norm = bool(centered_norm) and code_weight is not None
        self.chunk_size = int(chunk_size)
        self.code_weight = code_weight  # [Hkv, D, BITS] float, or None: no codes
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.debug = debug
        self._cache_ref = weakref.ref(cache) if cache is not None else None
        self._clear()

    # ----------------------------------------------------------------------------- state
    def _clear(self) -> None:
        self.keys = self.values = None
        self.keys_buf = self.values_buf = self.codes_buf = None
        self.norms_buf: torch.Tensor | None = None  # [B, Hkv, capacity] fp16 (centered_norm)
        self.key_mu: torch.Tensor | None = None  # [B, Hkv, D] fp32 (centered_norm)
        self.key_bias: torch.Tensor | None = None  # [B, Hkv, BITS] fp32 = key_mu @ W
        self.seq_lens: torch.Tensor | None = None
        self.lens: list[int] = []
        self.padded_len = 0
        self.capacity = 0
        self.batch_size = 0
        self.is_initialized = False
        self.updates = 0
        self.step_kind = "none"  # "prefill" | "decode" | "extend" for the latest update
        self._step_qpos: torch.Tensor | None = None
        self._step_T = 0
        self.step_all_real = True  # every new token of the latest update is real (no padding)
        self.step_block_idx: torch.Tensor | None = None
        self.step_block_idx_update = -1
        self._returned_key = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.stat = LayerStats(self.debug)

    @property
    def step_query_pos(self) -> torch.Tensor:
        """[B, T] long: the compacted row of each of the latest update's T queries (the last
        row it may attend to)."""
        if self._step_qpos is None:
            T = self._step_T
            dev = self.seq_lens.device
            self._step_qpos = self.seq_lens.to(torch.long).view(-1, 1) - T + torch.arange(T, device=dev).view(1, T)
        return self._step_qpos

    @property
    def max_len(self) -> int:
        return max(self.lens) if self.lens else 0

    @property
    def device(self) -> torch.device | None:
        return self.keys_buf.device if self.keys_buf is not None else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, value_states, 0)
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.keys_buf.device)
        self.is_initialized = True

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """Zeroed buffers of ``capacity`` rows per (sequence, kv-head) for states shaped like
        these [B, Hkv, T, D]: K, V, and with a hash weight the codes (and norms)."""
        B, H, _, D = key_states.shape
        dev = key_states.device
        self.batch_size = B
        self.capacity = capacity
        self.keys_buf = key_states.new_zeros(B, H, capacity, D)
        self.values_buf = value_states.new_zeros(B, H, capacity, value_states.shape[-1])
        if self.code_weight is not None:
            if self.code_weight.shape[0] != H or self.code_weight.shape[1] != D:
                raise ValueError(
                    f"layer {self.layer_idx}: hash weight {tuple(self.code_weight.shape)} does not fit "
                    f"keys [B, Hkv={H}, T, D={D}] (expected [Hkv, D, BITS])"
                )
            if self.code_weight.device != dev:
                self.code_weight = self.code_weight.to(dev)
            W = self.code_weight.shape[-1] // 32
            self.codes_buf = torch.zeros(B, H, capacity, W, dtype=torch.int32, device=dev)
            if self.centered_norm:
                self.norms_buf = torch.zeros(B, H, capacity, dtype=torch.float16, device=dev)
        self.lens = [0] * B

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = _round_up(max(needed, math.ceil(self.capacity * _GROWTH)), self.chunk_size)

        def grow(buf):
            new = buf.new_zeros(*buf.shape[:2], new_cap, buf.shape[3])
            new[:, :, : self.capacity] = buf[:, :, : self.capacity]
            return new

        self.keys_buf = grow(self.keys_buf)
        self.values_buf = grow(self.values_buf)
        if self.codes_buf is not None:
            self.codes_buf = grow(self.codes_buf)
        if self.norms_buf is not None:
            self.norms_buf = grow(self.norms_buf.unsqueeze(-1)).squeeze(-1)
        self.capacity = new_cap

    # ----------------------------------------------------------------------------- update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value states [B, Hkv, T, D] (and their codes); see the module docstring
        for what is returned."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, _ = key_states.shape
        if B != self.batch_size or H != self.keys_buf.shape[1]:
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} do not match the cache "
                f"(batch {self.batch_size}, kv-heads {self.keys_buf.shape[1]}); call reset() for a new batch"
            )
        dev = self.keys_buf.device
        key_states = key_states.to(dev)
        value_states = value_states.to(dev)
        cache = self._cache_ref() if self._cache_ref is not None else None
        valid, counts = cache._step_validity(B, T, dev) if cache is not None else (None, None)
        prefill = self.padded_len == 0
        old_lens = self.lens
        new_lens = [n + (T if counts is None else c) for n, c in zip(old_lens, counts or old_lens)]
        self._ensure_capacity(max(new_lens) if new_lens else 0)

        codes = None
        first_centred = self.norms_buf is not None and self.key_mu is None
        if self.codes_buf is not None and not first_centred:  # (first_centred: after the append)
            codes = hash_encode(key_states, self.code_weight, bias=self.key_bias)  # [B, H, T, W]
        if valid is None:
            self._append_all(key_states, value_states, codes, old_lens, T)
            qpos = None  # computed on demand (step_query_pos)
        else:
            self._append_valid(key_states, value_states, codes, valid, old_lens, new_lens)
            self.seq_lens = torch.tensor(new_lens, dtype=torch.int32, device=dev)
            old = torch.tensor(old_lens, dtype=torch.long, device=dev).view(B, 1)
            qpos = (old + valid.to(torch.long).cumsum(1) - 1).clamp(min=0)
        self.lens = new_lens
        if self.norms_buf is not None:
            self._store_norms(key_states, valid, old_lens, new_lens, first_centred)
        self.padded_len += T
        self.updates += 1
        self._step_qpos, self._step_T = qpos, T
        self.step_all_real = valid is None
        self.step_kind = "prefill" if prefill else ("decode" if T == 1 and valid is None else "extend")
        L = self.max_len
        self.keys = self.keys_buf[:, :, :L]
        self.values = self.values_buf[:, :, :L]
        ret = (key_states, value_states) if prefill else (self.keys, self.values)
        self._returned_key = weakref.ref(ret[0])
        _ACTIVE.layer = weakref.ref(self)
        return ret

    def _store_norms(self, k, valid, old_lens, new_lens, first: bool) -> None:
        """centered_norm: after the append, the fp16 ``||k - mu||`` of the new rows. The first
        update fixes mu (mean of each sequence's stored rows, per kv-head) and then encodes the
        codes and norms of all its rows from the buffer (its codes were not written before)."""
        if first:
            L = max(new_lens) if new_lens else 0
            keys = self.keys_buf[:, :, :L]
            self.key_mu = key_mean(keys, self.seq_lens)
            self.key_bias = hash_bias(self.key_mu, self.code_weight)
            self.codes_buf[:, :, :L] = hash_encode(keys, self.code_weight, bias=self.key_bias)
            self.norms_buf[:, :, :L] = key_norms(keys, self.key_mu)
        elif valid is None:
            T = k.shape[2]
            key_norms(k, self.key_mu, out=self.norms_buf, positions=self.seq_lens - T)
        else:
            for b in range(k.shape[0]):
                sel = valid[b].nonzero().view(-1)
                self.norms_buf[b, :, old_lens[b] : new_lens[b]] = key_norms(
                    k[b : b + 1, :, sel], self.key_mu[b : b + 1])[0]

    def _append_all(self, k, v, codes, old_lens, T) -> None:
        """Every new token is real: rows lens[b] .. lens[b]+T-1 (one slice write when all
        sequences have the same length, else a scatter; no host sync)."""
        B = k.shape[0]
        if len(set(old_lens)) <= 1:
            s = old_lens[0] if old_lens else 0
            self.keys_buf[:, :, s : s + T] = k
            self.values_buf[:, :, s : s + T] = v
            if codes is not None:
                self.codes_buf[:, :, s : s + T] = codes
        else:
            rows = self.seq_lens.to(torch.long).view(B, 1, 1, 1) + torch.arange(T, device=k.device).view(1, 1, T, 1)
            self.keys_buf.scatter_(2, rows.expand_as(k), k)
            self.values_buf.scatter_(2, rows.expand_as(v), v)
            if codes is not None:
                self.codes_buf.scatter_(2, rows.expand_as(codes), codes)
        self.seq_lens = self.seq_lens + T

    def _append_valid(self, k, v, codes, valid, old_lens, new_lens) -> None:
        """Padded step: sequence b's real tokens (``valid[b]``, bool [T]) go to rows
        old_lens[b] .. new_lens[b]-1 (one host read of each row's token positions)."""
        for b in range(k.shape[0]):
            sel = valid[b].nonzero().view(-1)
            s, e = old_lens[b], new_lens[b]
            self.keys_buf[b, :, s:e] = k[b, :, sel]
            self.values_buf[b, :, s:e] = v[b, :, sel]
            if codes is not None:
                self.codes_buf[b, :, s:e] = codes[b, :, sel]

    # ----------------------------------------------------------------------------- attention
    def attend_blocks(self, q: torch.Tensor, block_idx: torch.Tensor, *, chunk_size: int,
                      scale: float) -> torch.Tensor:
        """Sparse decode attention of q [B, Hq, D] (or [B, Hq, T, D]: a verify step's T
        queries, causal among the last T tokens) over the blocks block_idx [B, Hkv, K] of this
        layer's cache -> q's shape (``sparse_decode_attention``). The storage step that
        the attention function calls; a layer keeping its K/V elsewhere (``kvcomp.offload``)
        overrides it."""
        L = self.max_len
        return sparse_decode_attention(
            q, self.keys_buf[:, :, :L], self.values_buf[:, :, :L], block_idx, self.seq_lens,
            chunk_size=chunk_size, scale=scale,
        )

    # ----------------------------------------------------------------------------- Cache API
    def get_seq_length(self) -> int:
        return self.padded_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.padded_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop the stored tokens (the next update starts a new batch)."""
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` columns (a negative int, as transformers >= 5.18
        calls it); a positive value keeps that many columns (the older transformers meaning); 0 is a no-op.
        Each sequence loses its tokens in those columns (at most all of its tokens)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        remove = -tokens_to_remove if tokens_to_remove < 0 else self.padded_len - tokens_to_remove
        if remove <= 0:
            return
        remove = min(remove, self.padded_len)
        self.padded_len -= remove
        self.lens = [max(0, n - remove) for n in self.lens]
        self.seq_lens = (self.seq_lens - remove).clamp(min=0)
        self.keys = self.keys_buf[:, :, : self.max_len]
        self.values = self.values_buf[:, :, : self.max_len]
        self.step_block_idx = None

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys_buf.device, torch.long)
        host = index.tolist()
        self.keys_buf = self.keys_buf.index_select(0, index)
        self.values_buf = self.values_buf.index_select(0, index)
        if self.codes_buf is not None:
            self.codes_buf = self.codes_buf.index_select(0, index)
        for name in ("norms_buf", "key_mu", "key_bias"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))
        self.seq_lens = self.seq_lens.index_select(0, index)
        self.lens = [self.lens[i] for i in host]
        self.batch_size = len(host)
        self.keys = self.keys_buf[:, :, : self.max_len]
        self.values = self.values_buf[:, :, : self.max_len]
        self.step_block_idx = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence i becomes old sequence beam_idx[i]."""
        self._select_batch(torch.as_tensor(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().view(-1)
            self._select_batch(idx)

    # ----------------------------------------------------------------------------- stats
    def n_blocks(self) -> torch.Tensor:
        """[B] int32 number of chunk_size blocks of each sequence (on the layer's device)."""
        return (self.seq_lens + self.chunk_size - 1) // self.chunk_size

    def record_step(self, mode: str, block_idx: torch.Tensor | None) -> None:
        """Count one decode step: blocks attended vs available over (sequence, kv-head)."""
        H = self.keys_buf.shape[1]
        c = self.chunk_size
        available = H * sum(-(-n // c) for n in self.lens)  # host lengths: no kernel, no sync
        attended = available if block_idx is None else (block_idx >= 0).sum()
        self.stat.add(mode, attended, available, block_idx)

    def stats(self) -> dict:
        return self.stat.summary()

    # debug views (``debug=True``)
    @property
    def last_block_idx(self) -> torch.Tensor | None:
        return self.stat.last_block_idx

    @property
    def history(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return self.stat.history


def _accumulate(total, x):
    """total + x for counters that are host ints or device tensors (kept on x's device)."""
    if total is None:
        return x.clone() if isinstance(x, torch.Tensor) else x
    if isinstance(total, torch.Tensor) and isinstance(x, torch.Tensor):
        return total.to(x.device) + x
    return total + x if isinstance(total, torch.Tensor) else x + total


class LayerStats:
    """Decode-step counters of one layer, kept on the device (no host sync until read).

    ``steps``: decode steps per mode ("dense", "compute", "reuse"); ``attended`` /
    ``available``: blocks summed over steps, sequences and kv-heads. With ``debug``, also the
    last block_idx [B, Hkv, K] and per step (mode, attended, available)."""

    def __init__(self, debug: bool = False):
        self.debug = debug
        self.steps = {"dense": 0, "compute": 0, "reuse": 0}
        self.attended: torch.Tensor | None = None
        self.available: torch.Tensor | None = None
        self.last_block_idx: torch.Tensor | None = None
        self.history: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def add(self, mode: str, attended: torch.Tensor | int, available: torch.Tensor | int, block_idx) -> None:
        """Count a step; ``attended`` / ``available`` are device tensors or host ints."""
        self.steps[mode] += 1
        self.attended = _accumulate(self.attended, attended)
        self.available = _accumulate(self.available, available)
        if self.debug:
            self.last_block_idx = block_idx
            self.history.append((mode, attended, available))

    def summary(self) -> dict:
        attended = int(self.attended) if self.attended is not None else 0
        available = int(self.available) if self.available is not None else 0
        return {
            "steps": dict(self.steps),
            "blocks_attended": attended,
            "blocks_available": available,
            "share_read": attended / available if available else None,
        }


def summarize(layer_stats: Sequence[LayerStats]) -> dict:
    """{"layers": {i: {...}}, "blocks_attended", "blocks_available", "share_read"}: counts
    summed over decode steps, sequences and kv-heads (reading syncs once per layer)."""
    per = {i: s.summary() for i, s in enumerate(layer_stats)}
    att = sum(s["blocks_attended"] for s in per.values())
    avail = sum(s["blocks_available"] for s in per.values())
    return {
        "layers": per,
        "blocks_attended": att,
        "blocks_available": avail,
        "share_read": att / avail if avail else None,
    }


class KVCompCache(Cache):
    """A transformers ``Cache`` of ``KVCompLayer``s (one per decoder layer).

    Args:
        num_layers:       decoder layers of the model
        chunk_size:       tokens per block (capacity grows in multiples of it)
        code_weights:     per layer, the hash projection [Hkv, D, BITS] (float) of the layers
                          whose keys must be encoded, or None (no codes kept)
        sliding_windows:  per layer, the sliding window (those layers attend densely within it)
                          or None
        debug:            keep each layer's last block_idx and per-step counts
        token_score:      "hamming" (codes of k) or "centered_norm" (codes of k - mu and an
                          fp16 ||k - mu|| per token; ``KVCompConfig.token_score``)
    """

    def __init__(
        self,
        num_layers: int,
        *,
        chunk_size: int = 128,
        code_weights: Sequence[torch.Tensor | None] | None = None,
        sliding_windows: Sequence[int | None] | None = None,
        debug: bool = False,
        token_score: str = "hamming",
    ):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if token_score not in ("hamming", "centered_norm"):
            raise ValueError(f"token_score must be 'hamming' or 'centered_norm', got {token_score!r}")
        extra = {"centered_norm": True} if token_score == "centered_norm" else {}
        code_weights = list(code_weights) if code_weights is not None else [None] * num_layers
        sliding_windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        for name, seq in (("code_weights", code_weights), ("sliding_windows", sliding_windows)):
            if len(seq) != num_layers:
                raise ValueError(f"{name} has {len(seq)} entries, the model has {num_layers} layers")
        self.chunk_size = chunk_size
        self.debug = debug
        self._step: tuple | None = None
        layers = [
            self._make_layer(
                i,
                chunk_size=chunk_size,
                code_weight=code_weights[i],
                sliding_window=sliding_windows[i],
                cache=self,
                debug=debug,
                **extra,
            )
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)

    def _make_layer(self, layer_idx: int, **kwargs) -> KVCompLayer:
        """The storage of one layer (a subclass may return a KVCompLayer subclass, e.g. the
        host-offloaded layers of ``kvcomp.offload``)."""
        return KVCompLayer(layer_idx, **kwargs)

    # -------------------------------------------------------------------- padding per step
    def begin_step(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        """Record which of the step's ``q_len`` new columns are real tokens.

        attention_mask: the model's 2-D mask [B, past + q_len] (1 = token, 0 = padding) or None
        (all real). Called once per forward, before the layers run (one host sync when a mask
        is given, none otherwise)."""
        self._step = None
        if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return
        if attention_mask.shape[1] < q_len:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} is shorter than the {q_len} new tokens"
            )
        valid = attention_mask[:, attention_mask.shape[1] - q_len :].bool()
        counts = valid.sum(1).tolist()
        if all(c == q_len for c in counts):
            return
        self._step = (valid, counts, {valid.device: valid})

    def end_step(self) -> None:
        self._step = None

    def _step_validity(self, batch: int, q_len: int, device: torch.device):
        if self._step is None:
            return None, None
        valid, counts, per_device = self._step
        if tuple(valid.shape) != (batch, q_len):
            raise ValueError(
                f"the step's attention_mask covers {tuple(valid.shape)} (batch, new tokens) but a layer "
                f"received {(batch, q_len)}"
            )
        if device not in per_device:
            per_device[device] = valid.to(device)
        return per_device[device], counts

    # -------------------------------------------------------------------- observability
    @property
    def layer_stats(self) -> list[LayerStats]:
        return [layer.stat for layer in self.layers]

    @property
    def stats(self) -> dict:
        """Decode-step counters of every layer (``summarize``)."""
        return summarize(self.layer_stats)

    def seq_lens(self, layer_idx: int = 0) -> list[int]:
        """Real (unpadded) token counts per sequence of a layer."""
        return list(self.layers[layer_idx].lens)
