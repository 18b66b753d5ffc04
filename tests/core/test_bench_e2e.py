"""The Qwen3-shaped end-to-end bench (``kvcomp bench e2e``) on the CPU with ``--tiny``: it
verifies before timing (kvcomp with every block selected against dense sdpa), measures the
three decoders (plain and through the fused decoder, ``--fuse``) and the prefill hashing share,
writes its JSON, and refuses to report speedups when kvcomp's decode is wrong."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from kvcomp.cli import main  # noqa: E402

TINY = ["bench", "e2e", "--tiny", "--steps", "2", "--contexts", "160", "--batches", "1,2",
        "--verify-ctx", "200", "--prefill-ctx", "256"]


@pytest.mark.parametrize("fuse", [False, True])
def test_e2e_tiny_verifies_and_measures(tmp_path, capsys, fuse):
    out = tmp_path / "e2e.json"
    assert main([*TINY, *(["--fuse", "all"] if fuse else []), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    v = data["verify"]["all_blocks_vs_dense"]
    assert v["ok"] and v["rel_err"] <= v["tol"]
    rows = {(r["method"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(m, b) for m in ("kvcomp", "dense", "dense_kv") for b in (1, 2)}
    assert all("error" not in r and r["step_ms"] > 0 and r["ctx"] == 160 for r in rows.values())
    assert [(s["ctx"], s["batch"]) for s in data["speedups"]] == [(160, 1), (160, 2)]
    assert all(s["vs_dense_kv"] > 0 and "target" not in s for s in data["speedups"])  # no targets for --tiny
    p = data["prefill"]
    assert p["ctx"] == 256 and 0 < p["hash_share"] < 1
    assert ("fused" in data) == fuse
    assert "| 160 | 2 |" in capsys.readouterr().out


def test_e2e_refuses_on_wrong_sparse_decode(monkeypatch, tmp_path, capsys):
    """A kvcomp attention that is off by 5% fails the all-blocks check: no rows, no speedups."""
    import kvcomp.attention
    import kvcomp.cache

    for mod in (kvcomp.attention, kvcomp.cache):  # the decode paths' imports of the op
        real = mod.sparse_decode_attention
        monkeypatch.setattr(mod, "sparse_decode_attention", lambda *a, real=real, **k: real(*a, **k) * 1.05)
    out = tmp_path / "bad.json"
    assert main([*TINY, "--prefill-ctx", "0", "--json", str(out)]) == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["verify"]["ok"] is False and data["rows"] == []


def test_e2e_needs_a_gpu_or_tiny(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "e2e", "--steps", "1"]) == 1
    assert "--tiny" in capsys.readouterr().out
    assert main(["bench", "e2e", "--tiny", "--methods", "kvcomp,sparse"]) == 2


def test_profile_row_is_the_longest_of_the_smallest_batch():
    """``--profile`` profiles the longest context of the smallest batch asked for: 128K, B = 1 by
    default; 64K, B = 4 where only B = 4 rows run (the 3x target's row)."""
    from kvcomp.bench.e2e import ORDER, profile_row

    assert profile_row(ORDER) == (131072, 1)
    assert profile_row([(65536, 4), (32768, 4)]) == (65536, 4)
    assert profile_row([]) is None
