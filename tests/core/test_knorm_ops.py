"""Centred key codes (``hash_encode(bias=)``), norm-weighted scores (``hamming_topk(k_scale=)``)
and the statistics behind them (``kvcomp.ops.key_stats``): kernels (TRITON_INTERPRET=1 on CPU)
against the references, references against plain-Python brute force, exact comparisons.

Dyadic inputs (k / 8) make every fp32 projection exact in any summation order, so the codes of
``x`` under ``bias = mu @ W`` must *equal* the codes of ``x - mu``."""

import importlib
import math

import pytest
import torch
from kvcomp.bench.timing import attention_close, attention_ref_fp64, attention_ref_lowp
from kvcomp.ops import hamming_topk, hash_bias, hash_encode, key_mean, key_norms
from kvcomp.ops._blocks import selected_token_mask
from kvcomp.ops.decode_step import decode_step
from kvcomp.ops.hamming_topk.reference import block_scores_ref, token_scores_ref
from kvcomp.ops.hash_encode.reference import hash_encode_into_ref, hash_encode_ref

kernels = importlib.import_module("kvcomp.ops.hamming_topk.kernels")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dyadic(*shape, gen, dtype=torch.float32):
    return (torch.randint(-8, 9, shape, generator=gen).float() / 8).to(dtype)


def codes(*shape, gen, low_entropy=False):
    c = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen)
    return c & 0x7 if low_entropy else c


# ---------------------------------------------------------------- hash_encode(bias=)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows", [1, 63])  # the one-row kernel (<= 8 rows) and the tile kernel
@pytest.mark.parametrize("kind", ["bits", "head", "seq_head"])
def test_bias_hashes_centred_rows(kind, rows, dtype):
    gen = torch.Generator().manual_seed(rows + len(kind))
    B, H, D, bits = 2, 3, 24, 64
    x = dyadic(B, H, rows, D, gen=gen, dtype=dtype)
    w = dyadic(H, D, bits, gen=gen)
    mu = {"bits": dyadic(D, gen=gen), "head": dyadic(H, D, gen=gen),
          "seq_head": dyadic(B, H, D, gen=gen)}[kind]
    bias = {"bits": lambda: mu @ w[0], "head": lambda: hash_bias(mu, w),
            "seq_head": lambda: hash_bias(mu, w)}[kind]()
    if kind == "bits":  # one mean and one projection for every head
        w = w[:1].expand(H, D, bits)
    centred = x.float() - (mu if kind == "bits" else mu.view(*mu.shape[:-1], 1, D).expand_as(x))
    want = hash_encode_ref(centred, w)
    for backend in ("triton", "reference"):
        assert torch.equal(hash_encode(x, w, bias=bias, backend=backend), want)
    # the bias changes the codes (a kernel that ignored it would fail here)
    assert not torch.equal(want, hash_encode_ref(x, w))


def test_bias_with_shared_weight_per_head_and_sequence():
    """Shared [D, BITS] weight, bias per head / per (sequence, head): x is read as [B, H, *, D]
    and each (b, h) gets its own threshold row; heads and sequences must not be mixed up."""
    gen = torch.Generator().manual_seed(5)
    B, H, T, D = 2, 3, 5, 16
    w = dyadic(D, 32, gen=gen)
    x = dyadic(1, 1, T, D, gen=gen).expand(B, H, T, D)  # the same rows everywhere
    mu = dyadic(B, H, D, gen=gen)
    for bias, m in ((hash_bias(mu, w), mu), (hash_bias(mu[0], w), mu[0].expand(B, H, D))):
        want = hash_encode_ref(x - m.unsqueeze(2), w)
        for rows in (T, 1):  # tile kernel path is taken for > 8 rows: also test 40 below
            got = hash_encode(x[:, :, :rows], w, bias=bias, backend="triton")
            assert torch.equal(got, want[:, :, :rows])
    xl = dyadic(B, H, 40, D, gen=gen)
    got = hash_encode(xl, w, bias=hash_bias(mu, w), backend="triton")
    assert torch.equal(got, hash_encode_ref(xl - mu.unsqueeze(2), w))
    codes_bh = hash_encode(x, w, bias=hash_bias(mu, w), backend="triton")
    assert not torch.equal(codes_bh[0], codes_bh[1]) and not torch.equal(codes_bh[:, 0], codes_bh[:, 1])


def test_bias_none_and_zero_bias_unchanged():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 70, 32, generator=gen)
    w = torch.randn(2, 32, 64, generator=gen)
    plain = hash_encode(x, w, backend="triton")
    assert torch.equal(hash_encode(x, w, bias=None, backend="triton"), plain)
    assert torch.equal(hash_encode(x, w, bias=torch.zeros(64), backend="triton"), plain)
    assert torch.equal(hash_encode_ref(x, w, None), hash_encode_ref(x, w))


def test_bias_noncontiguous_and_into_cache():
    gen = torch.Generator().manual_seed(7)
    B, H, T, D, Lmax, bits = 3, 2, 5, 32, 40, 96
    x = dyadic(B, H, T, D, gen=gen, dtype=torch.float16)
    w = dyadic(H, D, bits, gen=gen)
    mu = dyadic(H, D, gen=gen)
    bias = hash_bias(mu, w).t().contiguous().t()  # [H, BITS], column-major
    bias3 = hash_bias(mu, w).unsqueeze(0).expand(B, H, bits)  # batch stride 0
    wide = torch.zeros(H, 2 * bits)
    wide[:, ::2] = hash_bias(mu, w)
    bias_strided = wide[:, ::2]  # bit stride 2
    assert not bias.is_contiguous() and not bias_strided.is_contiguous()
    pos = torch.tensor([0, 17, Lmax - T])
    poison = torch.full((B, H, Lmax, bits // 32), -123456, dtype=torch.int32)
    want = hash_encode_into_ref(x.float() - mu.view(1, H, 1, D), w, poison.clone(), pos)
    for b in (bias, bias3, bias_strided):
        got = hash_encode(x, w, bias=b, out=poison.clone(), positions=pos, backend="triton")
        assert torch.equal(got, want)
        ref = hash_encode(x, w, bias=b, out=poison.clone(), positions=pos, backend="reference")
        assert torch.equal(ref, want)
    assert (want[1, :, :17] == -123456).all() and (want[1, :, 17 + T:] == -123456).all()


def test_bias_errors():
    x = torch.randn(2, 3, 4, 16)
    w = torch.randn(3, 16, 64)
    with pytest.raises(TypeError, match="bias must have dtype"):
        hash_encode(x, w, bias=torch.zeros(64, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        hash_encode(x, w, bias=[0.0] * 64)
    with pytest.raises(ValueError, match="BITS=64"):
        hash_encode(x, w, bias=torch.zeros(32))
    with pytest.raises(ValueError, match=r"\[H, BITS\]"):
        hash_encode(x, w, bias=torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"\[B, H, BITS\]"):
        hash_encode(x, w, bias=torch.zeros(3, 3, 64))
    with pytest.raises(ValueError, match=r"\[H, BITS\]"):
        hash_encode(torch.randn(5, 16), w[0], bias=torch.zeros(3, 64))  # x has no head dim
    with pytest.raises(ValueError, match="bias must be"):
        hash_encode(x, w, bias=torch.zeros(1, 2, 3, 64))
    with pytest.raises(ValueError, match="bias is on meta"):
        hash_encode(x, w, bias=torch.zeros(64, device="meta"))


# ---------------------------------------------------------------- hamming_topk(k_scale=)


def brute_force_select(q, k, lens, k_scale, k_blocks, chunk, must_select):
    """Plain Python: int popcounts, one float32 multiply per token, block max, must-select first,
    then score descending with the lower block index first; -> list [B][Hkv] of sorted lists."""
    B, Hq, W = q.shape
    Hkv, bits = k.shape[1], 32 * W
    G = Hq // Hkv
    out = []
    for b in range(B):
        n = -(-int(lens[b]) // chunk)
        rows = []
        for h in range(Hkv):
            best = {}
            for t in range(int(lens[b])):
                s = 0
                for g in range(G):
                    ham = sum(bin((int(q[b, h * G + g, w]) ^ int(k[b, h, t, w])) & 0xFFFFFFFF).count("1")
                              for w in range(W))
                    s += bits - 2 * ham
                v = (torch.tensor(float(s), dtype=torch.float32)
                     * k_scale[b, h, t].to(torch.float32)).item()
                best[t // chunk] = max(best.get(t // chunk, -math.inf), v)
            must = sorted({m % n for m in must_select if -n <= m < n})
            count = min(n, max(k_blocks, len(must)))
            rest = sorted((blk for blk in range(n) if blk not in must), key=lambda blk: (-best[blk], blk))
            rows.append(sorted(must + rest[: count - len(must)]))
        out.append(rows)
    return out


def as_lists(idx):
    return [[[int(v) for v in row if v >= 0] for row in seq] for seq in idx]


def test_scaled_selection_brute_force():
    gen = torch.Generator().manual_seed(21)
    B, Hkv, G, W, L, chunk = 2, 2, 3, 1, 37, 4
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, gen=gen)
    k_scale = (torch.rand(B, Hkv, L, generator=gen) * 3 - 0.5).to(torch.float16)
    lens = torch.tensor([37, 9])
    want = brute_force_select(q, k, lens, k_scale, 4, chunk, (0, -1))
    for backend in ("triton", "reference"):
        got = hamming_topk(q, k, lens, k_blocks=4, chunk_size=chunk, must_select=(0, -1),
                           k_scale=k_scale, backend=backend)
        assert as_lists(got) == want
    plain = hamming_topk(q, k, lens, k_blocks=4, chunk_size=chunk, must_select=(0, -1))
    assert as_lists(plain) != want  # the weights change the choice (a test that can fail)
    # token scores: exactly the fp32 product of the int score and the weight
    ts = token_scores_ref(q, k, k_scale)
    assert ts.dtype == torch.float32
    assert torch.equal(ts, token_scores_ref(q, k).float() * k_scale.float())


@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_scaled_awkward_lengths_ragged(G):
    """Lengths 1, 63, 127, 129, 1000 in one ragged batch, several kv-heads whose keys differ,
    every exact form and majority, fp16 / bf16 / fp32 weights."""
    gen = torch.Generator().manual_seed(100 + G)
    B, Hkv, W, L = 5, 2, 2, 1000
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, gen=gen)
    lens = torch.tensor([1, 63, 127, 129, 1000])
    dtype = FLOATS[G % 3]
    k_scale = (torch.rand(B, Hkv, L, generator=gen) * 8).to(dtype)
    for mode in ("exact", "exact_direct", "exact_planes", "majority"):
        kw = dict(k_blocks=6, chunk_size=16, mode=mode, k_scale=k_scale)
        got = hamming_topk(q, k, lens, backend="triton", **kw)
        want = hamming_topk(q, k, lens, backend="reference", **kw)
        assert torch.equal(got, want), mode
    assert not torch.equal(got[4, 0], got[4, 1])  # the two kv-heads choose differently
    assert (got[0] == torch.tensor([0, -1, -1, -1, -1, -1], dtype=torch.int32)).all()


def test_scaled_ties_signed_zeros_and_must_select():
    """Weights from a few values (0, +-1/2, 1, 2) and low-entropy codes: many equal scores, and
    -0.0 (a negative score times 0) must tie with +0.0 (lower block index first)."""
    gen = torch.Generator().manual_seed(31)
    B, Hkv, G, W, L = 4, 2, 2, 1, 200
    q = codes(B, Hkv * G, W, gen=gen, low_entropy=True)
    k = codes(B, Hkv, L, W, gen=gen, low_entropy=True)
    vals = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0])
    k_scale = vals[torch.randint(0, 5, (B, Hkv, L), generator=gen)]
    lens = torch.tensor([200, 31, 96, 17])
    kb = torch.tensor([2, 9, 1, 30])
    for must in [(), (0, -2, -1), (0, 0, -1, 5, -100, 100)]:
        kw = dict(k_blocks=kb, max_blocks=12, chunk_size=8, must_select=must, k_scale=k_scale)
        got = hamming_topk(q, k, lens, backend="triton", **kw)
        assert torch.equal(got, hamming_topk(q, k, lens, backend="reference", **kw))
    # every weight 0: all scores are +-0.0, all tie, the lowest block indices win
    q, k = codes(B, Hkv * G, W, gen=gen), codes(B, Hkv, L, W, gen=gen)  # scores of both signs
    zeros = torch.zeros(B, Hkv, L)
    assert torch.signbit(token_scores_ref(q, k)[..., :3].float() * 0).any()
    assert not torch.signbit(token_scores_ref(q, k, zeros)).any()
    for chunk in (1, 8):
        got = hamming_topk(q, k, lens, k_blocks=3, chunk_size=chunk, must_select=(), k_scale=zeros,
                           backend="triton")
        assert (got == torch.tensor([0, 1, 2], dtype=torch.int32)).all()


def test_scaled_noncontiguous_and_fused(monkeypatch):
    gen = torch.Generator().manual_seed(41)
    B, Hkv, G, W, L = 2, 3, 2, 2, 300
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, L, Hkv, W, gen=gen).permute(0, 2, 1, 3)  # token-major cache
    k_scale = torch.rand(B, L, 2 * Hkv, generator=gen).half().permute(0, 2, 1)[:, ::2]
    assert not k.is_contiguous() and not k_scale.is_contiguous()
    lens = torch.tensor([300, 129])
    want = hamming_topk(q, k, lens, k_blocks=5, chunk_size=16, k_scale=k_scale, backend="reference")
    got = hamming_topk(q, k, lens, k_blocks=5, chunk_size=16, k_scale=k_scale, backend="triton")
    assert torch.equal(got, want)
    assert torch.equal(want, hamming_topk(q, k.contiguous(), lens, k_blocks=5, chunk_size=16,
                                          k_scale=k_scale.contiguous(), backend="reference"))
    monkeypatch.setattr(kernels, "FUSED_SELECT", True)
    got = hamming_topk(q, k, lens, k_blocks=5, chunk_size=16, k_scale=k_scale, backend="triton")
    assert torch.equal(got, want)


def test_scaled_stage_buffers_poisoned():
    """Stage 1 with weights writes exactly the real blocks' keys, in the order of the fp32 block
    maxima (the keys are order-preserving int32 images of the floats)."""
    gen = torch.Generator().manual_seed(12)
    q = codes(2, 4, 1, gen=gen)
    k = codes(2, 2, 256, 1, gen=gen)
    k_scale = torch.randn(2, 2, 256, generator=gen)
    lens = torch.tensor([256, 40])
    keys = torch.full((2, 2, 16), -999, dtype=torch.int32)
    kernels.block_keys_triton(q, k, lens, 16, "max", out=keys, k_scale=k_scale)
    want = block_scores_ref(token_scores_ref(q, k, k_scale), lens, 16, "max")
    assert (keys[1, :, 3:] == -999).all()
    real = torch.cat([keys[0].flatten(), keys[1, :, :3].flatten()]).long()
    vals = torch.cat([want[0].flatten(), want[1, :, :3].flatten()])
    bits = vals.float().view(torch.int32).long()
    assert torch.equal(real, torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits))
    assert torch.equal(real.argsort(stable=True), vals.argsort(stable=True))


def test_k_scale_errors():
    q = torch.zeros(2, 4, 1, dtype=torch.int32)
    k = torch.zeros(2, 2, 50, 1, dtype=torch.int32)
    lens = torch.tensor([50, 3])
    with pytest.raises(ValueError, match=r"k_scale must be \[B, Hkv, Lmax\]"):
        hamming_topk(q, k, lens, k_blocks=2, k_scale=torch.ones(2, 2, 49))
    with pytest.raises(ValueError, match="k_scale must have 3 dims"):
        hamming_topk(q, k, lens, k_blocks=2, k_scale=torch.ones(2, 100))
    with pytest.raises(TypeError, match="k_scale must have dtype"):
        hamming_topk(q, k, lens, k_blocks=2, k_scale=torch.ones(2, 2, 50, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_scale is on meta"):
        hamming_topk(q, k, lens, k_blocks=2, k_scale=torch.ones(2, 2, 50, device="meta"))
    with pytest.raises(ValueError, match="chunk_repre 'max' or 'lse'"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_repre="mean", k_scale=torch.ones(2, 2, 50))


# ---------------------------------------------------------------- key_stats


def test_key_mean_ignores_padding():
    gen = torch.Generator().manual_seed(51)
    B, H, L, D = 3, 2, 129, 8
    k = torch.randn(B, H, L, D, generator=gen)
    lens = torch.tensor([129, 63, 0])
    k[1, :, 63:] = float("nan")  # padding rows may hold anything
    k[2] = float("inf")
    mu = key_mean(k, lens)
    assert mu.dtype == torch.float32 and mu.shape == (B, H, D)
    torch.testing.assert_close(mu[0], k[0].double().mean(1).float())
    torch.testing.assert_close(mu[1], k[1, :, :63].double().mean(1).float())
    assert (mu[2] == 0).all()
    assert not torch.equal(mu[0, 0], mu[0, 1])
    with pytest.raises(ValueError, match="seq_lens has 2 entries"):
        key_mean(k, lens[:2])
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        key_mean(k, lens.float())


def test_key_norms_values_rounding_and_cache():
    gen = torch.Generator().manual_seed(52)
    B, H, T, D = 2, 3, 7, 16
    k = torch.randn(B, H, T, D, generator=gen).to(torch.bfloat16)
    mus = [None, torch.randn(H, D, generator=gen), torch.randn(B, H, D, generator=gen)]
    for mu in mus:
        m = 0 if mu is None else (mu.view(1, H, 1, D) if mu.dim() == 2 else mu.view(B, H, 1, D))
        want = (k.double() - (m if mu is None else m.double())).norm(dim=-1)
        got = key_norms(k, mu)
        assert got.dtype == torch.float16 and got.shape == (B, H, T)
        assert torch.equal(got, want.float().half()) or (got.double() - want).abs().max() <= 1e-3 * want.max()
    big = torch.full((1, 1, 2, 4), 1e5)  # norm 2e5: saturates at the fp16 maximum, not inf
    assert (key_norms(big) == 65504).all()
    # into a norm cache at ragged positions; rows outside stay untouched
    Lmax = 20
    pos = torch.tensor([0, Lmax - T])
    out = torch.full((B, H, Lmax), float("nan"), dtype=torch.float16)
    res = key_norms(k, mus[1], out=out, positions=pos)
    assert res is out
    norms = key_norms(k, mus[1])
    assert torch.equal(out[0, :, :T], norms[0]) and torch.equal(out[1, :, Lmax - T:], norms[1])
    assert out[0, :, T:].isnan().all() and out[1, :, : Lmax - T].isnan().all()


def test_key_stats_errors():
    k = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"mu must be \[Hkv, D\]"):
        key_norms(k, torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"mu must be \[Hkv, D\]"):
        key_norms(k, torch.zeros(4, 3, 8))
    with pytest.raises(ValueError, match="k must have 4 dims"):
        key_norms(k[0])
    with pytest.raises(TypeError, match="out must have dtype"):
        key_norms(k, out=torch.zeros(2, 3, 9), positions=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="both out= and positions="):
        key_norms(k, out=torch.zeros(2, 3, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="head_dim"):
        hash_bias(torch.zeros(3, 7), torch.zeros(8, 32))
    with pytest.raises(ValueError, match=r"mu must be \[Hkv, D\]"):
        hash_bias(torch.zeros(2, 8), torch.zeros(3, 8, 32))
    with pytest.raises(ValueError, match="mu is on meta"):
        hash_bias(torch.zeros(3, 8, device="meta"), torch.zeros(3, 8, 32))


# ---------------------------------------------------------------- the pieces together


def test_centred_knorm_decode_step():
    """Prefill mean -> centred key codes and key norms -> decode_step with k_scale: kernels equal
    the references, the selection is hamming_topk's with those weights, and it differs from the
    unweighted one (keys with a large common offset, as real keys have)."""
    gen = torch.Generator().manual_seed(61)
    B, Hkv, G, D, L, bits, chunk = 2, 2, 2, 32, 129, 64, 16
    offset = 4 * torch.randn(1, Hkv, 1, D, generator=gen)
    k = (torch.randn(B, Hkv, L, D, generator=gen) * torch.rand(B, Hkv, L, 1, generator=gen) * 3
         + offset).half()
    v = torch.randn(B, Hkv, L, D, generator=gen).half()
    q = dyadic(B, Hkv * G, D, gen=gen, dtype=torch.float16)
    kv_w = dyadic(Hkv, D, bits, gen=gen)
    lens = torch.tensor([129, 40])
    mu = key_mean(k, lens)
    k_codes = hash_encode(k, kv_w, bias=hash_bias(mu, kv_w), backend="reference")
    assert torch.equal(k_codes, hash_encode(k, kv_w, bias=hash_bias(mu, kv_w), backend="triton"))
    k_scale = key_norms(k, mu)
    q_w = kv_w.repeat_interleave(G, 0)
    kw = dict(k_blocks=4, chunk_size=chunk, must_select=(0,), k_scale=k_scale)
    out, idx = decode_step(q, q_w, k_codes, k, v, lens, backend="triton", **kw)
    out_r, idx_r = decode_step(q, q_w, k_codes, k, v, lens, backend="reference", **kw)
    assert torch.equal(idx, idx_r)
    q_codes = hash_encode(q, q_w, backend="reference")
    assert torch.equal(idx_r, hamming_topk(q_codes, k_codes, lens, backend="reference", **kw))
    plain = hamming_topk(q_codes, k_codes, lens, k_blocks=4, chunk_size=chunk, must_select=(0,),
                         backend="reference")
    assert not torch.equal(idx_r, plain)
    scale = 1 / math.sqrt(D)
    mask = selected_token_mask(idx_r, lens, L, chunk)
    ok, err, base = attention_close(out, attention_ref_fp64(q, k, v, mask, scale),
                                    attention_ref_lowp(q, k, v, mask, scale), atol=1e-4)
    assert ok, (err, base)


# ---------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("G,mode", [(1, "exact"), (4, "exact"), (8, "exact"), (8, "majority"),
                                    (4, "exact_planes"), (8, "exact_direct")])
def test_gpu_scaled_real_shapes(G, mode):
    gen = torch.Generator().manual_seed(G)
    B, Hkv, W, L = 4, 8, 4, 4097
    q = codes(B, Hkv * G, W, gen=gen).cuda()
    k = codes(B, Hkv, L, W, gen=gen).cuda()
    lens = torch.tensor([4097, 1, 127, 2050], device="cuda")
    for dtype in FLOATS:
        k_scale = (torch.rand(B, Hkv, L, generator=gen) * 30).to(dtype).cuda()
        for chunk in (128, 16, 1):
            kw = dict(k_blocks=7 if chunk > 1 else 300, chunk_size=chunk, mode=mode, k_scale=k_scale)
            got = hamming_topk(q, k, lens, backend="triton", **kw)
            assert torch.equal(got, hamming_topk(q, k, lens, backend="reference", **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_bias_real_shapes(dtype):
    gen = torch.Generator().manual_seed(8)
    B, H, L, D = 2, 8, 4097, 128
    x = dyadic(B, H, L, D, gen=gen, dtype=dtype).cuda()
    w = dyadic(H, D, 128, gen=gen).cuda()
    mu = dyadic(B, H, D, gen=gen).cuda()
    bias = hash_bias(mu, w)
    want = hash_encode_ref(x.float() - mu.unsqueeze(2), w)
    assert torch.equal(hash_encode(x, w, bias=bias), want)
    assert torch.equal(hash_encode(x[:, :, :1], w, bias=bias), want[:, :, :1])  # one-row kernel
    pos = torch.tensor([0, 4000], device="cuda")
    out = torch.full((B, H, L + 8, 4), -7, dtype=torch.int32, device="cuda")
    got = hash_encode(x[:, :, :5], w, bias=bias, out=out.clone(), positions=pos)
    assert torch.equal(got, hash_encode_into_ref(x[:, :, :5], w, out.clone(), pos, bias))
