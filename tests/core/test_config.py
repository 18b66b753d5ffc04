"""KVCompConfig: the seed's format, validation at load time, round trips, the CLI."""

from __future__ import annotations

import json

import pytest
from kvcomp.cli import main as cli_main
from kvcomp.config import ConfigError, KVCompConfig

# The seed's example, filled to its 36 layers, written as the seed has it (trailing comma).
SEED_EXAMPLE = (
    """{
    "model_name": "Qwen/Qwen3-4B",
    "is_mla": false,
    "hash_weight_type": "random",
    "num_hidden_layers": 36,
    "seq_len_threshhold": 2048,
    "chunk_size": 128,
    "chunk_repre_method": "max",
    "head_dim": 128,
    "hash_bits": 128,
    "top_k_ratio_per_layer": ["""
    + ", ".join(["0.3"] * 36)
    + """],
    "top_k_index_reuse": ["""
    + ", ".join(["-1"] * 36)
    + """],
    "must_select_blocks": [0, -2, -1],
}
"""
)


def base(**over) -> dict:
    d = {
        "model_name": "toy",
        "num_hidden_layers": 4,
        "head_dim": 64,
        "hash_bits": 128,
        "top_k_ratio_per_layer": [1.0, 0.3, 0.3, 0.5],
        "top_k_index_reuse": [-1, -1, 1, -1],
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


def mla(**over) -> dict:
    d = {
        "model_name": "deepseek-toy",
        "is_mla": True,
        "num_hidden_layers": 3,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "hash_bits": "512+64",
        "top_k_ratio_per_layer": [1.0, 0.2, 0.2],
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()

# (dict, field that the message must name, a further phrase it must contain)
INVALID = [
    (base(model_name=""), "model_name", "non-empty"),
    (base(model_name=3), "model_name", "3"),
    (base(is_mla="no"), "is_mla", "'no'"),
    (base(num_hidden_layers=True), "num_hidden_layers", "bool"),
    (base(num_hidden_layers=0), "num_hidden_layers", ">= 1"),
    (base(num_hidden_layers=4.0), "num_hidden_layers", "4.0"),
    (base(hash_weight_type="learned"), "hash_weight_type", "'learned'"),
    (base(hash_weight_type="trained"), "hash_weights_path", "required"),
    (base(hash_weights_path="w.safetensors"), "hash_weights_path", "random"),
    (base(seed=-1), "seed", "-1"),
    (base(seq_len_threshhold=-5), "seq_len_threshold", "-5"),
    (base(seq_len_threshold="2048"), "seq_len_threshold", "'2048'"),
    (base(seq_len_threshhold=2048, seq_len_threshold=4096), "seq_len_threshold", "different"),
    (base(chunk_size=0), "chunk_size", ">= 1"),
    (base(chunk_size=16.5), "chunk_size", "16.5"),
    (base(chunk_repre_method="min"), "chunk_repre_method", "'min'"),
    (base(head_dim=-128), "head_dim", "-128"),
    (base(head_dim=None), "head_dim", "required"),
    (base(head_dim=_DROP), "head_dim", "missing"),
    (base(hash_bits=100), "hash_bits", "multiple of 32"),
    (base(hash_bits=0), "hash_bits", "multiple of 32"),
    (base(hash_bits=-32), "hash_bits", "-32"),
    (base(hash_bits="512+64"), "hash_bits", "MLA"),
    (base(top_k_ratio_per_layer=[1.0, 0.3, 0.3]), "top_k_ratio_per_layer", "expected 4 entries"),
    (base(top_k_ratio_per_layer=[1.0, 0.3, 0.3, 0.0]), "top_k_ratio_per_layer[3]", "(0, 1]"),
    (base(top_k_ratio_per_layer=[1.0, 0.3, 0.3, 1.5]), "top_k_ratio_per_layer[3]", "1.5"),
    (base(top_k_ratio_per_layer=[1.0, 0.3, 0.3, "0.5"]), "top_k_ratio_per_layer[3]", "'0.5'"),
    (base(top_k_ratio_per_layer=[1.0, 0.3, 0.3, True]), "top_k_ratio_per_layer[3]", "True"),
    (base(top_k_ratio_per_layer=0.3), "top_k_ratio_per_layer", "list"),
    (base(top_k_index_reuse=[-1, -1, 1]), "top_k_index_reuse", "expected 4 entries"),
    (base(top_k_index_reuse=[-1, -1, 3, -1]), "top_k_index_reuse[2]", "earlier layer"),
    (base(top_k_index_reuse=[-1, -1, 2, -1]), "top_k_index_reuse[2]", "earlier layer"),
    (base(top_k_index_reuse=[-1, -1, -2, -1]), "top_k_index_reuse[2]", "-2"),
    (base(top_k_index_reuse=[-1, -1, 0, -1]), "top_k_index_reuse[2]", "dense"),
    (base(top_k_index_reuse=[-1, 0, -1, -1]), "top_k_index_reuse[1]", "dense"),
    (
        base(top_k_ratio_per_layer=[1.0, 0.3, 0.3, 0.3], top_k_index_reuse=[-1, -1, 1, 2]),
        "top_k_index_reuse[3]",
        "reuses layer 1",
    ),
    (base(top_k_index_reuse=[-1, -1, -1, 1]), "top_k_index_reuse[3]", "ratio must equal"),
    (
        base(top_k_ratio_per_layer=[0.3, 0.3, 1.0, 0.5], top_k_index_reuse=[-1, -1, 1, -1]),
        "top_k_index_reuse[2]",
        "dense",
    ),
    (base(top_k_index_reuse=[-1, -1, 1.0, -1]), "top_k_index_reuse[2]", "1.0"),
    (base(must_select_blocks=[0, -2]), "must_select_blocks", "newest tokens"),
    (base(must_select_blocks=[0, -1, -1]), "must_select_blocks", "duplicate"),
    (base(must_select_blocks=[0, 1.0, -1]), "must_select_blocks[1]", "1.0"),
    (base(must_select_blocks=[True, -1]), "must_select_blocks[0]", "True"),
    (base(must_select_blocks="0,-1"), "must_select_blocks", "list"),
    (base(top_k_budget_tokens=0), "top_k_budget_tokens", ">= 1"),
    (base(query_aggregation="max"), "query_aggregation", "'max'"),
    (base(token_score="norm"), "token_score", "'norm'"),
    (mla(token_score="centered_norm"), "token_score", "GQA"),
    (base(token_score="centered_norm", chunk_repre_method="mean"), "token_score", "max"),
    (mla(chunk_repre_method="lse"), "chunk_repre_method", "GQA"),
    (base(kv_lora_rank=512), "kv_lora_rank", "MLA"),
    (base(chunk_sise=16), "chunk_sise", "did you mean 'chunk_size'"),
    (base(dense_layers=2), "dense_layers", "1.0"),
    (base(model_name=_DROP, hash_bits=_DROP), "model_name", "hash_bits"),
    (mla(kv_lora_rank=_DROP), "kv_lora_rank", "missing"),
    (mla(qk_rope_head_dim=0), "qk_rope_head_dim", ">= 1"),
    (mla(hash_bits="512+60"), "hash_bits_qk_rope", "multiple of 32"),
    (mla(hash_bits="512-64"), "hash_bits", "'512-64'"),
    (mla(hash_bits=512), "hash_bits", "512 + 64"),
    (mla(hash_bits="512+64", hash_bits_kv_lora=256), "hash_bits_kv_lora", "contradicts"),
    (mla(hash_bits=320, hash_bits_kv_lora=250, hash_bits_qk_rope=70), "hash_bits_kv_lora", "250"),
]


@pytest.mark.parametrize(
    "d,field,phrase", INVALID, ids=[f"{i:02d}-{f}" for i, (_, f, _) in enumerate(INVALID)]
)
def test_invalid_config_names_field(d, field, phrase):
    with pytest.raises(ConfigError) as err:
        KVCompConfig.from_dict(d)
    msg = str(err.value)
    assert field in msg, msg
    assert phrase in msg, msg


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    import kvcomp

    assert kvcomp.ConfigError is ConfigError and kvcomp.KVCompConfig is KVCompConfig


def test_seed_example_validates(tmp_path):
    p = tmp_path / "kvcomp_qwen3_4B_config.json"
    p.write_text(SEED_EXAMPLE)
    cfg = KVCompConfig.from_json(p)
    assert cfg.num_hidden_layers == 36 and cfg.head_dim == 128 and cfg.hash_bits == 128
    assert cfg.seq_len_threshold == 2048 and cfg.chunk_size == 128
    assert cfg.top_k_ratio_per_layer == [0.3] * 36
    assert cfg.top_k_index_reuse == [-1] * 36
    assert cfg.must_select_blocks == [0, -2, -1]
    assert cfg.hash_weight_type == "random" and cfg.is_mla is False


def test_defaults_when_keys_omitted():
    cfg = KVCompConfig.from_dict(
        {"model_name": "m", "num_hidden_layers": 2, "head_dim": 8, "hash_bits": 32,
         "top_k_ratio_per_layer": [1, 0.5]}
    )
    assert cfg.top_k_ratio_per_layer == [1.0, 0.5]
    assert all(isinstance(r, float) for r in cfg.top_k_ratio_per_layer)
    assert cfg.top_k_index_reuse == [-1, -1]
    assert cfg.must_select_blocks == [0, -2, -1]
    assert cfg.seq_len_threshold == 2048 and cfg.chunk_size == 128 and cfg.seed == 0
    assert cfg.chunk_repre_method == "max" and cfg.query_aggregation == "sum"
    assert cfg.top_k_budget_tokens is None


def test_both_threshold_spellings_agreeing_are_accepted():
    cfg = KVCompConfig.from_dict(base(seq_len_threshhold=100, seq_len_threshold=100))
    assert cfg.seq_len_threshold == 100
    assert KVCompConfig.from_dict(base(seq_len_threshold=7)).seq_len_threshold == 7


def test_round_trip_dict_and_json(tmp_path):
    cfg = KVCompConfig.from_dict(
        base(seed=3, chunk_size=16, chunk_repre_method="mean", top_k_budget_tokens=512,
             query_aggregation="majority", must_select_blocks=[0, 1, -1])
    )
    d = cfg.to_dict()
    assert "seq_len_threshhold" in d and "seq_len_threshold" not in d
    assert KVCompConfig.from_dict(d) == cfg
    p = tmp_path / "c.json"
    cfg.to_json(p)
    again = KVCompConfig.from_json(p)
    assert again == cfg and again.to_dict() == d
    assert json.loads(p.read_text()) == d


def test_mla_forms_and_round_trip(tmp_path):
    a = KVCompConfig.from_dict(mla())
    assert (a.hash_bits, a.hash_bits_kv_lora, a.hash_bits_qk_rope) == (576, 512, 64)
    assert a.head_dim is None
    b = KVCompConfig.from_dict(mla(hash_bits=576))  # parts default to 512 / 64
    c = KVCompConfig.from_dict(mla(hash_bits=288, hash_bits_kv_lora=256, hash_bits_qk_rope=32))
    assert a == b and c.hash_bits_kv_lora == 256
    p = tmp_path / "m.json"
    a.to_json(p)
    assert KVCompConfig.from_json(p) == a
    assert KVCompConfig.default_mla("ds", 3, 512, 64, dense_layers=1, ratio=0.2) == a.replace(
        model_name="ds"
    )


def test_trained_path_resolves_against_json_folder(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    p = sub / "c.json"
    p.write_text(json.dumps(base(hash_weight_type="trained", hash_weights_path="w/h.safetensors")))
    cfg = KVCompConfig.from_json(p)
    assert cfg.hash_weights_path == str(sub.resolve() / "w" / "h.safetensors")
    absolute = str(tmp_path / "abs.safetensors")
    p.write_text(json.dumps(base(hash_weight_type="trained", hash_weights_path=absolute)))
    assert KVCompConfig.from_json(p).hash_weights_path == absolute


def test_invalid_json_reports_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n    "model_name": "m",\n    "chunk_size": 12 8\n}\n')
    with pytest.raises(ConfigError, match=r"line 3 column 22"):
        KVCompConfig.from_json(p)
    p.write_text('{"model_name": "m",, "x": 1}')
    with pytest.raises(ConfigError, match=r"line 1 column 20"):
        KVCompConfig.from_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        KVCompConfig.from_json(p)


def test_trailing_commas_only_before_closers(tmp_path):
    d = base()
    text = json.dumps(d, indent=2)
    text = text.replace("-1\n  ]", "-1,\n  ]").replace('"toy"', '"to,}y"')
    text = text[: text.rindex("}")].rstrip() + ",\n}"
    p = tmp_path / "t.json"
    p.write_text(text)
    cfg = KVCompConfig.from_json(p)
    assert cfg.model_name == "to,}y"  # commas and brackets inside strings untouched
    p.write_text('{"model_name": "m", , }')
    with pytest.raises(ConfigError, match="invalid JSON"):
        KVCompConfig.from_json(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        KVCompConfig.from_json(tmp_path / "nope.json")


def test_replace_validates():
    cfg = KVCompConfig.from_dict(base())
    assert cfg.replace(chunk_size=16).chunk_size == 16
    assert cfg.chunk_size == 128
    with pytest.raises(ConfigError, match="chunk_size"):
        cfg.replace(chunk_size=0)
    with pytest.raises(ConfigError, match="chunk_sise"):
        cfg.replace(chunk_sise=16)
    with pytest.raises(AttributeError):
        cfg.chunk_size = 3  # frozen: changes go through replace()


def test_default_and_summary():
    cfg = KVCompConfig.default("llama-toy", 6, 64, ratio=0.25, dense_layers=2, chunk_size=16)
    assert cfg.top_k_ratio_per_layer == [1.0, 1.0, 0.25, 0.25, 0.25, 0.25]
    assert cfg.dense_layer_indices == [0, 1]
    s = cfg.summary()
    assert "\n" not in s
    for part in ("llama-toy", "6 layers", "4 compute", "0 reuse", "2 dense", "ratio 0.25",
                 "chunk 16", "128 bits", "threshold 2048"):
        assert part in s, s
    r = KVCompConfig.from_dict(base(top_k_budget_tokens=1024)).summary()
    assert "2 compute" in r and "1 reuse" in r and "1 dense" in r and "budget 1024" in r
    assert "ratio 0.3-0.5" in KVCompConfig.from_dict(base()).summary()
    assert "token score" not in s
    assert cfg.replace(token_score="centered_norm").summary().endswith("token score centered_norm")
    with pytest.raises(ConfigError, match="dense_layers"):
        KVCompConfig.default("m", 4, 64, dense_layers=-1)
    with pytest.raises(ConfigError, match="top_k_ratio_per_layer"):
        KVCompConfig.default("m", 4, 64, ratio=0.0)


def test_cli_validate_ok_and_errors(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(SEED_EXAMPLE)
    assert cli_main(["config", "validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: Qwen/Qwen3-4B: 36 layers") and "ratio 0.3" in out

    bad = tmp_path / "bad.json"
    bad.write_text(SEED_EXAMPLE.replace('"chunk_size": 128', '"chunk_size": 0'))
    assert cli_main(["config", "validate", str(bad)]) == 1
    cap = capsys.readouterr()
    assert cap.err.startswith("error: ") and "chunk_size" in cap.err and "Traceback" not in cap.err

    broken = tmp_path / "broken.json"
    broken.write_text("{\n  oops\n}")
    assert cli_main(["config", "validate", str(broken)]) == 1
    assert "line 2 column 3" in capsys.readouterr().err

    assert cli_main(["config", "validate", str(tmp_path / "missing.json")]) == 1
    assert "not found" in capsys.readouterr().err

    assert cli_main(["config", "validate", str(good), str(bad), "--json"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["ok"] is True and lines[0]["config"]["num_hidden_layers"] == 36
    assert lines[1]["ok"] is False and "chunk_size" in lines[1]["error"]


def test_shipped_core_configs_validate():
    from pathlib import Path

    import kvcomp

    folder = Path(kvcomp.__file__).parent / "configs"
    files = sorted(folder.glob("*.json"))
    assert files, f"no config shipped in {folder}"
    for f in files:
        cfg = KVCompConfig.from_json(f)
        assert KVCompConfig.from_dict(cfg.to_dict()) == cfg


def test_token_score_round_trip(tmp_path):
    cfg = KVCompConfig.from_dict(base(token_score="centered_norm"))
    assert cfg.to_dict()["token_score"] == "centered_norm"
    p = tmp_path / "c.json"
    cfg.to_json(p)
    assert KVCompConfig.from_json(p) == cfg
    assert KVCompConfig.from_dict(base()).token_score == "hamming"
