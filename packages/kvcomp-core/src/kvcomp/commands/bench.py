"""``kvcomp bench <name>``: GPU benchmarks that verify their results before timing them.

Each benchmark is one module under ``kvcomp/bench/`` exposing ``add_arguments(parser)`` and
``run(args) -> int`` (its docstring's first line is the help text). Adding one = adding the
module and one line to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util

SUBCOMMANDS = [
    "kvcomp.bench.decode",
    "kvcomp.bench.verify",
    "kvcomp.bench.mla",
    "kvcomp.bench.e2e",
    "kvcomp.bench.e2e_mla",
    "kvcomp.bench.offload",
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
        name = path.rsplit(".", 1)[-1]
        doc = _docstring(path) or name
        summary = doc.strip().splitlines()[0]
        try:
            mod = importlib.import_module(path)
        except ImportError as e:  # e.g. no torch: `kvcomp --help` still works, the bench says why
            # prefix "\0": every argument is a positional, so the message shows whatever is passed
            sp = sub.add_parser(name, help=summary, prefix_chars="\0", add_help=False)
            sp.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
            sp.set_defaults(func=functools.partial(_unavailable, name, str(e)))
            continue
        sp = sub.add_parser(name, help=summary, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    p.set_defaults(func=run, _bench_parser=p)


def _docstring(path: str) -> str | None:
    """A benchmark module's docstring, read without importing it (it imports torch)."""
    spec = importlib.util.find_spec(path)
    if spec is None or not spec.origin:
        return None
    with open(spec.origin, encoding="utf-8") as fh:
        return ast.get_docstring(ast.parse(fh.read()))


def _unavailable(name: str, reason: str, args: argparse.Namespace) -> int:
    print(f"kvcomp bench {name} cannot run here: {reason} (it needs torch, triton and a CUDA GPU)")
    return 1


def run(args: argparse.Namespace) -> int:
    """``kvcomp bench`` without a benchmark name: the list of benchmarks, exit code 2."""
    parser = getattr(args, "_bench_parser", None)
    if parser is not None:
        parser.print_help()
    return 2
