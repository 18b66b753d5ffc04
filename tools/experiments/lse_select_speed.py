"""GPU experiment: what ``chunk_repre="lse"`` costs in the selection, against "max", same run.

Qwen3-8B geometry (32 query / 8 kv-heads, d 128, 128-bit codes, chunk 128, 2048-token budget),
``token_score="centered_norm"`` (codes of k - mu, fp16 key norms) at L = 128K, B = 1 and 8:
``hamming_topk`` with "max" (the default) and with "lse" (one sine and one exp per token more in
the scan, float block keys: the threshold search instead of the histogram), each verified
against the reference first ("lse": equal up to blocks within rounding of the threshold).

    source tools/gpu_env.sh && python tools/experiments/lse_select_speed.py
"""

from __future__ import annotations

import functools
import math

import torch


def main() -> None:
    from kvcomp.bench.decode import CHUNK, HKV, MUST_SELECT, kv_input_sets
    from kvcomp.bench.timing import cuda_time_us
    from kvcomp.ops import hamming_topk, hash_encode
    from kvcomp.ops.hamming_topk.reference import block_scores_ref, lse_logits_ref, token_scores_ref
    from kvcomp.ops.query_codes import lse_query_scale

    gen = torch.Generator(device="cuda").manual_seed(0)
    L, kb = 131072, 2048 // CHUNK
    print("| B | select max us | select lse us | lse / max | verified |")
    print("|---|---|---|---|---|")
    for B in (1, 8):
        kv_w, sets = kv_input_sets(B, L, gen, centered=True)
        q_w = kv_w.repeat_interleave(4, 0)
        qs = [torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in sets]
        codes = [hash_encode(q, q_w) for q in qs]
        scales = [lse_query_scale(q, HKV) for q in qs]
        kw = dict(k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT)
        st = sets[0]
        got = hamming_topk(codes[0], st["codes"], st["lens"], chunk_repre="lse", q_scale=scales[0],
                           k_scale=st["scale"], **kw)
        want = hamming_topk(codes[0], st["codes"], st["lens"], chunk_repre="lse", q_scale=scales[0],
                            k_scale=st["scale"], backend="reference", **kw)
        same = bool(torch.equal(got, want))
        if not same:  # allowed only between blocks whose scores are within rounding
            sc = block_scores_ref(lse_logits_ref(token_scores_ref(codes[0], st["codes"]), 4 * 128, scales[0],
                                                 st["scale"]), st["lens"], CHUNK, "lse")
            rows_ok = []
            for b in range(B):
                for h in range(HKV):
                    a, r = set(got[b, h].tolist()) - {-1}, set(want[b, h].tolist()) - {-1}
                    thr = min((float(sc[b, h, i]) for i in r - a), default=math.inf)
                    rows_ok.append(all(float(sc[b, h, i]) >= thr - 1e-4 * float(sc[b, h].abs().max())
                                       for i in a - r))
            same = all(rows_ok)
        t = {}
        for repre in ("max", "lse"):
            calls = []
            for i, s in enumerate(sets):
                extra = dict(chunk_repre="lse", q_scale=scales[i]) if repre == "lse" else {}
                calls.append(functools.partial(hamming_topk, codes[i], s["codes"], s["lens"], k_scale=s["scale"],
                                               **kw, **extra))
            t[repre] = cuda_time_us(calls, reps=50)
        print(f"| {B} | {t['max']:.1f} | {t['lse']:.1f} | {t['lse'] / t['max']:.2f} | {same} |", flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
