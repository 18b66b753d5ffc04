"""KV offload tier: the K/V of sparse layers in (pinned) host memory, key codes and a block
cache in HBM; each decode step moves only the selected blocks that are not resident.

    from kvcomp.offload import OffloadConfig
    handle = kvcomp.enable(model, config, offload=OffloadConfig(cache_blocks=64))
    model.generate(**inputs)                 # every new cache is an OffloadCache
    cache = handle.new_cache()               # the same; new_cache(offload=None) gives in-HBM
    cache.stats["offload"]                   # hit rate, bytes host->device, HBM bytes

What stays in HBM: the key codes of every layer that selects, the dense layers' full K/V
(ratio 1.0, sliding-window layers), and per offloaded layer a page pool of ``cache_blocks``
block slots per (sequence, kv-head) with its residency map. Blocks selected at every step
(must-select: the sink block and the local window) are therefore always resident. Host memory
holds every token's K/V of the offloaded layers; new tokens are written through as they arrive.

One decode step of an offloaded layer (``OffloadLayer.attend_blocks``):
  1. select on the GPU with the codes, exactly as the in-HBM mode (same codes, same blocks);
  2. ``BlockCache.assign``: residency lookup, LRU victims (by last-use step; free slots first),
     map update, hit/miss counters: one Triton launch on CUDA (torch ops as the reference);
  3. ``fetch_pages``: one fixed-shape Triton launch copies the missing pages from the pinned
     host memory (read in place over PCIe through its UVA address) into their slots, on a side
     stream ordered by stream waits (the attention needs the pages at once, and the next
     layer's query needs this layer's output, so nothing else of the step can overlap it);
  4. ``sparse_decode_attention`` over the page pool through the block table: bit-identical to
     the in-HBM mode's output.
No host-device synchronisation per step (see ``kvcomp.offload.layer`` for the few that exist).
"""

from kvcomp.offload.block_cache import BlockCache
from kvcomp.offload.config import OffloadConfig
from kvcomp.offload.copy import fetch_pages, fetch_pages_ref
from kvcomp.offload.layer import OffloadCache, OffloadLayer, OffloadStats, offload_totals

__all__ = [
    "BlockCache",
    "OffloadCache",
    "OffloadConfig",
    "OffloadLayer",
    "OffloadStats",
    "fetch_pages",
    "fetch_pages_ref",
    "offload_totals",
]
