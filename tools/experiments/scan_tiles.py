"""The Hamming scan's tiles a program (``TARGET_PROGRAMS``) on the GPU, against the copy
bandwidth measured in the same run: the scan alone (``block_keys_triton``) and scan + selection
(``hamming_topk``), Qwen3-8B shape (32 q / 8 kv heads, 128-bit codes), chunk 128, 2048 tokens.

    python tools/experiments/scan_tiles.py [--lengths 131072] [--batches 1,8] [--targets ...]
        [--json PATH]

Every variant's selection is checked against the reference (``select_blocks_ref`` over the
reference block scores) before it is timed; a mismatch is reported and not timed. Inputs rotate
over enough code sets that nothing is found in L2. The code bytes floor of a row is
B * Hkv * L * 16 bytes; "% copy" is the code bytes over the measured time, over the copy bandwidth (bytes read + written),
as ``kvcomp bench decode`` counts it. Old kernels (no SCAN_PREFETCH) time with --prefetch 1 only.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from kvcomp.bench.timing import copy_bandwidth_gbs, cuda_time_us, positive_ints

HQ, HKV, W, CHUNK, BUDGET = 32, 8, 4, 128, 2048
MUST = (0, -1)
L2_BYTES = 50 << 20


def main() -> None:
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
    ap.add_argument("--targets", type=positive_ints, default=[65536, 8192, 4096, 2048, 1024, 512])
    ap.add_argument("--prefetch", default="1", help="SCAN_PREFETCH values to time, e.g. 1,0")
    ap.add_argument("--maxnreg", default="0", help="SCAN_MAXNREG values to time (0: none), e.g. 0,40")
    ap.add_argument("--hist-rows", default="", help="HIST_MAX_ROWS values to time, e.g. 32,64 (default: as is)")
    ap.add_argument("--mma", default="", help="mma_scan.MMA_SCAN values to time, e.g. 1,0 (default: as is)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    copy = copy_bandwidth_gbs()
    hist_rows = [int(x) for x in args.hist_rows.split(",") if x] or [hk.HIST_MAX_ROWS]
    mma = [bool(int(x)) for x in args.mma.split(",") if x] or [ms.MMA_SCAN]
    knobs = [(bool(int(p)), int(m) or None, hr, mm) for p in args.prefetch.split(",") for m in args.maxnreg.split(",")
             for hr in hist_rows for mm in mma]
    out = dict(device=torch.cuda.get_device_name(), copy_GBps=copy, default_target=hk.TARGET_PROGRAMS, rows=[])
    print(f"{out['device']}: copy {copy:.0f} GB/s (read + write); default TARGET_PROGRAMS {hk.TARGET_PROGRAMS}")
    print(f"{'L':>7} {'B':>2} {'pf':>2} {'nreg':>4} {'hist':>4} {'mma':>3} {'target':>6} {'tiles/prog':>10} {'scan us':>8} {'%copy':>6} "
          f"{'scan+sel':>8} {'%copy':>6}")
    for L in args.lengths:
        for B in args.batches:
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
            nbt = hk.BLOCK_T // CHUNK
            # a read-only yardstick: torch's int32 sum over the same code bytes
            t_sum = cuda_time_us([lambda k=k: k.sum(dtype=torch.int32) for _, k in sets], reps=args.reps)
            out["rows"].append(dict(L=L, B=B, torch_sum_us=t_sum, code_bytes=nbytes))
            print(f"{L:>7} {B:>2} torch int32 sum of the codes: {t_sum:.1f} us, {100 * floor_us / t_sum:.0f}% of copy")
            tiles = B * HKV * math.ceil(nb / nbt)
            for (prefetch, maxnreg, hr, mm), target in [(kn, t) for kn in knobs for t in args.targets]:
                old = (hk.TARGET_PROGRAMS, getattr(hk, "SCAN_PREFETCH", None), getattr(hk, "SCAN_MAXNREG", None),
                       hk.HIST_MAX_ROWS)
                hk.TARGET_PROGRAMS, hk.SCAN_PREFETCH, hk.SCAN_MAXNREG, hk.HIST_MAX_ROWS = target, prefetch, maxnreg, hr
                old_mma = ms.MMA_SCAN, ms.MMA_TARGET_PROGRAMS
                ms.MMA_SCAN, ms.MMA_TARGET_PROGRAMS = mm, target
                tag = f"{L:>7} {B:>2} {int(prefetch):>2} {maxnreg or 0:>4} {hr:>4} {int(mm):>3} {target:>6}"
                try:
                    got = hamming_topk(q0, k0, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)
                    if not torch.equal(got, want):
                        print(f"{tag}  MISMATCH against the reference: not timed")
                        out["rows"].append(dict(L=L, B=B, target=target, prefetch=prefetch, maxnreg=maxnreg,
                                                hist_max_rows=hr, mma=mm, verified=False))
                        continue
                    t_scan = cuda_time_us([lambda q=q, k=k, n=lens: hk.block_keys_triton(q, k, n, CHUNK, "max")
                                           for q, k in sets], reps=args.reps)
                    t_sel = cuda_time_us([lambda q=q, k=k, n=lens, kb=kb: hamming_topk(q, k, n, k_blocks=kb, chunk_size=CHUNK,
                                                                        must_select=MUST) for q, k in sets],
                                         reps=args.reps)
                finally:
                    hk.TARGET_PROGRAMS, hk.SCAN_PREFETCH, hk.SCAN_MAXNREG, hk.HIST_MAX_ROWS = old
                    ms.MMA_SCAN, ms.MMA_TARGET_PROGRAMS = old_mma
                splits = max(1, min(math.ceil(target / (B * HKV)), math.ceil(nb / nbt)))
                per_prog = math.ceil(math.ceil(nb / splits) / nbt)
                row = dict(L=L, B=B, target=target, prefetch=prefetch, maxnreg=maxnreg, hist_max_rows=hr, mma=mm, tiles=tiles, tiles_per_program=per_prog, verified=True,
                           scan_us=t_scan, select_us=t_sel, code_bytes=nbytes, floor_us=floor_us,
                           scan_copy=floor_us / t_scan, select_copy=floor_us / t_sel)
                out["rows"].append(row)
                print(f"{tag} {per_prog:>10} {t_scan:8.1f} {100 * floor_us / t_scan:5.0f}% "
                      f"{t_sel:8.1f} {100 * floor_us / t_sel:5.0f}%", flush=True)
            del sets
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
