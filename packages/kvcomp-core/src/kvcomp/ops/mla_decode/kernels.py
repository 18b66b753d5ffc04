"""Triton launcher of the dense MLA latent decode. The @triton.jit bodies are shared with the
sparse op (``kvcomp.ops.sparse_mla_decode.kernels``): the dense walk is its SPARSE=False case."""

from __future__ import annotations

import torch

from kvcomp.ops.sparse_mla_decode.kernels import mla_decode_launch


def mla_decode_triton(q_lat, q_pe, ckv, kpe, seq_lens, scale, **tuning) -> torch.Tensor:
    """Dense split-K MLA decode over t < seq_lens[b] (see ``kvcomp.ops.mla_decode``)."""
    return mla_decode_launch(q_lat, q_pe, ckv, kpe, None, seq_lens, 1, scale, **tuning)
