"""Alignment and uniformity on the hypersphere (Wang & Isola, ICML 2020) as a clusterkit plugin.

The plugin is ``align_uniform`` in a recipe's ``plugins:``; the losses are plain functions.
"""

from .align_uniform import AlignUniform, align_loss, uniform_loss

__version__ = "0.1.0"
__all__ = ["AlignUniform", "align_loss", "uniform_loss"]
