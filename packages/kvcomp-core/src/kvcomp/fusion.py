"""``FusedDecode``: one kernel per RMSNorm and per gated-MLP activation in decode steps.

In a CUDA-graph decode step of a transformers model the attention is no longer the cost: at
128K context with Qwen3-8B's shape, ~20% of the GPU time is the model's unfused elementwise
kernels (``docs/benchmarks/e2e.md``). Each RMSNorm runs as eight kernels (cast, pow, mean,
add, rsqrt, mul, cast, mul), four per decoder layer with Qwen3's per-head q / k norms, and the
gated MLP's ``act(gate) * up`` as two, the rotary embedding of q and k as about fourteen.
``FusedDecode(model)`` replaces those modules' forwards with ``kvcomp.ops.rms_norm`` /
``silu_mul`` and the modeling module's ``apply_rotary_pos_emb`` with ``kvcomp.ops.rope`` (one
Triton kernel each, the same math in the same precisions), used only for small inputs (decode
steps: at most ``max_rows`` rows) on the configured device types; larger inputs (prefill) and
everything else run the original code.

    fused = FusedDecode(model)        # or handle.compile_decode(fuse=True)
    ...                               # decode steps (eager or replayed from CUDA graphs)
    fused.remove()                    # the modules' own forwards again

Modules touched (matched by class: the math is the one of these classes):

    RMSNorm   classes named in ``RMS_NORMS``: y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
    MLP       modules with gate_proj / up_proj / down_proj Linear layers and a SiLU ``act_fn``:
              down(silu(gate(x)) * up(x)); the fused part is silu(.) * (.)
    RoPE      (``rope=True`` only, experimental) ``apply_rotary_pos_emb(q, k, cos, sin)`` of
              the modeling modules in ``ROPE_MODULES`` (llama, mistral, qwen2 / 3 and their MoE
              variants): a global of that module, replaced while a ``FusedDecode`` is active
              (for every model of that type in the process: the fused path applies only to the
              shapes it supports and calls the original otherwise). Off by default: on the H200
              (triton 3.6) ``kvcomp.ops.rope`` did not reproduce torch's results bit for bit
              (``tests/core/test_norm_act.py::test_rope``); the PTX showed why (the compiler
              contracted a product and the sum into one ``fma.rn.bf16``), it is launched without
              fp contraction since, and stays opt-in until that runs on a GPU

Outputs equal the module's own up to float rounding (the mean adds in another order; tested).
Plain kernels, not ``torch.compile``: no recompilation per batch size or tensor layout (dynamo
guards on both), nothing to compile inside a CUDA-graph capture.
"""

from __future__ import annotations

import sys
import types

import torch

from kvcomp.ops.norm_act import rms_norm, rope, silu_mul

__all__ = ["FusedDecode", "RMS_NORMS"]

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


def _is_silu_mlp(m: torch.nn.Module) -> bool:
    return (
        all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(m, "act_fn", None)).__name__ in SILU
    )


class FusedDecode:
    """Fused RMSNorm / SiLU-MLP forwards for decode-sized inputs of ``model`` (module doc).

    Args:
        model:     a transformers model (any ``nn.Module``)
        max_rows:  inputs with at most this many rows (product of all dims but the last) take
                   the fused path; others (prefill) the module's own forward
        devices:   device types where the fused path is used (default: CUDA; "cpu" runs the
                   kernels under TRITON_INTERPRET=1, else the torch references)
        rope:      also replace ``apply_rotary_pos_emb`` (experimental, module doc)
    """

    def __init__(self, model: torch.nn.Module, *, max_rows: int = 256, devices=("cuda",),
                 rope: bool = False):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.devices = tuple(devices)
        self.norms = 0
        self.mlps = 0
        self._patched: list[torch.nn.Module] = []
        self._rope_patched: list[tuple[object, object]] = []  # (python module, original function)
        for m in model.modules():
            mod = sys.modules.get(type(m).__module__)
            if (rope and type(m).__module__ in ROPE_MODULES and mod is not None
                    and not any(p[0] is mod for p in self._rope_patched)):
                orig = getattr(mod, "apply_rotary_pos_emb", None)
                if orig is not None and not getattr(orig, "_kvcomp_fused", False):
                    mod.apply_rotary_pos_emb = self._rope_function(orig)
                    self._rope_patched.append((mod, orig))
            if "forward" in m.__dict__:
                continue  # already wrapped (by us or someone else): leave it
            if type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon"):
                m.forward = types.MethodType(self._norm_forward, m)
                self.norms += 1
            elif _is_silu_mlp(m):
                m.forward = types.MethodType(self._mlp_forward, m)
                self.mlps += 1
            else:
                continue
            self._patched.append(m)

    def _use(self, x: torch.Tensor) -> bool:
        return x.device.type in self.devices and x.numel() <= self.max_rows * x.shape[-1]

    def _norm_forward(fused, m, hidden_states):  # noqa: N805 (bound to the module)
        if not fused._use(hidden_states):
            return type(m).forward(m, hidden_states)
        return rms_norm(hidden_states, m.weight, float(m.variance_epsilon))

    def _mlp_forward(fused, m, x):  # noqa: N805
        if not fused._use(x):
            return type(m).forward(m, x)
        return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))

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
        ``apply_rotary_pos_emb``."""
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched = []
        for mod, orig in self._rope_patched:
            mod.apply_rotary_pos_emb = orig
        self._rope_patched = []

    def __repr__(self) -> str:
        return (f"FusedDecode(norms={self.norms}, mlps={self.mlps}, ropes={self.ropes}, "
                f"max_rows={self.max_rows}, devices={self.devices})")
