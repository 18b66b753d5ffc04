"""How fast can any kernel read the key codes that the decode step's scan reads? The floor of
issue 3's "scan + selection >= 80% of the copy bandwidth on the code bytes at 128K" target.

    python tools/experiments/read_floor.py [--lengths 131072] [--batches 1,8] [--json PATH]

For each (L, B) (8 kv heads, 128-bit codes: B * 8 * L * 16 bytes, 16.8 MB at 128K, B = 1) it
times, in one process and over enough code sets that nothing is found in L2:

* read-only Triton kernels that stream the codes and reduce them to one word a program (so no
  load is dead), swept over programs a launch (1-32 per SM, or one per 16 KB), warps (4, 8)
  and the loads a thread issues before its first use (1, 2, 4, 8 tiles of 16 bytes a thread);
* torch's int32 sum of the codes, and a copy of exactly those bytes (``dst.copy_(src)``: the
  copy bandwidth at this size, read + write);
* kvcomp's scan alone (``block_keys_triton``) and scan + selection (``hamming_topk``, the
  issue's number), selections checked against the reference first.

``--gather``: the same for the attention's bytes, the K and V rows of the selected blocks (2048
tokens a (sequence, kv-head): 16 blocks of 128 x 128 bf16, 64 KB of K + V a block): read-only
kernels over exactly those blocks (a program reads 1, 2 or 4 blocks' K and V, or half a block),
against ``sparse_decode_attention`` on the same selection (its output checked against the
reference first).

Every time is a CUDA-graph replay of back-to-back calls (``kvcomp.bench.timing.cuda_time_us``),
as ``kvcomp bench decode`` times. "%copy" = code bytes / time / the 2 GiB copy bandwidth (read +
write) measured in the same run, as the bench counts it. The best read-only kernel's %copy is
the most that scan + selection could reach at that size if it cost nothing beyond the read.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl
from kvcomp.bench.timing import copy_bandwidth_gbs, cuda_time_us, positive_ints

HKV, W, CHUNK, BUDGET = 8, 4, 128, 2048
MUST = (0, -1)
L2_BYTES = 60 << 20


@triton.jit
def _read_kernel(src, out, n_vec, PER_PROG, VEC_PER_THREAD_LOADS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p XOR-reduces int32x4 vectors [p * PER_PROG, (p + 1) * PER_PROG) of src (viewed
    as [n_vec, 4]), VEC_PER_THREAD_LOADS tiles of BLOCK vectors loaded before any is used."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * PER_PROG
    hi = tl.minimum(lo + PER_PROG, n_vec)
    acc = tl.zeros([BLOCK, 4], dtype=tl.int32)
    cols = tl.arange(0, 4)
    rows = tl.arange(0, BLOCK)
    step: tl.constexpr = BLOCK * VEC_PER_THREAD_LOADS
    for start in range(lo, hi, step):
        for u in tl.static_range(VEC_PER_THREAD_LOADS):
            r = start + u * BLOCK + rows
            x = tl.load(src + r[:, None] * 4 + cols[None, :], mask=(r < hi)[:, None], other=0)
            acc ^= x
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, 1), 0))


@triton.jit
def _gather_kernel(k_ptr, v_ptr, idx_ptr, out, K_SEL, s_kb, s_kh, s_kl, HKV: tl.constexpr,
                   BLOCKS: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
    """Program (r, j) XOR-reduces the K and V rows of selected blocks j * BLOCKS .. j * BLOCKS +
    BLOCKS - 1 of row r = b * HKV + h (idx [B * HKV, K_SEL]), ROWS token rows a load."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = r // HKV
    h = r % HKV
    acc = tl.zeros([ROWS, D], dtype=tl.int16)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, D)
    for u in tl.static_range(BLOCKS):
        blk = tl.load(idx_ptr + r * K_SEL + j * BLOCKS + u).to(tl.int64)
        base = b * s_kb + h * s_kh + (blk * CHUNK) * s_kl
        for t0 in tl.static_range(0, CHUNK, ROWS):
            off = base + (t0 + rows)[:, None] * s_kl + dims[None, :]
            acc ^= tl.load(k_ptr + off).to(tl.int16, bitcast=True)
            acc ^= tl.load(v_ptr + off).to(tl.int16, bitcast=True)
    tl.store(out + r * tl.num_programs(1) + j, tl.xor_sum(tl.xor_sum(acc, 1), 0).to(tl.int32))


def _read_variants(n_vec: int, sms: int):
    """(name, programs, vectors a program, loads before use, BLOCK, warps)."""
    out = []
    for warps in (4, 8):
        block = warps * 32  # one int32x4 vector a thread a tile
        for unroll in (1, 2, 4, 8):
            for per_sm in (1, 2, 4, 8, 16, 32):
                progs = sms * per_sm
                per = math.ceil(n_vec / progs)
                per = math.ceil(per / (block * unroll)) * block * unroll
                progs = math.ceil(n_vec / per)
                out.append((f"w{warps}_u{unroll}_{per_sm}/sm", progs, per, unroll, block, warps))
            per = 1024  # one 16 KB slice a program: many short programs
            per = math.ceil(per / (block * unroll)) * block * unroll
            out.append((f"w{warps}_u{unroll}_16KB", math.ceil(n_vec / per), per, unroll, block, warps))
    return out


def main() -> None:
    from kvcomp.ops import hamming_topk
    from kvcomp.ops.hamming_topk import kernels as hk
    from kvcomp.ops.hamming_topk.reference import (
        block_scores_ref,
        select_blocks_ref,
        token_scores_ref,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=positive_ints, default=[131072])
    ap.add_argument("--batches", type=positive_ints, default=[1, 8])
    ap.add_argument("--heads", type=int, default=32, help="query heads (8 kv heads)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--gather", action="store_true", help="also the selected K/V blocks (the attention's bytes)")
    ap.add_argument("--gather-blocks", type=positive_ints, default=[BUDGET // CHUNK],
                    help="selected blocks a row for --gather, e.g. 16,103,307 (2048 tokens, 10%%, 30%% of 128K)")
    ap.add_argument("--codes", type=int, default=1, help="0: skip the key codes part")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = "cuda"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    copy = copy_bandwidth_gbs()
    res = dict(device=torch.cuda.get_device_name(), sms=sms, copy_GBps=copy, rows=[])
    print(f"{res['device']} ({sms} SMs): copy {copy:.0f} GB/s (read + write, 2 GiB)")
    if args.gather:
        res["gather"] = []
        for L in args.lengths:
            for B in args.batches:
                for ksel in args.gather_blocks:
                    res["gather"].append(gather_floor(L, B, copy, args.reps, gen, ksel))
                    torch.cuda.empty_cache()
                torch.cuda.empty_cache()
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump(res, fh, indent=1)
    for L in args.lengths if args.codes else ():
        for B in args.batches:
            nbytes = B * HKV * L * W * 4
            n_sets = max(2, math.ceil(3 * L2_BYTES / nbytes))
            lens = torch.full((B,), L, dtype=torch.int32, device=dev)
            sets = [(torch.randint(-2**31, 2**31 - 1, (B, args.heads, W), device=dev, dtype=torch.int32, generator=gen),
                     torch.randint(-2**31, 2**31 - 1, (B, HKV, L, W), device=dev, dtype=torch.int32, generator=gen))
                    for _ in range(n_sets)]
            dsts = [torch.empty_like(k) for _, k in sets]
            floor_us = nbytes / (copy * 1e3)
            row = dict(L=L, B=B, code_bytes=nbytes, sets=n_sets, floor_us=floor_us, reads={})

            def pct(us, floor_us=floor_us):
                return 100.0 * floor_us / us

            kb = BUDGET // CHUNK
            q0, k0 = sets[0]
            want = select_blocks_ref(block_scores_ref(token_scores_ref(q0, k0), lens, CHUNK, "max"), lens,
                                     torch.full((B,), kb, dtype=torch.int32, device=dev), kb, CHUNK, MUST)
            got = hamming_topk(q0, k0, lens, k_blocks=kb, chunk_size=CHUNK, must_select=MUST)
            row["verified"] = bool(torch.equal(got, want))
            if not row["verified"]:
                print(f"L={L} B={B}: hamming_topk differs from the reference; not timed")
                res["rows"].append(row)
                continue
            row["scan_us"] = cuda_time_us([lambda q=q, k=k, n=lens: hk.block_keys_triton(q, k, n, CHUNK, "max")
                                           for q, k in sets], reps=args.reps)
            row["select_us"] = cuda_time_us([lambda q=q, k=k, n=lens, kb=kb: hamming_topk(q, k, n, k_blocks=kb, chunk_size=CHUNK,
                                                                           must_select=MUST) for q, k in sets],
                                            reps=args.reps)
            row["torch_sum_us"] = cuda_time_us([lambda k=k: k.sum(dtype=torch.int32) for _, k in sets], reps=args.reps)
            row["copy_same_bytes_us"] = cuda_time_us([lambda k=k, d=d: d.copy_(k) for (_, k), d in zip(sets, dsts)],
                                                     reps=args.reps)
            n_vec = nbytes // 16
            # every read kernel's XOR of all the words, against torch's, before it is timed
            ref = k0.view(-1, 4)
            ref_x = ref[:, 0]
            for c in range(1, 4):
                ref_x = ref_x ^ ref[:, c]
            ref_word = int(_xor_all(ref_x))
            print(f"L={L} B={B}: {nbytes / 1e6:.1f} MB of codes, {floor_us:.2f} us at the copy bandwidth; "
                  f"{n_sets} sets")
            for name, progs, per, unroll, block, warps in _read_variants(n_vec, sms):
                out = torch.empty(progs, dtype=torch.int32, device=dev)

                def launch(k, out=out, progs=progs, per=per, unroll=unroll, block=block, warps=warps, n_vec=n_vec):
                    _read_kernel[(progs,)](k, out, n_vec, per, VEC_PER_THREAD_LOADS=unroll, BLOCK=block,
                                           num_warps=warps)
                launch(k0)
                if int(_xor_all(out)) != ref_word:
                    print(f"  {name}: wrong XOR, not timed")
                    continue
                row["reads"][name] = cuda_time_us([lambda k=k: launch(k) for _, k in sets], reps=args.reps)
            best = min(row["reads"], key=row["reads"].get)
            row["best_read"] = best
            for label, us in [("scan (block_keys_triton)", row["scan_us"]), ("scan + selection (hamming_topk)",
                                                                               row["select_us"]),
                              ("torch int32 sum", row["torch_sum_us"]),
                              (f"best read-only kernel ({best})", row["reads"][best]),
                              ("copy of the same bytes (read + write)", row["copy_same_bytes_us"])]:
                print(f"  {label:<44} {us:7.2f} us  {pct(us):5.1f}% of copy")
            cp = row["copy_same_bytes_us"]
            print(f"  copy bandwidth at this size: {2 * nbytes / cp / 1e3:.0f} GB/s (read + write)")
            top = sorted(row["reads"].items(), key=lambda kv: kv[1])[:8]
            print("  fastest read variants: " + ", ".join(f"{n} {t:.2f}" for n, t in top))
            res["rows"].append(row)
            del sets, dsts
            torch.cuda.empty_cache()
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(res, fh, indent=1)


AK = "kvcomp.ops.sparse_decode_attention.kernels"
# launch knobs of the attention timed beside its default (``--gather``): programs a launch aims
# at (splits a row), pipeline stages, warps, the token tile
ATTN_VARIANTS = {
    # session 17, first call (B = 8 at 16 / 103 / 307 blocks, B = 1): t384, t512, t512_s1, t1024,
    # t1024_w8, t2048, t512_n128, s3 (decode.md "Session 17"); t512 fastest at B = 8, every budget
    "t264": dict(TARGET_PROGRAMS=264),
    "t384": dict(TARGET_PROGRAMS=384),
    "t512": dict(TARGET_PROGRAMS=512),
    "t768": dict(TARGET_PROGRAMS=768),
    "t1024": dict(TARGET_PROGRAMS=1024),
    "t512_w8": dict(TARGET_PROGRAMS=512, WARPS=8),
    "t512_s3": dict(TARGET_PROGRAMS=512, STAGES=3),
}


def gather_floor(L: int, B: int, copy: float, reps: int, gen, ksel: int = BUDGET // CHUNK) -> dict:
    """Read-only kernels over the selected blocks' K / V against the attention (module doc)."""
    import importlib

    from kvcomp.bench.timing import attention_close, attention_ref_fp64, attention_ref_lowp
    from kvcomp.ops import sparse_decode_attention

    dev, D, HQ, KSEL = "cuda", 128, 32, ksel
    kv_bytes = B * HKV * KSEL * CHUNK * D * 2 * 2
    n_sets = 2 if kv_bytes > L2_BYTES else max(2, math.ceil(3 * L2_BYTES / kv_bytes))
    sets = []
    for _ in range(n_sets):
        k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
        idx = torch.stack([torch.randperm(L // CHUNK, device=dev, generator=gen)[:KSEL] for _ in range(B * HKV)])
        idx = idx.sort(-1).values.to(torch.int32).view(B, HKV, KSEL)
        q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
        sets.append((q, k, v, idx))
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    q, k, v, idx = sets[0]
    mask = torch.zeros(B, HKV, L, dtype=torch.bool, device=dev)
    tok = (idx.long().unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=dev)).flatten(2)
    mask.scatter_(2, tok, True)
    got = sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK)
    ok, _, _ = attention_close(got, attention_ref_fp64(q, k, v, mask, D ** -0.5),
                               attention_ref_lowp(q, k, v, mask, D ** -0.5))
    row = dict(L=L, B=B, blocks=KSEL, kv_bytes=kv_bytes, sets=n_sets, attention_verified=bool(ok), reads={},
               attention_variants={})
    floor_us = kv_bytes / (copy * 1e3)
    print(f"gather L={L} B={B} {KSEL} blocks: {kv_bytes / 1e6:.1f} MB of selected K/V, {floor_us:.2f} us at the "
          f"copy bandwidth")
    calls = [lambda q=q, k=k, v=v, i=idx: sparse_decode_attention(q, k, v, i, lens, chunk_size=CHUNK)
             for q, k, v, idx in sets]
    if ok:
        row["attention_us"] = cuda_time_us(calls, reps=reps)
        ak = importlib.import_module(AK)
        for name, flags in ATTN_VARIANTS.items():
            undo = {f: getattr(ak, f) for f in flags}
            try:
                for f, val in flags.items():
                    setattr(ak, f, val)
                same = attention_close(sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK),
                                       attention_ref_fp64(q, k, v, mask, D ** -0.5),
                                       attention_ref_lowp(q, k, v, mask, D ** -0.5))[0]
                row["attention_variants"][name] = cuda_time_us(calls, reps=reps) if same else "wrong"
            finally:
                for f, val in undo.items():
                    setattr(ak, f, val)
        print("  attention variants: default {:.2f}, ".format(row["attention_us"]) + ", ".join(
            f"{n} {t:.2f}" if isinstance(t, float) else f"{n} {t}" for n, t in row["attention_variants"].items()))
    ref_x = None
    for blocks, rows_, warps in [(1, 32, 4), (1, 64, 4), (1, 128, 8), (2, 64, 4), (4, 64, 4), (1, 32, 8)]:
        if KSEL % blocks:
            continue
        name = f"{blocks}blk_{rows_}rows_w{warps}"
        out = torch.empty(B * HKV * (KSEL // blocks), dtype=torch.int32, device=dev)

        def launch(k, v, i, out=out, blocks=blocks, rows_=rows_, warps=warps):
            _gather_kernel[(B * HKV, KSEL // blocks)](k, v, i, out, KSEL, k.stride(0), k.stride(1), k.stride(2),
                                                     HKV=HKV, BLOCKS=blocks, ROWS=rows_, CHUNK=CHUNK, D=D,
                                                     num_warps=warps)
        launch(k, v, idx)
        word = int(_xor_all(out))
        if ref_x is None:
            ref_x = word
        elif word != ref_x:
            print(f"  {name}: XOR differs from the first variant's, not timed")
            continue
        row["reads"][name] = cuda_time_us([lambda k=k, v=v, i=idx: launch(k, v, i) for _, k, v, idx in sets],
                                          reps=reps)
    best = min(row["reads"], key=row["reads"].get)
    row["best_read"] = best
    for label, us in [(f"best gather read ({best})", row["reads"][best])] + (
            [("sparse_decode_attention", row["attention_us"])] if ok else []):
        print(f"  {label:<44} {us:7.2f} us  {100 * floor_us / us:5.1f}% of copy")
    print("  gather variants: " + ", ".join(f"{n} {t:.2f}" for n, t in sorted(row["reads"].items(), key=lambda kv: kv[1])))
    return row


def _xor_all(x: torch.Tensor) -> torch.Tensor:
    """XOR of every element of an int32 tensor (torch has no xor reduction)."""
    x = x.flatten()
    while x.numel() > 1:
        if x.numel() % 2:
            x = torch.cat([x, x.new_zeros(1)])
        x = x[0::2] ^ x[1::2]
    return x[0]


if __name__ == "__main__":
    main()
