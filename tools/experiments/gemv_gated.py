"""Experiment (issue 6): the merged gate|up projection of a decode step at 2-8 rows.

Qwen3-8B's gate|up weight [2 x 12288, 4096] bf16 (201 MB) at M rows: ``gemv`` then
``silu_mul`` (two launches, what ``FusedDecode`` runs at B > 1) against ``gemv(gated=True)``
(one launch, ``silu(gate) * up`` in the epilogue) in its stacked tensor-core form
(``GATED_STACKED``: gate and up rows in one tile and one dot) at several launch
configurations, and the older two-tile form. Every variant is verified against
``gemv_ref(gated=True)`` first, then timed like ``gemv_sweep.py`` (CUDA graph of back-to-back
calls rotating over weight copies that do not fit in L2). Not part of the test suite.

    python tools/experiments/gemv_gated.py [--rows 2,4,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math

import torch
from kvcomp.bench.timing import copy_bandwidth_gbs, cuda_time_us, progress
from kvcomp.ops import silu_mul
from kvcomp.ops.gemv import GEMV_CONFIG, gemv, gemv_ref

gv = importlib.import_module("kvcomp.ops.gemv")
H, INTER = 4096, 12288
L2_BYTES = 50 << 20
CONFIGS = {  # name: (GATED_STACKED, config overrides); block_n = gate + up rows a program
    "stacked": (True, {}),
    "stacked_s3": (True, dict(num_stages=3)),
    "stacked_s2": (True, dict(num_stages=2)),
    "stacked_w8": (True, dict(num_warps=8)),
    "stacked_n64_s3": (True, dict(block_n=64, num_stages=3)),
    "stacked_k128": (True, dict(block_k=128)),
    "two_tiles": (False, {}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="2,4,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    copy = copy_bandwidth_gbs()
    progress(f"copy bandwidth {copy:.0f} GB/s (read + write)")
    nbytes = 2 * INTER * H * 2
    copies = max(1, math.ceil(3 * L2_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(2 * INTER, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
    rows = []
    for M in (int(m) for m in a.rows.split(",")):
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = gemv_ref(x, ws[0], gated=True).float()

        def two_launches(w, x=x):
            y = gemv(x, w)
            return silu_mul(y[..., :INTER], y[..., INTER:])

        got = two_launches(ws[0]).float()
        base = cuda_time_us([lambda w=w: two_launches(w) for w in ws], reps=a.reps)
        rows.append(dict(M=M, impl="gemv + silu_mul", us=base, gbs=nbytes / base / 1e3, vs=1.0,
                         err=(got - ref).abs().max().item()))
        for name, (stacked, over) in CONFIGS.items():
            gv.GATED_STACKED = stacked
            cfg = dict(GEMV_CONFIG, **over)
            try:
                y = gemv(x, ws[0], gated=True, config=cfg).float()
                err = (y - ref).abs().max().item()
                if not err <= 1e-2 * ref.abs().max().item():
                    raise AssertionError(f"verify: max err {err}")
                t = cuda_time_us([lambda w=w, c=cfg, x=x: gemv(x, w, gated=True, config=c) for w in ws], reps=a.reps)
                rows.append(dict(M=M, impl=name, cfg=cfg, us=t, gbs=nbytes / t / 1e3, vs=base / t, err=err))
            except Exception as e:  # a configuration that does not compile, or a wrong result
                rows.append(dict(M=M, impl=name, cfg=cfg, error=str(e)[:300]))
            finally:
                gv.GATED_STACKED = True
        for r in rows[-len(CONFIGS) - 1:]:
            if "us" in r:
                print(f"M={M} {r['impl']:>16}: {r['us']:7.1f} us  {r['gbs']:6.0f} GB/s  {r['vs']:.2f}x", flush=True)
            else:
                print(f"M={M} {r['impl']:>16}: {r['error']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbs=copy, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
