"""``kvcomp bench <name>``: GPU benchmarks that verify their results before timing them.

Each benchmark is one module under ``kvcomp/bench/`` exposing ``add_arguments(parser)`` and
``run(args) -> int`` (its docstring's first line is the help text). Adding one = adding the
module and one line to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = [
    "kvcomp.bench.decode",
    "kvcomp.bench.mla",
]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the kernels on a CUDA GPU (results verified first)",
        description="Benchmarks of kvcomp's GPU kernels; each verifies its results against the "
        "references and refuses to report a speedup on a mismatch.",
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for path in SUBCOMMANDS:
        mod = importlib.import_module(path)
        name = path.rsplit(".", 1)[-1]
        summary = (mod.__doc__ or name).strip().splitlines()[0]
        sp = sub.add_parser(name, help=summary, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    p.set_defaults(func=run, _bench_parser=p)


def run(args: argparse.Namespace) -> int:
    """``kvcomp bench`` without a benchmark name: the list of benchmarks, exit code 2."""
    parser = getattr(args, "_bench_parser", None)
    if parser is not None:
        parser.print_help()
    return 2
