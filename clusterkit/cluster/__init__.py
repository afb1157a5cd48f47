"""Clustering on features: torch k-means and evaluation metrics."""

from clusterkit.cluster.kmeans import KMeansPredictor, KMeansResult, assign, kmeans, pairwise_scores
from clusterkit.cluster.metrics import cluster_acc, cluster_metrics, hungarian_match
from clusterkit.cluster.quality import QUALITY_KEYS, quality_metrics

__all__ = [
    "QUALITY_KEYS",
    "KMeansPredictor",
    "KMeansResult",
    "assign",
    "cluster_acc",
    "cluster_metrics",
    "hungarian_match",
    "kmeans",
    "pairwise_scores",
    "quality_metrics",
]
