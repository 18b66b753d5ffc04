"""``kvcomp.ops.rope_append``: q / k head norms, RoPE, the cache append and the query codes of a
decode step in one kernel, against the reference (the ops it fuses, in torch): interpreter on
the CPU, CUDA with ``-m gpu``. Rows, caches and codes exact where no norm runs; with norms
within one rounding of the reference (a mean of squares summed in another order); a code bit
may differ only where its projection is within fp32 rounding of 0. Sentinels show stray writes."""

import pytest
import torch
from kvcomp.ops import hash_encode
from kvcomp.ops._common import interpreting
from kvcomp.ops.rope_append import rope_append, rope_append_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(device, dtype, B, Hq, Hkv, D, Dv, L, bits, seed, shared_cos):
    g = torch.Generator().manual_seed(seed)
    N = (Hq + 2 * Hkv) * D
    # as the fused decoder hands them over: slices of one merged q|k|v projection [B, 1, N]
    y = torch.randn(B, 1, N + 3, generator=g).to(device, dtype)[..., 3:]  # an odd offset too
    q = y[..., : Hq * D].view(B, 1, Hq, D).transpose(1, 2)
    k = y[..., Hq * D: (Hq + Hkv) * D].view(B, 1, Hkv, D).transpose(1, 2)
    v = torch.randn(B, 1, Hkv, Dv, generator=g).to(device, dtype).transpose(1, 2)
    ang = torch.rand(B, 1, D // 2, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(device, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(device, dtype)
    if shared_cos:
        cos, sin = cos[:1], sin[:1]
    kb = torch.full((B, Hkv, L, D), 7.0, dtype=dtype, device=device)
    vb = torch.full((B, Hkv, L, Dv), -7.0, dtype=dtype, device=device)
    codes = torch.full((B, Hkv, L, bits // 32), 123, dtype=torch.int32, device=device)
    kw = torch.randn(Hkv, D, bits, generator=g).to(device)
    qw = torch.randn(Hkv, D, bits, generator=g).to(device)
    bias = torch.randn(B, Hkv, bits, generator=g).to(device) * 0.1
    qn = torch.empty(D).uniform_(0.5, 2.0, generator=g).to(device, dtype)
    kn = torch.empty(D).uniform_(0.5, 2.0, generator=g).to(device, dtype)
    pos = torch.tensor([L - 1 - 2 * i for i in range(B)], dtype=torch.int32, device=device)
    return q, k, v, cos, sin, kb, vb, codes, kw, qw, bias, qn, kn, pos


def _bits_agree(got, ref, rows, weight, bias=None):
    """Codes equal except bits whose projection is within fp32 rounding of the threshold."""
    x = rows.double()
    w = weight.double()
    proj = torch.einsum("...d,...db->...b", x, w)
    scale = torch.einsum("...d,...db->...b", x.abs(), w.abs())
    if bias is not None:
        proj = proj - bias.double()
    bit = torch.arange(32, device=got.device)
    diff = ((got ^ ref).unsqueeze(-1) >> bit) & 1  # [..., W, 32]
    diff = diff.flatten(-2).bool()
    return bool((~diff | (proj.abs() <= 1e-5 * scale)).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,Dv,bits", [(1, 4, 2, 16, 16, 64), (3, 8, 1, 34, 34, 32),
                                                (2, 3, 3, 128, 128, 128), (1, 2, 1, 32, 16, 64)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("what", ["all", "keys", "none"])
def test_rope_append_matches_reference(device, dtype, B, Hq, Hkv, D, Dv, bits, norm, what):
    q, k, v, cos, sin, kb, vb, codes, kw, qw, bias, qn, kn, pos = _case(
        device, dtype, B, Hq, Hkv, D, Dv, 11, bits, B * 100 + Hq * 10 + D, shared_cos=B == 2)
    kb2, vb2, codes2 = kb.clone(), vb.clone(), codes.clone()
    kw_ = dict(q_norm=qn if norm else None, k_norm=kn if norm else None, eps=1e-6)
    if what != "none":
        kw_.update(codes=codes, k_weight=kw, k_bias=bias if Hkv > 1 else None)
    if what == "all":
        kw_["q_weight"] = qw
    q_rot, q_codes = rope_append(q, k, v, cos, sin, kb, vb, pos, **kw_, backend="triton")
    kw_2 = {**kw_, "codes": codes2} if what != "none" else kw_
    q_ref, qc_ref = rope_append_ref(q, k, v, cos, sin, kb2, vb2, pos, **kw_2)
    assert q_rot.shape == (B, Hq, 1, D) and q_rot.is_contiguous()
    assert torch.equal(vb, vb2)  # values: copied
    assert (kb == 7.0).sum() == kb.numel() - B * Hkv * D  # one row per (sequence, kv-head) written
    # the interpreter truncates to bf16 where the GPU rounds (as test_norm_act's rope test)
    if norm or (dtype == torch.bfloat16 and interpreting()):  # one rounding of the dtype at most
        # (the interpreter's truncations can add up to ~4 bf16 steps over norm, weight and RoPE)
        r = 4e-2 if interpreting() else 2e-2
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=r, atol=r)
        torch.testing.assert_close(q_rot, q_ref, **tol)
        torch.testing.assert_close(kb, kb2, **tol)
    else:  # each product and the sum rounded as torch rounds them: bit for bit
        assert torch.equal(q_rot, q_ref) and torch.equal(kb, kb2)
    rows = torch.arange(B, device=device)
    k_rows = kb[rows, :, pos.long()]  # [B, Hkv, D]: the rotated keys the kernel stored
    if what != "none":
        b_ = bias if Hkv > 1 else None
        # the codes of the rows the kernel stored (the reference's rows where those are equal)
        want = hash_encode(k_rows.unsqueeze(2), kw, bias=b_, backend="reference")[:, :, 0]
        assert _bits_agree(codes[rows, :, pos.long()], want, k_rows, kw, b_)
        untouched = torch.ones_like(codes, dtype=torch.bool)
        untouched[rows, :, pos.long()] = False
        assert (codes[untouched] == 123).all()
    else:
        assert (codes == 123).all()
    if what == "all":
        G = Hq // Hkv
        assert q_codes.shape == (B, Hq, bits // 32) and q_codes.dtype == torch.int32
        want = hash_encode(q_rot, qw, enable_gqa=True, backend="reference").flatten(2)
        assert _bits_agree(q_codes, want, q_rot[:, :, 0], qw.repeat_interleave(G, 0))
        if torch.equal(q_rot, q_ref):
            assert torch.equal(want, qc_ref)
    else:
        assert q_codes is None


def test_rope_append_validates():
    q, k, v, cos, sin, kb, vb, codes, kw, qw, bias, qn, kn, pos = _case(
        "cpu", torch.float32, 2, 4, 2, 16, 16, 8, 64, 0, False)
    with pytest.raises(ValueError, match="both codes= and k_weight="):
        rope_append(q, k, v, cos, sin, kb, vb, pos, codes=codes)
    with pytest.raises(ValueError, match="both q_norm= and k_norm="):
        rope_append(q, k, v, cos, sin, kb, vb, pos, q_norm=qn)
    with pytest.raises(ValueError, match=r"\[B, Hq, 1, D\]"):
        rope_append(q.expand(2, 4, 2, 16), k, v, cos, sin, kb, vb, pos)
    with pytest.raises(TypeError, match="k_buf must have dtype"):
        rope_append(q, k, v, cos, sin, kb.half(), vb, pos)
    with pytest.raises(ValueError, match="q_weight"):
        rope_append(q, k, v, cos, sin, kb, vb, pos, q_weight=qw[:1])
    with pytest.raises(ValueError, match="code words"):
        rope_append(q, k, v, cos, sin, kb, vb, pos, codes=codes, k_weight=kw, q_weight=qw[..., :32])
