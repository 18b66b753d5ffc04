#!/usr/bin/env bash
# One GPU call for the MLA kernels: GPU tests, then `kvcomp bench mla` (about 3-4 minutes on an
# H200 including compilation); with --sweep first a tile/split sweep of the latent decode kernel
# (about 5 more minutes, mostly compilation). Logs and JSON go to $OUT (default /tmp/kvcomp_gpu_mla).
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
from kvcomp.ops.mla_decode import mla_decode_ref
from kvcomp.ops.sparse_mla_decode.kernels import mla_decode_launch
dev, dt, H, R, P = "cuda", torch.bfloat16, 128, 512, 64
n = 1 << 30
src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255); dst = torch.empty_like(src)
copy = 2 * n / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6  # GB/s
del src, dst
variants = [dict()] + [dict(block_h=h, block_t=t, num_warps=w, num_stages=s)
    for h, t, w, s in [(16, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2),
                       (64, 16, 8, 2), (64, 32, 8, 2), (32, 32, 8, 3), (16, 64, 4, 3)]]
rows = []
for B, L, sparse in [(1, 131072, False), (1, 32768, False), (8, 131072, False), (32, 32768, False),
                     (32, 131072, True), (1, 131072, True)]:
    g = torch.Generator(device=dev).manual_seed(B + L)
    ckv = torch.randn(B, L, R, device=dev, dtype=dt, generator=g)
    kpe = torch.randn(B, L, P, device=dev, dtype=dt, generator=g)
    ql = torch.randn(B, H, R, device=dev, dtype=dt, generator=g) * 0.06
    qp = torch.randn(B, H, P, device=dev, dtype=dt, generator=g) * 0.06
    sl = torch.full((B,), L, device=dev, dtype=torch.int32)
    nb = L // 128
    bi = torch.stack([torch.randperm(nb, device=dev)[:16] for _ in range(B)]).to(torch.int32).view(B, 1, 16) if sparse else None
    byts = (B * 16 * 128 if sparse else B * L) * (R + P) * 2
    ref = None
    splits_opts = [None] + ([16, 32, 64, 132] if B == 1 and not sparse else [])
    for v in variants:
        for ns in splits_opts if not v else [None]:
            kw = dict(v, num_splits=ns)
            fn = lambda: mla_decode_launch(ql, qp, ckv, kpe, bi, sl, 128, 0.072, **kw)
            try:
                out = fn()
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                us = 1e3 * do_bench(fn, return_mode="median")
                rows.append(dict(B=B, L=L, sparse=sparse, cfg=kw, us=us, err=err,
                                 frac=byts / us / 1e3 / copy))
                print(f"B={B:<3} L={L:<7} sparse={int(sparse)} {str(kw):90s} {us:8.1f} us "
                      f"{100 * byts / us / 1e3 / copy:5.1f}% copy  diff {err:.2e}")
            except Exception as e:
                print(f"B={B} L={L} {kw} FAILED {type(e).__name__}: {str(e)[:200]}")
    del ckv, kpe
    torch.cuda.empty_cache()
json.dump(dict(copy_GBps=copy, rows=rows), open(os.environ["OUT"] + "/sweep.json", "w"), indent=1)
PY
fi

python3 -m kvcomp.bench.mla --rep-ms 100 --json "$OUT/bench_mla.json" 2>&1 | tee "$OUT/bench.log"
