"""``BlockCache``: residency map and LRU eviction of one layer's HBM block cache.

Rows are (sequence, kv-head) pairs, r = b * Hkv + h; each row owns ``slots`` page slots of the
layer's page pool (global slot r * slots + j, j < slots), and one more global slot at the end
of the pool is scratch (masked writes land there). All state is on the device and every update
is a fixed-shape device operation (one Triton launch, or the torch reference ops): no host
synchronisation, no shape that depends on device values.

    table     int32 [R, NB + 1]     global slot holding block n of row r, or -1 (not resident);
                                    column NB is scratch
    owner     int32 [R, slots + 1]  block held by local slot j, or -1 (free); column slots is
                                    scratch
    last_use  int64 [R, slots + 1]  step at which slot j was last selected (-1: never)

``assign(sel)`` takes one step's selection sel int32 [R, K] (ascending distinct block indices,
-1 padding, as ``hamming_topk`` returns them) and, per row:
  1. hits: selected blocks already resident; their slots' last_use becomes this step;
  2. misses: the i-th missing block (in the row's order) gets the i-th slot in ascending
     (last_use, slot index) order, i.e. free slots first, then the least recently used. Hit
     slots carry this step's number and sort last, so with K <= slots no block selected at
     this step is ever evicted by it (misses <= slots - hits);
  3. the evicted blocks leave the table, the new ones enter it with this step's last_use.
It returns the global slot of every selected block and the miss mask; the caller copies the
missing pages host -> device into those slots before attending through ``table``.
Blocks selected every step (must-select: sink and local window) therefore stay resident.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import check_tensor, use_triton

__all__ = ["BlockCache"]


def _max_slots() -> int:
    from kvcomp.offload.kernels import ASSIGN_MAX_SLOTS

    return ASSIGN_MAX_SLOTS


class BlockCache:
    """Residency map + LRU state of R rows with ``slots`` page slots each (see module doc)."""

    def __init__(self, rows: int, slots: int, n_blocks: int, device):
        if rows < 0 or slots < 1 or n_blocks < 0:
            raise ValueError(f"BlockCache needs rows >= 0, slots >= 1, n_blocks >= 0; got {rows}, {slots}, {n_blocks}")
        self.rows, self.slots, self.n_blocks = rows, slots, n_blocks
        self.device = torch.device(device)
        self.table = torch.full((rows, n_blocks + 1), -1, dtype=torch.int32, device=self.device)
        self.owner = torch.full((rows, slots + 1), -1, dtype=torch.int32, device=self.device)
        self.last_use = torch.full((rows, slots + 1), -1, dtype=torch.int64, device=self.device)
        self.base = torch.arange(rows, dtype=torch.int64, device=self.device).view(rows, 1) * slots
        self.step = 0
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self.misses = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def scratch_slot(self) -> int:
        """The global pool slot that masked writes may target (after all rows' slots)."""
        return self.rows * self.slots

    @property
    def num_pool_slots(self) -> int:
        return self.rows * self.slots + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.table, self.owner, self.last_use, self.base))

    def grow(self, n_blocks: int) -> None:
        """Widen the residency map to ``n_blocks`` blocks per row (new blocks not resident)."""
        if n_blocks <= self.n_blocks:
            return
        new = torch.full((self.rows, n_blocks + 1), -1, dtype=torch.int32, device=self.device)
        new[:, : self.n_blocks] = self.table[:, : self.n_blocks]
        self.table, self.n_blocks = new, n_blocks

    def clear(self) -> None:
        """Forget every resident block (the pool's contents become free slots)."""
        self.table.fill_(-1)
        self.owner.fill_(-1)
        self.last_use.fill_(-1)

    def resident_slots(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Global slot of (rows, blocks) (long tensors of one shape), or -1 where not resident."""
        return self.table[rows, blocks]

    def assign(self, sel: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """One step's selection sel int32 [R, K] -> (global slot int32 [R, K], -1 at padding;
        miss bool [R, K]). Updates residency and LRU state (see the module docstring).

        backend: "triton" (``kernels._assign_kernel``: one launch, one program per row; up to
        ``ASSIGN_MAX_SLOTS`` slots), "reference" (the torch ops below: the same rules, about 40
        small ops), "auto" (Triton on CUDA when the slots fit, else the reference)."""
        check_tensor("sel", sel, ndim=2, dtypes=(torch.int32,), device=self.device)
        if sel.shape[0] != self.rows:
            raise ValueError(f"selection {tuple(sel.shape)} must be [R={self.rows}, K]")
        K, C, NB = sel.shape[1], self.slots, self.n_blocks
        if K > C:
            raise ValueError(
                f"the step selects up to {K} blocks per (sequence, kv-head) but the block cache holds "
                f"{C} (OffloadConfig.cache_blocks): raise cache_blocks to at least {K}"
            )
        self.step += 1
        step = self.step
        if use_triton(backend, sel) and C <= _max_slots():
            from kvcomp.offload.kernels import assign_triton

            return assign_triton(self, sel)
        valid = sel >= 0
        blk = sel.to(torch.int64).clamp(min=0)
        cur = self.table.gather(1, blk)  # [R, K] global slot or -1
        hit = valid & (cur >= 0)
        miss = valid & (cur < 0)
        local_hit = torch.where(hit, cur.to(torch.int64) - self.base, C)  # C: scratch column
        self.last_use.scatter_(1, local_hit, step)
        order = torch.sort(self.last_use[:, :C], dim=1, stable=True).indices  # [R, C] LRU first
        rank = (miss.to(torch.int64).cumsum(1) - 1).clamp(min=0)  # i-th miss of its row
        victim = torch.where(miss, order.gather(1, rank), C)  # [R, K] local slot (C: scratch)
        old = self.owner.gather(1, victim).to(torch.int64)
        evict = miss & (old >= 0)
        self.table.scatter_(1, torch.where(evict, old, NB), -1)
        glob = (self.base + victim).to(torch.int32)
        self.table.scatter_(1, torch.where(miss, blk, NB), torch.where(miss, glob, -1))
        self.owner.scatter_(1, victim, torch.where(miss, sel, -1))
        self.last_use.scatter_(1, victim, step)
        slots = torch.where(valid, self.table.gather(1, blk), -1)
        self.hits += hit.sum()
        self.misses += miss.sum()
        return slots, miss
