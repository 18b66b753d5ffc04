"""The Hamming scan's launch knobs on the GPU, against the copy bandwidth measured in the same
run: the scan alone (``block_keys_triton``) and scan + selection (``hamming_topk``), Qwen3-8B
shape (32 q / 8 kv heads, 128-bit codes; ``--heads 64`` for Qwen3-32B), chunk 128, 2048 tokens.

    python tools/experiments/scan_tiles.py [--lengths 131072] [--batches 1,8] [--heads 32,64]
        [--targets 8192,2048] [--mma 1,0] [--hist-rows 32,64] [--step4 0,1]
        [--flag ms.MMA_FIRST_EARLY=1,0 ...] [--json PATH]

Knobs: programs a launch aims at (``TARGET_PROGRAMS`` of the SIMT scan, ``MMA_TARGET_PROGRAMS``
of the tensor-core scan: tiles a program), the tensor-core scan on or off (``MMA_SCAN``) and
the rows up to which the histogram threshold is taken (``HIST_MAX_ROWS`` and
``HIST_MAX_ROWS_MMA``) and its bins of 2 or 4 scores (``HIST_STEP4``); ``--flag`` sets any
other int or bool module flag of ``hamming_topk.kernels`` (hk) or ``hamming_topk.mma_scan`` (ms). Every variant's selection is checked against the reference
(``select_blocks_ref`` over the reference block scores) before it is timed; a mismatch is
reported and not timed. Inputs rotate over enough code sets that nothing is found in L2.
"% copy" is the code bytes (B * Hkv * L * 16) over the measured time, over the copy bandwidth
(bytes read + written), as ``kvcomp bench decode`` counts it; torch's int32 sum over the same
bytes is timed as a read-only yardstick.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
from kvcomp.bench.timing import copy_bandwidth_gbs, cuda_time_us, positive_ints

HKV, W, CHUNK, BUDGET = 8, 4, 128, 2048
MUST = (0, -1)
L2_BYTES = 50 << 20


def main() -> None:
    from kvcomp.bench.decode import _module_flags
    from kvcomp.ops import hamming_topk
    from kvcomp.ops.hamming_topk import kernels as hk
    from kvcomp.ops.hamming_topk import mma_scan as ms
    from kvcomp.ops.hamming_topk.reference import (
        block_scores_ref,
        select_blocks_ref,
        token_scores_ref,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=positive_ints, default=[131072])
    ap.add_argument("--batches", type=positive_ints, default=[1, 8])
    ap.add_argument("--heads", type=positive_ints, default=[32], help="query heads (8 kv heads): 32, 64")
    ap.add_argument("--targets", type=positive_ints, default=[8192, 2048])
    ap.add_argument("--mma", default="1", help="MMA_SCAN values to time, e.g. 1,0")
    ap.add_argument("--hist-rows", default="", help="histogram rows limits to time, e.g. 32,64 (default: as is)")
    ap.add_argument("--step4", default="", help="HIST_STEP4 values to time, e.g. 0,1 (default: as is)")
    ap.add_argument("--flag", action="append", default=[],
                    help="MODULE.NAME=V1,V2 with MODULE hk or ms, e.g. ms.MMA_FIRST_EARLY=1,0 (repeatable)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    copy = copy_bandwidth_gbs()
    hist_rows = [int(x) for x in args.hist_rows.split(",") if x] or [None]
    step4 = [bool(int(x)) for x in args.step4.split(",") if x] or [None]
    mods = {"hk": hk, "ms": ms}
    flags = []  # [(module, name, [values])]: bool flags as bools, int or None ones as ints
    for f in args.flag:
        lhs, vals = f.split("=")
        mod, name = lhs.split(".")
        if mod not in mods or not hasattr(mods[mod], name):
            ap.error(f"--flag {f}: no flag {name} in {mod}")
        conv = bool if isinstance(getattr(mods[mod], name), bool) else int
        flags.append((mods[mod], name, [conv(int(v)) for v in vals.split(",")]))
    knobs = [(bool(int(m)), hr, t, s4, fv) for m in args.mma.split(",") for hr in hist_rows for t in args.targets
             for s4 in step4 for fv in itertools.product(*[f[2] for f in flags])]
    out = dict(device=torch.cuda.get_device_name(), copy_GBps=copy, rows=[])
    print(f"{out['device']}: copy {copy:.0f} GB/s (read + write)")
    print(f"{'Hq':>3} {'L':>7} {'B':>2} {'mma':>3} {'step4':>5} {'hist':>4} {'target':>6} {'tiles/prog':>10} {'scan us':>8} {'%copy':>6} "
          f"{'scan+sel':>8} {'%copy':>6}")
    for HQ, L, B in [(hq, L, B) for hq in args.heads for L in args.lengths for B in args.batches]:
        nbytes = B * HKV * L * W * 4
        n_sets = max(1, math.ceil(3 * L2_BYTES / nbytes))
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        sets = [(torch.randint(-2**31, 2**31 - 1, (B, HQ, W), device=dev, dtype=torch.int32, generator=gen),
                 torch.randint(-2**31, 2**31 - 1, (B, HKV, L, W), device=dev, dtype=torch.int32, generator=gen))
                for _ in range(n_sets)]
        nb = math.ceil(L / CHUNK)
        kb = BUDGET // CHUNK
        q0, k0 = sets[0]
        want = select_blocks_ref(block_scores_ref(token_scores_ref(q0, k0), lens, CHUNK, "max"), lens,
                                 torch.full((B,), kb, dtype=torch.int32, device=dev), kb, CHUNK, MUST)
        floor_us = nbytes / (copy * 1e9) * 1e6  # the code bytes at the copy bandwidth (read + write)
        t_sum = cuda_time_us([lambda k=k: k.sum(dtype=torch.int32) for _, k in sets], reps=args.reps)
        out["rows"].append(dict(Hq=HQ, L=L, B=B, torch_sum_us=t_sum, code_bytes=nbytes))
        print(f"{HQ:>3} {L:>7} {B:>2} torch int32 sum of the codes: {t_sum:.1f} us, {100 * floor_us / t_sum:.0f}% of copy")
        for mma, hr, target, s4, fv in knobs:
            spec = {hk.__name__: dict(TARGET_PROGRAMS=target), ms.__name__: dict(MMA_SCAN=mma, MMA_TARGET_PROGRAMS=target)}
            if hr is not None:
                spec[hk.__name__].update(HIST_MAX_ROWS=hr, HIST_MAX_ROWS_MMA=hr)
            if s4 is not None:
                spec[hk.__name__]["HIST_STEP4"] = s4
            for (m, name, _), v in zip(flags, fv):
                spec.setdefault(m.__name__, {})[name] = v
            set_flags = {f"{'hk' if m is hk else 'ms'}.{name}": v for (m, name, _), v in zip(flags, fv)}
            with _module_flags(spec):
                hr_now = hk.HIST_MAX_ROWS_MMA if mma else hk.HIST_MAX_ROWS
                s4_now = hk.HIST_STEP4
                tag = f"{HQ:>3} {L:>7} {B:>2} {int(mma):>3} {int(s4_now):>5} {hr_now:>4} {target:>6}" + "".join(
                    f" {k}={v}" for k, v in set_flags.items())
                got = hamming_topk(q0, k0, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)
                if not torch.equal(got, want):
                    print(f"{tag}  MISMATCH against the reference: not timed")
                    out["rows"].append(dict(Hq=HQ, L=L, B=B, target=target, mma=mma, hist_max_rows=hr_now,
                                            hist_step4=s4_now, flags=set_flags, verified=False))
                    continue
                t_scan = cuda_time_us([lambda q=q, k=k, n=lens: hk.block_keys_triton(q, k, n, CHUNK, "max")
                                       for q, k in sets], reps=args.reps)
                t_sel = cuda_time_us([lambda q=q, k=k, n=lens, kb=kb: hamming_topk(q, k, n, k_blocks=kb, chunk_size=CHUNK,
                                                                                   must_select=MUST) for q, k in sets],
                                     reps=args.reps)
            blocks_per_tile = ms.MMA_WARPS if mma else hk.BLOCK_T // CHUNK
            splits = max(1, min(math.ceil(target / (B * HKV)), math.ceil(nb / blocks_per_tile)))
            per_prog = math.ceil(math.ceil(nb / splits) / blocks_per_tile)
            out["rows"].append(dict(Hq=HQ, L=L, B=B, target=target, mma=mma, hist_max_rows=hr_now, hist_step4=s4_now,
                                    flags=set_flags,
                                    tiles_per_program=per_prog, verified=True, scan_us=t_scan, select_us=t_sel,
                                    code_bytes=nbytes, floor_us=floor_us, scan_copy=floor_us / t_scan,
                                    select_copy=floor_us / t_sel))
            print(f"{tag} {per_prog:>10} {t_scan:8.1f} {100 * floor_us / t_scan:5.0f}% "
                  f"{t_sel:8.1f} {100 * floor_us / t_sel:5.0f}%", flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
