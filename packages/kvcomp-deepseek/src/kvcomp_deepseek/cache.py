"""The MLA latent cache: ``KVCompCache`` of ``MLACacheLayer``s.

DeepSeek attention (transformers >= 5.17) calls ``cache.update(kv_nope, k_rot, layer_idx)``
with the *latent* of the new tokens and expands it into per-head K/V afterwards
(``module.expand_kv``). An ``MLACacheLayer`` stores exactly that latent, compacted per sequence
like every ``KVCompLayer`` (padding removed, rows 0 .. lens[b]-1):

    keys_buf    [B, 1, capacity, R]  c_kv after kv_a_layernorm (R = kv_lora_rank), model dtype
    values_buf  [B, 1, capacity, P]  k_pe after RoPE (P = qk_rope_head_dim), model dtype
    mla_codes   [B, 1, capacity, W]  int32 split key codes [hash(c_kv) | hash(k_pe)]:
                                     words 0 .. bits_kv/32 - 1 from c_kv @ W_lat, then
                                     bits_rope/32 words from k_pe @ W_rope (kvcomp.ops.hash_encode
                                     layout), only on layers that compute a selection

Per-head K/V are never stored: 1152 bytes per token at R = 512, P = 64 in bf16, plus 72 bytes
of codes at 512 + 64 bits.
"""

from __future__ import annotations

import torch
from kvcomp.cache import KVCompCache, KVCompLayer
from kvcomp.ops import hash_encode_split

__all__ = ["MLACache", "MLACacheLayer", "split_codes"]


def split_codes(lat: torch.Tensor, pe: torch.Tensor, w_lat: torch.Tensor, w_rope: torch.Tensor):
    """[hash(lat) | hash(pe)]: lat [..., R], pe [..., P], w_lat [R, bits_kv], w_rope [P, bits_rope]
    -> int32 [..., (bits_kv + bits_rope) / 32] (``kvcomp.ops.hash_encode_split``: one launch)."""
    return hash_encode_split((lat, pe), (w_lat, w_rope))


class MLACacheLayer(KVCompLayer):
    """One layer's latent storage (+ split codes). See the module docstring."""

    def __init__(self, layer_idx: int, *, chunk_size: int, hash_weights=None,
                 cache: KVCompCache | None = None, debug: bool = False):
        self.mla_weights = hash_weights  # (w_lat [R, bits_kv], w_rope [P, bits_rope]) or None
        super().__init__(layer_idx, chunk_size=chunk_size, code_weight=None, sliding_window=None,
                         cache=cache, debug=debug)

    def _clear(self) -> None:
        super()._clear()
        self.mla_codes: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.mla_weights is None:
            return
        w_lat, w_rope = self.mla_weights
        B, H, _, R = key_states.shape
        P = value_states.shape[-1]
        if H != 1 or w_lat.shape[0] != R or w_rope.shape[0] != P:
            raise ValueError(
                f"layer {self.layer_idx}: latent [B, {H}, T, {R}] / rope [B, {H}, T, {P}] do not fit "
                f"the MLA hash weights {tuple(w_lat.shape)} / {tuple(w_rope.shape)} "
                "(expected one latent head, [R, bits_kv] and [P, bits_rope])"
            )
        dev = key_states.device
        self.mla_weights = (w_lat.to(dev), w_rope.to(dev))
        W = (w_lat.shape[1] + w_rope.shape[1]) // 32
        self.mla_codes = torch.zeros(B, 1, 0, W, dtype=torch.int32, device=dev)

    def _ensure_capacity(self, needed: int) -> None:
        super()._ensure_capacity(needed)
        c = self.mla_codes
        if c is not None and c.shape[2] < self.capacity:
            new = c.new_zeros(c.shape[0], 1, self.capacity, c.shape[3])
            new[:, :, : c.shape[2]] = c
            self.mla_codes = new

    def _select_batch(self, index: torch.Tensor) -> None:
        super()._select_batch(index)
        if self.mla_codes is not None and self.is_initialized:
            self.mla_codes = self.mla_codes.index_select(0, index.to(self.mla_codes.device, torch.long))

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the latent (kv_nope [B, 1, T, R], k_pe [B, 1, T, P]) and encode the new rows."""
        old_lens = list(self.lens) if self.is_initialized else None
        ret = super().update(key_states, value_states, *args, **kwargs)
        if self.mla_codes is not None:
            self._encode_rows(old_lens or [0] * self.batch_size)
        return ret

    def _encode_rows(self, old_lens: list[int]) -> None:
        """Codes of the rows each sequence gained in this update: old_lens[b] .. lens[b]-1."""
        w_lat, w_rope = self.mla_weights
        counts = [n - o for n, o in zip(self.lens, old_lens)]
        T = max(counts, default=0)
        if T == 0:
            return
        if len(set(counts)) == 1 and len(set(old_lens)) == 1:
            s = old_lens[0]
            self.mla_codes[:, :, s : s + T] = split_codes(
                self.keys_buf[:, :, s : s + T], self.values_buf[:, :, s : s + T], w_lat, w_rope
            )
        elif len(set(counts)) == 1:  # ragged lengths, same number of new tokens (decode)
            B, dev = self.batch_size, self.keys_buf.device
            rows = torch.tensor(old_lens, device=dev).view(B, 1, 1, 1) + torch.arange(
                T, device=dev
            ).view(1, 1, T, 1)  # [B, 1, T, 1]
            lat = self.keys_buf.gather(2, rows.expand(B, 1, T, self.keys_buf.shape[3]))
            pe = self.values_buf.gather(2, rows.expand(B, 1, T, self.values_buf.shape[3]))
            codes = split_codes(lat, pe, w_lat, w_rope)
            self.mla_codes.scatter_(2, rows.expand_as(codes), codes)
        else:
            for b, (s, e) in enumerate(zip(old_lens, self.lens)):
                if e > s:
                    self.mla_codes[b : b + 1, :, s:e] = split_codes(
                        self.keys_buf[b : b + 1, :, s:e], self.values_buf[b : b + 1, :, s:e],
                        w_lat, w_rope,
                    )


class MLACache(KVCompCache):
    """A ``KVCompCache`` whose layers hold the MLA latent (see the module docstring).

    Args:
        num_layers:     decoder layers of the model
        chunk_size:     tokens per block
        hash_weights:   per layer (w_lat [R, bits_kv], w_rope [P, bits_rope]) float tensors for
                        the layers that compute a selection, else None
        debug:          keep each layer's last block_idx and per-step counts
    """

    def __init__(self, num_layers: int, *, chunk_size: int = 128, hash_weights=None,
                 debug: bool = False):
        super().__init__(num_layers, chunk_size=chunk_size, debug=debug)
        hash_weights = list(hash_weights) if hash_weights is not None else [None] * num_layers
        if len(hash_weights) != num_layers:
            raise ValueError(f"hash_weights has {len(hash_weights)} entries, the model has {num_layers} layers")
        self.layers = [
            MLACacheLayer(i, chunk_size=chunk_size, hash_weights=hash_weights[i], cache=self,
                          debug=debug)
            for i in range(num_layers)
        ]
