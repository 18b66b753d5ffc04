"""The DeepSeek-V3-shaped end-to-end bench (``kvcomp.bench.e2e_mla``) on the CPU with ``--tiny``:
it verifies before timing (kvcomp all-blocks against transformers' dense decode), measures the
three decoders and the prefill hashing share, writes its JSON, and refuses to report
speedups when the absorbed decode is wrong."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from kvcomp.bench import e2e_mla  # noqa: E402

TINY = ["--tiny", "--steps", "2", "--contexts", "160", "--batches", "1,2"]


def test_e2e_mla_tiny_verifies_and_measures(tmp_path, capsys):
    out = tmp_path / "e2e_mla.json"
    assert e2e_mla.main([*TINY, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    v = data["verify"]["all_blocks_vs_dense"]
    assert v["ok"] and v["rel_err"] < 1e-5 and v["same_argmax_steps"] == "4/4"
    rows = {(r["method"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(m, b) for m in ("kvcomp", "dense", "dense_kv") for b in (1, 2)}
    assert all("error" not in r and r["step_ms"] > 0 and r["ctx"] == 160 for r in rows.values())
    assert [(s["ctx"], s["batch"]) for s in data["speedups"]] == [(160, 1), (160, 2)]
    p = data["prefill"]
    assert p["hash_layers"] == 2 and 0 < p["hash_share"] < 1  # layers 2-3 hash, 0-1 are dense
    assert data["kvcomp_config"]["dense_layers"] == [0, 1]
    assert data["model_config"]["first_k_dense_replace"] == 3
    assert "| 160 | 2 |" in capsys.readouterr().out


def test_e2e_mla_refuses_on_wrong_absorbed_decode(monkeypatch, tmp_path, capsys):
    import kvcomp_deepseek.attention as mla

    real = mla.mla_decode
    monkeypatch.setattr(mla, "mla_decode", lambda *a, **k: real(*a, **k) * 1.05)
    out = tmp_path / "bad.json"
    assert e2e_mla.main([*TINY, "--prefill-ctx", "0", "--json", str(out)]) == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["verify"]["ok"] is False and data["rows"] == []


def test_e2e_mla_needs_a_gpu_or_tiny(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert e2e_mla.main(["--steps", "1"]) == 1
    assert "--tiny" in capsys.readouterr().out
    assert e2e_mla.main(["--tiny", "--methods", "kvcomp,sparse"]) == 2


def test_bench_e2e_model_switch_runs_the_mla_bench(tmp_path, capsys):
    """``kvcomp bench e2e --model deepseek-v3`` is this bench (the issue's one command for both
    models); the fused decoder does not cover MLA layers, so --fuse is refused by name."""
    from kvcomp.cli import main

    out = tmp_path / "via_e2e.json"
    assert main(["bench", "e2e", "--model", "deepseek-v3", *TINY, "--batches", "1", "--prefill-ctx", "0",
                 "--methods", "kvcomp,dense_kv", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "e2e_mla" and data["verify"]["all_blocks_vs_dense"]["ok"]
    assert {(r["method"], r["batch"]) for r in data["rows"]} == {("kvcomp", 1), ("dense_kv", 1)}
    assert data["model_config"]["first_k_dense_replace"] == 3
    table = capsys.readouterr().out.split("| ctx |")[-1]
    assert "| 160 | 1 |" in table and "nan" not in table  # no dense run: its column reads "-"
    assert main(["bench", "e2e", "--model", "deepseek-v3", "--tiny", "--fuse"]) == 2
    assert "--fuse applies to --model qwen3-8b only" in capsys.readouterr().out
