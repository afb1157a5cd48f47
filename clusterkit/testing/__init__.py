"""Testing helpers for plugin authors: a tiny training loop, loss and gradient checks, a
checkpoint round-trip and a distributed equivalence check.

Each helper takes the plugin as its class (``MyLoss``) or as the name it is installed under
(``"my_loss"``, proving the entry point too), its parameters as a dict, and the plugins it
needs as ``with_plugins`` (installed names; they come first in the recipe, so their
``setup`` runs before the plugin's)::

    from clusterkit.testing import train_tiny, check_losses, check_checkpoint_roundtrip

    def test_my_loss_trains():
        summary = train_tiny(MyLoss, {"weight": 0.5})
        assert summary["steps"] == 4

    def test_my_loss_has_gradients():
        report = check_losses(MyLoss)                 # raises PluginCheckError with the reason
        assert set(report.terms) == {"my_loss"}

    def test_my_loss_resumes_exactly():
        check_checkpoint_roundtrip(MyLoss)

The data is a small synthetic set built in memory (:func:`synthetic_dataset`: 256 grey
8x8 images of ``e_step.k`` patterns), or scikit-learn's digits with ``data="digits"``; the
backbone is a narrow CIFAR ResNet-18, on the CPU.  A test runs in a second or two.

With ``pytest_plugins = ["clusterkit.testing"]`` in a ``conftest.py``, the fixture
``plugin_tester`` gives the same helpers writing into the test's ``tmp_path``.

:func:`check_distributed_equivalence` runs a plugin set in one process on a global batch and in
two gloo processes under DDP on its shards, and checks that loss values, gradients and model
state agree to 1e-5 (a contrastive loss on the local batch only fails it).

The modules: :mod:`~clusterkit.testing.tiny` (the tiny recipe, data and trainer, ``train_tiny``),
:mod:`~clusterkit.testing.checks` (``check_losses``), :mod:`~clusterkit.testing.roundtrip`,
:mod:`~clusterkit.testing.distributed` and :mod:`~clusterkit.testing.fixture`.

(PYTEST_DONT_REWRITE: the helpers raise PluginCheckError themselves and use no ``assert``, so
pytest need not rewrite this package, nor warn when it was imported before ``pytest_plugins``.)
"""

from .checks import StepReport, check_losses
from .distributed import check_distributed_equivalence
from .fixture import PluginTester
from .roundtrip import check_checkpoint_roundtrip
from .tiny import (
    DIGITS,
    SYNTHETIC_INFO,
    TINY_RECIPE,
    PluginCheckError,
    TinyTrainer,
    make_trainer,
    synthetic_dataset,
    tiny_recipe,
    train_tiny,
)

try:
    from .fixture import plugin_tester  # noqa: F401 - the pytest fixture, registered by pytest_plugins
except ImportError:  # pragma: no cover - without pytest there is no fixture
    pass

__all__ = ["PluginCheckError", "StepReport", "TINY_RECIPE", "DIGITS", "SYNTHETIC_INFO", "synthetic_dataset",
           "tiny_recipe", "TinyTrainer", "make_trainer", "train_tiny", "check_losses", "check_checkpoint_roundtrip",
           "check_distributed_equivalence", "PluginTester"]
