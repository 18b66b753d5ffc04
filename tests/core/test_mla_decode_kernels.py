"""MLA latent decode kernels (dense ``mla_decode``, ``sparse_mla_decode``) and the MLA block
selection (``mla_select``) against their pure-torch references.

CPU: the Triton kernels under TRITON_INTERPRET=1 at small shapes (R 32..64, P 16).
GPU (marker ``gpu``): the DeepSeek-V3 geometry (H 128, R 512, P 64) in bf16.
Attention tolerance (flash-attention's rule): kernel error <= 2x the error of the same-precision
torch computation against the fp32 reference, plus a small atol. Selections are exact.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kvcomp.ops import mla_decode, sparse_mla_decode
from kvcomp.ops.hamming_topk import hamming_topk
from kvcomp.ops.mla_decode import mla_decode_ref
from kvcomp.ops.mla_select import mla_select
from kvcomp.ops.sparse_mla_decode import sparse_mla_decode_ref

triton = pytest.importorskip("triton")


def _inputs(B, H, R, P, L, dtype, device, *, noncontig=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    if noncontig:
        # views with non-unit outer strides: heads and tokens interleaved with padding
        q_lat = mk(B, 2 * H, R)[:, ::2]
        q_pe = mk(B, H, P + 8)[..., 4 : 4 + P]
        ckv = mk(B, L, R + 32)[..., :R]
        kpe = mk(B, 2 * L, P)[:, ::2]
    else:
        q_lat, q_pe, ckv, kpe = mk(B, H, R), mk(B, H, P), mk(B, L, R), mk(B, L, P)
    return q_lat, q_pe, ckv, kpe


def _check_close(out, ref_fn, args_fp32, dtype, *, atol=1e-5):
    """flash-attention rule: |out - ref| <= 2 |same-precision torch - ref| + atol."""
    ref = ref_fn(*args_fp32).double()
    lowp = ref_fn(*[a.to(dtype) if a.is_floating_point() else a for a in args_fp32]).double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    err = (out.double() - ref).abs().max().item()
    base = (lowp - ref).abs().max().item()
    assert err <= 2 * base + atol, f"max error {err:.3e} vs torch {base:.3e}"


def _poison_run(fn):
    """Run fn with torch.empty poisoned: fill fresh allocations with NaN first."""
    orig = torch.empty

    def nan_empty(*a, **k):
        t = orig(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = nan_empty
    try:
        return fn()
    finally:
        torch.empty = orig


# --------------------------------------------------------------------------- dense (CPU)


@pytest.mark.parametrize(
    "B,H,R,P,lens,splits",
    [
        (1, 2, 32, 16, [1], None),
        (3, 5, 64, 16, [63, 127, 129], 3),
        (2, 16, 32, 16, [1000, 17], 7),
        (2, 3, 48, 16, [0, 40], 2),  # empty sequence -> zeros; R not a power of two
    ],
)
def test_mla_decode_dense_matches_reference(B, H, R, P, lens, splits):
    from kvcomp.ops.mla_decode.kernels import mla_decode_triton

    L = max(max(lens), 1)
    args = _inputs(B, H, R, P, L, torch.float32, "cpu", seed=B * 100 + H)
    sl = torch.tensor(lens, dtype=torch.int64)
    out = _poison_run(lambda: mla_decode_triton(*args, sl, 0.17, num_splits=splits))
    _check_close(out, lambda a, b, c, d: mla_decode_ref(a, b, c, d, sl, 0.17), list(args),
                 torch.float32, atol=2e-5)
    if 0 in lens:
        assert torch.equal(out[lens.index(0)], torch.zeros_like(out[0]))


def test_mla_decode_dense_bf16_noncontiguous():
    q_lat, q_pe, ckv, kpe = _inputs(2, 4, 32, 16, 150, torch.bfloat16, "cpu", noncontig=True)
    assert not ckv.is_contiguous() and not q_lat.is_contiguous()
    sl = torch.tensor([150, 99], dtype=torch.int32)
    out = mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=0.2, backend="triton")
    f = [t.float() for t in (q_lat, q_pe, ckv, kpe)]
    _check_close(out, lambda a, b, c, d: mla_decode_ref(a, b, c, d, sl, 0.2), f, torch.bfloat16,
                 atol=1e-2)


def test_mla_decode_heads_differ_and_rows_beyond_length_ignored():
    """Garbage (inf) past seq_lens must not leak; each head gets its own output."""
    q_lat, q_pe, ckv, kpe = _inputs(2, 3, 32, 16, 70, torch.float32, "cpu", seed=3)
    sl = torch.tensor([65, 70])
    ckv[0, 65:] = float("inf")
    kpe[0, 65:] = float("nan")
    out = mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=0.3, backend="triton")
    ref = mla_decode_ref(q_lat, q_pe, ckv[:, :65].clone(), kpe[:, :65].clone(), torch.tensor([65, 65]), 0.3)
    assert torch.allclose(out[0], ref[0], atol=2e-5)
    assert not torch.isnan(out).any()
    assert (out[1, 0] - out[1, 1]).abs().max() > 1e-3


def test_mla_decode_rejects_bad_input():
    q_lat, q_pe, ckv, kpe = _inputs(1, 2, 32, 16, 8, torch.float32, "cpu")
    sl = torch.tensor([8])
    with pytest.raises(TypeError, match="kpe"):
        mla_decode(q_lat, q_pe, ckv, kpe.half(), sl, scale=0.1)
    with pytest.raises(ValueError, match="ckv"):
        mla_decode(q_lat, q_pe, ckv[..., :16], kpe, sl, scale=0.1)
    with pytest.raises(ValueError, match="scale"):
        mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=0.0)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(q_lat, q_pe, ckv, kpe, torch.tensor([8, 8]), scale=0.1)


# -------------------------------------------------------------------------- sparse (CPU)


@pytest.mark.parametrize(
    "B,H,R,P,chunk,lens,block_idx,splits",
    [
        # ragged batch, -1 padding, partial last block, unsorted indices, one block only
        (3, 5, 32, 16, 16, [300, 1, 129], [[0, 3, 5, -1, 18], [0, -1, -1, -1, -1], [8, 2, 0, -1, 7]], 3),
        (2, 16, 64, 16, 128, [1000, 257], [[0, 3, 7], [2, 0, -1]], None),
        (2, 2, 32, 16, 1, [63, 5], [[0, 62, 30, 31], [4, 1, -1, -1]], 2),  # token-level
        (1, 3, 32, 16, 100, [250], [[2, 0]], 4),  # chunk not a power of two
    ],
)
def test_sparse_mla_decode_matches_reference(B, H, R, P, chunk, lens, block_idx, splits):
    from kvcomp.ops.sparse_mla_decode.kernels import sparse_mla_decode_triton

    L = max(lens)
    args = _inputs(B, H, R, P, L, torch.float32, "cpu", seed=B + H + chunk)
    sl = torch.tensor(lens)
    bi = torch.tensor(block_idx, dtype=torch.int32).view(B, 1, -1)
    out = _poison_run(lambda: sparse_mla_decode_triton(*args, bi, sl, chunk, 0.11, num_splits=splits))
    ref_fn = lambda a, b, c, d: sparse_mla_decode_ref(a, b, c, d, bi, sl, chunk, 0.11)
    _check_close(out, ref_fn, list(args), torch.float32, atol=2e-5)


def test_sparse_mla_decode_all_blocks_equals_dense():
    q_lat, q_pe, ckv, kpe = _inputs(2, 4, 32, 16, 200, torch.float32, "cpu", seed=9)
    sl = torch.tensor([200, 77])
    nb = -(-200 // 32)
    bi = torch.arange(nb, dtype=torch.int32).view(1, 1, nb).repeat(2, 1, 1)
    sp = sparse_mla_decode(q_lat, q_pe, ckv, kpe, bi, sl, chunk_size=32, scale=0.25, backend="triton")
    de = mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=0.25, backend="triton")
    assert torch.allclose(sp, de, atol=1e-5, rtol=1e-5)


def test_sparse_mla_decode_bf16_noncontiguous_block_idx():
    q_lat, q_pe, ckv, kpe = _inputs(2, 6, 32, 16, 130, torch.bfloat16, "cpu", noncontig=True, seed=5)
    sl = torch.tensor([130, 64])
    bi = torch.tensor([[5, 0, 1, 9], [0, 3, -1, 2]], dtype=torch.int32).t().contiguous().t()
    bi = bi.view(2, 1, 4)
    assert not bi.is_contiguous()
    out = sparse_mla_decode(q_lat, q_pe, ckv, kpe, bi, sl, chunk_size=16, scale=0.3, backend="triton")
    f = [t.float() for t in (q_lat, q_pe, ckv, kpe)]
    ref_fn = lambda a, b, c, d: sparse_mla_decode_ref(a, b, c, d, bi, sl, 16, 0.3)
    _check_close(out, ref_fn, f, torch.bfloat16, atol=1e-2)


# ------------------------------------------------------------------------ selection (CPU)


def _codes(shape, g, distinct=None):
    if distinct is None:
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32)
    pool = torch.randint(-(2**31), 2**31 - 1, (distinct, shape[-1]), generator=g, dtype=torch.int32)
    pick = torch.randint(0, distinct, shape[:-1], generator=g)
    return pool[pick]


@pytest.mark.parametrize(
    "B,H,W,lens,chunk,k_blocks,must,distinct",
    [
        (3, 5, 3, [300, 1, 129], 16, 4, (0, -2, -1), None),
        (2, 128, 18, [1000, 640], 128, 3, (0, -2, -1), None),  # DeepSeek: 576 bits, G = 128
        (2, 16, 18, [1000, 63], 1, 40, (0, -1), 3),  # token level, many ties
        (4, 7, 2, [129, 100, 2, 127], 100, 2, (0, -2, -1), 2),  # chunk 100, ties, n < #must
        (2, 33, 5, [900, 500], 32, 5, (), 4),  # no must-select, odd word count (4 + 1)
    ],
)
def test_mla_select_equals_hamming_topk(B, H, W, lens, chunk, k_blocks, must, distinct):
    g = torch.Generator().manual_seed(H * W + chunk)
    q = _codes((B, H, W), g)
    k = _codes((B, 1, max(lens), W), g, distinct)
    sl = torch.tensor(lens)
    got = mla_select(q, k, sl, k_blocks=k_blocks, chunk_size=chunk, must_select=must,
                     backend="triton")
    want = hamming_topk(q, k, sl, k_blocks=k_blocks, chunk_size=chunk, must_select=must,
                        backend="reference")
    assert torch.equal(got, want)


def test_mla_select_tensor_k_blocks_and_noncontiguous_codes():
    g = torch.Generator().manual_seed(1)
    q = _codes((3, 9, 36), g)[..., ::2]  # W = 18, strided words
    k = _codes((3, 1, 400, 18), g, 5).transpose(0, 0)
    kb = torch.tensor([1, 6, 3])
    sl = torch.tensor([400, 399, 250])
    got = mla_select(q, k, sl, k_blocks=kb, chunk_size=64, backend="triton")
    want = hamming_topk(q.contiguous(), k, sl, k_blocks=kb, chunk_size=64, backend="reference")
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1, 4097, 32768], [16384]])
def test_mla_kernels_deepseek_geometry_gpu(lens):
    B, H, R, P, chunk = len(lens), 128, 512, 64, 128
    L = max(lens)
    q_lat, q_pe, ckv, kpe = _inputs(B, H, R, P, L, torch.bfloat16, "cuda", seed=7)
    q_lat = q_lat * 0.05
    sl = torch.tensor(lens, device="cuda")
    scale = 0.1352
    f = [t.float() for t in (q_lat, q_pe, ckv, kpe)]
    out = mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=scale)
    _check_close(out, lambda a, b, c, d: mla_decode_ref(a, b, c, d, sl, scale), f, torch.bfloat16,
                 atol=1e-3)
    g = torch.Generator(device="cpu").manual_seed(2)
    nb = -(-L // chunk)
    bi = torch.stack([torch.randperm(nb, generator=g)[:16] for _ in range(B)]).to(torch.int32)
    bi = bi.view(B, 1, 16).cuda()
    out = sparse_mla_decode(q_lat, q_pe, ckv, kpe, bi, sl, chunk_size=chunk, scale=scale)
    ref_fn = lambda a, b, c, d: sparse_mla_decode_ref(a, b, c, d, bi, sl, chunk, scale)
    _check_close(out, ref_fn, f, torch.bfloat16, atol=1e-3)


@pytest.mark.gpu
def test_mla_select_deepseek_geometry_gpu():
    g = torch.Generator().manual_seed(4)
    B, H, W, L = 3, 128, 18, 20000
    q = _codes((B, H, W), g).cuda()
    k = _codes((B, 1, L, W), g, 50).cuda()
    sl = torch.tensor([20000, 1, 12345], device="cuda")
    got = mla_select(q, k, sl, k_blocks=16, chunk_size=128)
    want = hamming_topk(q.cpu(), k.cpu(), sl.cpu(), k_blocks=16, chunk_size=128, backend="reference")
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
def test_mla_kernels_pdl_bit_identical_gpu(monkeypatch):
    """With programmatic dependent launch (sm_90+) the dense and sparse latent decodes and their
    merge give the bits of plain stream order, also replayed in a CUDA graph after a selection."""
    pdl = importlib.import_module("kvcomp.ops._pdl")
    if not pdl.pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    B, H, R, P, L, chunk = 2, 128, 512, 64, 9000, 128
    q_lat, q_pe, ckv, kpe = _inputs(B, H, R, P, L, torch.bfloat16, "cuda", seed=11)
    q_lat = q_lat * 0.05
    sl = torch.tensor([9000, 4097], device="cuda")
    bi = torch.tensor([[[0, 5, 9, 70]], [[1, 2, 31, -1]]], dtype=torch.int32, device="cuda")
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        run = lambda: (mla_decode(q_lat, q_pe, ckv, kpe, sl, scale=0.1),
                       sparse_mla_decode(q_lat, q_pe, ckv, kpe, bi, sl, chunk_size=chunk, scale=0.1))
        eager = run()
        graph = torch.cuda.CUDAGraph()
        run()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            replayed = run()
        graph.replay()
        torch.cuda.synchronize()
        outs[on] = (eager, replayed)
    for a, b in zip(outs[True][0] + outs[True][1], outs[False][0] + outs[False][1]):
        assert torch.equal(a, b)


def test_launch_tiles_as_measured():
    """The launch picks that the H200 sweeps chose (docs/benchmarks/mla.md): the sparse latent
    decode of one sequence takes 16-head programs (session 17), more sequences 32 x 32 on 4
    warps; the dense decode 64 x 64 on 8 warps where 221 KB of shared memory is available."""
    kernels = importlib.import_module("kvcomp.ops.sparse_mla_decode.kernels")
    cfg = kernels._launch_config
    big_smem = kernels.DENSE_WIDE_SMEM
    assert cfg(1, 128, 512, True, True, None, None, None, None, big_smem) == (16, 32, 4, 2)
    assert cfg(4, 128, 512, True, True, None, None, None, None, big_smem) == (32, 32, 4, 2)
    assert cfg(1, 128, 512, False, True, None, None, None, None, big_smem) == (64, 64, 8, 2)
    assert cfg(1, 128, 512, True, False, None, None, None, None, 0)[0] == 32  # CPU: no GPU pick
    assert cfg(1, 128, 512, True, True, 32, None, None, None, big_smem)[0] == 32  # an explicit tile wins
