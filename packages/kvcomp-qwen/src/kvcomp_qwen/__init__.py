"""kvcomp adapter for Qwen2 / Qwen2.5 / Qwen3 / Qwen-MoE / QwQ (GQA)."""

__version__ = "0.1.0"
