"""``hash_encode_split``: several inputs hashed with their own projections into one code (MLA's
latent + RoPE split), one launch for two parts, against the concatenated references.

Inputs on a dyadic grid make every projection exact in fp32, so the codes must be *equal* to
the reference in any summation order; Gaussian inputs on the GPU are compared with the tf32
rounding rule of ``hash_encode``."""

import pytest
import torch
from kvcomp.ops import hash_encode, hash_encode_split
from kvcomp.ops.hash_encode.reference import (
    hash_encode_into_ref,
    hash_encode_ref,
    hash_encode_split_ref,
)
from test_hash_encode_kernel import assert_codes_match_tf32, dyadic

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1, 5), (3, 7), (2, 3, 11)])
def test_two_parts_shared_weights_exact(lead, dtype):
    """(1, 5): 5 rows, the one-row kernel; (3, 7) and (2, 3, 11): the tile kernel. D 40 and 24
    (not powers of two), 3 + 2 words: a word taken from the wrong part or column would show."""
    gen = torch.Generator().manual_seed(sum(lead))
    x1 = dyadic(*lead, 40, dtype=dtype, gen=gen)
    x2 = dyadic(*lead, 24, dtype=dtype, gen=gen)
    w1 = dyadic(40, 96, dtype=dtype, gen=gen)
    w2 = dyadic(24, 64, dtype=dtype, gen=gen)
    got = hash_encode_split((x1, x2), (w1, w2), backend="triton")
    want = torch.cat([hash_encode_ref(x1, w1), hash_encode_ref(x2, w2)], -1)
    assert got.shape == (*lead, 5) and got.dtype == torch.int32
    assert torch.equal(got, want)
    assert torch.equal(hash_encode_split((x1, x2), (w1, w2), backend="reference"), want)
    assert torch.equal(hash_encode_split_ref((x1, x2), (w1, w2)), want)
    swapped = hash_encode_split((x2, x1), (w2, w1), backend="triton")
    assert torch.equal(swapped, torch.cat([want[..., 3:], want[..., :3]], -1))


def test_mixed_dtypes_and_noncontiguous():
    """A bf16 latent and an fp32 RoPE part (one launch each), then both bf16 (one launch), all
    transposed views; a wide first part (D 300, looped over dims in the tile kernel)."""
    gen = torch.Generator().manual_seed(11)
    x1 = dyadic(2, 300, 9, dtype=torch.bfloat16, gen=gen).transpose(1, 2)  # [2, 9, 300]
    x2 = dyadic(2, 16, 9, gen=gen).transpose(1, 2)  # [2, 9, 16] fp32
    w1 = dyadic(300, 64, gen=gen)
    w2 = dyadic(16, 32, dtype=torch.float16, gen=gen)
    got = hash_encode_split([x1, x2], [w1, w2], backend="triton")
    assert torch.equal(got, torch.cat([hash_encode_ref(x1, w1), hash_encode_ref(x2, w2)], -1))
    x2b = x2.to(torch.bfloat16)  # one dtype: the one-launch path, on the same strided views
    got = hash_encode_split([x1, x2b], [w1, w2.float()], backend="triton")
    assert torch.equal(got, torch.cat([hash_encode_ref(x1, w1), hash_encode_ref(x2b, w2)], -1))


@pytest.mark.parametrize("T", [1, 3, 12])
def test_per_head_weights(T):
    gen = torch.Generator().manual_seed(T)
    B, H = 2, 3
    x1 = dyadic(B, H, T, 32, gen=gen)
    x2 = dyadic(B, H, T, 16, gen=gen)
    w1 = dyadic(H, 32, 64, gen=gen)
    w2 = dyadic(H, 16, 32, gen=gen)
    got = hash_encode_split((x1, x2), (w1, w2), backend="triton")
    assert torch.equal(got, torch.cat([hash_encode_ref(x1, w1), hash_encode_ref(x2, w2)], -1))
    # a head -> weight mix-up would show: the same rows under each head's weights differ
    same = (x1[:, :1].expand(B, H, T, 32), x2[:, :1].expand(B, H, T, 16))
    codes = hash_encode_split(same, (w1, w2), backend="triton")
    assert not torch.equal(codes[:, 0], codes[:, 1])
    assert torch.equal(codes, torch.cat([hash_encode_ref(same[0], w1), hash_encode_ref(same[1], w2)], -1))


@pytest.mark.parametrize("T", [1, 4, 10])
def test_into_cache_ragged_positions(T):
    """out= / positions=: the cache's append; rows outside [pos, pos + T) and past Lmax untouched."""
    gen = torch.Generator().manual_seed(20 + T)
    B, H, Lmax = 3, 1, 40
    x1 = dyadic(B, H, T, 40, dtype=torch.bfloat16, gen=gen)
    x2 = dyadic(B, H, T, 8, dtype=torch.bfloat16, gen=gen)
    w1 = dyadic(40, 64, gen=gen)
    w2 = dyadic(8, 32, gen=gen)
    pos = torch.tensor([0, 17, Lmax - T + 2])  # the last sequence runs past Lmax
    poison = torch.full((B, H, Lmax, 3), -123456, dtype=torch.int32)
    got = hash_encode_split((x1, x2), (w1, w2), out=poison.clone(), positions=pos, backend="triton")
    want = poison.clone()
    want[..., :2] = hash_encode_into_ref(x1, w1, poison[..., :2].clone(), pos)
    want[..., 2:] = hash_encode_into_ref(x2, w2, poison[..., 2:].clone(), pos)
    assert torch.equal(got, want)
    assert (got[1, :, :17] == -123456).all() and (got[1, :, 17 + T:] == -123456).all()
    ref = hash_encode_split((x1, x2), (w1, w2), out=poison.clone(), positions=pos, backend="reference")
    assert torch.equal(ref, want)


def test_three_parts_and_one_part():
    """More than two parts: one launch a part into slices of the output (no concatenation)."""
    gen = torch.Generator().manual_seed(31)
    xs = [dyadic(4, 6, d, gen=gen) for d in (16, 24, 8)]
    ws = [dyadic(d, 32 * n, gen=gen) for d, n in ((16, 1), (24, 2), (8, 1))]
    want = torch.cat([hash_encode_ref(x, w) for x, w in zip(xs, ws)], -1)
    for backend in ("triton", "reference"):
        assert torch.equal(hash_encode_split(xs, ws, backend=backend), want)
        assert torch.equal(hash_encode_split(xs[:1], ws[:1], backend=backend), want[..., :1])


def test_errors_name_the_problem():
    x1, x2 = torch.zeros(2, 3, 16), torch.zeros(2, 3, 8)
    w1, w2 = torch.zeros(16, 32), torch.zeros(8, 32)
    with pytest.raises(ValueError, match="2 inputs and 1 weights"):
        hash_encode_split((x1, x2), (w1,))
    with pytest.raises(ValueError, match="0 inputs"):
        hash_encode_split((), ())
    with pytest.raises(ValueError, match="part 1: x last dim"):
        hash_encode_split((x1, x2), (w1, torch.zeros(4, 32)))
    with pytest.raises(ValueError, match="part 0: weight has 16 bits"):
        hash_encode_split((x1, x2), (torch.zeros(16, 16), w2))
    with pytest.raises(ValueError, match="leading dims"):
        hash_encode_split((x1, torch.zeros(2, 4, 8)), (w1, w2))
    with pytest.raises(ValueError, match="all be"):
        hash_encode_split((x1, x2), (w1, torch.zeros(3, 8, 32)))
    with pytest.raises(TypeError, match="part 1"):
        hash_encode_split((x1, x2.int()), (w1, w2))
    with pytest.raises(ValueError, match="both out= and positions="):
        hash_encode_split((x1, x2), (w1, w2), out=torch.zeros(2, 3, 4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out \(2, 3, 4, 3\) must be \[B, H, Lmax, 2\]"):
        hash_encode_split((x1.unsqueeze(2), x2.unsqueeze(2)), (w1, w2),
                          out=torch.zeros(2, 3, 4, 3, dtype=torch.int32), positions=torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_mla_shapes(dtype):
    """DeepSeek-V3's split: 512-dim latent (512 bits) + 64-dim RoPE part (64 bits), 128 query
    heads at B = 1, 8, 32 and a 4097-token key block; then the static cache's append."""
    gen = torch.Generator().manual_seed(7)
    wl = dyadic(512, 512, dtype=dtype, gen=gen).cuda()
    wr = dyadic(64, 64, dtype=dtype, gen=gen).cuda()
    for lead in [(1, 128), (8, 128), (32, 128), (2, 4097), (3, 1)]:
        ql = dyadic(*lead, 512, dtype=dtype, gen=gen).cuda()
        qr = dyadic(*lead, 64, dtype=dtype, gen=gen).cuda()
        want = torch.cat([hash_encode_ref(ql, wl), hash_encode_ref(qr, wr)], -1)
        assert torch.equal(hash_encode_split((ql, qr), (wl, wr)), want), lead
    if dtype != torch.float32:  # the real case: 16-bit rows, fp32 hash weights; Gaussian rows
        wl32, wr32 = torch.randn(512, 512, device="cuda"), torch.randn(64, 64, device="cuda")
        for lead in [(1, 128), (32, 128), (4, 1)]:
            ql = torch.randn(*lead, 512, device="cuda").to(dtype)
            qr = torch.randn(*lead, 64, device="cuda").to(dtype)
            got = hash_encode_split((ql, qr), (wl32, wr32))
            assert_codes_match_tf32(got[..., :16], ql, wl32)
            assert_codes_match_tf32(got[..., 16:], qr, wr32)
            two = torch.cat([hash_encode(ql, wl32), hash_encode(qr, wr32)], -1)
            assert (got != two).float().mean() < 0.01, lead  # both within the rule: a rare bit
    B, Lmax = 4, 300
    for T in (1, 9):
        kl = dyadic(B, 1, T, 512, dtype=dtype, gen=gen).cuda()
        kr = dyadic(B, 1, T, 64, dtype=dtype, gen=gen).cuda()
        pos = torch.tensor([0, 100, 7, Lmax - T], device="cuda").expand(B)
        out = torch.full((B, 1, Lmax, 18), -5, dtype=torch.int32, device="cuda")
        got = hash_encode_split((kl, kr), (wl, wr), out=out.clone(), positions=pos)
        want = out.clone()
        want[..., :16] = hash_encode_into_ref(kl, wl, out[..., :16].clone(), pos)
        want[..., 16:] = hash_encode_into_ref(kr, wr, out[..., 16:].clone(), pos)
        assert torch.equal(got, want), T


@pytest.mark.parametrize("wpp", [1, 2, 4])
@pytest.mark.parametrize("block_n", [16, 32])
def test_tile_kernel_word_groups(monkeypatch, wpp, block_n):
    """The tile kernel at every (rows, words) a program: 5 + 3 words (groups that end inside an
    input), 37 rows (a ragged last row block), a per-(sequence, head) bias, the split, and the
    cache-append form."""
    from kvcomp.ops.hash_encode import kernels as he

    monkeypatch.setattr(he, "TILE_BLOCK_N", block_n)
    monkeypatch.setattr(he, "TILE_WPP", wpp)
    gen = torch.Generator().manual_seed(wpp * 10 + block_n)
    B, H, T = 2, 3, 37
    x1 = dyadic(B, H, T, 40, dtype=torch.bfloat16, gen=gen)
    x2 = dyadic(B, H, T, 16, dtype=torch.bfloat16, gen=gen)
    w1 = dyadic(40, 160, gen=gen)
    w2 = dyadic(16, 96, gen=gen)
    want = torch.cat([hash_encode_ref(x1, w1), hash_encode_ref(x2, w2)], -1)
    assert torch.equal(hash_encode_split((x1, x2), (w1, w2), backend="triton"), want)
    assert torch.equal(hash_encode(x1, w1, backend="triton"), want[..., :5])
    bias = dyadic(B, H, 160, gen=gen)
    from kvcomp.ops.hash_encode.reference import hash_encode_ref as ref_b

    assert torch.equal(hash_encode(x1, w1, bias=bias, backend="triton"), ref_b(x1, w1, bias))
    pos = torch.tensor([3, 50])
    out = torch.full((B, H, 90, 8), -9, dtype=torch.int32)
    got = hash_encode_split((x1, x2), (w1, w2), out=out.clone(), positions=pos, backend="triton")
    assert torch.equal(got, hash_encode_split((x1, x2), (w1, w2), out=out.clone(), positions=pos,
                                              backend="reference"))


def test_tile_config_as_measured(monkeypatch):
    """The tile kernel's (rows, words) a program on a 132-SM GPU, as session 17's H200 sweep chose
    (docs/benchmarks/mla.md): 32 x 2 where that fills 2 programs an SM, else 32 x 1, else 16 x 1."""
    from kvcomp.ops.hash_encode import kernels as he

    monkeypatch.setattr(he, "_sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert he._tile_config(1 * 128, 1, 16, 2, dev) == (18, 16, 1)  # MLA query codes, B = 1
    assert he._tile_config(8 * 128, 1, 16, 2, dev) == (9, 32, 2)  # B = 8
    assert he._tile_config(32 * 128, 1, 16, 2, dev) == (9, 32, 2)  # B = 32
    assert he._tile_config(32768, 8, 4, 0, dev) == (2, 32, 2)  # a Qwen3-8B layer's 32K keys
    assert he._tile_config(4 * 128, 1, 16, 2, dev) == (18, 32, 1)  # 16 x 18 x 1 = 288 programs
