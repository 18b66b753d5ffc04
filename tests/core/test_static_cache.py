"""``KVCompStaticCache`` (``handle.new_cache(static=True, ...)``) and the static-buffer path of
``kvcomp.graphs.DecodeGraphs`` on the CPU (tiny random fp32 llama and qwen3, no downloads).

What the tests establish:
  (a) the static cache decodes exactly like the dynamic ``KVCompCache``: same greedy tokens and
      logits (within fp32 rounding), sparse (selection active, also with token_score
      "centered_norm") and dense configs, B = 1 and an unpadded B = 2 whose sequences select
      different blocks;
  (b) nothing is allocated after the prefill: the buffers keep their storage and shape, the
      shared device length and seq_lens are the same tensors, and the decode step reads only
      device state (the host mirrors agree with it);
  (c) crop and reset work in place (a re-decode after crop gives the same logits; after reset
      a new prompt gives the fresh cache's logits, with the same buffers);
  (d) clear errors: padded batch, full cache, batch change, missing max_cache_len;
  (e) ``DecodeGraphs`` (static buffers, eager on the CPU) gives generate's tokens for kvcomp and
      for transformers' StaticCache (the dense baseline);
  (f) one-token steps below the threshold leave their keys' codes unwritten; the first step at
      the threshold (or ``fill_codes`` before a replay, or a multi-token update) encodes them:
      every stored row's code then equals ``hash_encode`` of its key, bit for bit.
"""

from __future__ import annotations

import inspect

import kvcomp
import pytest
import torch
from kvcomp.config import KVCompConfig
from kvcomp.graphs import DecodeGraphs
from kvcomp.static_cache import KVCompStaticCache

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 16
PROMPT, NEW = 45, 8
SPARSE = dict(threshold=16, chunk_size=4, ratio=0.25)


def tiny_model(model_type: str, seed: int = 0):
    cfg = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=512, pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def config_for(model, **kw) -> KVCompConfig:
    return KVCompConfig.default(model.config.model_type, LAYERS, HEAD_DIM, **kw)


def ids_for(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)


def cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def generate(model, ids, cache=None, new=NEW, **kw):
    if cache is not None:
        kw[cache_kw(model)] = cache
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, **kw,
        )


def step(model, ids, cache):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}).logits[:, -1]


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_model(request.param)


CONFIGS = {
    "sparse": SPARSE,
    "dense": dict(threshold=10**6, chunk_size=8),
    "cross": dict(threshold=PROMPT + 3, chunk_size=4, ratio=0.25),  # dense, then sparse from step 3
    "centered_norm": dict(SPARSE, token_score="centered_norm"),  # centred codes, key norms
    "lse": dict(SPARSE, token_score="centered_norm", chunk_repre_method="lse"),  # log-sum-exp blocks
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_static_equals_dynamic(model, kind):
    cfg = config_for(model, **CONFIGS[kind])
    h = kvcomp.enable(model, cfg, debug=True)
    try:
        for batch in (1, 2):
            ids = ids_for(PROMPT, batch, seed=batch)
            dyn = generate(model, ids, h.new_cache())
            dyn_stats = h.stats
            cache = h.new_cache(static=True, max_cache_len=PROMPT + NEW)
            assert isinstance(cache, KVCompStaticCache)
            st = generate(model, ids, cache)
            assert_same(dyn, st)
            total = PROMPT + NEW - 1
            assert cache.get_seq_length() == total and cache.host_len == total
            assert cache.seq_lens_shared.tolist() == [total] * batch and int(cache.length) == total
            if kind != "dense":
                # the dynamic run really was sparse, and the static one made a selection of the
                # width the policy gives at max_cache_len (every sparse layer, this step)
                assert dyn_stats["share_read"] < 1.0
                for i in h.policy.compute_layers:
                    bi = cache.layers[i].step_block_idx
                    assert bi is not None and bi.shape == (batch, KV_HEADS, h.policy.max_k_blocks(i, PROMPT + NEW))
                # the k_blocks of a step come from a table of the policy's rule over every length
                tables = [t for key, t in cache._persistent.items() if key[0] == "k_blocks"]
                assert tables and all(t.shape == (PROMPT + NEW + 1,) for t in tables)
                i = h.policy.compute_layers[0]
                assert [int(tables[0][n]) for n in (1, 16, 17, PROMPT, total + 1)] == [
                    h.policy.k_blocks(i, n) for n in (1, 16, 17, PROMPT, total + 1)]
                if batch == 2:
                    a, b = cache.layers[h.policy.compute_layers[0]].step_block_idx
                    assert not torch.equal(a, b)  # the two sequences select differently
    finally:
        h.disable()


def test_no_allocation_after_prefill(model):
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    try:
        cache = h.new_cache(static=True, max_cache_len=PROMPT + NEW)
        step(model, ids_for(PROMPT), cache)
        layers = cache.layers
        before = [(layer.keys_buf.data_ptr(), layer.values_buf.data_ptr(),
                   None if layer.codes_buf is None else layer.codes_buf.data_ptr()) for layer in layers]
        state = (cache.length, cache.seq_lens_shared, cache.length.data_ptr(), cache.seq_lens_shared.data_ptr())
        assert all(layer.keys_buf.shape[2] == PROMPT + NEW for layer in layers)
        ids = ids_for(1, seed=9)
        for _ in range(NEW - 1):
            ids = step(model, ids, cache).argmax(-1, keepdim=True)
        after = [(layer.keys_buf.data_ptr(), layer.values_buf.data_ptr(),
                  None if layer.codes_buf is None else layer.codes_buf.data_ptr()) for layer in layers]
        assert before == after
        assert (cache.length, cache.seq_lens_shared) == state[:2]
        assert (cache.length.data_ptr(), cache.seq_lens_shared.data_ptr()) == state[2:]
        assert all(layer.seq_lens is cache.seq_lens_shared for layer in layers)
        assert int(cache.length) == cache.host_len == PROMPT + NEW - 1
        # codes of the decoded tokens were written at their rows
        i = h.policy.compute_layers[0]
        layer = layers[i]
        from kvcomp.ops import hash_encode

        want = hash_encode(layer.keys_buf[:, :, : cache.host_len], layer.code_weight)
        assert torch.equal(layer.codes_buf[:, :, : cache.host_len], want)
    finally:
        h.disable()


def test_crop_and_reset(model):
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    try:
        cache = h.new_cache(static=True, max_cache_len=64)
        step(model, ids_for(PROMPT), cache)
        toks = [ids_for(1, seed=20 + i) for i in range(4)]
        first = [step(model, t, cache) for t in toks]
        cache.crop(-3)
        assert cache.get_seq_length() == PROMPT + 1 and int(cache.length) == PROMPT + 1
        assert cache.seq_lens_shared.tolist() == [PROMPT + 1]
        again = [step(model, t, cache) for t in toks[1:]]
        for x, y in zip(first[1:], again):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        ptr = cache.layers[0].keys_buf.data_ptr()
        cache.reset()
        assert cache.get_seq_length() == 0 and int(cache.length) == 0
        other = ids_for(30, seed=5)
        got = step(model, other, cache)
        fresh = step(model, other, h.new_cache(static=True, max_cache_len=64))
        torch.testing.assert_close(got, fresh, rtol=0, atol=1e-6)
        assert cache.layers[0].keys_buf.data_ptr() == ptr
    finally:
        h.disable()


def test_errors(model):
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    try:
        with pytest.raises(ValueError, match="max_cache_len"):
            h.new_cache(static=True)
        with pytest.raises(ValueError, match="static=True"):
            h.new_cache(max_cache_len=10)
        with pytest.raises(ValueError, match="max_cache_len"):
            h.new_cache(static=True, max_cache_len=0)
        ids = ids_for(PROMPT, 2)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        with pytest.raises(ValueError, match="padding"):
            generate(model, ids, h.new_cache(static=True, max_cache_len=64), attention_mask=mask)
        cache = h.new_cache(static=True, max_cache_len=PROMPT + 1)
        step(model, ids_for(PROMPT), cache)
        step(model, ids_for(1), cache)
        with pytest.raises(ValueError, match="full"):
            step(model, ids_for(1), cache)
        with pytest.raises(ValueError, match="batch"):
            cache.batch_repeat_interleave(2)
        cache2 = h.new_cache(static=True, max_cache_len=64)
        with pytest.raises(RuntimeError, match="after the prefill"):  # nothing stored yet
            cache2.layers[0].update_rotary(*_qkv(1, 1), *_cos_sin(1))
        step(model, ids_for(PROMPT), cache2)
        with pytest.raises(ValueError, match="batch"):
            step(model, ids_for(1, 2), cache2)
        with pytest.raises(ValueError, match="one new"):  # refused before the lengths advance
            cache2.layers[0].update_rotary(*_qkv(1, 2), *_cos_sin(2))
        assert cache2.host_len == PROMPT and int(cache2.length) == PROMPT
    finally:
        h.disable()


def _qkv(B, T):
    return (torch.randn(B, HEADS, T, HEAD_DIM), torch.randn(B, KV_HEADS, T, HEAD_DIM),
            torch.randn(B, KV_HEADS, T, HEAD_DIM))


def _cos_sin(T):
    return torch.ones(1, T, HEAD_DIM), torch.zeros(1, T, HEAD_DIM)


def test_decode_graphs_static_path(model):
    """DecodeGraphs' static-buffer path (eager without CUDA) == plain generate, kvcomp (crossing
    the threshold: one graph entry per phase) and transformers' StaticCache."""
    ids = ids_for(PROMPT, 2, seed=4)
    h = kvcomp.enable(model, config_for(model, **CONFIGS["cross"]))
    try:
        ref = generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
        g = h.compile_decode(enabled=False)
        try:
            with pytest.raises(RuntimeError, match="already wrapped"):
                DecodeGraphs(model)
            got = generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
            assert len(g._entries) == 2  # the decode steps took the static-buffer path, 2 phases
        finally:
            g.remove()
        assert "forward" not in model.__dict__
        assert_same(ref, got)
    finally:
        h.disable()
    ref = generate(model, ids, StaticCache(config=model.config, max_cache_len=PROMPT + NEW), disable_compile=True)
    g = DecodeGraphs(model, enabled=False)
    try:
        got = generate(model, ids, StaticCache(config=model.config, max_cache_len=PROMPT + NEW), disable_compile=True)
        assert len(g._entries) == 1
    finally:
        g.remove()
    assert_same(ref, got)


def _assert_codes_exact(h, cache, n):
    """Rows 0 .. n - 1 of every hashed layer hold hash_encode of their keys (bias included)."""
    from kvcomp.ops import hash_encode

    for i in h.policy.compute_layers:
        layer = cache.layers[i]
        want = hash_encode(layer.keys_buf[:, :, :n], layer.code_weight, bias=layer.key_bias)
        assert torch.equal(layer.codes_buf[:, :, :n], want), i
        assert layer.coded_len == n


@pytest.mark.parametrize("score", ["hamming", "centered_norm"])
def test_codes_deferred_below_the_threshold(model, score):
    t = PROMPT + 4
    h = kvcomp.enable(model, config_for(model, threshold=t, chunk_size=4, ratio=0.25, token_score=score))
    hashed = h.policy.compute_layers
    try:
        cache = h.new_cache(static=True, max_cache_len=64)
        step(model, ids_for(PROMPT, 2), cache)  # a prefill codes its rows, below the threshold too
        _assert_codes_exact(h, cache, PROMPT)
        for j in range(3):  # lengths PROMPT + 1 .. + 3 < t: dense steps, no codes written
            step(model, ids_for(1, 2, seed=30 + j), cache)
            for i in hashed:
                layer = cache.layers[i]
                assert layer.coded_len == PROMPT and layer.padded_len == PROMPT + j + 1
                assert not layer.codes_buf[:, :, PROMPT: PROMPT + j + 1].any()  # zeroed buffers
        state = cache.checkpoint()
        step(model, ids_for(1, 2, seed=40), cache)  # length t: fills rows PROMPT .. t - 2, codes t - 1
        _assert_codes_exact(h, cache, t)
        assert cache.layers[hashed[0]].step_block_idx is not None
        cache.restore(state)  # back to t - 1 tokens: rows below it keep their codes
        assert all(cache.layers[i].coded_len == t - 1 for i in hashed)
        cache.crop(-2)  # t - 3 tokens
        assert all(cache.layers[i].coded_len == t - 3 for i in hashed)
        step(model, ids_for(1, 2, seed=41), cache)  # t - 2: a dense step again
        assert all(cache.layers[i].coded_len == t - 3 for i in hashed)
        assert not cache.decode_phase()
        cache.fill_codes()  # only before a step at the threshold: nothing yet
        assert all(cache.layers[i].coded_len == t - 3 for i in hashed)
        step(model, ids_for(1, 2, seed=42), cache)  # t - 1
        assert cache.decode_phase()
        cache.fill_codes()  # what DecodeGraphs runs before replaying the step at t
        _assert_codes_exact(h, cache, t - 1)
        cache.advance(1)  # as after a replay that wrote row t - 1 and its code
        assert all(cache.layers[i].coded_len == t for i in hashed)
        cache.reset()
        assert all(cache.layers[i].coded_len == 0 for i in hashed)
    finally:
        h.disable()


def test_decode_graphs_fill_deferred_codes(model):
    """Two generations through the same DecodeGraphs entries (static buffers, eager without
    CUDA) with a prompt below the threshold: the tokens equal the dynamic cache's (which codes
    every key at once), and every row's code is exact afterwards."""
    t = PROMPT + 4
    h = kvcomp.enable(model, config_for(model, threshold=t, chunk_size=4, ratio=0.25))
    ids = ids_for(PROMPT, 2, seed=6)
    try:
        ref = generate(model, ids, h.new_cache(), new=12)
        g = h.compile_decode(enabled=False)
        try:
            cache = h.new_cache(static=True, max_cache_len=PROMPT + 12)
            for _ in range(2):
                cache.reset()
                got = generate(model, ids, cache, new=12)
                assert_same(ref, got)
                _assert_codes_exact(h, cache, PROMPT + 11)
            assert len(g._entries) == 2
        finally:
            g.remove()
    finally:
        h.disable()
