"""The three wheels build, carry what they must, and work installed into a fresh virtual
environment that cannot see the editable development installs.

The fresh venv has no torch (installing it would take minutes), so the checks in it are the
torch-free ones: ``import kvcomp`` resolves to the venv's own copy, the ``kvcomp.adapters``
entry points of all three distributions are discovered there, and the ``kvcomp`` console
script validates the shipped configs."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kvcomp-core": ("kvcomp", {"llama", "mistral"}),
    "kvcomp-qwen": ("kvcomp_qwen", {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}),
    "kvcomp-deepseek": ("kvcomp_deepseek", {"deepseek_v2", "deepseek_v3"}),
}

PROBE = r"""
import importlib.metadata as md, json, sys
import kvcomp, kvcomp_qwen, kvcomp_deepseek
eps = md.entry_points(group="kvcomp.adapters")
print(json.dumps({
    "prefix": sys.prefix,
    "files": [kvcomp.__file__, kvcomp_qwen.__file__, kvcomp_deepseek.__file__],
    "dists": {n: str(md.distribution(n).locate_file("")) for n in
              ("kvcomp-core", "kvcomp-qwen", "kvcomp-deepseek")},
    "versions": {n: md.version(n) for n in ("kvcomp-core", "kvcomp-qwen", "kvcomp-deepseek")},
    "eps": sorted([ep.name, ep.value, ep.dist.metadata["Name"]] for ep in eps),
    "torch": __import__("importlib.util").util.find_spec("torch") is not None,
}))
"""


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Build the three wheels from clean copies of the package sources (no build debris in
    the tree, no stale egg-info)."""
    tmp = tmp_path_factory.mktemp("wheels")
    out = tmp / "dist"
    junk = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")
    srcs = []
    for dist in PACKAGES:
        src = tmp / "src" / dist
        shutil.copytree(ROOT / "packages" / dist, src, ignore=junk)
        srcs.append(str(src))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), *srcs])
    found = {}
    for whl in out.glob("*.whl"):
        name = whl.name.split("-")[0].replace("_", "-")
        found[name] = whl
    assert set(found) == set(PACKAGES), sorted(p.name for p in out.iterdir())
    return found


def wheel_metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
        ep_name = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        eps = z.read(ep_name).decode() if ep_name else ""
    return names, meta, eps


def test_wheel_contents(wheels):
    from packaging.requirements import Requirement

    for dist, (pkg, model_types) in PACKAGES.items():
        names, meta, eps = wheel_metadata(wheels[dist])
        assert meta["Name"] == dist
        assert f"{pkg}/__init__.py" in names
        # every JSON config of the source tree is in the wheel
        src_cfgs = sorted((ROOT / "packages" / dist / "src" / pkg / "configs").glob("*.json"))
        for cfg in src_cfgs:
            assert f"{pkg}/configs/{cfg.name}" in names, (dist, cfg.name)
        assert "[kvcomp.adapters]" in eps
        declared = {line.split("=")[0].strip() for line in eps.split("[kvcomp.adapters]")[1]
                    .split("[")[0].splitlines() if "=" in line}
        assert declared == model_types, (dist, declared)
        assert not any(n.startswith(("tests/", "build/")) for n in names)
        if dist == "kvcomp-core":
            assert src_cfgs, "kvcomp-core ships no example config"
            assert "kvcomp = kvcomp.cli:main" in eps
        else:
            reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
            core = [r for r in reqs if r.name == "kvcomp-core" and r.marker is None]
            assert len(core) == 1, reqs
            spec = core[0].specifier
            assert spec.contains("0.1.0") and spec.contains("0.1.9")
            assert not spec.contains("0.2.0") and not spec.contains("0.0.9")


def test_fresh_venv_imports_and_discovers_entry_points(wheels, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         "-q", *map(str, wheels.values())])
    info = json.loads(run([str(py), "-I", "-c", PROBE], cwd=tmp_path))
    prefix = Path(info["prefix"]).resolve()
    assert prefix == venv.resolve()
    for f in info["files"]:  # the installed copies, not the editable sources
        assert Path(f).resolve().is_relative_to(prefix), f
        assert not Path(f).resolve().is_relative_to(ROOT), f
    for d in info["dists"].values():
        assert Path(d).resolve().is_relative_to(prefix), d
    assert set(info["versions"].values()) == {"0.1.0"}
    got = {(name, dist) for name, _value, dist in info["eps"]}
    want = {(mt, dist) for dist, (_pkg, mts) in PACKAGES.items() for mt in mts}
    assert got == want

    # the console script works there, torch-free: help, version, validating the shipped config
    kv = str(venv / "bin" / "kvcomp")
    assert "config" in run([kv, "--help"], cwd=tmp_path)
    assert "0.1.0" in run([kv, "--version"], cwd=tmp_path)
    cfg = next(p for p in info["files"] if p.endswith("kvcomp/__init__.py"))
    shipped = sorted(str(p) for p in (Path(cfg).parent / "configs").glob("*.json"))
    assert shipped
    out = run([kv, "config", "validate", *shipped], cwd=tmp_path)
    assert out.count("OK: ") == len(shipped)
