"""The ``kvcomp`` command frame: help lists only real commands, exit codes, ``kvcomp adapters``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from kvcomp import cli
from kvcomp.adapters import Adapter, registry
from kvcomp.commands.adapters import format_table


class ToyAdapter(Adapter):
    name = "toy"

    def default_config(self, model):
        raise AssertionError("not called")

    def check_config(self, config, model):
        raise AssertionError("not called")

    def enable(self, model, config, hash_weights=None, **kwargs):
        raise AssertionError("not called")


def test_every_listed_command_is_real():
    for mod in cli.COMMANDS:
        m = importlib.import_module(mod)
        assert callable(m.register) and callable(m.run), mod
        assert (m.__doc__ or "").strip(), f"{mod} has no docstring"


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "adapters" in out and "config" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    sub = cli.build_parser()._subparsers._group_actions[0]
    assert set(sub.choices) == {m.rsplit(".", 1)[1].replace("_", "-") for m in cli.COMMANDS}
    for name in sub.choices:
        assert name in help_text


def test_version_and_usage_errors(capsys):
    import kvcomp

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and kvcomp.__version__ in capsys.readouterr().out
    for argv in (["no-such-command"], ["config"], ["config", "validate"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert "usage:" in capsys.readouterr().err


def test_adapters_table(capsys):
    registry.register("toy-cli", ToyAdapter, package="kvcomp-tests", version="9.9", override=True)
    try:
        assert cli.main(["adapters"]) == 0
        out = capsys.readouterr().out
    finally:
        registry.unregister("toy-cli")
    lines = out.splitlines()
    assert lines[0].split() == ["model_type", "adapter", "package", "version"]
    assert set(lines[1]) <= {"-", " "}
    row = next(line for line in lines if line.startswith("toy-cli"))
    assert row.split() == ["toy-cli", "toy", "kvcomp-tests", "9.9"]
    # broken plugins (if any) are listed as a table too, never as a traceback
    assert "Traceback" not in out


def test_format_table_alignment():
    t = format_table([("a", "bb"), ("ccc", "d")], ("x", "y")).splitlines()
    assert t == ["x    y", "---  --", "a    bb", "ccc  d"]


def test_module_entry_runs_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "kvcomp.cli", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "config" in r.stdout and "adapters" in r.stdout


def test_light_imports_stay_light():
    """The CLI frame, config and registry import neither torch nor transformers (the registry
    loads adapter modules only when asked), and the ops never import transformers."""
    code = (
        "import sys, kvcomp.adapters, kvcomp.config, kvcomp.cli; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'light'; "
        "import kvcomp.ops, kvcomp.hashing, kvcomp.policy; "
        "assert 'transformers' not in sys.modules, 'ops'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_demo_answer_check_wants_the_whole_number():
    from kvcomp.commands.demo import _says

    assert _says("4817.") and _says("The password is 4817")
    assert not _says("48174. This") and not _says("14817") and not _says("48 17")
