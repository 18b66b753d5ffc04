"""The pure-torch references of kvcomp.ops against independent brute force: bit layout,
Hamming scores, block top-k (hypothesis), attention against SDPA, MLA against direct math,
input validation. These references are the ground truth every kernel is tested against."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention, sparse_mla_decode
from kvcomp.ops._common import pack_bits, popcount32, unpack_bits, word_popcounts
from kvcomp.ops.hamming_topk.reference import token_scores_ref

REF = {"backend": "reference"}


def rand_codes(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform int32 words over the full range (bit 31 set half the time)."""
    return torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)


# ----------------------------------------------------------------------------- packing


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    for bits in (32, 64, 96, 256):
        b = torch.rand(3, 5, bits, generator=g) > 0.5
        codes = pack_bits(b)
        assert codes.dtype == torch.int32 and codes.shape == (3, 5, bits // 32)
        assert torch.equal(unpack_bits(codes), b)
        # the CPU path (numpy's packbits, bool input) against the shifts (any other dtype)
        assert torch.equal(pack_bits(b.to(torch.uint8)), codes)
        assert torch.equal(pack_bits(b.transpose(0, 1)), codes.transpose(0, 1))
    edge = torch.tensor([[-(2**31), -1, 0, 2**31 - 1, 1, -2]], dtype=torch.int32)
    assert torch.equal(pack_bits(unpack_bits(edge)), edge)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(2, 33, dtype=torch.bool))


def test_bit_layout_hand_built():
    """Identity projection: bit b of the code is the sign of x[b]; LSB first, word b // 32."""
    D = 64
    set_bits = [0, 1, 5, 31, 32, 40, 63]
    x = -torch.ones(D)
    x[set_bits] = 1.0
    x[7] = 0.0  # a zero projection is not > 0: bit 7 stays clear
    codes = hash_encode(x.view(1, D), torch.eye(D), **REF)
    w0 = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 31)
    w1 = (1 << 0) | (1 << 8) | (1 << 31)
    want = [w - 2**32 if w >= 2**31 else w for w in (w0, w1)]
    assert codes.tolist() == [want]
    # a permuted projection moves the bits accordingly: column b reads x[perm[b]]
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(1))
    pc = hash_encode(x.view(1, D), torch.eye(D)[:, perm], **REF)
    assert torch.equal(unpack_bits(pc)[0], x[perm] > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hash_encode_matches_float64_signs(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 7, 48, generator=g).to(dtype)
    w = torch.randn(4, 48, 96, generator=g)  # one projection per head (dim 1 of x)
    codes = hash_encode(x, w.to(dtype), **REF)
    assert codes.shape == (3, 4, 7, 3) and codes.dtype == torch.int32
    proj = torch.einsum("bhtd,hdk->bhtk", x.double(), w.to(dtype).double())
    bits = unpack_bits(codes)
    clear = proj.abs() > 1e-3 * proj.abs().mean()  # away from rounding of zero
    assert torch.equal(bits[clear], (proj > 0)[clear])
    # per-head weights differ: the same x under another head's weight gives other codes
    other = hash_encode(x, w.flip(0).to(dtype), **REF)
    assert not torch.equal(codes, other)


def test_hash_encode_into_cache_positions():
    g = torch.Generator().manual_seed(3)
    B, H, T, D, L = 2, 3, 5, 16, 20
    x = torch.randn(B, H, T, D, generator=g)
    w = torch.randn(H, D, 64, generator=g)
    out = torch.full((B, H, L, 2), -12345, dtype=torch.int32)
    pos = torch.tensor([0, 11])
    res = hash_encode(x, w, out=out, positions=pos, **REF)
    assert res is out
    direct = hash_encode(x, w, **REF)
    for b in range(B):
        p = int(pos[b])
        assert torch.equal(out[b, :, p:p + T], direct[b])
        untouched = torch.cat([out[b, :, :p], out[b, :, p + T:]], dim=1)
        assert (untouched == -12345).all()


# ----------------------------------------------------------------------------- Hamming


def test_popcount_and_token_scores_bit_by_bit():
    g = torch.Generator().manual_seed(4)
    words = rand_codes(g, 500)
    words[:4] = torch.tensor([0, -1, -(2**31), 2**31 - 1])
    want = [bin(w & 0xFFFFFFFF).count("1") for w in words.tolist()]
    assert popcount32(words).tolist() == want
    assert word_popcounts(words).tolist() == want  # the CPU path (numpy's bitwise_count)
    assert word_popcounts(words.view(20, 25).t()).tolist() == torch.tensor(want).view(20, 25).t().tolist()

    B, Hkv, G, L, W = 2, 3, 2, 9, 3
    q = rand_codes(g, B, Hkv * G, W)
    k = rand_codes(g, B, Hkv, L, W)
    got = token_scores_ref(q, k)
    qb = unpack_bits(q).tolist()
    kb = unpack_bits(k).tolist()
    for b in range(B):
        for h in range(Hkv):
            for t in range(L):
                s = 0
                for gi in range(G):
                    ham = sum(1 for i in range(32 * W) if qb[b][h * G + gi][i] != kb[b][h][t][i])
                    s += 32 * W - 2 * ham
                assert got[b, h, t].item() == s
    assert got.dtype == torch.int32


# ----------------------------------------------------------------------------- top-k


def brute_topk(q, k, seq_lens, kb, K, chunk, must, repre):
    """Plain-Python statement of hamming_topk: lists of ints in, list [B][Hkv][K] out."""
    B, Hq, W = len(q), len(q[0]), len(q[0][0])
    Hkv = len(k[0])
    G = Hq // Hkv
    bits = 32 * W
    out = []
    for b in range(B):
        L = seq_lens[b]
        n = -(-L // chunk)
        must_set = sorted({m % n for m in must if -n <= m < n}) if n else []
        count = min(n, max(kb[b], len(must_set)), K)
        rows = []
        for h in range(Hkv):
            scores = []
            for blk in range(n):
                toks = []
                for t in range(blk * chunk, min((blk + 1) * chunk, L)):
                    s = 0
                    for gi in range(G):
                        ham = sum(bin((q[b][h * G + gi][w] ^ k[b][h][t][w]) & 0xFFFFFFFF).count("1")
                                  for w in range(W))
                        s += bits - 2 * ham
                    toks.append(s)
                scores.append(max(toks) if repre == "max" else Fraction(sum(toks), len(toks)))
            others = sorted((x for x in range(n) if x not in must_set), key=lambda x: (-scores[x], x))
            chosen = sorted(must_set + others[: count - len(must_set)])
            rows.append(chosen + [-1] * (K - len(chosen)))
        out.append(rows)
    return out


@st.composite
def topk_cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    W = draw(st.integers(1, 3))
    chunk = draw(st.sampled_from([1, 3, 16]))
    lens = draw(st.lists(st.integers(0, 70), min_size=B, max_size=B))
    pad = draw(st.integers(0, 5))
    must = draw(st.lists(st.integers(-4, 4), max_size=4))
    palette = draw(st.sampled_from([0, 1, 2, 4]))  # 0: random codes; else few distinct (ties)
    tensor_k = draw(st.booleans())
    kb = draw(st.lists(st.integers(1, 8), min_size=B, max_size=B))
    extra = draw(st.sampled_from([None, 0, 3]))
    repre = draw(st.sampled_from(["max", "mean"]))
    seed = draw(st.integers(0, 2**31))
    noncontig = draw(st.booleans())
    return B, Hkv, G, W, chunk, lens, pad, must, palette, tensor_k, kb, extra, repre, seed, noncontig


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topk_cases())
def test_hamming_topk_matches_brute_force(case):
    B, Hkv, G, W, chunk, lens, pad, must, palette, tensor_k, kb, extra, repre, seed, noncontig = case
    g = torch.Generator().manual_seed(seed)
    L = max(max(lens), 1) + pad
    q = rand_codes(g, B, Hkv * G, W)
    if palette:
        pal = rand_codes(g, palette, W)
        k = pal[torch.randint(0, palette, (B, Hkv, L), generator=g)]
        q = torch.where(torch.rand(B, Hkv * G, 1, generator=g) < 0.5, pal[0].expand_as(q), q)
    else:
        k = rand_codes(g, B, Hkv, L, W)
    if noncontig:  # token-major storage viewed head-major, and a strided query
        k = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        q = torch.cat([q, q], dim=-1)[..., :W]
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    if tensor_k:
        k_arg = torch.tensor(kb, dtype=torch.int32)
        mb = None if extra is None else max(kb) + extra
        K = max(max(kb) if mb is None else mb, len(set(must)), 1)
    else:
        k_arg, mb = kb[0], None
        K = max(kb[0], len(set(must)), 1)
        kb = [kb[0]] * B
    got = hamming_topk(q, k, seq_lens, k_blocks=k_arg, chunk_size=chunk, must_select=tuple(must),
                       chunk_repre=repre, max_blocks=mb, **REF)
    want = brute_topk(q.tolist(), k.tolist(), lens, kb, K, chunk, must, repre)
    assert got.dtype == torch.int32 and got.shape == (B, Hkv, K)
    assert got.tolist() == want


def test_planted_needles_per_kv_head():
    """Each (sequence, kv-head) has its needle in a different block: a scorer that mixes up
    head and token order (as a production kernel once did) selects the wrong blocks."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, W, chunk = 2, 4, 2, 4, 16
    lens = [1000, 777]
    L = 1000
    k = rand_codes(g, B, Hkv, L, W)
    q = rand_codes(g, B, Hkv * G, W)
    targets = {}
    for b in range(B):
        n = -(-lens[b] // chunk)
        for h in range(Hkv):
            blk = 5 + 11 * h + 3 * b  # distinct per head and per sequence, never must-select
            assert blk < n - 2
            targets[b, h] = blk
            # the needle token equals the group's first query code and is close to the second
            tok = blk * chunk + 7
            k[b, h, tok] = q[b, h * G]
            q[b, h * G + 1] = q[b, h * G] ^ 1
    got = hamming_topk(q, k, torch.tensor(lens), k_blocks=4, chunk_size=chunk, **REF)
    for b in range(B):
        n = -(-lens[b] // chunk)
        for h in range(Hkv):
            assert got[b, h].tolist() == sorted([0, targets[b, h], n - 2, n - 1]), (b, h)
    # the selections differ between heads, so a head mix-up cannot pass by accident
    assert len({tuple(got[0, h].tolist()) for h in range(Hkv)}) == Hkv


def test_must_select_collapse_at_small_n():
    g = torch.Generator().manual_seed(6)
    q = rand_codes(g, 3, 1, 1)
    k = rand_codes(g, 3, 1, 40, 1)
    lens = torch.tensor([1, 17, 40])  # 1, 2 and 3 blocks of 16
    got = hamming_topk(q, k, lens, k_blocks=1, chunk_size=16, must_select=(0, -2, -1), **REF)
    assert got.shape == (3, 1, 3)
    assert got[0, 0].tolist() == [0, -1, -1]  # 0, -2 (absent), -1 -> block 0 only
    assert got[1, 0].tolist() == [0, 1, -1]
    assert got[2, 0].tolist() == [0, 1, 2]
    empty = hamming_topk(q, k, torch.tensor([0, 0, 0]), k_blocks=2, chunk_size=16, **REF)
    assert (empty == -1).all()


# ----------------------------------------------------------------------------- attention


def sdpa_gqa(q, k, v, mask, scale):
    """torch SDPA with kv-heads expanded to query heads; mask bool [B, Hkv, L]."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    ke = k.repeat_interleave(G, dim=1)
    ve = v.repeat_interleave(G, dim=1)
    m = mask.repeat_interleave(G, dim=1).unsqueeze(2)  # [B, Hq, 1, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), ke, ve, attn_mask=m, scale=scale)
    return out.squeeze(2)


def token_mask(block_sets, lens, L, chunk):
    """bool [B, H, L] from Python sets of blocks, built with loops (independent of the ops)."""
    B, H = len(block_sets), len(block_sets[0])
    m = torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(min(lens[b], L)):
                if t // chunk in block_sets[b][h]:
                    m[b, h, t] = True
    return m


def assert_attention_close(out, q, k, v, mask, scale):
    """flash-attention's rule: error vs an fp64 reference <= 2x that of torch SDPA run in
    the inputs' precision, plus a small atol."""
    ref64 = sdpa_gqa(q.double(), k.double(), v.double(), mask, scale)
    same_prec = sdpa_gqa(q, k, v, mask, scale)
    err = (out.double() - ref64).abs().max().item()
    base_err = (same_prec.double() - ref64).abs().max().item()
    atol = 1e-6 if q.dtype == torch.float32 else 1e-3
    assert err <= 2 * base_err + atol, (err, base_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens,chunk", [([1, 63, 127], 16), ([129, 1000], 128), ([7, 40], 1)])
def test_sparse_decode_attention_all_blocks_equals_sdpa(dtype, lens, chunk):
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, D = len(lens), 3, 2, 32
    L = max(lens) + 5
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    nb = -(-L // chunk)
    idx = torch.full((B, Hkv, nb), -1, dtype=torch.int32)
    for b in range(B):
        n = -(-lens[b] // chunk)
        idx[b, :, :n] = torch.arange(n, dtype=torch.int32)
    out = sparse_decode_attention(q, k, v, idx, torch.tensor(lens), chunk_size=chunk, **REF)
    assert out.shape == (B, Hkv * G, D) and out.dtype == dtype
    mask = torch.arange(L).view(1, 1, L) < torch.tensor(lens).view(B, 1, 1)
    assert_attention_close(out, q, k, v, mask.expand(B, Hkv, L), 1 / math.sqrt(D))


def test_sparse_decode_attention_subset_equals_masked_sdpa():
    g = torch.Generator().manual_seed(8)
    B, Hkv, G, D, chunk = 2, 4, 3, 16, 8
    lens = [63, 100]
    L = 104
    q = torch.randn(B, Hkv * G, D, generator=g)
    # non-contiguous caches: token-major storage viewed head-major
    k = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2)
    sets = [[{0, 3, 7}, {1, 2, 7}, {7}, {0, 5}], [{0, 4, 12}, {12, 11}, {2, 3, 6, 12}, {9, 12}]]
    K = 5
    idx = torch.full((B, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            s = sorted(sets[b][h])
            idx[b, h, : len(s)] = torch.tensor(s, dtype=torch.int32)
    scale = 0.37
    out = sparse_decode_attention(q, k, v, idx, torch.tensor(lens), chunk_size=chunk,
                                  scale=scale, **REF)
    mask = token_mask(sets, lens, L, chunk)
    assert_attention_close(out, q, k, v, mask, scale)
    # heads really differ: a head-swapped selection gives another result
    swapped = sparse_decode_attention(q, k, v, idx.flip(1), torch.tensor(lens), chunk_size=chunk,
                                      scale=scale, **REF)
    assert not torch.allclose(out, swapped)


def test_sparse_decode_attention_block_idx_order_duplicates_and_padding():
    """-1 entries anywhere, duplicates and unsorted indices select the same token set."""
    g = torch.Generator().manual_seed(11)
    B, Hkv, G, D, chunk, L = 1, 2, 2, 8, 4, 30
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    lens = torch.tensor([30])
    tidy = torch.tensor([[[0, 3, 7, -1, -1], [1, 2, -1, -1, -1]]], dtype=torch.int32)
    messy = torch.tensor([[[7, -1, 3, 0, 3], [-1, 2, 1, 2, -1]]], dtype=torch.int32)
    a = sparse_decode_attention(q, k, v, tidy, lens, chunk_size=chunk, **REF)
    b = sparse_decode_attention(q, k, v, messy, lens, chunk_size=chunk, **REF)
    assert torch.equal(a, b)
    mask = token_mask([[{0, 3, 7}, {1, 2}]], [30], L, chunk)
    assert_attention_close(a, q, k, v, mask, 1 / math.sqrt(D))


def test_garbage_outside_selection_is_never_read():
    g = torch.Generator().manual_seed(9)
    B, Hkv, G, D, chunk, L = 1, 2, 2, 8, 16, 48
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    idx = torch.tensor([[[0, -1], [2, -1]]], dtype=torch.int32)
    lens = torch.tensor([40])
    clean = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk, **REF)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] = float("nan")  # padding past seq_len
    v2[:, :, 40:] = float("nan")
    k2[:, 0, 16:32] = float("inf")  # an unselected block of head 0
    v2[:, 0, 16:32] = float("nan")
    dirty = sparse_decode_attention(q, k2, v2, idx, lens, chunk_size=chunk, **REF)
    assert torch.equal(clean, dirty)
    lat = sparse_mla_decode(q[:, :, :4], q[:, :, 4:], v2[:, 0, :, :4], v2[:, 0, :, 4:],
                            idx[:, :1], lens, chunk_size=chunk, scale=0.5, **REF)
    assert torch.isfinite(lat).all()


def mla_direct(q_lat, q_pe, ckv, kpe, keep, scale):
    """Latent attention written out: keep bool [B, L] of attended tokens."""
    s = (torch.einsum("bhr,blr->bhl", q_lat, ckv) + torch.einsum("bhp,blp->bhl", q_pe, kpe)) * scale
    s = s.masked_fill(~keep.unsqueeze(1), float("-inf"))
    return torch.einsum("bhl,blr->bhr", torch.softmax(s, dim=-1), ckv)


@pytest.mark.parametrize("subset", [False, True])
def test_sparse_mla_decode_against_direct_latent_attention(subset):
    g = torch.Generator().manual_seed(10)
    B, H, R, P, chunk = 2, 5, 64, 16, 16
    lens = [129, 63]
    L = 130
    q_lat = torch.randn(B, H, R, generator=g)
    q_pe = torch.randn(B, H, P, generator=g)
    ckv = torch.randn(B, L, R, generator=g)
    kpe = torch.randn(B, L, P, generator=g)
    if subset:
        sets = [{0, 3, 8}, {1, 3}]
    else:
        sets = [set(range(-(-n // chunk))) for n in lens]
    K = 9
    idx = torch.full((B, 1, K), -1, dtype=torch.int32)
    for b in range(B):
        s = sorted(sets[b])
        idx[b, 0, : len(s)] = torch.tensor(s, dtype=torch.int32)
    scale = 0.11
    out = sparse_mla_decode(q_lat, q_pe, ckv, kpe, idx, torch.tensor(lens), chunk_size=chunk,
                            scale=scale, **REF)
    keep = token_mask([[s] for s in sets], lens, L, chunk)[:, 0]
    want = mla_direct(q_lat.double(), q_pe.double(), ckv.double(), kpe.double(), keep, scale)
    assert out.shape == (B, H, R) and out.dtype == torch.float32
    assert (out.double() - want).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- validation


def _topk_args():
    return (torch.zeros(1, 4, 2, dtype=torch.int32), torch.zeros(1, 2, 10, 2, dtype=torch.int32),
            torch.tensor([10]))


@pytest.mark.parametrize(
    "change,exc,phrase",
    [
        (lambda a: (a[0].long(), a[1], a[2]), TypeError, "q_codes"),
        (lambda a: (a[0], a[1][0], a[2]), ValueError, "k_codes"),
        (lambda a: (a[0], a[1].to("meta"), a[2]), ValueError, "k_codes is on meta"),
        (lambda a: (a[0], a[1], a[2].float()), TypeError, "seq_lens"),
        (lambda a: (a[0][:, :3], a[1], a[2]), ValueError, "multiple of kv-heads"),
        (lambda a: (a[0][..., :1], a[1], a[2]), ValueError, "words per code"),
        (lambda a: (a[0], a[1], torch.tensor([10, 10])), ValueError, "batch mismatch"),
    ],
)
def test_hamming_topk_input_errors(change, exc, phrase):
    q, k, lens = change(_topk_args())
    with pytest.raises(exc, match=phrase):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=4, **REF)


def test_other_input_errors():
    q, k, lens = _topk_args()
    with pytest.raises(ValueError, match="chunk_size"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_size=0, **REF)
    with pytest.raises(ValueError, match="chunk_repre"):
        hamming_topk(q, k, lens, k_blocks=2, chunk_repre="min", **REF)
    with pytest.raises(TypeError, match="must_select"):
        hamming_topk(q, k, lens, k_blocks=2, must_select=(0, 1.0), **REF)
    with pytest.raises(ValueError, match="k_blocks"):
        hamming_topk(q, k, lens, k_blocks=0, **REF)
    with pytest.raises(ValueError, match="backend"):
        hamming_topk(q, k, lens, k_blocks=2, backend="cuda")

    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="x must have dtype"):
        hash_encode(x.long(), torch.randn(16, 32), **REF)
    with pytest.raises(ValueError, match="48 bits"):
        hash_encode(x, torch.randn(16, 48), **REF)
    with pytest.raises(ValueError, match="head_dim 16"):
        hash_encode(torch.randn(2, 8), torch.randn(16, 32), **REF)
    with pytest.raises(ValueError, match="weight is on meta"):
        hash_encode(x, torch.randn(16, 32, device="meta"), **REF)

    qa, ka = torch.randn(1, 4, 8), torch.randn(1, 2, 20, 8)
    idx, sl = torch.zeros(1, 2, 1, dtype=torch.int32), torch.tensor([20])
    with pytest.raises(TypeError, match="k_cache"):
        sparse_decode_attention(qa, ka.half(), ka, idx, sl, **REF)
    with pytest.raises(TypeError, match="block_idx"):
        sparse_decode_attention(qa, ka, ka, idx.long(), sl, **REF)
    with pytest.raises(ValueError, match="v_cache"):
        sparse_decode_attention(qa, ka, ka[:, :, :10], idx, sl, **REF)
    with pytest.raises(ValueError, match="block_idx"):
        sparse_decode_attention(qa, ka, ka, idx[:, :1], sl, **REF)
    with pytest.raises(ValueError, match="scale"):
        sparse_mla_decode(torch.randn(1, 2, 8), torch.randn(1, 2, 4), torch.randn(1, 5, 8),
                          torch.randn(1, 5, 4), torch.zeros(1, 1, 1, dtype=torch.int32),
                          torch.tensor([5]), scale=-1.0, **REF)
    with pytest.raises(ValueError, match="kpe"):
        sparse_mla_decode(torch.randn(1, 2, 8), torch.randn(1, 2, 4), torch.randn(1, 5, 8),
                          torch.randn(1, 6, 4), torch.zeros(1, 1, 1, dtype=torch.int32),
                          torch.tensor([5]), scale=1.0, **REF)


def test_attention_references_count_a_repeated_block_once():
    g = torch.Generator().manual_seed(21)
    B, Hkv, G, D, chunk, L = 2, 2, 3, 8, 4, 37
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    lens = torch.tensor([37, 22])
    uniq = torch.tensor([[[0, 3, 9, -1], [1, 5, -1, -1]], [[0, 4, 5, -1], [2, -1, -1, -1]]], dtype=torch.int32)
    dup = torch.tensor([[[9, 0, 3, 9], [5, 1, 5, 1]], [[0, 5, 4, 5], [2, 2, 2, -1]]], dtype=torch.int32)
    a = sparse_decode_attention(q, k, v, uniq, lens, chunk_size=chunk, backend="reference")
    b = sparse_decode_attention(q, k, v, dup, lens, chunk_size=chunk, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ckv, kpe = torch.randn(B, L, 16, generator=g), torch.randn(B, L, 4, generator=g)
    ql, qp = torch.randn(B, 5, 16, generator=g), torch.randn(B, 5, 4, generator=g)
    a = sparse_mla_decode(ql, qp, ckv, kpe, uniq[:, :1], lens, chunk_size=chunk, scale=0.2, backend="reference")
    b = sparse_mla_decode(ql, qp, ckv, kpe, dup[:, :1], lens, chunk_size=chunk, scale=0.2, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "slice", "split_last", "token_major", "dim_major"])
def test_gather_rows_equals_torch_gather(layout):
    """_blocks.gather_rows (the references' gather of selected tokens by whole rows from a view of
    the storage) equals torch.gather exactly, for caches that are slices of preallocated buffers,
    column slices of a fused buffer (the MLA latent | rope), and layouts it hands to gather."""
    from kvcomp.ops._blocks import gather_rows

    gen = torch.Generator().manual_seed(len(layout))
    B, H, L, D, N = 2, 3, 50, 8, 17
    if layout == "contiguous":
        cache = torch.randn(B, H, L, D, generator=gen)
    elif layout == "slice":  # keys_buf[:, :, :L] of a preallocated [B, H, Lmax, D] buffer
        cache = torch.randn(B, H, L + 13, D, generator=gen)[:, :, :L]
    elif layout == "split_last":  # kpe = buf[..., 24:] of [B, H, L, 24 + D]: rows at 4 x D
        cache = torch.randn(B, H, L, 24 + D, generator=gen)[..., 24:]
    elif layout == "token_major":  # [B, L, H, D] storage seen as [B, H, L, D]: rows still D-contiguous
        cache = torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
    else:  # dims not contiguous: handed to torch.gather
        cache = torch.randn(B, H, D, L, generator=gen).transpose(2, 3)
    tok = torch.randint(0, L, (B, H, N), generator=gen)
    want = torch.gather(cache, 2, tok.unsqueeze(-1).expand(-1, -1, -1, D))
    assert torch.equal(gather_rows(cache, tok), want)
    assert torch.equal(gather_rows(cache[:, 0], tok[:, 0]), want[:, 0])  # [B, L, D] (MLA)
