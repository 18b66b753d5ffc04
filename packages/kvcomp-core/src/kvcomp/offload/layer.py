"""``OffloadLayer`` / ``OffloadCache``: a kvcomp cache whose sparse layers keep K/V in host memory.

Storage of one offloaded layer (B sequences, Hkv kv-heads, R = B * Hkv rows, C = cache_blocks):

    host_k, host_v   [B, Hkv, capacity, D]   CPU, page-locked on CUDA machines: every token
    keys_buf/values_buf                      the same memory as the compute device sees it (a
                                             CUDA view over UVA; the tensors themselves on CPU)
    codes_buf        [B, Hkv, capacity, W]   int32 key codes, in HBM (as in the in-HBM cache)
    pool_k, pool_v   [R * C + 1, 1, chunk, D]  HBM page pool; slot r * C + j is row r's j-th
                                             slot, the last is scratch
    blocks           ``BlockCache``           residency map + LRU (block -> slot), in HBM

Writes (``update``): new tokens go to the host rows through kernels (write-through, in stream
order), their codes to HBM, and, where a new token's block is resident, into its pool page too
(so a resident page never goes stale). Decode (``attend_blocks``): the selection (made on the
codes in HBM) is assigned slots by the ``BlockCache`` (hits, misses, LRU victims: tensor ops on
the device), the missing pages are copied host -> pool (``fetch_pages``, on a side stream when
configured), and ``sparse_decode_attention`` runs over the pool through the block table with
rows as the batch: query heads of kv-head h of sequence b form row b * Hkv + h. The kernel's
split plan depends only on B * Hkv and K, so every row sees the same tokens in the same order
as in the in-HBM cache: the output is bit-identical. Dense steps (below the threshold, extend
steps) attend over ``keys_buf`` directly: on CUDA the kernels read host memory over PCIe.

Host synchronisations: none per decode step with the Triton copy (the reference copy reads its
list of misses once per layer); growth of the host capacity synchronises once (the old pinned
buffers are copied on the host and freed); ``reset``, beam reordering and batch selection also
synchronise (they rebuild the host buffers); reading ``stats`` reads the counters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvcomp.cache import KVCompCache, KVCompLayer, LayerStats, summarize
from kvcomp.offload.block_cache import BlockCache
from kvcomp.offload.config import OffloadConfig
from kvcomp.offload.copy import fetch_pages
from kvcomp.offload.host import device_view, host_zeros, wants_pinned
from kvcomp.ops import sparse_decode_attention

__all__ = ["OffloadCache", "OffloadLayer", "OffloadStats", "offload_totals"]

_GROWTH = 1.5


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class OffloadStats(LayerStats):
    """LayerStats plus the offload counters of one layer (device tensors until read).

    hits / misses: selected blocks found resident / copied, over (sequence, kv-head) rows and
    decode steps; h2d_bytes = misses * page bytes (K and V); d2h_bytes: K/V bytes written
    through to the host; hbm_bytes: HBM held by this layer's offload state (codes, pool, maps)."""

    def __init__(self, debug: bool = False):
        super().__init__(debug)
        self.blocks: BlockCache | None = None
        self.page_bytes = 0
        self.d2h_bytes = 0
        self.fetch_steps = 0
        self.hbm_bytes = 0
        self.host_bytes = 0

    def summary(self) -> dict:
        out = super().summary()
        hits = int(self.blocks.hits) if self.blocks is not None else 0
        misses = int(self.blocks.misses) if self.blocks is not None else 0
        h2d = misses * self.page_bytes
        out["offload"] = {
            "fetch_steps": self.fetch_steps,
            "block_hits": hits,
            "block_misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "h2d_bytes": h2d,
            "h2d_bytes_per_step": h2d / self.fetch_steps if self.fetch_steps else None,
            "d2h_bytes": self.d2h_bytes,
            "hbm_bytes": self.hbm_bytes,
            "host_bytes": self.host_bytes,
        }
        return out


def offload_totals(layer_stats: Sequence[LayerStats]) -> dict:
    """The offload counters summed over the offloaded layers (others are skipped)."""
    per = [s.summary()["offload"] for s in layer_stats if isinstance(s, OffloadStats)]
    tot = {k: sum(p[k] for p in per) for k in ("block_hits", "block_misses", "h2d_bytes", "d2h_bytes",
                                                "hbm_bytes", "host_bytes")}
    seen = tot["block_hits"] + tot["block_misses"]
    tot["layers"] = len(per)
    tot["hit_rate"] = tot["block_hits"] / seen if seen else None
    steps = max((p["fetch_steps"] for p in per), default=0)
    tot["h2d_bytes_per_step"] = tot["h2d_bytes"] / steps if steps else None
    return tot


class OffloadLayer(KVCompLayer):
    """A ``KVCompLayer`` whose K/V live in host memory, with an HBM block cache (module doc)."""

    def __init__(self, layer_idx: int, *, offload: OffloadConfig, **kwargs):
        if not isinstance(offload, OffloadConfig):
            raise TypeError(f"offload must be an OffloadConfig, got {type(offload).__name__}")
        self.offload = offload
        super().__init__(layer_idx, **kwargs)

    # ------------------------------------------------------------------------- state
    def _clear(self) -> None:
        self._wait_device()
        super()._clear()
        self.host_k = self.host_v = None
        self.pool_k = self.pool_v = None
        self.blocks: BlockCache | None = None
        self._pinned = False
        self._any_resident = False
        self._stream = None

    def _reset_stats(self) -> None:
        self.stat = OffloadStats(self.debug)  # attached to the storage at the first update

    def _attach_stats(self) -> None:
        st = self.stat
        st.blocks = self.blocks
        st.page_bytes = 2 * self.pool_k[0].numel() * self.pool_k.element_size()
        st.hbm_bytes = self.hbm_bytes()
        st.host_bytes = sum(t.numel() * t.element_size() for t in (self.host_k, self.host_v))

    def _wait_device(self) -> None:
        """Let queued kernels finish with the host buffers before the host touches or frees them."""
        dev = self.device if getattr(self, "keys_buf", None) is not None else None
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def hbm_bytes(self) -> int:
        """Bytes of HBM (the compute device) this layer holds: codes, page pool, residency maps
        and lengths. 0 on a CPU device."""
        if self.keys_buf is None or self.device.type == "cpu":
            return 0
        extra = [getattr(self, n, None) for n in ("norms_buf", "key_mu", "key_bias")]
        ts = [t for t in (self.codes_buf, self.pool_k, self.pool_v, self.seq_lens, *extra) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts) + self.blocks.nbytes()

    def _set_host(self, host_k: torch.Tensor, host_v: torch.Tensor) -> None:
        self.host_k, self.host_v = host_k, host_v
        dev = self.codes_dev
        self.keys_buf = device_view(host_k, dev)
        self.values_buf = device_view(host_v, dev)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        if value_states.shape[-1] != D:
            raise ValueError(f"layer {self.layer_idx}: offload needs K and V of one head size, got {D} and "
                             f"{value_states.shape[-1]}")
        self.codes_dev = key_states.device
        self._pinned = wants_pinned(self.offload.pin_memory) and key_states.is_cuda
        self._set_host(host_zeros((B, H, 0, D), key_states.dtype, pin=self._pinned),
                       host_zeros((B, H, 0, D), value_states.dtype, pin=self._pinned))
        C = self.offload.cache_blocks
        self.blocks = BlockCache(B * H, C, 0, key_states.device)
        shape = (self.blocks.num_pool_slots, 1, self.chunk_size, D)
        self.pool_k = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.pool_v = torch.zeros(shape, dtype=value_states.dtype, device=key_states.device)
        if key_states.is_cuda and self.offload.side_stream:
            self._stream = torch.cuda.Stream(device=key_states.device)
        self._attach_stats()

    @property
    def device(self) -> torch.device | None:
        return self.codes_dev if self.keys_buf is not None else None

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        reserve = self.offload.reserve_tokens or 0
        new_cap = _round_up(max(needed, math.ceil(self.capacity * _GROWTH), reserve), self.chunk_size)
        self._wait_device()
        B, H, cap, D = self.host_k.shape
        hk = host_zeros((B, H, new_cap, D), self.host_k.dtype, pin=self._pinned)
        hv = host_zeros((B, H, new_cap, D), self.host_v.dtype, pin=self._pinned)
        hk[:, :, :cap] = self.host_k
        hv[:, :, :cap] = self.host_v
        self._set_host(hk, hv)
        if self.codes_buf is not None:
            codes = self.codes_buf.new_zeros(B, H, new_cap, self.codes_buf.shape[3])
            codes[:, :, :cap] = self.codes_buf[:, :, :cap]
            self.codes_buf = codes
        if getattr(self, "norms_buf", None) is not None:  # token_score "centered_norm"
            norms = self.norms_buf.new_zeros(B, H, new_cap)
            norms[:, :, :cap] = self.norms_buf[:, :, :cap]
            self.norms_buf = norms
        self.blocks.grow(new_cap // self.chunk_size)
        self.capacity = new_cap
        self._attach_stats()

    # ------------------------------------------------------------------------- writes
    def _write(self, k: torch.Tensor, v: torch.Tensor, batch: torch.Tensor, rows: torch.Tensor) -> None:
        """Tokens k/v [B', H, T, D] of sequences ``batch`` [B'] go to rows ``rows`` [B', T]
        (long, device): host write-through (a kernel writing through the view), then the
        pool pages of resident blocks."""
        Bp, H, T, D = k.shape
        if Bp * T == 0:
            return
        bi = batch.view(Bp, 1, 1).expand(Bp, H, T)
        hi = torch.arange(H, device=k.device).view(1, H, 1).expand(Bp, H, T)
        ri = rows.view(Bp, 1, T).expand(Bp, H, T)
        self.keys_buf.index_put_((bi, hi, ri), k)
        self.values_buf.index_put_((bi, hi, ri), v)
        self.stat.d2h_bytes += 2 * k.numel() * k.element_size()
        if self._any_resident:
            blk = ri // self.chunk_size
            slot = self.blocks.resident_slots(bi * H + hi, blk).to(torch.long)
            slot = torch.where(slot >= 0, slot, self.blocks.scratch_slot)
            zero = torch.zeros_like(slot)
            self.pool_k.index_put_((slot, zero, ri % self.chunk_size), k)
            self.pool_v.index_put_((slot, zero, ri % self.chunk_size), v)

    def _append_all(self, k, v, codes, old_lens, T) -> None:
        B = k.shape[0]
        dev = k.device
        start = self.seq_lens.to(torch.long).view(B, 1)
        rows = start + torch.arange(T, device=dev).view(1, T)
        self._write(k, v, torch.arange(B, device=dev), rows)
        if codes is not None:
            ci = rows.view(B, 1, T, 1).expand(B, codes.shape[1], T, codes.shape[3])
            self.codes_buf.scatter_(2, ci, codes)
        self.seq_lens = self.seq_lens + T

    def _append_valid(self, k, v, codes, valid, old_lens, new_lens) -> None:
        dev = k.device
        for b in range(k.shape[0]):
            sel = valid[b].nonzero().view(-1)
            s, e = old_lens[b], new_lens[b]
            rows = torch.arange(s, e, device=dev).view(1, e - s)
            self._write(k[b : b + 1, :, sel], v[b : b + 1, :, sel], torch.tensor([b], device=dev), rows)
            if codes is not None:
                self.codes_buf[b, :, s:e] = codes[b, :, sel]

    # ------------------------------------------------------------------------- decode
    def attend_blocks(self, q: torch.Tensor, block_idx: torch.Tensor, *, chunk_size: int,
                      scale: float) -> torch.Tensor:
        """Fetch the selected blocks that are not resident, then attend over the page pool:
        q [B, Hq, D] or [B, Hq, T, D] (a verify step), block_idx int32 [B, Hkv, K] -> q's shape
        (see the module docstring)."""
        if chunk_size != self.chunk_size:
            raise ValueError(f"layer {self.layer_idx}: chunk_size {chunk_size} differs from the cache's {self.chunk_size}")
        B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
        H = self.keys_buf.shape[1]
        if block_idx.dim() != 3 or tuple(block_idx.shape[:2]) != (B, H):
            raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B={B}, Hkv={H}, K]")
        R, K = B * H, block_idx.shape[2]
        sel = block_idx.reshape(R, K)
        slots, miss = self.blocks.assign(sel, backend=self.offload.backend)
        host_k = self.keys_buf.view(R, self.capacity, D)
        host_v = self.values_buf.view(R, self.capacity, D)
        args = (host_k, host_v, self.pool_k, self.pool_v, sel, slots, miss, self.chunk_size)
        if self._stream is not None:
            main = torch.cuda.current_stream(q.device)
            self._stream.wait_stream(main)  # the selection, slots and written-through rows
            with torch.cuda.stream(self._stream):
                fetch_pages(*args, backend=self.offload.backend)
            main.wait_stream(self._stream)  # attention reads the pages
        else:
            fetch_pages(*args, backend=self.offload.backend)
        self._any_resident = True
        self.stat.fetch_steps += 1
        nb = max(1, -(-self.max_len // self.chunk_size))
        table = self.blocks.table[:, :nb]
        out = sparse_decode_attention(
            q.reshape(R, Hq // H, *q.shape[2:]), self.pool_k, self.pool_v, sel.view(R, 1, K),
            self.seq_lens.view(B, 1).expand(B, H).reshape(R), chunk_size=self.chunk_size,
            scale=scale, block_table=table,
        )
        return out.view(q.shape)

    # ------------------------------------------------------------------------- batch ops
    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._wait_device()
        host_idx = torch.as_tensor(index).to("cpu", torch.long)
        hk = self.host_k.index_select(0, host_idx)
        hv = self.host_v.index_select(0, host_idx)
        if self._pinned:
            hk, hv = hk.pin_memory(), hv.pin_memory()
        dev_idx = host_idx.to(self.codes_dev)
        if self.codes_buf is not None:
            self.codes_buf = self.codes_buf.index_select(0, dev_idx)
        for name in ("norms_buf", "key_mu", "key_bias"):  # token_score "centered_norm"
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).index_select(0, dev_idx))
        self.seq_lens = self.seq_lens.index_select(0, dev_idx)
        self.lens = [self.lens[i] for i in host_idx.tolist()]
        self.batch_size = len(self.lens)
        self._set_host(hk, hv)
        B, H, cap, D = hk.shape
        C = self.offload.cache_blocks
        old = self.blocks
        self.blocks = BlockCache(B * H, C, cap // self.chunk_size, self.codes_dev)
        self.blocks.hits += old.hits  # the counters go on; the residency starts empty
        self.blocks.misses += old.misses
        shape = (self.blocks.num_pool_slots, 1, self.chunk_size, D)
        self.pool_k = self.pool_k.new_zeros(shape)
        self.pool_v = self.pool_v.new_zeros(shape)
        self._any_resident = False
        self.keys = self.keys_buf[:, :, : self.max_len]
        self.values = self.values_buf[:, :, : self.max_len]
        self.step_block_idx = None
        self._attach_stats()


class OffloadCache(KVCompCache):
    """A ``KVCompCache`` whose layers in ``offload_layers`` are ``OffloadLayer``s (host K/V,
    HBM block cache); the other layers (dense, sliding-window) keep their K/V in HBM.

    Args: ``num_layers`` and the keywords of ``KVCompCache``, plus
        offload         OffloadConfig
        offload_layers  indices of the layers to offload (the sparse layers)"""

    def __init__(self, num_layers: int, *, offload: OffloadConfig, offload_layers: Sequence[int], **kwargs):
        if not isinstance(offload, OffloadConfig):
            raise TypeError(f"offload must be an OffloadConfig, got {type(offload).__name__}")
        bad = [i for i in offload_layers if not (isinstance(i, int) and 0 <= i < num_layers)]
        if bad:
            raise ValueError(f"offload_layers {bad} are not layer indices of a {num_layers}-layer model")
        self.offload = offload
        self.offload_layers = sorted(set(offload_layers))
        super().__init__(num_layers, **kwargs)

    def _make_layer(self, layer_idx: int, **kwargs) -> KVCompLayer:
        if layer_idx in self.offload_layers:
            return OffloadLayer(layer_idx, offload=self.offload, **kwargs)
        return super()._make_layer(layer_idx, **kwargs)

    @property
    def stats(self) -> dict:
        """``KVCompCache.stats`` plus "offload": the counters summed over offloaded layers."""
        out = summarize(self.layer_stats)
        out["offload"] = offload_totals(self.layer_stats)
        return out

    def hbm_bytes(self) -> dict:
        """HBM held for K/V state: {"offloaded": codes + pools + maps of the offloaded layers,
        "resident": K/V (+ codes) buffers of the layers kept in HBM}, by allocated capacity."""
        off = res = 0
        for layer in self.layers:
            if isinstance(layer, OffloadLayer):
                off += layer.hbm_bytes()
            elif layer.keys_buf is not None and layer.keys_buf.device.type != "cpu":
                ts = [t for t in (layer.keys_buf, layer.values_buf, layer.codes_buf) if t is not None]
                res += sum(t.numel() * t.element_size() for t in ts)
        return {"offloaded": off, "resident": res}
