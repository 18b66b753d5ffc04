"""Where does the host time of an eager kvcomp decode step go? (issues 6 and 9)

An 8-layer Qwen3-8B-shaped model (2 dense + 6 sparse layers), an in-HBM kvcomp cache filled
with L random rows at B = 1, then eager greedy steps (as ``model.generate`` runs them without
``handle.compile_decode()``): wall time per step for kvcomp and for the same cache with kvcomp
disabled (transformers' sdpa), then cProfile of kvcomp steps (functions by own time and by
cumulative time). On a GPU eager decoding is host-bound: this shows which Python costs what.

    python tools/experiments/eager_overhead.py [L]      (default 131072; CUDA)
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import kvcomp
import torch
from kvcomp.bench.offload import QWEN3_8B, TAIL, _cache_kw, _step, build_model, fill, kvcomp_config
from torch.nn.attention import SDPBackend, sdpa_kernel


def steps(model, cache, tok, kw, n):
    for _ in range(n):
        tok = _step(model, cache, tok, kw).argmax(-1, keepdim=True)
    return tok


def timed(model, cache, tok, kw, n=10):
    tok = steps(model, cache, tok, kw, 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tok = steps(model, cache, tok, kw, n)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3, tok


def main():
    L = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    dev = torch.device("cuda")
    n = 8
    model = build_model(QWEN3_8B, n, dev, torch.bfloat16)
    cfg = kvcomp_config(n, QWEN3_8B["head_dim"], 2048)
    kw = _cache_kw(model)
    H, D = QWEN3_8B["num_key_value_heads"], QWEN3_8B["head_dim"]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        handle = kvcomp.enable(model, cfg)
        cache = handle.new_cache()
        fill(cache, n, 1, L - TAIL, H, D, dev, torch.bfloat16)
        tok = torch.randint(1, 1000, (1, 1), device=dev)
        ms, tok = timed(model, cache, tok, kw)
        print(f"kvcomp eager step: {ms:.2f} ms ({n} layers, L={L}, B=1)")
        prof = cProfile.Profile()
        prof.enable()
        tok = steps(model, cache, tok, kw, 5)
        torch.cuda.synchronize()
        prof.disable()
        handle.disable()
        ms_d, _ = timed(model, cache, tok, kw)
        print(f"dense eager step (kvcomp disabled, same cache): {ms_d:.2f} ms")
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
