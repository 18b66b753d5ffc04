"""``kvcomp.ops.rms_norm`` / ``add_rms_norm`` / ``head_rms_norm_`` / ``silu_mul`` / ``rope``:
Triton kernels (interpreter on CPU, CUDA with ``-m gpu``) against the torch references (the transformers modules' math), at awkward shapes, with
strided inputs and mixed dtypes."""

import pytest
import torch
from kvcomp.ops import rms_norm, silu_mul
from kvcomp.ops._common import interpreting
from kvcomp.ops.norm_act import (
    add_rms_norm,
    add_rms_norm_ref,
    head_rms_norm_,
    head_rms_norm_ref,
    rms_norm_ref,
    rope,
    rope_ref,
    silu_mul_ref,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        return
    # one bf16 / fp16 rounding step apart at most
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    if not (dtype == torch.bfloat16 and interpreting()):
        # rounded to nearest like torch: differences only where the fp32 mean's last bit moved
        # a value across a rounding boundary (the interpreter truncates fp32 -> bf16: skipped)
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 1, 7, 128), (5, 100), (2, 1, 33)])
def test_rms_norm(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(*shape, generator=g)).to(device, dtype)
    w = (1 + torch.randn(shape[-1], generator=g)).to(device, dtype)
    got = rms_norm(x, w, 1e-6, backend="triton")
    _close(got, rms_norm_ref(x, w, 1e-6), dtype)
    assert not torch.equal(got[..., 0], got[..., 1])


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_strided_and_promoted(device):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 2 * 96, generator=g).to(device, torch.bfloat16)
    x = base[:, ::2, :96]  # rows and columns strided (last dim contiguous)
    w32 = torch.randn(96, generator=g).to(device)  # fp32 weight: the result is fp32, as in torch
    got = rms_norm(x, w32, 1e-5, backend="triton")
    want = rms_norm_ref(x, w32, 1e-5)
    assert got.dtype == torch.float32
    tol = 8e-3 if interpreting() else 1e-5  # h is rounded to bf16 first (the interpreter truncates)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    xt = torch.randn(96, 5, generator=g).to(device).t()  # last dim not contiguous: copied first
    torch.testing.assert_close(rms_norm(xt, w32, 1e-5, backend="triton"), rms_norm_ref(xt, w32, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 12288), (3, 7, 100), (2, 1025)])
def test_silu_mul(device, dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    gate = (4 * torch.randn(*shape, generator=g)).to(device, dtype)
    up = torch.randn(*shape, generator=g).to(device, dtype)
    _close(silu_mul(gate, up, backend="triton"), silu_mul_ref(gate, up), dtype)
    big = torch.randn(3, 2 * shape[-1], generator=g).to(device, dtype)
    gs, us = big[:, : shape[-1]], big[:, shape[-1]:]  # row-strided views
    _close(silu_mul(gs, us, backend="triton"), silu_mul_ref(gs, us), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 1, 100), (2, 33)])
def test_add_rms_norm(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = (3 * torch.randn(*shape, generator=g)).to(device, dtype)
    r = (3 * torch.randn(*shape, generator=g)).to(device, dtype)
    w = (1 + torch.randn(shape[-1], generator=g)).to(device, dtype)
    y, s = add_rms_norm(x, r, w, 1e-6, backend="triton")
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    if dtype == torch.bfloat16 and interpreting():  # the interpreter truncates fp32 -> bf16, twice here
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=2e-2)
        torch.testing.assert_close(s.float(), s_ref.float(), rtol=1e-2, atol=1e-2)
        return
    assert torch.equal(s, s_ref)  # the residual sum is one rounding of one fp32 add, as torch's
    _close(y, y_ref, dtype)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, r[..., :-1], w, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,hq,hk,D,extra", [(1, 32, 8, 128, 8 * 128), (3, 4, 2, 34, 0)])
def test_head_rms_norm(device, dtype, M, hq, hk, D, extra):
    g = torch.Generator().manual_seed(M + D)
    y = (3 * torch.randn(M, (hq + hk) * D + extra, generator=g)).to(device, dtype)
    wq = (1 + torch.randn(D, generator=g)).to(device, dtype)
    wk = (1 + torch.randn(D, generator=g)).to(device, dtype)
    want = torch.cat([rms_norm(y[:, : hq * D].reshape(M, hq, D), wq, 1e-6, backend="triton").reshape(M, -1),
                      rms_norm(y[:, hq * D: (hq + hk) * D].reshape(M, hk, D), wk, 1e-6,
                               backend="triton").reshape(M, -1), y[:, (hq + hk) * D:]], 1)
    ref = head_rms_norm_ref(y.clone(), wq, wk, hq, hk, 1e-6)
    got = head_rms_norm_(y, wq, wk, hq, hk, 1e-6, backend="triton")
    assert got is y
    assert torch.equal(got, want)  # each head exactly as the rms_norm kernel computes it
    _close(got, ref, dtype)
    with pytest.raises(ValueError, match="heads"):
        head_rms_norm_(y, wq, wk, hq + 100, hk, 1e-6)


# H200 / triton 3.6 (2026-11-29): bit-identical to torch in every case below since the kernel is
# compiled without fp contraction (with it, one fma.rn.bf16 made it differ; test_kernels_compile)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,T,D", [(1, 32, 8, 1, 128), (3, 4, 2, 5, 64), (2, 6, 3, 1, 34)])
def test_rope(device, dtype, B, Hq, Hkv, T, D):
    g = torch.Generator().manual_seed(B * T + D)
    # q / k as transformers hands them over: [B, T, H, D] projections transposed to [B, H, T, D]
    q = torch.randn(B, T, Hq, D, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype).transpose(1, 2)
    ang = torch.randn(B if T > 1 else 1, T, D // 2, generator=g).repeat(1, 1, 2)  # [1, T, D]: shared
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    got = rope(q, k, cos, sin, backend="triton")
    want = rope_ref(q, k, cos, sin)
    for a, b in zip(got, want):
        assert a.is_contiguous() and a.shape == b.shape
        if dtype == torch.bfloat16 and interpreting():  # the interpreter truncates to bf16
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        else:  # each product and the sum rounded as torch rounds them: bit for bit
            assert torch.equal(a, b)
    assert not torch.equal(got[0][:, 0], got[0][:, 1])


def test_bad_input_is_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.long(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(x, torch.randn(2, 9))
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="rope"):
        rope(q, torch.randn(1, 2, 1, 8), torch.randn(1, 1, 6), torch.randn(1, 1, 6))
