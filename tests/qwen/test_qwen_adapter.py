"""kvcomp-qwen: the Qwen family (qwen2, qwen2_moe, qwen3, qwen3_moe) through the same checks as
llama/mistral (tests/core/test_integration_llama.py, loaded by path so both families run one
definition), plus the shipped configs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import kvcomp
import pytest
import torch
from kvcomp.adapters import available
from kvcomp.config import ConfigError, KVCompConfig

pytest.importorskip("transformers")
from kvcomp_qwen.adapter import CONFIGS_DIR, QwenAdapter  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_kvcomp_integration_checks", Path(__file__).resolve().parents[1] / "core" / "test_integration_llama.py"
)
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")

# name -> (model_name, layers, query heads, kv-heads, head_dim, model_type)
SHIPPED = {
    "qwen3-4b": ("Qwen/Qwen3-4B", 36, 32, 8, 128, "qwen3"),
    "qwen3-8b": ("Qwen/Qwen3-8B", 36, 32, 8, 128, "qwen3"),
    "qwen3-32b": ("Qwen/Qwen3-32B", 64, 64, 8, 128, "qwen3"),
    "qwq-32b": ("Qwen/QwQ-32B", 64, 40, 8, 128, "qwen2"),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", 48, 32, 4, 128, "qwen3_moe"),
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dense_identical(model_type):
    checks.check_dense_identical(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sparse_follows_policy(model_type):
    checks.check_sparse_policy(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_left_padded_batch_equals_solo(model_type):
    checks.check_left_padding(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_disable_restores(model_type):
    checks.check_disable(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_beam_search_and_assisted_crop(model_type):
    checks.check_beam_and_crop(model_type)


@pytest.mark.parametrize("model_type", ("qwen2", "qwen3_moe"))
def test_hand_loop_crop_and_extend(model_type):
    checks.check_crop_and_loop(model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_errors(model_type):
    checks.check_errors(model_type)


def test_registered_for_the_four_model_types():
    reg = available()
    for mt in MODEL_TYPES:
        assert isinstance(reg[mt], QwenAdapter)


def test_shipped_configs_are_true_to_the_models():
    shipped = QwenAdapter().shipped_configs()
    assert sorted(shipped) == sorted(SHIPPED)
    for name, (model_name, layers, _, _, head_dim, _) in SHIPPED.items():
        cfg = KVCompConfig.from_json(shipped[name])
        assert (cfg.model_name, cfg.num_hidden_layers, cfg.head_dim) == (model_name, layers, head_dim)
        assert (cfg.chunk_size, cfg.hash_bits, cfg.seq_len_threshold) == (128, 128, 2048)
        assert cfg.top_k_ratio_per_layer == [1.0, 1.0] + [0.3] * (layers - 2)
        raw = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
        assert raw["seq_len_threshhold"] == 2048  # the seed's spelling


def _geometry_model(name: str, device: str):
    _, layers, heads, kv, head_dim, mt = SHIPPED[name]
    with torch.device(device):
        return checks.tiny_model(
            mt, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=head_dim, hidden_size=64, intermediate_size=32,
        )


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_by_name_on_its_geometry(name):
    """A model (on the meta device: no memory) with the real layer count, head counts and
    head_dim of the named model: enable(model, name) validates and patches every layer."""
    model = _geometry_model(name, "meta")
    h = kvcomp.enable(model, name)
    layers = SHIPPED[name][1]
    assert h.config.num_hidden_layers == layers
    assert sum(w is not None for w in h.code_weights) == layers - 2
    assert h.code_weights[2].shape == (SHIPPED[name][3], 128, 128)
    h.disable()


def test_shipped_config_decodes_on_its_geometry():
    """Qwen3-8B's geometry (36 layers, 32/8 heads, head_dim 128), tiny hidden size: the shipped
    config with a low threshold decodes sparsely on every layer but the first two."""
    model = _geometry_model("qwen3-8b", "cpu")
    short = kvcomp.enable(model, "qwen3-8b").config.replace(seq_len_threshold=8, chunk_size=4)
    model._kvcomp_handle.disable()
    h = kvcomp.enable(model, short)
    with torch.no_grad():
        out = model.generate(checks.prompt(20), max_new_tokens=3, do_sample=False, pad_token_id=0)
    st = h.stats
    h.disable()
    assert out.shape == (1, 23)
    assert st["layers"][35]["steps"]["compute"] == 2
    assert st["layers"][0]["steps"]["dense"] == 2
    assert 0 < st["share_read"] < 1


def test_shipped_config_rejects_a_different_model():
    model = checks.tiny_model("qwen3")
    with pytest.raises(ConfigError, match="num_hidden_layers: the config has 36, the model has 4"):
        kvcomp.enable(model, "qwen3-8b")
