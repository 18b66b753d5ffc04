"""CUDA-graph decode on a GPU (``-m gpu``): ``kvcomp.graphs.DecodeGraphs`` with the static kvcomp
cache (Triton kernels) and with transformers' StaticCache (the dense baseline).

What the tests establish, on tiny random qwen3 / llama models (no downloads), bf16 and fp32,
head_dim 64, an awkward prompt length (1000) and batch 2 whose sequences select differently:
  (a) capture + replay of the one-token decode forward equals the eager step, teacher-forced
      over several steps (same argmax, logits within rounding), sparse and all-blocks configs;
      one capture per (cache, batch), every later step a replay;
  (b) ``model.generate`` with graphs gives the eager tokens (kvcomp static cache, and
      transformers' StaticCache + sdpa);
  (c) the static cache on the GPU decodes like the dynamic ``KVCompCache`` (same tokens);
  (d) a graph replays correctly after the cache was cropped (device lengths moved in place).
"""

from __future__ import annotations

import inspect

import kvcomp
import pytest
import torch
from kvcomp.config import KVCompConfig
from kvcomp.graphs import DecodeGraphs

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache  # noqa: E402

PROMPT, NEW, B = 1000, 6, 2


def _model(model_type="qwen3", dtype=torch.bfloat16, layers=4):
    cfg = AutoConfig.for_model(
        model_type, vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).cuda().eval()


def _cfg(model, sparse=True):
    n = model.config.num_hidden_layers
    if sparse:
        return KVCompConfig.default(model.config.model_type, n, 64, chunk_size=64, threshold=256,
                                    top_k_budget_tokens=256, dense_layers=1)
    return KVCompConfig.default(model.config.model_type, n, 64, chunk_size=64, ratio=1.0, dense_layers=0)


def _ids(length, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, length), generator=g).cuda()


def _kw(model):
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _step(model, ids, cache):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{_kw(model): cache}).logits[:, -1].float()


def _generate(model, ids, cache):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              disable_compile=True, **{_kw(model): cache})


def _close(x, y, dtype):
    assert torch.equal(x.argmax(-1), y.argmax(-1))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(x, y, rtol=0, atol=tol * float(y.abs().max()))


@pytest.mark.parametrize("model_type,dtype,sparse", [
    ("qwen3", torch.bfloat16, True), ("qwen3", torch.float32, True), ("llama", torch.bfloat16, False),
])
def test_replay_equals_eager(model_type, dtype, sparse):
    model = _model(model_type, dtype)
    h = kvcomp.enable(model, _cfg(model, sparse))
    graphs = h.compile_decode()
    try:
        cache = h.new_cache(static=True, max_cache_len=PROMPT + 16)
        _step(model, _ids(PROMPT), cache)
        toks = [_ids(1, seed=10 + i) for i in range(NEW)]
        state = cache.checkpoint()
        graphs.enabled = False
        eager = [_step(model, t, cache) for t in toks]
        graphs.enabled = True
        cache.restore(state)
        replay = [_step(model, t, cache) for t in toks]
        assert graphs.captures == 1 and graphs.replays == NEW
        for x, y in zip(replay, eager):
            assert torch.isfinite(x).all()
            _close(x, y, dtype)
        assert cache.host_len == PROMPT + NEW and int(cache.length) == PROMPT + NEW
        if sparse:
            a, b = cache.layers[1].step_block_idx
            assert not torch.equal(a, b)
        # crop moves the device length in place: the same graph replays the re-decode
        cache.crop(-3)
        again = [_step(model, t, cache) for t in toks[NEW - 3:]]
        assert graphs.captures == 1
        for x, y in zip(again, eager[NEW - 3:]):
            _close(x, y, dtype)
    finally:
        graphs.remove()
        h.disable()


def test_generate_with_graphs_kvcomp():
    model = _model(dtype=torch.float32)  # fp32: the dynamic cache's SDPA and the kernel agree on argmax
    h = kvcomp.enable(model, _cfg(model))
    try:
        ids = _ids(PROMPT)
        dyn = _generate(model, ids, h.new_cache())
        eager = _generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
        graphs = h.compile_decode()
        try:
            got = _generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
            assert graphs.captures == 1 and graphs.replays == NEW - 1
        finally:
            graphs.remove()
    finally:
        h.disable()
    assert torch.equal(eager, got)
    assert torch.equal(dyn, eager)


def test_generate_with_graphs_transformers_static_cache():
    model = _model()
    ids = _ids(PROMPT)
    eager = _generate(model, ids, StaticCache(config=model.config, max_cache_len=PROMPT + NEW))
    graphs = DecodeGraphs(model)
    try:
        got = _generate(model, ids, StaticCache(config=model.config, max_cache_len=PROMPT + NEW))
        assert graphs.captures == 1 and graphs.replays == NEW - 1
    finally:
        graphs.remove()
    assert torch.equal(eager, got)
