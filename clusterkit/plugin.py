"""The base class of clusterkit plugins.

A plugin is a class with a nested attrs ``Params`` class (its recipe parameters,
validated with types, ranges and did-you-mean on unknown keys) and methods marked
with :data:`hookimpl`.  It is published through the ``clusterkit.plugins``
entry-point group; the entry-point name is the name recipes use::

    [project.entry-points."clusterkit.plugins"]
    my_loss = "my_package.plugin:MyLoss"

    class MyLoss(Plugin):
        @attrs.define
        class Params:
            weight: float = attrs.field(default=1.0, validator=non_negative)

        @hookimpl
        def compute_losses(self, state, cache):
            return {"my_loss": self.params.weight * ...}
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from .hookspecs import hookimpl

__all__ = ["Plugin", "hookimpl"]


@attrs.define
class NoParams:
    """A plugin without parameters."""


class Plugin:
    """Base class: stores validated ``params``; the manager sets ``name``."""

    Params: ClassVar[type] = NoParams
    name: str = ""

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    # -- helpers for common parameters --------------------------------------------------------
    def seed(self, state) -> int:
        """The plugin's own ``seed`` parameter, or the run's ``run.seed`` when it is null or absent."""
        own = getattr(self.params, "seed", None)
        return state.recipe.run.seed if own is None else own

    def warmup_gated(self, state) -> bool:
        """True while the plugin's ``warmup_gate`` parameter holds its loss (or noise) off: during
        the first ``schedule.warmup_epochs`` epochs (False without such a parameter)."""
        return bool(getattr(self.params, "warmup_gate", False)) and state.in_warmup

    # -- checkpointed state ---------------------------------------------------------------------
    # A plugin's state lives in one of two places, both saved in every checkpoint and restored
    # by --resume and by clusterkit.load:
    #   * network modules (trained weights, an EMA target): modules in ``state.model`` (added in
    #     ``setup``);
    #   * everything else it must keep (a memory bank, group features, counters, per-sample
    #     labels, the centres its prediction rule fitted): attributes of the plugin, returned by
    #     ``state_dict`` and given back to ``load_state_dict`` (torch.save-able values, tensors on
    #     the CPU; the plugin keeps its working copies on ``state.device``).  Plain attributes not
    #     covered by either are lost on resume (``clusterkit.testing.check_checkpoint_roundtrip``
    #     finds them).

    def state_dict(self) -> dict:
        """The plugin's checkpointed state outside ``state.model`` (default: none)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (called before training resumes, or when a
        finished run is loaded for prediction)."""
        if state_dict:
            raise TypeError(f"plugin {self.name!r} was given checkpointed state {sorted(state_dict)} but does not "
                            "define load_state_dict")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.params!r}>"
