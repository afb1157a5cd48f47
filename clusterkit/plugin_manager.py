"""Finding, describing and loading plugins (pluggy + entry points).

Every plugin, built-in or third-party, is an entry point in the group
``clusterkit.plugins``.  :func:`discover` lists them without importing anything
a recipe does not use until asked; :func:`load_plugins` instantiates the plugins a
recipe names, validating each one's parameters with its own ``Params`` class.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError, RecipeError
from .schema import build, did_you_mean, field_docs

GROUP = "clusterkit.plugins"


@attrs.define
class PluginInfo:
    """One entry point of the ``clusterkit.plugins`` group."""

    name: str
    value: str                # "module:Class"
    package: str              # the distribution that declares it
    version: str
    entry_point: Any = attrs.field(repr=False, default=None)
    _cls: Any = attrs.field(repr=False, default=None, alias="_cls")
    error: str | None = None

    def load(self):
        """Import the plugin class (once); a failure is kept in ``error`` and raised as PluginError."""
        if self._cls is None and self.error is None:
            try:
                self._cls = self.entry_point.load()
            except Exception as exc:  # a third-party import failure must not take the others down
                self.error = f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            raise PluginError(
                f"Plugin '{self.name}' (package '{self.package}' {self.version}, {self.value}) failed to "
                f"import: {self.error}. Fix or reinstall that package, or remove '{self.name}' from the "
                "recipe's plugins.")
        return self._cls

    @property
    def source(self) -> str:
        return "built-in" if self.package == "clusterkit" else f"{self.package} {self.version}"


def discover() -> dict[str, PluginInfo]:
    """All plugins in the entry-point group, by name.  Two packages that register the same
    name are an error that names both."""
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        info = PluginInfo(ep.name, ep.value, package, version, ep)
        if ep.name in found and found[ep.name].value != ep.value:
            other = found[ep.name]
            raise PluginError(
                f"Two packages register the plugin name '{ep.name}': '{other.package}' ({other.value}) and "
                f"'{package}' ({ep.value}). Uninstall one of them, or rename the entry point in one package's "
                "pyproject.toml.")
        found[ep.name] = info
    return found


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def hook_names() -> list[str]:
    """Hook names in the order hookspecs.py defines them (the order the loop calls them)."""
    return [name for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, hookspecs.PROJECT + "_spec")]


def implemented_hooks(cls) -> list[str]:
    marker = hookspecs.PROJECT + "_impl"
    return [name for name in hook_names() if hasattr(getattr(cls, name, None), marker)]


def make_plugin(cls, name: str, raw_params: dict | None):
    """Instantiate plugin class ``cls`` with validated parameters."""
    params_cls = getattr(cls, "Params", None)
    params = build(params_cls, raw_params or {}, f"plugins.{name}") if params_cls is not None else None
    plugin = cls(params)
    plugin.name = name
    return plugin


def load_plugins(plugin_params: dict[str, dict], available: dict[str, PluginInfo] | None = None):
    """Register the recipe's plugins on a fresh pluggy manager; returns (manager, {name: plugin})."""
    available = discover() if available is None else available
    pm = new_manager()
    instances = {}
    for name, raw in plugin_params.items():
        if name not in available:
            raise RecipeError(
                f"Unknown plugin '{name}' in the recipe's plugins.{did_you_mean(name, available)} "
                f"Installed plugins: {', '.join(sorted(available)) or 'none'}. Run 'clusterkit plugins' to "
                "list them, or install the package that provides it.")
        instances[name] = make_plugin(available[name].load(), name, raw)
    # pluggy calls the last registered implementation first: register in reverse so that hooks
    # run in the order the recipe lists the plugins (tryfirst/trylast still take precedence).
    for name in reversed(list(instances)):
        pm.register(instances[name], name=name)
    return pm, instances


def describe(info: PluginInfo) -> dict:
    """Source, hooks and parameters of one plugin (for ``clusterkit plugins``)."""
    try:
        cls = info.load()
    except PluginError:
        return {"name": info.name, "source": info.source, "error": info.error}
    params_cls = getattr(cls, "Params", None)
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return {
        "name": info.name,
        "source": info.source,
        "object": info.value,
        "doc": doc,
        "hooks": implemented_hooks(cls),
        "params": field_docs(params_cls) if params_cls is not None else [],
    }
