"""The ``kvcomp`` command. Each subcommand lives in ``kvcomp/commands/<name>.py`` and exposes

    register(subparsers) -> None      adds its parser, with ``func=run`` as default
    run(args) -> int                  the exit code

Only commands that work are listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "kvcomp.commands.adapters",
    "kvcomp.commands.config",
    "kvcomp.commands.demo",
    "kvcomp.commands.train_hash",
    "kvcomp.commands.eval",
    "kvcomp.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    from kvcomp import __version__

    parser = argparse.ArgumentParser(
        prog="kvcomp",
        description="Hash-aware top-k sparse attention (KVComp / HATA) for long-context decoding.",
    )
    parser.add_argument("--version", action="version", version=f"kvcomp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
