"""``kvcomp bench mla`` end to end on the CPU (kernels under TRITON_INTERPRET=1, tiny shapes):
it verifies before timing, writes its JSON, and refuses to report speedups on a mismatch."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")
from kvcomp.bench import mla as bench  # noqa: E402

TINY = ["--device", "cpu", "--lengths", "100", "--batches", "2", "--heads", "3",
        "--kv-lora-rank", "32", "--rope-dim", "16", "--bits-kv", "32", "--bits-rope", "32",
        "--selected", "32", "--chunk", "16", "--rep-ms", "1"]


def test_bench_mla_verifies_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVCOMP_BACKEND", "triton")  # CPU tensors through the Triton kernels
    out = tmp_path / "mla.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["verified"] and (row["B"], row["L"], row["k_blocks"]) == (2, 100, 3)
    assert all(v for k, v in row["checks"].items() if not k.endswith("_err"))
    assert set(row["times_us"]) >= {"dense", "einsum", "qcodes", "select", "mla_select", "sparse", "step"}
    assert row["dense_bytes"] == 2 * 100 * (32 + 16) * 2
    assert "x dense" in capsys.readouterr().out


def test_bench_mla_refuses_on_mismatch(monkeypatch, capsys):
    monkeypatch.setenv("KVCOMP_BACKEND", "triton")
    real = bench.sparse_mla_decode
    monkeypatch.setattr(bench, "sparse_mla_decode", lambda *a, **k: real(*a, **k) * 1.01 + 1e-3)
    assert bench.main(TINY) == 1
    text = capsys.readouterr().out
    assert "VERIFICATION FAILED" in text and "sparse_vs_ref" in text


def test_bench_mla_rejects_bad_arguments(capsys):
    assert bench.main(["--device", "cpu", "--bits-kv", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "0"])
