"""The built kvcomp-deepseek wheel, installed by pip's resolver into a fresh virtual environment,
brings kvcomp-core along and registers deepseek_v2 and deepseek_v3.

Offline and torch-free: pip resolves from a local folder holding the two built wheels plus
empty stand-in wheels of the heavy third-party requirements (torch, transformers, ...), so the
dependency on kvcomp-core is what pip must pull in by itself; the probe only reads metadata."""

from __future__ import annotations

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
STANDINS = {"torch": "2.13.0", "numpy": "2.0.0", "safetensors": "0.5.0", "tqdm": "4.67.0",
            "transformers": "5.24.0"}
PROBE = r"""
import importlib.metadata as md, json, sys
eps = md.entry_points(group="kvcomp.adapters")
print(json.dumps({
    "prefix": sys.prefix,
    "core": str(md.distribution("kvcomp-core").locate_file("")),
    "eps": sorted([ep.name, ep.value, ep.dist.metadata["Name"]] for ep in eps),
}))
"""


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


def standin_wheel(folder: Path, name: str, version: str) -> None:
    """An installable wheel with metadata only (no code)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: kvcomp-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for n, text in files.items():
            z.writestr(n, text)


def test_wheel_brings_core_and_registers_adapters(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    junk = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")
    srcs = []
    for dist in ("kvcomp-core", "kvcomp-deepseek"):
        src = tmp_path / "src" / dist
        shutil.copytree(ROOT / "packages" / dist, src, ignore=junk)
        srcs.append(str(src))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(wheels), *srcs])
    for name, version in STANDINS.items():
        standin_wheel(wheels, name, version)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    deepseek = next(wheels.glob("kvcomp_deepseek-*.whl"))
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index",
         "--find-links", str(wheels), "-q", str(deepseek)])
    info = json.loads(run([str(py), "-I", "-c", PROBE], cwd=tmp_path))
    assert Path(info["prefix"]).resolve() == venv.resolve()
    assert Path(info["core"]).resolve().is_relative_to(venv.resolve())  # pulled in by pip
    got = {(name, dist) for name, _value, dist in info["eps"]}
    assert {("deepseek_v2", "kvcomp-deepseek"), ("deepseek_v3", "kvcomp-deepseek")} <= got
    assert {("llama", "kvcomp-core"), ("mistral", "kvcomp-core")} <= got
    assert all(v == "kvcomp_deepseek.adapter:DeepseekAdapter"
               for n, v, d in info["eps"] if d == "kvcomp-deepseek")
