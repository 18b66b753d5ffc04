"""kvcomp adapter for Qwen2 / Qwen2.5 / Qwen3 / Qwen-MoE / QwQ (GQA).

Installed, it registers ``QwenAdapter`` for model_types qwen2, qwen2_moe, qwen3 and qwen3_moe
(entry-point group ``kvcomp.adapters``) and ships seed-format configs, loadable by name with
``kvcomp.enable(model, NAME)``:

    name            model                layers  q/kv heads  head_dim
    qwen3-4b        Qwen/Qwen3-4B        36      32 / 8      128
    qwen3-8b        Qwen/Qwen3-8B        36      32 / 8      128
    qwen3-32b       Qwen/Qwen3-32B       64      64 / 8      128
    qwq-32b         Qwen/QwQ-32B         64      40 / 8      128   (qwen2 architecture)
    qwen3-30b-a3b   Qwen/Qwen3-30B-A3B   48      32 / 4      128   (qwen3_moe)

Each: 128-bit random hashes, chunk 128, threshold 2048, must-select [0, -2, -1], top-k ratio
0.3 on every layer but the first two, which stay dense (ratio 1.0).
"""

__version__ = "0.1.0"
