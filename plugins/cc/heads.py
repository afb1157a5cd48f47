"""CC's two heads on the shared backbone (Li et al., AAAI 2021, "Pair Construction Backbone",
"Instance-level Contrastive Head", "Cluster-level Contrastive Head").

For view v of the step, with h = ``cache["h", v]`` the pooled backbone features (B, d):

    z = norm( W2 ReLU(W1 h) )          instance head g_I: Linear(d, d) - ReLU - Linear(d, 128)
    c = softmax( V2 ReLU(V1 h) )       cluster head g_C:  Linear(d, d) - ReLU - Linear(d, K)

Step outputs it provides:
    ``z``  (B, instance_dim) L2-normalised instance projection (rows have norm 1)
    ``c``  (B, K) cluster probabilities (rows sum to 1)

Modules it adds to ``state.model``: ``instance_head`` and ``cluster_head``.  The
cluster head module returns the K *logits*; the softmax is applied when the step
output ``c`` (and the prediction) is computed, so a loss that wants logits can call
``state.model["cluster_head"]`` itself.  No BatchNorm, as the official heads.

Features are read only through ``cache["h", v]`` (the core's default is the backbone
on the view; a plugin such as PICI's masked ViT may replace it), never by calling the
backbone on the views here.

Evaluation (official ``forward_cluster``): ``embed`` returns the backbone's pooled
features of the (resized, unaugmented) evaluation images, and ``predict`` runs the
cluster head on them: label = argmax_k c_k, confidence = max_k c_k.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from clusterkit import Plugin, Prediction, hookimpl
from clusterkit.errors import PluginError
from clusterkit.schema import positive

INSTANCE_HEAD = "instance_head"
CLUSTER_HEAD = "cluster_head"


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden) - ReLU - Linear(hidden, out), torch's default initialisation (the official heads)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def instance_projection(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """z = norm(g_I(h)): (B, d) -> (B, instance_dim), rows of unit L2 norm."""
    return F.normalize(head(h), dim=1)


def cluster_probabilities(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """c = softmax(g_C(h)): (B, d) -> (B, K), rows summing to 1 (computed in float32)."""
    return torch.softmax(head(h).float(), dim=1)


class ContrastiveHeads(Plugin):
    """CC's instance head (z) and cluster head (c) on the backbone features h; predicts by the cluster head."""

    @attrs.define
    class Params:
        instance_dim: int = attrs.field(default=128, validator=positive, metadata={
            "doc": "dimension of the instance projection z (official feature_dim: 128)"})
        hidden_dim: int | None = attrs.field(default=None, validator=positive, metadata={
            "doc": "hidden width of both heads; null: the backbone's feature dimension d (official)"})

    @hookimpl
    def setup(self, state):
        p, m = self.params, state.model
        dim = m["backbone"].num_features
        hidden = dim if p.hidden_dim is None else p.hidden_dim
        m[INSTANCE_HEAD] = mlp(dim, hidden, p.instance_dim)
        m[CLUSTER_HEAD] = mlp(dim, hidden, state.num_clusters)

    @hookimpl
    def register_outputs(self, state):
        model = state.model

        def z(cache, v):
            return instance_projection(model[INSTANCE_HEAD], cache["h", v])

        def c(cache, v):
            return cluster_probabilities(model[CLUSTER_HEAD], cache["h", v])

        return {"z": z, "c": c}

    @hookimpl
    def embed(self, state, images):
        return state.model["backbone"](images)

    @hookimpl
    def predict(self, state, features):
        head = state.model[CLUSTER_HEAD]
        expected = head[0].in_features
        if features.dim() != 2 or features.shape[1] != expected:
            raise PluginError(
                f"contrastive_heads predicts with its cluster head, which takes {expected}-d backbone features, "
                f"but the evaluation features have shape {tuple(features.shape)}: another plugin listed before "
                "contrastive_heads answers the embed hook. List contrastive_heads first under plugins:, or remove "
                "the plugin whose embed returns other features.")
        with torch.no_grad():
            probs = cluster_probabilities(head, features.to(head[0].weight.dtype))
        confidence, labels = probs.max(dim=1)
        return Prediction(labels, confidence)
