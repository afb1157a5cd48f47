"""The training engine: the :class:`Trainer` and the parts it composes.

* :mod:`~clusterkit.engine.trainer`: the Trainer (fit = build, begin_run, the epochs' begin_epoch,
  train_step and end_epoch, summary);
* :mod:`~clusterkit.engine.setup`: building a run from a recipe (device, plugins, data, model,
  optimiser, DDP), and the model ``clusterkit.load`` rebuilds;
* :mod:`~clusterkit.engine.step`: one optimisation step and the learning-rate schedule;
* :mod:`~clusterkit.engine.divergence`: the non-finite stop/skip policy and its messages;
* :mod:`~clusterkit.engine.evaluation`: embedding, prediction, metrics, baselines, collapse records;
* :mod:`~clusterkit.engine.resume`: checkpoints and resuming from one;
* :mod:`~clusterkit.engine.reporting`: progress, ETA, metrics.jsonl, summary.json.
"""

from .divergence import DivergenceError
from .step import lr_at, lr_for_step
from .trainer import Trainer

__all__ = ["Trainer", "DivergenceError", "lr_at", "lr_for_step"]
