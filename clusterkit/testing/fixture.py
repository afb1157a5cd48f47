"""The pytest side of the testing helpers: :class:`PluginTester` and the ``plugin_tester``
fixture (``pytest_plugins = ["clusterkit.testing"]`` in a ``conftest.py`` registers it).

(PYTEST_DONT_REWRITE: see :mod:`clusterkit.testing`.)
"""

from __future__ import annotations

from pathlib import Path

from .checks import StepReport, check_losses
from .roundtrip import check_checkpoint_roundtrip
from .tiny import train_tiny

__all__ = ["PluginTester"]


class PluginTester:
    """The helpers of :mod:`clusterkit.testing`, each run writing into a fresh folder under
    ``root`` (the fixture's ``tmp_path``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._n = 0

    def _dir(self) -> Path:
        self._n += 1
        return self.root / f"run_{self._n}"

    def train(self, plugin, params=None, **kwargs) -> dict:
        """:func:`~clusterkit.testing.train_tiny` in a fresh folder."""
        return train_tiny(plugin, params, run_dir=self._dir(), **kwargs)

    def check_losses(self, plugin, params=None, **kwargs) -> StepReport:
        """:func:`~clusterkit.testing.check_losses` in a fresh folder."""
        return check_losses(plugin, params, run_dir=self._dir(), **kwargs)

    def check_checkpoint_roundtrip(self, plugin, params=None, **kwargs) -> dict:
        """:func:`~clusterkit.testing.check_checkpoint_roundtrip` in a fresh folder."""
        return check_checkpoint_roundtrip(plugin, params, run_dir=self._dir(), **kwargs)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def plugin_tester(tmp_path) -> PluginTester:
        """clusterkit's plugin testing helpers, writing under the test's ``tmp_path``."""
        return PluginTester(tmp_path)
