"""Experiment (issue 6): decode-step projections, cuBLAS (F.linear) against ``kvcomp.ops.gemv``.

For Qwen3-8B's projection shapes (and the merged q|k|v and gate|up weights a fused decoder
would use) at M = 1 and 4 rows: every gemv configuration is verified against the fp32
reference first, then timed like ``kvcomp bench decode`` (CUDA events around a CUDA graph of
>= 8 back-to-back calls rotating over enough weight copies that none is found in L2).
Prints GB/s of weight bytes and the ratio to F.linear measured in the same run, the best
configuration per shape, and one layer's projections summed: cuBLAS on the separate weights
(what the model runs today) against gemv on the merged ones.

    python tools/experiments/gemv_sweep.py [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
from kvcomp.bench.timing import copy_bandwidth_gbs, cuda_time_us, progress
from kvcomp.ops.gemv import gemv, gemv_ref

H, INTER, NQ, NKV, VOCAB = 4096, 12288, 4096, 1024, 151936
SHAPES = {  # name: (N, K)
    "q": (NQ, H), "k": (NKV, H), "o": (H, NQ), "gate": (INTER, H), "down": (H, INTER),
    "qkv": (NQ + 2 * NKV, H), "gate_up": (2 * INTER, H), "lm_head": (VOCAB, H),
}
SEPARATE = {"q": 1, "k": 2, "o": 1, "gate": 2, "down": 1}
MERGED = {"qkv": 1, "o": 1, "gate_up": 1, "down": 1}
L2_BYTES = 50 << 20


def configs(quick: bool):
    dot = [dict(form="dot", block_n=bn, block_k=bk, num_warps=w, num_stages=s)
           for bn, bk, w, s in itertools.product((16, 32), (256, 512, 1024), (4, 8), (2, 3, 4))]
    fma = [dict(form="fma", block_n=bn, block_k=bk, num_warps=w, num_stages=s)
           for bn, bk, w, s in itertools.product((4, 8, 16), (512, 1024), (4, 8), (2, 3))]
    if quick:
        dot, fma = dot[::6], fma[::6]
    return dot + fma


def time_shape(name, M, cfgs, reps):
    N, K = SHAPES[name]
    nbytes = N * K * 2
    copies = max(1, math.ceil(3 * L2_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(N + K + M)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = gemv_ref(x, ws[0], None).float()
    base = cuda_time_us([lambda w=w: F.linear(x, w) for w in ws], reps=reps)
    rows = [dict(shape=name, M=M, impl="F.linear", us=base, gbs=nbytes / base / 1e3, vs=1.0)]
    for cfg in cfgs:
        if cfg["form"] == "fma" and M > 4:
            continue
        try:
            y = gemv(x, ws[0], config=cfg).float()
        except Exception as e:  # a configuration that does not compile (registers, smem)
            rows.append(dict(shape=name, M=M, impl="gemv", cfg=cfg, error=str(e)[:200]))
            continue
        err = (y - ref).abs().max().item()
        if not err <= 1e-2 * ref.abs().max().item():
            rows.append(dict(shape=name, M=M, impl="gemv", cfg=cfg, error=f"verify: max err {err}"))
            continue
        t = cuda_time_us([lambda w=w, c=cfg: gemv(x, w, config=c) for w in ws], reps=reps)
        rows.append(dict(shape=name, M=M, impl="gemv", cfg=cfg, us=t, gbs=nbytes / t / 1e3, vs=base / t))
    del ws
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    copy = copy_bandwidth_gbs()
    progress(f"copy bandwidth {copy:.0f} GB/s (read + write)")
    cfgs = configs(a.quick)
    rows = []
    for M in (1, 4):
        for name in ("qkv", "down", "gate_up"):  # the sweep on three shapes
            rows += time_shape(name, M, cfgs, a.reps)
            progress(f"swept {name} M={M}")
    ok = [r for r in rows if r["impl"] == "gemv" and "us" in r]
    key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    total = {}
    for r in ok:
        total.setdefault(key(r["cfg"]), []).append(r["us"])
    n = max(len(v) for v in total.values())
    best = sorted((sum(v), k) for k, v in total.items() if len(v) == n)[:4]
    top = [json.loads(k) for _, k in best]
    progress(f"top configs by summed time: {top}")
    for M in (1, 4):
        for name in SHAPES:
            rows += time_shape(name, M, top, a.reps)
    print(f"copy bandwidth {copy:.0f} GB/s\n")
    print("| shape | N x K | M | F.linear us (GB/s) | best gemv us (GB/s) | vs F.linear | best config |")
    print("|---|---|---|---|---|---|---|")
    final = rows[-len(SHAPES) * 2 * (len(top) + 1):]
    bests = {}
    for M in (1, 4):
        for name in SHAPES:
            rs = [r for r in final if r["shape"] == name and r["M"] == M and "us" in r]
            base = next(r for r in rs if r["impl"] == "F.linear")
            g = min((r for r in rs if r["impl"] == "gemv"), key=lambda r: r["us"])
            bests[(name, M)] = (base["us"], g["us"], g["cfg"])
            N, K = SHAPES[name]
            print(f"| {name} | {N} x {K} | {M} | {base['us']:.1f} ({base['gbs']:.0f}) | {g['us']:.1f} "
                  f"({g['gbs']:.0f}) | {base['us'] / g['us']:.2f}x | {g['cfg']} |")
    for M in (1, 4):
        sep = sum(bests[(s, M)][0] * c for s, c in SEPARATE.items())
        mer_cub = sum(bests[(s, M)][0] * c for s, c in MERGED.items())
        mer = sum(bests[(s, M)][1] * c for s, c in MERGED.items())
        print(f"\none layer, M={M}: cuBLAS separate {sep:.1f} us, cuBLAS merged {mer_cub:.1f} us, "
              f"gemv merged {mer:.1f} us ({sep / mer:.2f}x); x36 layers: {36 * sep / 1e3:.2f} -> "
              f"{36 * mer / 1e3:.2f} ms")
    for c in top:
        tot = {M: sum(r["us"] for r in final if r["M"] == M and r.get("cfg") == c and r["shape"] in MERGED)
               for M in (1, 4)}
        print(f"config {c}: merged layer M=1 {tot[1]:.1f} us, M=4 {tot[4]:.1f} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbs=copy, rows=rows, top=top), f, indent=1)


if __name__ == "__main__":
    main()
