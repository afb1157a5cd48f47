"""Tests of clusterkit.cluster.metrics on hand-computed cases."""

import numpy as np
import pytest
import torch

from clusterkit.cluster import cluster_acc, cluster_metrics, hungarian_match


def test_perfect_labelling_with_permuted_ids():
    y = [0, 0, 1, 1, 2, 2, 2]
    p = [2, 2, 0, 0, 1, 1, 1]
    m = cluster_metrics(y, p)
    assert m == {"nmi": pytest.approx(1.0), "acc": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    assert hungarian_match(y, p) == {2: 0, 0: 1, 1: 2}


def test_hand_example():
    # classes:  0 0 0 0 1 1 1 2 2 2
    # clusters: 1 1 1 0 0 0 2 2 2 2
    # table (cluster x class): c0 -> {0:1, 1:2}, c1 -> {0:3}, c2 -> {1:1, 2:3}
    # best matching: c1->0 (3), c0->1 (2), c2->2 (3) = 8 of 10
    y = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    p = [1, 1, 1, 0, 0, 0, 2, 2, 2, 2]
    assert cluster_acc(y, p) == pytest.approx(0.8)
    assert hungarian_match(y, p) == {1: 0, 0: 1, 2: 2}


def test_hungarian_beats_majority_vote():
    # Majority vote would map both clusters to class 0; one-to-one matching must not.
    # table: c0 -> {0:3, 1:2}, c1 -> {0:4, 1:1}; options: c0->0,c1->1 = 4, c0->1,c1->0 = 6
    y = [0, 0, 0, 1, 1, 0, 0, 0, 0, 1]
    p = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert cluster_acc(y, p) == pytest.approx(0.6)
    assert hungarian_match(y, p) == {0: 1, 1: 0}


def test_more_clusters_than_classes():
    # 2 classes, 4 clusters: class 0 split into clusters 0 (3) and 1 (2),
    # class 1 split into clusters 2 (4) and 3 (1).
    # Only two clusters can be matched: c0->0 (3) and c2->1 (4) -> ACC = 7/10.
    y = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    p = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert cluster_acc(y, p) == pytest.approx(0.7)
    assert hungarian_match(y, p) == {0: 0, 1: -1, 2: 1, 3: -1}
    m = cluster_metrics(y, p)
    assert m["acc"] == pytest.approx(0.7)
    assert 0 < m["nmi"] < 1 and 0 < m["ari"] < 1


def test_fewer_clusters_than_classes():
    # 3 classes, 2 clusters: cluster 0 = all of class 0 (4) + class 2 (1),
    # cluster 1 = class 1 (3) + class 2 (2). Best: c0->0 (4), c1->1 (3) -> 7/10.
    y = [0, 0, 0, 0, 2, 1, 1, 1, 2, 2]
    p = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert cluster_acc(y, p) == pytest.approx(0.7)
    assert hungarian_match(y, p) == {0: 0, 1: 1}


def test_single_cluster():
    y = [0, 0, 1, 1, 1, 2]
    assert cluster_acc(y, [7] * 6) == pytest.approx(0.5)
    m = cluster_metrics(y, [7] * 6)
    assert m["nmi"] == pytest.approx(0.0) and m["ari"] == pytest.approx(0.0)


def test_non_contiguous_ids():
    y = np.array([5, 5, 9, 9, 9, 5])
    p = np.array([40, 40, -3, -3, 40, 40])
    # table: c-3 -> {9:2}, c40 -> {5:3, 9:1}; matching -3->9, 40->5 = 5/6
    assert cluster_acc(y, p) == pytest.approx(5 / 6)
    assert hungarian_match(y, p) == {-3: 9, 40: 5}
    relabelled = cluster_metrics([0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1])
    assert cluster_metrics(y, p) == pytest.approx(relabelled)


def test_matches_sklearn_on_random_labels():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.7, (y + 2) % 5, rng.integers(0, 6, 300))
    m = cluster_metrics(y, p)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, p, average_method="arithmetic"))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, p))
    # brute force over all one-to-one maps of the 6 clusters onto 5 classes (+ one unmatched)
    from itertools import permutations

    best = max(sum(np.sum((p == c) & (y == t)) for c, t in zip(perm, range(5), strict=True))
               for perm in permutations(range(6), 5))
    assert m["acc"] == pytest.approx(best / 300)


def test_torch_and_list_inputs():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([1, 1, 0, 0, 0, 2])
    expected = cluster_metrics(y.tolist(), p.numpy())
    assert cluster_metrics(y, p) == pytest.approx(expected)
    assert cluster_acc(y, p) == pytest.approx(5 / 6)
    assert cluster_acc(y.float(), p) == pytest.approx(5 / 6)
    if torch.cuda.is_available():
        assert cluster_acc(y.cuda(), p.cuda()) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "y,p,match",
    [
        ([0, 1, 2], [0, 1], "length"),
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], "1-D"),
        ([], [], "empty"),
        ([0.5, 1.0], [0, 1], "integer"),
        (["a", "b"], [0, 1], "integer"),
    ],
)
def test_errors(y, p, match):
    with pytest.raises(ValueError, match=match):
        cluster_acc(y, p)
    with pytest.raises(ValueError, match=match):
        cluster_metrics(y, p)
