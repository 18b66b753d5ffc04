"""``KVCompStaticCache``: a preallocated kvcomp cache whose decode step can run in a CUDA graph.

    cache = handle.new_cache(static=True, max_cache_len=N)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=...)
    # or by hand: model(ids, past_key_values=cache); kvcomp.graphs replays the decode steps

Storage of one layer (``KVCompStaticLayer``), allocated once at its first update, full length:

    keys_buf    [B, Hkv, max_cache_len, D]  the keys' dtype; token t of every sequence at row t
    values_buf  [B, Hkv, max_cache_len, D]
    codes_buf   [B, Hkv, max_cache_len, W]  int32 key codes (W = BITS // 32, layout of
                                            ``kvcomp.ops.hash_encode``), only on layers that
                                            compute a selection

State shared by the layers of one cache (device tensors, made at the first update):

    length      int64 [1]   tokens stored
    seq_lens    int32 [B]   the same count per sequence (what the kernels read)
    write_pos   int64 [T]   rows the current forward writes: length before it + arange(T)

The first layer that updates in a forward advances the shared state (tensor ops only); every
layer writes its keys, values and codes at ``write_pos`` (``kvcomp.ops.append_kv``: one kernel
for a decode step). A one-token step below ``seq_len_threshold`` writes no code: it attends to
every block, and nothing reads codes until the threshold. ``KVCompStaticLayer.coded_len``
counts the rows that have one; the first update at or above the threshold (or any multi-token
update) encodes the rows in between first (``fill_codes``, one ``hash_encode``), and before a
replayed step ``kvcomp.graphs.DecodeGraphs`` calls ``KVCompStaticCache.fill_codes()``. The per-step
hot path therefore has no host sync, no allocation whose size depends on device values and
only shapes fixed by ``max_cache_len``: a one-token decode forward can be captured once and
replayed (``kvcomp.graphs.DecodeGraphs``). The tensors above are never reallocated after the
first update (``reset`` and ``crop`` work in place), so a captured graph stays valid.

No padding: every sequence of the batch holds the same number of tokens. A forward whose
``attention_mask`` marks padding among its new tokens raises ValueError (use the dynamic
``handle.new_cache()`` for left-padded batches); a one-token decode step does not read the
mask (that would be a host sync; ``generate`` only appends ones).

Host mirrors: each layer's ``padded_len`` / ``lens`` (what ``get_seq_length`` returns and the
eager paths use) advance in ``update`` and, for graph replays that run no Python, in
``advance(T)``; ``checkpoint()`` / ``restore()`` save and put back the whole length state.

Decode attention (``kvcomp.attention``): at or above the threshold, sparse layers run encode
-> select -> attend over the full buffers (``LayerPolicy.k_blocks_tensor``, no host read);
below it, and on dense layers, every real block is attended through the same kernel (no
query hashing). The length is the same for every sequence, so the choice is one per step
(``decode_phase``), taken on the host; a graph is captured per phase. Tensors every layer of a step would make
alike (the k_blocks of a ratio, the all-blocks index) are made once per forward
(``step_shared``); the k_blocks are one gather from a table of the policy's rule over every
length, made once per cache (``persistent``), where the rule's ~40 tiny tensor ops ran in every
step before. Static caches keep no decode counters: they would add kernels to every step
(``stats`` reports zero steps).

``KVCompStaticLayer.update_rotary`` is the decode update of a fused decoder
(``kvcomp.fusion.FusedDecode``): it takes the raw q / k / v projections and runs the per-head
norms, RoPE, the append (and key code) and the query codes in one launch
(``kvcomp.ops.rope_append``); the attention function then uses those query codes.
"""

from __future__ import annotations

import weakref

import torch

from kvcomp.cache import _ACTIVE, KVCompCache, KVCompLayer
from kvcomp.ops.append_kv import append_kv
from kvcomp.ops.hash_encode import hash_encode
from kvcomp.ops.key_stats import hash_bias, key_mean, key_norms
from kvcomp.ops.rope_append import rope_append

__all__ = ["KVCompStaticCache", "KVCompStaticLayer"]

# one-token steps below the threshold leave their keys' codes to ``fill_codes`` (False: every
# update writes them; for the end-to-end comparison in tools/experiments/e2e_knobs.py)
DEFER_CODES = True


class KVCompStaticLayer(KVCompLayer):
    """One decoder layer's preallocated K/V (+ codes). See the module docstring."""

    is_static = True

    def __init__(self, layer_idx: int, *, max_cache_len: int, **kwargs):
        self.max_cache_len = int(max_cache_len)
        super().__init__(layer_idx, **kwargs)

    def _clear(self) -> None:
        super()._clear()
        self.capacity = 0
        self.coded_len = 0  # rows 0 .. coded_len - 1 of codes_buf hold their keys' codes
        self.step_coded = False  # the latest update wrote its rows' codes
        self.step_query_codes = None  # (q_rot, codes [B, Hq, W]) made by update_rotary

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, value_states, self.max_cache_len)
        if self.norms_buf is not None:  # fixed buffers: a captured decode step reads them
            B, H, _, D = key_states.shape
            dev = self.keys_buf.device
            self.key_mu = torch.zeros(B, H, D, dtype=torch.float32, device=dev)
            self.key_bias = torch.zeros(B, H, self.code_weight.shape[-1], dtype=torch.float32, device=dev)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value states [B, Hkv, T, D] (and their codes) at rows ``padded_len ..
        padded_len + T - 1``. Returns the new states on the first update (prefill runs the
        model's own attention), else the full buffers [B, Hkv, max_cache_len, D] (the attention
        function reads ``seq_lens``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states, value_states, seq_lens, start = self._begin_write(key_states, value_states)
        T = key_states.shape[2]
        dev = self.keys_buf.device
        prefill = self.padded_len == 0
        if self.norms_buf is not None and prefill:  # centered_norm: mu of the prompt (no padding)
            lens = torch.full((key_states.shape[0],), T, dtype=torch.int32, device=dev)
            self.key_mu.copy_(key_mean(key_states, lens))
            self.key_bias.copy_(hash_bias(self.key_mu, self.code_weight))
        coded = self._codes_now(T)
        own = coded and self.codes_buf is not None  # (a subclass may keep its codes elsewhere)
        # keys, values and codes in one launch for a decode step (kvcomp.ops.append_kv)
        append_kv(key_states, value_states, self.keys_buf, self.values_buf, start,
                  codes=self.codes_buf if own else None, weight=self.code_weight if own else None,
                  bias=self.key_bias if own else None)
        if self.norms_buf is not None:
            key_norms(key_states, self.key_mu, out=self.norms_buf, positions=start)
        ret = (key_states, value_states) if prefill else (self.keys_buf, self.values_buf)
        return self._end_write(seq_lens, T, prefill, ret, coded)

    def update_rotary(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, *, q_norm: torch.Tensor | None = None,
                      k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                      q_weight: torch.Tensor | None = None, early: bool = False):
        """A decode step's update that also finishes the query (``kvcomp.ops.rope_append``, one
        launch): q [B, Hq, 1, D], k / v [B, Hkv, 1, D] are the raw projections; the per-head
        norms (``q_norm`` / ``k_norm`` [D], optional), the rotary embedding (cos / sin
        [B or 1, 1, D]) and the key's code are applied here, and with ``q_weight`` [Hkv, D, BITS]
        the query codes are made in the same launch and kept for the attention function
        (``step_query_codes``). ``early``: q / k / v come from the previous launch and nothing
        else does (``rope_append``). Returns (q_rot [B, Hq, 1, D], keys_buf, values_buf).
        Not for the first update (prefill) nor layers that keep key norms (``update``)."""
        if not self.is_initialized or self.padded_len == 0:
            raise RuntimeError(f"layer {self.layer_idx}: update_rotary is for decode steps after the prefill")
        if self.norms_buf is not None:
            raise RuntimeError(f"layer {self.layer_idx} keeps key norms (centred codes): use update()")
        if k.dim() != 4 or k.shape[2] != 1:  # before the shared state advances
            raise ValueError(f"layer {self.layer_idx}: update_rotary takes k [B, Hkv, 1, D] (one new "
                             f"token), got {tuple(k.shape)}")
        k, v, seq_lens, start = self._begin_write(k, v)
        coded = self._codes_now(1)
        own = coded and self.codes_buf is not None
        q_rot, q_codes = rope_append(
            q, k, v, cos, sin, self.keys_buf, self.values_buf, start, q_norm=q_norm, k_norm=k_norm,
            eps=eps, codes=self.codes_buf if own else None, k_weight=self.code_weight if own else None,
            k_bias=self.key_bias if own else None, q_weight=q_weight, early=early)
        self.step_query_codes = (q_rot, q_codes) if q_codes is not None else None
        keys, values = self._end_write(seq_lens, 1, False, (self.keys_buf, self.values_buf), coded)
        return q_rot, keys, values

    # ------------------------------------------------------------------------ deferred codes
    def keeps_codes(self) -> bool:
        """Whether the layer stores key codes (it computes a selection); a subclass that keeps
        them in another buffer overrides this and ``_encode_rows``."""
        return self.codes_buf is not None

    def _encode_rows(self, a: int, b: int) -> None:
        """Write the codes of the stored keys of rows ``a .. b - 1`` (one ``hash_encode``)."""
        pos = torch.full((self.batch_size,), a, dtype=torch.int64, device=self.keys_buf.device)
        hash_encode(self.keys_buf[:, :, a:b], self.code_weight, bias=self.key_bias, out=self.codes_buf,
                    positions=pos)

    def _codes_now(self, T: int) -> bool:
        """Whether this update (shared state advanced, ``padded_len`` not yet) writes its rows'
        codes. A one-token step below the threshold does not: it attends to every block and
        nothing reads codes until the threshold, so its key's code waits for ``fill_codes``
        (saves the code's work in every hashed layer of every step below it). Any other update
        first encodes the rows such steps left (``fill_codes``), then its own."""
        if not self.keeps_codes():
            return False
        cache: KVCompStaticCache = self._cache_ref()
        t = cache.seq_len_threshold
        if DEFER_CODES and T == 1 and t is not None and cache.host_len < t:
            return False
        self.fill_codes()
        return True

    def fill_codes(self) -> None:
        """Encode the keys of rows ``coded_len .. padded_len - 1`` into ``codes_buf`` (one
        ``hash_encode``; nothing when every stored row has its code). Eager only: the rows are
        host values, so it must not run inside a graph capture (``KVCompStaticCache.fill_codes``
        runs it before a replayed step at or above the threshold)."""
        a, b = self.coded_len, self.padded_len
        if not self.keeps_codes() or a >= b:
            self.coded_len = min(self.coded_len, self.padded_len)
            return
        if self.keys_buf.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"layer {self.layer_idx}: rows {a}..{b - 1} have no key codes during a graph capture "
                "(KVCompStaticCache.fill_codes must run before the capture)"
            )
        self._encode_rows(a, b)
        self.coded_len = b

    def _begin_write(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Checks and the shared step state of an update: (keys, values on the cache's device,
        seq_lens [B], the step's first row per sequence [B])."""
        cache: KVCompStaticCache = self._cache_ref()
        B, H, T, _ = key_states.shape
        if B != self.batch_size or H != self.keys_buf.shape[1]:
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} do not match the static "
                f"cache (batch {self.batch_size}, kv-heads {self.keys_buf.shape[1]}); make a new cache "
                "for another batch size"
            )
        if self.padded_len + T > self.capacity:
            raise ValueError(
                f"static kvcomp cache is full: {self.padded_len} tokens stored + {T} new > "
                f"max_cache_len={self.capacity}"
            )
        dev = self.keys_buf.device
        write_pos, seq_lens = cache._advance_shared(self, B, T, dev)
        # every sequence writes at the same rows; one contiguous [B] per step, shared by the layers
        start = cache.step_shared(("start", dev, B), lambda: write_pos[:1].expand(B).contiguous())
        self.step_query_codes = None
        return key_states.to(dev), value_states.to(dev), seq_lens, start

    def _end_write(self, seq_lens: torch.Tensor, T: int, prefill: bool, ret, coded: bool):
        self.seq_lens = seq_lens
        self._advance_host(T)
        self.step_coded = coded  # this update wrote its rows' codes
        if coded:
            self.coded_len = self.padded_len
        self.updates += 1
        self.step_kind = "prefill" if prefill else ("decode" if T == 1 else "extend")
        self.keys, self.values = self.keys_buf, self.values_buf
        self._returned_key = weakref.ref(ret[0])
        _ACTIVE.layer = weakref.ref(self)
        return ret

    def _advance_host(self, T: int) -> None:
        self.padded_len += T
        self.lens = [self.padded_len] * self.batch_size
        self._step_qpos, self._step_T = None, T

    # ----------------------------------------------------------------------------- Cache API
    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget the stored tokens; the buffers stay (a captured graph stays valid)."""
        if not self.is_initialized:
            return
        self.padded_len = self.coded_len = 0
        self.lens = [0] * self.batch_size
        self.step_kind = "none"
        self.step_block_idx = None
        self._step_qpos, self._step_T = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative int, transformers >= 5.18) or keep
        ``tokens_to_remove`` (positive, the older meaning); host mirror only, the cache moves
        the shared device length (``KVCompStaticCache.crop``)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        remove = -tokens_to_remove if tokens_to_remove < 0 else self.padded_len - tokens_to_remove
        remove = max(0, min(remove, self.padded_len))
        self.padded_len -= remove
        self.coded_len = min(self.coded_len, self.padded_len)
        self.lens = [self.padded_len] * self.batch_size
        self.step_block_idx = None

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys_buf.device, torch.long)
        if index.numel() != self.batch_size:
            raise ValueError(
                f"a static kvcomp cache keeps its batch size ({self.batch_size}); got a selection of "
                f"{index.numel()} sequences (use the dynamic handle.new_cache())"
            )
        for buf in (self.keys_buf, self.values_buf, self.codes_buf, self.norms_buf, self.key_mu,
                    self.key_bias):
            if buf is not None:
                buf.copy_(buf.index_select(0, index))
        self.step_block_idx = None

    def record_step(self, mode: str, block_idx) -> None:
        """Static caches keep no per-step counters (see the module docstring)."""


class KVCompStaticCache(KVCompCache):
    """A transformers ``Cache`` of ``KVCompStaticLayer``s, preallocated to ``max_cache_len``.

    Args: ``num_layers``, ``max_cache_len`` (tokens per sequence, prompt included),
    ``chunk_size``, ``code_weights``, ``sliding_windows``, ``debug`` as ``KVCompCache``;
    ``seq_len_threshold``: the config's threshold (``decode_phase``; the handle passes it)."""

    is_compileable = False

    def __init__(self, num_layers: int, *, max_cache_len: int, chunk_size: int = 128,
                 code_weights=None, sliding_windows=None, debug: bool = False,
                 seq_len_threshold: int | None = None, token_score: str = "hamming"):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        self._max_cache_len = max_cache_len
        self.seq_len_threshold = seq_len_threshold
        super().__init__(num_layers, chunk_size=chunk_size, code_weights=code_weights,
                         sliding_windows=sliding_windows, debug=debug, token_score=token_score)
        self.length: torch.Tensor | None = None  # int64 [1]
        self.seq_lens_shared: torch.Tensor | None = None  # int32 [B]
        self.host_len = 0
        self._write_pos: torch.Tensor | None = None
        self._memo: dict = {}
        self._persistent: dict = {}
        self.storage_version = 0  # bumped when device state is (re)allocated

    @property
    def max_cache_len(self) -> int:
        """Tokens per sequence the cache holds (prompt included)."""
        return self._max_cache_len

    def _make_layer(self, layer_idx: int, **kwargs) -> KVCompStaticLayer:
        return KVCompStaticLayer(layer_idx, max_cache_len=self._max_cache_len, **kwargs)

    # -------------------------------------------------------------------- shared step state
    def _advance_shared(self, layer: KVCompStaticLayer, B: int, T: int, dev: torch.device):
        """(write_pos int64 [T], seq_lens int32 [B]) on ``dev`` for ``layer``'s update; the first
        layer to update in a forward advances the shared device length (tensor ops only)."""
        if self.length is None:
            self.length = torch.zeros(1, dtype=torch.int64, device=dev)
            self.seq_lens_shared = torch.zeros(B, dtype=torch.int32, device=dev)
            self.storage_version += 1
        if self.seq_lens_shared.shape[0] != B:
            raise ValueError(
                f"static kvcomp cache holds a batch of {self.seq_lens_shared.shape[0]}, a layer got {B}"
            )
        if layer.padded_len == self.host_len:  # first layer of this forward
            self._write_pos = torch.arange(T, device=self.length.device) + self.length
            self.length.add_(T)
            self.seq_lens_shared.add_(T)
            self.host_len += T
            self._memo = {}
        elif layer.padded_len + T != self.host_len:
            raise RuntimeError(
                f"layer {layer.layer_idx} holds {layer.padded_len} tokens and gets {T}, but the cache "
                f"is at {self.host_len}: layers of one static cache must update once per forward"
            )
        return (self.step_shared(("write_pos", dev), lambda: self._write_pos.to(dev)),
                self.step_shared(("seq_lens", dev), lambda: self.seq_lens_shared.to(dev)))

    def persistent(self, key, make):
        """A tensor kept for the cache's lifetime (e.g. a policy table): ``make()`` on first use.
        Made in the eager warm-up before a graph capture, it is only read by the replays."""
        t = self._persistent.get(key)
        if t is None:
            t = self._persistent[key] = make()
        return t

    def step_shared(self, key, make):
        """A tensor every layer of the current forward shares: ``make()`` on first use."""
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = make()
        return t

    def begin_step(self, attention_mask, q_len: int) -> None:
        """Reject padding among the new tokens of a multi-token forward (one host read); a
        one-token step reads nothing (graph-safe)."""
        self._step = None
        if q_len == 1 or attention_mask is None or not isinstance(attention_mask, torch.Tensor):
            return
        if attention_mask.dim() != 2:
            return
        if not bool(attention_mask[:, attention_mask.shape[1] - q_len:].bool().all()):
            raise ValueError(
                "static kvcomp cache: the attention_mask marks padding among the new tokens; padded "
                "batches need the dynamic cache (handle.new_cache())"
            )

    # -------------------------------------------------------------------- graph support
    def decode_phase(self) -> bool:
        """Whether the next one-token step reaches ``seq_len_threshold`` (the attention then
        runs the selection; below it every layer attends to all blocks without hashing the
        query). A captured decode graph is valid for one phase (``DecodeGraphs`` keys on it)."""
        t = self.seq_len_threshold
        return t is not None and self.host_len + 1 >= t

    def fill_codes(self) -> None:
        """Before a replayed one-token step at or above the threshold (``decode_phase()``):
        encode, on every layer, the keys whose codes the steps below it left unwritten
        (``KVCompStaticLayer.fill_codes``; eager, nothing to do after the first such step).
        ``kvcomp.graphs.DecodeGraphs`` calls it; eager updates do it themselves."""
        if not self.decode_phase():
            return
        for layer in self.layers:
            if layer.is_initialized:
                layer.fill_codes()

    def advance(self, T: int) -> None:
        """Advance the host mirrors by ``T`` tokens after a replayed step (no Python ran); the
        step wrote its keys' codes unless it was one token below the threshold."""
        t = self.seq_len_threshold
        coded = T > 1 or t is None or self.host_len + T >= t or not DEFER_CODES
        self.host_len += T
        for layer in self.layers:
            if layer.is_initialized:
                if coded and layer.keeps_codes() and layer.coded_len == layer.padded_len:
                    layer.coded_len += T
                layer._advance_host(T)
                layer.updates += 1
                layer.step_kind = "decode" if T == 1 else "extend"

    def checkpoint(self) -> tuple:
        """The length state (host and device) to ``restore`` after a warm-up forward."""
        dev = (self.length.clone(), self.seq_lens_shared.clone()) if self.length is not None else None
        return self.host_len, [(layer.padded_len, layer.updates) for layer in self.layers], dev

    def restore(self, state: tuple) -> None:
        """Put back a ``checkpoint()`` (device tensors written in place)."""
        host_len, per_layer, dev = state
        self.host_len = host_len
        for layer, (n, updates) in zip(self.layers, per_layer):
            if layer.is_initialized:
                layer.padded_len, layer.updates = n, updates
                layer.coded_len = min(layer.coded_len, n)  # rows up to n kept their codes
                layer.lens = [n] * layer.batch_size
        if dev is not None:
            self.length.copy_(dev[0])
            self.seq_lens_shared.copy_(dev[1])
        self._memo = {}

    def set_length(self, n: int) -> None:
        """Declare the first ``n`` rows of every initialized layer valid, their codes included
        (host mirrors and device lengths); for benchmarks and tests that write the buffers and
        codes directly."""
        if self.length is None:
            raise RuntimeError("set_length: the cache has no storage yet (run a forward first)")
        if not 0 <= n <= self._max_cache_len:
            raise ValueError(f"set_length: n must be in [0, max_cache_len={self._max_cache_len}], got {n}")
        self.host_len = n
        for layer in self.layers:
            if layer.is_initialized:
                layer.padded_len = layer.coded_len = n
                layer.lens = [n] * layer.batch_size
        self.length.fill_(n)
        self.seq_lens_shared.fill_(n)
        self._memo = {}

    # -------------------------------------------------------------------- Cache API
    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every stored token; buffers and device state stay allocated (graphs stay valid)."""
        for layer in self.layers:
            layer.reset()
        self.host_len = 0
        if self.length is not None:
            self.length.zero_()
            self.seq_lens_shared.zero_()
        self._memo = {}

    def crop(self, max_length: int) -> None:
        """transformers' crop: a negative ``max_length`` drops that many tokens, a positive one
        keeps that many."""
        if self.length is None or max_length == 0:
            return
        remove = -max_length if max_length < 0 else self.host_len - max_length
        remove = max(0, min(remove, self.host_len))
        if remove == 0:
            return
        for layer in self.layers:
            layer.crop(-remove)
        self.host_len -= remove
        self.length.sub_(remove)
        self.seq_lens_shared.sub_(remove)
        self._memo = {}

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("a static kvcomp cache keeps its batch size; use the dynamic handle.new_cache()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("a static kvcomp cache keeps its batch size; use the dynamic handle.new_cache()")
