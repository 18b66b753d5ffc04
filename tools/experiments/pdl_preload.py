"""Experiment (issue 6): does a PDL-launched gemv stream its weight while a latency-bound kernel
before it runs? ``gemv(preload=True)`` loads each program's weight tile before its
grid-dependency wait; this times, in CUDA graphs (``kvcomp.bench.timing.cuda_time_us``, inputs
rotated so that nothing is found in L2):

    attn            sparse_decode_attention at B = 1 (Qwen3-8B: 8 kv-heads, G = 4, 2048 of
                    131072 tokens selected), the kernel before o_proj in a sparse layer
    gemv / gemv_pl  o_proj alone (4096 x 4096 bf16, residual epilogue), streaming / preload
    attn+gemv       the two back to back, as in the decoder layer, for both gemv kernels

If the preload worked as meant, attn+gemv_pl would approach max(attn, gemv) plus a little; the
streaming pair pays attn + gemv minus PDL's launch overlap. Prints us per call; verifies the
outputs of both gemv kernels against each other first (fp32 summation order only).

    python tools/experiments/pdl_preload.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
from kvcomp.bench.timing import cuda_time_us
from kvcomp.ops import gemv, sparse_decode_attention

HKV, G, D, L, CHUNK, BLOCKS = 8, 4, 128, 131072, 128, 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--sets", type=int, default=4, help="rotated input sets")
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    sets = []
    for _ in range(a.sets):
        k = torch.randn(1, HKV, L, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, HKV, L, D, device=dev, dtype=dt, generator=g)
        q = torch.randn(1, HKV * G, D, device=dev, dtype=dt, generator=g)
        idx = torch.stack([torch.randperm(L // CHUNK, device=dev, generator=g)[:BLOCKS] for _ in range(HKV)])
        idx = idx.sort(-1).values.to(torch.int32).view(1, HKV, BLOCKS)
        w = torch.randn(4096, 4096, device=dev, dtype=dt, generator=g) * 0.02
        r = torch.randn(1, 4096, device=dev, dtype=dt, generator=g)
        sets.append((q, k, v, idx, w, r))
    lens = torch.full((1,), L, device=dev, dtype=torch.int32)
    x0 = torch.randn(1, 4096, device=dev, dtype=dt, generator=g)
    a0 = gemv(x0, sets[0][4], residual=sets[0][5])
    b0 = gemv(x0, sets[0][4], residual=sets[0][5], preload=True)
    err = float((a0.float() - b0.float()).abs().max() / a0.float().abs().max())
    assert err < 2e-2, err

    def attn(s):
        return sparse_decode_attention(s[0], s[1], s[2], s[3], lens, chunk_size=CHUNK)

    def pair(s, preload):
        o = attn(s)
        return gemv(o.view(1, HKV * G * D), s[4], residual=s[5], preload=preload)

    res = {
        "attn": cuda_time_us([lambda s=s: attn(s) for s in sets]),
        "gemv": cuda_time_us([lambda s=s: gemv(x0, s[4], residual=s[5]) for s in sets]),
        "gemv_pl": cuda_time_us([lambda s=s: gemv(x0, s[4], residual=s[5], preload=True) for s in sets]),
        "attn+gemv": cuda_time_us([lambda s=s: pair(s, False) for s in sets]),
        "attn+gemv_pl": cuda_time_us([lambda s=s: pair(s, True) for s in sets]),
        "gemv_rel_err": err,
    }
    for k_, v_ in res.items():
        print(f"{k_:>14} {v_:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
