"""``FusedDecode``: a decoder layer's decode step in few kernels (norms, RoPE, projections).

In a CUDA-graph decode step of a transformers model the attention is no longer the cost: at
128K context with Qwen3-8B's shape the rest of the layer is (``docs/benchmarks/e2e.md``):
cuBLAS GEMVs on seven separate weights (twelve kernels per layer with their split-K reduces),
RMSNorms of eight kernels each, the rotary embedding of about fourteen, residual adds. Each
kernel boundary also costs the GPU time. ``FusedDecode(model)`` replaces those forwards, for
small inputs only (decode steps), with one Triton kernel each:

    RMSNorm   classes named in ``RMS_NORMS`` -> ``kvcomp.ops.rms_norm``
    MLP       modules with gate_proj / up_proj / down_proj Linear layers and a SiLU ``act_fn``:
              down(silu(gate(x)) * up(x)) -> one ``gemv`` on the merged gate|up weight with
              ``silu(gate) * up`` in its epilogue for one-row inputs (``gemv(gated=True)``;
              ``GATED_MLP``, ``GATED_MLP_MAX_ROWS``), else the gemv and ``silu_mul``; ``gemv``
              of down
    RoPE      ``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling modules in
              ``ROPE_MODULES`` -> ``kvcomp.ops.rope``: a global of that module, replaced while a
              ``FusedDecode`` is active (for every model of that type in the process: the fused
              path applies only to the shapes it supports and calls the original otherwise)
    Linear    every ``nn.Linear`` (o_proj, lm_head, ...) -> ``kvcomp.ops.gemv``; the q / k / v
              projections of an attention module read one merged q|k|v weight: the first of
              the three called with an input computes all three in one ``gemv`` and the other
              two return their slices for the same input object
    q/k norm  attention classes in ``HEAD_NORM_ATTENTION`` (per-head q_norm / k_norm, Qwen3):
              the merged projection normalises its q and k heads in one ``head_rms_norm_``
              launch and the two norm modules then pass that exact output through (they check
              that their input is the slice the projection normalised; anything else is
              normalised as usual), where the model ran two norm launches
    attention attention classes in ``ATTENTIONS`` whose layer runs on a static kvcomp cache
              (``handle.new_cache(static=True)``), decode steps: the merged projection, then
              ``KVCompStaticLayer.update_rotary``: the head norms, RoPE, the cache append (and
              the key's code) and the query codes in one ``kvcomp.ops.rope_append`` launch,
              then kvcomp's attention with those codes, then o_proj; any other call (prefill,
              another cache, ``FUSED_ATTENTION_STEP`` off) runs the module's own forward
    layer     decoder layers of the classes in ``LAYERS`` (pre-norm, SiLU MLP): the residual
              adds in the epilogues of o_proj and down_proj; for one-row inputs (B = 1) each
              RMSNorm inside the projection that follows it (``gemv(norm=...)``: the input norm
              in the merged q|k|v projection, the post-attention norm in gate|up; the attention
              then receives the raw input, which its projections alone read; with more rows the
              tensor-core tiles measured slower with the norm inside, so the norms run alone). The folded norms skip the modules' two
              roundings of the normalised input (fp32 throughout; tensor-core tiles round it
              once): within bf16 rounding of the module chain, not bit-identical to it

Merging rebinds each projection's weight (and bias) to a slice of one new tensor: no extra
memory once the old tensors are freed, and the merge stays after ``remove`` (the parameters
are ordinary views). The fused ops compute the modules' math in the same precisions and
differ from them by float summation order (a GEMV or a norm's mean), except the norms folded
into the projections (layer, above), which round less; tested against the unfused model.
Plain kernels, not ``torch.compile``: no recompilation per batch size or tensor layout (dynamo
guards on both), nothing to compile inside a CUDA-graph capture. Every ``gemv`` here takes
``early=True``: a model's parameters are complete before a decode step starts, so with
programmatic dependent launch each projection reads its weight's first tile while the kernel
before it drains.

    fused = FusedDecode(model)        # or handle.compile_decode(fuse=True)
    ...                               # decode steps (eager or replayed from CUDA graphs)
    fused.remove()                    # the modules' own forwards again
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from kvcomp.ops.gemv import MAX_ROWS as GEMV_ROWS
from kvcomp.ops.gemv import gemv
from kvcomp.ops.norm_act import add_rms_norm, head_rms_norm_, rms_norm, rope, silu_mul

__all__ = ["ATTENTIONS", "FusedDecode", "HEAD_NORM_ATTENTION", "LAYERS", "RMS_NORMS", "ROPE_MODULES"]

# RMSNorm classes whose forward is exactly weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
RMS_NORMS = (
    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm", "DeepseekV2RMSNorm", "DeepseekV3RMSNorm",
)
SILU = ("SiLU", "SiLUActivation")
# modeling modules whose apply_rotary_pos_emb is q * cos + rotate_half(q) * sin (half split)
ROPE_MODULES = (
    "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "transformers.models.qwen3.modeling_qwen3", "transformers.models.qwen3_moe.modeling_qwen3_moe",
)
# attention modules whose forward is q_norm(q_proj(x).view(..., H, D)), k_norm(k_proj(x).view(...))
HEAD_NORM_ATTENTION = ("Qwen3Attention", "Qwen3MoeAttention")
# decoder layers whose forward is h = x + attn(norm1(x)); out = h + mlp(norm2(h))
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
# attention modules whose forward is: q / k / v projections (q / k head norms for the classes
# in HEAD_NORM_ATTENTION), apply_rotary_pos_emb, cache.update, the attention function, o_proj
ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
# read at every call: False sends the patched attentions through their own forwards (benchmarks
# time both in one process: tools/experiments/e2e_knobs.py)
FUSED_ATTENTION_STEP = True
# read at every call: the MLP's silu(gate) * up in the merged gate|up gemv's epilogue
# (``gemv(gated=True)``); False: the gemv, then ``silu_mul`` (a second launch)
GATED_MLP = True
# ... for inputs of at most this many rows: one row (the CUDA-core tiles) measured faster on the
# H200; B = 4 (tensor-core tiles) lost ~0.95 ms a step in both decoders (session 13), 0.8 ms
# with the stacked tile, where the kernel alone ties gemv + silu_mul: the down projection,
# launched early by its PDL trigger, ran at half speed; without that trigger it ties the two
# launches (docs/benchmarks/e2e.md, session 15)
GATED_MLP_MAX_ROWS = 1


def _is_linear(m) -> bool:
    return type(m) is torch.nn.Linear and m.weight.device.type != "meta"


def _is_silu_mlp(m: torch.nn.Module) -> bool:
    return (all(_is_linear(getattr(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)).__name__ in SILU)


class _Merged:
    """Linear layers that read one input (q / k / v, gate / up) as one [sum N_i, K] weight."""

    def __init__(self, linears):
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
        self.slices, a = [], 0
        for lin in linears:
            b = a + lin.out_features
            lin.weight.data = self.weight[a:b]
            if has_bias:
                lin.bias.data = self.bias[a:b]
            self.slices.append((a, b))
            a = b
        self._x = self._y = None
        self._left = 0
        self.head_norms = None  # (q_norm, k_norm, hq, hk): heads normalised after the projection
        self.input_norm = None  # (x, norm weight, eps): x RMS-normalised inside the next projection
        self.pending: dict[torch.nn.Module, tuple[int, torch.Tensor]] = {}  # norm -> (data_ptr, y)

    @staticmethod
    def mergeable(linears) -> bool:
        w0 = linears[0].weight
        return (all(_is_linear(lin) for lin in linears)
                and all(lin.weight.dtype == w0.dtype and lin.weight.device == w0.device
                        and lin.in_features == linears[0].in_features for lin in linears)
                and len({lin.bias is None for lin in linears}) == 1)

    def project_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The whole merged projection of x, the input norm inside it where one is pending, the
        head norms not applied (the caller applies them): [..., sum N_i]."""
        norm = None
        if self.input_norm is not None and self.input_norm[0] is x:
            norm, self.input_norm = self.input_norm[1:], None
        self._x = self._y = None
        self.pending = {}
        return gemv(x, self.weight, self.bias, norm=norm, early=True)

    def project(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Output slice i of the merged projection of x (computed once per input object)."""
        if self._x is not x:
            norm = None
            if self.input_norm is not None and self.input_norm[0] is x:
                norm, self.input_norm = self.input_norm[1:], None
            y = gemv(x, self.weight, self.bias, norm=norm, early=True)
            self.pending = {}
            if self.head_norms is not None:
                qn, kn, hq, hk = self.head_norms
                head_rms_norm_(y.view(-1, y.shape[-1]), qn.weight, kn.weight, hq, hk, float(qn.variance_epsilon))
                self.pending = {qn: (y.data_ptr(), y),
                                kn: (y[..., self.slices[1][0]:].data_ptr(), y)}
            self._y = y
            self._x, self._left = x, len(self.slices)
        a, b = self.slices[i]
        y = self._y[..., a:b]
        self._left -= 1
        if self._left <= 0:
            self._x = self._y = None
        return y


class FusedDecode:
    """Fused forwards for decode-sized inputs of ``model`` (module doc).

    Args:
        model:     a transformers model (any ``nn.Module``)
        max_rows:  inputs with at most this many rows (product of all dims but the last) take
                   the fused norms, activation and RoPE; projections take ``gemv`` up to
                   ``kvcomp.ops.gemv.MAX_ROWS`` rows; larger inputs (prefill) run the modules'
                   own forwards
        devices:   device types where the fused path is used (default: CUDA; "cpu" runs the
                   kernels under TRITON_INTERPRET=1, else the torch references)
        rope:      replace ``apply_rotary_pos_emb`` (default True)
        linear:    projections as ``gemv`` with merged q|k|v and gate|up weights (default True)
        layers:    the residual adds fused into the decoder layers' norm / down projection
                   (default True; needs ``linear``)
        attention: decode steps of the attention classes in ``ATTENTIONS`` on a static kvcomp
                   cache run the head norms, RoPE, the cache append and the query codes as
                   one ``kvcomp.ops.rope_append`` launch (``KVCompStaticLayer.update_rotary``)
                   between the merged projection and the attention function (default True;
                   needs ``linear``); any other call runs the module's own forward
    """

    def __init__(self, model: torch.nn.Module, *, max_rows: int = 256, devices=("cuda",),
                 rope: bool = True, linear: bool = True, layers: bool = True, attention: bool = True):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.devices = tuple(devices)
        self.norms = self.mlps = self.linears = self.merged = self.layers = 0
        self._patched: list[torch.nn.Module] = []
        self._rope_patched: list[tuple[object, object]] = []  # (python module, original function)
        self._members: dict[torch.nn.Module, tuple[_Merged, int]] = {}
        self._gate_up: dict[torch.nn.Module, _Merged] = {}
        self._norm_owner: dict[torch.nn.Module, _Merged] = {}
        self._attn_qkv: dict[torch.nn.Module, _Merged] = {}
        self._pending_res: dict[torch.nn.Module, torch.Tensor] = {}  # o_proj -> residual to add
        self._linear_set: set[torch.nn.Module] = set()
        self.head_norms = self.attentions = 0
        for m in model.modules():
            mod = sys.modules.get(type(m).__module__)
            if (rope and type(m).__module__ in ROPE_MODULES and mod is not None
                    and not any(p[0] is mod for p in self._rope_patched)):
                orig = getattr(mod, "apply_rotary_pos_emb", None)
                if orig is not None and not getattr(orig, "_kvcomp_fused", False):
                    mod.apply_rotary_pos_emb = self._rope_function(orig)
                    self._rope_patched.append((mod, orig))
            if linear and self._on_device(m, "q_proj"):
                qkv = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
                if all(lin is not None for lin in qkv) and _Merged.mergeable(qkv) and not any(
                        "forward" in lin.__dict__ for lin in qkv):
                    merged = _Merged(qkv)
                    for i, lin in enumerate(qkv):
                        self._members[lin] = (merged, i)
                        self._patch(lin, self._member_forward)
                    self.merged += 1
                    self._attn_qkv[m] = merged
                    self._merge_head_norms(m, merged)
                    if (attention and type(m).__name__ in ATTENTIONS and "forward" not in m.__dict__
                            and isinstance(getattr(m, "head_dim", None), int)
                            and (type(m).__name__ not in HEAD_NORM_ATTENTION or merged.head_norms is not None)):
                        self._patch(m, self._attn_forward)
                        self.attentions += 1
                        continue
            if "forward" in m.__dict__:
                continue  # already wrapped (by us or someone else): leave it
            if type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon"):
                self._patch(m, self._norm_forward)
                self.norms += 1
            elif _is_silu_mlp(m):
                if linear and self._on_device(m, "gate_proj") and _Merged.mergeable([m.gate_proj, m.up_proj]):
                    self._gate_up[m] = _Merged([m.gate_proj, m.up_proj])
                    self.merged += 1
                self._patch(m, self._mlp_forward)
                self.mlps += 1
            elif linear and _is_linear(m) and m.weight.device.type in self.devices:
                self._patch(m, self._linear_forward)
                self._linear_set.add(m)
                self.linears += 1
        if layers and linear:
            for m in model.modules():
                if (type(m).__name__ in LAYERS and "forward" not in m.__dict__
                        and getattr(m, "mlp", None) in self._gate_up
                        and type(getattr(m, "post_attention_layernorm", None)).__name__ in RMS_NORMS
                        and hasattr(m, "input_layernorm") and hasattr(m, "self_attn")):
                    self._patch(m, self._layer_forward)
                    self.layers += 1

    def _merge_head_norms(self, attn, merged: _Merged) -> None:
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        D = getattr(attn, "head_dim", None)
        if (type(attn).__name__ not in HEAD_NORM_ATTENTION or not isinstance(D, int)
                or any(type(n).__name__ not in RMS_NORMS or "forward" in n.__dict__
                       or not hasattr(n, "variance_epsilon") for n in (qn, kn))):
            return
        w = merged.weight
        if (qn.weight.shape != (D,) or kn.weight.shape != (D,) or qn.weight.dtype != w.dtype
                or kn.weight.dtype != w.dtype or qn.variance_epsilon != kn.variance_epsilon
                or attn.q_proj.out_features % D or attn.k_proj.out_features % D):
            return
        merged.head_norms = (qn, kn, attn.q_proj.out_features // D, attn.k_proj.out_features // D)
        self._norm_owner[qn] = self._norm_owner[kn] = merged
        self.head_norms += 1

    # ------------------------------------------------------------------ helpers
    def _on_device(self, m, name) -> bool:
        lin = getattr(m, name, None)
        return _is_linear(lin) and lin.weight.device.type in self.devices

    def _patch(self, m, fn) -> None:
        m.forward = types.MethodType(fn, m)
        self._patched.append(m)

    def _use(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices and x.numel() <= self.max_rows * x.shape[-1]

    def _prologue_norm_ok(self, norm, x: torch.Tensor) -> bool:
        return (type(norm).__name__ in RMS_NORMS and hasattr(norm, "variance_epsilon")
                and norm.weight.dim() == 1 and norm.weight.shape[0] == x.shape[-1]
                and norm.weight.device == x.device)

    def _gemv_ok(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        return (x.device.type in self.devices and x.dtype == w.dtype and x.device == w.device
                and x.numel() <= GEMV_ROWS * x.shape[-1])

    # ------------------------------------------------------------------ forwards (bound to modules)
    def _norm_forward(fused, m, hidden_states):  # noqa: N805
        owner = fused._norm_owner.get(m)
        if owner is not None:  # already normalised by the merged projection (q / k norm)?
            got = owner.pending.get(m)
            if got is not None and got[0] == hidden_states.data_ptr():
                del owner.pending[m]
                return hidden_states
        if not fused._use(hidden_states):
            return type(m).forward(m, hidden_states)
        return rms_norm(hidden_states, m.weight, float(m.variance_epsilon))

    def _linear_forward(fused, m, x):  # noqa: N805
        res = fused._pending_res.pop(m, None)  # a decoder layer's residual, added in the epilogue
        if not fused._gemv_ok(x, m.weight):
            y = F.linear(x, m.weight, m.bias)
            return y if res is None else res + y
        return gemv(x, m.weight, m.bias, residual=res, early=True)

    def _member_forward(fused, m, x):  # noqa: N805
        merged, i = fused._members[m]
        if not fused._gemv_ok(x, m.weight):
            if merged.input_norm is not None and merged.input_norm[0] is x:
                raise RuntimeError("FusedDecode: a projection expected to normalise its input took the "
                                   "unfused path; remove() the fusion for this model")
            return F.linear(x, m.weight, m.bias)
        return merged.project(i, x)

    def _attn_decode_args(fused, m, args, kwargs):
        """(x, cos, sin, mask, cache layer, merged) where ``_attn_forward``'s fused decode step
        applies to this call, else None."""
        from kvcomp.attention import ATTN_NAME

        names = ("hidden_states", "position_embeddings", "attention_mask")
        if len(args) > len(names):
            return None
        got = dict(zip(names, args))
        got.update((n, kwargs[n]) for n in names if n in kwargs)
        x, pe = got.get("hidden_states"), got.get("position_embeddings")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        merged = fused._attn_qkv.get(m)
        if (not FUSED_ATTENTION_STEP or x is None or pe is None or cache is None or merged is None or x.dim() != 3 or x.shape[1] != 1
                or not fused._gemv_ok(x, merged.weight) or getattr(m, "_kvcomp", None) is None
                or getattr(m.config, "_attn_implementation", None) != ATTN_NAME):
            return None
        layers = getattr(cache, "layers", ())
        layer = layers[m.layer_idx] if m.layer_idx < len(layers) else None
        if (layer is None or not hasattr(layer, "update_rotary") or not layer.is_initialized
                or layer.padded_len == 0 or layer.norms_buf is not None):
            return None
        cos, sin = pe
        if cos.dim() != 3 or cos.shape[1:] != (1, m.head_dim) or cos.dtype != x.dtype or sin.shape != cos.shape:
            return None
        return x, cos, sin, got.get("attention_mask"), layer, merged

    def _attn_forward(fused, m, *args, **kwargs):  # noqa: N805
        """A decode step on a static kvcomp cache: merged projection, ``update_rotary`` (norms,
        RoPE, append, query codes: one launch), kvcomp's attention, o_proj; else the module's
        own forward."""
        got = fused._attn_decode_args(m, args, kwargs)
        if got is None:
            return type(m).forward(m, *args, **kwargs)
        from kvcomp.attention import kvcomp_attention, static_query_weight

        x, cos, sin, mask, layer, merged = got
        B, D = x.shape[0], m.head_dim
        y = merged.project_raw(x)  # [B, 1, (Hq + 2 Hkv) * D]
        (_, q_end), (_, k_end), (_, v_end) = merged.slices
        q = y[..., :q_end].view(B, 1, -1, D).transpose(1, 2)
        k = y[..., q_end:k_end].view(B, 1, -1, D).transpose(1, 2)
        v = y[..., k_end:v_end].view(B, 1, -1, D).transpose(1, 2)
        norms = {}
        if merged.head_norms is not None:
            qn, kn = merged.head_norms[:2]
            norms = dict(q_norm=qn.weight, k_norm=kn.weight, eps=float(qn.variance_epsilon))
        # only q / k / v come from the launch before (the projection): early loads are safe
        q_rot, key, value = layer.update_rotary(q, k, v, cos, sin, q_weight=static_query_weight(m, layer),
                                                early=True, **norms)
        rest = {n: a for n, a in kwargs.items() if n not in (
            "hidden_states", "position_embeddings", "attention_mask", "cache", "past_key_values")}
        out, _ = kvcomp_attention(m, q_rot, key, value, mask, dropout=0.0, scaling=m.scaling,
                                  sliding_window=getattr(m, "sliding_window", None), **rest)
        return m.o_proj(out.reshape(B, 1, -1).contiguous()), None

    def _mlp_forward(fused, m, x):  # noqa: N805
        if not fused._use(x):
            return type(m).forward(m, x)
        gu = fused._gate_up.get(m)
        if gu is None or not fused._gemv_ok(x, gu.weight):
            return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))
        return m.down_proj(fused._gate_up_act(gu, m, x))

    @staticmethod
    def _gate_up_act(gu: _Merged, mlp, x: torch.Tensor, norm=None) -> torch.Tensor:
        """silu(gate(x)) * up(x) from the merged gate|up weight: in the gemv's epilogue where the
        halves match (``GATED_MLP``), else the gemv then ``silu_mul``."""
        n = mlp.gate_proj.out_features
        if GATED_MLP and 2 * n == gu.weight.shape[0] and x.numel() <= GATED_MLP_MAX_ROWS * x.shape[-1]:
            return gemv(x, gu.weight, gu.bias, norm=norm, gated=True, early=True)
        y = gemv(x, gu.weight, gu.bias, norm=norm, early=True)
        return silu_mul(y[..., :n], y[..., n:])

    def _layer_forward(fused, m, hidden_states, *args, **kwargs):  # noqa: N805
        mlp = m.mlp
        gu = fused._gate_up[mlp]
        if args or not fused._use(hidden_states) or not fused._gemv_ok(hidden_states, gu.weight):
            return type(m).forward(m, hidden_states, *args, **kwargs)
        attn = m.self_attn
        qkv = fused._attn_qkv.get(attn)
        inorm = m.input_layernorm
        one_row = hidden_states.numel() == hidden_states.shape[-1]
        if one_row and qkv is not None and fused._prologue_norm_ok(inorm, hidden_states):
            # the input norm runs inside the q|k|v projection; the attention receives the raw
            # input, which its projections read (and nothing else but its shape)
            qkv.input_norm = (hidden_states, inorm.weight, float(inorm.variance_epsilon))
            h_in = hidden_states
        else:
            h_in = inorm(hidden_states)
        o_proj = getattr(attn, "o_proj", None)
        registered = o_proj in fused._linear_set
        if registered:
            fused._pending_res[o_proj] = hidden_states  # the residual add in o_proj's epilogue
        try:
            h, _ = attn(hidden_states=h_in, **kwargs)
        finally:
            added = registered and fused._pending_res.pop(o_proj, None) is None
            missed = qkv is not None and qkv.input_norm is not None
            if qkv is not None:
                qkv.input_norm = None
        if missed:
            raise RuntimeError(f"FusedDecode: {type(attn).__name__} did not project its input through "
                               "q_proj / k_proj / v_proj; this attention class cannot take the fused layer")
        post = m.post_attention_layernorm
        eps = float(post.variance_epsilon)
        if one_row:
            h = h if added else hidden_states + h
            a = fused._gate_up_act(gu, mlp, h, norm=(post.weight, eps))
        else:  # the norm folded into tensor-core tiles measured slower (H200): its own kernel
            hn, h = (post(h), h) if added else add_rms_norm(h, hidden_states, post.weight, eps)
            a = fused._gate_up_act(gu, mlp, hn)
        return gemv(a, mlp.down_proj.weight, mlp.down_proj.bias, residual=h, early=True)

    def _rope_function(self, orig):
        fused = self

        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            plain = not args and kwargs.get("unsqueeze_dim", 1) == 1 and len(kwargs) <= 1
            if (plain and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
                    and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == q.shape[2:]
                    and q.device.type in fused.devices and q.shape[0] * q.shape[2] <= fused.max_rows):
                return rope(q, k, cos, sin)
            return orig(q, k, cos, sin, *args, **kwargs)

        apply_rotary_pos_emb._kvcomp_fused = True
        apply_rotary_pos_emb.__doc__ = orig.__doc__
        return apply_rotary_pos_emb

    @property
    def ropes(self) -> int:
        """Modeling modules whose ``apply_rotary_pos_emb`` this object replaced."""
        return len(self._rope_patched)

    def remove(self) -> None:
        """Give every patched module its own forward back, and the modeling modules their
        ``apply_rotary_pos_emb`` (merged weights stay merged: module doc)."""
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched = []
        self._members.clear()
        self._gate_up.clear()
        self._norm_owner.clear()
        self._attn_qkv.clear()
        self._pending_res.clear()
        self._linear_set.clear()
        for mod, orig in self._rope_patched:
            mod.apply_rotary_pos_emb = orig
        self._rope_patched = []

    def __repr__(self) -> str:
        return (f"FusedDecode(norms={self.norms}, mlps={self.mlps}, ropes={self.ropes}, "
                f"linears={self.linears}, merged={self.merged}, head_norms={self.head_norms}, "
                f"layers={self.layers}, attentions={self.attentions}, "
                f"max_rows={self.max_rows}, devices={self.devices})")
