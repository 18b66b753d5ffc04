"""``MLAStaticCache`` (``DeepseekHandle.new_cache(static=True, ...)``): the preallocated MLA latent
cache and its absorbed, graph-capturable decode step (tiny random DeepSeek-V3 models, no
downloads).

What the tests establish (CPU, fp32, kernels' references):
  (a) the static cache decodes like the dynamic ``MLACache``: same greedy tokens, logits within
      fp32 rounding, sparse (selection active, several blocks skipped), every block selected,
      dense, and a run that crosses the threshold; B = 1 and an unpadded B = 2 whose sequences
      select different blocks; the static selection has the policy's width at max_cache_len;
  (b) nothing is allocated after the prefill: the latent and code buffers keep their storage,
      the shared device lengths are the same tensors, the split codes of every stored row
      (prompt and decoded tokens) equal ``split_codes`` of the stored latent; only the latent
      is stored (one head of width R / P), never per-head K/V;
  (c) crop and reset work in place (re-decoding after a crop gives the same logits; after a
      reset a new prompt gives a fresh cache's logits in the same buffers);
  (d) clear errors: missing / stray max_cache_len, padded batch, full cache, batch change;
  (e) ``DecodeGraphs``' static-buffer path (eager on the CPU) gives generate's tokens, one
      entry per threshold phase;
  (f) one-token steps below the threshold write no split codes; the first step at it (or
      ``fill_codes`` before a replay) encodes the rows left: then every row's codes equal
      ``split_codes`` of its latent, and the tokens equal the dynamic cache's.
GPU (``-m gpu``): capture + replay of the one-token decode forward is bit-identical to the
eager step (bf16, sparse and all-blocks, B = 2), and ``generate`` with graphs gives the eager
tokens.
"""

from __future__ import annotations

import inspect

import kvcomp
import pytest
import torch
from kvcomp.config import KVCompConfig

transformers = pytest.importorskip("transformers")
from kvcomp_deepseek.cache import MLACache, split_codes  # noqa: E402
from kvcomp_deepseek.static_cache import MLAStaticCache  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

LAYERS, HEADS, R, P, NOPE, V = 4, 4, 32, 16, 16, 24
PROMPT, NEW, CHUNK = 45, 6, 4
SPARSE = dict(threshold=16, top_k_budget_tokens=5 * CHUNK)  # 5 of 12-13 blocks, 3 must-select
CONFIGS = {
    "sparse": SPARSE,
    "all_blocks": dict(threshold=0, top_k_budget_tokens=10**6),
    "dense": dict(threshold=10**6),
    "cross": dict(threshold=PROMPT + 3, top_k_budget_tokens=5 * CHUNK),  # sparse from step 3
}


def tiny_model(seed: int = 0, dtype=torch.float32, device="cpu", **over):
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        kv_lora_rank=R, q_lora_rank=48, qk_rope_head_dim=P, qk_nope_head_dim=NOPE,
        v_head_dim=V, max_position_embeddings=4096, pad_token_id=0, n_group=1, topk_group=1,
    )
    kw.update(over)
    cfg = AutoConfig.for_model("deepseek_v3", **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def mla_config(layers=LAYERS, r=R, p=P, chunk=CHUNK, **kw) -> KVCompConfig:
    kw.setdefault("bits_kv", 64)
    kw.setdefault("bits_rope", 32)
    kw.setdefault("dense_layers", 1)
    return KVCompConfig.default_mla("tiny-deepseek", layers, r, p, chunk_size=chunk, **kw)


def ids_for(length: int, batch: int = 1, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g).to(device)


def cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def generate(model, ids, cache, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, disable_compile=True, **{cache_kw(model): cache}, **kw,
        )


def step(model, ids, cache):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_kw(model): cache}).logits[:, -1]


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_static_equals_dynamic(model, kind):
    h = kvcomp.enable(model, mla_config(**CONFIGS[kind]), debug=True)
    try:
        for batch in (1, 2):
            ids = ids_for(PROMPT, batch, seed=batch)
            dyn_cache = h.new_cache()
            assert isinstance(dyn_cache, MLACache)
            dyn = generate(model, ids, dyn_cache)
            cache = h.new_cache(static=True, max_cache_len=PROMPT + NEW)
            assert isinstance(cache, MLAStaticCache)
            st = generate(model, ids, cache)
            assert_same(dyn, st)
            total = PROMPT + NEW - 1
            assert cache.get_seq_length() == total and cache.host_len == total
            assert cache.seq_lens_shared.tolist() == [total] * batch and int(cache.length) == total
            stats = dyn_cache.stats
            if kind in ("sparse", "cross"):
                for i in h.policy.compute_layers:  # the dynamic run really skipped blocks
                    assert stats["layers"][i]["share_read"] < (0.6 if kind == "sparse" else 1.0)
                for i in h.policy.compute_layers:
                    bi = cache.layers[i].step_block_idx
                    assert bi.shape == (batch, 1, h.policy.max_k_blocks(i, PROMPT + NEW))
                    # the same blocks as the dynamic cache's last selection (order aside)
                    dyn_bi = dyn_cache.layers[i].last_block_idx
                    for b in range(batch):
                        s = sorted(x for x in bi[b, 0].tolist() if x >= 0)
                        assert s == sorted(x for x in dyn_bi[b, 0].tolist() if x >= 0)
                if batch == 2:
                    a, b = cache.layers[h.policy.compute_layers[0]].step_block_idx
                    assert not torch.equal(a, b)
            elif kind == "all_blocks":
                assert stats["share_read"] == 1.0
    finally:
        h.disable()


# ------------------------------------------------------------------------------------ (b)
def test_no_allocation_after_prefill_and_codes(model):
    h = kvcomp.enable(model, mla_config(**SPARSE))
    try:
        cache = h.new_cache(static=True, max_cache_len=PROMPT + NEW)
        step(model, ids_for(PROMPT, 2), cache)
        layers = cache.layers

        def ptrs():
            return [(x.keys_buf.data_ptr(), x.values_buf.data_ptr(),
                     None if x.mla_codes is None else x.mla_codes.data_ptr()) for x in layers]

        before = ptrs()
        state = (cache.length.data_ptr(), cache.seq_lens_shared.data_ptr())
        for x in layers:  # the latent, one head, full length; codes only where a selection is made
            assert x.keys_buf.shape == (2, 1, PROMPT + NEW, R) and x.values_buf.shape == (2, 1, PROMPT + NEW, P)
            assert (x.mla_codes is not None) == (x.layer_idx in h.policy.compute_layers)
        ids = ids_for(1, 2, seed=9)
        for _ in range(NEW - 1):
            ids = step(model, ids, cache).argmax(-1, keepdim=True)
        assert ptrs() == before
        assert (cache.length.data_ptr(), cache.seq_lens_shared.data_ptr()) == state
        assert all(x.seq_lens is cache.seq_lens_shared for x in layers)
        n = cache.host_len
        assert int(cache.length) == n == PROMPT + NEW - 1
        for i in h.policy.compute_layers:
            x = layers[i]
            w_lat, w_rope = x.mla_weights
            want = split_codes(x.keys_buf[:, :, :n], x.values_buf[:, :, :n], w_lat, w_rope)
            assert torch.equal(x.mla_codes[:, :, :n], want)
            assert x.mla_codes.shape[-1] == (64 + 32) // 32
    finally:
        h.disable()


# ------------------------------------------------------------------------------------ (c)
def test_crop_and_reset(model):
    h = kvcomp.enable(model, mla_config(**SPARSE))
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
        ptr = cache.layers[1].mla_codes.data_ptr()
        cache.reset()
        assert cache.get_seq_length() == 0 and int(cache.length) == 0
        other = ids_for(30, seed=5)
        got = [step(model, other, cache), step(model, toks[0], cache)]
        fresh_cache = h.new_cache(static=True, max_cache_len=64)
        fresh = [step(model, other, fresh_cache), step(model, toks[0], fresh_cache)]
        for x, y in zip(got, fresh):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        assert cache.layers[1].mla_codes.data_ptr() == ptr
    finally:
        h.disable()


# ------------------------------------------------------------------------------------ (d)
def test_errors(model):
    h = kvcomp.enable(model, mla_config(**SPARSE))
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
        step(model, ids_for(PROMPT), cache2)
        with pytest.raises(ValueError, match="batch"):
            step(model, ids_for(1, 2), cache2)
    finally:
        h.disable()
    with pytest.raises(RuntimeError, match="disabled"):
        h.new_cache(static=True, max_cache_len=64)


# ------------------------------------------------------------------------------------ (e)
def test_decode_graphs_static_path(model):
    ids = ids_for(PROMPT, 2, seed=4)
    h = kvcomp.enable(model, mla_config(**CONFIGS["cross"]))
    try:
        ref = generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
        g = h.compile_decode(enabled=False)
        try:
            got = generate(model, ids, h.new_cache(static=True, max_cache_len=PROMPT + NEW))
            assert len(g._entries) == 2  # one entry per phase (below / at the threshold)
        finally:
            g.remove()
        assert_same(ref, got, atol=1e-6)
    finally:
        h.disable()


# ------------------------------------------------------------------------------------ (f)
def _assert_split_codes(h, cache, n):
    for i in h.policy.compute_layers:
        x = cache.layers[i]
        w_lat, w_rope = x.mla_weights
        want = split_codes(x.keys_buf[:, :, :n], x.values_buf[:, :, :n], w_lat, w_rope)
        assert torch.equal(x.mla_codes[:, :, :n], want) and x.coded_len == n, i


def test_split_codes_deferred_below_the_threshold(model):
    t = PROMPT + 4
    h = kvcomp.enable(model, mla_config(threshold=t, top_k_budget_tokens=5 * CHUNK))
    ids = ids_for(PROMPT, 2, seed=7)
    try:
        cache = h.new_cache(static=True, max_cache_len=64)
        step(model, ids, cache)
        _assert_split_codes(h, cache, PROMPT)
        for j in range(3):  # below the threshold: no codes written
            step(model, ids_for(1, 2, seed=50 + j), cache)
            for i in h.policy.compute_layers:
                x = cache.layers[i]
                assert x.coded_len == PROMPT and not x.mla_codes[:, :, PROMPT: PROMPT + j + 1].any()
        assert cache.decode_phase()
        cache.fill_codes()  # what DecodeGraphs runs before the replay of the step at t
        _assert_split_codes(h, cache, t - 1)
        cache.crop(-2)
        step(model, ids_for(1, 2, seed=60), cache)  # t - 2: dense again, nothing coded
        _assert_split_codes(h, cache, t - 3)
        step(model, ids_for(1, 2, seed=61), cache)  # t - 1
        step(model, ids_for(1, 2, seed=62), cache)  # t: the update fills, then codes its row
        _assert_split_codes(h, cache, t)
        # the same tokens as the dynamic cache (which codes every key at once) across the threshold
        dyn = generate(model, ids, h.new_cache(), new=10)
        g = h.compile_decode(enabled=False)
        try:
            st_cache = h.new_cache(static=True, max_cache_len=PROMPT + 10)
            assert_same(dyn, generate(model, ids, st_cache, new=10))
            _assert_split_codes(h, st_cache, PROMPT + 9)
        finally:
            g.remove()
    finally:
        h.disable()


# ------------------------------------------------------------------------------------ GPU
GPU_R, GPU_P, GPU_CHUNK, GPU_PROMPT = 128, 64, 64, 1000


def _gpu_model():
    return tiny_model(dtype=torch.bfloat16, device="cuda", hidden_size=512, intermediate_size=1024,
                      moe_intermediate_size=256, num_attention_heads=8, num_key_value_heads=8,
                      kv_lora_rank=GPU_R, q_lora_rank=256, qk_rope_head_dim=GPU_P, qk_nope_head_dim=64,
                      v_head_dim=64)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sparse", "all_blocks", "cross"])
def test_gpu_replay_equals_eager(kind):
    """"cross": the threshold at the third new token; the two steps below it write no split
    codes, the replays fill them in before the first sparse step (a second graph)."""
    from kvcomp.graphs import DecodeGraphs

    model = _gpu_model()
    extra = {"sparse": dict(threshold=256, top_k_budget_tokens=256),
             "all_blocks": dict(threshold=0, top_k_budget_tokens=10**6),
             "cross": dict(threshold=GPU_PROMPT + 3, top_k_budget_tokens=256)}[kind]
    h = kvcomp.enable(model, mla_config(r=GPU_R, p=GPU_P, chunk=GPU_CHUNK, bits_kv=128, bits_rope=64, **extra))
    g = DecodeGraphs(model)
    try:
        ids = ids_for(GPU_PROMPT, 2, device="cuda")
        toks = [ids_for(1, 2, seed=30 + i, device="cuda") for i in range(5)]
        cache = h.new_cache(static=True, max_cache_len=GPU_PROMPT + 16)
        step(model, ids, cache)
        state = cache.checkpoint()
        g.enabled = False
        eager = [step(model, t, cache) for t in toks]
        cache.restore(state)
        g.enabled = True
        replay = [step(model, t, cache) for t in toks]
        assert g.captures == (2 if kind == "cross" else 1) and g.replays == len(toks)
        for x, y in zip(replay, eager):
            assert torch.equal(x, y)
        if kind == "cross":
            _assert_split_codes(h, cache, GPU_PROMPT + len(toks))
        if kind != "all_blocks":  # the replayed step really selected a subset
            bi = cache.layers[h.policy.compute_layers[0]].step_block_idx
            assert int((bi >= 0).sum(-1).max()) < -(-(GPU_PROMPT + 5) // GPU_CHUNK)
        # generate with graphs == eager generate
        g.enabled = False
        ref = generate(model, ids, h.new_cache(static=True, max_cache_len=GPU_PROMPT + NEW))
        g.enabled = True
        got = generate(model, ids, h.new_cache(static=True, max_cache_len=GPU_PROMPT + NEW))
        assert torch.equal(ref.sequences, got.sequences)
    finally:
        g.remove()
        h.disable()
