"""Where a launch of the split-K attention spends its time, from the programs' own clocks (issue 3:
the attention at 2048 tokens, B = 8, is at 66-70% of copy while the read-only kernel over the same
blocks reaches 88-90%; a linear fit of the bench's 2048 / 10% rows gives ~7.7 us a launch that
does not scale with the bytes).

    python tools/experiments/attn_timeline.py [--cases b8_16,b1_103] [--steps 8:qwen3-8b:2048]
        [--variants default,pdl64] [--json PATH]

Each program of ``_sparse_decode_split_kernel`` records %globaltimer at its start, after its PDL
wait (``decode_step``: the scan is done), after its prologue, after its last tile, after its
merge ticket and at its end, and its SM (``kernels.TIMELINE``, module doc). The calls run as ``kvcomp bench decode`` times them: a CUDA
graph of back-to-back calls over input sets that do not fit L2 (attn_pipeline.py's cases; with
``--steps``, ``decode_step`` on the bench's sets, where the prologue runs the selection), each
call with its own timeline buffer, replayed after a warm-up. Per launch (medians over the
launches of the last replay):

* span: first program start to last program end; gap: this launch's first start minus the
  previous launch's last end (launch latency inside a graph);
* ramp: when the programs start (p50 / p90 / max after the first);
* prologue, loop (per program), and loop per tile; the prologue split at the PDL wait: wait
  (start -> the wait's end: the predecessor's drain and the grid dependency's release), sel
  (the wait's end -> the loop: with ``decode_step``, stage 2 of the selection), and when the
  first program's wait ended;
* ticket: the store of the partials, the barrier and the gpu-scope atomic (loop end -> ticket);
  merge: the last program's merge (ticket -> end);
* drain: the last end minus the time by which 90% of the programs had ended;
* SM busy: the mean over SMs of the time some program of the launch ran there, over the span;
* loop by SM load: the loop's median among programs whose SM ran 1, 2, ... programs of the launch;
* %copy in span: the gathered K/V bytes over the span, against the copy bandwidth of the run.

It also times the same graph with the hook off and on (the timer reads' cost).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_pipeline import AK, CASES, CHUNK, HKV, D, L, make_sets, variant, warm_gpu  # noqa: E402


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def analyse(t: torch.Tensor) -> dict:
    """One launch's timeline rows [programs, TIMELINE_COLS] (int64, ns) -> summary in microseconds. Rows that
    no program wrote (still zero: a knob such as FUSED_MERGE_FIT planned fewer splits than
    ``_plan`` alone) are left out."""
    t = t[t[:, 0] > 0].double()
    start, pro, loop, ticket, end = (t[:, i] for i in range(5))
    wait = t[:, 8]
    sm, tk, tiles = t[:, 5].long(), t[:, 6].long(), t[:, 7]
    t0, t1 = float(start.min()), float(end.max())
    us = 1e-3
    rel = (start - t0) * us
    last = tk >= 0
    if last.any():
        splits = int(tk.max()) + 1
        last = tk == splits - 1
    busy = []
    for s in sm.unique().tolist():
        sel = sm == s
        iv = sorted(zip(start[sel].tolist(), end[sel].tolist()))
        tot, cs, ce = 0.0, *iv[0]
        for a, b in iv[1:]:
            if a > ce:
                tot += ce - cs
                cs, ce = a, b
            else:
                ce = max(ce, b)
        busy.append(tot + ce - cs)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    busy += [0.0] * (n_sm - len(busy))
    res = dict(
        programs=int(t.shape[0]), sms_used=int(sm.unique().numel()), span_us=(t1 - t0) * us,
        ramp_p50_us=_pct(rel.tolist(), 50), ramp_p90_us=_pct(rel.tolist(), 90), ramp_max_us=float(rel.max()),
        prologue_p50_us=float((pro - start).median()) * us,
        # the prologue in two: start -> after the PDL wait, then (decode_step) the selection
        wait_p50_us=float((wait - start).median()) * us, sel_p50_us=float((pro - wait).median()) * us,
        sel_max_us=float((pro - wait).max()) * us,
        first_wait_end_us=float(wait.min() - t0) * us,
        loop_p50_us=float((loop - pro).median()) * us, loop_max_us=float((loop - pro).max()) * us,
        loop_per_tile_p50_us=float(((loop - pro) / tiles.clamp(min=1)).median()) * us,
        ticket_p50_us=float((ticket - loop).median()) * us, ticket_max_us=float((ticket - loop).max()) * us,
        end90_us=_pct(((end - t0) * us).tolist(), 90), sm_busy=sum(busy) / (n_sm * (t1 - t0)),
        first_loop_end_us=float(loop.min() - t0) * us, last_loop_end_us=float(loop.max() - t0) * us,
    )
    if last.any():
        res.update(merge_p50_us=float((end - ticket)[last].median()) * us,
                   merge_max_us=float((end - ticket)[last].max()) * us)
    res["drain_us"] = res["span_us"] - res["end90_us"]
    # a program's loop by how many programs of the launch its SM ran (session 19: at B = 8 16.4
    # us on SMs with 4 against 15.5 with 3; at B = 1, 10% 15.4 with 2 against 10.1 with 1)
    per_sm = torch.bincount(sm, minlength=n_sm)[sm]
    for c in per_sm.unique().tolist():
        res[f"loop_p50_us_sm{c}"] = float((loop - pro)[per_sm == c].median()) * us
        res[f"programs_on_sm{c}"] = int((per_sm == c).sum())
    return res


def _graph(calls, bufs, ak):
    """A CUDA graph of the calls, call i recording into bufs[i]; warmed and replayed once."""
    for i, c in enumerate(calls):  # compile and warm outside the capture
        ak.TIMELINE = bufs[i]
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g, stream=stream):
            for i, c in enumerate(calls):
                ak.TIMELINE = bufs[i]
                c()
    torch.cuda.current_stream().wait_stream(stream)
    ak.TIMELINE = None
    return g


def timeline(calls, programs: int, kv_bytes: int, copy: float, reps: int) -> dict:
    from kvcomp.bench.timing import cuda_time_us

    ak = importlib.import_module(AK)
    calls = calls * max(1, -(-8 // len(calls)))
    bufs = [torch.zeros(programs, ak.TIMELINE_COLS, dtype=torch.int64, device="cuda") for _ in calls]
    us_off = cuda_time_us(calls, reps=reps)
    g = _graph(calls, bufs, ak)
    for _ in range(200):  # clocks up (~0.2 s of replays), then the replay that is read
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    rows = [analyse(b.cpu()) for b in bufs]
    for i in range(1, len(bufs)):
        rows[i]["gap_us"] = (float(bufs[i][:, 0].min()) - float(bufs[i - 1][:, 4].max())) * 1e-3
    keys = dict.fromkeys(k for r in rows for k in r)
    summ: dict = {k: statistics.median(r[k] for r in rows if k in r) for k in keys}
    summ["raw_last_launch"] = bufs[-1][:, :9].cpu().tolist()  # [programs, 9] for offline analysis
    summ.update(us_hook_off=us_off, us_hook_on=statistics.median(times),
                pct_copy_span=100 * kv_bytes / (summ["span_us"] * 1e-6) / (copy * 1e9),
                pct_copy_call=100 * kv_bytes / (us_off * 1e-6) / (copy * 1e9))
    return summ


def run_case(name: str, copy: float, reps: int, gen) -> dict:
    from kvcomp.ops import sparse_decode_attention

    ak = importlib.import_module(AK)
    B, HQ, ksel = CASES[name]
    sets = make_sets(B, HQ, ksel, gen)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    _, _, splits = ak._plan(B, HKV, ksel, CHUNK, D, G=HQ // HKV)
    calls = [lambda q=q, k=k, v=v, i=i: sparse_decode_attention(q, k, v, i, lens, chunk_size=CHUNK)
             for q, k, v, i in sets]
    res = timeline(calls, B * HKV * splits, B * HKV * ksel * CHUNK * D * 4, copy, reps)
    del sets
    torch.cuda.empty_cache()
    return dict(case=name, B=B, Hq=HQ, blocks=ksel, splits=splits, **res)


def run_step(B: int, model: str, budget: str, copy: float, reps: int, gen) -> dict:
    from kvcomp.bench import decode
    from kvcomp.ops.decode_step import decode_step

    ak = importlib.import_module(AK)
    kv_w, sets = decode.kv_input_sets(B, L, gen, False, touched=decode.touched_bytes(B, L, [budget]))
    Hq = decode.MODELS[model]
    kb = min(decode._blocks_for(budget, L // CHUNK), L // CHUNK)
    qs = [torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in sets]
    kw = dict(k_blocks=kb, chunk_size=CHUNK, must_select=decode.MUST_SELECT, scale=D ** -0.5)
    calls = [lambda q=q, st=st: decode_step(q, kv_w, st["codes"], st["k"], st["v"], st["lens"], **kw)
             for q, st in zip(qs, sets)]
    _, _, splits = ak._plan(B, HKV, kb, CHUNK, D, G=Hq // HKV)
    res = timeline(calls, B * HKV * splits, B * HKV * kb * CHUNK * D * 4, copy, reps)
    del sets
    torch.cuda.empty_cache()
    return dict(step=f"{B}:{model}:{budget}", blocks=kb, splits=splits, **res)


COLS = ["us_hook_off", "us_hook_on", "span_us", "gap_us", "ramp_p90_us", "ramp_max_us", "prologue_p50_us",
        "wait_p50_us", "sel_p50_us", "sel_max_us", "first_wait_end_us",
        "loop_p50_us", "loop_max_us", "loop_per_tile_p50_us", "ticket_p50_us", "merge_p50_us", "merge_max_us",
        "drain_us", "sm_busy", "pct_copy_span", "pct_copy_call"]


def main() -> None:
    from kvcomp.bench.timing import copy_bandwidth_gbs

    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="b8_16,b8_16_g8,b4_16,b8_103,b1_16,b1_103")
    p.add_argument("--steps", default="8:qwen3-8b:2048,1:qwen3-8b:10%")
    p.add_argument("--variants", default="default", help="attn_pipeline.py's VARIANTS, each row under each")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json")
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
    warm_gpu()
    out = dict(device=torch.cuda.get_device_name(), copy_GBps=copy, rows=[])
    for vname in a.variants.split(","):
        with variant(vname):
            for spec in filter(None, a.steps.split(",")):
                B, model, budget = spec.split(":")
                out["rows"].append(dict(run_step(int(B), model, budget, copy, a.reps, gen), variant=vname))
                print(json.dumps({k: v for k, v in out["rows"][-1].items() if k != "raw_last_launch"}), flush=True)
            for name in filter(None, a.cases.split(",")):
                out["rows"].append(dict(run_case(name, copy, a.reps, gen), variant=vname))
                print(json.dumps({k: v for k, v in out["rows"][-1].items() if k != "raw_last_launch"}), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    print("\n" + " " * 30 + " ".join(f"{c[:9]:>9}" for c in COLS))
    for r in out["rows"]:
        name = f"{r.get('case', r.get('step'))} {r['variant']}"
        print(f"{name[:30]:<30}" + " ".join(f"{r.get(c, float('nan')):9.2f}" for c in COLS))


if __name__ == "__main__":
    main()
