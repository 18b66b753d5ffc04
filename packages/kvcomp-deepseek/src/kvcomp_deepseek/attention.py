"""MLA attention for kvcomp: the absorbed sparse decode, and the dense paths around it.

How it hooks into transformers' DeepSeek-V2/V3 attention (5.17 .. 5.2x), whose forward does

    kv_nope, k_rot = cache.update(kv_nope, k_rot, layer_idx)     # the latent, [B, 1, L, R|P]
    key, value = self.expand_kv(kv_nope, k_rot)                  # per head [B, H, L, 192|128]
    out, _ = attention_interface(self, query, key, value, mask, scaling=self.scaling)
    return self.o_proj(out.reshape(B, T, -1))

``kvcomp_deepseek`` registers the attention function "kvcomp_mla" and sets an instance
``expand_kv`` on every attention module. On a sparse decode step (T == 1, an ``MLACache``
behind the forward, policy mode "compute" or "reuse") ``expand_kv`` returns the latent as it
is (no expansion) and the attention function runs the absorbed decode:

    q_nope, q_pe = query[..., :nope], query[..., nope:]        (post-RoPE, from the model)
    q_lat  = q_nope @ W_UK              per head, [B, H, R]   (W_UK, W_UV from kv_b_proj,
                                                               prepared once per layer)
    codes  = [hash(q_lat) | hash(q_pe)] per head -> hamming_topk (G = H, one latent kv-head)
    o_lat  = sparse_mla_decode(q_lat, q_pe, c_kv, k_pe, block_idx, scale=module.scaling)
    out    = o_lat @ W_UV^T             per head, [B, 1, H, v_head_dim] -> the model's o_proj

On a static cache (``kvcomp_deepseek.static_cache``) every decode step runs absorbed over the
full preallocated buffers (``_static_decode``: ``mla_decode`` when dense, the selection and
``sparse_mla_decode`` when sparse; lengths from the device ``seq_lens``, no host sync), so it
can be captured in a CUDA graph.

Every other call is dense and exact: prefill runs the model's previous attention with the mask
transformers built; later dense steps (below the threshold, dense layers, T > 1) expand the
compacted latent with the model's own ``expand_kv`` and attend with a mask from the real
lengths (none for a decode step of equal lengths, so such a step is bit-identical to the
unpatched model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kvcomp.attention import (
    compacted_mask,
    dense_attention,
    fallback_function,
    forward_scope,
    kvcomp_mask,
)
from kvcomp.ops import hamming_topk, hash_encode_split, mla_decode, sparse_mla_decode
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from kvcomp_deepseek.cache import MLACache, MLACacheLayer
from kvcomp_deepseek.static_cache import MLAStaticCache

__all__ = ["ATTN_NAME", "MLABinding", "absorb_weights", "kvcomp_mla_attention", "register"]

ATTN_NAME = "kvcomp_mla"
_MODES = {"sum": "exact", "majority": "majority"}


@dataclass
class MLABinding:
    """What the attention function needs for one DeepSeek attention module.

    w_lat [R, bits_kv] / w_rope [P, bits_rope]: float32 hash weights on the module's device
    (layers that compute a selection, else None). ``absorbed``: (W_UK [H, nope, R],
    W_UV [H, v, R]), views of kv_b_proj's weight (dequantized copies for quantized weights),
    made on first use."""

    layer_idx: int
    handle: Any
    fallback: str
    w_lat: torch.Tensor | None = None
    w_rope: torch.Tensor | None = None
    absorbed: tuple[torch.Tensor, torch.Tensor] | None = None
    sparse_step: bool = field(default=False)


def dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The float weight [out, in] of a linear layer, dequantized when it is stored quantized:
    block-wise fp8 with ``weight_scale_inv`` [ceil(out / bo), ceil(in / bi)] and blocks
    ``linear.block_size`` (default 128 x 128: DeepSeek-V3's checkpoint format, transformers'
    FP8Linear), a per-output-channel scale, or a float weight as is."""
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"kv_b_proj ({type(linear).__name__}) has no weight tensor to absorb")
    scale = getattr(linear, "weight_scale_inv", None)
    if scale is None:
        scale = getattr(linear, "weight_scale", None)
    if w.is_floating_point() and w.element_size() >= 2 and scale is None:
        return w.detach().float()
    if scale is None:
        raise TypeError(
            f"kv_b_proj weight has dtype {w.dtype} and no weight_scale_inv / weight_scale: "
            "kvcomp-deepseek cannot dequantize it for the absorbed decode"
        )
    s = scale.detach().float()
    out_f, in_f = w.shape
    if s.dim() == 2:  # block-wise scales, blocks of linear.block_size (DeepSeek: 128 x 128)
        bo, bi = tuple(getattr(linear, "block_size", None) or (128, 128))
        if (-(-out_f // bo), -(-in_f // bi)) != tuple(s.shape):
            raise ValueError(
                f"kv_b_proj: weight_scale_inv {tuple(s.shape)} does not tile the weight "
                f"{tuple(w.shape)} in blocks of {(bo, bi)}"
            )
        s = s.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    elif s.numel() == out_f:  # per output channel
        s = s.view(out_f, 1)
    return w.detach().float() * s


def absorb_weights(module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [H, nope, R], W_UV [H, v, R]) from ``module.kv_b_proj``: views of its weight when
    it is a float weight (no copy), else the dequantized weight in ``dtype`` (default float32)."""
    lin = module.kv_b_proj
    w = getattr(lin, "weight", None)
    quantized = getattr(lin, "weight_scale_inv", None) is not None or getattr(
        lin, "weight_scale", None) is not None
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.element_size() >= 2 and not quantized:
        w = w.detach()  # [H * (nope + v), R]
    else:
        w = dense_weight(lin).to(dtype or torch.float32)
    H, nope, v = module.num_heads, module.qk_nope_head_dim, module.v_head_dim
    w = w.view(H, nope + v, w.shape[-1])
    return w[:, :nope], w[:, nope:]


def current_layer(binding: MLABinding) -> MLACacheLayer | None:
    """The binding's layer of the kvcomp MLA cache (dynamic or static) of the running forward."""
    cache = forward_scope.current()
    if not isinstance(cache, (MLACache, MLAStaticCache)):
        return None
    return cache.layers[binding.layer_idx]


def patched_expand_kv(module):
    """The instance ``expand_kv``: the latent unexpanded on a sparse decode step and on every
    decode step of a static cache (absorbed there, dense or sparse), else the model's own
    expansion."""
    own = type(module).expand_kv

    def expand_kv(kv_nope: torch.Tensor, k_rot: torch.Tensor):
        binding: MLABinding | None = getattr(module, "_kvcomp", None)
        if binding is not None:
            binding.sparse_step = False
            layer = current_layer(binding)
            if layer is not None and layer.step_kind == "decode":
                if getattr(layer, "is_static", False):
                    binding.sparse_step = True
                    return kv_nope, k_rot
                mode = binding.handle.policy.mode(binding.layer_idx, layer.max_len)
                if mode != "dense":
                    binding.sparse_step = True
                    return kv_nope, k_rot
        return own(module, kv_nope, k_rot)

    return expand_kv


def kvcomp_mla_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """The "kvcomp_mla" attention function (signature of transformers' attention functions):
    returns (out [B, T, H, v_head_dim], None)."""
    binding: MLABinding | None = getattr(module, "_kvcomp", None)
    fallback = binding.fallback if binding is not None else "sdpa"
    layer = current_layer(binding) if binding is not None else None
    if scaling is None:
        scaling = module.scaling
    if binding is not None and binding.sparse_step:
        binding.sparse_step = False
        if getattr(layer, "is_static", False):
            return _static_decode(module, binding, layer, query, key, value, float(scaling)), None
        return _sparse_decode(module, binding, layer, query, key, value, float(scaling)), None
    if layer is None or layer.step_kind == "prefill":
        fn = fallback_function(module, fallback)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = _dense_compacted(module, query, key, value, layer, fallback, scaling, kwargs)
    if layer.step_kind == "decode":
        layer.record_step("dense", None)
    return out, None


def _dense_compacted(module, query, key, value, layer: MLACacheLayer, fallback, scaling, kwargs):
    """Exact attention over the expanded compacted cache (core's mask rule and dense path)."""
    mask = compacted_mask(layer, key.shape[2], key.device)
    return dense_attention(module, query, key, value, mask, fallback, scaling, kwargs)


def query_codes(q_lat, q_pe, binding: MLABinding, aggregation: str) -> torch.Tensor:
    """Per-head split codes [B, H, W] (aggregation "sum" / "majority"), or the codes of the
    head-averaged query [B, 1, W] ("mean"); both parts in one launch (``hash_encode_split``)."""
    if aggregation == "mean":
        q_lat = q_lat.float().mean(1, keepdim=True)
        q_pe = q_pe.float().mean(1, keepdim=True)
    return hash_encode_split((q_lat, q_pe), (binding.w_lat, binding.w_rope))


def _absorbed_query(module, binding: MLABinding, query: torch.Tensor, dt: torch.dtype):
    """The decode query in latent space: query [B, H, 1, nope + P] -> (q_lat [B, H, R] = q_nope
    @ W_UK, q_pe [B, H, P]), both in the cache dtype ``dt`` (absorbed weights made once per
    binding, on the query's device)."""
    if binding.absorbed is None:
        binding.absorbed = tuple(t.to(query.device) for t in absorb_weights(module, query.dtype))
    w_uk = binding.absorbed[0]
    nope = module.qk_nope_head_dim
    q = query[:, :, 0]  # [B, H, nope + P]
    q_lat = torch.einsum("bhn,hnr->bhr", q[..., :nope].to(w_uk.dtype), w_uk).to(dt)
    return q_lat, q[..., nope:].to(dt).contiguous()


def _absorbed_output(binding: MLABinding, o_lat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Latent attention output o_lat [B, H, R] -> per-head values [B, H, v] (o_lat @ W_UV^T)."""
    w_uv = binding.absorbed[1]
    return torch.einsum("bhr,hvr->bhv", o_lat.to(w_uv.dtype), w_uv).to(dtype)


def _sparse_decode(module, binding: MLABinding, layer: MLACacheLayer, query, ckv, kpe, scaling):
    """Absorbed decode over the selected blocks; query [B, H, 1, nope + P], ckv [B, 1, L, R],
    kpe [B, 1, L, P] -> [B, 1, H, v_head_dim]."""
    handle = binding.handle
    cfg, policy = handle.config, handle.policy
    i = binding.layer_idx
    q_lat, q_pe = _absorbed_query(module, binding, query, ckv.dtype)
    L = layer.max_len
    seq_lens = layer.seq_lens
    mode = policy.mode(i, L)
    if mode == "compute":
        if layer.mla_codes is None:
            raise RuntimeError(f"layer {i} computes a selection but its cache layer keeps no codes")
        codes = query_codes(q_lat, q_pe, binding, cfg.query_aggregation)
        block_idx = hamming_topk(
            codes, layer.mla_codes[:, :, :L], seq_lens,
            k_blocks=policy.k_blocks_tensor(i, seq_lens),
            max_blocks=policy.max_k_blocks(i, L),
            chunk_size=cfg.chunk_size,
            must_select=tuple(cfg.must_select_blocks),
            chunk_repre=cfg.chunk_repre_method,
            mode=_MODES.get(cfg.query_aggregation, "exact"),
        )
        layer.step_block_idx = block_idx
        layer.step_block_idx_update = layer.updates
    else:  # reuse
        j = policy.source(i)
        src = layer._cache_ref().layers[j]
        if src.step_block_idx is None or src.step_block_idx_update != layer.updates:
            raise RuntimeError(f"layer {i} reuses layer {j}'s selection, but layer {j} made none at this step")
        block_idx = src.step_block_idx.to(query.device)
    o_lat = sparse_mla_decode(
        q_lat, q_pe, ckv[:, 0], kpe[:, 0], block_idx, seq_lens,
        chunk_size=cfg.chunk_size, scale=scaling,
    )  # [B, H, R]
    out = _absorbed_output(binding, o_lat, query.dtype)
    layer.record_step(mode, block_idx)
    return out.unsqueeze(1)  # [B, 1, H, v]


def _static_decode(module, binding: MLABinding, layer, query, ckv, kpe, scaling: float):
    """Absorbed decode on an ``MLAStaticCacheLayer`` (``kvcomp_deepseek.static_cache``): tensor
    ops on the full buffers (ckv [B, 1, max_cache_len, R], kpe [B, 1, max_cache_len, P]) with
    the lengths from ``seq_lens``, no host sync, shapes fixed by max_cache_len, so the step can
    be captured in a CUDA graph. Dense layers and steps below the threshold (one length for
    the whole static batch, known on the host) attend to every stored token (``mla_decode``);
    sparse layers select with ``k_blocks_tensor`` and attend to the selected blocks. Returns
    [B, 1, H, v_head_dim]."""
    handle = binding.handle
    cfg, policy = handle.config, handle.policy
    cache = layer._cache_ref()
    i = binding.layer_idx
    q_lat, q_pe = _absorbed_query(module, binding, query, ckv.dtype)
    seq_lens = layer.seq_lens  # [B] int32, the new token included
    cap = layer.keys_buf.shape[2]
    dev = query.device
    if policy.mode(i, layer.padded_len) == "dense":
        o_lat = mla_decode(q_lat, q_pe, ckv[:, 0], kpe[:, 0], seq_lens, scale=scaling)
    else:
        j = policy.source(i)
        if j != i:
            src = cache.layers[j]
            if src.step_block_idx is None or src.step_block_idx_update != layer.updates:
                raise RuntimeError(f"layer {i} reuses layer {j}'s selection, but layer {j} made none at this step")
            block_idx = src.step_block_idx.to(dev)
        else:
            if layer.mla_codes is None:
                raise RuntimeError(f"layer {i} computes a selection but its cache layer keeps no codes")
            codes = query_codes(q_lat, q_pe, binding, cfg.query_aggregation)
            ratio_key = "budget" if cfg.top_k_budget_tokens is not None else cfg.top_k_ratio_per_layer[i]
            k_blocks = cache.step_shared(("mla_k_blocks", ratio_key, dev),
                                         lambda: policy.k_blocks_tensor(i, seq_lens))
            block_idx = hamming_topk(
                codes, layer.mla_codes, seq_lens, k_blocks=k_blocks,
                max_blocks=policy.max_k_blocks(i, cap), chunk_size=cfg.chunk_size,
                must_select=tuple(cfg.must_select_blocks), chunk_repre=cfg.chunk_repre_method,
                mode=_MODES.get(cfg.query_aggregation, "exact"),
            )
            layer.step_block_idx = block_idx
            layer.step_block_idx_update = layer.updates
        o_lat = sparse_mla_decode(q_lat, q_pe, ckv[:, 0], kpe[:, 0], block_idx, seq_lens,
                                  chunk_size=cfg.chunk_size, scale=scaling)  # [B, H, R]
    out = _absorbed_output(binding, o_lat, query.dtype)
    return out.unsqueeze(1)  # [B, 1, H, v]


def register() -> None:
    """Register "kvcomp_mla" with transformers' attention and mask interfaces (the mask
    function is core's: the previous implementation's mask, none on a kvcomp cache's past)."""
    AttentionInterface.register(ATTN_NAME, kvcomp_mla_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvcomp_mask)
