"""Registers and spills of the decode-step kernels as ptxas reports them for sm_90 (no GPU
needed: the kernels are compiled from their Triton source as in tests/core/test_kernels_compile.py,
then ``ptxas -v`` of the triton wheel runs on the PTX).

    python tools/experiments/kernel_regs.py          # a table: kernel, variant, registers, spills
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "core"))
import test_kernels_compile as tk  # noqa: E402


def ptxas_info(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) of the kernel in ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    px = get_ptxas(90)
    exe = getattr(px, "path", px)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def main() -> None:
    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    cases = []
    for stages in (1, 2):
        for block_n in (32, 64):
            for sel in (False, True):
                args = dict(tk._split_args(True, 1, pdl=True, sel=sel), EARLY=True, BLOCK_N=block_n, CHUNK=16)
                cases.append((f"attention BLOCK_N={block_n} stages={stages} sel={sel}",
                              ak._sparse_decode_split_kernel, args, dict(num_warps=4, num_stages=stages)))
    cases.append(("scan (hist, signed planes)", hk._block_keys_kernel,
                  tk._block_keys_args(hist=True, lse=False, form=2, pdl=True), dict(num_warps=4)))
    cases.append(("select (hist, tiled)", hk._select_kernel, tk._select_args(True, single=False, pdl=True),
                  dict(num_warps=8)))
    print(f"{'kernel':<48} {'regs':>5} {'spill B':>8}")
    for name, fn, args, opts in cases:
        k = tk.compile_sm90(fn, args, **opts)
        regs, spill = ptxas_info(k.asm["ptx"])
        print(f"{name:<48} {regs:>5} {spill:>8}")


if __name__ == "__main__":
    main()
