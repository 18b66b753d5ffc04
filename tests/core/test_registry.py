"""Adapter registry: register(), entry points of real (throwaway) distributions, broken and
duplicate plugins, lookup errors."""

from __future__ import annotations

import importlib.metadata as md
import logging
import sys
import textwrap

import pytest
from kvcomp import adapters
from kvcomp.adapters import Adapter, UnsupportedModelError, registry


class ToyAdapter(Adapter):
    name = "toy"
    model_types = ("toy",)

    def default_config(self, model):
        raise AssertionError("not called in these tests")

    def check_config(self, config, model):
        raise AssertionError("not called in these tests")

    def enable(self, model, config, hash_weights=None, **kwargs):
        raise AssertionError("not called in these tests")


class OtherAdapter(ToyAdapter):
    name = "other"


@pytest.fixture
def clean_registry():
    saved = dict(registry._explicit)
    registry._explicit.clear()
    registry.reload()
    yield registry
    registry._explicit.clear()
    registry._explicit.update(saved)
    registry.reload()


PLUGIN_A = """
from kvcomp.adapters import Adapter

class PluginAdapter(Adapter):
    name = "plugin-a"
    model_types = ("alpha", "beta")
    def default_config(self, model): return None
    def check_config(self, config, model): return None
    def enable(self, model, config, hash_weights=None, **kw): return None

INSTANCE = PluginAdapter()
NOT_AN_ADAPTER = object()
"""

PLUGIN_B = """
from kvcomp.adapters import Adapter

class OtherPlugin(Adapter):
    name = "plugin-b"
    def default_config(self, model): return None
    def check_config(self, config, model): return None
    def enable(self, model, config, hash_weights=None, **kw): return None
"""


def make_dist(root, name, version, entry_points: dict[str, str]):
    """A minimal installed distribution (dist-info folder) with kvcomp.adapters entry points."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvcomp.adapters]\n{lines}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    (tmp_path / "kvt_plugin_a.py").write_text(textwrap.dedent(PLUGIN_A))
    (tmp_path / "kvt_plugin_b.py").write_text(textwrap.dedent(PLUGIN_B))
    make_dist(tmp_path, "kvt-plugin-a", "1.2.3", {
        "alpha": "kvt_plugin_a:PluginAdapter",
        "beta": "kvt_plugin_a:PluginAdapter",
        "gamma": "kvt_plugin_a:INSTANCE",
        "broken": "kvt_no_such_module:Adapter",
        "wrongtype": "kvt_plugin_a:NOT_AN_ADAPTER",
        "notasubclass": "collections:OrderedDict",
    })
    make_dist(tmp_path, "kvt-plugin-b", "0.9", {
        "alpha": "kvt_plugin_b:OtherPlugin",  # duplicate model_type from a second distribution
        "delta": "kvt_plugin_b:OtherPlugin",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("kvt_plugin_a", "kvt_plugin_b"):
        sys.modules.pop(mod, None)


def test_register_lookup_and_duplicates(clean_registry):
    inst = adapters.register("toy", ToyAdapter, package="tests", version="0.0")
    assert isinstance(inst, ToyAdapter)
    assert adapters.get_adapter("toy") is inst
    assert adapters.available()["toy"] is inst
    with pytest.raises(ValueError, match="already served"):
        adapters.register("toy", OtherAdapter())
    other = adapters.register("toy", OtherAdapter(), override=True, package="tests")
    assert adapters.get_adapter("toy") is other
    assert ("toy", "other", "tests", "-") in adapters.info()
    adapters.register("toy3", ToyAdapter)  # package defaults to the adapter's top-level module
    assert adapters.info()[[r[0] for r in adapters.info()].index("toy3")][2] == (
        ToyAdapter.__module__.split(".")[0]
    )
    adapters.unregister("toy")
    with pytest.raises(UnsupportedModelError):
        adapters.get_adapter("toy")
    with pytest.raises(TypeError, match="Adapter"):
        adapters.register("bad", dict)
    with pytest.raises(ValueError, match="model_type"):
        adapters.register("", ToyAdapter)


def test_unknown_model_type_lists_supported(clean_registry):
    adapters.register("toy", ToyAdapter)
    adapters.register("toy2", OtherAdapter)
    with pytest.raises(UnsupportedModelError) as err:
        adapters.get_adapter("gpt2")
    msg = str(err.value)
    assert "'gpt2'" in msg and "toy, toy2" in msg
    assert isinstance(err.value, ValueError)


def test_entry_points_of_real_distributions(clean_registry, plugin_path, caplog):
    caplog.set_level(logging.WARNING, logger="kvcomp.adapters")
    found = adapters.available()
    for mt in ("alpha", "beta", "gamma", "delta"):
        assert mt in found, sorted(found)
    assert type(found["alpha"]).__name__ == "PluginAdapter"  # first distribution wins
    assert found["alpha"] is found["beta"]  # one instance per class
    assert type(found["delta"]).__name__ == "OtherPlugin"
    for bad in ("broken", "wrongtype", "notasubclass"):
        assert bad not in found
    rows = {r[0]: r for r in adapters.info()}
    assert rows["alpha"] == ("alpha", "plugin-a", "kvt-plugin-a", "1.2.3")
    assert rows["delta"] == ("delta", "plugin-b", "kvt-plugin-b", "0.9")

    fails = {(f.name, f.package): f.reason for f in adapters.failures()}
    assert "ModuleNotFoundError" in fails[("broken", "kvt-plugin-a")]
    assert "expected an Adapter" in fails[("wrongtype", "kvt-plugin-a")]
    assert "not a kvcomp Adapter subclass" in fails[("notasubclass", "kvt-plugin-a")]
    assert "already served by kvt-plugin-a" in fails[("alpha", "kvt-plugin-b")]
    logged = caplog.text
    for piece in ("'broken'", "'wrongtype'", "'notasubclass'", "kvt-plugin-a", "kvt-plugin-b"):
        assert piece in logged, logged
    with pytest.raises(UnsupportedModelError, match="failed to load: .*broken"):
        adapters.get_adapter("nope")
    # explicit registration cannot silently shadow an entry point
    with pytest.raises(ValueError, match="kvt-plugin-a"):
        adapters.register("alpha", ToyAdapter)


def test_loader_with_entry_point_objects(plugin_path, caplog):
    eps = [
        md.EntryPoint("x1", "kvt_plugin_a:PluginAdapter", registry.ENTRY_POINT_GROUP),
        md.EntryPoint("x2", "kvt_plugin_a:INSTANCE", registry.ENTRY_POINT_GROUP),
        md.EntryPoint("x3", "kvt_plugin_a:missing_attr", registry.ENTRY_POINT_GROUP),
        md.EntryPoint("x1", "kvt_plugin_a:PluginAdapter", registry.ENTRY_POINT_GROUP),
    ]
    with caplog.at_level(logging.WARNING, logger="kvcomp.adapters"):
        loaded, fails = registry.load_entry_points(eps)
    assert sorted(loaded) == ["x1", "x2"]
    assert loaded["x1"].package == "(unknown)"
    assert [f.name for f in fails] == ["x3"] and "AttributeError" in fails[0].reason
    assert "x3" in caplog.text


def test_declared_entry_points_are_discovered():
    """The three packages declare their model types (their modules may not exist yet)."""
    names = {ep.name for ep in md.entry_points(group="kvcomp.adapters")}
    want = {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "deepseek_v2",
            "deepseek_v3"}
    assert want <= names, sorted(names)


def test_available_never_raises_for_broken_plugins(clean_registry):
    # whatever state the family packages are in, loading the real group must not raise
    found = adapters.available()
    assert isinstance(found, dict)
    assert all(isinstance(a, Adapter) for a in found.values())
    rows = adapters.info()
    assert [r[0] for r in rows] == sorted(found)
