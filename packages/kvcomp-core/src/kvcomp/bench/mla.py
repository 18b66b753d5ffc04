"""``kvcomp bench mla``: one DeepSeek MLA decode step (absorbed, latent space), kvcomp against
dense baselines, results verified before anything is timed.

Per (B, L) it builds a latent cache (ckv [B, L, R] and kpe [B, L, P], bf16, random), the split
key codes ``[hash(ckv) | hash(kpe)]`` (int32 [B, 1, L, (bits_kv + bits_rope) / 32]) and a
decode query (q_lat [B, H, R], q_pe [B, H, P]) and times:

    copy         a device-to-device copy (bytes read + written): the bandwidth ceiling
    dense        ``kvcomp.ops.mla_decode`` (our split-K Triton latent decode), every token
    einsum       the same math in plain torch (bf16 einsum, fp32 softmax)
    qcodes       the query codes of the step (``hash_encode_split`` of q_lat and q_pe per head)
    select       ``kvcomp.ops.hamming_topk`` with G = H (the generic kernel, exact) and
    mla_select   ``kvcomp.ops.mla_select`` (count planes + torch top-k), exact, same result
    sparse       ``kvcomp.ops.sparse_mla_decode`` over the selected blocks
    step         qcodes + select + sparse (the faster selection)

Each is timed eagerly (``triton.testing.do_bench``, median, L2 flushed before every call) and,
on CUDA, as a CUDA-graph replay (no CPU launch overhead); ratios use the graph times.
Absorbed MLA decode with H = 128 does 2 * H * (2R + P) = 278 KFLOP per 1152-byte token
(242 FLOP/byte): above the H200's ridge point, so the dense step is compute-bound and its
``%copy`` cannot reach 100% (JSON: dense_tflops).

Verification (a failure refuses to report speedups, exit code 1): dense and sparse outputs
against the fp32 references under flash-attention's rule (error <= 2x that of the bf16 torch
computation + atol), both selections equal, and equal to the pure-torch reference on one
sequence. Byte floor of the dense step: (R + P) * 2 bytes per token (1152 at 512 + 64).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from kvcomp.bench.timing import positive_ints, progress
from kvcomp.ops import hamming_topk, hash_encode_split, mla_decode, sparse_mla_decode
from kvcomp.ops._blocks import selected_token_mask
from kvcomp.ops.hamming_topk import hamming_topk_ref
from kvcomp.ops.mla_decode import mla_decode_ref
from kvcomp.ops.mla_select import mla_select
from kvcomp.ops.sparse_mla_decode import sparse_mla_decode_ref

MUST_SELECT = (0, -2, -1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=positive_ints, default=[32768, 131072], help="context lengths L")
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 32], help="batch sizes B")
    p.add_argument("--heads", type=int, default=128, help="query heads H (DeepSeek-V3: 128)")
    p.add_argument("--kv-lora-rank", type=int, default=512, help="latent width R")
    p.add_argument("--rope-dim", type=int, default=64, help="rope width P")
    p.add_argument("--bits-kv", type=int, default=512, help="hash bits of the latent part")
    p.add_argument("--bits-rope", type=int, default=64, help="hash bits of the rope part")
    p.add_argument("--selected", type=int, default=2048, help="tokens attended by the sparse step")
    p.add_argument("--chunk", type=int, default=128, help="block size (chunk_size)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the kernels "
                   "under TRITON_INTERPRET=1 at small shapes (a smoke run, times meaningless)")
    p.add_argument("--rep-ms", type=int, default=100, help="timing budget per measurement (ms)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON here")


def _timer(dev: torch.device, rep_ms: int):
    """median-microseconds timer: triton.testing.do_bench on CUDA (flushes L2 between calls),
    wall clock on CPU."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: 1e3 * do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                         return_mode="median")

    def cpu_time(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e6 * sorted(ts)[1]

    return cpu_time


def _graph_time(fn, timer):
    """Median time of replaying fn captured in a CUDA graph, or the capture error (str)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:  # a host sync inside fn
        return str(e).splitlines()[0]
    us = timer(graph.replay)
    del graph
    return us


def _copy_bandwidth(dev: torch.device, timer) -> float:
    """Bytes read + written per second of a large copy (GB/s); the CPU smoke run's ceiling."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    src = dst = None  # free before the next allocation
    return 2 * n / us / 1e3


def _einsum_decode(q_lat, q_pe, ckv, kpe, scale, mask=None):
    """Plain torch MLA latent decode, bf16 matmuls, fp32 softmax; mask [B, 1, L] bool of the
    attended tokens (None: all tokens)."""
    s = torch.einsum("bhr,blr->bhl", q_lat, ckv).float()
    s = (s + torch.einsum("bhp,blp->bhl", q_pe, kpe).float()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(ckv.dtype)
    return torch.einsum("bhl,blr->bhr", p, ckv)


def _rule(out, ref, lowp, atol) -> tuple[bool, float, float]:
    err = (out.double() - ref.double()).abs().max().item()
    base = (lowp.double() - ref.double()).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * base + atol
    return ok, err, base


def _in_batches(fn, B, step=4):
    return torch.cat([fn(slice(i, min(B, i + step))) for i in range(0, B, step)])


def run_config(B, L, args, dev, timer, copy_gbps, w_lat, w_rope) -> dict:
    H, R, P = args.heads, args.kv_lora_rank, args.rope_dim
    dt = torch.bfloat16
    chunk = args.chunk
    k_blocks = max(len(MUST_SELECT), math.ceil(args.selected / chunk))
    scale = 1.0 / math.sqrt(192.0)  # DeepSeek-V3: qk_nope 128 + rope 64 (mscale 1)
    g = torch.Generator(device=dev).manual_seed(1000 * B + L)
    ckv = torch.randn(B, L, R, device=dev, dtype=dt, generator=g)
    kpe = torch.randn(B, L, P, device=dev, dtype=dt, generator=g)
    q_lat = torch.randn(B, H, R, device=dev, dtype=dt, generator=g) * 0.06
    q_pe = torch.randn(B, H, P, device=dev, dtype=dt, generator=g) * 0.06
    seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    k_codes = hash_encode_split((ckv, kpe), (w_lat, w_rope)).unsqueeze(1)

    def qcodes():
        return hash_encode_split((q_lat, q_pe), (w_lat, w_rope))

    def select_generic(qc):
        return hamming_topk(qc, k_codes, seq_lens, k_blocks=k_blocks, chunk_size=chunk,
                            must_select=MUST_SELECT)

    def select_mla(qc):
        return mla_select(qc, k_codes, seq_lens, k_blocks=k_blocks, chunk_size=chunk,
                          must_select=MUST_SELECT)

    def sparse(bi):
        return sparse_mla_decode(q_lat, q_pe, ckv, kpe, bi, seq_lens, chunk_size=chunk, scale=scale)

    def dense():
        return mla_decode(q_lat, q_pe, ckv, kpe, seq_lens, scale=scale)

    # ---------------------------------------------------------------- verify first
    progress(f"B={B} L={L}: inputs ready; verifying")
    checks = {}
    qc = qcodes()
    bi_g = select_generic(qc)
    progress("  hamming_topk done")
    bi_m = select_mla(qc)
    progress("  mla_select done")
    checks["select_equal"] = bool(torch.equal(bi_g, bi_m))
    kb = torch.full((1,), k_blocks, dtype=torch.int32, device=dev)
    ref_bi = hamming_topk_ref(qc[:1], k_codes[:1], seq_lens[:1], kb, bi_g.shape[-1], chunk,
                              MUST_SELECT, "max")
    checks["select_ref_seq0"] = bool(torch.equal(bi_g[:1], ref_bi))
    n_sel = int((bi_g >= 0).sum(-1).min().item())
    checks["blocks_selected"] = n_sel == min(k_blocks, math.ceil(L / chunk))
    progress("  selections checked")

    out_d = dense()
    out_e = _einsum_decode(q_lat, q_pe, ckv, kpe, scale)
    f = lambda t, sl: t[sl].float()
    ref_d = _in_batches(lambda sl: mla_decode_ref(f(q_lat, sl), f(q_pe, sl), f(ckv, sl),
                                                  f(kpe, sl), seq_lens[sl], scale), B)
    ok, err, base = _rule(out_d, ref_d, out_e, 1e-3)
    checks["dense_vs_ref"] = ok
    checks["dense_err"], checks["einsum_err"] = err, base
    progress("  dense checked")
    out_s = sparse(bi_g)
    ref_s = _in_batches(lambda sl: sparse_mla_decode_ref(f(q_lat, sl), f(q_pe, sl), f(ckv, sl),
                                                         f(kpe, sl), bi_g[sl], seq_lens[sl],
                                                         chunk, scale), B)
    lowp_s = _in_batches(lambda sl: _einsum_decode(
        q_lat[sl], q_pe[sl], ckv[sl], kpe[sl], scale,
        selected_token_mask(bi_g[sl], seq_lens[sl], L, chunk)), B)
    ok, err, base = _rule(out_s, ref_s, lowp_s, 1e-3)
    checks["sparse_vs_ref"] = ok
    checks["sparse_err"] = err
    del ref_d, ref_s, lowp_s, out_e
    verified = all(v for k, v in checks.items() if not k.endswith("_err"))
    row = dict(B=B, L=L, H=H, R=R, P=P, chunk=chunk, k_blocks=k_blocks,
               selected_tokens=k_blocks * chunk, verified=verified, checks=checks)
    if not verified:
        return row

    # ---------------------------------------------------------------- time
    t = {}

    def both(name, fn):
        """eager time, and on CUDA the time of a CUDA-graph replay of fn (no launch overhead)"""
        progress(f"  timing {name}")
        t[name] = timer(fn)
        if dev.type == "cuda":
            g_us = _graph_time(fn, timer)
            if isinstance(g_us, str):
                row.setdefault("graph_errors", {})[name] = g_us
            else:
                t[name + "_graph"] = g_us

    both("dense", dense)
    both("einsum", lambda: _einsum_decode(q_lat, q_pe, ckv, kpe, scale))
    both("qcodes", qcodes)
    both("select", lambda: select_generic(qc))
    both("mla_select", lambda: select_mla(qc))
    both("sparse", lambda: sparse(bi_g))
    best = lambda name: min(t[name], t.get(name + "_graph", float("inf")))
    use_mla = best("mla_select") < best("select")
    sel = select_mla if use_mla else select_generic
    both("step", lambda: sparse(sel(qcodes())))
    dense_bytes = B * L * (R + P) * 2
    dense_flops = 2 * B * H * L * (2 * R + P)
    code_bytes = k_codes.numel() * 4
    step_bytes = code_bytes + B * k_blocks * chunk * (R + P) * 2
    mode = "_graph" if "step_graph" in t and "dense_graph" in t else ""
    row.update(
        times_us=t,
        timing=("CUDA graph replays" if mode else "eager") + " for the ratios",
        selection="mla_select" if use_mla else "hamming_topk",
        dense_bytes=dense_bytes,
        dense_flops=dense_flops,
        step_bytes=step_bytes,
        dense_bw_frac=dense_bytes / best("dense") / 1e3 / copy_gbps,
        dense_tflops=dense_flops / best("dense") / 1e6,
        select_bw_frac=code_bytes / min(best("select"), best("mla_select")) / 1e3 / copy_gbps,
        speedup_vs_dense=t["dense" + mode] / t["step" + mode],
        speedup_vs_einsum=t["einsum" + mode] / t["step" + mode]
        if "einsum" + mode in t else t["einsum"] / t["step"],
        dense_vs_einsum=best("einsum") / best("dense"),
        floor_speedup=dense_bytes / step_bytes,
    )
    return row


def run(args) -> int:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("kvcomp bench mla: --device cuda but no CUDA GPU is visible (use --device cpu "
              "with small --lengths/--heads for a smoke run under TRITON_INTERPRET=1)")
        return 2
    for name in ("heads", "kv_lora_rank", "rope_dim", "selected", "chunk", "rep_ms"):
        if getattr(args, name) < 1:
            print(f"kvcomp bench mla: --{name.replace('_', '-')} must be >= 1")
            return 2
    for name in ("bits_kv", "bits_rope"):
        if getattr(args, name) < 32 or getattr(args, name) % 32:
            print(f"kvcomp bench mla: --{name.replace('_', '-')} must be a positive multiple of 32")
            return 2
    from kvcomp.hashing import HashWeights

    hw = HashWeights.random_mla(1, args.kv_lora_rank, args.rope_dim, args.bits_kv, args.bits_rope)
    w_lat = hw.latent(0, device=dev)[0]  # [R, bits_kv]
    w_rope = hw.rope(0, device=dev)[0]  # [P, bits_rope]
    timer = _timer(dev, args.rep_ms)
    if dev.type == "cuda":
        from kvcomp.bench.timing import copy_bandwidth_gbs

        copy_gbps = copy_bandwidth_gbs(device=str(dev))  # the ceiling every bench uses
    else:
        copy_gbps = _copy_bandwidth(dev, timer)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    result = dict(bench="mla", device=device_name, torch=torch.__version__,
                  copy_GBps=copy_gbps, rows=[])
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    print(f"device {device_name}; copy {copy_gbps:.0f} GB/s (read + write)")
    print("times in us, CUDA-graph replays where capturable (eager in the JSON too)")
    print(f"{'B':>3} {'L':>7} {'dense':>8} {'%copy':>6} {'TF/s':>5} {'einsum':>8} "
          f"{'qcodes':>7} {'select':>7} {'mla_sel':>7} {'sparse':>7} {'step':>7} "
          f"{'x dense':>8} {'x einsum':>9}", flush=True)
    bad = False
    # each row is printed and the JSON rewritten as soon as it is measured, so a run cut short
    # by a time limit still returns what it measured
    for L in args.lengths:
        for B in args.batches:
            r = run_config(B, L, args, dev, timer, copy_gbps, w_lat, w_rope)
            result["rows"].append(r)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=1)
            bad |= not _print_row(r)
    return 1 if bad else 0


def _print_row(r: dict) -> bool:
    if not r["verified"]:
        print(f"{r['B']:>3} {r['L']:>7} VERIFICATION FAILED: {r['checks']}", flush=True)
        return False
    t = r["times_us"]
    g = lambda n: t.get(n + "_graph", t[n])
    print(f"{r['B']:>3} {r['L']:>7} {g('dense'):8.1f} {100 * r['dense_bw_frac']:5.1f}% "
          f"{r['dense_tflops']:5.0f} {g('einsum'):8.1f} {g('qcodes'):7.1f} {g('select'):7.1f} "
          f"{g('mla_select'):7.1f} {g('sparse'):7.1f} {g('step'):7.1f} "
          f"{r['speedup_vs_dense']:8.2f} {r['speedup_vs_einsum']:9.2f}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvcomp bench mla", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
