"""``kvcomp config validate FILE...``: check KVComp JSON configs.

Prints ``OK: <summary>`` per valid file (exit 0) or ``error: <message>`` (exit 1, no
traceback). ``--json`` prints one JSON object per file instead:
``{"file": ..., "ok": true, "summary": ..., "config": {...}}`` or
``{"file": ..., "ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="validate KVComp JSON configs",
        description="Work with KVComp JSON configs (the seed's format).",
    )
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    v = sub.add_parser(
        "validate",
        help="check config files; print OK with a one-line summary, or the error",
        description="Validate KVComp JSON config files. Exit 0 if all are valid, else 1.",
    )
    v.add_argument("files", nargs="+", metavar="FILE", help="JSON config file(s)")
    v.add_argument("--json", action="store_true", help="print one JSON object per file")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvcomp.config import ConfigError, KVCompConfig

    status = 0
    for path in args.files:
        try:
            cfg = KVCompConfig.from_json(path)
        except ConfigError as e:
            status = 1
            if args.json:
                print(json.dumps({"file": path, "ok": False, "error": str(e)}))
            else:
                prefix = "" if str(e).startswith(path) else f"{path}: "
                print(f"error: {prefix}{e}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"file": path, "ok": True, "summary": cfg.summary(),
                              "config": cfg.to_dict()}))
        else:
            print(f"OK: {cfg.summary()}")
    return status
