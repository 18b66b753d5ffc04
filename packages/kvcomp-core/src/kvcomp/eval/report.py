"""Markdown tables and matplotlib plots of a ``kvcomp eval`` result.

``write_report(results, out_dir)`` writes ``report.md`` and, when the results hold them,
``captured_mass.png`` (captured attention mass vs budget per selection method) and
``nll_vs_budget.png`` (perplexity increase over dense vs budget, with standard-error bars).
``results`` is the JSON dict of ``kvcomp eval`` (sections ``setup``, ``fidelity``, ``nll``,
``tasks``; each optional).
"""

from __future__ import annotations

import re
from pathlib import Path


def _pct(x: float, se: float | None = None) -> str:
    s = f"{100 * x:+.2f}%"
    return s + (f" ± {100 * se:.2f}" if se is not None else "")


def _spec_parts(name: str) -> tuple[str, float] | None:
    m = re.fullmatch(r"(.+)@([0-9.e-]+)", name)
    return (m.group(1), float(m.group(2))) if m else None


def fidelity_table(fid: dict) -> str:
    ratios = sorted({float(r) for per in fid.values() for r in per})
    head = "| method | " + " | ".join(f"mass @ {r:g}" for r in ratios) + " | " + \
        " | ".join(f"out. rel. err @ {r:g}" for r in ratios) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(ratios))]
    for method, per in fid.items():
        cells = []
        for key in ("mass", "error"):
            for r in ratios:
                e = per.get(str(r)) or per.get(f"{r:g}")
                cells.append(f"{e[key]:.3f} ± {e[key + '_se']:.3f}" if e and key in e else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_closed_table(fid: dict, random_name: str, trained_name: str) -> str:
    """Share of the random -> oracle captured-mass gap that the trained hash closes."""
    if "oracle" not in fid or random_name not in fid or trained_name not in fid:
        return ""
    lines = ["| budget | random | trained | oracle | gap closed |", "| --- | --- | --- | --- | --- |"]
    for r, o in fid["oracle"].items():
        a, b = fid[random_name].get(r), fid[trained_name].get(r)
        if not a or not b:
            continue
        gap = o["mass"] - a["mass"]
        closed = (b["mass"] - a["mass"]) / gap if gap > 0 else float("nan")
        lines.append(f"| {float(r):g} | {a['mass']:.4f} | {b['mass']:.4f} | {o['mass']:.4f} | {100 * closed:.0f}% |")
    return "\n".join(lines)


def nll_table(nll: dict) -> str:
    lines = [f"Dense: perplexity {nll['dense']['ppl']:.3f} (NLL {nll['dense']['nll']:.4f} ± "
             f"{nll['dense']['nll_se']:.4f}) over {nll['positions']} positions.", "",
             "| selection | budget | perplexity | vs dense | top-1 agreement | blocks attended |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, e in nll.items():
        parts = _spec_parts(name)
        if parts is None or not isinstance(e, dict):
            continue
        share = f"{100 * e['attended_share']:.1f}%" if e.get("attended_share") else "-"
        lines.append(f"| {parts[0]} | {parts[1]:g} | {e['ppl']:.3f} | {_pct(e['ppl_increase'], e['ppl_increase_se'])} "
                     f"| {e['top1_agreement']:.3f} ± {e['top1_agreement_se']:.3f} | {share} |")
    return "\n".join(lines)


def tasks_table(tasks: dict) -> str:
    names = list(tasks)
    task_names = [t for t in next(iter(tasks.values())) if t != "overall"] + ["overall"]
    lines = ["| selection | " + " | ".join(task_names) + " | vs dense |",
             "|" + " --- |" * (len(task_names) + 2)]
    for n in names:
        row = [f"{tasks[n][t]['accuracy']:.1f} (n={tasks[n][t]['n']})" if t in tasks[n] else "-" for t in task_names]
        ov = tasks[n]["overall"]
        diff = f"{ov['diff_vs_dense']:+.1f} ± {ov['diff_se']:.1f}" if "diff_vs_dense" in ov else "-"
        lines.append(f"| {n} | " + " | ".join(row) + f" | {diff} |")
    return "\n".join(lines)


def plot_captured_mass(fid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, per in fid.items():
        rs = sorted(per, key=float)
        ax.errorbar([100 * float(r) for r in rs], [per[r]["mass"] for r in rs],
                    yerr=[per[r].get("mass_se", 0) for r in rs], marker="o", capsize=3, label=method)
    ax.set_xlabel("budget (% of blocks)")
    ax.set_ylabel("captured attention mass")
    ax.set_title("Captured attention mass vs budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_nll(nll: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float]]] = {}
    for name, e in nll.items():
        parts = _spec_parts(name)
        if parts is None or not isinstance(e, dict):
            continue
        series.setdefault(parts[0], []).append((parts[1], e["ppl_increase"], e["ppl_increase_se"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in series.items():
        pts.sort()
        ax.errorbar([100 * p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                    marker="o", capsize=3, label=method)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("budget (% of blocks)")
    ax.set_ylabel("perplexity increase vs dense (%)")
    ax.set_title("Teacher-forced perplexity vs budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_results(earlier: dict, later: dict, *, check: bool = True) -> dict:
    """Merge two ``kvcomp eval`` results of the same setup (e.g. random + oracle, then trained):
    method entries of ``fidelity``, ``nll`` and ``tasks`` are united (``later`` wins on a
    clash); ``setup`` is ``later``'s with the earlier run's hash weights noted. ``check``: the
    two must have scored the same number of positions (off for a later run's partial saves)."""
    out = {"setup": dict(later.get("setup", {}))}
    if check and earlier.get("setup", {}).get("positions") not in (None, out["setup"].get("positions")):
        raise ValueError("merge: the two runs scored different numbers of positions")
    out["setup"]["merged_from"] = earlier.get("setup", {}).get("hash_weights") or "random/oracle run"
    for section in ("fidelity", "nll", "tasks"):
        if section in earlier or section in later:
            out[section] = {**earlier.get(section, {}), **later.get(section, {})}
    out["seconds"] = {"earlier": earlier.get("seconds"), "later": later.get("seconds")}
    return out


def write_report(results: dict, out_dir: str | Path, *, random_name: str = "random-sum",
                 trained_name: str = "trained-sum") -> Path:
    """Write report.md (+ PNGs) under ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# kvcomp eval", ""]
    setup = results.get("setup")
    if setup:
        parts += ["Setup: " + ", ".join(f"{k} = {v}" for k, v in setup.items()), ""]
    if results.get("fidelity"):
        parts += ["## Attention fidelity (sparse layers, mean ± s.e. over positions)", "",
                  fidelity_table(results["fidelity"]), ""]
        gap = gap_closed_table(results["fidelity"], random_name, trained_name)
        if gap:
            parts += [gap, ""]
        plot_captured_mass(results["fidelity"], out / "captured_mass.png")
        parts += ["![captured mass](captured_mass.png)", ""]
    if results.get("nll"):
        parts += ["## Teacher-forced perplexity, every position a decode step", "", nll_table(results["nll"]), ""]
        plot_nll(results["nll"], out / "nll_vs_budget.png")
        parts += ["![nll vs budget](nll_vs_budget.png)", ""]
    if results.get("tasks"):
        parts += ["## Synthetic tasks (accuracy %, greedy exact match)", "", tasks_table(results["tasks"]), ""]
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return md
