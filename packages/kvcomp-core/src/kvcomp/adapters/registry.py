"""Adapter registry: ``model_type`` -> :class:`~kvcomp.adapters.base.Adapter` instance.

Adapters come from two places:

* entry points of the group ``kvcomp.adapters`` declared by installed distributions
  (``model_type = "module:Object"``; the object is an ``Adapter`` subclass, instantiated once
  per class, or an ``Adapter`` instance). They are loaded on first use and cached.
* :func:`register` for code that is not installed as a distribution.

A plugin that fails to import, is not an Adapter, or claims a ``model_type`` that another
distribution already serves is logged (logger ``kvcomp.adapters``, with its entry-point name
and package) and skipped; the others still load. :func:`failures` lists what was skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kvcomp.adapters.base import Adapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterEntry",
    "PluginFailure",
    "UnsupportedModelError",
    "available",
    "failures",
    "get_adapter",
    "info",
    "register",
    "reload",
    "unregister",
]

ENTRY_POINT_GROUP = "kvcomp.adapters"
logger = logging.getLogger("kvcomp.adapters")


class UnsupportedModelError(ValueError):
    """No adapter serves this ``model_type``; the message lists the supported ones."""


@dataclass(frozen=True)
class AdapterEntry:
    """One registry row. ``source``: "entry point <name> = <value>" or "register()"."""

    model_type: str
    adapter: Adapter
    package: str
    version: str
    source: str


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that was skipped, and why."""

    name: str
    value: str
    package: str
    reason: str


_lock = threading.RLock()
_from_entry_points: dict[str, AdapterEntry] | None = None
_explicit: dict[str, AdapterEntry] = {}
_failures: list[PluginFailure] = []


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown)", "-"
    return str(dist.metadata["Name"]), str(dist.version)


def _as_instance(obj, cache: dict[type, Adapter]) -> Adapter:
    """An Adapter subclass (instantiated once per class) or instance; TypeError otherwise."""
    if isinstance(obj, type):
        if not issubclass(obj, Adapter):
            raise TypeError(f"{obj.__module__}.{obj.__qualname__} is not a kvcomp Adapter subclass")
        if obj not in cache:
            cache[obj] = obj()
        return cache[obj]
    if isinstance(obj, Adapter):
        return obj
    raise TypeError(f"expected an Adapter subclass or instance, got {type(obj).__name__}")


def load_entry_points(
    eps: Iterable[md.EntryPoint],
) -> tuple[dict[str, AdapterEntry], list[PluginFailure]]:
    """Load adapter entry points; returns (model_type -> entry, skipped plugins).

    Entry points are handled in the order (name, package); for a model_type claimed by two
    distributions the first one wins and the other is logged as a failure. The same
    entry point seen twice (one distribution on two sys.path entries) is silently merged."""
    loaded: dict[str, AdapterEntry] = {}
    fails: list[PluginFailure] = []
    instances: dict[type, Adapter] = {}
    seen: set[tuple[str, str, str]] = set()
    for ep in sorted(eps, key=lambda e: (e.name, _dist_of(e)[0], e.value)):
        package, version = _dist_of(ep)
        key = (ep.name, ep.value, package)
        if key in seen:
            continue
        seen.add(key)
        if ep.name in loaded:
            first = loaded[ep.name]
            reason = (
                f"model_type {ep.name!r} is already served by {first.package} ({first.source}); "
                f"ignoring this one"
            )
            logger.warning("kvcomp adapter plugin %r from %s skipped: %s", ep.name, package, reason)
            fails.append(PluginFailure(ep.name, ep.value, package, reason))
            continue
        try:
            adapter = _as_instance(ep.load(), instances)
        except Exception as e:  # a broken plugin must not break the others
            reason = f"{type(e).__name__}: {e}"
            logger.warning(
                "kvcomp adapter plugin %r (%s) from %s failed to load: %s",
                ep.name, ep.value, package, reason,
            )
            fails.append(PluginFailure(ep.name, ep.value, package, reason))
            continue
        loaded[ep.name] = AdapterEntry(
            ep.name, adapter, package, version, f"entry point {ep.name} = {ep.value}"
        )
    return loaded, fails


def _ensure_loaded() -> dict[str, AdapterEntry]:
    global _from_entry_points
    with _lock:
        if _from_entry_points is None:
            loaded, fails = load_entry_points(md.entry_points(group=ENTRY_POINT_GROUP))
            _from_entry_points = loaded
            _failures[:] = fails
        return _from_entry_points


def _entries() -> dict[str, AdapterEntry]:
    with _lock:
        merged = dict(_ensure_loaded())
        merged.update(_explicit)
        return merged


def available() -> dict[str, Adapter]:
    """{model_type: adapter instance} from entry points and :func:`register`, sorted by name."""
    return {k: e.adapter for k, e in sorted(_entries().items())}


def get_adapter(model_type: str) -> Adapter:
    """The adapter serving ``model_type``; UnsupportedModelError listing the supported ones."""
    entries = _entries()
    if model_type in entries:
        return entries[model_type].adapter
    supported = ", ".join(sorted(entries)) or "none"
    msg = f"no kvcomp adapter for model_type {model_type!r}; supported: {supported}"
    if _failures:
        names = ", ".join(sorted({f.name for f in _failures}))
        msg += f" (plugins that failed to load: {names}; see `kvcomp adapters`)"
    raise UnsupportedModelError(msg)


def register(
    model_type: str,
    adapter,
    *,
    package: str | None = None,
    version: str | None = None,
    override: bool = False,
) -> Adapter:
    """Register an adapter (subclass or instance) for ``model_type``; returns the instance.

    Raises ValueError if ``model_type`` is already served and ``override`` is False."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    instance = _as_instance(adapter, {})
    with _lock:
        existing = _entries().get(model_type)
        if existing is not None and not override:
            raise ValueError(
                f"model_type {model_type!r} is already served by {existing.package} "
                f"({existing.source}); pass override=True to replace it"
            )
        pkg = package or type(instance).__module__.split(".")[0]
        _explicit[model_type] = AdapterEntry(model_type, instance, pkg, version or "-", "register()")
    return instance


def unregister(model_type: str) -> None:
    """Remove an adapter added with :func:`register` (entry points are not affected)."""
    with _lock:
        if model_type not in _explicit:
            raise KeyError(f"model_type {model_type!r} was not added with register()")
        del _explicit[model_type]


def reload() -> None:
    """Forget the loaded entry points (they are read again on next use); keeps register()ed."""
    global _from_entry_points
    with _lock:
        _from_entry_points = None
        _failures.clear()


def failures() -> list[PluginFailure]:
    """Plugins skipped while loading the entry points."""
    _ensure_loaded()
    return list(_failures)


def info() -> list[tuple[str, str, str, str]]:
    """Rows (model_type, adapter name, package, version), sorted by model_type."""
    rows = []
    for k, e in sorted(_entries().items()):
        name = e.adapter.name or type(e.adapter).__name__
        rows.append((k, name, e.package, e.version))
    return rows
