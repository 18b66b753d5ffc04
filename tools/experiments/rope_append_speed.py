"""Experiment (issue 6): ``kvcomp.ops.rope_append`` alone, per mode, against the launches it
replaced (``head_rms_norm_`` + ``rope`` + ``append_kv`` (+ ``hash_encode`` of the queries)).

Qwen3-8B's attention at B = 1 and 4 (32 q / 8 kv heads, D 128, 128-bit codes, bf16): modes
"none" (no codes: a dense layer), "keys" (the key's code: a hashed layer below the threshold),
"all" (key and query codes: a selecting layer). Every variant is checked against the
reference first, then timed like ``kvcomp bench decode`` (CUDA graph of back-to-back calls,
``cuda_time_us``). ``--warps`` times other warp counts of the coded modes.

    python tools/experiments/rope_append_speed.py [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
from kvcomp.bench.timing import cuda_time_us
from kvcomp.ops.append_kv import append_kv
from kvcomp.ops.hash_encode import hash_encode
from kvcomp.ops.norm_act import head_rms_norm_, rope
from kvcomp.ops.rope_append import rope_append, rope_append_ref

HQ, HKV, D, BITS, L = 32, 8, 128, 128, 4096
ra_mod = importlib.import_module("kvcomp.ops.rope_append")  # the module (kvcomp.ops exports the function)


def case(B: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    y = torch.randn(B, 1, (HQ + 2 * HKV) * D, device=dev, dtype=dt, generator=g)
    ang = torch.rand(B, 1, D // 2, device=dev, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt)
    kb = torch.zeros(B, HKV, L, D, device=dev, dtype=dt)
    vb = torch.zeros_like(kb)
    codes = torch.zeros(B, HKV, L, BITS // 32, device=dev, dtype=torch.int32)
    w = torch.randn(HKV, D, BITS, device=dev, generator=g)
    qn = torch.rand(D, device=dev, generator=g).to(dt) + 0.5
    kn = torch.rand(D, device=dev, generator=g).to(dt) + 0.5
    pos = torch.full((B,), L - 7, device=dev, dtype=torch.int32)
    return y, cos, sin, kb, vb, codes, w, qn, kn, pos


def views(y, B):
    q = y[..., : HQ * D].view(B, 1, HQ, D).transpose(1, 2)
    k = y[..., HQ * D: (HQ + HKV) * D].view(B, 1, HKV, D).transpose(1, 2)
    v = y[..., (HQ + HKV) * D:].view(B, 1, HKV, D).transpose(1, 2)
    return q, k, v


def time_batch(B: int, warps: list[int], out: list) -> None:
    y, cos, sin, kb, vb, codes, w, qn, kn, pos = case(B)
    q, k, v = views(y, B)
    modes = {"none": {}, "keys": dict(codes=codes, k_weight=w), "all": dict(codes=codes, k_weight=w, q_weight=w)}

    def call(kw):
        return rope_append(q, k, v, cos, sin, kb, vb, pos, q_norm=qn, k_norm=kn, early=True, **kw)

    for mode, kw in modes.items():
        # verified first: rows and codes against the reference (codes may differ near 0 only)
        got = call(kw)
        kb2, vb2 = kb.clone(), vb.clone()
        kw2 = {**kw, "codes": codes.clone()} if "codes" in kw else kw
        ref = rope_append_ref(q, k, v, cos, sin, kb2, vb2, pos, q_norm=qn, k_norm=kn, **kw2)
        assert (got[0].float() - ref[0].float()).abs().max() <= 0.02 * ref[0].float().abs().max()
        assert torch.equal(vb, vb2)
        if "q_weight" in kw:
            assert (got[1] != ref[1]).float().mean() < 0.01
        orig = ra_mod._launch_options
        for nw in (warps if mode != "none" else [1]):
            ra_mod._launch_options = lambda D, nw=nw, orig=orig: {**orig(D), "num_warps": nw}
            try:
                us = cuda_time_us(lambda kw=kw: call(kw), reps=50)
            finally:
                ra_mod._launch_options = orig
            out.append(dict(B=B, mode=mode, warps=nw, us=us))
            print(f"B={B} {mode:>5} warps={nw}: {us:.2f} us", flush=True)
    yy = y.clone()
    y2 = yy.view(B, -1)
    q_, k_, v_ = views(yy, B)
    for mode in modes:
        def run(mode=mode):
            head_rms_norm_(y2, qn, kn, HQ, HKV, 1e-6)
            qr, kr = rope(q_, k_, cos, sin)
            append_kv(kr, v_, kb, vb, pos, codes=codes if mode != "none" else None,
                      weight=w if mode != "none" else None)
            if mode == "all":
                hash_encode(qr[:, :, 0], w, enable_gqa=True)

        us = cuda_time_us(run, reps=50)
        out.append(dict(B=B, mode=mode, chain=True, us=us))
        print(f"B={B} {mode:>5} old chain: {us:.2f} us", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--warps", default="1,2,4,8")
    a = p.parse_args()
    out: list = []
    for B in (1, 4):
        time_batch(B, [int(x) for x in a.warps.split(",")], out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
