"""``kvcomp bench verify``: a speculative-decoding verify step (T new tokens) against dense.

A verify step (``kvcomp.attention.is_verify_step``) attends T new tokens per sequence with one
selection per kv-head, made from its G x T (head, query) rows: ``decode_step`` with q
[B, Hq, T, D], attention causal among the new tokens. Its byte floor is a decode step's (the
codes and the selected K/V are read once for the T queries); the popcount work of the scan and
the attention FLOPs grow with T.

Per (L, B, T, budget), Qwen3-8B geometry (32 query / 8 kv-heads, head_dim 128; ``--models``
adds Qwen3-32B), bf16, chunk 128, 128-bit codes, must-select (0, -2, -1), it verifies, then
times (CUDA events, median of CUDA-graph replays, input sets rotated past the L2):

    step      decode_step, T queries per sequence
    dense_kv  the same attention kernel over every block (kvcomp's own dense decode, T queries)
    sdpa      torch scaled_dot_product_attention with a lower-right causal mask
              (``torch.nn.attention.bias.causal_lower_right``) over the whole cache, when a
              backend runs it
    per_tok   step / (T x the T = 1 step of the same L, B, budget): what verifying a token costs
              against decoding it alone (T = 1 is measured first in every run)

Speedups are against the faster of dense_kv and sdpa. Verification (a failure prints no
speedup and exits 1): the selection equal (torch.equal) to the pure-torch reference on the same
query codes; every query t within flash-attention's rule of an fp64 attention over its
selected tokens before ``seq_len - T + t + 1``; dense_kv and sdpa the same way over every token.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch

from kvcomp.bench.decode import (
    BITS,
    CHUNK,
    HEAD_DIM,
    HKV,
    MODELS,
    MUST_SELECT,
    kv_input_sets,
    touched_bytes,
)
from kvcomp.bench.timing import (
    attention_close,
    attention_ref_fp64,
    attention_ref_lowp,
    copy_bandwidth_gbs,
    cuda_time_us,
    kernel_bench_refusal,
    positive_ints,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    p.add_argument("--lengths", type=positive_ints, default=[32768, 131072],
                   help="comma-separated context lengths (default 32768,131072)")
    p.add_argument("--batches", type=positive_ints, default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--q-lens", type=positive_ints, default=[1, 2, 4, 8],
                   help="new tokens per verify step (default 1,2,4,8; 1 = a decode step)")
    p.add_argument("--budgets", default="2048,10%", help="tokens or percent (default 2048,10%%)")
    p.add_argument("--models", default="qwen3-8b", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement")


def blocks_for(budget: str, n_blocks: int) -> int:
    """A budget ("2048" tokens or "10%" of the blocks) -> blocks to select, <= n_blocks."""
    if budget.endswith("%"):
        k = math.ceil(float(budget[:-1]) / 100 * n_blocks)
    else:
        k = math.ceil(int(budget) / CHUNK)
    return min(max(1, k), n_blocks)


def causal_token_mask(idx: torch.Tensor | None, lens: torch.Tensor, L: int, T: int, t: int,
                      chunk: int) -> torch.Tensor:
    """bool [B, Hkv, L]: the tokens query t of a T-token step attends to (selected blocks of
    ``idx`` [B, Hkv, K], or every block when None, and token < lens - T + t + 1)."""
    from kvcomp.ops._blocks import selected_token_mask

    lim = lens.to(torch.long) - (T - 1 - t)
    if idx is None:
        return (torch.arange(L, device=lens.device).view(1, 1, L) < lim.view(-1, 1, 1)).expand(-1, HKV, -1)
    return selected_token_mask(idx, lim, L, chunk)


def check_queries(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  idx: torch.Tensor | None, lens: torch.Tensor, chunk: int, scale: float) -> tuple[bool, float]:
    """Every query t of out / q [B, Hq, T, D] against fp64 attention over its tokens
    (flash-attention's rule, atol 1e-4); returns (all ok, the largest error)."""
    T, L = q.shape[2], k.shape[2]
    ok_all, worst = True, 0.0
    for t in range(T):
        mask = causal_token_mask(idx, lens, L, T, t, chunk)
        qt = q[:, :, t].contiguous()
        ok, err, _ = attention_close(out[:, :, t], attention_ref_fp64(qt, k, v, mask, scale),
                                     attention_ref_lowp(qt, k, v, mask, scale), atol=1e-4)
        ok_all, worst = ok_all and ok, max(worst, err)
    return ok_all, worst


def check_verify_step(q, q_w, k_codes, k, v, lens, kb: int, chunk: int = CHUNK,
                      must_select=MUST_SELECT, backend: str = "auto") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Run ``decode_step`` on q [B, Hq, T, D] and check it: the selection against the reference
    on the same query codes, each query's output against fp64. Returns (checks, out, idx)."""
    from kvcomp.ops import hamming_topk, hash_encode
    from kvcomp.ops.decode_step import decode_step

    B, Hq, T, D = q.shape
    scale = 1 / math.sqrt(D)
    out, idx = decode_step(q, q_w, k_codes, k, v, lens, k_blocks=kb, chunk_size=chunk,
                           must_select=must_select, scale=scale, backend=backend)
    codes = hash_encode(q, q_w, enable_gqa=q_w.shape[0] != Hq, backend=backend).reshape(B, Hq * T, -1)
    want = hamming_topk(codes, k_codes, lens, k_blocks=kb, chunk_size=chunk, must_select=must_select,
                        backend="reference")
    ok, err = check_queries(out, q, k, v, idx, lens, chunk, scale)
    return {"select": bool(torch.equal(idx, want)), "attend": ok}, out, idx


def _sdpa_fn(q, k, v):
    """SDPA over the whole cache with the lower-right causal mask -> (fn, backend name), or
    (None, reason) when no backend runs it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(q.shape[2], k.shape[2])
    F = torch.nn.functional
    err = ""
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        try:
            fn()
            return fn, backend.name
        except RuntimeError as e:
            err = str(e).splitlines()[0]
    return None, err


def run_shape(L: int, B: int, cfg: dict, reps: int, gen) -> list[dict]:
    from kvcomp.ops import sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step

    dev = "cuda"
    # enough sets that what a kvcomp step reads (codes, selected K/V) leaves L2 (decode.py)
    kv_w, sets = kv_input_sets(B, L, gen, touched=touched_bytes(B, L, cfg["budgets"]))
    lens, n_sets = sets[0]["lens"], len(sets)
    n_blocks = math.ceil(L / CHUNK)
    all_blocks = torch.arange(n_blocks, device=dev, dtype=torch.int32).view(1, 1, -1).expand(B, HKV, -1).contiguous()
    scale = 1 / math.sqrt(HEAD_DIM)
    rows, step1 = [], {}
    for model in cfg["models"]:
        Hq = MODELS[model]
        q_w = kv_w  # [Hkv, D, BITS]: query head j hashed with row j // G, as the integration does
        for T in cfg["q_lens"]:
            qs = [torch.randn(B, Hq, T, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
                  for _ in sets]
            q, s0 = qs[0], sets[0]
            dense = [functools.partial(sparse_decode_attention, qs[i], st["k"], st["v"], all_blocks, lens,
                                       chunk_size=CHUNK, scale=scale) for i, st in enumerate(sets)]
            dense_ok, _ = check_queries(dense[0](), q, s0["k"], s0["v"], None, lens, CHUNK, scale)
            sdpa = [_sdpa_fn(qs[i], st["k"], st["v"]) for i, st in enumerate(sets)]
            sdpa_backend = sdpa[0][1]
            sdpa_ok = sdpa[0][0] is not None and check_queries(
                sdpa[0][0](), q, s0["k"], s0["v"], None, lens, CHUNK, scale)[0]
            t_dense = cuda_time_us(dense, reps=reps) if dense_ok else float("nan")
            t_sdpa = cuda_time_us([f for f, _ in sdpa], reps=reps) if sdpa_ok else float("nan")
            for budget in cfg["budgets"]:
                kb = blocks_for(budget, n_blocks)
                checks, _, idx = check_verify_step(q, q_w, s0["codes"], s0["k"], s0["v"], lens, kb)
                checks["dense_kv"] = dense_ok
                row = dict(model=model, Hq=Hq, Hkv=HKV, D=HEAD_DIM, L=L, B=B, T=T, budget=budget,
                           k_blocks=kb, sdpa_backend=sdpa_backend, sdpa_verified=sdpa_ok,
                           input_sets=n_sets, checks=checks, verified=all(checks.values()))
                if row["verified"]:
                    steps = [functools.partial(decode_step, qs[i], q_w, st["codes"], st["k"], st["v"], lens,
                                               k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT,
                                               scale=scale) for i, st in enumerate(sets)]
                    t_step = cuda_time_us(steps, reps=reps)
                    if T == 1:
                        step1[(model, budget)] = t_step
                    base = min(t for t in (t_dense, t_sdpa) if t == t)
                    one = step1.get((model, budget))
                    kv_bytes = B * HKV * kb * CHUNK * HEAD_DIM * 2 * 2
                    code_bytes = B * HKV * L * BITS // 8
                    row.update(times_us=dict(step=t_step, dense_kv=t_dense, sdpa=t_sdpa),
                               speedup=base / t_step, speedup_dense_kv=t_dense / t_step,
                               per_token=(t_step / (T * one)) if one else None,
                               floor_speedup=(2 * B * HKV * L * HEAD_DIM * 2) / (kv_bytes + code_bytes))
                rows.append(row)
            del qs
        torch.cuda.empty_cache()
    return rows


def _line(r: dict) -> str:
    head = f"{r['model']:<10} {r['L']:>6} {r['B']:>2} {r['T']:>2} {r['budget']:>6}"
    if not r["verified"]:
        failed = [n for n, ok in r["checks"].items() if not ok]
        return f"{head} VERIFICATION FAILED ({', '.join(failed)}): no speedup reported"
    t = r["times_us"]
    per = f"{r['per_token']:.2f}" if r["per_token"] is not None else "-"
    return (f"{head} {t['step']:8.1f} {t['dense_kv']:9.1f} {t['sdpa']:9.1f} {r['speedup']:7.2f} "
            f"{r['speedup_dense_kv']:7.2f} {per:>7} {r['floor_speedup']:6.1f}")


HEAD = (f"{'model':<10} {'L':>6} {'B':>2} {'T':>2} {'budget':>6} {'step us':>8} {'dense_kv':>9} "
        f"{'sdpa':>9} {'x best':>7} {'x kv':>7} {'per_tok':>7} {'floor':>6}")


def run(args: argparse.Namespace) -> int:
    refused = kernel_bench_refusal("verify", args.reps)
    if refused is not None:
        return refused
    from kvcomp.attention import MAX_VERIFY_QUERIES

    models = [m for m in args.models.split(",") if m]
    budgets = [b for b in args.budgets.split(",") if b]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        print(f"kvcomp bench verify: unknown --models {bad or args.models!r}; choose from {list(MODELS)}")
        return 2
    if max(args.q_lens) > MAX_VERIFY_QUERIES:
        print(f"kvcomp bench verify: --q-lens above {MAX_VERIFY_QUERIES} (MAX_VERIFY_QUERIES) are "
              "attended densely by the integration")
        return 2
    q_lens = sorted(set(args.q_lens) | {1})  # T = 1 first: the per-token reference
    cfg = dict(models=models, budgets=budgets, q_lens=q_lens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(bench="verify", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  copy_GBps=copy_bandwidth_gbs(), rows=[])
    print(HEAD, flush=True)
    for L in args.lengths:
        for B in args.batches:
            new = run_shape(L, B, cfg, args.reps, gen)
            result["rows"].extend(new)
            for r in new:
                print(_line(r), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=1)
    print(f"{result['device']}, copy {result['copy_GBps']:.0f} GB/s; times in us; x best: against the "
          "faster of dense_kv and sdpa; per_tok: step / (T x the T = 1 step)")
    return 0 if all(r["verified"] for r in result["rows"]) else 1
