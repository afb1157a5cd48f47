"""Evaluation with recalibrated BatchNorm statistics (AdaBN / precise-BN).

A network's BatchNorm running statistics are an exponential average over training batches
of augmented views.  At evaluation the inputs are un-augmented images, whose activations can
have other statistics; early in training, or with an initialisation whose running averages
lag behind the weights, the running statistics may not describe them at all.
``recalibrated_batchnorm`` re-estimates every BatchNorm layer's mean and variance on the
evaluation images themselves, then restores the training statistics when it exits, so
training is untouched and only what is embedded inside the ``with`` block changes
(``eval.bn: recalibrate``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed

__all__ = ["recalibrated_batchnorm"]


@contextlib.contextmanager
def recalibrated_batchnorm(model: nn.Module, forward: Callable[[torch.Tensor], object],
                           batches: Iterable[torch.Tensor]) -> Iterator[int]:
    """Inside the block, every BatchNorm layer of ``model`` that tracks running statistics holds
    the mean and (unbiased) variance of its inputs over ``batches``, averaged with equal weight
    per batch (``momentum=None``); on exit the previous statistics and modes come back.

    ``forward(x)`` runs the part of the model whose statistics matter (e.g. the ``embed`` hook)
    on one batch ``x``; it is called under ``torch.no_grad()`` with the BatchNorm layers in
    training mode and every other module as it was.  Under torch.distributed the statistics are
    averaged over the processes.  Yields the number of layers recalibrated.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        with torch.no_grad():
            for x in batches:
                forward(x)
        for m in layers:
            m.eval()
            distributed.all_reduce(m.running_mean, "mean")  # in place; nothing in one process
            distributed.all_reduce(m.running_var, "mean")
        yield len(layers)
    finally:
        for m, (mean, var, tracked, momentum, training) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
            m.momentum = momentum
            m.train(training)
