"""kvcomp on DeepSeek-V2 / V3 (MLA) models: tiny random fp32 configs built here, no downloads.

What the tests establish:
  (a) absorbed decode with every block selected equals the model's own attention (logits to
      fp32 rounding), with and without q_lora (V2-Lite has none), rope interleaved or not;
  (b) threshold above the length: greedy tokens and logits bit-identical to the unpatched model;
  (c) sparse: per layer and step the blocks attended equal the policy's k_blocks (one latent
      kv-head), must-select blocks are in, reuse layers take their source's selection, dense
      layers stay dense, logits differ from dense; the cache holds the latent and its split
      codes, never per-head K/V;
  (d) a left-padded batch gives each prompt's solo tokens; disable() restores the model;
  (e) shipped configs, registry, clear errors (config mismatch, unsupported transformers),
      fp8 block-quantized kv_b_proj dequantized for the absorption.
"""

from __future__ import annotations

import kvcomp
import pytest
import torch
from kvcomp.adapters import get_adapter
from kvcomp.config import ConfigError, KVCompConfig
from kvcomp.hashing import HashWeights
from kvcomp.policy import LayerPolicy

transformers = pytest.importorskip("transformers")
from kvcomp_deepseek.adapter import DeepseekAdapter, check_transformers  # noqa: E402
from kvcomp_deepseek.attention import absorb_weights, dense_weight  # noqa: E402
from kvcomp_deepseek.cache import MLACache, split_codes  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

LAYERS, HEADS, R, P, NOPE, V = 4, 4, 32, 16, 16, 24
PROMPT, NEW = 70, 6
CHUNK = 8


def tiny_model(model_type: str = "deepseek_v3", *, q_lora: int | None = 48, seed: int = 0,
               attn: str = "sdpa", **overrides):
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        kv_lora_rank=R, q_lora_rank=q_lora, qk_rope_head_dim=P, qk_nope_head_dim=NOPE,
        v_head_dim=V, max_position_embeddings=512, pad_token_id=0,
    )
    if model_type == "deepseek_v3":
        kw.update(n_group=1, topk_group=1)
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def mla_config(**kw) -> KVCompConfig:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("bits_kv", 64)
    kw.setdefault("bits_rope", 32)
    kw.setdefault("dense_layers", 1)
    return KVCompConfig.default_mla("tiny-deepseek", LAYERS, R, P, **kw)


ALL_BLOCKS = dict(threshold=0, top_k_budget_tokens=10**6)  # sparse path, every block selected
SPARSE = dict(threshold=16, top_k_budget_tokens=2 * CHUNK)  # 2 blocks + must-select -> 3


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (1, length), generator=g)


def generate(model, ids, mask=None, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kw,
        )


VARIANTS = [
    ("deepseek_v3", 48, {}),
    ("deepseek_v3", None, {"rope_interleave": False}),
    ("deepseek_v2", None, {}),  # V2-Lite style: no q_lora
    ("deepseek_v2", 48, {}),
]


# ------------------------------------------------------------------------------ (a), (b)
@pytest.mark.parametrize("model_type,q_lora,extra", VARIANTS)
def test_absorbed_decode_all_blocks_equals_model(model_type, q_lora, extra):
    model = tiny_model(model_type, q_lora=q_lora, **extra)
    ids = prompt(PROMPT)
    ref = generate(model, ids)
    h = kvcomp.enable(model, mla_config(**ALL_BLOCKS), debug=True)
    out = generate(model, ids)
    cache = h.last_cache
    h.disable()
    assert torch.equal(ref.sequences, out.sequences)
    for x, y in zip(ref.logits, out.logits):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    st = cache.stats
    assert st["share_read"] == 1.0
    for i in range(1, LAYERS):  # every sparse layer ran the absorbed path at every step
        assert st["layers"][i]["steps"] == {"dense": 0, "compute": NEW - 1, "reuse": 0}
    assert st["layers"][0]["steps"]["dense"] == NEW - 1


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_threshold_above_length_is_bit_identical(model_type):
    model = tiny_model(model_type)
    ids = prompt(PROMPT)
    ref = generate(model, ids)
    h = kvcomp.enable(model, mla_config(threshold=10**6))
    out = generate(model, ids)
    st = h.stats
    h.disable()
    assert torch.equal(ref.sequences, out.sequences)
    for x, y in zip(ref.logits, out.logits):
        assert torch.equal(x, y)
    assert all(s["steps"] == {"dense": NEW - 1, "compute": 0, "reuse": 0} for s in st["layers"].values())


# ------------------------------------------------------------------------------ (c)
def test_sparse_follows_policy_and_cache_holds_latent():
    model = tiny_model("deepseek_v3")
    ids = prompt(PROMPT)
    dense = generate(model, ids)
    cfg = mla_config(top_k_index_reuse=[-1, -1, -1, 2], **SPARSE)
    h = kvcomp.enable(model, cfg, debug=True)
    out = generate(model, ids)
    cache = h.last_cache
    h.disable()
    assert isinstance(cache, MLACache)
    policy = LayerPolicy(cfg)
    total = PROMPT + NEW - 1
    for i, layer in enumerate(cache.layers):
        assert layer.lens == [total]
        assert layer.keys_buf.shape[1:2] == (1,) and layer.keys_buf.shape[3] == R  # latent only
        assert layer.values_buf.shape[3] == P
        modes = [m for m, _, _ in layer.history]
        want = "dense" if i == 0 else ("reuse" if i == 3 else "compute")
        assert modes == [want] * (NEW - 1)
        for s, (_, att, avail) in enumerate(layer.history):
            length = PROMPT + 1 + s
            assert int(avail) == -(-length // CHUNK)
            assert int(att) == policy.k_blocks(i, length)
        if i >= 1:
            bi = layer.last_block_idx
            n = -(-total // CHUNK)
            assert bi.shape[:2] == (1, 1)
            sel = set(bi[0, 0].tolist()) - {-1}
            assert {0, n - 2, n - 1} <= sel and len(sel) == policy.k_blocks(i, total) == 3
        if i in (1, 2):  # compute layers keep split codes of the stored latent
            w_lat, w_rope = h.mla_weights[i]
            want_codes = split_codes(layer.keys_buf[:, :, :total], layer.values_buf[:, :, :total],
                                     w_lat, w_rope)
            assert torch.equal(layer.mla_codes[:, :, :total], want_codes)
            assert want_codes.shape[-1] == (64 + 32) // 32
        else:
            assert layer.mla_codes is None
    assert torch.equal(cache.layers[3].last_block_idx, cache.layers[2].last_block_idx)
    assert torch.equal(dense.logits[0], out.logits[0])  # prefill is dense
    diff = max((a - b).abs().max().item() for a, b in zip(dense.logits[1:], out.logits[1:]))
    assert diff > 1e-3, "sparse decoding gave the dense logits: the sparse path did not run"
    assert 0 < cache.stats["share_read"] < 1


@pytest.mark.parametrize("aggregation", ["majority", "mean"])
def test_cheaper_query_aggregations_run(aggregation):
    model = tiny_model("deepseek_v3")
    h = kvcomp.enable(model, mla_config(query_aggregation=aggregation, **SPARSE), debug=True)
    out = generate(model, prompt(PROMPT), new=3)
    cache = h.last_cache
    h.disable()
    assert out.sequences.shape == (1, PROMPT + 3)
    bi = cache.layers[2].last_block_idx
    assert int((bi >= 0).sum()) == 3


# ------------------------------------------------------------------------------ (d)
def test_left_padded_batch_equals_solo():
    model = tiny_model("deepseek_v2", q_lora=None)
    h = kvcomp.enable(model, mla_config(**SPARSE))
    a, b = prompt(70, seed=2), prompt(12, seed=3)  # b stays below the threshold a while
    solo_a = generate(model, a).sequences[0, 70:]
    solo_b = generate(model, b).sequences[0, 12:]
    batch = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 58:], mask[1, 58:] = b[0], 1
    out = generate(model, batch, mask)
    cache = h.last_cache
    h.disable()
    assert torch.equal(out.sequences[0, 70:], solo_a)
    assert torch.equal(out.sequences[1, 70:], solo_b)
    assert cache.layers[1].lens == [70 + NEW - 1, 12 + NEW - 1]


def test_disable_restores_and_eager_fallback():
    model = tiny_model("deepseek_v3", attn="eager")
    ids = prompt(PROMPT)
    before = generate(model, ids)
    h = kvcomp.enable(model, mla_config(threshold=10**6))
    assert model.config._attn_implementation == "kvcomp_mla"
    same = generate(model, ids)
    with pytest.raises(RuntimeError, match="already enabled"):
        kvcomp.enable(model, mla_config())
    h.disable()
    h.disable()
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_kvcomp") or "expand_kv" in m.__dict__ for m in model.modules())
    after = generate(model, ids)
    for r in (same, after):
        assert torch.equal(before.sequences, r.sequences)
        assert all(torch.equal(x, y) for x, y in zip(before.logits, r.logits))
    returned = after["cache"] if "cache" in after else after["past_key_values"]
    assert type(returned) is DynamicCache


# ------------------------------------------------------------------------------ (e)
def test_registry_and_shipped_configs():
    for mt in ("deepseek_v2", "deepseek_v3"):
        assert isinstance(get_adapter(mt), DeepseekAdapter)
    shipped = DeepseekAdapter().shipped_configs()
    assert set(shipped) == {"deepseek-v2-lite", "deepseek-v3", "deepseek-r1"}
    for name, layers in (("deepseek-v2-lite", 27), ("deepseek-v3", 61), ("deepseek-r1", 61)):
        c = KVCompConfig.from_json(shipped[name])
        assert c.is_mla and c.num_hidden_layers == layers
        assert (c.kv_lora_rank, c.qk_rope_head_dim) == (512, 64)
        assert (c.hash_bits_kv_lora, c.hash_bits_qk_rope) == (512, 64)
        assert c.top_k_budget_tokens == 2048
        k = LayerPolicy(c).k_blocks(layers - 1, 131072)
        assert k * c.chunk_size == 2048


def test_default_config_and_hash_weight_file(tmp_path):
    model = tiny_model("deepseek_v3")
    h = kvcomp.enable(model)
    cfg = h.config
    h.disable()
    assert cfg.is_mla and cfg.top_k_budget_tokens == 2048 and cfg.kv_lora_rank == R
    cfg = mla_config(**SPARSE)
    hw = HashWeights.random_mla(LAYERS, R, P, 64, 32, seed=5)
    hw.save(tmp_path / "w.safetensors")
    ids = prompt(PROMPT)
    h = kvcomp.enable(model, cfg, hash_weights=hw)
    a = generate(model, ids, new=3)
    h.disable()
    h = kvcomp.enable(model, cfg, hash_weights=tmp_path / "w.safetensors")
    b = generate(model, ids, new=3)
    h.disable()
    assert torch.equal(a.sequences, b.sequences)


def test_errors():
    model = tiny_model("deepseek_v2", q_lora=None)
    with pytest.raises(ConfigError, match="is_mla"):
        kvcomp.enable(model, KVCompConfig.default("x", LAYERS, 16))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        kvcomp.enable(model, KVCompConfig.default_mla("x", LAYERS, 2 * R, P))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        kvcomp.enable(model, KVCompConfig.default_mla("x", LAYERS + 1, R, P))
    with pytest.raises(ConfigError):
        kvcomp.enable(model, mla_config(), hash_weights=HashWeights.random_mla(LAYERS, R, P, 128, 32))
    assert model.config._attn_implementation == "sdpa"

    class OldAttention(torch.nn.Module):  # caches expanded K/V: no expand_kv
        def forward(self, x):
            return x

    with pytest.raises(RuntimeError, match="transformers"):
        check_transformers(OldAttention())


def test_fp8_kv_b_proj_is_dequantized():
    model = tiny_model("deepseek_v3")
    attn = model.model.layers[1].self_attn
    w = attn.kv_b_proj.weight.detach()
    out_f, in_f = w.shape  # [H * (NOPE + V), R] = [160, 32]
    lin = torch.nn.Module()
    scale = torch.rand(-(-out_f // 64), -(-in_f // 16)) + 0.5
    full = scale.repeat_interleave(64, 0)[:out_f].repeat_interleave(16, 1)[:, :in_f]
    lin.weight = torch.nn.Parameter((w / full).to(torch.float8_e4m3fn), requires_grad=False)
    lin.weight_scale_inv = scale
    with pytest.raises(ValueError, match="does not tile"):
        dense_weight(lin)  # default 128 x 128 blocks do not fit these scales
    lin.block_size = (64, 16)
    deq = dense_weight(lin)
    assert torch.equal(deq, lin.weight.float() * full)
    torch.testing.assert_close(deq, w, rtol=0.07, atol=4e-3)  # fp8 e4m3 rounding
    w_uk, w_uv = absorb_weights(attn)
    assert w_uk.shape == (HEADS, NOPE, R) and w_uv.shape == (HEADS, V, R)
    torch.testing.assert_close(w_uk[1], w.view(HEADS, NOPE + V, R)[1, :NOPE])
    lin.weight_scale_inv = None
    with pytest.raises(TypeError, match="dequantize"):
        dense_weight(lin)


def test_beam_search_assisted_crop_and_hand_loop():
    """Beam search (cache reorder), prompt-lookup decoding (crop) and a hand loop that feeds
    the prompt in two pieces (the extend path: T > 1 with a past) on the latent cache."""
    import inspect

    model = tiny_model("deepseek_v3")
    ids = prompt(PROMPT)
    ref_beam = generate(model, ids, num_beams=3)
    rep = torch.cat([ids[:, :20]] * 3, dim=1)
    ref_rep = generate(model, rep)
    h = kvcomp.enable(model, mla_config(threshold=10**6))
    assert torch.equal(generate(model, ids, num_beams=3).sequences, ref_beam.sequences)
    looked = generate(model, rep, prompt_lookup_num_tokens=4)
    assert torch.equal(looked.sequences, ref_rep.sequences)
    h.disable()
    h = kvcomp.enable(model, mla_config(**SPARSE))
    beam = generate(model, ids, num_beams=3, num_return_sequences=2)
    assert beam.sequences.shape == (2, PROMPT + NEW)
    ck = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        c2 = h.new_cache()
        model(ids[:, :30], **{ck: c2}, use_cache=True)
        out2 = model(ids[:, 30:], **{ck: c2}, use_cache=True)
        full = model(ids, **{ck: h.new_cache()}, use_cache=True)
        torch.testing.assert_close(out2.logits, full.logits[:, 30:], rtol=1e-5, atol=1e-5)
        nxt = out2.logits[:, -1:].argmax(-1)
        step = model(nxt, **{ck: c2}, use_cache=True)  # a sparse decode step after the extend
        assert torch.isfinite(step.logits).all()
        assert c2.layers[2].lens == [PROMPT + 1]
        assert int((c2.layers[2].step_block_idx >= 0).sum()) == 3
    h.disable()
