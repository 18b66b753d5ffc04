"""``MLAStaticCache``: a preallocated MLA latent cache whose decode step can run in a CUDA graph.

    handle = kvcomp.enable(model)                               # a DeepSeek-V2 / V3 model
    cache = handle.new_cache(static=True, max_cache_len=N)
    model.generate(**inputs, past_key_values=cache, ...)        # or handle.compile_decode()

What ``kvcomp.static_cache.KVCompStaticLayer`` does for GQA K/V, for the MLA latent (the
storage of ``kvcomp_deepseek.cache.MLACacheLayer``), allocated once at the first update, full
length:

    keys_buf    [B, 1, max_cache_len, R]  c_kv after kv_a_layernorm (R = kv_lora_rank), model dtype
    values_buf  [B, 1, max_cache_len, P]  k_pe after RoPE (P = qk_rope_head_dim), model dtype
    mla_codes   [B, 1, max_cache_len, W]  int32 split key codes [hash(c_kv) | hash(k_pe)]
                                          (``kvcomp_deepseek.cache.split_codes``), only on layers
                                          that compute a selection

Token t of every sequence is at row t. The shared device state (``length`` int64 [1],
``seq_lens`` int32 [B], ``write_pos`` int64 [T]) is ``KVCompStaticCache``'s: the first layer that
updates in a forward advances it with tensor ops, every layer writes its latent and codes with
``index_copy_`` at ``write_pos`` (a one-token step below the threshold writes no codes; the first
step at it encodes the rows left, as ``KVCompStaticLayer.fill_codes`` does for GQA). Nothing is
reallocated after the first update (``reset``, ``crop`` work in place), no host sync on a
one-token step, shapes fixed by ``max_cache_len``.

Decode (``kvcomp_deepseek.attention``): every one-token step on a static layer runs in latent
space (weight absorption) over the full buffers, reading the lengths from ``seq_lens``:
``mla_decode`` (every stored token) on dense layers and below the threshold, else split codes
of the query -> ``hamming_topk`` (``k_blocks_tensor``) -> ``sparse_mla_decode``. Prefill runs the
model's own attention; a multi-token step with a past expands the latent with the model's
``expand_kv`` and a mask from ``seq_lens``. As with the GQA static cache: no padding (use the
dynamic ``handle.new_cache()`` for left-padded batches), a fixed batch size, and no decode
counters (``stats`` reports zero steps).
"""

from __future__ import annotations

import torch
from kvcomp.ops import hash_encode_split
from kvcomp.static_cache import KVCompStaticCache, KVCompStaticLayer

from kvcomp_deepseek.cache import split_codes

__all__ = ["MLAStaticCache", "MLAStaticCacheLayer"]


class MLAStaticCacheLayer(KVCompStaticLayer):
    """One layer's preallocated latent (+ split codes). See the module docstring.

    ``hash_weights``: (w_lat [R, bits_kv], w_rope [P, bits_rope]) float tensors for a layer
    that computes a selection, else None (no codes kept)."""

    def __init__(self, layer_idx: int, *, max_cache_len: int, hash_weights=None, **kwargs):
        self.mla_weights = hash_weights
        kwargs.pop("code_weight", None)
        kwargs.pop("sliding_window", None)
        kwargs.pop("centered_norm", None)
        super().__init__(layer_idx, max_cache_len=max_cache_len, code_weight=None,
                         sliding_window=None, **kwargs)

    def _clear(self) -> None:
        super()._clear()
        self.mla_codes: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, R = key_states.shape
        P = value_states.shape[-1]
        if H != 1:
            raise ValueError(
                f"layer {self.layer_idx}: the MLA static cache holds one latent head, got latent "
                f"[B, {H}, T, {R}] (a transformers release that caches expanded K/V?)"
            )
        super().lazy_initialization(key_states, value_states)
        if self.mla_weights is None:
            return
        w_lat, w_rope = self.mla_weights
        if w_lat.shape[0] != R or w_rope.shape[0] != P:
            raise ValueError(
                f"layer {self.layer_idx}: latent [B, 1, T, {R}] / rope [B, 1, T, {P}] do not fit the "
                f"MLA hash weights {tuple(w_lat.shape)} / {tuple(w_rope.shape)} "
                "(expected [R, bits_kv] and [P, bits_rope])"
            )
        dev = self.keys_buf.device
        self.mla_weights = (w_lat.to(dev), w_rope.to(dev))
        W = (w_lat.shape[1] + w_rope.shape[1]) // 32
        self.mla_codes = torch.zeros(B, 1, self.max_cache_len, W, dtype=torch.int32, device=dev)

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the latent (kv_nope [B, 1, T, R], k_pe [B, 1, T, P]) and its split codes at rows
        ``padded_len .. padded_len + T - 1``; returns what ``KVCompStaticLayer.update`` does (the
        new states on the first update, else the full buffers)."""
        ret = super().update(key_states, value_states, *args, **kwargs)
        # the new rows at the device's write_pos (a replayed graph reads it), not at host rows as
        # in _encode_rows; not on a one-token step below the threshold (fill_codes later)
        if self.step_coded:
            cache: MLAStaticCache = self._cache_ref()
            dev = self.keys_buf.device
            B = key_states.shape[0]
            write_pos = cache.step_shared(("write_pos", dev), lambda: cache._write_pos.to(dev))
            start = cache.step_shared(("start", dev, B), lambda: write_pos[:1].expand(B).contiguous())
            hash_encode_split((key_states.to(dev), value_states.to(dev)), self.mla_weights,
                              out=self.mla_codes, positions=start)  # one launch
        return ret

    def keeps_codes(self) -> bool:
        return self.mla_codes is not None

    def _encode_rows(self, a: int, b: int) -> None:
        """The split codes of the stored latent of rows ``a .. b - 1``."""
        w_lat, w_rope = self.mla_weights
        self.mla_codes[:, :, a:b] = split_codes(self.keys_buf[:, :, a:b], self.values_buf[:, :, a:b],
                                                w_lat, w_rope)

    def _select_batch(self, index: torch.Tensor) -> None:
        super()._select_batch(index)
        if self.mla_codes is not None and self.is_initialized:
            index = index.to(self.mla_codes.device, torch.long)
            self.mla_codes.copy_(self.mla_codes.index_select(0, index))


class MLAStaticCache(KVCompStaticCache):
    """A transformers ``Cache`` of ``MLAStaticCacheLayer``s, preallocated to ``max_cache_len``.

    Args:
        num_layers:         decoder layers of the model
        max_cache_len:      tokens per sequence the cache holds (prompt included)
        chunk_size:         tokens per block
        hash_weights:       per layer (w_lat [R, bits_kv], w_rope [P, bits_rope]) float tensors
                            for the layers that compute a selection, else None
        seq_len_threshold:  the config's threshold (``decode_phase``; the handle passes it)
        debug:              as ``KVCompCache``
    """

    def __init__(self, num_layers: int, *, max_cache_len: int, chunk_size: int = 128,
                 hash_weights=None, seq_len_threshold: int | None = None, debug: bool = False):
        hash_weights = list(hash_weights) if hash_weights is not None else [None] * num_layers
        if len(hash_weights) != num_layers:
            raise ValueError(f"hash_weights has {len(hash_weights)} entries, the model has {num_layers} layers")
        self._mla_hash_weights = hash_weights
        super().__init__(num_layers, max_cache_len=max_cache_len, chunk_size=chunk_size,
                         debug=debug, seq_len_threshold=seq_len_threshold)

    def _make_layer(self, layer_idx: int, **kwargs) -> MLAStaticCacheLayer:
        return MLAStaticCacheLayer(layer_idx, max_cache_len=self._max_cache_len,
                                   hash_weights=self._mla_hash_weights[layer_idx], **kwargs)
