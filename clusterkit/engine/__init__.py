"""The training engine: the :class:`Trainer` and the parts it composes.

============================  ===========================================================
:mod:`~.engine.trainer`       the Trainer: fit = build, begin_run, the epochs, summary
:mod:`~.engine.setup`         building a run from a recipe: device, plugins, data, model,
                              optimiser, DDP (and the model ``clusterkit.load`` rebuilds)
:mod:`~.engine.step`          one optimisation step and the learning-rate schedule
:mod:`~.engine.divergence`    the non-finite stop/skip policy and its messages
:mod:`~.engine.evaluation`    embedding, prediction, evaluation metrics, baselines, collapse
:mod:`~.engine.resume`        checkpoints and resuming from one
:mod:`~.engine.reporting`     progress, ETA, metrics.jsonl, summary.json
============================  ===========================================================
"""

from .divergence import DivergenceError
from .step import lr_at, lr_for_step
from .trainer import Trainer

__all__ = ["Trainer", "DivergenceError", "lr_at", "lr_for_step"]
