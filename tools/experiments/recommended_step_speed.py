"""GPU experiment: what the accuracy recommendation of issue 8 costs in a decode step.

Qwen3-8B geometry (32 query / 8 kv-heads, d 128), L = 128K, chunk 128, 2048-token budget,
B = 1 and 8. ``decode_step`` with (a) the speed default: Hamming scores, "max" blocks, 128-bit
codes; (b) the accuracy recommendation: centred codes with fp16 key norms (``k_scale``) and
"lse" blocks, at 128 and 256 bits. Times are CUDA-graph replays of back-to-back steps rotating
over input sets (``kvcomp.bench.timing.cuda_time_us``); dense = SDPA on the same K/V.

Verified first: "max" selections equal the pure-torch reference exactly (with and without key
norms); "lse" selections are compared by the share of equal block indices (float sums: blocks
within rounding of the threshold may differ, tests/core/test_block_lse.py); the step's
attention equals ``sparse_decode_attention`` over its own selection. Each "lse" row is timed
again with the query scale from ``lse_query_scale``'s torch ops before the scan (the code of
session 7, ``hamming_topk.kernels.QS_IN_SCAN = False``) instead of inside the scan.

    source tools/gpu_env.sh && python tools/experiments/recommended_step_speed.py
"""

from __future__ import annotations

import functools

import torch


def main(smoke: bool = False) -> None:
    """smoke: a CPU run of the checks at a short length (the reference backend), no timing."""
    from kvcomp.bench.decode import _flags
    from kvcomp.bench.timing import cuda_time_us
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step
    from kvcomp.ops.query_codes import lse_query_scale

    dev, L, Hq, Hkv, D, chunk, kb = "cuda", 131072, 32, 8, 128, 128, 16
    if smoke:
        dev, L = "cpu", 4096
        cuda_time_us = lambda fns, reps: 1.0  # noqa: E731 - no timing on the CPU
    gen = torch.Generator(device=dev).manual_seed(0)
    print("| B | bits | selection | step us | dense us | speedup | selection check |")
    print("|---|---|---|---|---|---|---|")
    for B in (1, 8):
        n_sets = 4 if B == 1 else 1
        sets = []
        for _ in range(n_sets):
            k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
            q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16, generator=gen)
            sets.append(dict(k=k, v=v, q=q, lens=torch.full((B,), L, dtype=torch.int32, device=dev),
                             norms=(torch.rand(B, Hkv, L, device=dev, generator=gen) + 0.5).half()))
        dense = [functools.partial(torch.nn.functional.scaled_dot_product_attention, s["q"].unsqueeze(2),
                                   s["k"], s["v"], enable_gqa=True) for s in sets]
        t_dense = cuda_time_us(dense, reps=30)
        for bits, repre, scaled in ((128, "max", False), (128, "lse", True), (256, "lse", True),
                                    (256, "max", False)):
            kv_w = torch.linalg.qr(torch.randn(Hkv, D, D, device=dev, generator=gen))[0]
            kv_w = torch.cat([kv_w, torch.linalg.qr(torch.randn(Hkv, D, D, device=dev, generator=gen))[0]],
                             -1)[..., :bits].contiguous()
            q_w = kv_w.repeat_interleave(Hq // Hkv, 0)
            for s in sets:
                s["codes"] = hash_encode(s["k"], kv_w)
            kw = dict(k_blocks=kb, chunk_size=chunk, must_select=(0, -2, -1), chunk_repre=repre)
            s = sets[0]
            k_scale = s["norms"] if scaled else None
            out, idx = decode_step(s["q"], q_w, s["codes"], s["k"], s["v"], s["lens"], k_scale=k_scale, **kw)
            q_codes = hash_encode(s["q"], q_w)
            q_scale = lse_query_scale(s["q"], Hkv) if repre == "lse" else None
            want = hamming_topk(q_codes, s["codes"], s["lens"], k_scale=k_scale, q_scale=q_scale,
                                backend="reference", **{k: v for k, v in kw.items()})
            agree = float((torch.sort(idx, -1).values == torch.sort(want, -1).values).float().mean())
            att = sparse_decode_attention(s["q"], s["k"], s["v"], idx, s["lens"], chunk_size=chunk)
            ok = (agree == 1.0 or repre == "lse" and agree > 0.98) and torch.equal(att, out)
            if not ok:
                print(f"| {B} | {bits} | {repre} | VERIFICATION FAILED (agree {agree:.4f}) | | | |")
                continue
            steps = [functools.partial(decode_step, st["q"], q_w, st["codes"], st["k"], st["v"], st["lens"],
                                       k_scale=st["norms"] if scaled else None, **kw) for st in sets]
            t = cuda_time_us(steps, reps=30)
            name = f"{repre}{' + key norms' if scaled else ''}"
            print(f"| {B} | {bits} | {name} | {t:.1f} | {t_dense:.1f} | {t_dense / t:.2f}x | "
                  f"{'equal' if agree == 1.0 else f'{100 * agree:.2f}% equal'} |", flush=True)
            if repre == "lse":  # q_scale by lse_query_scale's torch ops before the scan (session 7)
                with _flags("kvcomp.ops.hamming_topk.kernels", QS_IN_SCAN=False):
                    t_old = cuda_time_us(steps, reps=30)
                print(f"| {B} | {bits} | {name}, q_scale by torch ops | {t_old:.1f} | {t_dense:.1f} | "
                      f"{t_dense / t_old:.2f}x | |", flush=True)
        del sets
        torch.cuda.empty_cache()
    print(f"L {L}, 2048 tokens, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")


if __name__ == "__main__":
    import sys

    main(smoke="--smoke" in sys.argv)
