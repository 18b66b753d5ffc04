"""``OffloadConfig``: the settings of the KV offload tier (``kvcomp.offload``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["OffloadConfig"]

_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class OffloadConfig:
    """Where the K/V of the sparse layers live and how blocks come back to the GPU.

    cache_blocks    block slots of the HBM block cache per (sequence, kv-head) and layer. Every
                    decode step needs all of a (sequence, kv-head)'s selected blocks resident at
                    once, so it must be >= the selection width (``LayerPolicy.max_k_blocks``:
                    the budget in blocks, must-select included; below the threshold, all blocks
                    of a sequence of up to ``seq_len_threshold`` tokens). A step that selects
                    more raises a ValueError naming both numbers. Slots beyond the width keep
                    blocks of earlier steps (hits). Default 64 (8192 tokens of chunk 128).
    reserve_tokens  host capacity allocated at the first update (tokens per sequence, rounded
                    up to whole chunks), or None: grow by 1.5x like the in-HBM cache. Each
                    growth reallocates pinned host memory and synchronises the device once.
    pin_memory      page-lock the host K/V (needed for the GPU to read them directly); None:
                    when CUDA is available.
    side_stream     on CUDA, copy the missing blocks on a side stream (ordered by stream waits
                    before and after); False: on the current stream.
    backend         slot assignment and block copy: "auto" (the Triton kernels on CUDA, the
                    torch references elsewhere), "triton" (also on CPU under
                    TRITON_INTERPRET=1) or "reference". The attention always runs as in the
                    in-HBM mode (its own "auto" choice), so the outputs stay identical.
    """

    cache_blocks: int = 64
    reserve_tokens: int | None = None
    pin_memory: bool | None = None
    side_stream: bool = True
    backend: str = "auto"

    def __post_init__(self):
        cb = self.cache_blocks
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 1:
            raise ValueError(f"OffloadConfig.cache_blocks must be an int >= 1, got {cb!r}")
        rt = self.reserve_tokens
        if rt is not None and (isinstance(rt, bool) or not isinstance(rt, int) or rt < 0):
            raise ValueError(f"OffloadConfig.reserve_tokens must be None or an int >= 0, got {rt!r}")
        if self.pin_memory not in (None, True, False):
            raise ValueError(f"OffloadConfig.pin_memory must be None, True or False, got {self.pin_memory!r}")
        if self.side_stream not in (True, False):
            raise ValueError(f"OffloadConfig.side_stream must be True or False, got {self.side_stream!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"OffloadConfig.backend must be one of {_BACKENDS}, got {self.backend!r}")

    @classmethod
    def coerce(cls, value) -> OffloadConfig | None:
        """None | OffloadConfig | dict of fields | True (the defaults) -> OffloadConfig or None."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"offload: unknown OffloadConfig fields {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"offload must be an OffloadConfig, a dict of its fields, True or None, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)
