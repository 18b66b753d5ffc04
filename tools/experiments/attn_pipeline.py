"""The split-K attention's launch and pipelining knobs, A/B in one process on the H200 (issue 3:
">= 70% of the copy bandwidth on the K/V bytes it gathers", short at B = 8 with 2048 tokens).

    python tools/experiments/attn_pipeline.py [--cases b8_16,b1_16] [--variants default,sc_s3] [--json PATH]
    python tools/experiments/attn_pipeline.py --ncu VARIANT --cases b8_16   # eager calls for ncu

For each case (Qwen3-8B: 32 query / 8 kv heads, or Qwen3-32B: 64 / 8; D 128, chunk 128, L =
128K, B sequences, a number of selected blocks a row) it builds enough input sets that nothing
is found in L2, checks every variant's output against the fp64 reference (flash-attention's
rule), then times ``sparse_decode_attention`` alone (CUDA-graph replays of back-to-back calls
over the sets, ``kvcomp.bench.timing.cuda_time_us``) and reports % of the copy bandwidth
measured in the same run on the gathered K/V bytes. It also reports each variant's compiled
split kernel as the H200's Triton built it: registers, spills, shared memory, stages.

Variants are module flags of ``kvcomp.ops.sparse_decode_attention.kernels`` (``VARIANTS``; a key
"module:FLAG" sets a flag of another module).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math

import torch

AK = "kvcomp.ops.sparse_decode_attention.kernels"
HKV, D, CHUNK, L = 8, 128, 128, 131072
L2_BYTES = 60 << 20
# name: (B, query heads, selected blocks a row)
CASES = {
    "b8_16": (8, 32, 16), "b8_103": (8, 32, 103), "b8_307": (8, 32, 307), "b4_16": (4, 32, 16),
    "b2_16": (2, 32, 16), "b1_16": (1, 32, 16), "b1_103": (1, 32, 103), "b1_307": (1, 32, 307), "b8_16_g8": (8, 64, 16), "b1_16_g8": (1, 64, 16),
}
# session 18, call 1 (SCALAR_BLOCKS off by default then; decode.md "Session 18"): sc_s2 (the
# scalar entries) fastest at every case; sc_s3 / sc_s4 / sc_n32_s3 / sc_n32_s4 / sc_s3_t264 /
# sc_s3_t384 / sc_n32_s3_t264 / sc_s3_w8 / sc_s3_1tile3 / n32_s2 slower at B = 8
VARIANTS = {
    "default": {},
    "default2": {},  # the default again: the run-to-run spread
    "per_token": dict(SCALAR_BLOCKS=False),  # the entries loaded per token in the step (before)
    "s3": dict(STAGES=3),
    "n32": dict(TILE_N=32),
    "t384": dict(TARGET_PROGRAMS_MANY=384),
    "t1024": dict(TARGET_PROGRAMS_MANY=1024),
    "many16": dict(MANY_ROWS=16),
    "g8_many": dict(MANY_MAX_G=8),  # the default since call 9 (G = 8 on the 512 plan)
    "g8_264": dict(MANY_MAX_G=4),  # G = 8 back on 264 programs
    "r128": dict(MAXNREG=128),
    "per_token_r128": dict(SCALAR_BLOCKS=False, MAXNREG=128),
    "r96": dict(MAXNREG=96),
    # call 3 (decode.md "Session 18") made MANY_MAXNREG = 128 the default: the step at B = 8
    "uncapped": dict(MANY_MAXNREG=None),
    "per_token_uncapped": dict(SCALAR_BLOCKS=False, MANY_MAXNREG=None),
    # B = 1 at 10% / 30% (8 rows, 128-token tiles, 26 / 77 splits of 4 tiles: 209 registers, 2
    # programs an SM): 64-token tiles, more programs, a register cap for 3 an SM
    "no_long": dict(LONG_TILE_N=None),
    "no_long_many": dict(LONG_TILE_N=None, MANY_ROWS=8, FUSED_MERGE_MAX_BYTES=128 << 10),
    "no_long_many_uncapped": dict(LONG_TILE_N=None, MANY_ROWS=8, FUSED_MERGE_MAX_BYTES=128 << 10,
                                  MANY_MAXNREG=None),
    "r168": dict(MAXNREG=168),
    "r168_t396": dict(MAXNREG=168, TARGET_PROGRAMS=396),
    # G = 8 on the 512-program plan, now with its 128-register cap (session 17 measured the plan
    # for G = 8 uncapped: that was the 3-programs-an-SM wave, not stage 2); the merge's 8 splits
    # of 8 rows in one step
    "g8_many_m8k": dict(MANY_MAX_G=8, MERGE_TILE_ELEMS=8192),
    # session 19's PREFETCH_TILES (prefetch*) and session 20's BALANCED_SPLITS (balanced*):
    # timed slower, removed from the kernel (decode.md "Session 19" / "Session 20").
    # Session 19 (attn_timeline.py): at B = 8 a launch starts ~1 us after the previous one ends
    # (no PDL above 16 rows); PDL for the attention at up to 64 rows, and for every decode kernel
    "pdl64": dict(PDL_MAX_ROWS=64),
    "pdl64_all": {"kvcomp.ops._pdl:DECODE_MAX_ROWS": 64},  # the default since 3d65ea1
    "pdl16": {"kvcomp.ops._pdl:DECODE_MAX_ROWS": 16},  # before
    "attn_early": {"kvcomp.ops._pdl:EARLY_TRIGGER_MAX_ROWS": {}},  # 3d65ea1's (early at any rows)
    # session 20: at B = 8 the 512 programs' loops end 6 us apart (static splits, one wave); 1024
    # programs of 2 tiles run in two waves, the second dealt by the hardware to the SMs that free
    # up first (the same splits every call: the output stays reproducible)
    "t1024_m8k": dict(TARGET_PROGRAMS_MANY=1024, MERGE_TILE_ELEMS=8192),
    # session 22: the same one wave with finer work: programs of 2 warps (128 registers: 8 an SM,
    # 21.5 KB of shared memory each at 32-token tiles), 1024 of them at B = 8 (16 splits of 4
    # 32-token tiles a row), so that the loops' ends spread over half the work a program; the
    # merge's step at the 2-warp equivalent of 4096 elements (m2k), or 512 programs of 8 tiles.
    # Call 5 (decode.md "Session 22"), us, default / w2_n32_t1024 / _m2k / w2_n32: G = 8, B = 8
    # 23.35 / 26.86 / 26.13 / 24.35; G = 4 22.69 / 23.71 / 23.36 / 23.43; B = 4 13.97 / 15.94 /
    # 15.80 / 14.94; decode_step Qwen3-32B 63.28 / 69.62 / 68.69: slower everywhere
    "w2_n32_t1024": dict(WARPS=2, TILE_N=32, TARGET_PROGRAMS_MANY=1024),
    "w2_n32_t1024_m2k": dict(WARPS=2, TILE_N=32, TARGET_PROGRAMS_MANY=1024, MERGE_TILE_ELEMS=2048),
    "w2_n32": dict(WARPS=2, TILE_N=32),
}


def _compiled(fn) -> set:
    """Every compiled kernel of a JIT function (any Triton 3.x cache layout)."""
    out = set()
    for entry in getattr(fn, "device_caches", {}).values():
        caches = entry if isinstance(entry, (tuple, list)) else (entry,)
        for c in caches:
            if isinstance(c, dict):
                out.update(v for v in c.values() if hasattr(v, "metadata"))
    return out


def _info(k) -> dict:
    md = k.metadata
    try:
        k._init_handles()
    except Exception:  # noqa: BLE001 (already loaded, or an older Triton)
        pass
    return dict(regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                smem=getattr(md, "shared", None), stages=getattr(md, "num_stages", None),
                warps=getattr(md, "num_warps", None))


@contextlib.contextmanager
def variant(name: str):
    """The module flags of ``VARIANTS[name]`` set inside the block (restored after it); yields a
    list that receives the split kernels compiled inside it (``_info`` of each)."""
    ak = importlib.import_module(AK)
    flags = {(importlib.import_module(f.split(":")[0]) if ":" in f else ak, f.split(":")[-1]): val
             for f, val in VARIANTS[name].items()}  # "module:FLAG" for a flag of another module
    undo = {key: getattr(*key) for key in flags}
    before = _compiled(ak._sparse_decode_split_kernel)
    compiled: list = []
    try:
        for (mod, f), val in flags.items():
            setattr(mod, f, val)
        yield compiled
    finally:
        compiled.extend(_info(c) for c in _compiled(ak._sparse_decode_split_kernel) - before)
        for (mod, f), val in undo.items():
            setattr(mod, f, val)


def make_sets(B: int, HQ: int, ksel: int, gen) -> list:
    kv_bytes = B * HKV * ksel * CHUNK * D * 2 * 2
    n_sets = 2 if kv_bytes > L2_BYTES else max(2, math.ceil(3 * L2_BYTES / kv_bytes))
    sets = []
    for _ in range(n_sets):
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        idx = torch.stack([torch.randperm(L // CHUNK, device="cuda", generator=gen)[:ksel]
                           for _ in range(B * HKV)])
        idx = idx.sort(-1).values.to(torch.int32).view(B, HKV, ksel)
        q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        sets.append((q, k, v, idx))
    return sets


def run_case(name: str, variants: list[str], copy: float, reps: int, gen) -> dict:
    from kvcomp.bench.timing import (
        attention_close,
        attention_ref_fp64,
        attention_ref_lowp,
        cuda_time_us,
    )
    from kvcomp.ops import sparse_decode_attention

    ak = importlib.import_module(AK)
    B, HQ, ksel = CASES[name]
    sets = make_sets(B, HQ, ksel, gen)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q, k, v, idx = sets[0]
    mask = torch.zeros(B, HKV, L, dtype=torch.bool, device="cuda")
    tok = (idx.long().unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device="cuda")).flatten(2)
    mask.scatter_(2, tok, True)
    ref64 = attention_ref_fp64(q, k, v, mask, D ** -0.5)
    lowp = attention_ref_lowp(q, k, v, mask, D ** -0.5)
    kv_bytes = B * HKV * ksel * CHUNK * D * 4
    floor_us = kv_bytes / (copy * 1e3)
    row = dict(case=name, B=B, Hq=HQ, blocks=ksel, kv_bytes=kv_bytes, sets=len(sets), variants={})
    calls = [lambda q=q, k=k, v=v, i=i: sparse_decode_attention(q, k, v, i, lens, chunk_size=CHUNK)
             for q, k, v, i in sets]
    for vname in variants:
        with variant(vname) as compiled:
            got = sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK)
            ok, err, base = attention_close(got, ref64, lowp)
            res = dict(verified=bool(ok), err=float(err), plan=list(ak._plan(B, HKV, ksel, CHUNK, D, G=HQ // HKV)))
            if ok:
                us = cuda_time_us(calls, reps=reps)
                res.update(us=us, pct_copy=100 * floor_us / us)
        res["compiled"] = compiled
        row["variants"][vname] = res
        us = res.get("us")
        print(f"{name:<9} {vname:<16} " + (f"{us:8.2f} us {res['pct_copy']:5.1f}%" if us else "WRONG" + " " * 13)
              + f"  plan {res['plan']}  {res['compiled']}", flush=True)
    del sets
    torch.cuda.empty_cache()
    return row


def warm_gpu(seconds: float = 2.0) -> None:
    """Busy the GPU for a while first, so that its clocks are up before the first measurement.
    (Session 18: the first variant timed after each case's compile read 5-7% slow even so: the
    clocks drop during the compile. Since session 19 ``cuda_time_us`` warms for 30 ms itself;
    ``default2`` still times the default twice, for the spread.)"""
    import time

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()


def run_steps(B: int, model: str, budget: str, variants: list[str], copy: float, reps: int, gen) -> dict:
    """``decode_step`` (encode, scan, selection, attention) on the bench's input sets (``kvcomp
    bench decode``'s, 128K), each variant verified first: the selection equal to the default's
    and the output within the attention rule of the default's (bit-identical where the variant
    changes only registers or the entries' loads)."""
    from kvcomp.bench import decode
    from kvcomp.bench.timing import cuda_time_us
    from kvcomp.ops.decode_step import decode_step

    kv_w, sets = decode.kv_input_sets(B, L, gen, False, touched=decode.touched_bytes(B, L, [budget]))
    Hq = decode.MODELS[model]
    n_blocks = L // CHUNK
    kb = min(decode._blocks_for(budget, n_blocks), n_blocks)
    qs = [torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in sets]
    kw = dict(k_blocks=kb, chunk_size=CHUNK, must_select=decode.MUST_SELECT, scale=D ** -0.5)
    steps = [lambda q=q, st=st: decode_step(q, kv_w, st["codes"], st["k"], st["v"], st["lens"], **kw)
             for q, st in zip(qs, sets)]
    want = steps[0]()
    row = dict(B=B, model=model, budget=budget, blocks=kb, variants={})
    for vname in variants:
        with variant(vname) as compiled:
            out, idx = steps[0]()
            same = bool(torch.equal(idx, want[1]) and torch.equal(out, want[0]))
            close = same or bool((out.float() - want[0].float()).abs().max() < 2e-2)
            res = dict(bit_identical=same, verified=close)
            if close:
                res["us"] = cuda_time_us(steps, reps=reps)
        res["compiled"] = compiled
        row["variants"][vname] = res
        print(f"step {model} B={B} {budget:<5} {vname:<16} " + (f"{res['us']:8.2f} us" if "us" in res else "WRONG")
              + f"  same {same}  {res['compiled']}", flush=True)
    del sets
    torch.cuda.empty_cache()
    return row


def main() -> None:
    from kvcomp.bench.timing import copy_bandwidth_gbs

    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="b8_16,b4_16,b8_103,b1_16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--ncu", help="run this variant eagerly 12 times a case (for ncu), no timing")
    p.add_argument("--steps", default="", help="also decode_step rows B:model:budget, e.g. 8:qwen3-8b:2048")
    p.add_argument("--step-variants", default="default,per_token")
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if a.ncu:
        from kvcomp.ops import sparse_decode_attention

        with variant(a.ncu):
            for name in a.cases.split(","):
                B, HQ, ksel = CASES[name]
                sets = make_sets(B, HQ, ksel, gen)
                lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                for i in range(12):
                    q, k, v, idx = sets[i % len(sets)]
                    sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK)
                torch.cuda.synchronize()
        return
    copy = copy_bandwidth_gbs()
    res = dict(device=torch.cuda.get_device_name(), copy_GBps=copy, rows=[])
    print(f"{res['device']}: copy {copy:.0f} GB/s")
    warm_gpu()
    res["steps"] = []
    for spec in filter(None, a.steps.split(",")):
        B, model, budget = spec.split(":")
        res["steps"].append(run_steps(int(B), model, budget, a.step_variants.split(","), copy, a.reps, gen))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=1)
    for name in filter(None, a.cases.split(",")):
        res["rows"].append(run_case(name, a.variants.split(","), copy, a.reps, gen))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=1)
    print("\ncase      " + " ".join(f"{v[:12]:>12}" for v in a.variants.split(",")))
    for r in res["rows"]:
        print(f"{r['case']:<9} " + " ".join(
            f"{r['variants'][v].get('us', float('nan')):12.2f}" for v in a.variants.split(",")))


if __name__ == "__main__":
    main()
