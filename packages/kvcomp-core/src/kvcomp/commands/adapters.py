"""``kvcomp adapters``: the installed model-family adapters as a table
(model_type, adapter, package, version), then any plugin that failed to load."""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adapters",
        help="list the model types kvcomp supports (installed adapters)",
        description="List adapters found in the entry-point group 'kvcomp.adapters'.",
    )
    p.set_defaults(func=run)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Plain text table with columns padded to their widest cell."""
    cells = [header, *rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kvcomp.adapters import registry

    # failures are reported in the table below, not as log noise
    log = logging.getLogger("kvcomp.adapters")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        rows = registry.info()
        fails = registry.failures()
    finally:
        log.setLevel(old)
    if rows:
        print(format_table(rows, ("model_type", "adapter", "package", "version")))
    else:
        print("no kvcomp adapters installed")
    if fails:
        print(f"\n{len(fails)} plugin(s) failed to load:")
        print(format_table([(f.name, f.package, f.reason) for f in fails],
                           ("entry point", "package", "error")))
    return 0
