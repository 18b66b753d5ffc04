"""The attention's 512-program plan in ``decode_step``, A/B in one process: ``kvcomp bench
decode``'s rows (verified first) at 128K, B = 8, 2048 tokens for Qwen3-8B and Qwen3-32B, with
264 then 512 programs (``TARGET_PROGRAMS_MANY``, for both group sizes). "with_select" in the
output: the 512 plan. (Session 17 ran it at 3b87c5b, where a flag of the time put the 512 plan
into the prologue-selection path; the result set ``MANY_MAX_G`` = 4. Session 18 found Qwen3-32B's
slower 512 plan to be a register-bound second wave and, with ``MANY_MAXNREG``, set it to 8.)

    python tools/experiments/attn_plan_ab.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from kvcomp.bench import decode
    from kvcomp.bench.timing import copy_bandwidth_gbs
    from kvcomp.ops.sparse_decode_attention import kernels as ak

    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    cfg = dict(decode.FULL, budgets=["2048"], models=["qwen3-8b", "qwen3-32b"], token_score="hamming",
               variants=False)
    copy = copy_bandwidth_gbs()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    undo = ak.MANY_MAX_G, ak.TARGET_PROGRAMS_MANY
    ak.MANY_MAX_G = 8  # both models may take the 512 plan
    for flag in (False, True):
        ak.TARGET_PROGRAMS_MANY = 512 if flag else 264
        for r in decode.run_length_batch(131072, 8, cfg, a.reps, copy, gen):
            t = r.get("times_us", {})
            out.append(dict(with_select=flag, model=r["model"], verified=r["verified"], step=t.get("step"),
                            attend=t.get("attend"), select=t.get("select_exact")))
            print(out[-1], flush=True)
    ak.MANY_MAX_G, ak.TARGET_PROGRAMS_MANY = undo
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=copy, rows=out), fh, indent=1)


if __name__ == "__main__":
    main()
