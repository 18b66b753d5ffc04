#!/usr/bin/env bash
# Source this on the GPU machine (repo root): puts the three kvcomp packages on PYTHONPATH without
# installing them (torch, triton and transformers come from the machine) and registers their
# `kvcomp.adapters` entry points through a generated *.dist-info folder, so `kvcomp.enable`
# finds llama / qwen / deepseek adapters exactly as after `pip install`.
#   source tools/gpu_env.sh
_kv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_kv_meta="${TMPDIR:-/tmp}/kvcomp_entry_points"
python3 - "$_kv_root" "$_kv_meta" <<'PY'
import pathlib, sys, tomllib
root, meta = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for pkg in ("kvcomp-core", "kvcomp-qwen", "kvcomp-deepseek"):
    proj = tomllib.loads((root / "packages" / pkg / "pyproject.toml").read_text())["project"]
    d = meta / f"{proj['name'].replace('-', '_')}-{proj['version']}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {proj['name']}\nVersion: {proj['version']}\n")
    eps = proj.get("entry-points", {})
    (d / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n"
        for group, items in eps.items()))
PY
export PYTHONPATH="$_kv_root/packages/kvcomp-core/src:$_kv_root/packages/kvcomp-qwen/src:$_kv_root/packages/kvcomp-deepseek/src:$_kv_meta${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset _kv_root _kv_meta
