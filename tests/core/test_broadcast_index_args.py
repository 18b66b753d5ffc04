"""Per-sequence index tensors (seq_lens, positions, k_blocks) given as broadcast views (stride 0,
e.g. ``lens[:1].expand(B)`` or ``seq_lens.view(B, 1).expand(B, H).reshape(-1)`` at B = 1) must
read as their values, not as the memory after their first element.

This is the bug the offload tier hit on the H200 at B = 1: its rows' lengths were a stride-0 view
and the attention kernel read ``seq_lens[b]`` at unit stride, past the one real element. Each
view here sits on storage whose next elements hold *other* values, so a unit-stride read gives
a wrong answer. Triton kernels (interpreter on CPU; CUDA with ``-m gpu``) against the reference."""

import math

import pytest
import torch
from kvcomp.ops import (
    hamming_topk,
    hash_encode,
    mla_decode,
    sparse_decode_attention,
    sparse_mla_decode,
)
from kvcomp.ops.hash_encode.reference import hash_encode_into_ref
from kvcomp.ops.mla_select import mla_select

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def broadcast(value: int, n: int, device, dtype=torch.int32) -> torch.Tensor:
    """[n] stride-0 view of ``value``; the storage behind it continues with 1, 2, 3 ..."""
    base = torch.tensor([value] + list(range(1, n + 3)), dtype=dtype, device=device)
    view = base[:1].expand(n)
    assert view.stride(0) == 0 and not view.is_contiguous()
    return view


def full(value: int, n: int, device, dtype=torch.int32) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_attention(device):
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, L, D, chunk, K = 4, 2, 2, 200, 32, 16, 5
    q = torch.randn(B, Hkv * G, D, generator=g).to(device)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device)
    idx = torch.stack([torch.randperm(12, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K)
    idx = idx.to(device, torch.int32)
    got = sparse_decode_attention(q, k, v, idx, broadcast(190, B, device), chunk_size=chunk, backend="triton")
    want = sparse_decode_attention(q, k, v, idx, full(190, B, device), chunk_size=chunk, backend="reference")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_hamming_topk_lens_and_k_blocks(device):
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, L, W = 3, 2, 2, 300, 2
    q = torch.randint(-(2**31), 2**31 - 1, (B, Hkv * G, W), generator=g, dtype=torch.int32).to(device)
    k = torch.randint(-(2**31), 2**31 - 1, (B, Hkv, L, W), generator=g, dtype=torch.int32).to(device)
    got = hamming_topk(q, k, broadcast(290, B, device), k_blocks=broadcast(6, B, device),
                       max_blocks=8, chunk_size=16, backend="triton")
    want = hamming_topk(q, k, full(290, B, device), k_blocks=full(6, B, device), max_blocks=8,
                        chunk_size=16, backend="reference")
    assert torch.equal(got, want)
    assert (got >= 0).sum(-1).eq(6).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hash_encode_into_positions(device):
    g = torch.Generator().manual_seed(2)
    B, H, T, D, Lmax = 3, 2, 1, 32, 24
    x = torch.randn(B, H, T, D, generator=g).to(device)
    w = torch.randn(H, D, 64, generator=g).to(device)
    poison = torch.full((B, H, Lmax, 2), -7, dtype=torch.int32, device=device)
    got = hash_encode(x, w, out=poison.clone(), positions=broadcast(9, B, device), backend="triton")
    want = hash_encode_into_ref(x, w, poison.clone(), full(9, B, device))
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_mla_ops(device):
    g = torch.Generator().manual_seed(3)
    B, H, R, P, L, chunk = 3, 4, 32, 16, 150, 16
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    q_lat, q_pe, ckv, kpe = mk(B, H, R), mk(B, H, P), mk(B, L, R), mk(B, L, P)
    scale = 1 / math.sqrt(R + P)
    got = mla_decode(q_lat, q_pe, ckv, kpe, broadcast(140, B, device), scale=scale, backend="triton")
    want = mla_decode(q_lat, q_pe, ckv, kpe, full(140, B, device), scale=scale, backend="reference")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    idx = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(B)]).view(B, 1, 4).to(device, torch.int32)
    got = sparse_mla_decode(q_lat, q_pe, ckv, kpe, idx, broadcast(140, B, device), chunk_size=chunk,
                            scale=scale, backend="triton")
    want = sparse_mla_decode(q_lat, q_pe, ckv, kpe, idx, full(140, B, device), chunk_size=chunk,
                             scale=scale, backend="reference")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    qc = torch.randint(-(2**31), 2**31 - 1, (B, H, 3), generator=g, dtype=torch.int32).to(device)
    kc = torch.randint(-(2**31), 2**31 - 1, (B, 1, L, 3), generator=g, dtype=torch.int32).to(device)
    got = mla_select(qc, kc, broadcast(140, B, device), k_blocks=broadcast(4, B, device), max_blocks=5,
                     chunk_size=chunk, backend="triton")
    want = hamming_topk(qc, kc, full(140, B, device), k_blocks=full(4, B, device), max_blocks=5,
                        chunk_size=chunk, backend="reference")
    assert torch.equal(got, want)
