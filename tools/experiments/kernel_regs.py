"""Registers, spills and shared memory of the decode-step kernels as ptxas reports them for sm_90 (no GPU
needed: the kernels are compiled from their Triton source as in tests/core/test_kernels_compile.py,
then ``ptxas -v`` of the triton wheel runs on the PTX).

    python tools/experiments/kernel_regs.py          # a table: kernel, variant, registers, spills
    python tools/experiments/kernel_regs.py --sass   # + the SIMT and tensor-core scans' SASS mix

``--sass`` compiles the scan as the JIT does for 16-byte aligned tensors (divisibility hints on
the pointers and the batch / head strides, unit strides as constants: vector loads), disassembles it with the wheel's
nvdisasm and counts instructions by opcode, and those between the PDL wait (ACQBULK) and the
first popcount, the part of the critical path that session 8 emptied of CTA barriers. The
counts are static (one program of one tile: 4 tokens a thread at 128 bits), the H200's
Triton may differ (3.6 there: the scan at 40 registers, 32 here).
"""

from __future__ import annotations

import collections
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
    # the attention as the JIT compiles it at 128K, B = 8 (chunk 128, 8 splits, unit strides as
    # constants, 16-byte aligned pointers and strides): per-token entries and the scalar entries;
    # with the selection in the prologue (sel) or not
    for block_n in (32, 64):
        for sel in (False, True):
            for name, scalar, stages in (("per-token", False, 2), ("scalar", True, 2)):
                args = dict(tk._split_args(True, 1, pdl=sel, sel=sel), EARLY=sel, BLOCK_N=block_n, CHUNK=128,
                            S_PAD=8, S_TILE=8, sqd=1, skd=1, svd=1, sod=1, SEL_NBINS=512,
                            BLK_SCALAR=scalar)
                cases.append((f"attention {name} BLOCK_N={block_n} sel={sel}", ak._sparse_decode_split_kernel,
                              args, dict(num_warps=4, num_stages=stages)))
    cases.append(("scan (hist, signed planes)", hk._block_keys_kernel,
                  tk._block_keys_args(hist=True, lse=False, form=2, pdl=True), dict(num_warps=4)))
    cases.append(("select (hist, tiled)", hk._select_kernel, tk._select_args(True, single=False, pdl=True),
                  dict(num_warps=8)))
    ms = importlib.import_module("kvcomp.ops.hamming_topk.mma_scan")
    cases.append(("scan on the tensor cores (mma_scan, hist)", ms._block_keys_mma_kernel, mma_scan_args(),
                  dict(num_warps=4)))
    print(f"{'kernel':<48} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for name, fn, args, opts in cases:
        aligned = None
        if fn is ak._sparse_decode_split_kernel:  # as the JIT specialises 16-byte aligned tensors
            aligned = tuple(n for n, a in args.items() if n.startswith("s") and a == "i32" and n != "SPLITS")
        k = tk.compile_sm90(fn, args, aligned=aligned, **opts)
        regs, spill = ptxas_info(k.asm["ptx"])
        print(f"{name:<48} {regs:>5} {spill:>8} {k.metadata.shared:>7}")


def mma_scan_args(chunk: int = 128, G: int = 4) -> dict:
    """Compile arguments of ``mma_scan._block_keys_mma_kernel`` (histogram, PDL, EARLY)."""
    i32 = "i32"
    return dict(q_ptr="*i32", k_ptr="*i32", len_ptr="*i32", key_ptr="*i32", Hkv=i32, NB_OUT=i32,
                BLOCKS_PER_PROG=i32, sqb=i32, sqh=i32, sqw=1, skb=i32, skh=i32, G=G, R=G.bit_length(),
                CHUNK=chunk, NWARPS=4, must_ptr="*i32", hist_ptr="*i32", HIST=True, M=3, KMIN=-512 * (G // 4),
                NBINS=512 * (G // 4), KSTEP=2, PDL=1, EARLY=True, FIRST_EARLY=True)


def sass_mix(cubin: bytes) -> tuple[collections.Counter, str]:
    """(opcode counts, the SASS text) of a cubin, by the triton wheel's nvdisasm."""
    from triton.backends.nvidia.compiler import get_ptxas

    px = get_ptxas(90)
    nvdisasm = Path(getattr(px, "path", px)).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for ln in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops, text


def scan_sass() -> None:
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    print(f"\n{'scan (128 bits, G = 4 signed planes, PDL + early loads)':<56} {'instr':>5} {'POPC':>5} "
          f"{'BAR':>4} {'LDG':>4}  wait -> 1st POPC: instr, BAR")
    for sliced in (True, False):
        # srw = 1: the JIT specialises unit strides (the query codes' words), as it would here
        args = dict(tk._block_keys_args(hist=True, lse=False, form=2, pdl=True, sliced=sliced), EARLY=True, srw=1)
        k = tk.compile_sm90(hk._block_keys_kernel, args, aligned=("skb", "skh"), num_warps=4)
        ops, text = sass_mix(k.asm["cubin"])
        post = text[text.index("ACQBULK"):]
        seg = post[:post.index("POPC")]
        n_seg = sum(1 for ln in seg.splitlines() if re.match(r"\s*/\*[0-9a-f]+\*/", ln))
        name = "rows bit-sliced (SLICED_ROWS)" if sliced else "rows by cross-thread reductions"
        print(f"{name:<56} {sum(ops.values()):>5} {ops['POPC']:>5} {ops['BAR']:>4} {ops['LDG']:>4}  "
              f"{n_seg}, {seg.count('BAR.SYNC')}")


def mma_scan_sass() -> None:
    """The tensor-core scan's SASS: instructions, BMMA (one per 16 tokens), shuffles, barriers."""
    ms = importlib.import_module("kvcomp.ops.hamming_topk.mma_scan")
    print(f"\n{'tensor-core scan (128 bits, hist, PDL + early)':<56} {'instr':>5} {'BMMA':>5} {'SHFL':>5} "
          f"{'BAR':>4} {'LDG':>4}")
    for chunk, G in ((128, 4), (128, 8), (16, 4)):
        k = tk.compile_sm90(ms._block_keys_mma_kernel, mma_scan_args(chunk, G), aligned=("skb", "skh"), num_warps=4)
        ops, _ = sass_mix(k.asm["cubin"])
        print(f"{f'chunk {chunk}, G = {G}':<56} {sum(ops.values()):>5} {ops['BMMA']:>5} {ops['SHFL']:>5} "
              f"{ops['BAR']:>4} {ops['LDG']:>4}")


if __name__ == "__main__":
    main()
    if "--sass" in sys.argv:
        scan_sass()
        mma_scan_sass()
