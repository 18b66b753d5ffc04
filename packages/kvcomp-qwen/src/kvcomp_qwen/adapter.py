"""``QwenAdapter``: Qwen2 / Qwen2.5 / QwQ (model_type "qwen2"), Qwen2-MoE ("qwen2_moe"),
Qwen3 ("qwen3") and Qwen3-MoE ("qwen3_moe").

All four are GQA models whose attention modules follow transformers' standard path (keys
after RoPE, and after q/k-norm on Qwen3, go through ``cache.update`` and then the
AttentionInterface), so core's ``GQAAdapter`` serves them unchanged; layers that
``config.layer_types`` marks "sliding_attention" (Qwen2 with ``use_sliding_window``) stay dense.
What this package adds is its shipped configs, loadable by name:

    kvcomp.enable(model, "qwen3-8b")
"""

from __future__ import annotations

from pathlib import Path

from kvcomp.adapters.base import GQAAdapter

__all__ = ["QwenAdapter", "CONFIGS_DIR"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class QwenAdapter(GQAAdapter):
    name = "qwen"
    model_types = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
    configs_dir = CONFIGS_DIR
