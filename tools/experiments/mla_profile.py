"""Where an MLA (DeepSeek-V3) decode step's time goes on the GPU, and latent-decode variants.

    python tools/experiments/mla_profile.py [--json PATH] [--batches 1,4,8] [--length 131072]
        [--parts select,dense,sparse]

DeepSeek-V3 geometry: 128 query heads on one latent kv-head, R = 512, P = 64, 512 + 64-bit split
codes (18 words), chunk 128, 2048 selected tokens, bf16. Every time is the median of CUDA-graph
replays with L2 flushed before each (``kvcomp.bench.mla``'s timer).

``select``: per batch, the sparse step's pieces: the query codes (``hash_encode_split``; the
two encodes + concatenation it replaced, and each encode alone), ``hamming_topk`` and its two
stages run alone (the scan ``block_keys_triton``, no histogram; stage 2 ``select_triton`` on the
scan's keys by the search), the sparse attention, the whole step; then ``hamming_topk`` under
module-flag variants (``SELECT_VARIANTS``). Every variant's selection is compared with the
default's (equal, or the row says so).

``encode``: the encode's tile kernel at several (rows, code words) a program (``ENCODE_TILES``),
for the split query codes, a 32K-token latent's split codes and a GQA layer's 32K keys.

``dense`` / ``sparse``: ``mla_decode`` (``sparse_mla_decode`` over 2048 random tokens) at its
default launch and at other (heads, tokens, warps, stages) tiles (``DENSE_CONFIGS``,
``SPARSE_CONFIGS``), each output compared with the default's (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

H, R, P, CHUNK, SELECTED, MUST = 128, 512, 64, 128, 2048, (0, -2, -1)
HK = "kvcomp.ops.hamming_topk.kernels"
MW = "kvcomp.ops.hamming_topk.mma_wide"
# session 16, second call (scan: wide tensor-core scan): its program count (1024 / 16384) and 8
# warps a program measured equal to the defaults (20.7 / 32.3 / 43.6 us at B = 1 / 4 / 8)
# third call: bins of several values (HIST_COARSE) slower than the search (21.7 / 33.4 / 45.9 us
# against 20.3 / 31.9 / 43.0), off since
# fifth call (PDL for the latent attention and its merge): the step without PDL (step[no_pdl])
# 59.1 / 106.9 / 165.6 against 55.6 / 105.1 / 164.3 us at B = 1 / 4 / 8; the query codes written
# into one buffer by hash_encode(out=) (the cache-append kernel) were slower than the two encodes
# + concatenation (18.7 / 45.7 / 76.9 against 12.9 / 16.3 / 19.6 us), reverted
# session 17: hash_encode_split (both parts in one launch of the encode kernels) as "qcodes", the
# previous form as "qcodes[cat]"
SELECT_VARIANTS = {
    "simt_scan": {MW: dict(MMA_WIDE=False)},  # session 15's selection
    "coarse_hist": {HK: dict(HIST_COARSE=True)},
    "arity4": {HK: dict(SELECT_ARITY=4)},  # session 17: stage 2's search, candidates a round
    "arity8": {HK: dict(SELECT_ARITY=8)},
    "arity16": {HK: dict(SELECT_ARITY=16)},
    "arity16_w4": {HK: dict(SELECT_ARITY=16, SELECT_WARPS=4)},
    "w4": {HK: dict(SELECT_WARPS=4)},
}
# session 16, first call: (64, 64, 8 warps, 2 stages) best at B = 4 / 8, (32, 64, 4, 2) at B = 1
# (173 against 178 us); swapped operands (the kv tile as q.k's A operand, a SWAP constexpr of the
# kernel then, removed since) slower in every tile: B = 1 / 4 / 8 at 64 x 64 x 8 warps 264 / 921 /
# 2499 us; 128 heads a program: out of shared memory
DENSE_CONFIGS = [
    dict(block_h=32, block_t=32, num_warps=4, num_stages=2),
    dict(block_h=64, block_t=32, num_warps=8, num_stages=2),
    dict(block_h=32, block_t=64, num_warps=4, num_stages=2),
]
SPARSE_CONFIGS = [
    dict(block_h=64, block_t=64, num_warps=8, num_stages=2),
    dict(block_h=64, block_t=32, num_warps=8, num_stages=2),
    dict(block_h=32, block_t=64, num_warps=4, num_stages=2),
    dict(block_h=16, block_t=32, num_warps=4, num_stages=2),
    dict(block_h=32, block_t=32, num_warps=4, num_stages=2, num_splits=64),
    dict(block_h=32, block_t=32, num_warps=4, num_stages=2, num_splits=16),
]


def _flags(mods: dict):
    """Set module flags; returns the undo dict."""
    import importlib

    undo = {}
    for name, kv in mods.items():
        m = importlib.import_module(name)
        undo[name] = {k: getattr(m, k) for k in kv}
        for k, v in kv.items():
            setattr(m, k, v)
    return undo


def inputs(B: int, L: int, dev: str):
    from kvcomp.hashing import HashWeights
    from kvcomp.ops import hash_encode

    hw = HashWeights.random_mla(1, R, P, 512, 64)
    w_lat, w_rope = hw.latent(0, device=dev)[0], hw.rope(0, device=dev)[0]
    g = torch.Generator(device=dev).manual_seed(B * 7 + L)
    dt = torch.bfloat16
    x = dict(
        ckv=torch.randn(B, L, R, device=dev, dtype=dt, generator=g),
        kpe=torch.randn(B, L, P, device=dev, dtype=dt, generator=g),
        q_lat=torch.randn(B, H, R, device=dev, dtype=dt, generator=g) * 0.06,
        q_pe=torch.randn(B, H, P, device=dev, dtype=dt, generator=g) * 0.06,
        seq_lens=torch.full((B,), L, dtype=torch.int32, device=dev),
        w_lat=w_lat, w_rope=w_rope,
    )
    x["k_codes"] = torch.cat([hash_encode(x["ckv"], w_lat), hash_encode(x["kpe"], w_rope)], -1).unsqueeze(1)
    return x


def part_select(B: int, L: int, timer, graph_time) -> dict:
    from kvcomp.ops import hamming_topk, hash_encode, hash_encode_split, sparse_mla_decode
    from kvcomp.ops.hamming_topk import kernels as hk

    x = inputs(B, L, "cuda")
    k_blocks = math.ceil(SELECTED / CHUNK)
    scale = 1 / math.sqrt(192.0)

    def qcodes():  # one launch (session 17)
        return hash_encode_split((x["q_lat"], x["q_pe"]), (x["w_lat"], x["w_rope"]))

    def qcodes_cat():  # before: two encodes and their concatenation
        return torch.cat([hash_encode(x["q_lat"], x["w_lat"]), hash_encode(x["q_pe"], x["w_rope"])], -1)

    def enc_lat():
        return hash_encode(x["q_lat"], x["w_lat"])

    def enc_pe():
        return hash_encode(x["q_pe"], x["w_rope"])

    qc = qcodes()
    q_cat = qcodes_cat()
    row0 = dict(qcodes_equal_cat=bool(torch.equal(qc, q_cat)),
                qcodes_bits_differing=int(((qc ^ q_cat) != 0).sum()))
    print(f"B={B} split query codes vs two encodes + cat: {row0}", flush=True)

    def select():
        return hamming_topk(qc, x["k_codes"], x["seq_lens"], k_blocks=k_blocks, chunk_size=CHUNK, must_select=MUST)

    def scan():
        return hk.block_keys_triton(qc, x["k_codes"], x["seq_lens"], CHUNK, "max", "exact")

    keys = scan()

    def stage2():
        return hk.select_triton(keys, x["seq_lens"], k_blocks, k_blocks, CHUNK, MUST)

    ref = select()
    assert torch.equal(stage2(), ref), "stage 2 alone differs from hamming_topk"

    def sparse():
        return sparse_mla_decode(x["q_lat"], x["q_pe"], x["ckv"], x["kpe"], ref, x["seq_lens"], chunk_size=CHUNK,
                                 scale=scale)

    def step():
        q2 = qcodes()
        bi = hamming_topk(q2, x["k_codes"], x["seq_lens"], k_blocks=k_blocks, chunk_size=CHUNK, must_select=MUST)
        return sparse_mla_decode(x["q_lat"], x["q_pe"], x["ckv"], x["kpe"], bi, x["seq_lens"], chunk_size=CHUNK,
                                 scale=scale)

    row = dict(B=B, L=L, code_bytes=x["k_codes"].numel() * 4, **row0)
    for name, fn in (("qcodes", qcodes), ("qcodes[cat]", qcodes_cat), ("encode_lat", enc_lat),
                     ("encode_pe", enc_pe), ("hamming_topk", select), ("scan", scan), ("stage2", stage2),
                     ("sparse", sparse), ("step", step)):
        row[name] = graph_time(fn, timer)
        print(f"B={B} {name}: {row[name]}", flush=True)
    for var, mods in SELECT_VARIANTS.items():
        undo = _flags(mods)
        try:
            same = torch.equal(select(), ref)
            row[f"hamming_topk[{var}]"] = graph_time(select, timer) if same else "selection differs"
        finally:
            _flags(undo)
        print(f"B={B} hamming_topk[{var}]: {row[f'hamming_topk[{var}]']}", flush=True)
    undo = _flags({"kvcomp.ops._pdl": dict(ENABLED=False)})  # the whole step without PDL
    try:
        row["step[no_pdl]"] = graph_time(step, timer)
    finally:
        _flags(undo)
    print(f"B={B} step[no_pdl]: {row['step[no_pdl]']}", flush=True)
    return row


ENCODE_TILES = [(16, 1), (32, 1), (64, 1), (16, 2), (32, 2), (64, 2), (16, 4), (32, 4), (64, 4), (128, 2)]


def part_encode(B: int, timer, graph_time) -> list:
    """The encode's tile kernel at (rows, code words) a program (``ENCODE_TILES``) against its
    default pick, for MLA's split query codes at this batch (B x 128 rows of 512 + 64 dims) and,
    once, the split key codes of a 32K-token latent and a Qwen3-8B layer's 32K keys (8 heads x
    128 dims, 128 bits; prefill hashing). Each result compared with the default's."""
    from kvcomp.ops import hash_encode, hash_encode_split
    from kvcomp.ops.hash_encode import kernels as he

    x = inputs(B, 8, "cuda")
    shapes = {f"q_split[B={B}]": lambda: hash_encode_split((x["q_lat"], x["q_pe"]), (x["w_lat"], x["w_rope"])),
              f"q_cat[B={B}]": lambda: torch.cat([hash_encode(x["q_lat"], x["w_lat"]),
                                                  hash_encode(x["q_pe"], x["w_rope"])], -1)}
    if B == 1:
        g = torch.Generator(device="cuda").manual_seed(5)
        lat = torch.randn(1, 1, 32768, R, device="cuda", dtype=torch.bfloat16, generator=g)
        pe = torch.randn(1, 1, 32768, P, device="cuda", dtype=torch.bfloat16, generator=g)
        kq = torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        wq = torch.randn(8, 128, 128, device="cuda", generator=g)
        shapes["k_split[32K]"] = lambda: hash_encode_split((lat, pe), (x["w_lat"], x["w_rope"]))
        shapes["gqa_keys[32K]"] = lambda: hash_encode(kq, wq)
    rows = []
    for name, fn in shapes.items():
        ref = fn()
        row = dict(shape=name, default=graph_time(fn, timer))
        for bn, wpp in ENCODE_TILES:
            he.TILE_BLOCK_N, he.TILE_WPP = bn, wpp
            try:
                same = torch.equal(fn(), ref)
                row[f"{bn}x{wpp}"] = graph_time(fn, timer) if same else "codes differ"
            except Exception as e:  # e.g. out of shared memory
                row[f"{bn}x{wpp}"] = f"{type(e).__name__}"
            finally:
                he.TILE_BLOCK_N = he.TILE_WPP = None
        print(f"encode {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items() if k != "shape"), flush=True)
        rows.append(row)
    return rows


def part_dense(B: int, L: int, timer, graph_time, sparse: bool = False) -> list:
    from kvcomp.ops.sparse_mla_decode.kernels import mla_decode_launch

    x = inputs(B, L, "cuda")
    scale = 1 / math.sqrt(192.0)
    bi, chunk, n = None, 1, L
    if sparse:
        g = torch.Generator(device="cpu").manual_seed(B)
        nb = SELECTED // CHUNK
        bi = torch.stack([torch.randperm(L // CHUNK, generator=g)[:nb] for _ in range(B)]).to(torch.int32)
        bi, chunk, n = bi.view(B, 1, nb).cuda(), CHUNK, SELECTED
    args = (x["q_lat"], x["q_pe"], x["ckv"], x["kpe"], bi, x["seq_lens"], chunk, scale)
    ref = mla_decode_launch(*args)
    flops = 2 * B * H * n * (2 * R + P)
    rows = []
    for cfg in [{}] + (SPARSE_CONFIGS if sparse else DENSE_CONFIGS):
        try:
            out = mla_decode_launch(*args, **cfg)
            diff = (out.float() - ref.float()).abs().max().item()
            us = graph_time(lambda c=cfg: mla_decode_launch(*args, **c), timer)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is a result
            diff, us = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        r = dict(B=B, L=L, op="sparse" if sparse else "dense", config=cfg or "default", us=us,
                 max_abs_diff=diff)
        if isinstance(us, float):
            r["tflops"] = flops / us / 1e6
        rows.append(r)
        print(f"{r['op']} B={B} {cfg or 'default'}: {us} diff {diff}", flush=True)
    return rows


def main() -> int:
    from kvcomp.bench.mla import _graph_time, _timer
    from kvcomp.bench.timing import positive_ints

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=positive_ints, default=[1, 4, 8])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--parts", default="select,dense,sparse")
    p.add_argument("--json")
    a = p.parse_args()
    timer = _timer(torch.device("cuda"), 100)
    res = dict(device=torch.cuda.get_device_name(), select=[], dense=[], encode=[])
    for B in a.batches:
        if "encode" in a.parts:
            res["encode"] += part_encode(B, timer, _graph_time)
        if "select" in a.parts:
            res["select"].append(part_select(B, a.length, timer, _graph_time))
        if "dense" in a.parts:
            res["dense"] += part_dense(B, a.length, timer, _graph_time)
        if "sparse" in a.parts:
            res["dense"] += part_dense(B, a.length, timer, _graph_time, sparse=True)
        torch.cuda.empty_cache()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
