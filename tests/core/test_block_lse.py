"""``hamming_topk(chunk_repre="lse")``: blocks ranked by the log-sum-exp of logit estimates.

What is established:
  * ``lse_logits_ref`` is sin(pi/2 s / S) * k_scale * q_scale on hand values, and the reference
    block scores equal an independent float64 computation from unpacked code bits;
  * with one token per block "lse" selects exactly what "max" selects (the sine is monotone);
  * the Triton kernel (interpreter on CPU; ``-m gpu`` at real shapes) selects what the reference
    selects, up to blocks whose reference scores lie within rounding of the row's threshold:
    every GQA ratio, the exact and majority forms, with and without key norms, ragged lengths,
    awkward chunk sizes, a tensor budget;
  * bad input: a missing q_scale, a q_scale without "lse", a wrong shape, each a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvcomp.ops._common import unpack_bits
from kvcomp.ops.hamming_topk import hamming_topk, majority_codes
from kvcomp.ops.hamming_topk.reference import (
    block_scores_ref,
    lse_logits_ref,
    token_scores_ref,
)


def codes(*shape, gen, device="cpu"):
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen).to(device)


def inputs(B, Hkv, G, L, W, gen, device="cpu", norms=True):
    q = codes(B, Hkv * G, W, gen=gen, device=device)
    k = codes(B, Hkv, L, W, gen=gen, device=device)
    ks = (torch.rand(B, Hkv, L, generator=gen) * 3 + 0.1).half().to(device) if norms else None
    qs = (torch.rand(B, Hkv, generator=gen) * 2 + 0.5).to(device)
    return q, k, ks, qs


def test_lse_logits_formula():
    s = torch.tensor([[[0, 128, -128, 64]]], dtype=torch.int32)
    ks = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    qs = torch.tensor([[0.5]])
    got = lse_logits_ref(s, 128, qs, ks)
    want = torch.tensor([0.0, 1.0, -1.5, 2.0 * math.sin(math.pi / 4)])
    torch.testing.assert_close(got[0, 0], want, rtol=1e-6, atol=1e-7)


def test_reference_block_scores_equal_float64_from_bits():
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, L, W, C = 2, 2, 3, 50, 2, 8
    q, k, ks, qs = inputs(B, Hkv, G, L, W, gen)
    lens = torch.tensor([50, 21])
    sq = unpack_bits(q).double() * 2 - 1  # [B, Hq, BITS]
    sk = unpack_bits(k).double() * 2 - 1  # [B, Hkv, L, BITS]
    s = torch.einsum("bhgx,bhlx->bhl", sq.view(B, Hkv, G, -1), sk)  # group sum of BITS - 2 Ham
    x = torch.sin(math.pi / 2 * s / (G * 32 * W)) * ks.double() * qs.double().unsqueeze(-1)
    nb = -(-L // C)
    x = torch.nn.functional.pad(x, (0, nb * C - L), value=-math.inf)
    valid = torch.arange(nb * C).view(1, 1, -1) < lens.view(-1, 1, 1)
    want = torch.logsumexp(x.masked_fill(~valid, -math.inf).view(B, Hkv, nb, C), -1)
    got = block_scores_ref(lse_logits_ref(token_scores_ref(q, k), G * 32 * W, qs, ks), lens, C, "lse")
    real = torch.isfinite(want)
    assert torch.equal(real, torch.isfinite(got))
    torch.testing.assert_close(got[real], want[real], rtol=1e-6, atol=1e-6)


def test_one_token_blocks_select_as_max():
    gen = torch.Generator().manual_seed(1)
    q, k, _, qs = inputs(2, 2, 4, 90, 1, gen, norms=False)
    lens = torch.tensor([90, 33])
    for backend in ("reference", "triton"):
        got = hamming_topk(q, k, lens, k_blocks=17, chunk_size=1, chunk_repre="lse", q_scale=qs, backend=backend)
        want = hamming_topk(q, k, lens, k_blocks=17, chunk_size=1, backend="reference")
        assert torch.equal(got, want), backend


def assert_same_up_to_near_ties(got, want, scores, lens, chunk, tol=1e-4):
    """got / want int32 [B, H, K] selections, scores float64 [B, H, NB] the reference block
    scores: equal sets, except that a block in one and not the other must score within ``tol``
    (relative to the row's largest score) of the lowest score the reference selected."""
    assert got.shape == want.shape
    B, H, _ = got.shape
    for b in range(B):
        n = -(-int(lens[b]) // chunk)
        for h in range(H):
            a = set(got[b, h].tolist()) - {-1}
            r = set(want[b, h].tolist()) - {-1}
            assert len(a) == len(r) and all(0 <= i < n for i in a)
            if a == r:
                continue
            row = scores[b, h, :n]
            thr = min(float(row[i]) for i in r - a)
            eps = tol * max(1.0, float(row[torch.isfinite(row)].abs().max()))
            for i in a - r:
                assert float(row[i]) >= thr - eps, (b, h, i, float(row[i]), thr)
    got_sorted = torch.sort(torch.where(got < 0, torch.iinfo(torch.int32).max, got), -1).values
    assert torch.equal(torch.where(got_sorted == torch.iinfo(torch.int32).max, -1, got_sorted), got)


def check_against_reference(q, k, lens, ks, qs, chunk, mode="exact", **kw):
    got = hamming_topk(q, k, lens, chunk_size=chunk, chunk_repre="lse", k_scale=ks, q_scale=qs, mode=mode,
                       backend="triton", **kw)
    want = hamming_topk(q, k, lens, chunk_size=chunk, chunk_repre="lse", k_scale=ks, q_scale=qs, mode=mode,
                        backend="reference", **kw)
    qc = majority_codes(q, k.shape[1]) if mode == "majority" else q
    rows = qc.shape[1] // k.shape[1]
    logits = lse_logits_ref(token_scores_ref(qc.cpu(), k.cpu()), rows * 32 * q.shape[2], qs.cpu(),
                            None if ks is None else ks.cpu())
    scores = block_scores_ref(logits, lens.cpu(), chunk, "lse")
    assert_same_up_to_near_ties(got.cpu(), want.cpu(), scores, lens.cpu(), chunk)
    return got, want


@pytest.mark.parametrize("G,mode", [(1, "exact"), (3, "exact"), (4, "majority"), (8, "exact"),
                                    (8, "exact_planes")])
@pytest.mark.parametrize("norms", [True, False])
def test_triton_matches_reference(G, mode, norms):
    gen = torch.Generator().manual_seed(G + 10 * norms)
    q, k, ks, qs = inputs(3, 2, G, 300, 2, gen, norms=norms)
    lens = torch.tensor([300, 1, 129])
    got, want = check_against_reference(q, k, lens, ks, qs, 16, mode=mode, k_blocks=5)
    assert (got[1] == torch.tensor([0, -1, -1, -1, -1], dtype=torch.int32)).all()


@pytest.mark.parametrize("chunk", [5, 100])
def test_triton_chunks_and_tensor_budget(chunk):
    gen = torch.Generator().manual_seed(chunk)
    q, k, ks, qs = inputs(2, 3, 2, 515, 4, gen)
    lens = torch.tensor([515, 260])
    kb = torch.tensor([4, 2])
    check_against_reference(q, k, lens, ks, qs, chunk, k_blocks=kb, max_blocks=6, must_select=(0, -1))


def test_errors():
    gen = torch.Generator().manual_seed(3)
    q, k, ks, qs = inputs(1, 2, 2, 40, 1, gen)
    lens = torch.tensor([40])
    with pytest.raises(ValueError, match="needs q_scale"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=8, chunk_repre="lse")
    with pytest.raises(ValueError, match="q_scale is for chunk_repre='lse'"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=8, q_scale=qs)
    with pytest.raises(ValueError, match="q_scale must have 2 dims"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=8, chunk_repre="lse", q_scale=qs.view(-1))
    with pytest.raises(ValueError, match=r"q_scale must be \[B, Hkv\]"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=8, chunk_repre="lse", q_scale=qs.t().contiguous())
    with pytest.raises(TypeError, match="q_scale"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=8, chunk_repre="lse", q_scale=qs.double())


def check_query_scale_in_scan(G, T, D, mode, B=3, Hkv=2, lens=(200, 1, 77), W=2, chunk=16, kb=4,
                              device="cpu"):
    """``_q=q`` (decode_step's path): the scan computes q_scale from the queries, over the G x T
    rows of each kv-head. Its block keys equal those from ``lse_query_scale(q)`` to rounding, the
    selection equals the reference's up to near ties (non-contiguous q)."""
    from kvcomp.ops.hamming_topk.kernels import block_keys_triton
    from kvcomp.ops.query_codes import lse_query_scale

    gen = torch.Generator().manual_seed(G * 100 + T * 10 + D)
    L = max(lens)
    _, k, ks, _ = inputs(B, Hkv, G * T, L, W, gen, device=device)
    qc = codes(B, Hkv * G * T, W, gen=gen, device=device)
    shape = (B, Hkv * G, D) if T == 1 else (B, Hkv * G, T, D)
    q = (torch.randn(*shape[:-1], 2 * D, generator=gen) * 3).to(device)[..., ::2]  # strided last dim
    lens = torch.tensor(lens, device=device)
    qs = lse_query_scale(q, Hkv)
    q2 = q if T == 1 else q.reshape(B, -1, D)
    keys_q = block_keys_triton(qc, k, lens, chunk, "lse", mode, k_scale=ks, q=q2)
    keys_s = block_keys_triton(qc, k, lens, chunk, "lse", mode, k_scale=ks, q_scale=qs)
    for b in range(B):  # the order-preserving int32 images: equal up to a few ulps of the fp32
        nb = -(-int(lens[b]) // chunk)
        assert (keys_q[b, :, :nb].long() - keys_s[b, :, :nb].long()).abs().max() <= 64
    kw = dict(chunk_size=chunk, chunk_repre="lse", k_scale=ks, mode=mode, k_blocks=kb)
    got = hamming_topk(qc, k, lens, backend="triton", _q=q, **kw)
    ref = hamming_topk(qc, k, lens, backend="reference", _q=q, **kw)
    want = hamming_topk(qc, k, lens, backend="reference", q_scale=qs, **kw)
    assert torch.equal(ref, want)  # the reference path computes lse_query_scale(q)
    qcm = majority_codes(qc, Hkv) if mode == "majority" else qc
    logits = lse_logits_ref(token_scores_ref(qcm.cpu(), k.cpu()), qcm.shape[1] // Hkv * 32 * W, qs.cpu(),
                            ks.cpu())
    assert_same_up_to_near_ties(got.cpu(), want.cpu(), block_scores_ref(logits, lens.cpu(), chunk, "lse"),
                                lens.cpu(), chunk)
    return qc, k, lens, qs, q


@pytest.mark.parametrize("G,T,D,mode", [(3, 1, 48, "exact"), (4, 2, 64, "exact"), (4, 1, 32, "majority"),
                                        (1, 1, 16, "exact")])
def test_query_scale_computed_in_the_scan(G, T, D, mode):
    qc, k, lens, qs, q = check_query_scale_in_scan(G, T, D, mode)
    with pytest.raises(ValueError, match="_q replaces q_scale"):
        hamming_topk(qc, k, lens, chunk_size=16, chunk_repre="lse", k_blocks=4, q_scale=qs, _q=q)
    with pytest.raises(ValueError, match="_q replaces q_scale"):
        hamming_topk(qc, k, lens, chunk_size=16, k_blocks=4, _q=q)
    with pytest.raises(ValueError, match="q must be"):
        hamming_topk(qc, k, lens, chunk_size=16, chunk_repre="lse", k_blocks=4, _q=q[:, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("G,T", [(4, 1), (8, 1), (4, 4)])
def test_gpu_query_scale_computed_in_the_scan(G, T):
    check_query_scale_in_scan(G, T, 128, "exact", B=4, Hkv=8, lens=(4097, 1, 127, 2050), W=4, chunk=128,
                              kb=7, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("G,mode", [(4, "exact"), (8, "exact"), (8, "majority")])
def test_gpu_real_shapes(G, mode):
    gen = torch.Generator().manual_seed(G)
    q, k, ks, qs = inputs(4, 8, G, 4097, 4, gen, device="cuda")
    lens = torch.tensor([4097, 1, 127, 2050], device="cuda")
    check_against_reference(q, k, lens, ks, qs, 128, mode=mode, k_blocks=7)
    check_against_reference(q, k, lens, None, qs, 16, mode=mode, k_blocks=40)


# ----------------------------------------------------------------------------- through the model
def test_integration_decode_and_verify_select_by_lse(monkeypatch):
    """``chunk_repre_method="lse"`` in the config: a decode step and a verify step of a tiny
    llama select what ``decode_step``'s reference selects from the same cache with "lse", and
    not what "max" selects."""
    import importlib.util
    from pathlib import Path

    import kvcomp
    import kvcomp.attention as kattn
    from kvcomp.ops.decode_step import decode_step

    spec = importlib.util.spec_from_file_location(
        "_kvcomp_checks_lse", Path(__file__).resolve().parent / "test_integration_llama.py")
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    model = checks.tiny_model("llama")
    cfg = checks.config_for(model, threshold=16, chunk_size=4, ratio=0.25, token_score="centered_norm",
                            chunk_repre_method="lse")
    calls = []
    real = kattn._sparse_decode

    def spy(query, layer, binding, mode, scaling):
        out = real(query, layer, binding, mode, scaling)
        L = layer.max_len
        calls.append((query.clone(), binding.kv_weight, layer.codes_buf[:, :, :L].clone(), layer.keys_buf[:, :, :L].clone(),
                      layer.values_buf[:, :, :L].clone(), layer.seq_lens.clone(), layer.norms_buf[:, :, :L].clone(),
                      layer.step_block_idx.clone(), binding.handle.policy.k_blocks(binding.layer_idx, L),
                      binding.handle.policy.max_k_blocks(binding.layer_idx, L)))
        return out

    monkeypatch.setattr(kattn, "_sparse_decode", spy)
    h = kvcomp.enable(model, cfg)
    ck = checks.cache_kw(model)
    try:
        with torch.no_grad():
            cache = h.new_cache()
            model(checks.prompt(61), **{ck: cache}, use_cache=True)
            model(checks.prompt(1, seed=5), **{ck: cache}, use_cache=True)  # decode
            model(checks.prompt(3, seed=6), **{ck: cache}, use_cache=True)  # verify
    finally:
        h.disable()
    compute = [c for c in calls if c[0].shape[2] in (1, 3)]
    assert len(compute) == 2 * len(h.policy.compute_layers)
    differs = False
    for q, q_w, codes, k, v, lens, norms, idx, kb, width in compute:
        q = q[:, :, 0] if q.shape[2] == 1 else q
        kw = dict(k_blocks=kb, max_blocks=width, chunk_size=4, k_scale=norms, backend="reference")
        _, want = decode_step(q, q_w, codes, k, v, lens, chunk_repre="lse", **kw)
        assert torch.equal(idx, want)
        _, by_max = decode_step(q, q_w, codes, k, v, lens, chunk_repre="max", **kw)
        differs |= not torch.equal(idx, by_max)
    assert differs, "lse selected what max selects at every step: the setting was not used"


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2, 4])
def test_gpu_decode_step_lse(B):
    """``decode_step`` with "lse" and key norms on the H200 (q_scale inside the scan, the early
    loads under PDL at these row counts), 4 steps in a row at 32K, ragged: the selection equals
    the reference's up to near ties, and the output is the attention over that selection."""
    from kvcomp.ops import hash_encode, sparse_decode_attention
    from kvcomp.ops.decode_step import decode_step
    from kvcomp.ops.query_codes import lse_query_scale

    gen = torch.Generator(device="cuda").manual_seed(B)
    Hkv, G, D, L, chunk, kb = 8, 4, 128, 32768, 128, 16
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_w = torch.linalg.qr(torch.randn(Hkv, D, D, device="cuda", generator=gen))[0].contiguous()
    q_w = kv_w.repeat_interleave(G, 0)
    k_codes = hash_encode(k, kv_w)
    norms = (torch.rand(B, Hkv, L, device="cuda", generator=gen) + 0.5).half()
    lens = torch.tensor([L - 1000 * i for i in range(B)], dtype=torch.int32, device="cuda")
    for _ in range(4):
        q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        out, idx = decode_step(q, q_w, k_codes, k, v, lens, k_blocks=kb, chunk_size=chunk, chunk_repre="lse",
                               k_scale=norms)
        qc, qs = hash_encode(q, q_w), lse_query_scale(q, Hkv)
        want = hamming_topk(qc, k_codes, lens, k_blocks=kb, chunk_size=chunk, chunk_repre="lse", k_scale=norms,
                            q_scale=qs, backend="reference")
        logits = lse_logits_ref(token_scores_ref(qc.cpu(), k_codes.cpu()), G * 128, qs.cpu(), norms.cpu())
        assert_same_up_to_near_ties(idx.cpu(), want.cpu(), block_scores_ref(logits, lens.cpu(), chunk, "lse"),
                                    lens.cpu(), chunk)
        assert torch.equal(sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk), out)
