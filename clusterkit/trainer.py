"""Where ``from clusterkit.trainer import ...`` still finds the training loop's public names.

The :class:`Trainer` and its companions live in :mod:`clusterkit.engine`; the run directory's
functions (``make_run_dir``, ``check_resumable``, ``trim_metrics_log``, ``RUN_OUTPUTS``) in
:mod:`clusterkit.rundir`.  Both are re-exported here so that older imports keep working.
"""

from __future__ import annotations

from .engine import DivergenceError, Trainer, lr_at, lr_for_step
from .plugin_manager import STAGED_HOOKS
from .rundir import RUN_OUTPUTS, check_resumable, make_run_dir, trim_metrics_log

__all__ = ["Trainer", "make_run_dir", "check_resumable", "trim_metrics_log", "RUN_OUTPUTS", "lr_at", "lr_for_step",
           "DivergenceError", "STAGED_HOOKS"]
