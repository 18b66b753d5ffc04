"""The wide tensor-core scan (``kvcomp.ops.hamming_topk.mma_wide``): MLA's 576-bit split codes
with all 128 heads in one group, and other even code widths.

CPU (TRITON_INTERPRET=1): the planes kernel against torch, and the identity the scan computes
(score = 2 sum_b v_b - 4 sum_p coef_p popc(plane_p & k)) evaluated in torch from the kernel's
planes against ``token_scores_ref``. GPU (``-m gpu``): the scan's block keys against the SIMT
scan's, key for key, and ``hamming_topk`` against the reference, ragged lengths, every chunk
size it takes, the histogram path (few rows, small scores) and the search (MLA)."""

import importlib

import pytest
import torch
from kvcomp.ops import hamming_topk
from kvcomp.ops._common import unpack_bits
from kvcomp.ops.hamming_topk import token_scores_ref

mw = importlib.import_module("kvcomp.ops.hamming_topk.mma_wide")
kernels = importlib.import_module("kvcomp.ops.hamming_topk.kernels")


def codes(*shape, low_entropy=False, gen=None, device="cpu"):
    c = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen)
    if low_entropy:
        c = c & 0x7
    return c.to(device)


def planes_torch(q: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, Hq, W] -> int32 [B * Hkv, R, W]: bit p of G / 2 - c_b, R = bit_length(G)."""
    B, Hq, W = q.shape
    G = Hq // Hkv
    R = G.bit_length()
    c = unpack_bits(q).view(B, Hkv, G, 32 * W).sum(2)  # [B, Hkv, BITS]
    v = G // 2 - c
    bits = torch.stack([(v >> p) & 1 for p in range(R)], 2)  # [B, Hkv, R, BITS]
    words = (bits.view(B, Hkv, R, W, 32).to(torch.int64) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(B * Hkv, R, W)


@pytest.mark.parametrize("G, W, Hkv", [(4, 2, 2), (6, 8, 1), (128, 18, 1), (254, 6, 1), (16, 32, 3)])
def test_signed_planes_kernel(G, W, Hkv):
    gen = torch.Generator().manual_seed(G * 100 + W)
    B = 3
    base = codes(B, Hkv * G + 1, W + 3, gen=gen)
    q = base[:, 1:, 2 : 2 + W]  # non-contiguous view
    R = G.bit_length()
    got = mw.signed_planes(q, Hkv, R)
    assert torch.equal(got, planes_torch(q, Hkv))


@pytest.mark.parametrize("G, W, low_entropy", [(128, 18, False), (128, 18, True), (4, 8, False), (8, 2, True)])
def test_plane_score_identity(G, W, low_entropy):
    """The scan's arithmetic, in torch from the kernel's planes: the exact group score."""
    gen = torch.Generator().manual_seed(G + W + low_entropy)
    B, Hkv, L = 2, 2, 50
    q = codes(B, Hkv * G, W, low_entropy=low_entropy, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=low_entropy, gen=gen)
    R = G.bit_length()
    planes = mw.signed_planes(q, Hkv, R).view(B, Hkv, R, W)
    coef = torch.tensor([2**p for p in range(R - 1)] + [-(2 ** (R - 1))])
    pbits = unpack_bits(planes).long()  # [B, Hkv, R, BITS]
    v = (pbits * coef.view(1, 1, R, 1)).sum(2)  # [B, Hkv, BITS]: G / 2 - c_b
    kbits = unpack_bits(k).long()  # [B, Hkv, L, BITS]
    score = 2 * v.sum(-1, keepdim=True) - 4 * (kbits * v.unsqueeze(2)).sum(-1)
    assert torch.equal(score.to(torch.int32), token_scores_ref(q, k))


def test_wide_form_conditions():
    ok = lambda W=18, G=128, form=2, maj=False, chunk=128, repre="max", weighted=False: mw.wide_form_ok(
        W, G, form, maj, chunk, repre, weighted)
    assert ok() and ok(W=2, G=4) and ok(W=32, G=254, chunk=512) and ok(W=8, G=8, chunk=16)
    assert not ok(W=4)  # mma_scan's
    assert not ok(W=17) and not ok(W=34)
    assert not ok(G=256)  # 9 planes: more than the MMA's 8 columns
    assert not ok(form=1) and not ok(maj=True) and not ok(repre="lse") and not ok(weighted=True)
    assert not ok(chunk=48) and not ok(chunk=1024)


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("W, G, chunk", [(18, 128, 128), (18, 128, 16), (18, 128, 256), (18, 16, 64), (8, 4, 128),
                                         (8, 8, 32), (2, 4, 512), (32, 8, 128), (6, 254, 64)])
def test_gpu_wide_scan(monkeypatch, W, G, chunk):
    """Block keys equal the SIMT scan's (buffers poisoned first, real blocks compared), and the
    selection equals the reference's: ragged lengths 1, 127, 129, 4097, one tile a program and
    several, few rows and many, random and low-entropy (tied) codes, a non-contiguous query."""
    gen = torch.Generator().manual_seed(W * 1000 + G + chunk)
    L = 4097
    for B, Hkv, target, low in ((4, 1, 4096, False), (8, 2, 4096, True), (4, 1, 1, False)):
        monkeypatch.setattr(mw, "WIDE_TARGET_PROGRAMS", target)
        q = codes(B, Hkv * G + 2, W, gen=gen, device="cuda")[:, 2:]
        k = codes(B, Hkv, L, W, low_entropy=low, gen=gen, device="cuda")
        lens = torch.tensor([4097, 1, 127, 129] * (B // 4), device="cuda")
        assert kernels._mma_scan_takes(q, k, chunk, "max", "exact", None, None, None, None)
        nb = -(-L // chunk)
        keys = {}
        for wide in (True, False):
            monkeypatch.setattr(mw, "MMA_WIDE", wide)
            out = torch.full((B, Hkv, nb), -7, dtype=torch.int32, device="cuda")
            keys[wide] = kernels.block_keys_triton(q, k, lens, chunk, "max", out=out)
        real = (torch.arange(nb, device="cuda")[None, None, :] < ((lens + chunk - 1) // chunk)[:, None, None])
        real = real.expand_as(keys[True])
        assert torch.equal(keys[True][real], keys[False][real]), (B, Hkv, target)
        monkeypatch.setattr(mw, "MMA_WIDE", True)
        kw = dict(k_blocks=5, chunk_size=chunk, must_select=(0, -1))
        got = hamming_topk(q, k, lens, backend="triton", **kw)
        want = hamming_topk(q.cpu(), k.cpu(), lens.cpu(), backend="reference", **kw)
        assert torch.equal(got.cpu(), want), (B, Hkv, target)


@pytest.mark.gpu
def test_gpu_wide_scan_not_taken_for_unaligned_codes():
    gen = torch.Generator().manual_seed(5)
    k = codes(2, 1, 300, 19, gen=gen, device="cuda")[..., 1:]  # rows of 18 words at odd offsets
    q = codes(2, 128, 18, gen=gen, device="cuda")
    assert not kernels._mma_scan_takes(q, k, 128, "max", "exact", None, None, None, None)
    lens = torch.tensor([300, 77], device="cuda")
    got = hamming_topk(q, k, lens, k_blocks=2, chunk_size=16)
    want = hamming_topk(q.cpu(), k.cpu(), lens.cpu(), k_blocks=2, chunk_size=16, backend="reference")
    assert torch.equal(got.cpu(), want)
