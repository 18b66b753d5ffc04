"""Triton ``hash_encode`` against its reference: on CPU under TRITON_INTERPRET=1 at small shapes,
on the GPU (-m gpu) at real ones.

Exactness: with inputs on a dyadic grid (k / 8) every product and partial sum is exact in fp32,
so any summation order gives the same projection and the codes must be *equal*. With Gaussian
inputs a bit may differ only where the fp32 projection is within rounding of zero."""

import pytest
import torch
from kvcomp.ops import hash_encode
from kvcomp.ops.hash_encode.reference import hash_encode_into_ref, hash_encode_ref, project

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dyadic(*shape, dtype=torch.float32, device="cpu", gen=None):
    return (torch.randint(-8, 9, shape, generator=gen).float() / 8).to(dtype).to(device)


def assert_codes_match_up_to_rounding(codes, x, weight, rel=1e-4):
    ref = hash_encode_ref(x, weight)
    proj = project(x, weight)
    diff = (codes ^ ref) != 0
    if not diff.any():
        return
    bits = (
        ((codes ^ ref).to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=codes.device)) & 1
    ).flatten(-2).bool()
    tol = rel * proj.abs().amax()
    assert (proj.abs()[bits] <= tol).all(), "a code bit differs where the projection is not ~0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 63, 129])
def test_shared_weight_exact(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    x = dyadic(3, rows, 40, dtype=dtype, gen=gen)  # D = 40: not a power of two
    w = dyadic(40, 96, dtype=dtype, gen=gen)  # 3 words
    got = hash_encode(x, w, backend="triton")
    assert got.shape == (3, rows, 3) and got.dtype == torch.int32
    assert torch.equal(got, hash_encode_ref(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_weight_exact_and_heads_differ(dtype):
    gen = torch.Generator().manual_seed(1)
    x = dyadic(2, 4, 33, 32, dtype=dtype, gen=gen)  # [B, H, T, D]
    w = dyadic(4, 32, 64, dtype=dtype, gen=gen)  # [H, D, BITS]
    got = hash_encode(x, w, backend="triton")
    assert torch.equal(got, hash_encode_ref(x, w))
    # the same rows under another head's weight give other codes: a head mix-up would show
    x_same = x[:, :1].expand(2, 4, 33, 32)
    codes = hash_encode(x_same, w, backend="triton")
    assert not torch.equal(codes[:, 0], codes[:, 1])
    assert torch.equal(codes, hash_encode_ref(x_same, w))


@pytest.mark.parametrize("G,T", [(1, 1), (4, 1), (8, 3), (16, 9)])
def test_gqa_grouped_weight_equals_repeated(G, T):
    """enable_gqa: query head j hashed with kv-head j // G's row, the same codes as the weight
    repeated per head; T = 9 rows takes the many-row kernel. Each kv-head's row is distinct, so
    a head -> row mix-up (j % Hkv, or one row for all) would show."""
    gen = torch.Generator().manual_seed(G * 10 + T)
    Hkv = 3
    x = dyadic(2, Hkv * G, 32, T, gen=gen).transpose(2, 3)  # [B, Hq, T, D], not contiguous
    w = dyadic(Hkv, 32, 64, gen=gen)
    want = hash_encode_ref(x, w.repeat_interleave(G, 0))
    got = hash_encode(x, w, enable_gqa=True, backend="triton")
    assert torch.equal(got, want)
    assert torch.equal(hash_encode(x, w, enable_gqa=True, backend="reference"), want)
    q = x[:, :, 0]  # [B, Hq, D]: the decode query layout
    assert torch.equal(hash_encode(q, w, enable_gqa=True, backend="triton"), want[:, :, 0])
    if G > 1:
        wrong = hash_encode_ref(x, w.repeat(G, 1, 1))  # kv-head j % Hkv
        assert not torch.equal(got, wrong)


def test_gqa_shape_errors():
    x = torch.zeros(2, 6, 32)
    with pytest.raises(ValueError, match="enable_gqa"):
        hash_encode(x, torch.zeros(4, 32, 64), enable_gqa=True)  # 6 heads, 4 rows
    with pytest.raises(ValueError, match="enable_gqa"):
        hash_encode(x, torch.zeros(32, 64), enable_gqa=True)  # not per kv-head
    with pytest.raises(ValueError, match="per-head weight"):
        hash_encode(x, torch.zeros(3, 32, 64))  # grouping only when asked for


def test_query_layout_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    base = dyadic(16, 3, 8, dtype=torch.float32, gen=gen).repeat(1, 1, 4)  # [16, 3, 32]
    x = base.transpose(0, 1)[:, ::2]  # [3, 8, 32] non-contiguous, q as [B, Hq, D]
    assert not x.is_contiguous()
    w = dyadic(8, 64, 32, gen=gen).transpose(1, 2)  # [Hq, D, BITS] non-contiguous
    got = hash_encode(x, w, backend="triton")
    assert torch.equal(got, hash_encode_ref(x, w))


def test_wide_rows_loop_over_dims():
    """D > 128 (the MLA latent is 512): the kernel accumulates the projection over slices of
    the dims; D = 300 also leaves a ragged last slice."""
    gen = torch.Generator().manual_seed(6)
    x = dyadic(70, 300, gen=gen)
    w = dyadic(300, 160, gen=gen)  # 5 words
    assert torch.equal(hash_encode(x, w, backend="triton"), hash_encode_ref(x, w))


def test_gaussian_fp32_matches_up_to_rounding():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 129, 64, generator=gen)
    w = torch.randn(2, 64, 64, generator=gen)
    got = hash_encode(x, w, backend="triton")
    assert_codes_match_up_to_rounding(got, x, w)


def assert_codes_match_tf32(codes, x, weight):
    """16-bit rows with an fp32 weight: the kernel rounds the weight to tf32 (10-bit mantissa),
    so a bit may differ only where |x.w| <= 2**-10 * sum_i |x_i w_i| (2x the rounding bound)."""
    ref = hash_encode_ref(x, weight)
    bound = 2.0**-10 * project(x.abs(), weight.abs())
    proj = project(x, weight)
    bits = (((codes ^ ref).to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=codes.device))
            & 1).flatten(-2).bool()
    assert (proj.abs()[bits] <= bound[bits]).all(), "a code bit differs beyond tf32 rounding"


@pytest.mark.parametrize("dtype", DTYPES)
def test_into_cache_ragged_positions(dtype):
    gen = torch.Generator().manual_seed(4)
    B, H, T, D, Lmax = 3, 2, 5, 32, 40
    x = dyadic(B, H, T, D, dtype=dtype, gen=gen)
    w = dyadic(H, D, 64, dtype=dtype, gen=gen)
    pos = torch.tensor([0, 17, Lmax - T])
    poison = torch.full((B, H, Lmax, 2), -123456, dtype=torch.int32)
    got = hash_encode(x, w, out=poison.clone(), positions=pos, backend="triton")
    want = hash_encode_into_ref(x, w, poison.clone(), pos)
    assert torch.equal(got, want)
    # rows outside [pos, pos + T) are untouched
    assert (got[1, :, :17] == -123456).all() and (got[1, :, 17 + T :] == -123456).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_real_shapes(dtype):
    gen = torch.Generator().manual_seed(5)
    B, H, L, D = 2, 8, 4097, 128
    x = dyadic(B, H, L, D, dtype=dtype, gen=gen).cuda()
    w = dyadic(H, D, 128, dtype=dtype, gen=gen).cuda()
    assert torch.equal(hash_encode(x, w), hash_encode_ref(x, w))
    xg = torch.randn(B, H, L, D, device="cuda").to(dtype)
    wg = torch.randn(H, D, 128, device="cuda").to(dtype)
    assert_codes_match_up_to_rounding(hash_encode(xg, wg), xg, wg)
    q = torch.randn(4, 32, D, device="cuda").to(dtype)
    wq = wg.repeat_interleave(4, 0)
    assert_codes_match_up_to_rounding(hash_encode(q, wq), q, wq)
    assert torch.equal(hash_encode(q, wg, enable_gqa=True), hash_encode(q, wq))  # same products
    if dtype != torch.float32:  # the real case: 16-bit keys / queries, fp32 hash weights
        assert_codes_match_tf32(hash_encode(xg, wg.float()), xg, wg.float())
        ql = torch.randn(8 * 128, 512, device="cuda").to(dtype)  # MLA query rows
        wl32 = torch.randn(512, 512, device="cuda")
        assert_codes_match_tf32(hash_encode(ql, wl32), ql, wl32)
    lat = dyadic(1, 1, 5000, 512, dtype=dtype, gen=gen).cuda()  # MLA latent: 512 dims, 512 bits
    wl = dyadic(512, 512, dtype=dtype, gen=gen).cuda()
    assert torch.equal(hash_encode(lat, wl), hash_encode_ref(lat, wl))
    pos = torch.tensor([0, 4000], device="cuda")
    out = torch.full((B, H, L + 8, 4), -7, dtype=torch.int32, device="cuda")
    got = hash_encode(x[:, :, :5], w, out=out.clone(), positions=pos)
    assert torch.equal(got, hash_encode_into_ref(x[:, :, :5], w, out.clone(), pos))
