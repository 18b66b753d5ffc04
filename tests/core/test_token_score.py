"""``token_score="centered_norm"`` through the transformers integration (tiny random llama).

The cache hashes ``k - mu`` (mu: the mean key of each sequence's first update, per kv-head)
and keeps an fp16 ``||k - mu||`` per token; the selection multiplies each token's group score
by it (``hamming_topk(k_scale=)``). Checked here: what the cache stores (mu over the real rows
of a left-padded batch, codes and norms of every row, prompt and decoded), that a padded batch
decodes like its sequences alone, that beam search carries the per-sequence state, that the
selection really changes. The static cache is checked against the dynamic one in
``test_static_cache.py``, the offloaded one against the in-HBM one in ``test_offload.py``.
"""

from __future__ import annotations

import kvcomp
import torch
from kvcomp.ops import hash_encode
from kvcomp.ops.key_stats import hash_bias, key_norms
from test_integration_llama import NEW, SPARSE, config_for, generate, prompt, tiny_model

CENTRED = dict(SPARSE, token_score="centered_norm")


def _padded(a: torch.Tensor, b: torch.Tensor):
    P = max(a.shape[1], b.shape[1])
    batch = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for row, x in enumerate((a, b)):
        batch[row, P - x.shape[1]:] = x[0]
        mask[row, P - x.shape[1]:] = 1
    return batch, mask


def test_cache_stores_centred_codes_and_norms():
    model = tiny_model("llama")
    a, b = prompt(45, seed=2), prompt(30, seed=3)
    batch, mask = _padded(a, b)
    h = kvcomp.enable(model, config_for(model, **CENTRED))
    out = generate(model, batch, mask)  # holds the cache (the handle keeps a weak reference)
    cache = h.last_cache
    h.disable()
    assert out.sequences.shape == (2, 45 + NEW)
    sparse = [layer for layer in cache.layers if layer.norms_buf is not None]
    assert len(sparse) == 2  # layers 2, 3 (0 and 1 are dense: no codes, no norms)
    for layer in sparse:
        L = layer.max_len
        assert layer.lens == [45 + NEW - 1, 30 + NEW - 1]
        keys = layer.keys_buf[:, :, :L]
        for s, n in enumerate((45, 30)):  # mu = mean of the sequence's prompt rows only
            want = keys[s, :, :n].float().mean(1)
            torch.testing.assert_close(layer.key_mu[s], want, rtol=1e-6, atol=1e-6)
        bias = hash_bias(layer.key_mu, layer.code_weight)
        codes = hash_encode(keys, layer.code_weight, bias=bias)
        norms = key_norms(keys, layer.key_mu)
        for s, n in enumerate(layer.lens):  # every real row: prompt (from the buffer), decoded
            assert torch.equal(layer.codes_buf[s, :, :n], codes[s, :, :n])
            assert torch.equal(layer.norms_buf[s, :, :n], norms[s, :, :n])
        assert (layer.norms_buf[:, :, :L] > 0).any()


def test_padded_batch_equals_solo_and_selection_changes():
    model = tiny_model("llama")
    a, b = prompt(45, seed=2), prompt(30, seed=3)
    h = kvcomp.enable(model, config_for(model, **CENTRED))
    solo_a = generate(model, a)
    solo_b = generate(model, b).sequences[0, 30:]
    batch, mask = _padded(a, b)
    out = generate(model, batch, mask).sequences[:, 45:]
    h.disable()
    assert torch.equal(out[0], solo_a.sequences[0, 45:])
    assert torch.equal(out[1], solo_b)
    h = kvcomp.enable(model, config_for(model, **SPARSE))
    plain = generate(model, a)
    h.disable()
    diff = [not torch.equal(x, y) for x, y in zip(solo_a.logits[1:], plain.logits[1:])]
    assert any(diff), "centered_norm selected exactly what hamming selects at every step"


def test_beam_search_carries_per_sequence_state():
    model = tiny_model("llama")
    ids = prompt(45)
    h = kvcomp.enable(model, config_for(model, **CENTRED))
    beam = generate(model, ids, num_beams=3, num_return_sequences=2, output_logits=False)
    cache = h.last_cache
    h.disable()
    assert beam.sequences.shape == (2, 45 + NEW)
    layer = cache.layers[3]
    assert layer.key_mu.shape[0] == layer.norms_buf.shape[0] == layer.keys_buf.shape[0]
