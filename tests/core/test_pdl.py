"""Programmatic dependent launch (``kvcomp.ops._pdl``) of the decode-step kernels.

PDL lets a kernel start while its predecessor still runs; a kernel that reads its predecessor's
output before waiting would read stale memory. These tests hunt for that on the GPU: many
decode steps back to back in one CUDA graph, each on its own inputs, so that every kernel's
predecessor wrote something it reads (indices, histograms, ticket counters, partials) and every
step's inputs differ from the step before; the results must be bit-identical to the same steps
with PDL off, and the selections equal to the reference. The PTX side (the wait comes before
any memory access) is checked on the CPU by ``test_kernels_compile.py``."""

import pytest
import torch
from kvcomp.ops import _pdl
from kvcomp.ops.decode_step import decode_step
from kvcomp.ops.hamming_topk import hamming_topk
from kvcomp.ops.hash_encode import hash_encode


def test_pdl_off_for_cpu_tensors():
    assert _pdl.pdl_args(torch.zeros(1)) == {}
    assert not _pdl.pdl_supported(torch.device("cpu"))


def test_pdl_rules_by_rows_and_role(monkeypatch):
    """Where PDL applies (forced here on a CPU tensor): decode kernels up to DECODE_MAX_ROWS rows
    (or the caller's max_rows); the attention lets its successor launch early (PDL 1) only up to
    its EARLY_TRIGGER_MAX_ROWS, above as its programs exit (PDL 2); NO_TRIGGER roles always 2."""
    monkeypatch.setattr(_pdl, "pdl_supported", lambda device: True)
    monkeypatch.setattr(_pdl, "ENABLED", True)
    monkeypatch.setattr(_pdl, "DECODE_MAX_ROWS", 64)
    monkeypatch.setattr(_pdl, "EARLY_TRIGGER_MAX_ROWS", {"attention": 16})
    monkeypatch.setattr(_pdl, "NO_TRIGGER", frozenset({"gemv_gated"}))
    t = torch.zeros(1)
    on = {"launch_pdl": True}
    assert _pdl.pdl_args(t, "attention", rows=16) == dict(on, PDL=1)
    assert _pdl.pdl_args(t, "attention", rows=17) == dict(on, PDL=2)
    assert _pdl.pdl_args(t, "attention", rows=64) == dict(on, PDL=2)
    assert _pdl.pdl_args(t, "attention", rows=65) == {}
    assert _pdl.pdl_args(t, "attention", rows=20, max_rows=16) == {}
    assert _pdl.pdl_args(t, "scan", rows=64) == dict(on, PDL=1)
    assert _pdl.pdl_args(t, "gemv") == dict(on, PDL=1)
    assert _pdl.pdl_args(t, "gemv_gated") == dict(on, PDL=2)
    monkeypatch.setattr(_pdl, "ENABLED", False)
    assert _pdl.pdl_args(t, "scan", rows=1) == {}


def _sets(n, B, Hkv, G, D, L, lens, bits, dtype, gen, centered=False):
    dev = "cuda"
    kv_w = torch.linalg.qr(torch.randn(Hkv, D, D, generator=gen))[0][..., :bits].contiguous().to(dev)
    out = []
    for _ in range(n):
        k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).to(dev)
        v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).to(dev)
        q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype).to(dev)
        scale = (torch.rand(B, Hkv, L, generator=gen) + 0.5).half().to(dev) if centered else None
        out.append(dict(q=q, k=k, v=v, codes=hash_encode(k, kv_w), scale=scale,
                        lens=torch.tensor(lens, dtype=torch.int32, device=dev)))
    return kv_w.repeat_interleave(G, 0), out


def _run_graph(q_w, sets, **kw):
    """All steps back to back in one captured graph (warm-up first), replayed twice."""
    def steps():
        return [decode_step(s["q"], q_w, s["codes"], s["k"], s["v"], s["lens"], k_scale=s["scale"],
                            **kw) for s in sets]

    steps()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = steps()
    results = []
    for _ in range(2):
        for o, i in outs:  # poison what the graph writes
            o.fill_(float("nan"))
            i.fill_(-7)
        g.replay()
        torch.cuda.synchronize()
        results.append([(o.clone(), i.clone()) for o, i in outs])
    return results


@pytest.mark.gpu
@pytest.mark.parametrize(
    "G,lens,k_blocks,mode,chunk_repre,two_kernel,no_trigger,Hkv",
    [
        (4, [4097, 1, 2500], 7, "exact", "max", False, (), 3),  # histogram stage 2, fused merge
        (8, [4097, 129, 4000], 9, "exact", "max", False, (), 3),  # signed planes, rows in the scan
        (4, [4097, 3000, 127], 5, "majority", "max", True, (), 3),  # merge kernel (5 launches a step)
        (2, [4097] * 3, 12, "exact", "lse", False, (), 3),  # lse: float keys, search stage 2
        (4, [4097, 1, 2500], 7, "exact", "max", True, ("select", "attention"), 3),  # late triggers
        (8, [4097, 129, 4000], 9, "exact", "max", False, ("encode", "scan", "select", "attention"), 3),
        # 64 rows (B = 8 of Qwen3-8B's 8 kv-heads): the 512-program attention plan, capped registers
        (4, [4097, 1, 2500, 129, 4000, 3000, 127, 4097], 7, "exact", "max", False, (), 8),
        (8, [4097, 1, 2500, 129, 4000, 3000, 127, 4097], 9, "exact", "max", False, (), 8),
    ],
)
def test_gpu_pdl_steps_bit_identical(monkeypatch, G, lens, k_blocks, mode, chunk_repre, two_kernel,
                                     no_trigger, Hkv):
    if not torch.cuda.is_available() or not _pdl.pdl_supported(torch.device("cuda")):
        pytest.skip("needs a CUDA GPU of compute capability >= 9.0")
    from kvcomp.ops.sparse_decode_attention import kernels as ak

    monkeypatch.setattr(_pdl, "NO_TRIGGER", frozenset(no_trigger))
    monkeypatch.setattr(_pdl, "DECODE_MAX_ROWS", 64)  # B x Hkv = 9 or 64 here: PDL on
    if two_kernel:
        monkeypatch.setattr(ak, "FUSED_MERGE", False)
    gen = torch.Generator().manual_seed(G * 100 + k_blocks)
    B, D, L = len(lens), 128, max(lens)
    q_w, sets = _sets(6, B, Hkv, G, D, L, lens, 128, torch.bfloat16, gen,
                      centered=chunk_repre == "lse")
    kw = dict(k_blocks=k_blocks, chunk_size=64, must_select=(0, -2, -1), mode=mode,
              chunk_repre=chunk_repre)
    monkeypatch.setattr(_pdl, "ENABLED", True)
    assert _pdl.pdl_args(sets[0]["q"], "scan")["launch_pdl"]
    with_pdl = _run_graph(q_w, sets, **kw)
    monkeypatch.setattr(_pdl, "ENABLED", False)
    assert _pdl.pdl_args(sets[0]["q"]) == {}
    without = _run_graph(q_w, sets, **kw)
    if chunk_repre == "max":  # lse: float sums, compared with a near-tie rule elsewhere
        for s, (_, i_off) in zip(sets, without[0]):
            want = hamming_topk(hash_encode(s["q"], q_w), s["codes"], s["lens"], k_blocks=k_blocks,
                                chunk_size=64, must_select=(0, -2, -1), mode=mode,
                                k_scale=s["scale"], backend="reference")
            assert torch.equal(i_off, want)
    for replay in with_pdl:
        for (o, i), (o_off, i_off) in zip(replay, without[0]):
            assert torch.equal(i, i_off)
            assert not torch.isnan(o).any()
            assert torch.equal(o, o_off)
