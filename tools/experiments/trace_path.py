"""Experiment helper (issue 6): where a decode step's time goes on the critical path, from a
chrome trace of graph-replayed steps (``e2e_knobs.py --timeline``), PDL on.

With programmatic dependent launch a kernel starts while its predecessor runs, so recorded
durations overlap and do not add up to the step. What does add up, in one stream: each kernel's
*end* minus the previous kernel's end, its share of the critical path. This sums those shares
per kernel (gemv launches told apart by their grid) over the middle replayed step and prints
them with the mean recorded duration.

    python tools/experiments/trace_path.py trace_kvcomp_131072x1.json [...] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json


def step_path(path: str, steps: int = 3) -> dict:
    """{"span_us", "kernels", "rows": [{name, n, path_us, mean_dur_us}]} of the middle step of
    ``steps`` replayed steps in the trace."""
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    n = len(ev) // steps
    mid = ev[n:2 * n]
    prev_end = ev[n - 1]["ts"] + ev[n - 1]["dur"]
    span = mid[-1]["ts"] + mid[-1]["dur"] - prev_end
    share, count, dur = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    for e in mid:
        name = e["name"][:60]
        if name == "_gemv_kernel":
            name = f"_gemv_kernel grid {e.get('args', {}).get('grid')}"
        end = e["ts"] + e["dur"]
        share[name] += end - prev_end
        count[name] += 1
        dur[name] += e["dur"]
        prev_end = end
    rows = [dict(name=k, n=count[k], path_us=round(share[k], 1), mean_dur_us=round(dur[k] / count[k], 2))
            for k in sorted(share, key=lambda k: -share[k])]
    return {"span_us": round(span, 1), "kernels": len(mid), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    out = {}
    for t in a.traces:
        r = out[t.rsplit("/", 1)[-1]] = step_path(t, a.steps)
        print(f"== {t}: step {r['span_us']:.1f} us, {r['kernels']} kernels\n"
              f"{'path us':>9} {'n':>4} {'per launch':>10} {'mean dur':>9}  kernel")
        for row in r["rows"][:16]:
            print(f"{row['path_us']:9.1f} {row['n']:4d} {row['path_us'] / row['n']:10.2f} {row['mean_dur_us']:9.2f}  "
                  f"{row['name']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
