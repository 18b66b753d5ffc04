"""LayerPolicy: modes, block counts at awkward lengths, tensor == int version, reuse."""

from __future__ import annotations

import math

import pytest
import torch
from kvcomp.config import KVCompConfig
from kvcomp.policy import LayerPolicy


def make(**over) -> KVCompConfig:
    d = dict(
        model_name="toy",
        num_hidden_layers=5,
        head_dim=64,
        hash_bits=64,
        chunk_size=16,
        seq_len_threshold=100,
        top_k_ratio_per_layer=[1.0, 0.3, 0.3, 0.05, 0.5],
        top_k_index_reuse=[-1, -1, 1, -1, -1],
    )
    d.update(over)
    return KVCompConfig(**d)


def brute_k(ratio, chunk, threshold, must, seq_len, budget=None):
    """Independent statement of the rule, with exact rational arithmetic on the decimal ratio."""
    n = math.ceil(seq_len / chunk)
    if ratio == 1.0 or seq_len < threshold:
        return n
    if budget is not None:
        k = math.ceil(budget / chunk)
    else:
        # ratio as a decimal fraction, e.g. 0.3 -> 3/10 (exact, unlike float math)
        s = repr(ratio)
        digits = len(s.split(".")[1]) if "." in s else 0
        num, den = round(ratio * 10**digits), 10**digits
        k = -(-(num * n) // den)
    distinct = {m % n for m in must if -n <= m < n}
    return min(n, max(k, len(distinct)))


def test_modes_and_sources():
    p = LayerPolicy(make())
    assert p.dense_layers == [0]
    assert p.sparse_layers == [1, 2, 3, 4]
    assert p.compute_layers == [1, 3, 4]
    assert p.reuse_layers == [2]
    assert [p.mode(i, 99) for i in range(5)] == ["dense"] * 5
    assert [p.mode(i, 100) for i in range(5)] == ["dense", "compute", "reuse", "compute", "compute"]
    assert [p.source(i) for i in range(5)] == [0, 1, 1, 3, 4]
    with pytest.raises(ValueError, match="layer"):
        p.mode(5, 1000)
    with pytest.raises(ValueError, match="seq_len"):
        p.k_blocks(1, -1)


def test_float_ratio_rounding_is_exact():
    # 0.3 * 10 == 3.0000000000000004 in float math; the policy must give 3 blocks, not 4
    p = LayerPolicy(make(seq_len_threshold=0, must_select_blocks=[-1]))
    assert p.k_blocks(1, 160) == 3  # n = 10
    assert p.k_blocks(1, 161) == 4  # n = 11 -> ceil(3.3)
    assert p.k_blocks(3, 16 * 20) == 1  # 0.05 * 20 = 1.0000000000000002 in float math


@pytest.mark.parametrize("seq_len", [0, 1, 15, 16, 17, 63, 99, 100, 127, 129, 1000, 4097])
@pytest.mark.parametrize("must", [[0, -2, -1], [-1], [0, 1, 2, 3, -1], [5, -3, -1]])
def test_k_blocks_awkward_lengths(seq_len, must):
    cfg = make(must_select_blocks=must)
    p = LayerPolicy(cfg)
    for layer in range(5):
        want = brute_k(cfg.top_k_ratio_per_layer[layer], 16, 100, must, seq_len)
        assert p.k_blocks(layer, seq_len) == want, (layer, seq_len, must)


def test_k_blocks_examples():
    p = LayerPolicy(make())
    # layer 3: ratio 0.05; 1000 tokens = 63 blocks; ceil(3.15) = 4; must-select 3 -> 4
    assert p.k_blocks(3, 1000) == 4
    # layer 3 at 100 tokens: 7 blocks, ceil(0.35) = 1, raised to the 3 must-select blocks
    assert p.k_blocks(3, 100) == 3
    assert p.k_blocks(0, 1000) == 63  # dense layer: all blocks
    assert p.k_blocks(1, 99) == 7  # below threshold: all blocks


def test_budget_overrides_ratio():
    p = LayerPolicy(make(top_k_budget_tokens=40))
    assert p.k_blocks(1, 4097) == 3  # ceil(40 / 16)
    assert p.k_blocks(3, 4097) == 3
    assert p.k_blocks(0, 4097) == 257  # ratio 1.0 stays dense
    assert p.k_blocks(1, 33) == 3  # below threshold (100): all 3 blocks
    q = LayerPolicy(make(top_k_budget_tokens=16, seq_len_threshold=0))
    assert q.k_blocks(1, 1000) == 3  # the 3 must-select blocks


@pytest.mark.parametrize("budget", [None, 50])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_tensor_version_equals_int_version(budget, dtype):
    cfg = make(top_k_budget_tokens=budget, must_select_blocks=[0, 2, -3, -1])
    p = LayerPolicy(cfg)
    lens = list(range(0, 300)) + [1000, 4096, 4097, 65535, 131072]
    t = torch.tensor(lens, dtype=dtype)
    for layer in range(5):
        got = p.k_blocks_tensor(layer, t)
        assert got.dtype == torch.int32 and got.device == t.device
        want = torch.tensor([p.k_blocks(layer, n) for n in lens], dtype=torch.int32)
        assert torch.equal(got, want), layer


def test_max_k_blocks_bounds_every_shorter_length():
    for must in ([0, -2, -1], [7, -1], [-1]):
        for budget in (None, 64):
            p = LayerPolicy(make(must_select_blocks=must, top_k_budget_tokens=budget))
            for layer in range(5):
                for max_len in (0, 1, 50, 99, 100, 101, 300, 777):
                    width = p.max_k_blocks(layer, max_len)
                    worst = max(p.k_blocks(layer, n) for n in range(max_len + 1))
                    assert worst <= width <= max(p.n_blocks(max_len), 1), (layer, max_len)
    p = LayerPolicy(make())
    # short dense sequences (99 tokens = 7 blocks) need more room than 1000-token sparse ones
    assert p.max_k_blocks(3, 1000) == 7
    assert p.max_k_blocks(0, 1000) == 63


def test_policy_rejects_non_config():
    with pytest.raises(TypeError, match="KVCompConfig"):
        LayerPolicy({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="seq_lens"):
        LayerPolicy(make()).k_blocks_tensor(1, torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32 or int64"):
        LayerPolicy(make()).k_blocks_tensor(1, torch.zeros(2))
