"""End-to-end decode speed of a 4-layer DeepSeek-V3-shaped (MLA) model: kvcomp against dense, static caches + CUDA graphs.

The model is built from DeepSeek-V3's real config values with 4 layers instead of 61
(hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64,
v_head 128, first_k_dense_replace 3, so layers 0-2 have the dense 18432-wide MLP and layer 3
is MoE with the real 256 routed experts (top-8, 8 groups, top-4 groups) and 1 shared expert of
2048, vocab 129280, YaRN rope of factor 40), random bf16 weights built on the GPU (no
download). Per context length L and batch B, three decoders run in the same process, one after
the other (each cache freed before the next), every one with a static cache and the same
CUDA-graph runner (``kvcomp.graphs.DecodeGraphs``):

    kvcomp    kvcomp.enable(model, config) + handle.new_cache(static=True) (an
              ``MLAStaticCache``): the adapter's default layout, first two layers dense, layers
              2-3 select 2048 tokens (16 blocks of 128) from 512 + 64-bit split codes of the
              latent (``--budget``), threshold 2048; absorbed decode in latent space
    dense     transformers' StaticCache + sdpa, exactly as transformers runs DeepSeek: the cached
              latent of the whole preallocated cache is expanded by kv_b_proj into per-head K/V
              at every step, then SDPA with a mask over the whole cache
    dense_kv  kvcomp all-blocks: the MLA static cache with every layer dense, i.e. the absorbed
              latent decode over every stored token (``kvcomp.ops.mla_decode``): the strong
              dense baseline (the way DeepSeek's own inference decodes)

The protocol is ``kvcomp bench e2e``'s (``kvcomp.bench.e2e``, whose helpers this module uses):
contexts are filled synthetically (a 16-token real prefill makes the caches, then rows 0..L-1
of every layer get a random normal latent and, for kvcomp, its split codes from
``hash_encode``); a few warm-up steps (the first captures the graph), then greedy steps timed
with CUDA events: per-step latency, tokens/s, peak memory. Prefill time and the share of it
spent hashing: a real prefill of ``--prefill-ctx`` tokens on the static caches of dense_kv and
kvcomp, and the split codes of one layer's latent timed once per hashed layer.

Verified first, or no speedup is printed: (1) kvcomp all-blocks (absorbed) equals transformers'
dense decode (logits, relative error within the larger of 1e-2 and 3x the gap between sdpa's
math and default backends on the same model); (2) graph replay equals the eager step over
several teacher-forced steps, for the decoders the run times (``--methods``): kvcomp sparse and
all-blocks within 1e-3 relative and the same argmax; transformers' dense (not deterministic run
to run) the same argmax or a gap within the larger of 1e-2 and 3x that of two eager runs (both
recorded). The checks are ``kvcomp bench e2e``'s (``e2e.verify_decoders``).

Run: ``kvcomp bench e2e --model deepseek-v3 [--json PATH] ...`` (256 steps by default), ``kvcomp
bench e2e_mla ...`` or ``python -m kvcomp.bench.e2e_mla ...`` (64 by default); ``--tiny``: a toy
config on the CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from kvcomp.bench import e2e

DEEPSEEK_V3_4L = dict(
    hidden_size=7168, num_hidden_layers=4, num_attention_heads=128, num_key_value_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
    intermediate_size=18432, moe_intermediate_size=2048, vocab_size=129280,
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)
TINY = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24,
    first_k_dense_replace=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    intermediate_size=96, moe_intermediate_size=32, vocab_size=512,
    max_position_embeddings=16384, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY_HASH = dict(bits_kv=64, bits_rope=32)
METHODS = e2e.METHODS  # ("kvcomp", "dense", "dense_kv")
ORDER = [(131072, 1), (65536, 4), (32768, 1), (65536, 1), (32768, 4), (131072, 4)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    e2e.add_run_arguments(p, tiny_help="a toy 4-layer DeepSeek-V3 config at small contexts (CPU smoke test)",
                          contexts="32768,65536,131072", steps=64)


# ---------------------------------------------------------------------------------- model
def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """DeepseekV3ForCausalLM of DEEPSEEK_V3_4L (or TINY), random weights in ``dtype`` on ``device``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from kvcomp.bench.e2e import random_model

    return random_model(DeepseekV3Config, DeepseekV3ForCausalLM, TINY if tiny else DEEPSEEK_V3_4L, device, dtype)


def kvcomp_config(model, *, budget: int, dense: bool, tiny: bool):
    """The adapter's default MLA layout (first two layers dense, 512 + 64 hash bits) with a
    ``budget``-token selection, or every layer dense (``dense``: kvcomp all-blocks)."""
    from kvcomp.config import KVCompConfig

    c = model.config
    kw = dict(TINY_HASH, chunk_size=16, threshold=64) if tiny else {}
    if dense:
        kw.update(ratio=1.0, dense_layers=0)
    else:
        kw.update(top_k_budget_tokens=budget)
    return KVCompConfig.default_mla("deepseek-v3-4l", c.num_hidden_layers, c.kv_lora_rank,
                                    c.qk_rope_head_dim, **kw)


class Decoder(e2e.Decoder):
    """One of METHODS on the MLA model: ``make_cache(max_len)`` (an ``MLAStaticCache`` or
    transformers' StaticCache of the latent), ``close()``."""

    def __init__(self, model, method: str, budget: int, tiny: bool = False):
        import kvcomp

        self.model, self.method = model, method
        self.handle = None
        if method != "dense":
            self.handle = kvcomp.enable(model, kvcomp_config(model, budget=budget, dense=method == "dense_kv",
                                                             tiny=tiny))


def fill_synthetic(cache, method: str, ctx: int, seed: int = 0) -> None:
    """Rows 0..ctx-1 of every layer: a random normal latent (c_kv, k_pe) and, for kvcomp, its
    split codes; lengths = ctx."""
    from kvcomp_deepseek.cache import split_codes

    e2e.fill_synthetic(cache, method, ctx, seed)
    step = 8192
    for layer in cache.layers:
        codes = getattr(layer, "mla_codes", None)
        if method == "dense" or codes is None:
            continue
        w_lat, w_rope = layer.mla_weights
        for s in range(0, ctx, step):
            e = min(ctx, s + step)
            codes[:, :, s:e] = split_codes(layer.keys_buf[:, :, s:e], layer.values_buf[:, :, s:e], w_lat, w_rope)


def decode_graphs(model):
    """``kvcomp.graphs.DecodeGraphs`` whose captures free the allocator's cache after each
    warm-up step, so that the graph's private pool can take the memory the warm-up used:
    transformers' dense step expands the whole cached latent into per-head K/V (about 60 GB
    per step at 128K, B = 4), which must not be held twice. Replays are unchanged."""
    from kvcomp.graphs import DecodeGraphs

    class _Graphs(DecodeGraphs):
        def _capture(self, entry, cache, kind, call):
            fwd = self._forward

            def forward_then_free(**kw):
                out = fwd(**kw)
                if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                return out

            self._forward = forward_then_free
            try:
                super()._capture(entry, cache, kind, call)
            finally:
                self._forward = fwd

    return _Graphs(model, warmup=2)


# ---------------------------------------------------------------------------------- verify
def verify(model, args, graphs, dev: str, check_graphs: bool = True) -> dict:
    """The two checks of the module docstring (``e2e.verify_decoders``); raises
    VerificationError on a mismatch."""
    return e2e.verify_decoders(model, args, graphs, dev,
                               lambda method: Decoder(model, method, args.budget, args.tiny),
                               "kvcomp all-blocks (absorbed) differs from transformers' dense decode",
                               check_graphs)


# ---------------------------------------------------------------------------------- measure
def measure(model, graphs, method: str, ctx: int, B: int, args, dev: str) -> dict:
    """Per-step latency and throughput of ``method`` at context ``ctx`` and batch ``B``."""
    return e2e.measure_decoder(model, graphs, Decoder(model, method, args.budget, args.tiny), ctx, B, args, dev,
                               fill_synthetic, profile_methods=("kvcomp", "dense_kv"))


def measure_prefill(model, args, dev: str) -> dict:
    """Real prefill of ``--prefill-ctx`` tokens (B = 1) on the static caches of dense_kv and
    kvcomp (the same storage and prefill attention: the difference is the hashing), and the
    hashing share: the split codes of one layer's latent, once per hashed layer."""
    from kvcomp_deepseek.cache import split_codes

    ctx = args.prefill_ctx
    cuda = dev == "cuda"
    V = model.config.vocab_size
    ids = torch.randint(1, V, (1, ctx), generator=torch.Generator().manual_seed(7)).to(dev)
    out: dict = {"ctx": ctx}
    for method in ("dense_kv", "kvcomp"):
        dec = Decoder(model, method, args.budget, args.tiny)
        cache = None
        try:
            warm = dec.make_cache(min(ctx, 1024) + 8)
            e2e.forward(model, ids[:, :min(ctx, 1024)], warm, logits_to_keep=1)  # compiles the kernels
            del warm
            cache = dec.make_cache(ctx + 8)
            clock = e2e.Clock(cuda)
            clock.start()
            e2e.forward(model, ids, cache, logits_to_keep=1)
            out[f"{method}_ms"] = clock.stop_ms()
            if method == "kvcomp":
                layers = [layer for layer in cache.layers if layer.mla_codes is not None]
                lat = layers[0].keys_buf[:, :, :ctx]
                pe = layers[0].values_buf[:, :, :ctx]
                w_lat, w_rope = layers[0].mla_weights
                split_codes(lat, pe, w_lat, w_rope)
                clock.start()
                for _ in layers:
                    split_codes(lat, pe, w_lat, w_rope)
                out["hash_ms"] = clock.stop_ms()
                out["hash_layers"] = len(layers)
        finally:
            dec.close()
            cache = None
            e2e._free()
    out["hash_share"] = out["hash_ms"] / out["kvcomp_ms"]
    out["kvcomp_over_dense_kv"] = out["kvcomp_ms"] / out["dense_kv_ms"]
    return out


# ---------------------------------------------------------------------------------- run
def _table(data: dict) -> None:
    print("\n| ctx | B | kvcomp ms | dense ms | dense_kv ms | kvcomp tok/s | vs dense | vs dense_kv | peak GB kvcomp / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["ctx"], r["batch"], r["method"]): r for r in data["rows"] if "error" not in r}
    for sp in data["speedups"]:
        c, b = sp["ctx"], sp["batch"]

        def cell(m, key="step_ms", fmt="{:.2f}", c=c, b=b):
            r = by.get((c, b, m))
            return fmt.format(r[key]) if r and key in r else "-"

        def x(key, sp=sp):  # a baseline the run left out (--methods): "-", not "nanx"
            return f"{sp[key]:.2f}x" if key in sp and math.isfinite(sp[key]) else "-"

        print(f"| {c} | {b} | {cell('kvcomp')} | {cell('dense')} | {cell('dense_kv')} | "
              f"{cell('kvcomp', 'tokens_per_s', '{:.1f}')} | {x('vs_dense')} | {x('vs_dense_kv')} | "
              f"{cell('kvcomp', 'peak_gb', '{:.1f}')} / {cell('dense', 'peak_gb', '{:.1f}')} |")


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    try:
        import kvcomp_deepseek  # noqa: F401  (the MLA adapter and cache)
    except ImportError:
        print("the DeepSeek-V3-shaped e2e bench needs the kvcomp-deepseek package (pip install kvcomp-deepseek)")
        return 1
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("the DeepSeek-V3-shaped e2e bench needs a CUDA GPU (use --tiny for a CPU smoke run)")
        return 1
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    contexts = e2e._ints(args.contexts, [160, 400] if args.tiny else [32768, 65536, 131072])
    batches = e2e._ints(args.batches, [1, 2] if args.tiny else [1, 4])
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"--methods: unknown {bad}; choose from {METHODS}")
        return 2
    if args.tiny and args.verify_ctx == 4096:
        args.verify_ctx = 200
    if args.tiny and args.prefill_ctx == 32768:
        args.prefill_ctx = 256
    if args.tiny and args.budget == 2048:
        args.budget = 64
    rows_todo = [rc for rc in ORDER if rc[0] in contexts and rc[1] in batches]
    rows_todo += [(c, b) for b in batches for c in contexts if (c, b) not in rows_todo]
    args._profile_row = e2e.profile_row(rows_todo)

    data: dict = {
        "bench": "e2e_mla",
        "model": "tiny deepseek-v3" if args.tiny else "deepseek-v3-shape, 4 layers (random bf16 weights)",
        "env": e2e.env_info(cuda), "budget_tokens": args.budget, "steps": args.steps, "rows": [], "speedups": [],
    }
    model = build_model(args.tiny, dev, dtype)
    data["model_config"] = {k: getattr(model.config, k, None) for k in TINY}
    data["model_config"]["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    data["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    cfg = kvcomp_config(model, budget=args.budget, dense=False, tiny=args.tiny)
    data["kvcomp_config"] = {"dense_layers": cfg.dense_layer_indices, "chunk_size": cfg.chunk_size,
                             "hash_bits": cfg.hash_bits, "threshold": cfg.seq_len_threshold}
    graphs = decode_graphs(model)
    try:
        print(f"# model built in {time.time() - t_start:.1f}s ({data['params_b']:.2f}B parameters); verifying",
              flush=True)
        if not e2e.verify_first(verify, model, args, graphs, dev, data):
            return 1
        if args.prefill_ctx:
            try:
                data["prefill"] = p = measure_prefill(model, args, dev)
                print(f"# prefill {p['ctx']} tokens: dense_kv {p['dense_kv_ms']:.1f} ms, kvcomp {p['kvcomp_ms']:.1f} ms "
                      f"(x{p['kvcomp_over_dense_kv']:.3f}), hashing {p['hash_ms']:.2f} ms "
                      f"({p['hash_layers']} layers) = {100 * p['hash_share']:.2f}%", flush=True)
            except torch.cuda.OutOfMemoryError as e:
                e2e._free()
                data["prefill"] = {"ctx": args.prefill_ctx, "error": f"out of memory: {str(e)[:120]}"}
                print(f"# prefill: {data['prefill']['error']}", flush=True)
            e2e._write(args.json, data)
        e2e.measure_rows(measure, model, graphs, rows_todo, methods, args, dev, data, t_start, targets={})
    finally:
        graphs.remove()
    _table(data)
    print(f"# total {time.time() - t_start:.0f}s")
    e2e._write(args.json, data)
    if args.plot:
        try:
            e2e.plot(data, args.plot)
        except ImportError as e:
            print(f"# no plot: {e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcomp.bench.e2e_mla [options]`` (the options of ``add_arguments``)."""
    p = argparse.ArgumentParser(prog="python -m kvcomp.bench.e2e_mla", description=(__doc__ or "").splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
