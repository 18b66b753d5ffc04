"""``kvcomp.ops.l2_prefetch``: input checks everywhere; on the GPU (``-m gpu``) the prefetch
changes nothing, runs inside a CUDA graph on a side stream, and a static-cache decode with
``handle.prefetch`` gives the same logits as without it, eager and replayed. (That the PTX
holds the prefetch instructions: ``test_kernels_compile.py``.)"""

from __future__ import annotations

import pytest
import torch
from kvcomp.ops.l2_prefetch import join_l2_prefetch, l2_prefetch, start_l2_prefetch


def test_bad_inputs_are_named():
    t = torch.zeros(64, 64)
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(t.t())
    with pytest.raises(ValueError, match="mode"):
        l2_prefetch(t, mode="tma")
    with pytest.raises(ValueError, match="nbytes"):
        l2_prefetch(t, t.numel() * 4 + 1)
    with pytest.raises(ValueError, match="nbytes"):
        start_l2_prefetch(t, -1)
    with pytest.raises(ValueError, match="programs"):
        l2_prefetch(t, programs=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        l2_prefetch(t.numpy())


def test_cpu_tensors_prefetch_nothing():
    t = torch.arange(4096, dtype=torch.float32)
    before = t.clone()
    assert l2_prefetch(t) is None
    assert start_l2_prefetch(t, 1024) is None
    join_l2_prefetch(None)
    assert torch.equal(t, before)


def test_handle_prefetch_is_validated():
    transformers = pytest.importorskip("transformers")
    import kvcomp

    cfg = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="prefetch"):
        kvcomp.enable(model, prefetch=1.5)
    h = kvcomp.enable(model, prefetch=0.5)
    try:
        assert h.prefetch == 0.5
        with pytest.raises(ValueError, match="prefetch"):
            h.prefetch = True
        h.prefetch = 0
        assert h.prefetch == 0.0
    finally:
        h.disable()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bulk", "line"])
@pytest.mark.parametrize("nbytes", [None, 0, 127, 4096 + 128, 3 * 4096 * 128 * 16 + 640])
def test_gpu_prefetch_changes_nothing(mode, nbytes):
    t = torch.randn(3 * 4096 * 64 + 320, device="cuda", dtype=torch.bfloat16)  # not a multiple of 4 KB
    before = t.clone()
    if nbytes is not None and nbytes > t.numel() * 2:
        nbytes = t.numel() * 2
    l2_prefetch(t, nbytes, mode=mode)
    l2_prefetch(t[1:], mode=mode)  # 2-byte offset: bulk falls back to lines
    torch.cuda.synchronize()
    assert torch.equal(t, before)


@pytest.mark.gpu
def test_gpu_prefetch_in_a_graph_on_a_side_stream():
    x = torch.randn(1 << 20, device="cuda")
    w = torch.randn(1 << 22, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            ev = start_l2_prefetch(w)
            y = x * 2
            join_l2_prefetch(ev)
            z = y + w[: x.numel()]
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(z, x * 2 + w[: x.numel()])
