"""Per-layer decode policy of a :class:`~kvcomp.config.KVCompConfig`.

For a layer and a sequence length it answers: run dense, compute a block selection, or reuse
an earlier layer's selection; and how many blocks to select.

    mode(layer, seq_len)      "dense"   ratio 1.0, or seq_len < seq_len_threshold
                              "reuse"   top_k_index_reuse[layer] = j != -1 (take j's selection)
                              "compute" otherwise
    k_blocks(layer, seq_len)  n = ceil(seq_len / chunk_size) blocks; dense -> n; sparse ->
                              ceil(ratio * n) (or ceil(top_k_budget_tokens / chunk_size)),
                              at least the number of distinct must-select blocks of a
                              sequence of n blocks, at most n.

The ratio is applied as an exact fraction (the nearest with denominator <= 10**6, exact for
decimals of up to six digits), so ``ceil(0.3 * 10)`` is 3 and not 4 as float math would give,
and the tensor version agrees with the int version bit for bit.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from kvcomp.config import KVCompConfig

__all__ = ["LayerPolicy"]

_MAX_DEN = 10**6


class LayerPolicy:
    """The per-layer policy of one config (cheap to build; holds no tensors)."""

    def __init__(self, config: KVCompConfig):
        if not isinstance(config, KVCompConfig):
            raise TypeError(f"config must be a KVCompConfig, got {type(config).__name__}")
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.chunk_size = config.chunk_size
        self.threshold = config.seq_len_threshold
        self.must_select = tuple(config.must_select_blocks)
        self._frac = [Fraction(str(r)).limit_denominator(_MAX_DEN) for r in config.top_k_ratio_per_layer]
        self._reuse = list(config.top_k_index_reuse)
        budget = config.top_k_budget_tokens
        self._budget_blocks = None if budget is None else -(-budget // config.chunk_size)

    # ----------------------------------------------------------------- layer sets
    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def is_sparse(self, layer: int) -> bool:
        """True if the layer's ratio is below 1 (it is sparse at long enough lengths)."""
        return self._frac[self._check_layer(layer)] < 1

    @property
    def sparse_layers(self) -> list[int]:
        """Layers with ratio < 1 (computing or reusing a selection)."""
        return [i for i in range(self.num_layers) if self._frac[i] < 1]

    @property
    def compute_layers(self) -> list[int]:
        """Sparse layers that compute their own selection."""
        return [i for i in self.sparse_layers if self._reuse[i] == -1]

    @property
    def reuse_layers(self) -> list[int]:
        """Sparse layers that take an earlier layer's selection."""
        return [i for i in self.sparse_layers if self._reuse[i] != -1]

    @property
    def dense_layers(self) -> list[int]:
        """Layers with ratio 1.0 (always dense)."""
        return [i for i in range(self.num_layers) if self._frac[i] == 1]

    # ----------------------------------------------------------------- per step
    def mode(self, layer: int, seq_len: int) -> str:
        """"dense", "compute" or "reuse" for a sequence of ``seq_len`` tokens."""
        self._check_layer(layer)
        if self._frac[layer] == 1 or seq_len < self.threshold:
            return "dense"
        return "reuse" if self._reuse[layer] != -1 else "compute"

    def source(self, layer: int) -> int:
        """The layer whose selection ``layer`` uses (itself unless it reuses)."""
        self._check_layer(layer)
        j = self._reuse[layer]
        return layer if j == -1 else j

    def n_blocks(self, seq_len: int) -> int:
        """ceil(seq_len / chunk_size)."""
        return -(-int(seq_len) // self.chunk_size)

    def _n_must(self, n: int) -> int:
        return len({m % n for m in self.must_select if -n <= m < n}) if n > 0 else 0

    def _sparse_k(self, layer: int, n: int) -> int:
        if self._budget_blocks is not None:
            return self._budget_blocks
        f = self._frac[layer]
        return -(-(f.numerator * n) // f.denominator)

    def k_blocks(self, layer: int, seq_len: int) -> int:
        """Blocks to select (must-select included) for a sequence of ``seq_len`` tokens."""
        self._check_layer(layer)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
        n = self.n_blocks(seq_len)
        if self.mode(layer, seq_len) == "dense":
            return n
        return min(n, max(self._sparse_k(layer, n), self._n_must(n)))

    def k_blocks_tensor(self, layer: int, seq_lens: torch.Tensor) -> torch.Tensor:
        """Same rule as :meth:`k_blocks` per sequence: seq_lens [B] int -> int32 [B] on
        seq_lens' device, tensor ops only (no host sync; safe inside CUDA graphs)."""
        self._check_layer(layer)
        if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1:
            raise ValueError(f"seq_lens must be a 1-D int tensor [B], got {seq_lens!r}")
        if seq_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
        L = seq_lens.to(torch.int64)
        n = (L + self.chunk_size - 1) // self.chunk_size
        if self._frac[layer] == 1:
            return n.to(torch.int32)
        if self._budget_blocks is not None:
            k = torch.full_like(n, self._budget_blocks)
        else:
            f = self._frac[layer]
            k = (n * f.numerator + (f.denominator - 1)) // f.denominator
        # distinct must-select blocks that exist in a sequence of n blocks
        n_must = torch.zeros_like(n)
        positions: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in self.must_select:
            pos = n + m if m < 0 else torch.full_like(n, m)
            ok = (pos >= 0) & (pos < n)
            new = ok
            for p_prev, ok_prev in positions:
                new = new & ~(ok_prev & (p_prev == pos))
            n_must = n_must + new.to(torch.int64)
            positions.append((pos, ok))
        k = torch.minimum(n, torch.maximum(k, n_must))
        k = torch.where(L < self.threshold, n, k)
        return k.to(torch.int32)

    def max_k_blocks(self, layer: int, max_len: int) -> int:
        """An upper bound of k_blocks(layer, L) over all L <= max_len (also covering shorter
        sequences that run dense below the threshold): the ``max_blocks`` output width to pass
        to ``hamming_topk`` with ``k_blocks_tensor``. At least 1."""
        self._check_layer(layer)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"max_len must be an int >= 0, got {max_len!r}")
        n_max = self.n_blocks(max_len)
        if self._frac[layer] == 1:
            return max(n_max, 1)
        dense_len = min(max_len, self.threshold - 1)
        widest = self.n_blocks(dense_len) if dense_len >= 0 else 0
        if max_len >= self.threshold:
            sparse = min(n_max, max(self._sparse_k(layer, n_max), len(set(self.must_select))))
            widest = max(widest, sparse)
        return max(widest, 1)
