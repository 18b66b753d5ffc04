"""kvcomp on real transformers models (tiny random fp32 configs, no downloads): llama and mistral.

The checks are plain functions taking a model_type so that tests/qwen reuses them for the Qwen
family. What they establish:
  (a) dense (threshold above the length, or ratio 1.0 everywhere): greedy tokens AND every
      step's logits are bit-identical to the unpatched model (the dense decode calls the same
      sdpa function on the same values; no mask when none is needed);
  (b) sparse: per layer and decode step the blocks attended equal the policy's k_blocks times
      the kv-heads, must-select blocks are in, reuse layers take their source's selection, the
      cache lengths are right and the logits differ from dense;
  (c) a left-padded batch gives each prompt's solo tokens (also with one prompt below the
      threshold while the other is above it);
  (d) disable() restores the model bit for bit; (e) beam search and crop (assisted decoding)
      work; (f) clear errors.
"""

from __future__ import annotations

import inspect
import logging

import kvcomp
import pytest
import torch
from kvcomp.adapters import UnsupportedModelError, get_adapter
from kvcomp.cache import KVCompCache
from kvcomp.config import ConfigError, KVCompConfig
from kvcomp.hashing import HashWeights
from kvcomp.policy import LayerPolicy

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

MODEL_TYPES = ("llama", "mistral")
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 16
PROMPT, NEW = 45, 10
SPARSE = dict(threshold=16, chunk_size=4, ratio=0.25)


# ---------------------------------------------------------------------------------- helpers
def tiny_model(model_type: str, seed: int = 0, **overrides):
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=512, pad_token_id=0,
    )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32)
    if model_type == "mistral":
        kw.update(sliding_window=None)  # sliding layers stay dense; tested separately
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def config_for(model, **kw) -> KVCompConfig:
    return KVCompConfig.default(model.config.model_type, LAYERS, HEAD_DIM, **kw)


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (1, length), generator=g)


def generate(model, ids, mask=None, new=NEW, **kw):
    kw.setdefault("output_logits", True)
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, pad_token_id=0, **kw,
        )


def cache_kw(model) -> str:
    """The forward's cache argument: "cache" (transformers >= 5.2x) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def assert_identical(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------- checks
def check_dense_identical(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    ref = generate(model, ids)
    for cfg in (config_for(model, threshold=10**6, chunk_size=8),
                config_for(model, threshold=1, ratio=1.0, dense_layers=0)):
        h = kvcomp.enable(model, cfg)
        out = generate(model, ids)
        st = h.stats
        h.disable()
        assert_identical(ref, out)
        assert st["share_read"] == 1.0
        assert all(s["steps"]["dense"] == NEW - 1 for s in st["layers"].values())


def check_sparse_policy(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    dense = generate(model, ids)
    reuse = [-1, -1, -1, 2]
    cfg = config_for(model, top_k_index_reuse=reuse, **SPARSE)
    h = kvcomp.enable(model, cfg, debug=True)
    out = generate(model, ids)
    cache = h.last_cache
    h.disable()
    assert isinstance(cache, KVCompCache)
    policy = LayerPolicy(cfg)
    total = PROMPT + NEW - 1  # the last token is not fed back
    assert cache.get_seq_length() == total
    for i, layer in enumerate(cache.layers):
        assert layer.lens == [total]
        assert layer.seq_lens.tolist() == [total]
        modes = [m for m, _, _ in layer.history]
        want_mode = "dense" if i < 2 else ("reuse" if i == 3 else "compute")
        assert modes == [want_mode] * (NEW - 1)
        for s, (_, att, avail) in enumerate(layer.history):
            length = PROMPT + 1 + s
            n = -(-length // cfg.chunk_size)
            assert int(avail) == KV_HEADS * n
            assert int(att) == KV_HEADS * policy.k_blocks(i, length)
        if i >= 2:
            bi = layer.last_block_idx
            n = -(-total // cfg.chunk_size)
            assert bi.shape[:2] == (1, KV_HEADS)
            for h_ in range(KV_HEADS):
                sel = set(bi[0, h_].tolist()) - {-1}
                assert {0, n - 2, n - 1} <= sel
                assert len(sel) == policy.k_blocks(i, total) < n
    assert torch.equal(cache.layers[3].last_block_idx, cache.layers[2].last_block_idx)
    diff = max((a - b).abs().max().item() for a, b in zip(dense.logits[1:], out.logits[1:]))
    assert diff > 1e-3, "sparse decoding gave the dense logits: the sparse path did not run"
    assert torch.equal(dense.logits[0], out.logits[0])  # prefill is dense
    st = cache.stats
    assert 0 < st["share_read"] < 1
    assert st["layers"][0]["share_read"] == 1.0


def check_left_padding(model_type: str) -> None:
    model = tiny_model(model_type)
    for cfg, lengths in ((config_for(model, **SPARSE), (45, 30)),
                         (config_for(model, **SPARSE), (45, 10)),
                         (config_for(model, threshold=10**6), (33, 20))):
        h = kvcomp.enable(model, cfg)
        a, b = prompt(lengths[0], seed=2), prompt(lengths[1], seed=3)
        solo_a = generate(model, a).sequences[0, lengths[0]:]
        solo_b = generate(model, b).sequences[0, lengths[1]:]
        P = max(lengths)
        batch = torch.zeros(2, P, dtype=torch.long)
        mask = torch.zeros(2, P, dtype=torch.long)
        for row, x in enumerate((a, b)):
            batch[row, P - x.shape[1]:] = x[0]
            mask[row, P - x.shape[1]:] = 1
        out = generate(model, batch, mask)
        cache = h.last_cache
        h.disable()
        assert torch.equal(out.sequences[0, P:], solo_a), (cfg.seq_len_threshold, lengths)
        assert torch.equal(out.sequences[1, P:], solo_b), (cfg.seq_len_threshold, lengths)
        assert cache.layers[0].lens == [n + NEW - 1 for n in lengths]
        assert cache.get_seq_length() == P + NEW - 1


def check_disable(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    before = generate(model, ids)
    impl = model.config._attn_implementation
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    assert model.config._attn_implementation == "kvcomp"
    with pytest.raises(RuntimeError, match="already enabled"):
        kvcomp.enable(model, config_for(model))
    generate(model, ids)
    h.disable()
    h.disable()  # idempotent
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_kvcomp") for m in model.modules())
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    after = generate(model, ids)
    assert_identical(before, after)
    returned = after["cache"] if "cache" in after else after["past_key_values"]
    assert type(returned) is DynamicCache
    with pytest.raises(RuntimeError, match="disabled"):
        h.new_cache()


def check_beam_and_crop(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    ref_beam = generate(model, ids, num_beams=3, output_logits=False)
    ref_greedy = generate(model, ids)
    h = kvcomp.enable(model, config_for(model, threshold=10**6, chunk_size=8))
    beam = generate(model, ids, num_beams=3, output_logits=False)
    assert torch.equal(beam.sequences, ref_beam.sequences)
    # prompt-lookup (assisted) decoding crops the cache after rejected drafts; greedy result
    # must not change. A repetitive prompt makes drafts (and rejections) happen.
    rep = torch.cat([ids[:, :15]] * 3, dim=1)
    ref_rep = generate(model, rep)
    h.disable()
    ref_rep_unpatched = generate(model, rep)
    assert torch.equal(ref_rep.sequences, ref_rep_unpatched.sequences)
    h = kvcomp.enable(model, config_for(model, threshold=10**6, chunk_size=8))
    looked = generate(model, rep, prompt_lookup_num_tokens=4, output_logits=False)
    assert torch.equal(looked.sequences, ref_rep.sequences)
    h.disable()
    # sparse beam search runs and keeps the cache consistent
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    beam = generate(model, ids, num_beams=3, num_return_sequences=2, output_logits=False)
    assert beam.sequences.shape == (2, PROMPT + NEW)
    assert torch.equal(beam.sequences[:, :PROMPT], ids.expand(2, -1))
    h.disable()
    del ref_greedy


def check_crop_and_loop(model_type: str) -> None:
    """Hand-written loop on handle.new_cache(): decode, crop, decode again = same logits;
    feeding the prompt in two pieces (q_len > 1 with a past) continues like one prefill."""
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    ck = cache_kw(model)
    with torch.no_grad():
        cache = h.new_cache()
        out = model(ids, **{ck: cache}, use_cache=True)
        toks, logits = [], []
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            toks.append(nxt)
            out = model(nxt, **{ck: cache}, use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == PROMPT + 5
        cache.crop(-2)
        assert cache.get_seq_length() == PROMPT + 3 and cache.layers[2].lens == [PROMPT + 3]
        for s in (3, 4):
            out = model(toks[s], **{ck: cache}, use_cache=True)
            assert torch.equal(out.logits[:, -1], logits[s])
        # prompt in two pieces: the second goes through the cached dense path
        c2 = h.new_cache()
        model(ids[:, :30], **{ck: c2}, use_cache=True)
        out2 = model(ids[:, 30:], **{ck: c2}, use_cache=True)
        full = model(ids, **{ck: h.new_cache()}, use_cache=True)
        torch.testing.assert_close(out2.logits, full.logits[:, 30:], rtol=1e-5, atol=1e-5)
        assert c2.layers[3].lens == [PROMPT]
        cache.reset()
        assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized
    h.disable()


def check_errors(model_type: str) -> None:
    model = tiny_model(model_type)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        kvcomp.enable(model, KVCompConfig.default("x", LAYERS + 1, HEAD_DIM))
    with pytest.raises(ConfigError, match="head_dim"):
        kvcomp.enable(model, KVCompConfig.default("x", LAYERS, 2 * HEAD_DIM))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        kvcomp.enable(model, config_for(model), hash_weights=HashWeights.random(LAYERS, 3, HEAD_DIM, 128))
    with pytest.raises(ConfigError, match="neither a file nor a config shipped"):
        kvcomp.enable(model, "no-such-config")
    assert model.config._attn_implementation == "sdpa"  # nothing was patched


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dense_identical(model_type):
    check_dense_identical(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sparse_follows_policy(model_type):
    check_sparse_policy(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_left_padded_batch_equals_solo(model_type):
    check_left_padding(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_disable_restores(model_type):
    check_disable(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_beam_search_and_assisted_crop(model_type):
    check_beam_and_crop(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hand_loop_crop_and_extend(model_type):
    check_crop_and_loop(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_errors(model_type):
    check_errors(model_type)


def test_default_config_is_logged(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="kvcomp"):
        h = kvcomp.enable(model)
    cfg = h.config
    h.disable()
    assert "default" in caplog.text
    assert cfg.top_k_ratio_per_layer == [1.0, 1.0, 0.1, 0.1]
    assert (cfg.chunk_size, cfg.hash_bits, cfg.seq_len_threshold) == (128, 128, 2048)
    assert cfg.must_select_blocks == [0, -2, -1]


def test_config_from_path_and_hash_weights_from_file(tmp_path):
    model = tiny_model("llama")
    ids = prompt(PROMPT)
    cfg = config_for(model, **SPARSE)
    cfg.to_json(tmp_path / "c.json")
    hw = HashWeights.random(LAYERS, KV_HEADS, HEAD_DIM, 128, seed=7)
    hw.save(tmp_path / "w.safetensors")
    h = kvcomp.enable(model, cfg, hash_weights=hw)
    a = generate(model, ids)
    h.disable()
    h = kvcomp.enable(model, str(tmp_path / "c.json"), hash_weights=tmp_path / "w.safetensors")
    b = generate(model, ids)
    h.disable()
    assert_identical(a, b)


def test_unsupported_model_type():
    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="llama") as e:
        kvcomp.enable(model)
    assert "gpt2" in str(e.value)


def test_registry_serves_llama_and_mistral():
    from kvcomp.adapters.llama import LlamaAdapter

    for mt in MODEL_TYPES:
        assert isinstance(get_adapter(mt), LlamaAdapter)


def test_mistral_sliding_window_layers_stay_dense():
    """A window shorter than the sequence: kvcomp's dense window path equals the model's own
    (sliding-window cache + mask), tokens exactly and logits to fp32 rounding."""
    model = tiny_model("mistral", sliding_window=24)
    ids = prompt(PROMPT)
    ref = generate(model, ids)
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    out = generate(model, ids)
    st = h.stats
    h.disable()
    assert torch.equal(ref.sequences, out.sequences)
    for x, y in zip(ref.logits, out.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert st["share_read"] == 1.0
