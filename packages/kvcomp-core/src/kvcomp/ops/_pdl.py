"""Programmatic dependent launch (PDL) of the decode-path kernels on Hopper and later GPUs.

A decode step is a chain of small dependent kernels (encode the query, scan the codes, select,
attend). At B = 1 each kernel runs for a few microseconds, and the gap between two of them
(the first kernel's last programs draining, the next one's launch and start-up) is a large part
of the step. With PDL (CUDA's programmatic stream serialization, sm_90+) a kernel launched with
``launch_pdl=True`` may start while its predecessor in the stream still runs; it must then wait
(``griddepcontrol.wait``) before it touches memory the predecessor writes or reads.

The rule every kernel here follows (``pdl_enter``, called first thing, before any load or
store): wait for the predecessor, then allow the successor to launch. Since a kernel signals its
successor only after its own wait returned, everything written two or more launches earlier is
complete too, and no kernel ever runs ahead of a predecessor's memory traffic: the results are
bit-identical to plain stream order (tested on the GPU). What overlaps is the successor's launch
and the placing of its programs with the predecessor's tail.

``ENABLED`` (module flag; default on, off with the environment variable ``KVCOMP_PDL=0``)
switches PDL for all kvcomp kernels that support it; the benchmarks time both in one run. It
applies to CUDA tensors on sm_90+ only; on the CPU (the Triton interpreter) the kernels compile
without the instructions and launch as before. A kernel that was launched without PDL executes
``griddepcontrol.wait`` as a no-op.

Where a caller knows that only one input comes from the previous launch (``decode_step``: the
query codes for the scan, the selection for the attention), a kernel may load its other inputs
before the wait (the kernels' ``EARLY`` constexpr): by the rule above they were complete before
it launched. Measured on the H200 (docs/benchmarks/decode.md, session 6): a 128K decode step at
B = 1 takes 18.8 us with PDL against 20.2 us without; end to end, 3.5-4% per step.
"""

from __future__ import annotations

import functools
import os

import torch

from kvcomp.ops._common import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton the kernels do not run at all
    triton = None
try:  # Triton >= 3.3; the instructions need sm_90+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_wait = gdc_launch_dependents = None

ENABLED = os.environ.get("KVCOMP_PDL", "1") != "0"
# kernel roles ("encode", "rows", "scan", "select", "attention", "gemv", "gemv_gated", "norm") that do not
# signal their successor early: it then launches as their programs exit. A successor launched
# early keeps its programs on the SMs, waiting, while this kernel still runs.
NO_TRIGGER: frozenset = frozenset()
# the decode-step kernels (scan, selection, attention) take PDL only up to this many (sequence,
# kv-head) rows. There the step is a chain of latency-bound launches (B = 1 at 128K on the H200:
# 18.8 us against 19.9-20.1 without). Sessions 6-7 kept it at 16: at B = 8 (64 rows) PDL gained
# nothing and slowed the fused-merge attention (128 vs 117-120 us at 10% of 128K), and at B = 4
# with G = 8 it lost 3-8 us. Since then the attention at 32+ rows runs 512 programs in one wave
# (sessions 17-18), so a successor launched early no longer takes the slots of a second wave.
# Session 19 (tools/experiments/attn_pipeline.py, same process, 128K, decode_step, us, 16 / 64
# rows): Qwen3-8B B = 8 2048 tokens 63.0-64.2 / 61.2, 10% 147.1 / 144.4; Qwen3-32B B = 8 66.7-66.8
# / 64.2; Qwen3-8B B = 4 39.6 / 36.6. The attention alone at B = 8 2048 tokens 23.05-23.09 /
# 22.53 (a launch began ~1 us after the previous one ended: attn_timeline.py), but 105.8-106.0 /
# 106.9 at 10%. Above 64 rows: not measured, off.
DECODE_MAX_ROWS = 64
# ... but a kernel of these roles over more rows than this lets its successor launch only as its
# programs exit (PDL 2): in a model the attention's successor is the o_proj gemv, whose programs,
# launched early, wait on the SMs that the attention's one wave of programs needs. Session 19,
# `kvcomp bench e2e` (Qwen3-8B shape, 256 steps) with the early trigger at 32 rows, against
# session 18's 16-row PDL: 64K, B = 4 kvcomp 5.92 / 5.74 ms, dense_kv 13.17 / 12.98; 1K, B = 4
# 4.84 / 4.63 (decode.md / e2e.md "Session 19")
EARLY_TRIGGER_MAX_ROWS: dict = {"attention": 16}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_supported(device: torch.device) -> bool:
    """True on a CUDA device of compute capability >= 9.0 with a Triton that has the GDC ops."""
    if device.type != "cuda" or gdc_wait is None or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def pdl_args(t: torch.Tensor, role: str = "", rows: int | None = None, max_rows: int | None = None) -> dict:
    """Launch arguments of a kernel with a ``PDL`` constexpr, for inputs on ``t``'s device:
    ``{"PDL": 1, "launch_pdl": True}`` where PDL applies (``ENABLED``, sm_90+ and, for a
    decode-step kernel, ``rows`` <= ``max_rows``, default ``DECODE_MAX_ROWS``; ``PDL`` 2 where
    ``role`` is in ``NO_TRIGGER`` or ``rows`` exceeds the role's ``EARLY_TRIGGER_MAX_ROWS``), else
    {}."""
    if rows is not None and rows > (DECODE_MAX_ROWS if max_rows is None else max_rows):
        return {}
    if ENABLED and pdl_supported(t.device):
        late = role in NO_TRIGGER or (rows is not None and rows > EARLY_TRIGGER_MAX_ROWS.get(role, rows))
        return {"PDL": 2 if late else 1, "launch_pdl": True}
    return {}


if triton is not None:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First statement of a kernel launched by ``pdl_args``: wait until the previous kernel
        in the stream has finished and its writes are visible, then (PDL 1) let the next kernel
        launch; PDL 2: the next kernel launches as this one's programs exit."""
        if PDL:
            gdc_wait()
            if PDL == 1:
                gdc_launch_dependents()
