"""Per-kernel device times of the selection and the decode step, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -o $OUT/sel \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,\\
launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active \\
        python3 tools/experiments/select_profile.py [--heads 32,64] [--batches 1,8]
        [--variants default,step4,late]
    ncu --import $OUT/sel.ncu-rep --csv --page raw --print-units base > $OUT/sel.csv
    python3 tools/experiments/select_profile.py --parse $OUT/sel.csv

Under ncu every kernel runs alone with cold caches, so each kernel's time is its own (no PDL
overlap, no launch gaps): what the scan, stage 2 and the attention (with its stage-2 prologue)
take, and how far each is from the time its bytes need. Shapes: 8 kv heads, 128-bit codes,
head_dim 128, chunk 128, 128K tokens, 2048-token budget, random codes and bf16 K/V. Every
configuration's selection is checked against the reference before it is profiled. Before each
configuration a marker kernel runs with a grid of (index + 1) programs; ``--parse`` groups the
report's kernels by it. Yardsticks profiled the same way: torch's int32 sum of the codes and an
elementwise copy of them (``torch.add(codes, 0, out=dst)``: one read and one write).
``attend``: the attention alone on a selection made beforehand (no stage-2 prologue), against
``decode_step``'s attention kernel, which runs stage 2 in its prologue. Variants (``VARIANTS``):
the defaults, the histogram's bins of 4 scores (``HIST_STEP4``), the tensor-core scan's first
tile loaded in its loop (``MMA_FIRST_EARLY`` off).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict

L, HKV, W, D, CHUNK, BUDGET = 131072, 8, 4, 128, 128, 2048
MUST = (0, -2, -1)
CALLS = 3
HK, MS = "kvcomp.ops.hamming_topk.kernels", "kvcomp.ops.hamming_topk.mma_scan"
# variant -> {module: {flag: value}} (``kvcomp.bench.decode._module_flags``)
VARIANTS = {
    "default": {},
    "step4": {HK: dict(HIST_STEP4=True)},
    "late": {MS: dict(MMA_FIRST_EARLY=False)},
}


def _configs(heads, batches, variants):
    cfgs = []
    for hq in heads:
        for b in batches:
            cfgs.append(("sum", hq, b, None))
            cfgs.append(("copy", hq, b, None))
            cfgs.append(("attend", hq, b, "default"))
            for var in variants:
                cfgs.append(("hamming_topk", hq, b, var))
                cfgs.append(("decode_step", hq, b, var))
    return cfgs


def run(args) -> None:
    import torch
    import triton
    import triton.language as tl
    from kvcomp.bench.decode import _module_flags
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step
    from kvcomp.ops.hamming_topk.reference import (
        block_scores_ref,
        select_blocks_ref,
        token_scores_ref,
    )

    @triton.jit
    def _marker_kernel(p):
        tl.store(p + tl.program_id(0), 1)

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    mark = torch.zeros(64, dtype=torch.int32, device=dev)
    cfgs = _configs(args.heads, args.batches, args.variants)
    kb = BUDGET // CHUNK
    cudart = torch.cuda.cudart()
    for i, (op, hq, b, var) in enumerate(cfgs):
        with _module_flags(VARIANTS[var] if var else {}):  # the variant's flags for this config only
            lens = torch.full((b,), L, dtype=torch.int32, device=dev)
            codes = torch.randint(-2**31, 2**31 - 1, (b, HKV, L, W), device=dev, dtype=torch.int32, generator=gen)
            if op in ("sum", "copy"):
                dst = torch.empty_like(codes)
                def fn(op=op, codes=codes, dst=dst):
                    return codes.sum(dtype=torch.int32) if op == "sum" else torch.add(codes, 0, out=dst)
            else:
                q = torch.randn(b, hq, D, device=dev, dtype=torch.bfloat16, generator=gen)
                q_w = torch.randn(hq, D, 32 * W, device=dev, dtype=torch.float32, generator=gen)
                needs_kv = op in ("decode_step", "attend")
                k = torch.randn(b, HKV, L, D, device=dev, dtype=torch.bfloat16, generator=gen) if needs_kv else None
                v = torch.randn_like(k) if k is not None else None
                q_codes = hash_encode(q, q_w)
                want = select_blocks_ref(block_scores_ref(token_scores_ref(q_codes, codes), lens, CHUNK, "max"), lens,
                                         torch.full((b,), kb, dtype=torch.int32, device=dev), kb, CHUNK, MUST)
                if op == "hamming_topk":
                    def fn(q_codes=q_codes, codes=codes, lens=lens):
                        return hamming_topk(q_codes, codes, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)
                elif op == "attend":  # the attention alone, on a selection made beforehand (no prologue)
                    idx = hamming_topk(q_codes, codes, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)

                    def fn(q=q, k=k, v=v, idx=idx, lens=lens):
                        sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK)
                        return idx
                else:
                    def fn(q=q, q_w=q_w, codes=codes, k=k, v=v, lens=lens):
                        return decode_step(q, q_w, codes, k, v, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)[1]
                got = fn()
                ok = torch.equal(got, want)
                print(f"config {i}: {op} Hq={hq} B={b} {var}: selection {'equal to' if ok else 'DIFFERS from'} "
                      "the reference", flush=True)
                if not ok:
                    continue
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            _marker_kernel[(i + 1,)](mark)
            for _ in range(CALLS):
                fn()
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
            del codes
            torch.cuda.empty_cache()


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def parse(args) -> None:
    cfgs = _configs(args.heads, args.batches, args.variants)
    rows = list(csv.DictReader(open(args.parse)))
    rows = [r for r in rows if r.get("ID", "").isdigit()]  # the units row has no ID
    times = defaultdict(list)  # (config, kernel) -> [us]
    extra = {}
    cur = None
    for r in rows:
        name = r["Kernel Name"]
        if "_marker_kernel" in name:
            cur = int(_num(r["launch__grid_size"])) - 1
            continue
        if cur is None:
            continue
        key = (cur, name[:48])
        times[key].append(_num(r["gpu__time_duration.sum"]) / 1e3)  # ns -> us (--print-units base)
        extra[key] = (r["dram__bytes_read.sum"], r["launch__registers_per_thread"], r["launch__grid_size"],
                      r["sm__warps_active.avg.pct_of_peak_sustained_active"])
    print(f"{'op':<13} {'Hq':>3} {'B':>2} {'variant':>7} {'kernel':<48} {'us':>7} {'dram read':>12} {'regs':>4} "
          f"{'grid':>7} {'occ%':>5}")
    for (c, name), ts in sorted(times.items()):
        op, hq, b, var = cfgs[c]
        dr, regs, grid, occ = extra[(c, name)]
        print(f"{op:<13} {hq:>3} {b:>2} {str(var):>7} {name:<48} {statistics.median(ts):7.2f} {dr:>12} {regs:>4} "
              f"{grid:>7} {occ:>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="32,64")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--variants", default="default,step4,late", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--parse", default=None, help="an ncu --csv --page raw report of this script's run")
    args = ap.parse_args()
    args.heads = [int(x) for x in args.heads.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.variants = args.variants.split(",")
    if any(v not in VARIANTS for v in args.variants):
        ap.error(f"--variants: each of {', '.join(VARIANTS)}")
    if args.parse:
        parse(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
