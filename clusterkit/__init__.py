"""clusterkit: a plugin framework for contrastive deep clustering.

The core runs an EM training loop and calls pluggy hooks (see
:mod:`clusterkit.hookspecs`); methods (ProPos, DigPro, ...) are plugins found through
the ``clusterkit.plugins`` entry-point group; YAML recipes combine them over timm
backbones.  Start with ``clusterkit run recipes/quickstart.yaml``.
"""

__version__ = "0.1.0"

from . import distributed  # noqa: E402,F401
from .hookspecs import hookimpl  # noqa: E402
from .models import backbones as _backbones  # noqa: E402,F401  (registers resnet18_cifar & co in timm)
from .plugin import Plugin  # noqa: E402
from .state import DIRECTIONS, ParamGroup, Prediction, StepCache, TrainState  # noqa: E402

__all__ = ["__version__", "hookimpl", "Plugin", "DIRECTIONS", "ParamGroup", "Prediction", "StepCache", "TrainState",
           "load"]


def __getattr__(name):
    """``clusterkit.load(run_dir)`` (see :mod:`clusterkit.inference`), imported on first use."""
    if name == "load":
        from .inference import load

        return load
    raise AttributeError(f"module 'clusterkit' has no attribute {name!r}")
