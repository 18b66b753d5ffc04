#!/usr/bin/env bash
# One GPU call for the MLA kernels: GPU tests, then `kvcomp bench mla` (about 3-4 minutes on an
# H200 including compilation); with --sweep first a tile/split sweep of the latent decode kernel
# (about 2 more minutes). Logs and JSON go to $OUT (default /tmp/kvcomp_gpu_mla).
# Usage (repo root, on the GPU machine): bash tools/gpu_mla.sh [--sweep]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/packages/kvcomp-core/src:$PWD/packages/kvcomp-deepseek/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/kvcomp_gpu_mla}"
export OUT
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee "$OUT/commit.txt"

python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_mla_decode_kernels.py 2>&1 \
    | tee "$OUT/tests.log"

if [ "${1:-}" = "--sweep" ]; then
python3 - <<'PY' 2>&1 | tee "$OUT/sweep.log"
import json, os, torch
from triton.testing import do_bench
from kvcomp.bench.mla import _graph_time
from kvcomp.bench.timing import copy_bandwidth_gbs
from kvcomp.ops.sparse_mla_decode.kernels import mla_decode_launch
dev, dt, H, R, P = "cuda", torch.bfloat16, 128, 512, 64
copy = copy_bandwidth_gbs()
timer = lambda fn: 1e3 * do_bench(fn, warmup=20, rep=60, return_mode="median")
variants = [dict()] + [dict(block_h=h, block_t=t, num_warps=w, num_stages=s)
    for h, t, w, s in [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 3)]]
rows = []
for B, L, sparse in [(1, 131072, False), (8, 131072, False), (32, 131072, True), (1, 131072, True)]:
    g = torch.Generator(device=dev).manual_seed(B + L)
    ckv = torch.randn(B, L, R, device=dev, dtype=dt, generator=g)
    kpe = torch.randn(B, L, P, device=dev, dtype=dt, generator=g)
    ql = torch.randn(B, H, R, device=dev, dtype=dt, generator=g) * 0.06
    qp = torch.randn(B, H, P, device=dev, dtype=dt, generator=g) * 0.06
    sl = torch.full((B,), L, device=dev, dtype=torch.int32)
    bi = torch.stack([torch.randperm(L // 128, device=dev)[:16] for _ in range(B)]).to(torch.int32).view(B, 1, 16) if sparse else None
    toks = B * (2048 if sparse else L)
    ref = None
    for v in variants:
        fn = lambda: mla_decode_launch(ql, qp, ckv, kpe, bi, sl, 128, 0.072, **v)
        try:
            out = fn()
            ref = out.float() if ref is None else ref
            err = (out.float() - ref).abs().max().item()
            us, gus = timer(fn), _graph_time(fn, timer)
            rows.append(dict(B=B, L=L, sparse=sparse, cfg=v, us=us, graph_us=gus, err=err))
            print(f"B={B:<3} L={L:<7} sparse={int(sparse)} {str(v):70s} {us:8.1f} us graph {gus:8.1f} us "
                  f"{100 * toks * (R + P) * 2 / gus / 1e3 / copy:5.1f}% copy "
                  f"{2 * H * toks * (2 * R + P) / gus / 1e6:5.0f} TF/s diff {err:.1e}")
        except Exception as e:
            print(f"B={B} L={L} {v} FAILED {type(e).__name__}: {str(e)[:200]}")
    del ckv, kpe
    torch.cuda.empty_cache()
json.dump(dict(copy_GBps=copy, rows=rows), open(os.environ["OUT"] + "/sweep.json", "w"), indent=1)
PY
fi

python3 -m kvcomp.bench.mla --rep-ms 100 --json "$OUT/bench_mla.json" 2>&1 | tee "$OUT/bench.log"
