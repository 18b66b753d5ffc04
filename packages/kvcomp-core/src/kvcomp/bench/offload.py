"""KV offload decode speed: sparse layers' K/V in pinned host memory, against in-HBM kvcomp and dense.

``kvcomp bench offload``: codes and a block cache in HBM, only missing blocks cross PCIe;
equality with the in-HBM mode verified first.

Model: Qwen3-8B's real shape (hidden 4096, 32 q / 8 kv heads, head_dim 128, intermediate
12288, vocab 151936) with random bf16 weights, ``--layers`` decoder layers (default 8: a
reduced-depth model of the real layer shape; ``--layers 36`` is the full depth). kvcomp
config: the first two layers dense, the others select ``--budget`` tokens (2048: 16 blocks of
128, must-select first + last two) from 128-bit codes, threshold 2048.

Per context L and batch B, one process, one model:
  1. two caches are filled with the same random K/V for every layer (rows 0 .. L-65: a
     prefill's ``cache.update``; decode cost does not depend on the values), one in HBM
     (``new_cache(offload=None)``) and one offloaded (``OffloadConfig(cache_blocks=...,
     reserve_tokens=L)``: pinned host buffers of exactly L tokens, no growth while decoding);
     the HBM each one holds is read from ``torch.cuda.memory_allocated`` around its filling;
  2. verification: ``--verify-steps`` greedy decode steps in lockstep on both caches: the
     logits must be bit-identical and every selecting layer's block_idx equal, else the bench
     prints no speed and exits 1;
  3. timing: greedy decode steps (eager, as ``model.generate`` runs them), warm-up first, then
     ``--steps`` steps between two device synchronisations: offload, in-HBM kvcomp, and dense
     (the same in-HBM cache with kvcomp disabled: transformers' sdpa over the whole cache);
     tokens/s = B / step time. The offload counters over the timed steps give the hit rate and
     the host->device bytes per step.
SDPA runs without its cuDNN backend here (flash / efficient / math only; recorded in the JSON):
on the H200 with torch 2.11, cuDNN's SDPA builds a new graph for every new KV length, ~20 ms of
host time per dense-layer call, and caches it, so whichever mode decodes a length first would
pay it and the next one not (the first run of this bench timed the offload mode first and
measured that, not the offload tier).
Measured once in the same run: PCIe bandwidth (pinned -> device and device -> pinned copies
through the copy engines, 1 GiB) and the bandwidth of ``fetch_pages`` itself (every page a
miss, read in place from pinned memory by the Triton kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcomp.bench.timing import positive_ints, progress

QWEN3_8B = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=12288, vocab_size=151936, rope_theta=1e6, max_position_embeddings=262144,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, vocab_size=512, rope_theta=1e6, max_position_embeddings=16384,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TAIL = 64  # decode steps of room: contexts are filled to L - TAIL tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (36: full Qwen3-8B depth)")
    p.add_argument("--lengths", type=positive_ints, default=[131072, 262144], help="contexts L (tokens)")
    p.add_argument("--batches", type=positive_ints, default=[1, 2], help="batch sizes")
    p.add_argument("--budget", type=int, default=2048, help="tokens selected per sparse layer")
    p.add_argument("--cache-blocks", type=int, default=32,
                   help="HBM block-cache slots per (sequence, kv-head) and layer")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps per mode first")
    p.add_argument("--verify-steps", type=int, default=3, help="lockstep steps compared bit for bit")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny model shape (CPU smoke runs)")


# ----------------------------------------------------------------------------- helpers
def build_model(shape: dict, layers: int, dev: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", num_hidden_layers=layers, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def kvcomp_config(layers: int, head_dim: int, budget: int):
    from kvcomp.config import KVCompConfig

    return KVCompConfig.default("qwen3-8b-shaped", layers, head_dim, dense_layers=min(2, layers),
                                threshold=2048, top_k_budget_tokens=budget)


def _sdpa_backends(dev):
    """SDPA backends for the timed runs: every one but cuDNN on CUDA (module doc), None on CPU."""
    if dev.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_restricted(backends):
    import contextlib

    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _allocated(dev) -> int:
    _sync(dev)
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def _kv(i: int, B: int, L: int, H: int, D: int, dev, dtype):
    g = torch.Generator(device=dev).manual_seed(7919 * i + 31 * B + L)
    k = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=g)
    return k, v


def fill(cache, n_layers: int, B: int, L: int, H: int, D: int, dev, dtype) -> int:
    """Give every layer the same L rows of random K/V (and codes); returns the HBM it took."""
    before = _allocated(dev)
    for i in range(n_layers):
        k, v = _kv(i, B, L, H, D, dev, dtype)
        cache.layers[i].update(k, v)
        del k, v
    return _allocated(dev) - before


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(model, cache, tok, kw):
    with torch.no_grad():
        return model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1]


def _selections(cache) -> dict:
    return {i: layer.step_block_idx for i, layer in enumerate(cache.layers)
            if layer.step_block_idx is not None and layer.step_block_idx_update == layer.updates}


def _timed(model, cache, tok, kw, warmup: int, steps: int, dev) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        tok = _step(model, cache, tok, kw).argmax(-1, keepdim=True)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = _step(model, cache, tok, kw).argmax(-1, keepdim=True)
    _sync(dev)
    return (time.perf_counter() - t0) / steps, tok


def _free_host_cache() -> None:
    for name in ("_host_emptyCache", "_cuda_hostEmptyCache", "_accelerator_emptyHostCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            try:
                fn()
            except RuntimeError:
                continue
            return


def pcie_bandwidth(dev, nbytes: int = 1 << 30) -> dict:
    """Copy-engine bandwidth pinned <-> device and the fetch kernel's in-place read bandwidth
    (GB/s, 1e9 B/s, bytes moved one way)."""
    from kvcomp.offload import fetch_pages
    from kvcomp.offload.host import device_view

    def med(fn, reps=5):
        fn()
        _sync(dev)
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e-3)
        return statistics.median(ts)

    R, K, chunk, D = 64, 64, 128, 128
    part = R * K * chunk * D * 2  # bytes of one [R, K * chunk, D] bf16 tensor
    host = torch.empty(max(nbytes, 2 * part), dtype=torch.uint8, pin_memory=True)
    host[: 2 * part].random_(0, 256)  # the pages the fetch kernel reads (compared bitwise)
    devbuf = torch.empty(host.numel(), dtype=torch.uint8, device=dev)
    h2d = host.numel() / med(lambda: devbuf.copy_(host, non_blocking=True)) / 1e9
    d2h = host.numel() / med(lambda: host.copy_(devbuf, non_blocking=True)) / 1e9
    host[: 2 * part].random_(0, 256)
    hk = host[:part].view(torch.bfloat16).view(R, K * chunk, D)
    hv = host[part : 2 * part].view(torch.bfloat16).view(R, K * chunk, D)
    pool_k = torch.empty(R * K + 1, 1, chunk, D, dtype=torch.bfloat16, device=dev)
    pool_v = torch.empty_like(pool_k)
    sel = torch.arange(K, dtype=torch.int32, device=dev).repeat(R, 1)
    slots = torch.arange(R * K, dtype=torch.int32, device=dev).view(R, K)
    miss = torch.ones(R, K, dtype=torch.bool, device=dev)
    dk, dv = device_view(hk, dev), device_view(hv, dev)
    t = med(lambda: fetch_pages(dk, dv, pool_k, pool_v, sel, slots, miss, chunk, backend="triton"))
    bits = torch.int16
    ok = torch.equal(pool_k[: R * K, 0].cpu().view(bits).view(R, K * chunk, D), hk.view(bits)) and \
        torch.equal(pool_v[: R * K, 0].cpu().view(bits).view(R, K * chunk, D), hv.view(bits))
    fetched = 2 * R * K * chunk * D * 2
    return {"h2d_gbs": h2d, "d2h_gbs": d2h, "fetch_kernel_gbs": fetched / t / 1e9,
            "fetch_kernel_verified": bool(ok), "copy_bytes": host.numel(), "fetch_bytes": fetched}


# ----------------------------------------------------------------------------- one (L, B)
def run_config(model, cfg, L: int, B: int, args, dev, dtype, kw) -> dict:
    import kvcomp
    from kvcomp.offload import OffloadConfig, OffloadLayer, offload_totals

    tc = model.config
    H, D, n = tc.num_key_value_heads, tc.head_dim, tc.num_hidden_layers
    L0 = L - TAIL
    row: dict = {"L": L, "B": B, "filled": L0, "layers": n, "budget": args.budget,
                 "cache_blocks": args.cache_blocks}
    handle = kvcomp.enable(model, cfg)
    hbm = handle.new_cache(offload=None)
    off = handle.new_cache(offload=OffloadConfig(cache_blocks=args.cache_blocks, reserve_tokens=L))
    progress(f"L={L} B={B}: filling the in-HBM cache")
    row["hbm_bytes_inhbm"] = fill(hbm, n, B, L0, H, D, dev, dtype)
    progress("  filling the offloaded cache (pinned host writes)")
    t0 = time.perf_counter()
    row["hbm_bytes_offload"] = fill(off, n, B, L0, H, D, dev, dtype)
    row["offload_fill_s"] = time.perf_counter() - t0
    sparse = list(off.offload_layers)
    per_layer_dense = 2 * B * H * L0 * D * torch.finfo(dtype).bits // 8
    row["dense_kv_bytes"] = n * per_layer_dense
    off_layer = off.layers[sparse[0]]
    assert isinstance(off_layer, OffloadLayer)
    row["offload_layer_hbm_bytes"] = off_layer.hbm_bytes()
    row["offload_layer_ratio"] = off_layer.hbm_bytes() / per_layer_dense
    row["host_bytes"] = sum(layer.host_k.numel() * layer.host_k.element_size() * 2
                            for layer in off.layers if isinstance(layer, OffloadLayer))
    row["pinned"] = bool(off_layer.host_k.is_pinned())

    # ---------------------------------------------------------------- verify first
    progress("  verifying: lockstep greedy steps, logits and selections")
    g = torch.Generator(device="cpu").manual_seed(L + B)
    tok = torch.randint(1, tc.vocab_size, (B, 1), generator=g).to(dev)
    same_logits, same_sel, diff = True, True, 0.0
    for _ in range(args.verify_steps):
        a = _step(model, hbm, tok, kw)
        b = _step(model, off, tok, kw)
        sa, sb = _selections(hbm), _selections(off)
        same_logits &= bool(torch.equal(a, b))
        diff = max(diff, (a.float() - b.float()).abs().max().item())
        same_sel &= sa.keys() == sb.keys() and len(sa) > 0
        same_sel &= all(torch.equal(sa[i], sb[i]) for i in sa if i in sb)
        tok = a.argmax(-1, keepdim=True)
    row["same_logits"], row["same_selections"], row["logits_max_diff"] = same_logits, same_sel, diff
    row["verified"] = same_logits and same_sel
    if not same_sel:  # a different selection is a bug: nothing below would mean anything
        handle.disable()
        return row
    # (logits that differ while every selection is equal are reported, timed, and fail the run)

    # ---------------------------------------------------------------- time
    progress("  timing offload")
    before = offload_totals(off.layer_stats)
    row["offload_step_s"], _ = _timed(model, off, tok, kw, args.warmup, args.steps, dev)
    after = offload_totals(off.layer_stats)  # over the warm-up and the timed steps
    hits = after["block_hits"] - before["block_hits"]
    misses = after["block_misses"] - before["block_misses"]
    steps_counted = args.warmup + args.steps
    row["hit_rate"] = hits / (hits + misses) if hits + misses else None
    row["h2d_bytes_per_step"] = (after["h2d_bytes"] - before["h2d_bytes"]) / steps_counted
    row["h2d_bytes_per_step_layer"] = row["h2d_bytes_per_step"] / len(sparse)
    progress("  timing in-HBM kvcomp")
    row["inhbm_step_s"], _ = _timed(model, hbm, tok, kw, args.warmup, args.steps, dev)
    del off
    _free_host_cache()
    handle.disable()
    progress("  timing dense (kvcomp disabled, sdpa over the same cache)")
    row["dense_step_s"], _ = _timed(model, hbm, tok, kw, args.warmup, args.steps, dev)
    del hbm
    for m in ("offload", "inhbm", "dense"):
        row[f"{m}_tok_s"] = B / row[f"{m}_step_s"]
    row["offload_vs_inhbm"] = row["offload_tok_s"] / row["inhbm_tok_s"]
    row["sparse_layers"] = len(sparse)
    row["overhead_ms_per_sparse_layer"] = 1e3 * (row["offload_step_s"] - row["inhbm_step_s"]) / len(sparse)
    row["offload_vs_dense"] = row["offload_tok_s"] / row["dense_tok_s"]
    return row


def _fmt_row(r: dict, pcie: dict | None) -> str:
    if "offload_tok_s" not in r:
        return f"| {r['L'] // 1024}K | {r['B']} | VERIFICATION FAILED: selections differ | | | | | | | | | | | |"
    xfer_ms = (r["h2d_bytes_per_step"] / (pcie["h2d_gbs"] * 1e9) * 1e3) if pcie else float("nan")
    return (f"| {r['L'] // 1024}K | {r['B']} | {r['dense_kv_bytes'] / 2**30:.2f} | "
            f"{r['hbm_bytes_inhbm'] / 2**30:.2f} | {r['hbm_bytes_offload'] / 2**30:.2f} | "
            f"{100 * r['offload_layer_ratio']:.1f}% | {r['dense_tok_s']:.1f} | {r['inhbm_tok_s']:.1f} | "
            f"{r['offload_tok_s']:.1f} | {100 * r['offload_vs_inhbm']:.0f}% | "
            f"{100 * (r['hit_rate'] or 0):.1f}% | {r['h2d_bytes_per_step'] / 2**20:.1f} | {xfer_ms:.2f} | "
            f"{r['overhead_ms_per_sparse_layer']:.3f} |"
            + ("" if r["verified"] else f" LOGITS DIFFER by {r['logits_max_diff']:.3g}"))


HEADER = ("| L | B | dense KV GiB | HBM in-HBM GiB | HBM offload GiB | offload layer / dense layer | "
          "dense tok/s | in-HBM tok/s | offload tok/s | offload / in-HBM | hit rate | "
          "H2D MiB/step | H2D ms/step at copy-engine BW | offload - in-HBM ms per sparse layer |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def run(args) -> int:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("kvcomp bench offload: no CUDA GPU is visible (use --device cpu --tiny for a smoke run)")
        return 2
    for name in ("layers", "budget", "cache_blocks", "steps", "verify_steps"):
        if getattr(args, name) < 1:
            print(f"kvcomp bench offload: --{name.replace('_', '-')} must be >= 1")
            return 2
    if min(args.lengths) <= TAIL + 2048:
        print(f"kvcomp bench offload: --lengths must exceed {TAIL + 2048} (the threshold plus room to decode)")
        return 2
    shape = TINY if args.tiny else QWEN3_8B
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    result = {"bench": "offload", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": "tiny" if args.tiny else "qwen3-8b",
              "layers": args.layers, "args": {k: v for k, v in vars(args).items() if not callable(v)
                                              and not k.startswith("_")}, "rows": []}
    try:
        import subprocess

        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, timeout=5).stdout.strip()
    except Exception:
        result["commit"] = "unknown"

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)

    pcie = None
    if dev.type == "cuda":
        progress("measuring PCIe bandwidth")
        pcie = pcie_bandwidth(dev)
        result["pcie"] = pcie
        print(f"PCIe: pinned->device {pcie['h2d_gbs']:.1f} GB/s, device->pinned {pcie['d2h_gbs']:.1f} GB/s, "
              f"fetch_pages kernel {pcie['fetch_kernel_gbs']:.1f} GB/s "
              f"(verified: {pcie['fetch_kernel_verified']})", flush=True)
        save()
    progress(f"building the model ({args.layers} layers)")
    model = build_model(shape, args.layers, dev, dtype)
    cfg = kvcomp_config(args.layers, shape["head_dim"], args.budget)
    kw = _cache_kw(model)
    print(HEADER, flush=True)
    failed = False
    backends = _sdpa_backends(dev)
    result["sdpa_backends"] = [b.name for b in backends] if backends else "default"
    for L in args.lengths:
        for B in args.batches:
            with _sdpa_restricted(backends):
                r = run_config(model, cfg, L, B, args, dev, dtype, kw)
            result["rows"].append(r)
            save()
            print(_fmt_row(r, pcie), flush=True)
            failed |= not r.get("verified")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            _free_host_cache()
    print()
    print(HEADER)
    for r in result["rows"]:
        print(_fmt_row(r, pcie))
    if failed:
        print("VERIFICATION FAILED: offload differs from the in-HBM mode; no speed reported as valid")
        return 1
    return 0

