"""``kvcomp.ops.append_kv``: the one-launch append of keys, values and key codes against the
reference writes (interpreter on CPU, CUDA with ``-m gpu``): exact buffers, no stray writes."""

import pytest
import torch
from kvcomp.ops import hash_encode
from kvcomp.ops.append_kv import append_kv, append_kv_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(device, dtype, B, H, T, D, L, bits, seed, Dv=None):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    # as a model hands them over: [B, T, H, D] projections transposed to [B, H, T, D]
    k = torch.randn(B, T, H, D, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(B, T, H, Dv, generator=g).to(device, dtype).transpose(1, 2)
    kb = torch.full((B, H, L, D), 7.0, dtype=dtype, device=device)  # sentinels: stray writes show
    vb = torch.full((B, H, L, Dv), -7.0, dtype=dtype, device=device)
    codes = torch.full((B, H, L, bits // 32), 123, dtype=torch.int32, device=device)
    w = torch.randn(H, D, bits, generator=g).to(device)
    bias = torch.randn(B, H, bits, generator=g).to(device)
    pos = torch.tensor([L - T - 2 * i for i in range(B)], dtype=torch.int32, device=device)
    return k, v, kb, vb, codes, w, bias, pos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D,Dv,bits", [(2, 3, 1, 16, 16, 64), (1, 2, 3, 34, 34, 32),
                                             (3, 1, 1, 128, 128, 128), (1, 1, 2, 32, 16, 64)])
@pytest.mark.parametrize("with_codes", [True, False])
def test_append_kv_matches_reference(device, dtype, B, H, T, D, Dv, bits, with_codes):
    k, v, kb, vb, codes, w, bias, pos = _case(device, dtype, B, H, T, D, 13, bits, B * 100 + T * 10 + D, Dv)
    kb2, vb2, codes2 = kb.clone(), vb.clone(), codes.clone()
    if with_codes:
        append_kv(k, v, kb, vb, pos, codes=codes, weight=w, bias=bias, backend="triton")
        # the codes are the one-row encode kernel's, bit for bit
        hash_encode(k, w, bias=bias, out=codes2, positions=pos, backend="triton")
        assert torch.equal(codes, codes2)
        if dtype == torch.float32:  # exact against the fp32 reference, too
            ref = torch.full_like(codes, 123)
            hash_encode(k, w, bias=bias, out=ref, positions=pos, backend="reference")
            assert torch.equal(codes, ref)
    else:
        append_kv(k, v, kb, vb, pos, backend="triton")
    append_kv_ref(k, v, kb2, vb2, pos)
    assert torch.equal(kb, kb2) and torch.equal(vb, vb2)
    assert (kb == 7.0).sum() == kb.numel() - B * H * T * D  # nothing else written


def test_append_kv_validates():
    k, v, kb, vb, codes, w, bias, pos = _case("cpu", torch.float32, 2, 3, 1, 16, 8, 64, 0)
    with pytest.raises(ValueError, match="both codes= and weight="):
        append_kv(k, v, kb, vb, pos, codes=codes)
    with pytest.raises(ValueError, match="positions"):
        append_kv(k, v, kb, vb, pos[:1])
    with pytest.raises(TypeError, match="k_buf must have dtype"):
        append_kv(k, v, kb.half(), vb, pos)
    with pytest.raises(ValueError, match="words"):
        append_kv(k, v, kb, vb, pos, codes=codes[..., :1], weight=w, backend="triton")
