"""Where a verify step's time goes (T new tokens a sequence): each stage of ``decode_step`` timed
alone beside the whole step, per T (GPU only; ``kvcomp bench verify`` times only the step).

    python tools/experiments/verify_stages.py [--length 131072] [--batch 8] [--q-lens 1,4,8]

Stages, as ``decode_step`` runs them for q [B, Hq, T, D]: the query codes (``hash_encode``,
one row a (head, query)), the selection (``hamming_topk`` over the G x T rows of a kv-head, run
as its own launches here), the attention (``sparse_decode_attention`` over that selection). The
sum exceeds the step, whose kernels overlap under PDL and which runs the selection's stage 2 in
the attention's prologue. Qwen3-8B geometry, 2048 tokens, chunk 128, CUDA events, input sets
rotated past the L2 (``kvcomp.bench.decode.kv_input_sets``).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch


def main() -> None:
    from kvcomp.bench.decode import (
        CHUNK,
        HEAD_DIM,
        MODELS,
        MUST_SELECT,
        kv_input_sets,
        touched_bytes,
    )
    from kvcomp.bench.timing import cuda_time_us
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step

    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--q-lens", default="1,4,8")
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    L, B, kb, Hq = a.length, a.batch, 2048 // CHUNK, MODELS["qwen3-8b"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_w, sets = kv_input_sets(B, L, gen, touched=touched_bytes(B, L, ["2048"]))
    lens = sets[0]["lens"]
    scale = 1 / math.sqrt(HEAD_DIM)
    kw = dict(k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT)
    print(f"B = {B}, L = {L}, 2048 tokens, {len(sets)} input sets; us")
    print(f"{'T':>3} {'encode':>8} {'select':>8} {'attend':>8} {'step':>8}")
    for T in [int(t) for t in a.q_lens.split(",")]:
        qs = [torch.randn(B, Hq, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in sets]
        codes = [hash_encode(q, kv_w, enable_gqa=True).reshape(B, Hq * T, -1) for q in qs]
        idx = [hamming_topk(c, st["codes"], lens, **kw) for c, st in zip(codes, sets)]
        t_enc = cuda_time_us([functools.partial(hash_encode, q, kv_w, enable_gqa=True) for q in qs], reps=a.reps)
        t_sel = cuda_time_us([functools.partial(hamming_topk, c, st["codes"], lens, **kw)
                              for c, st in zip(codes, sets)], reps=a.reps)
        t_att = cuda_time_us([functools.partial(sparse_decode_attention, q, st["k"], st["v"], i, lens,
                                                chunk_size=CHUNK, scale=scale) for q, st, i in zip(qs, sets, idx)],
                             reps=a.reps)
        t_step = cuda_time_us([functools.partial(decode_step, q, kv_w, st["codes"], st["k"], st["v"], lens,
                                                 scale=scale, **kw) for q, st in zip(qs, sets)], reps=a.reps)
        print(f"{T:>3} {t_enc:8.1f} {t_sel:8.1f} {t_att:8.1f} {t_step:8.1f}", flush=True)
        del qs, codes, idx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
