"""``kvcomp bench decode``: one GQA decode step of one layer, kvcomp against dense SDPA.

Per (L, B) it builds a bf16 KV cache [B, 8, L, 128] (random), its 128-bit key codes (per
kv-head random orthogonal projections, ``hash_encode``) and, per model geometry (Qwen3-8B:
32 query heads, Qwen3-32B: 64; both 8 kv-heads, head_dim 128), a decode query. Per budget
(2048 tokens, 10%, 30% of the blocks; chunk 128; must-select first + last two blocks) it
verifies, then times with CUDA events (median, CUDA-graph replays):

    encode   hash_encode of the query (per query head)
    select   hamming_topk, exact group sum (the default form for the geometry), and the other
             forms: exact_direct / exact_planes (same result) and majority (cheaper, approximate);
             "search": the exact form with the threshold found by the binary search instead of
             the scan's histogram (``HIST_SELECT`` off: the previous default, same selection)
    scan / topk  the two launches of the search variant, timed alone
    attend   sparse_decode_attention over the selected blocks
    step     decode_step (encode + select + attend), graph and eager
    before   the previous kernels, switched back on by their module flags, in the same run:
             select_hist_v1 (``HIST_COMPACT`` off: the histogram stage 2 before its prefix-sum
             form), attend_two_kernel (``FUSED_MERGE`` off: split kernel + merge kernel),
             select_before / step_before (the kernels of session 5: group-score rows in their
             own launch where a form needs them, no signed planes, no programmatic dependent
             launch); attend_per_token / step_per_token (``SCALAR_BLOCKS`` off: each tile's
             block entries loaded per token in its own loop step, before session 18)
    fused    select_fused / step_fused: the histogram stage 2 in the scan's launch
             (``FUSED_HIST_SELECT``; B x Hkv <= ``HIST_MAX_ROWS`` only, else the same as select),
             and with a 64-register cap (``FUSED_HIST_MAXNREG``): select_fused_r64
    dense    torch scaled_dot_product_attention (flash backend when available) on the same
             tensors, graph and eager

``--token-score centered_norm`` times the selection the cache makes with that setting: codes of
``k - mu`` (mu: each sequence's mean key) and the scores weighted by the fp16 key norms
(``hamming_topk(k_scale=)``; the histogram threshold does not apply there, the search runs).

Verification (a failure prints no speedup and exits 1): query codes equal to the reference up
to bits whose projection is ~0; every selection equal (torch.equal) to the pure-torch reference
on the same query codes (majority: on the majority codes; with k_scale: the reference with the
same weights), the previous kernels' too; attention within flash-attention's rule of an fp64
computation over the selected tokens, both merge paths; the step's output equal to the stages'.
Achieved bandwidth: select over the code bytes, attend over the K/V bytes of the attended
tokens, dense over the whole cache; all against the device copy bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import json
import math
import os
import subprocess

import torch

from kvcomp.bench.timing import (
    attention_close,
    attention_ref_fp64,
    attention_ref_lowp,
    copy_bandwidth_gbs,
    cuda_time_us,
    kernel_bench_refusal,
)

MODELS = {"qwen3-8b": 32, "qwen3-32b": 64}  # query heads; 8 kv-heads, head_dim 128 both
HKV, HEAD_DIM, BITS, CHUNK = 8, 128, 128, 128
MUST_SELECT = (0, -2, -1)
FULL = dict(lengths=[8192, 32768, 131072], batches=[1, 8], budgets=["2048", "10%", "30%"],
            models=list(MODELS))
QUICK = dict(lengths=[32768], batches=[1, 8], budgets=["2048", "10%"], models=["qwen3-8b"])
# the targets for the full step against dense at L = 128K
TARGETS = {("2048", 8): 12.0, ("2048", 1): 8.0, ("10%", 1): 5.0, ("10%", 8): 5.0,
           ("30%", 1): 2.5, ("30%", 8): 2.5}
SELECT_MODES = ("exact", "exact_direct", "exact_planes", "exact_signed", "majority")
L2_BYTES = 50 << 20  # H100 / H200 L2
# input sets rotated through (``kv_input_sets``): at most this many, and this many bytes in all
MAX_SETS = 256
MAX_SET_BYTES = 32 << 30
TOKEN_SCORES = ("hamming", "centered_norm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="a small subset (L 32K, Qwen3-8B)")
    p.add_argument("--lengths", help="comma-separated context lengths (default 8192,32768,131072)")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--budgets", help="comma-separated budgets: tokens or percent (default 2048,10%%,30%%)")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--reps", type=int, default=100, help="timed repetitions per measurement")
    p.add_argument("--token-score", choices=TOKEN_SCORES, default="hamming",
                   help="hamming (default) or centered_norm: codes of k - mu, scores weighted by "
                        "the key norms (hamming_topk k_scale)")
    p.add_argument("--variants", action="store_true",
                   help="also time every exact group-score form, the fused stage 2, the PDL trigger "
                        "policies and the B <= 4 launch knobs (each against the default, same run)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time the kernels' launch knobs at L=128K (tuning), verified")


def _blocks_for(budget: str, n_blocks: int) -> int:
    if budget.endswith("%"):
        return max(1, math.ceil(float(budget[:-1]) / 100 * n_blocks))
    return max(1, math.ceil(int(budget) / CHUNK))


def _gather_selected(k, v, idx, lens):
    """K/V rows of the selected blocks [B, Hkv, K * CHUNK, D] and their validity mask."""
    tok = (idx.long().unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=idx.device)).flatten(2)
    valid = (tok >= 0) & (tok < lens.view(-1, 1, 1)) & (idx.repeat_interleave(CHUNK, 2) >= 0)
    safe = tok.clamp(min=0, max=k.shape[2] - 1).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, safe), v.gather(2, safe), valid


def _dense_fn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    F = torch.nn.functional
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, None):
        def fn(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            fn()
            return fn, (backend.name if backend is not None else "default")
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend runs this decode shape")


def _git_commit() -> str:
    """``KVCOMP_COMMIT`` when set (a copied working tree's .git may be stale), else ``git
    describe --always --dirty`` ("-dirty": the tree differs from that commit)."""
    if os.environ.get("KVCOMP_COMMIT"):
        return os.environ["KVCOMP_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@contextlib.contextmanager
def _flags(module: str, **values):
    """Set module-level kernel flags (e.g. ``HIST_COMPACT=False``) inside the block only."""
    mod = importlib.import_module(module)
    old = {k: getattr(mod, k) for k in values}
    for k, v in values.items():
        setattr(mod, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(mod, k, v)


HK, AK = "kvcomp.ops.hamming_topk.kernels", "kvcomp.ops.sparse_decode_attention.kernels"
MMA = "kvcomp.ops.hamming_topk.mma_scan"


@contextlib.contextmanager
def _before():
    """The kernels of session 5: rows of the planes / majority forms in their own launch, no
    signed planes, no programmatic dependent launch, stage 2 of the selection in its own launch,
    the histogram path up to 16 rows, 2 pipeline stages for every attention split."""
    with _flags("kvcomp.ops._pdl", ENABLED=False), \
            _flags(HK, ROWS_IN_SCAN=False, SIGNED_PLANES=False, HIST_MAX_ROWS=16), \
            _flags(AK, SELECT_IN_PROLOGUE=False, ONE_TILE_STAGES=2):
        yield


ROLES = ("encode", "rows", "scan", "select", "attention")
# programmatic-dependent-launch variants timed beside the default: roles that let their
# successor launch only as their programs exit (kvcomp.ops._pdl.NO_TRIGGER), and up to how many
# (sequence, kv-head) rows the decode kernels take PDL (None: the default DECODE_MAX_ROWS)
PDL_VARIANTS = {
    "any_rows": dict(no_trigger=(), max_rows=1 << 30),
    "late_sa": dict(no_trigger=("select", "attention"), max_rows=None),
    "late_all": dict(no_trigger=ROLES, max_rows=None),
    "late_all_attn": dict(no_trigger=ROLES, max_rows=1 << 30),
}


@contextlib.contextmanager
def _pdl_variant(no_trigger, max_rows):
    pdl = importlib.import_module("kvcomp.ops._pdl")
    rows = pdl.DECODE_MAX_ROWS if max_rows is None else max_rows
    with _flags("kvcomp.ops._pdl", NO_TRIGGER=frozenset(no_trigger), DECODE_MAX_ROWS=rows):
        yield


# launch knobs timed at B <= LATENCY_MAX_B (the latency-bound steps), each against the default
# in one run, {name: {module: {flag: value}}}; sessions 6 and 7 also timed SELECT_WARPS=2,
# TARGET_PROGRAMS=132, TILE_N=32 with 528 programs or 2 tiles a split, WARPS=8, STAGES=3 and the
# fused merge's tile halved: all slower or equal (decode.md); session 8 1024-token scan tiles
# (19.9 against 18.3 us at B = 1, 128K, 2048 tokens) and the scan capped at 32 registers so
# that B = 1's 2048 programs run in one wave (26.4 us; 256-token tiles on 2 warps: 24.6)
LATENCY_MAX_B = 4
LATENCY_VARIANTS = {
    "sel_launch": {AK: dict(SELECT_IN_PROLOGUE=False)},  # stage 2 as its own launch (session 6)
    # stage 2 in the prologue also where the merge is its own launch (G = 8 at B = 1; session 11;
    # session 12, Qwen3-32B: 20.2 against 20.0 us)
    "sel_unfused": {AK: dict(SELECT_IN_PROLOGUE_UNFUSED=True)},
    # the fused merge in two levels where one would exceed its limit (G = 8 at B = 1: groups of
    # 8 splits, then the 4 groups; session 11; session 12, Qwen3-32B: 20.9 against 20.0 us)
    "merge2": {AK: dict(MERGE_GROUP_SPLITS=8)},
    "sel_w8": {HK: dict(SELECT_WARPS=8)},
    "attn_t32": {AK: dict(TILE_N=32)},
    "attn_s1": {AK: dict(STAGES=1)},
    "attn_s2_one": {AK: dict(ONE_TILE_STAGES=2)},  # 2 stages also for splits of one tile (session 6)
    "hist_r16": {HK: dict(HIST_MAX_ROWS=16)},  # B = 4: the search path (session 6)
    "pdl_r32": {"kvcomp.ops._pdl": dict(DECODE_MAX_ROWS=32)},  # B = 4 with PDL
    "rows_reduce": {HK: dict(SLICED_ROWS=False)},  # group rows by cross-thread reductions (session 7)
    # the SIMT scan instead of the tensor-core one (session 8's; session 9, B = 1: 19.4 against
    # 17.6 us with the restructured SIMT scan since reverted)
    "simt_scan": {MMA: dict(MMA_SCAN=False)},
    "hist_step2": {HK: dict(HIST_STEP4=False)},  # bins of 2 scores (before session 10)
    # the tensor-core scan's first warp tile loaded in its loop, after the query codes (session 9)
    "mma_late": {MMA: dict(MMA_FIRST_EARLY=False)},
    # fewer, longer splits where the partials exceed the fused merge's limit (session 11,
    # Qwen3-32B: 20.6 against 19.9 us)
    "attn_fit": {AK: dict(FUSED_MERGE_FIT=True)},
    # 64-token tiles everywhere (before LONG_TILE_N: 128 where a split holds several tiles at
    # few rows; session 11, B = 1, Qwen3-8B: 36.8 against 31.2 us at 10%); 128 everywhere (18.0
    # against 17.9 at 2048 tokens); long tiles on 8 warps (35.1 at 10%)
    "attn_t64": {AK: dict(LONG_TILE_N=None)},
    "attn_t128": {AK: dict(TILE_N=128)},
    # the fused merge up to 128 KB of partials (G = 8 x 32 splits: 21.5 against 19.9 us)
    "attn_fuse128": {AK: dict(FUSED_MERGE_MAX_BYTES=128 << 10)},
    # the split count at B = 1 with large selections (10%: 26 splits of 4 128-token tiles, 208
    # programs on 8 rows): one program an SM (15 splits of 7 tiles; G = 8's partials then fit
    # the fused merge), or 35 splits of 3 with the fused merge up to 128 KB. Session 22, 128K,
    # 10%, Qwen3-8B / 32B: 37.3 / 38.5 and 31.9 / 33.0 against 30.8 / 31.5 us (decode.md)
    "attn_t132": {AK: dict(TARGET_PROGRAMS=132)},
    "attn_t396_f128": {AK: dict(TARGET_PROGRAMS=396, FUSED_MERGE_MAX_BYTES=128 << 10)},
    # the query encode's one-row programs on 2 / 4 warps (1 since session 13: 17.5 / 19.7 us
    # against 17.9 / 19.9 with 4, Qwen3-8B / 32B)
    "enc_w2": {"kvcomp.ops.hash_encode.kernels": dict(ROW_KERNEL_WARPS=2)},
    "enc_w4": {"kvcomp.ops.hash_encode.kernels": dict(ROW_KERNEL_WARPS=4)},
    # the merge launch (G = 8 at B = 1) on 2 / 4 / 8 warps (1 since session 13: Qwen3-32B 17.8
    # against 19.4 / 19.7 / 21.2 us)
    "merge_w2": {AK: dict(MERGE_WARPS=2)},
    "merge_w4": {AK: dict(MERGE_WARPS=4)},
    "merge_w8": {AK: dict(MERGE_WARPS=8)},
    # the tensor-core scan's occupancy at B = 1 (2048 programs, ~1.5 waves at 48 registers): a
    # register cap of 40 / 32 (12 / 16 programs an SM, spills), or two warp tiles a program (1024)
    "scan_r40": {MMA: dict(MMA_MAXNREG=40)},
    "scan_r32": {MMA: dict(MMA_MAXNREG=32)},
    "scan_t1024": {MMA: dict(MMA_TARGET_PROGRAMS=1024)},
    # ... and at B = 8 (16384 warp tiles, four a program since session 14): two a program (the
    # default before: Qwen3-32B's step 68.2-68.4 against 67.3 us) or one (74.9)
    "scan_t8192": {MMA: dict(MMA_TARGET_PROGRAMS=8192)},
    "scan_t16384": {MMA: dict(MMA_TARGET_PROGRAMS=16384)},
}


@contextlib.contextmanager
def _module_flags(spec: dict):
    with contextlib.ExitStack() as stack:
        for module, values in spec.items():
            stack.enter_context(_flags(module, **values))
        yield


@contextlib.contextmanager
def _fused(maxnreg=None):
    """The histogram stage 2 in the scan's launch."""
    with _flags(HK, FUSED_HIST_SELECT=True, FUSED_HIST_MAXNREG=maxnreg):
        yield


def _stage_times(sets, qs, q_w, kb, scale, reps, variants: bool = False) -> dict:
    """Median device times (us) of each stage and of the whole step, rotating over the input
    sets: CUDA-graph replays of back-to-back calls; the step and dense also eagerly. The
    previous kernels (``_before``) are timed beside the defaults; with ``variants`` also every
    exact group-score form, the fused stage 2, the PDL trigger and launch-knob variants."""
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step

    P = functools.partial
    n = range(len(sets))
    q_codes = [hash_encode(qs[i], q_w, enable_gqa=True) for i in n]
    idx = [hamming_topk(q_codes[i], sets[i]["codes"], sets[i]["lens"], k_blocks=kb,
                        chunk_size=CHUNK, must_select=MUST_SELECT, k_scale=sets[i]["scale"])
           for i in n]
    t = {"encode": cuda_time_us([P(hash_encode, qs[i], q_w, enable_gqa=True) for i in n], reps=reps)}
    # before session 11: the kv-heads' weights expanded to one copy per query head (G x the bytes)
    q_wx = q_w.repeat_interleave(qs[0].shape[1] // q_w.shape[0], 0)
    t["encode_expanded"] = cuda_time_us([P(hash_encode, qs[i], q_wx) for i in n], reps=reps)

    def selects(**kw):
        return [P(hamming_topk, q_codes[i], sets[i]["codes"], sets[i]["lens"], k_blocks=kb,
                  chunk_size=CHUNK, must_select=MUST_SELECT, k_scale=sets[i]["scale"], **kw)
                for i in n]

    for mode in SELECT_MODES if variants else ("exact", "majority"):
        t[f"select_{mode}"] = cuda_time_us(selects(mode=mode), reps=reps)
    with _flags(HK, HIST_SELECT=False):
        t["select_search"] = cuda_time_us(selects(), reps=reps)
    with _before():
        t["select_before"] = cuda_time_us(selects(), reps=reps)
    if variants:
        with _flags(HK, HIST_COMPACT=False):
            t["select_hist_v1"] = cuda_time_us(selects(), reps=reps)
        with _fused():
            t["select_fused"] = cuda_time_us(selects(), reps=reps)
        with _fused(64):
            t["select_fused_r64"] = cuda_time_us(selects(), reps=reps)
    hk = importlib.import_module(HK)
    keys = [hk.block_keys_triton(q_codes[i], sets[i]["codes"], sets[i]["lens"], CHUNK, "max",
                                 k_scale=sets[i]["scale"]) for i in n]
    t["scan"] = cuda_time_us(
        [P(hk.block_keys_triton, q_codes[i], sets[i]["codes"], sets[i]["lens"], CHUNK, "max",
           k_scale=sets[i]["scale"]) for i in n], reps=reps)
    t["topk"] = cuda_time_us(
        [P(hk.select_triton, keys[i], sets[i]["lens"], kb, idx[i].shape[2], CHUNK, MUST_SELECT)
         for i in n], reps=reps)
    attends = [P(sparse_decode_attention, qs[i], sets[i]["k"], sets[i]["v"], idx[i],
                 sets[i]["lens"], chunk_size=CHUNK, scale=scale) for i in n]
    t["attend"] = cuda_time_us(attends, reps=reps)
    with _flags(AK, FUSED_MERGE=False):
        t["attend_two_kernel"] = cuda_time_us(attends, reps=reps)
    with _flags(AK, SCALAR_BLOCKS=False):  # before session 18: each tile's block entries per token
        t["attend_per_token"] = cuda_time_us(attends, reps=reps)
    steps = [P(decode_step, qs[i], q_w, sets[i]["codes"], sets[i]["k"], sets[i]["v"],
               sets[i]["lens"], k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT,
               scale=scale, k_scale=sets[i]["scale"]) for i in n]
    t["step"] = cuda_time_us(steps, reps=reps)
    t["step_eager"] = cuda_time_us(steps, reps=reps, graph=False)
    t["step_q_expanded"] = cuda_time_us([P(st.func, st.args[0], q_wx, *st.args[2:], **st.keywords)
                                         for st in steps], reps=reps)
    with _before():
        t["step_before"] = cuda_time_us(steps, reps=reps)
    with _flags(AK, SCALAR_BLOCKS=False):
        t["step_per_token"] = cuda_time_us(steps, reps=reps)
    if not variants:
        return t
    with _fused():
        t["step_fused"] = cuda_time_us(steps, reps=reps)
    with _fused(64):
        t["step_fused_r64"] = cuda_time_us(steps, reps=reps)
    for name, var in PDL_VARIANTS.items():
        with _pdl_variant(**var):
            t[f"step_{name}"] = cuda_time_us(steps, reps=reps)
    if qs[0].shape[0] <= LATENCY_MAX_B:
        for name, spec in LATENCY_VARIANTS.items():
            with _module_flags(spec):
                t[f"step_{name}"] = cuda_time_us(steps, reps=reps)
    return t


def touched_bytes(B: int, L: int, budgets) -> int:
    """The fewest bytes one timed kvcomp call reads from an input set: the key codes
    (``hamming_topk``) or the smallest budget's selected K/V (``sparse_decode_attention``)."""
    n_blocks = math.ceil(L / CHUNK)
    tokens = min(min(_blocks_for(b, n_blocks), n_blocks) * CHUNK for b in budgets)
    return min(B * HKV * L * BITS // 8, B * HKV * min(tokens, L) * HEAD_DIM * 2 * 2)


def kv_input_sets(B: int, L: int, gen, centered: bool = False, max_sets: int = MAX_SETS,
                  touched: int | None = None):
    """Random bf16 K/V caches [B, HKV, L, HEAD_DIM] on the GPU with their key codes (per kv-head
    random orthogonal projections kv_w [HKV, HEAD_DIM, BITS]): enough independent sets that
    rotating through them leaves nothing in L2 to reuse: ``touched`` (bytes one timed call reads
    from a set, ``touched_bytes``; default: the whole set) times the sets reaches 3x L2, up to
    ``max_sets`` sets and MAX_SET_BYTES in all. ``centered``: what the cache stores for
    token_score="centered_norm" (codes of k - mu, ``scale`` = ||k - mu||). -> (kv_w, sets), each
    set {k, v, codes, lens, scale}."""
    from kvcomp.ops import hash_encode
    from kvcomp.ops.key_stats import hash_bias, key_mean, key_norms

    dev = "cuda"
    kv_w = torch.linalg.qr(torch.randn(HKV, HEAD_DIM, HEAD_DIM, device=dev, generator=gen))[0]
    kv_w = kv_w[..., :BITS].contiguous()  # [Hkv, D, BITS]
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    set_bytes = B * HKV * L * (2 * HEAD_DIM * 2 + BITS // 8)
    n_sets = math.ceil(3 * L2_BYTES / (touched or set_bytes))
    sets = []
    for _ in range(max(1, min(max_sets, MAX_SET_BYTES // set_bytes, n_sets))):
        kk = torch.randn(B, HKV, L, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
        vv = torch.randn(B, HKV, L, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
        if centered:
            mu = key_mean(kk, lens)
            codes = hash_encode(kk, kv_w, bias=hash_bias(mu, kv_w))
            sets.append(dict(k=kk, v=vv, codes=codes, lens=lens.clone(), scale=key_norms(kk, mu)))
        else:
            sets.append(dict(k=kk, v=vv, codes=hash_encode(kk, kv_w), lens=lens.clone(), scale=None))
    return kv_w, sets


def run_length_batch(L, B, cfg, reps, copy_gbs, gen) -> list[dict]:
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step
    from kvcomp.ops.hamming_topk import majority_codes
    from kvcomp.ops.hamming_topk.reference import (
        block_scores_ref,
        select_blocks_ref,
        token_scores_ref,
    )
    from kvcomp.ops.hash_encode.reference import project

    dev = "cuda"
    centered = cfg["token_score"] == "centered_norm"
    variants = cfg.get("variants", False)
    # kvcomp's calls read only the codes and the selected K/V of a set: enough sets that those
    # bytes, not only the dense K/V, are 3x L2 (before session 10 one set at 128K, B = 1)
    kv_w, sets = kv_input_sets(B, L, gen, centered, touched=touched_bytes(B, L, cfg["budgets"]))
    lens = sets[0]["lens"]
    n_sets = len(sets)
    k, v, k_codes = sets[0]["k"], sets[0]["v"], sets[0]["codes"]  # the verified set
    k_scale = sets[0]["scale"]
    n_blocks = math.ceil(L / CHUNK)
    scale = 1 / math.sqrt(HEAD_DIM)
    rows = []
    for model in cfg["models"]:
        Hq = MODELS[model]
        G = Hq // HKV
        qs = [torch.randn(B, Hq, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
              for _ in sets]
        q = qs[0]
        q_w = kv_w  # [Hkv, D, BITS]: query head j hashed with row j // G (enable_gqa)
        q_wx = kv_w.repeat_interleave(G, 0)  # the same, one row per query head (the reference's)
        dense = [_dense_fn(qs[i], st["k"], st["v"]) for i, st in enumerate(sets)]
        dense_backend = dense[0][1]
        t_dense = cuda_time_us([d[0] for d in dense], reps=reps)
        t_dense_eager = cuda_time_us([d[0] for d in dense], reps=reps, graph=False)
        dense_bytes = 2 * B * HKV * L * HEAD_DIM * 2
        # query codes: equal to the reference but where the fp32 projection is ~0
        q_codes = hash_encode(q, q_w, enable_gqa=True)
        proj = project(q, q_wx)
        ref_codes = hash_encode(q, q_wx, backend="reference")
        flip = ((q_codes ^ ref_codes).long().unsqueeze(-1) >> torch.arange(32, device=dev)) & 1
        codes_ok = bool((proj.abs()[flip.flatten(-2).bool()] <= 1e-4 * proj.abs().max()).all())
        # grouped and expanded weights: the same products, so the same codes bit for bit
        codes_ok &= bool(torch.equal(q_codes, hash_encode(q, q_wx)))
        scores = {} if centered else {
            "exact": block_scores_ref(token_scores_ref(q_codes, k_codes), lens, CHUNK, "max"),
            "majority": block_scores_ref(
                token_scores_ref(majority_codes(q_codes, HKV), k_codes), lens, CHUNK, "max"
            ),
        }
        for budget in cfg["budgets"]:
            kb = min(_blocks_for(budget, n_blocks), n_blocks)
            kbt = torch.full((B,), kb, dtype=torch.int32, device=dev)
            checks = {"query_codes": codes_ok}
            sel = {}
            sk = dict(k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT, k_scale=k_scale)
            for mode in SELECT_MODES if variants else ("exact", "majority"):
                sel[mode] = hamming_topk(q_codes, k_codes, lens, mode=mode, **sk)
                if centered:  # the reference with the same per-token weights
                    want = hamming_topk(q_codes, k_codes, lens, mode=mode, backend="reference", **sk)
                else:
                    want = select_blocks_ref(scores["majority" if mode == "majority" else "exact"],
                                             lens, kbt, sel[mode].shape[2], CHUNK, MUST_SELECT)
                checks[f"select_{mode}"] = bool(torch.equal(sel[mode], want))
            idx = sel["exact"]
            with _flags(HK, HIST_SELECT=False):
                checks["select_search"] = bool(torch.equal(hamming_topk(q_codes, k_codes, lens, **sk), idx))
            with _flags(HK, HIST_COMPACT=False):
                checks["select_hist_v1"] = bool(torch.equal(hamming_topk(q_codes, k_codes, lens, **sk), idx))
            with _before():
                checks["select_before"] = bool(torch.equal(hamming_topk(q_codes, k_codes, lens, **sk), idx))
            for name, cap in (("select_fused", None), ("select_fused_r64", 64)) if variants else ():
                with _fused(cap):
                    checks[name] = bool(torch.equal(hamming_topk(q_codes, k_codes, lens, **sk), idx))
            out = sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK, scale=scale)
            with _flags(AK, FUSED_MERGE=False):
                out_2k = sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK, scale=scale)
            kg, vg, valid = _gather_selected(k, v, idx, lens)
            ref64, lowp = attention_ref_fp64(q, kg, vg, valid, scale), attention_ref_lowp(q, kg, vg, valid, scale)
            ok, err, base = attention_close(out, ref64, lowp, atol=1e-4)
            checks["attend"] = ok
            checks["attend_two_kernel"] = attention_close(out_2k, ref64, lowp, atol=1e-4)[0]
            step_kw = dict(k_blocks=kb, chunk_size=CHUNK, must_select=MUST_SELECT, scale=scale,
                           k_scale=k_scale)
            step_out, step_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
            checks["step"] = bool(torch.equal(step_idx, idx) and torch.equal(step_out, out))
            with _before():
                b_out, b_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
            checks["step_before"] = bool(torch.equal(b_idx, idx) and torch.equal(b_out, out))
            with _flags(AK, SCALAR_BLOCKS=False):  # the same tiles in the same order: bit for bit
                p_out, p_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
                checks["attend_per_token"] = bool(torch.equal(
                    sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK, scale=scale), out))
            checks["step_per_token"] = bool(torch.equal(p_idx, idx) and torch.equal(p_out, out))
            if variants:
                with _fused():
                    f_out, f_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
                checks["step_fused"] = bool(torch.equal(f_idx, idx) and torch.equal(f_out, out))
            for name, var in PDL_VARIANTS.items() if variants else ():
                with _pdl_variant(**var):
                    v_out, v_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
                checks[f"step_{name}"] = bool(torch.equal(v_idx, idx) and torch.equal(v_out, out))
            if variants and B <= LATENCY_MAX_B:  # other launch knobs: same selection, attention within the rule
                for name, spec in LATENCY_VARIANTS.items():
                    with _module_flags(spec):
                        v_out, v_idx = decode_step(q, q_w, k_codes, k, v, lens, **step_kw)
                    checks[f"step_{name}"] = bool(torch.equal(v_idx, idx)) and attention_close(
                        v_out, ref64, lowp, atol=1e-4)[0]
            del kg, vg
            verified = all(checks.values())
            row = dict(model=model, Hq=Hq, Hkv=HKV, G=G, D=HEAD_DIM, L=L, B=B, budget=budget,
                       token_score=cfg["token_score"],
                       k_blocks=kb, selected_tokens=int(valid.sum().item()) // (B * HKV),
                       dense_backend=dense_backend, input_sets=n_sets, verified=verified,
                       checks=checks,
                       attend_err=err, attend_torch_err=base)
            if verified:
                t = {"dense": t_dense, "dense_eager": t_dense_eager}
                t.update(_stage_times(sets, qs, q_w, kb, scale, reps, variants))
                code_bytes = B * HKV * L * (BITS // 8)
                kv_bytes = int(valid.sum().item()) * HEAD_DIM * 2 * 2
                row.update(
                    times_us=t,
                    bw_frac=dict(
                        select=code_bytes / (t["select_exact"] * 1e-6) / 1e9 / copy_gbs,
                        select_majority=code_bytes / (t["select_majority"] * 1e-6) / 1e9 / copy_gbs,
                        attend=kv_bytes / (t["attend"] * 1e-6) / 1e9 / copy_gbs,
                        dense=dense_bytes / (t["dense"] * 1e-6) / 1e9 / copy_gbs,
                    ),
                    speedup=t["dense"] / t["step"],
                    speedup_before=t["dense"] / t["step_before"],
                    speedup_fused=t["dense"] / min(t.get("step_fused", math.nan), t.get("step_fused_r64", math.nan)),
                    speedup_eager=t["dense_eager"] / t["step_eager"],
                    floor_speedup=dense_bytes / (code_bytes + kv_bytes),
                    target=TARGETS.get((budget, B)) if L == 131072 else None,
                )
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


SCAN_KNOBS = [  # (BLOCK_T, TARGET_PROGRAMS, SCAN_WARPS, SELECT_ARITY, FUSED_SELECT); 1st: default
    (512, 1 << 16, 4, 2, False), (256, 1 << 16, 2, 2, False), (256, 1 << 16, 2, 16, False),
    (256, 1 << 16, 2, 16, True), (128, 1 << 16, 1, 2, False),
]
ATTEND_KNOBS = [  # (TILE_N, WARPS, STAGES, TARGET_PROGRAMS, MIN_TILES_PER_SPLIT)
    (64, 4, 2, 264, 1), (32, 4, 2, 528, 1), (32, 2, 2, 528, 1), (64, 4, 2, 528, 1),
]


def sweep(reps: int) -> list[dict]:
    """Median times of hamming_topk and sparse_decode_attention under each launch knob set at
    L = 128K, every result checked equal to the default knobs' result first."""
    import importlib

    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention

    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    gen = torch.Generator(device="cuda").manual_seed(1)
    L, rows = 131072, []
    for B in (1, 8):
        k = torch.randn(B, HKV, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        n_sets = 4 if B == 1 else 1  # 16 MB of codes at B = 1: rotate 4 copies past the L2
        code_sets = [torch.randint(-(2**31), 2**31 - 1, (B, HKV, L, BITS // 32), device="cuda",
                                   dtype=torch.int32, generator=gen) for _ in range(n_sets)]
        k_codes = code_sets[0]
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        for G in (4, 8):
            q = torch.randn(B, HKV * G, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            w = torch.randn(HKV * G, HEAD_DIM, BITS, device="cuda", generator=gen)
            q_codes = hash_encode(q, w)
            q_sets = [hash_encode(torch.randn_like(q), w) for _ in code_sets]
            for mode in ("exact", "majority"):
                base = None
                for knobs in SCAN_KNOBS:
                    hk.BLOCK_T, hk.TARGET_PROGRAMS, hk.SCAN_WARPS, hk.SELECT_ARITY, hk.FUSED_SELECT = knobs
                    sel = [functools.partial(hamming_topk, qc, kc, lens, k_blocks=16,
                                             chunk_size=CHUNK, must_select=MUST_SELECT, mode=mode)
                           for qc, kc in zip(q_sets, code_sets)]
                    res = hamming_topk(q_codes, k_codes, lens, k_blocks=16, chunk_size=CHUNK,
                                       must_select=MUST_SELECT, mode=mode)
                    base = res if base is None else base
                    ok = bool(torch.equal(res, base))
                    t = cuda_time_us(sel, reps=reps) if ok else float("nan")
                    rows.append(dict(stage="select", B=B, G=G, mode=mode, knobs=knobs, ok=ok, us=t))
            for kb in (16, 103):
                idx = hamming_topk(q_codes, k_codes, lens, k_blocks=kb, chunk_size=CHUNK)
                idxs = [hamming_topk(qc, kc, lens, k_blocks=kb, chunk_size=CHUNK)
                        for qc, kc in zip(q_sets, code_sets)]
                base = None
                for knobs in ATTEND_KNOBS:
                    (ak.TILE_N, ak.WARPS, ak.STAGES, ak.TARGET_PROGRAMS,
                     ak.MIN_TILES_PER_SPLIT) = knobs
                    att = [functools.partial(sparse_decode_attention, q, k, v, ix, lens,
                                             chunk_size=CHUNK) for ix in idxs]
                    res = sparse_decode_attention(q, k, v, idx, lens, chunk_size=CHUNK)
                    base = res if base is None else base
                    ok = bool((res.float() - base.float()).abs().max().item() < 2e-2)
                    t = cuda_time_us(att, reps=reps) if ok else float("nan")
                    rows.append(dict(stage="attend", B=B, G=G, k_blocks=kb, knobs=knobs, ok=ok,
                                     us=t, kv_GBps=B * HKV * kb * CHUNK * HEAD_DIM * 4 / t / 1e3))
        torch.cuda.empty_cache()
    hk.BLOCK_T, hk.TARGET_PROGRAMS, hk.SCAN_WARPS, hk.SELECT_ARITY, hk.FUSED_SELECT = SCAN_KNOBS[0]
    (ak.TILE_N, ak.WARPS, ak.STAGES, ak.TARGET_PROGRAMS, ak.MIN_TILES_PER_SPLIT) = ATTEND_KNOBS[0]
    return rows


TABLE_HEAD = (
    f"{'model':<10} {'L':>6} {'B':>2} {'budget':>6} {'dense':>7} {'enc':>5} {'select':>6} "
    f"{'before':>6} {'fused':>6} {'f.r64':>6} {'search':>6} {'=scan':>6} {'+topk':>6} {'maj':>6} "
    f"{'attend':>6} {'2kern':>6} {'step':>6} {'before':>6} {'fused':>6} {'f.r64':>6} {'x':>6} "
    f"{'before':>6} {'xfused':>6} {'xeager':>6} {'floor':>5} {'sel%bw':>6} {'att%bw':>6} {'target':>6}"
)


def _table_line(r: dict) -> str:
    """One row of the printed table (TABLE_HEAD); a row that failed verification names the
    failed checks and shows no times."""
    head = f"{r['model']:<10} {r['L']:>6} {r['B']:>2} {r['budget']:>6}"
    if not r["verified"]:
        failed = [name for name, ok in r["checks"].items() if not ok]
        return f"{head} VERIFICATION FAILED ({', '.join(failed)}): no speedup reported"
    t, bw = collections.defaultdict(lambda: math.nan, r["times_us"]), r["bw_frac"]
    target = f"{r['target']:.1f}" if r["target"] else "-"
    return (f"{head} {t['dense']:7.1f} {t['encode']:5.1f} {t['select_exact']:6.1f} "
            f"{t['select_before']:6.1f} {t['select_fused']:6.1f} {t['select_fused_r64']:6.1f} "
            f"{t['select_search']:6.1f} {t['scan']:6.1f} {t['topk']:6.1f} "
            f"{t['select_majority']:6.1f} {t['attend']:6.1f} {t['attend_two_kernel']:6.1f} "
            f"{t['step']:6.1f} {t['step_before']:6.1f} {t['step_fused']:6.1f} {t['step_fused_r64']:6.1f} "
            f"{r['speedup']:6.2f} {r['speedup_before']:6.2f} {r['speedup_fused']:6.2f} "
            f"{r['speedup_eager']:6.2f} {r['floor_speedup']:5.1f} "
            f"{100 * bw['select']:5.0f}% {100 * bw['attend']:5.0f}% {target:>6}")


def run(args: argparse.Namespace) -> int:
    refused = kernel_bench_refusal("decode", args.reps)
    if refused is not None:
        return refused
    if args.sweep:
        rows = sweep(args.reps)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(bench="decode-sweep", device=torch.cuda.get_device_name(),
                               commit=_git_commit(), rows=rows), fh, indent=1)
        for r in rows:
            extra = r.get("mode") or f"kb={r.get('k_blocks')}"
            print(f"{r['stage']:<7} B={r['B']} G={r['G']} {extra:<9} {str(r['knobs']):<24} "
                  f"{'ok' if r['ok'] else 'MISMATCH'} {r['us']:8.1f} us")
        return 0 if all(r["ok"] for r in rows) else 1
    cfg = dict(QUICK if args.quick else FULL)
    cfg["token_score"] = getattr(args, "token_score", "hamming")
    cfg["variants"] = getattr(args, "variants", False)
    for name, conv in (("lengths", int), ("batches", int), ("budgets", str), ("models", str)):
        given = getattr(args, name, None)
        if given:
            cfg[name] = [conv(x) for x in given.split(",") if x]
    bad = [m for m in cfg["models"] if m not in MODELS]
    if bad:
        print(f"kvcomp bench decode: unknown --models {bad}; choose from {list(MODELS)}")
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    import triton

    result = dict(bench="decode", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, commit=_git_commit(), copy_GBps=copy_gbs,
                  token_score=cfg["token_score"], rows=[])
    rows = result["rows"]
    for L in cfg["lengths"]:
        for B in cfg["batches"]:
            new_rows = run_length_batch(L, B, cfg, args.reps, copy_gbs, gen)
            rows.extend(new_rows)
            for r in new_rows:  # as they come (a run cut short still shows them)
                print(_table_line(r), flush=True)
            if args.json:  # rewritten after each (L, B): a run cut short keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=1)
            torch.cuda.empty_cache()
    print(f"{result['device']}  copy {copy_gbs:.0f} GB/s (read + write)  commit {result['commit']}  "
          f"token score {cfg['token_score']}")
    print("times in us; 'before' = the kernels of session 5 in the same run (rows in their own "
          "launch, no signed planes, no programmatic dependent launch); 'fused' = histogram stage 2 "
          "in the scan's launch (B x Hkv <= 16), 'f.r64' with 64 registers; '2kern' = attention "
          "by split + merge kernels")
    print(TABLE_HEAD)
    for r in rows:
        print(_table_line(r))
    print("step us by PDL variant (any_rows: the decode kernels take PDL at any batch, not only "
          "B x Hkv <= 16; late_sa: select and attention signal their successor only as they exit; "
          "late_all: every kernel; late_all_attn: both)")
    print(f"{'model':<10} {'B':>2} {'budget':>6} {'step':>6} {'noPDL':>6} "
          + " ".join(f"{n:>13}" for n in PDL_VARIANTS))
    for r in rows:
        if r["verified"] and cfg.get("variants", False):
            t = r["times_us"]
            print(f"{r['model']:<10} {r['B']:>2} {r['budget']:>6} {t['step']:6.1f} {t['step_before']:6.1f} "
                  + " ".join(f"{t['step_' + n]:13.1f}" for n in PDL_VARIANTS))
    lat = [r for r in rows if r["verified"] and "step_" + next(iter(LATENCY_VARIANTS)) in r["times_us"]]
    if lat:
        print(f"step us by launch knob (B <= {LATENCY_MAX_B}): " + ", ".join(
            f"{n}: {spec}" for n, spec in LATENCY_VARIANTS.items()).replace("kvcomp.ops.", ""))
        print(f"{'model':<10} {'B':>2} {'budget':>6} {'step':>6} " + " ".join(f"{n:>13}" for n in LATENCY_VARIANTS))
        for r in lat:
            t = r["times_us"]
            print(f"{r['model']:<10} {r['B']:>2} {r['budget']:>6} {t['step']:6.1f} "
                  + " ".join(f"{t['step_' + n]:13.1f}" for n in LATENCY_VARIANTS))
    bad = not all(r["verified"] for r in rows)
    return 1 if bad else 0
