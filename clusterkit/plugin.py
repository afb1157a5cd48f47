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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.params!r}>"
