"""Finding, describing and loading plugins (pluggy + entry points).

Every plugin, built-in or third-party, is an entry point in the group
``clusterkit.plugins``.  :func:`discover` lists them without importing anything
a recipe does not use until asked; :func:`load_plugins` instantiates the plugins a
recipe names, validating each one's parameters with its own ``Params`` class.

Which entry points may be loaded (:func:`select`):

* by default, every installed plugin;
* a recipe's ``allow_plugins`` list (plugin names or package names): clusterkit's
  built-ins plus the plugins it names, or that the packages it names provide;
* ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD=1`` in the environment (like pytest's
  ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): third-party entry points are not loaded unless a
  recipe's ``allow_plugins`` names them; without an allow-list only the built-ins load.

Excluded entry points are never imported and take no part in the duplicate-name check,
so a broken or conflicting package that a recipe does not allow cannot break its run.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import os
import re
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import ClusterkitError, PluginError, RecipeError
from .schema import build, did_you_mean, field_docs

GROUP = "clusterkit.plugins"
#: Hooks that a plugin switched off by the recipe's ``stages`` does not receive.  setup,
#: register_outputs, embed and predict always run, so modules and outputs exist throughout.
STAGED_HOOKS = frozenset({"on_epoch_start", "e_step", "on_step_start", "compute_losses",
                          "before_optimizer_step", "after_step", "on_epoch_end"})
#: Set to 1 to load only clusterkit's built-in plugins plus those a recipe's allow_plugins names.
AUTOLOAD_ENV = "CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD"
#: The distribution whose entry points are the built-in plugins (always allowed).
BUILTIN_PACKAGE = "clusterkit"


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
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    @property
    def source(self) -> str:
        return "built-in" if self.builtin else f"{self.package} {self.version}"


def autoload_disabled() -> bool:
    """True when ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD`` is set to anything but '', 0, false, no or off."""
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def normalize_package(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", str(name)).lower()


def installed() -> list[PluginInfo]:
    """Every entry point of the ``clusterkit.plugins`` group, unfiltered and not imported."""
    infos = []
    for ep in md.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        infos.append(PluginInfo(ep.name, ep.value, package, version, ep))
    return infos


def is_allowed(info: PluginInfo, allow: list[str] | None = None, autoload: bool | None = None) -> bool:
    """Whether plugin ``info`` may be loaded under allow-list ``allow`` (None: no list) and the
    autoload switch (None: read ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD``).  Built-ins always may."""
    if info.builtin:
        return True
    if allow is None:
        return not autoload_disabled() if autoload is None else autoload
    wanted = {normalize_package(a) for a in allow}
    return info.name in allow or normalize_package(info.package) in wanted


def select(infos, allow: list[str] | None = None,
           autoload: bool | None = None) -> tuple[dict[str, PluginInfo], dict[str, PluginInfo]]:
    """Split plugins into (loadable, excluded) by name.  Two loadable packages that register the
    same name are an error that names both; excluded ones take no part in that check."""
    found: dict[str, PluginInfo] = {}
    excluded: dict[str, PluginInfo] = {}
    for info in infos:
        if not is_allowed(info, allow, autoload):
            excluded.setdefault(info.name, info)
            continue
        if info.name in found and found[info.name].value != info.value:
            other = found[info.name]
            raise PluginError(
                f"Two packages register the plugin name '{info.name}': '{other.package}' ({other.value}) and "
                f"'{info.package}' ({info.value}). Uninstall one of them, or rename the entry point in one "
                "package's pyproject.toml (or name only one of the packages in the recipe's allow_plugins).")
        found.setdefault(info.name, info)
    for name in found:
        excluded.pop(name, None)
    return found, excluded


def check_allow_list(allow: list[str] | None, infos) -> None:
    """Every entry of a recipe's ``allow_plugins`` must name an installed plugin or a package
    that provides plugins (a misspelt entry would otherwise silently allow nothing)."""
    if not allow:
        return
    infos = list(infos)
    names = {info.name for info in infos}
    packages = {normalize_package(info.package): info.package for info in infos}
    for entry in allow:
        if entry not in names and normalize_package(entry) not in packages:
            raise RecipeError(
                f"allow_plugins names '{entry}', which is neither an installed plugin nor a package that "
                f"provides plugins.{did_you_mean(entry, [*names, *packages.values()])} Install the package, "
                "fix the spelling, or remove the entry; 'clusterkit plugins' lists plugins with their packages.")


def discover(allow: list[str] | None = None) -> dict[str, PluginInfo]:
    """The loadable plugins, by name: every installed one, or only the built-ins plus those that
    ``allow`` (or ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD``) admits; see :func:`select`."""
    return select(installed(), allow)[0]


def name_conflicts(allow: list[str] | None = None) -> tuple[dict[str, PluginInfo], dict[str, list[PluginInfo]]]:
    """For listing (``clusterkit plugins``), where a clash must not hide every plugin: the
    loadable plugins by name (a built-in wins a clash) and, for each name that several loadable
    packages register, every entry point that registers it."""
    infos = sorted((i for i in installed() if is_allowed(i, allow)), key=lambda i: not i.builtin)
    found: dict[str, PluginInfo] = {}
    clashes: dict[str, list[PluginInfo]] = {}
    for info in infos:
        first = found.setdefault(info.name, info)
        if first is not info and first.value != info.value:
            clashes.setdefault(info.name, [first]).append(info)
    return found, clashes


def hidden_plugins(allow: list[str] | None = None, strict: bool = True) -> dict[str, PluginInfo]:
    """Installed plugins that the allow-list or the autoload switch excludes (``strict=False``:
    without the duplicate-name check, for listing)."""
    if not strict:
        return {i.name: i for i in installed() if not is_allowed(i, allow)}
    return select(installed(), allow)[1]


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


def _excluded_error(info: PluginInfo, allow: list[str] | None) -> Exception:
    """Why an installed plugin that the recipe uses is not loaded, and the fix."""
    what = f"Plugin '{info.name}' (package '{info.package}' {info.version}) is installed but not loaded"
    if allow is not None:
        return RecipeError(
            f"{what}: the recipe's allow_plugins ({', '.join(allow) or 'empty'}) names neither it nor its "
            f"package, and only clusterkit's built-ins and what allow_plugins names are loaded. Add "
            f"'{info.name}' or '{info.package}' to allow_plugins, or remove '{info.name}' from the recipe's plugins.")
    return PluginError(
        f"{what}: {AUTOLOAD_ENV} is set, so third-party plugins load only when the recipe's allow_plugins "
        f"names them. Add allow_plugins: [{info.name}] to the recipe, or unset {AUTOLOAD_ENV}.")


def load_plugins(plugin_params: dict[str, dict], available: dict[str, PluginInfo] | None = None,
                 allow: list[str] | None = None):
    """Register the recipe's plugins on a fresh pluggy manager; returns (manager, {name: plugin}).

    ``available``: the plugins to choose from (default: every installed entry point);
    ``allow``: the recipe's ``allow_plugins`` (None: no list).  Both the allow-list and
    ``CLUSTERKIT_DISABLE_PLUGIN_AUTOLOAD`` apply to ``available`` as to installed plugins.
    """
    pool = installed() if available is None else list(available.values())
    check_allow_list(allow, pool)
    available, excluded = select(pool, allow)
    pm = new_manager()
    instances = {}
    for name, raw in plugin_params.items():
        if name in excluded:
            raise _excluded_error(excluded[name], allow)
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
    refuse_wrappers(pm)
    return pm, instances


def refuse_wrappers(pm: pluggy.PluginManager) -> None:
    """PluginError for a hook wrapper (``@hookimpl(wrapper=True)`` or ``hookwrapper=True``).

    clusterkit calls each implementation itself (:class:`HookDispatcher`), so that an error
    names its plugin and a stage can switch a plugin off; a wrapper would get a generator
    call instead of its hook's arguments, so it is refused when the recipe is loaded."""
    for hook in hook_names():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise PluginError(
                    f"Plugin '{impl.plugin_name}' implements hook '{hook}' as a hook wrapper (wrapper=True or "
                    "hookwrapper=True), which clusterkit does not support: the trainer calls every "
                    "implementation itself, one after the other. Make it a plain @hookimpl (use tryfirst=True "
                    "or trylast=True to run before or after the others).")


class HookDispatcher:
    """Calls the hooks of one run's plugins, in pluggy's order, the way the trainer needs.

    * Each implementation gets the arguments it names (pluggy's rule); ``state`` is always
      offered.
    * An exception raised inside a plugin carries a note naming the plugin and the hook (a
      :class:`~clusterkit.errors.ClusterkitError`, already one paragraph, passes unchanged).
    * ``inactive`` (set by the trainer at each epoch from the recipe's ``stages``): plugins
      whose :data:`STAGED_HOOKS` are not called.

    Subclasses may override :meth:`call_one` to observe single calls (``clusterkit.testing``
    records what each ``setup`` added).
    """

    def __init__(self, pm: pluggy.PluginManager, state=None):
        self.pm = pm
        self.state = state
        self.inactive: frozenset[str] = frozenset()

    def impls(self, hook: str) -> list:
        """The implementations of ``hook`` in call order (pluggy's: last registered first,
        tryfirst/trylast applied), without those of inactive plugins for a staged hook."""
        impls = list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))
        if hook in STAGED_HOOKS and self.inactive:
            return [impl for impl in impls if impl.plugin_name not in self.inactive]
        return impls

    def names(self, hook: str) -> list[str]:
        """Names of the plugins that :meth:`call` would call for ``hook``, in order."""
        return [impl.plugin_name for impl in self.impls(hook)]

    def call_one(self, impl, hook: str, kwargs: dict) -> Any:
        """Call one implementation with the arguments it asks for; errors name the plugin."""
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames])
        except ClusterkitError:  # a user's mistake, already one paragraph
            raise
        except Exception as exc:
            add_note = getattr(exc, "add_note", None)  # Python >= 3.11
            if add_note is not None:
                add_note(f"clusterkit: raised by plugin '{impl.plugin_name}' in hook '{hook}'")
            raise

    def call(self, hook: str, **kwargs) -> list[tuple[str, Any]]:
        """Every implementation of ``hook``; returns [(plugin name, result)] in call order."""
        kwargs.setdefault("state", self.state)
        return [(impl.plugin_name, self.call_one(impl, hook, kwargs)) for impl in self.impls(hook)]

    def first(self, hook: str, **kwargs) -> Any:
        """The first result that is not None (a ``firstresult`` hook: embed, predict), or None."""
        kwargs.setdefault("state", self.state)
        for impl in self.impls(hook):
            result = self.call_one(impl, hook, kwargs)
            if result is not None:
                return result
        return None


def describe(info: PluginInfo) -> dict:
    """Source, package, version, hooks and parameters of one plugin (for ``clusterkit plugins``)."""
    try:
        cls = info.load()
    except PluginError:
        return {"name": info.name, "source": info.source, "package": info.package, "version": info.version,
                "error": info.error}
    params_cls = getattr(cls, "Params", None)
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return {
        "name": info.name,
        "source": info.source,
        "package": info.package,
        "version": info.version,
        "object": info.value,
        "doc": doc,
        "hooks": implemented_hooks(cls),
        "params": field_docs(params_cls) if params_cls is not None else [],
    }
