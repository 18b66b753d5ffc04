"""KVCompCache / KVCompLayer on their own: compaction of padding, ragged appends, key codes,
amortized growth, crop / beam reorder / batch selection / reset, per-layer devices, errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kvcomp.cache import KVCompCache, layer_for_key  # noqa: E402
from kvcomp.hashing import HashWeights  # noqa: E402
from kvcomp.ops.hash_encode import hash_encode_ref  # noqa: E402

B, H, D, BITS, CHUNK = 3, 2, 8, 64, 4


def weights(layers: int = 2) -> list[torch.Tensor]:
    hw = HashWeights.random(layers, H, D, BITS, seed=3)
    return [hw.layer(i) for i in range(layers)]


def make_cache(**kw) -> KVCompCache:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("code_weights", [weights()[0], None])
    return KVCompCache(2, **kw)


def kv(T: int, batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, T, D, generator=g), torch.randn(batch, H, T, D, generator=g)


def left_pad_mask(lens, width):
    m = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens):
        m[b, width - n:] = 1
    return m


def test_prefill_drops_left_padding_and_encodes_keys():
    cache = make_cache()
    layer = cache.layers[0]
    k, v = kv(7)
    lens = [7, 4, 1]
    mask = left_pad_mask(lens, 7)
    cache.begin_step(mask, 7)
    rk, rv = cache.update(k, v, 0)
    assert rk is k and rv is v  # prefill: the padded states for transformers' own mask
    assert layer_for_key(rk) is layer and layer_for_key(k.clone()) is None
    assert layer.lens == lens and layer.seq_lens.tolist() == lens
    assert layer.seq_lens.dtype == torch.int32
    assert cache.get_seq_length(0) == 7 and layer.get_mask_sizes(1) == (8, 0)
    assert layer.capacity % CHUNK == 0 and layer.capacity >= 7
    codes = hash_encode_ref(k, weights()[0])  # [B, H, T, W]
    for b, n in enumerate(lens):
        keep = mask[b].bool()
        assert torch.equal(layer.keys_buf[b, :, :n], k[b][:, keep])
        assert torch.equal(layer.values_buf[b, :, :n], v[b][:, keep])
        assert torch.equal(layer.codes_buf[b, :, :n], codes[b][:, keep])
        assert not layer.keys_buf[b, :, n:].any() and not layer.codes_buf[b, :, n:].any()
    # codes are per kv-head: the two heads' weights differ, so do their codes
    assert not torch.equal(layer.codes_buf[0, 0, :7], layer.codes_buf[0, 1, :7])
    assert cache.layers[1].codes_buf is None  # no weights -> no codes kept


def test_decode_appends_at_each_sequence_end_and_grows():
    cache = make_cache()
    layer = cache.layers[0]
    k0, v0 = kv(7)
    lens = [7, 4, 1]
    cache.begin_step(left_pad_mask(lens, 7), 7)
    cache.update(k0, v0, 0)
    cache.end_step()
    w = weights()[0]
    steps = []
    for s in range(6):  # crosses the first capacity (8) -> growth with the content kept
        k, v = kv(1, seed=10 + s)
        cache.begin_step(torch.ones(B, 8 + s, dtype=torch.long), 1)
        rk, rv = cache.update(k, v, 0)
        cache.end_step()
        steps.append((k, v))
        L = max(lens) + s + 1
        assert rk.shape == (B, H, L, D) and rk.data_ptr() == layer.keys_buf.data_ptr()
        assert layer.step_kind == "decode"
        assert layer.step_query_pos.tolist() == [[n + s] for n in lens]
    assert layer.lens == [n + 6 for n in lens]
    assert layer.seq_lens.tolist() == layer.lens
    assert cache.get_seq_length() == 13
    for b, n in enumerate(lens):
        for s, (k, v) in enumerate(steps):
            assert torch.equal(layer.keys_buf[b, :, n + s], k[b, :, 0])
            assert torch.equal(layer.values_buf[b, :, n + s], v[b, :, 0])
            assert torch.equal(layer.codes_buf[b, :, n + s], hash_encode_ref(k, w)[b, :, 0])
        keep = left_pad_mask(lens, 7)[b].bool()
        assert torch.equal(layer.keys_buf[b, :, :n], k0[b][:, keep])


def test_growth_is_amortized_in_whole_chunks():
    cache = KVCompCache(1, chunk_size=8)
    layer = cache.layers[0]
    caps = []
    for s in range(200):
        cache.update(*kv(1, batch=1, seed=s), 0)
        if not caps or caps[-1] != layer.capacity:
            caps.append(layer.capacity)
    assert all(c % 8 == 0 for c in caps)
    assert len(caps) <= 9, caps  # x1.5 per growth, not one allocation per step
    assert all(b >= 1.5 * a - 8 for a, b in zip(caps, caps[1:]))


def test_extend_with_a_gap_in_the_new_tokens():
    cache = make_cache()
    layer = cache.layers[0]
    cache.update(*kv(5), 0)
    k, v = kv(3, seed=5)
    mask = torch.ones(B, 8, dtype=torch.long)
    mask[1, 6] = 0  # sequence 1: the middle new token is padding
    cache.begin_step(mask, 3)
    rk, _ = cache.update(k, v, 0)
    assert layer.step_kind == "extend"
    assert layer.lens == [8, 7, 8]
    assert torch.equal(layer.keys_buf[1, :, 5], k[1, :, 0])
    assert torch.equal(layer.keys_buf[1, :, 6], k[1, :, 2])
    assert layer.step_query_pos[1].tolist() == [5, 5, 6]
    assert layer.step_query_pos[0].tolist() == [5, 6, 7]
    assert rk.shape[2] == 8 and cache.get_seq_length() == 8


def test_crop_reorder_select_repeat_reset():
    cache = make_cache()
    layer = cache.layers[0]
    lens = [7, 4, 1]
    cache.begin_step(left_pad_mask(lens, 7), 7)
    cache.update(*kv(7), 0)
    cache.end_step()
    for s in range(3):
        cache.update(*kv(1, seed=20 + s), 0)
    assert layer.lens == [10, 7, 4]
    before = layer.keys_buf.clone()
    cache.crop(0)
    assert layer.lens == [10, 7, 4]
    cache.crop(-2)
    assert layer.lens == [8, 5, 2] and cache.get_seq_length() == 8
    assert layer.seq_lens.tolist() == [8, 5, 2]
    cache.crop(6)  # positive: keep 6 columns (older transformers), sequence 2 loses all it had
    assert layer.lens == [6, 3, 0] and cache.get_seq_length() == 6
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer.lens == [0, 6, 6] and layer.seq_lens.tolist() == [0, 6, 6]
    assert torch.equal(layer.keys_buf[1], before[0]) and torch.equal(layer.keys_buf[0], before[2])
    assert torch.equal(layer.codes_buf[2], layer.codes_buf[1])
    cache.batch_repeat_interleave(2)
    assert layer.lens == [0, 0, 6, 6, 6, 6] and layer.keys_buf.shape[0] == 6
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert layer.lens == [0, 6] and layer.batch_size == 2
    cache.update(*kv(1, batch=2), 0)
    assert layer.lens == [1, 7] and cache.get_seq_length() == 7
    cache.reset()
    assert cache.get_seq_length() == 0 and not layer.is_initialized
    cache.update(*kv(2, batch=5), 0)  # a new batch after reset
    assert layer.lens == [2] * 5


def test_layers_keep_their_own_device():
    """Storage (and hash weights) follow the first keys each layer receives."""
    w = weights()
    cache = KVCompCache(2, chunk_size=CHUNK, code_weights=w)
    cache.update(*kv(3), 0)
    k, v = kv(3)
    cache.update(k.to("meta"), v.to("meta"), 1)
    assert cache.layers[0].keys_buf.device.type == "cpu"
    for name in ("keys_buf", "values_buf", "codes_buf", "seq_lens", "code_weight"):
        assert getattr(cache.layers[1], name).device.type == "meta", name


def test_stats_accumulate_per_layer():
    cache = make_cache(debug=True)
    layer = cache.layers[0]
    cache.update(*kv(9), 0)  # 3 blocks of 4 per sequence and kv-head
    bi = torch.tensor([[[0, 2], [1, -1]]] * B, dtype=torch.int32)
    layer.record_step("compute", bi)
    layer.record_step("dense", None)
    st = cache.stats
    assert st["layers"][0]["steps"] == {"dense": 1, "compute": 1, "reuse": 0}
    assert st["layers"][0]["blocks_available"] == 2 * B * H * 3
    assert st["layers"][0]["blocks_attended"] == B * 3 + B * H * 3
    assert st["layers"][1]["share_read"] is None
    assert layer.last_block_idx is None and len(layer.history) == 2  # the dense step was last


def test_cache_api_properties():
    cache = make_cache(sliding_windows=[None, 16])
    assert len(cache) == 2
    assert cache.is_sliding == [False, True]
    assert cache.is_croppable and not cache.is_compileable
    assert cache.get_max_length() == -1
    cache.update(*kv(3), 0)
    assert cache.seq_lens(0) == [3, 3, 3]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="chunk_size"):
        KVCompCache(2, chunk_size=0)
    with pytest.raises(ValueError, match="code_weights has 1 entries"):
        KVCompCache(2, code_weights=[None])
    cache = make_cache()
    with pytest.raises(ValueError, match="shorter than the 5 new tokens"):
        cache.begin_step(torch.ones(B, 3, dtype=torch.long), 5)
    cache.update(*kv(3), 0)
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.update(*kv(1, batch=2), 0)
    bad = KVCompCache(1, code_weights=[torch.randn(H + 1, D, BITS)])
    with pytest.raises(ValueError, match="hash weight"):
        bad.update(*kv(2), 0)
    cache.begin_step(left_pad_mask([2, 1, 1], 2), 2)
    with pytest.raises(ValueError, match="attention_mask covers"):
        cache.update(*kv(3), 1)
