"""Experiment (issue 6): module-flag knobs end to end, in one process (the model built once).

``kvcomp bench e2e``'s Qwen3-8B-shaped model with ``--fuse all``; for each knob set (module
flags, as ``kvcomp bench decode --variants`` sets them) the kvcomp and dense_kv decoders at
each (context, batch), graphs captured again per set. Then, optionally, a torch.profiler table
of 8 replayed steps of both decoders with PDL off (``--profile-nopdl``: with PDL a kernel's
recorded duration includes the time its programs wait, resident, for the previous kernel, so
the durations overlap; without it they add up to the step).

The kernels are the library's, verified by ``kvcomp bench e2e`` and the GPU tests; this only
times them. Not part of the test suite.

    python tools/experiments/e2e_knobs.py --sets base,gemv_s4 [--rows 131072x1] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time

import torch
from kvcomp.bench import e2e

GEMV = "kvcomp.ops.gemv"
ONE_ROW = dict(form="fma", block_n=4, block_k=1024, num_warps=4, num_stages=3)  # the default
SETS = {
    "base": {},
    "gemv_s4": {GEMV: dict(GEMV_CONFIG_ONE_ROW=dict(ONE_ROW, num_stages=4))},
    "gemv_s2": {GEMV: dict(GEMV_CONFIG_ONE_ROW=dict(ONE_ROW, num_stages=2))},
    "gemv_n8": {GEMV: dict(GEMV_CONFIG_ONE_ROW=dict(ONE_ROW, block_n=8, block_k=512))},
    "gemv_w8": {GEMV: dict(GEMV_CONFIG_ONE_ROW=dict(ONE_ROW, num_warps=8))},
    "gemv_n2": {GEMV: dict(GEMV_CONFIG_ONE_ROW=dict(ONE_ROW, block_n=2, block_k=2048))},
    "sel_launch": {"kvcomp.ops.sparse_decode_attention.kernels": dict(SELECT_IN_PROLOGUE=False)},
    # session 17: the attention's 512-program plan from 32 rows off (before); its "attn_t512_sel"
    # (the plan also in the prologue-selection path) is the default since
    "attn_t264": {"kvcomp.ops.sparse_decode_attention.kernels": dict(TARGET_PROGRAMS_MANY=264)},
    # the attention's norms, RoPE, append and query codes as four launches (before rope_append)
    "no_rope_append": {"kvcomp.fusion": dict(FUSED_ATTENTION_STEP=False)},
    # the MLP's silu_mul as its own launch after the gate|up gemv (before gemv(gated=True))
    "no_gated": {"kvcomp.fusion": dict(GATED_MLP=False)},
    "neither": {"kvcomp.fusion": dict(FUSED_ATTENTION_STEP=False, GATED_MLP=False)},
    "no_table": {"kvcomp.attention": dict(K_BLOCKS_TABLE=False)},  # the policy's ops in every step
    "gated_rows": {"kvcomp.fusion": dict(GATED_MLP_MAX_ROWS=16)},  # the gated epilogue at B > 1 too
    # ... on the two-tile gated tensor-core form (session 13's, before GATED_STACKED)
    "gated_rows_two": {"kvcomp.fusion": dict(GATED_MLP_MAX_ROWS=16), GEMV: dict(GATED_STACKED=False)},
    # the gated gemv lets its successor (the down projection) launch only as its programs exit:
    # launched early, down's 128 programs were placed during its tail (49.5 us against 27)
    "gated_rows_late": {"kvcomp.fusion": dict(GATED_MLP_MAX_ROWS=16),
                        "kvcomp.ops._pdl": dict(NO_TRIGGER=frozenset({"gemv_gated"}))},
    "gated_late": {"kvcomp.ops._pdl": dict(NO_TRIGGER=frozenset({"gemv_gated"}))},  # one row (B = 1)
    # tensor-core tiles of 16 features (twice the programs of every projection at B > 1)
    "dot_n16": {GEMV: dict(GEMV_CONFIG=dict(form="dot", block_n=16, block_k=256, num_warps=4, num_stages=4))},
    # below the threshold every step writes its key's code (before deferred codes)
    "codes_always": {"kvcomp.static_cache": dict(DEFER_CODES=False)},
    # every gemv waits for its predecessor before its first weight load (before gemv(early=True))
    "late_w": {GEMV: dict(EARLY_WEIGHT=False)},
    "early2": {GEMV: dict(EARLY_TILES=2)},  # two K tiles before the wait
    "early_rows4": {GEMV: dict(EARLY_MAX_ROWS=4)},  # the early tile on the tensor-core tiles too
    # 2-4 rows on the CUDA-core tiles (4 features x 1024 a program, as one row), late / early
    "rows4_fma": {GEMV: dict(GEMV_CONFIG=dict(ONE_ROW))},
    "rows4_fma_early": {GEMV: dict(GEMV_CONFIG=dict(ONE_ROW), EARLY_MAX_ROWS=4)},
    "rows4_fma8_early": {GEMV: dict(GEMV_CONFIG=dict(ONE_ROW, block_n=8, block_k=512), EARLY_MAX_ROWS=4)},
    # the tensor-core scan's occupancy at B = 1 (kvcomp bench decode's scan_* variants)
    "scan_r40": {"kvcomp.ops.hamming_topk.mma_scan": dict(MMA_MAXNREG=40)},
    "scan_r32": {"kvcomp.ops.hamming_topk.mma_scan": dict(MMA_MAXNREG=32)},
    "scan_t1024": {"kvcomp.ops.hamming_topk.mma_scan": dict(MMA_TARGET_PROGRAMS=1024)},
    "scan_t4096": {"kvcomp.ops.hamming_topk.mma_scan": dict(MMA_TARGET_PROGRAMS=4096)},
    # session 19: the decode kernels' PDL up to 16 rows (before), and the attention's early
    # trigger at any row count (3d65ea1)
    "pdl_rows16": {"kvcomp.ops._pdl": dict(DECODE_MAX_ROWS=16)},
    "attn_early": {"kvcomp.ops._pdl": dict(EARLY_TRIGGER_MAX_ROWS={})},
}


@contextlib.contextmanager
def flags(spec: dict):
    saved = []
    try:
        for mod_name, values in spec.items():
            mod = importlib.import_module(mod_name)
            for k, v in values.items():
                saved.append((mod, k, getattr(mod, k)))
                setattr(mod, k, v)
        yield
    finally:
        for mod, k, v in reversed(saved):
            setattr(mod, k, v)


def timeline(model, graphs, method: str, ctx: int, B: int, args, path: str) -> None:
    """A chrome trace of 3 graph-replayed greedy steps of ``method`` (after the timed ones of
    ``e2e.measure_decoder``): kernel start / end times, for the critical path with PDL on."""
    from torch.profiler import ProfilerActivity, profile

    def traced(model_, cache, ids, n):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                ids = e2e.forward(model_, ids, cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        return "trace: " + path

    saved = e2e.profile_steps
    e2e.profile_steps = traced
    try:
        args.profile, args._profile_ctx, args._profile_batch = True, ctx, B
        row = e2e.measure_decoder(model, graphs, e2e.Decoder(model, method, 2048), ctx, B, args, "cuda",
                                  e2e.fill_synthetic, profile_methods=(method,))
        print(f"# {method} {ctx}x{B}: {row['step_ms']:.3f} ms/step, {row.get('profile')}", flush=True)
    finally:
        e2e.profile_steps = saved
        args.profile = False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", default="base", help=f"comma-separated subset of {','.join(SETS)}")
    p.add_argument("--rows", default="131072x1", help="comma-separated CTXxB")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--profile-nopdl", action="store_true")
    p.add_argument("--timeline", metavar="DIR",
                   help="chrome traces (torch.profiler, PDL as set) of 3 replayed steps of both decoders "
                        "at the first row, under each set's flags, into DIR")
    p.add_argument("--json")
    a = p.parse_args()
    from kvcomp.graphs import DecodeGraphs

    args = argparse.Namespace(steps=a.steps, budget=2048, profile=False, _profile_ctx=0)
    model = e2e.build_model(False, "cuda", torch.bfloat16)
    graphs = DecodeGraphs(model, warmup=2, fuse=dict(e2e.FUSE["all"], devices=("cuda",)))
    rows = [tuple(int(v) for v in r.split("x")) for r in a.rows.split(",")]
    out: dict = {"env": e2e.env_info(True), "sets": {}, "profiles": {}}
    t0 = time.time()
    try:
        for name in a.sets.split(","):
            for ctx, B in rows:
                got = {}
                with flags(SETS[name]):
                    for method in ("kvcomp", "dense_kv"):
                        got[method] = e2e.measure(model, graphs, method, ctx, B, args, "cuda")["step_ms"]
                got["ratio"] = got["dense_kv"] / got["kvcomp"]
                out["sets"][f"{name}@{ctx}x{B}"] = got
                print(f"{name:>12} {ctx:>7} {B}  kvcomp {got['kvcomp']:.3f} ms  dense_kv {got['dense_kv']:.3f} ms"
                      f"  {got['ratio']:.3f}x  ({time.time() - t0:.0f}s)", flush=True)
        if a.timeline:
            ctx, B = rows[0]
            for name in dict.fromkeys(a.sets.split(",")):
                with flags(SETS[name]):
                    for method in ("kvcomp", "dense_kv"):
                        timeline(model, graphs, method, ctx, B, args,
                                 f"{a.timeline}/trace_{name}_{method}_{ctx}x{B}.json")
        if a.profile_nopdl:
            pdl = importlib.import_module("kvcomp.ops._pdl")
            pdl.ENABLED = False
            ctx, B = rows[0]
            args.profile, args._profile_ctx = True, ctx
            for method in ("kvcomp", "dense_kv"):
                row = e2e.measure_decoder(model, graphs, e2e.Decoder(model, method, 2048), ctx, B, args, "cuda",
                                          e2e.fill_synthetic, profile_methods=(method,))
                out["profiles"][method] = {"step_ms_nopdl": row["step_ms"], "table": row.get("profile")}
                print(f"# no PDL, {method}: {row['step_ms']:.3f} ms/step\n{row.get('profile')}", flush=True)
    finally:
        graphs.remove()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
