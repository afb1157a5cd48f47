"""One home for hook dispatch (clusterkit.plugin_manager.HookDispatcher): call order, stage
filtering, error attribution, firstresult hooks, and wrappers refused at load time."""

import pluggy
import pytest

from clusterkit import Plugin, hookimpl
from clusterkit.errors import PluginError
from clusterkit.plugin_manager import HookDispatcher, PluginInfo, load_plugins


def _load(*classes):
    available = {c.__name__.lower(): PluginInfo(c.__name__.lower(), f"tests:{c.__name__}", "(test)", "0", _cls=c)
                 for c in classes}
    return load_plugins({name: {} for name in available}, available)


class A(Plugin):
    @hookimpl
    def on_epoch_start(self, state):
        state.append("a")
        return "a"

    @hookimpl
    def embed(self, images):
        return None  # defers to the next implementation


class B(Plugin):
    @hookimpl
    def on_epoch_start(self, state):
        state.append("b")
        return "b"

    @hookimpl
    def embed(self, images):
        return images * 2


class C(Plugin):
    @hookimpl(tryfirst=True)
    def on_epoch_start(self, state):
        state.append("c")

    @hookimpl
    def after_step(self, state, cache):
        raise ValueError("boom")


def test_calls_follow_the_recipe_order_with_tryfirst_and_each_result_is_named():
    pm, _ = _load(A, B, C)
    calls = []
    hooks = HookDispatcher(pm, state=calls)
    assert hooks.call("on_epoch_start") == [("c", None), ("a", "a"), ("b", "b")]
    assert calls == ["c", "a", "b"]
    # the order pluggy itself uses
    assert hooks.names("on_epoch_start") == [i.plugin_name for i in reversed(pm.hook.on_epoch_start.get_hookimpls())]


def test_an_inactive_plugin_gets_no_staged_hook_but_keeps_embed():
    pm, _ = _load(A, B)
    hooks = HookDispatcher(pm, state=[])
    hooks.inactive = frozenset({"b"})
    assert hooks.names("on_epoch_start") == ["a"]
    assert hooks.names("embed") == ["a", "b"]  # embed and predict always run


def test_first_returns_the_first_result_that_is_not_none():
    pm, _ = _load(A, B)
    assert HookDispatcher(pm, state=None).first("embed", images=3) == 6


def test_an_error_inside_a_plugin_names_the_plugin_and_hook():
    pm, _ = _load(C)
    with pytest.raises(ValueError, match="boom") as info:
        HookDispatcher(pm, state=None).call("after_step", cache=None)
    assert "raised by plugin 'c' in hook 'after_step'" in "".join(info.value.__notes__)


class NewStyleWrapper(Plugin):
    @hookimpl(wrapper=True)
    def compute_losses(self, state, cache):
        result = yield
        return result


class OldStyleWrapper(Plugin):
    @hookimpl(hookwrapper=True)
    def after_step(self, state, cache):
        yield


@pytest.mark.parametrize("cls, hook", [(NewStyleWrapper, "compute_losses"), (OldStyleWrapper, "after_step")])
def test_hook_wrappers_are_refused_when_the_recipe_is_loaded(cls, hook):
    with pytest.raises(PluginError) as info:
        _load(cls)
    message = " ".join(str(info.value).split())
    assert f"implements hook '{hook}' as a hook wrapper" in message and "plain @hookimpl" in message


def test_pluggy_marker_attributes_the_refusal_reads_exist():
    """The refusal reads HookImpl.hookwrapper / .wrapper: pluggy must still have them."""
    pm = pluggy.PluginManager("clusterkit")
    from clusterkit import hookspecs

    pm.add_hookspecs(hookspecs)
    pm.register(NewStyleWrapper(), name="w")
    impl = pm.hook.compute_losses.get_hookimpls()[0]
    assert impl.wrapper is True and impl.hookwrapper is False
