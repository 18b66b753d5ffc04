"""kvcomp.ops.gemv against its fp32 reference: both tile forms, awkward shapes, strides, bias."""

import importlib

import pytest
import torch
from kvcomp.ops._common import interpreting
from kvcomp.ops.gemv import GEMV_CONFIG, GEMV_CONFIG_ONE_ROW, gemv, gemv_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CONFIGS = [dict(form="dot", block_n=16, block_k=32), dict(form="fma", block_n=8, block_k=32)]


def _close(y, ref):
    # one or two roundings to the output dtype after an fp32 sum in another order
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[ref.dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["form"])
@pytest.mark.parametrize("M,N,K", [(1, 37, 70), (3, 64, 96), (4, 17, 5), (1, 1, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_matches_reference(cfg, M, N, K, dtype, dev):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    w = torch.randn(N, K, generator=g).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    for bias in (None, b):
        y = gemv(x, w, bias, backend="triton", config=cfg)
        assert y.shape == (M, N) and y.dtype == dtype
        _close(y, gemv_ref(x, w, bias))
    # every output feature depends on its own weight row: a permutation of rows permutes y
    # (exactly, except the interpreter's tl.dot: numpy's matmul may sum an edge row of a
    # tile in another order, ~1 ulp; an indexing bug moves whole values)
    perm = torch.randperm(N, generator=g).to(dev)
    want = gemv(x, w, backend="triton", config=cfg)[:, perm]
    atol = 1e-6 * float(want.abs().max()) if cfg["form"] == "dot" and dev == "cpu" else 0
    torch.testing.assert_close(gemv(x, w[perm], backend="triton", config=cfg), want, rtol=0, atol=atol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["form"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_residual_epilogue(cfg, dtype, dev):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 1, 40, generator=g).to(dev, dtype)
    w = torch.randn(24, 40, generator=g).to(dev, dtype)
    r = torch.randn(2, 1, 24, generator=g).to(dev, dtype)
    got = gemv(x, w, residual=r, backend="triton", config=cfg)
    if dtype == torch.float32 or dev == "cuda" or not interpreting():  # the interpreter truncates fp32 -> bf16
        # the same as rounding the projection first, then torch's add
        assert torch.equal(got, r + gemv(x, w, backend="triton", config=cfg))
    _close(got, gemv_ref(x, w, None, r))
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=r[..., :-1])


@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_dot_many_rows_and_strided_input(dev):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 3 * 48, generator=g).to(dev)[..., ::3]  # [2, 20, 48], last-dim stride 3
    w = torch.randn(40, 48, generator=g).to(dev)
    y = gemv(x, w, backend="triton", config=dict(form="dot", block_n=16, block_k=16))
    assert y.shape == (2, 20, 40)
    _close(y, gemv_ref(x, w))


def test_gemv_validates():
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="must be \\[N, K\\]"):
        gemv(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="one dtype"):
        gemv(x, torch.randn(4, 8, dtype=torch.float64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        gemv(x, torch.randn(4, 8), torch.randn(5))
    with pytest.raises(ValueError, match="form"):
        gemv(x, torch.randn(4, 8), backend="triton", config=dict(form="wgmma"))
    with pytest.raises(ValueError, match="at most 4 rows"):
        gemv(torch.randn(5, 8), torch.randn(4, 8), backend="triton", config=dict(form="fma"))


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_default_configs(M, dev):
    # one row takes GEMV_CONFIG_ONE_ROW (fma), more rows GEMV_CONFIG (dot)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 1, 300, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(70, 300, generator=g).to(dev, torch.bfloat16)
    _close(gemv(x, w, backend="triton"), gemv_ref(x, w))


@pytest.mark.parametrize("cfg", CONFIGS + [dict(form="fma", block_n=4, block_k=64)], ids=lambda c: c["form"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_norm_prologue(cfg, dtype, M, dev):
    if cfg["form"] == "fma" and M > 4:
        pytest.skip("fma takes at most 4 rows")
    g = torch.Generator().manual_seed(M + 17)
    x = (4 * torch.randn(M, 1, 150, generator=g)).to(dev, dtype)
    w = torch.randn(40, 150, generator=g).to(dev, dtype)
    nw = (1 + torch.rand(150, generator=g)).to(dev, dtype)
    b = torch.randn(40, generator=g).to(dev, dtype)
    got = gemv(x, w, b, norm=(nw, 1e-6), backend="triton", config=cfg)
    # against the fp32 reference and the module chain (RMSNorm, whose two roundings to the dtype
    # the fused form skips, then the projection): errors relative to the outputs' scale
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    chain = gemv_ref((nw * h.to(dtype)), w, b)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    for want in (gemv_ref(x, w, b, None, (nw, 1e-6)), chain):
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()) <= tol
    with pytest.raises(ValueError, match="norm weight"):
        gemv(x, w, norm=(nw[:-1], 1e-6))


@pytest.mark.parametrize("cfg", CONFIGS + [None], ids=lambda c: c["form"] if c else "default")
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_gated_epilogue(cfg, M, dtype, dev):
    """gated=True: silu(gate) * up of a merged [gate; up] weight in the epilogue, equal to the
    plain projection's halves through silu_mul (up to the projections' summation order); a
    permutation of the (gate, up) row pairs permutes the output exactly (each output reads its
    own pair: an indexing bug moves whole values)."""
    from kvcomp.ops.norm_act import silu_mul

    g = torch.Generator().manual_seed(M * 7 + 3)
    NI, K = 37, 70
    x = torch.randn(M, 1, K, generator=g).to(dev, dtype)
    w = torch.randn(2 * NI, K, generator=g).to(dev, dtype)
    b = torch.randn(2 * NI, generator=g).to(dev, dtype)
    nw = (1 + torch.rand(K, generator=g)).to(dev, dtype)
    for bias, norm in ((None, None), (b, None), (b, (nw, 1e-6))):
        got = gemv(x, w, bias, norm=norm, gated=True, backend="triton", config=cfg)
        assert got.shape == (M, 1, NI) and got.dtype == dtype
        y = gemv(x, w, bias, norm=norm, backend="triton", config=cfg)
        # gate, up, silu and the product each rounded: a few bf16 steps apart at most
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
        for want in (silu_mul(y[..., :NI], y[..., NI:], backend="reference"),
                     gemv_ref(x, w, bias, None, norm, gated=True)):
            torch.testing.assert_close(got.float(), want.float(), **tol)
    perm = torch.randperm(NI, generator=g).to(dev)
    wp = torch.cat([w[:NI][perm], w[NI:][perm]])
    want = gemv(x, w, gated=True, backend="triton", config=cfg)[..., perm]
    form = (cfg or (GEMV_CONFIG_ONE_ROW if M == 1 else GEMV_CONFIG))["form"]
    atol = 1e-6 * float(want.abs().max()) if form == "dot" and dev == "cpu" else 0
    torch.testing.assert_close(gemv(x, wp, gated=True, backend="triton", config=cfg), want, rtol=0, atol=atol)
    r = torch.randn(M, 1, NI, generator=g).to(dev, dtype)
    torch.testing.assert_close(gemv(x, w, residual=r, gated=True, backend="triton", config=cfg).float(),
                               gemv_ref(x, w, None, r, gated=True).float(), **tol)
    with pytest.raises(ValueError, match="even rows"):
        gemv(x, w[:-1], gated=True)


@pytest.mark.parametrize("cfg", CONFIGS + [None], ids=lambda c: c["form"] if c else "default")
@pytest.mark.parametrize("M,K", [(1, 5), (1, 70), (1, 300), (3, 70), (4, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [1, 2])
@pytest.mark.parametrize("dev", DEVICES)
def test_gemv_early_weight_same_result(cfg, M, K, dtype, tiles, dev, monkeypatch):
    """early=True (the weight's first K tile read before the PDL wait) computes the same sums in
    the same order: bit-identical to early=False for every tile form and epilogue, K below one
    tile, one tile and several; chained launches (each reads the previous one's output, under
    PDL on the GPU) too. The early form is taken at every row count here (by default one row),
    with one or two tiles before the wait."""
    mod = importlib.import_module("kvcomp.ops.gemv")  # (kvcomp.ops.gemv as an attribute is the function)
    monkeypatch.setattr(mod, "EARLY_MAX_ROWS", 16)
    monkeypatch.setattr(mod, "EARLY_TILES", tiles)
    g = torch.Generator().manual_seed(M * 100 + K)
    N = 2 * 19
    x = torch.randn(M, 1, K, generator=g).to(dev, dtype)
    w = torch.randn(N, K, generator=g).to(dev, dtype)
    w2 = torch.randn(K, N, generator=g).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    nw = (1 + torch.rand(K, generator=g)).to(dev, dtype)
    r = torch.randn(M, 1, N // 2, generator=g).to(dev, dtype)
    cases = [dict(), dict(bias=b), dict(bias=b, norm=(nw, 1e-6)), dict(gated=True, residual=r),
             dict(bias=b, norm=(nw, 1e-6), gated=True)]
    for kw in cases:
        got = gemv(x, w, early=True, backend="triton", config=cfg, **kw)
        want = gemv(x, w, backend="triton", config=cfg, **kw)
        if "norm" in kw and dev == "cuda" and (cfg or mod.GEMV_CONFIG)["form"] == "dot" and M > 1:
            # the tensor-core tiles' sum of squares is reduced across threads in an order that
            # follows the layout the compiler picks for the peeled tiles (H200, fp32, 3 tiles of
            # K with 2 early: 1.9e-6); one-row inputs, the only ones FusedDecode makes early, are
            # bit-identical
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want), kw
    chain = [gemv(gemv(x, w, early=e, backend="triton", config=cfg), w2, early=e, backend="triton", config=cfg)
             for e in (True, False)]
    assert torch.equal(chain[0], chain[1])  # (early=False waits before any read: the right result)
