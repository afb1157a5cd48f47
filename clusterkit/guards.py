"""Guards against silent failure: signs that a clustering has collapsed.

A collapsed run still prints numbers; these checks make it say so.
"""

from __future__ import annotations

import math

import torch

__all__ = ["collapse_report"]


def collapse_report(features: torch.Tensor | None, labels: torch.Tensor, k: int, share_limit: float = 0.9,
                    std_ratio: float = 0.1) -> dict:
    """Signs of a collapsed clustering: the largest cluster's share and the spread of the features.

    ``collapse_share`` is the fraction of the samples in the most populated of the ``k``
    clusters.  ``feature_std`` is the mean over dimensions of the per-dimension std of the
    L2-normalised features (lightly's measure): about ``1/sqrt(D)`` for features spread over
    the sphere, 0 when every sample maps to the same point (``None`` without ``features``).
    ``warnings`` lists ``(kind, value)`` for each sign past its limit: ``("cluster_share", share)``
    when ``share > share_limit``, ``("feature_std", std)`` when ``std < std_ratio / sqrt(D)``.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    counts = torch.bincount(labels[labels >= 0], minlength=k)
    share = counts.max().item() / max(labels.numel(), 1) if labels.numel() else 0.0
    warnings = [("cluster_share", share)] if share > share_limit else []
    std = None
    if features is not None:
        feats = torch.nn.functional.normalize(features.detach().float().reshape(len(features), -1), dim=1)
        std = feats.std(dim=0).mean().item() if len(feats) > 1 else 0.0
        if std < std_ratio / math.sqrt(feats.shape[1]):
            warnings.append(("feature_std", std))
    return {"collapse_share": share, "feature_std": std, "warnings": warnings}
