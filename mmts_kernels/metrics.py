"""Retrieval metrics: R@K, median / mean rank, and mAP / nDCG with graded relevance (EPIC-KITCHENS-100 MIR).

One direction at a time: queries retrieve candidates (call again with the roles swapped for the other direction).
Scores are either given as a dense [Q, C] matrix (``scores=``) or computed from embeddings, a chunk of queries at a
time, as ``S = queries[chunk] · candidatesᵀ`` (fp32, fp64 for fp64 inputs). Relevance, too, is produced a chunk at a
time, from compact per-item class descriptors or from a user function. So a 100k × 100k evaluation never holds an
N × N matrix: memory is O(chunk_size · C).

Definitions (i: a query, t_i: its positive candidate, s_ij: scores, rel(i, j) ≥ 0: graded relevance)

    rank_i  = 1 + #{ j ≠ t_i : s_ij ≥ s_{i,t_i} }
              Ties never help the query: a candidate that scores exactly as the positive is ranked ahead of it.
    R@K     = mean_i [rank_i ≤ K];   median rank and mean rank over the queries.

    Ranked list of query i: candidates by descending score; ties are again broken against the query — within a
    group of equal scores the less relevant candidates come first (the worst order of the group).

    mAP     as in the EK-100 evaluation code: candidate j is relevant to query i when rel(i, j) ≥
            ``relevant_threshold`` (default 1: a full match, relevance lies in [0, 1] there), and
                AP_i = (1 / |R_i|) Σ_{k : c_(k) ∈ R_i} (Σ_{l ≤ k} rel(i, c_(l))) / k ,
            i.e. the precision at k counts the graded relevance of the first k candidates (with binary relevance
            this is the usual average precision). mAP = mean of AP_i over queries with at least one relevant item.
    nDCG    as in EK-100: k_i = #{ j : rel(i, j) > 0 },
                DCG_i = Σ_{k=1}^{k_i} rel(i, c_(k)) / log2(k + 1),
            IDCG_i the same for the candidates sorted by relevance (the ideal list), nDCG_i = DCG_i / IDCG_i, and
            nDCG = the mean over queries with k_i > 0.

    EK-100 relevance between two items (``class_overlap_relevance``): the mean over parts of speech (verb classes,
    noun classes) of the IoU of the two items' class sets, so 1 for the same verb and nouns, 0.5 for a shared verb
    with disjoint nouns, etc.

Inputs are validated first; errors are ValueError / TypeError naming the argument. Scores must be finite.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = [
    "ranks",
    "recall_at_k",
    "retrieval_metrics",
    "class_overlap_relevance",
    "map_ndcg",
    "mean_average_precision",
    "ndcg",
]

# Elements of one [chunk, C] block: ~16M for the rank pass, ~2M for the sort-based mAP / nDCG pass (which holds a
# handful of fp64 / int64 blocks: scores, relevance, sort indices, cumulative gains).
_RANK_BLOCK = 1 << 24
_SORT_BLOCK = 1 << 21

Relevance = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Ranks and recall

def ranks(queries: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
          targets: Optional[torch.Tensor] = None, *, scores: Optional[torch.Tensor] = None,
          chunk_size: Optional[int] = None) -> torch.Tensor:
    """Rank of each query's positive among all candidates, [Q] int64, 1 = best (ties count against the query).

    Give ``queries`` [Q, D] and ``candidates`` [C, D] (scores are their dot products), or a dense ``scores`` [Q, C].
    ``targets`` [Q]: the positive candidate of each query; default ``arange(Q)`` (needs Q == C).
    ``chunk_size``: queries per block (default: blocks of about 16M scores).
    """
    source = _ScoreSource(queries, candidates, scores)
    tgt = _targets(targets, source.Q, source.C).to(source.device)
    chunk = _chunk(chunk_size, source.C, _RANK_BLOCK)
    out = torch.empty(source.Q, dtype=torch.int64, device=source.device)
    for rows, block in source.blocks(chunk):
        pos = block.gather(1, tgt[rows].view(-1, 1))
        # The positive always satisfies s ≥ s_pos, so it counts itself: rank = #{j : s_ij ≥ s_pos}.
        out[rows] = (block >= pos).sum(dim=1)
    return out


def recall_at_k(rank: torch.Tensor, k: int) -> float:
    """Fraction of queries whose positive has rank ≤ k (ranks from ``ranks``)."""
    _check_rank_vector(rank)
    _check_positive_int(k, "k")
    return float((rank <= k).double().mean()) if rank.numel() else math.nan


def retrieval_metrics(queries: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
                      targets: Optional[torch.Tensor] = None, *, scores: Optional[torch.Tensor] = None,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: Optional[int] = None) -> Dict[str, float]:
    """``{"R@1": …, "R@5": …, "R@10": …, "median_rank": …, "mean_rank": …}`` (recalls as fractions in [0, 1]).

    Arguments as in ``ranks``; ``ks`` the cut-offs of the recalls. The median of an even count is the mean of the
    two middle ranks.
    """
    if isinstance(ks, int) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a sequence of positive ints, got {ks!r}")
    r = ranks(queries, candidates, targets, scores=scores, chunk_size=chunk_size)
    return _summarize(r, ks)


def _summarize(r: torch.Tensor, ks: Sequence[int]) -> Dict[str, float]:
    out = {f"R@{k}": recall_at_k(r, k) for k in ks}
    rd = r.double()
    out["median_rank"] = float(rd.quantile(0.5)) if r.numel() else math.nan
    out["mean_rank"] = float(rd.mean()) if r.numel() else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# Relevance from class sets (EK-100)

def class_overlap_relevance(query_classes, candidate_classes) -> Relevance:
    """EK-100 relevance from per-item class sets, as a chunk function ``relevance(query_rows) -> [q, C]``.

    Each of ``query_classes`` / ``candidate_classes`` is one *field* or a tuple of fields (e.g. ``(verbs, nouns)``),
    the same number on both sides. A field describes every item's class set, as
      - an int tensor [N]: one class per item,
      - an int tensor [N, K]: up to K classes per item, negative entries are padding,
      - a list of N iterables of ints (sets of any size).
    rel(i, j) = the mean over fields of |A_i ∩ B_j| / |A_i ∪ B_j| (0 when both sets are empty).
    Only the compact [N, K] descriptors are stored; each call builds one [q, C] block.
    """
    q_fields = _fields(query_classes, "query_classes")
    c_fields = _fields(candidate_classes, "candidate_classes")
    if len(q_fields) != len(c_fields):
        raise ValueError(f"query_classes has {len(q_fields)} fields but candidate_classes has {len(c_fields)}")
    q_sets = [_class_sets(f, "query_classes") for f in q_fields]
    c_sets = [_class_sets(f, "candidate_classes") for f in c_fields]
    for name, sets in (("query_classes", q_sets), ("candidate_classes", c_sets)):
        if len({s.shape[0] for s in sets}) != 1:
            raise ValueError(f"{name}: every field must describe the same number of items, "
                             f"got {[s.shape[0] for s in sets]}")
    n_queries, n_candidates = q_sets[0].shape[0], c_sets[0].shape[0]

    def relevance(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(q_sets[0].device)
        total = torch.zeros(rows.numel(), n_candidates, dtype=torch.float64, device=rows.device)
        for qs, cs in zip(q_sets, c_sets):
            total += _iou(qs[rows], cs.to(rows.device))
        return total / len(q_sets)

    relevance.num_queries = n_queries  # checked against the scores by map_ndcg
    relevance.num_candidates = n_candidates
    return relevance


def _fields(classes, name: str) -> list:
    if isinstance(classes, tuple):
        if not classes:
            raise ValueError(f"{name} must not be an empty tuple")
        return list(classes)
    return [classes]


def _class_sets(field, name: str) -> torch.Tensor:
    """[N, K] int64: each row's distinct class ids (descending), then -1 padding."""
    if isinstance(field, torch.Tensor):
        if field.dtype.is_floating_point or field.dtype.is_complex or field.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class ids, got dtype {field.dtype}")
        if field.dim() == 1:
            field = field.view(-1, 1)
        if field.dim() != 2:
            raise ValueError(f"{name} must be [N] or [N, K], got shape {tuple(field.shape)}")
        sets = field.to(torch.int64).clone()
    elif isinstance(field, (list, tuple)):
        try:
            rows = [sorted({int(c) for c in item}) if _iterable(item) else [int(item)] for item in field]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a list of iterables of ints: {exc}") from None
        if any(c < 0 for r in rows for c in r):
            raise ValueError(f"{name}: class ids must be >= 0")
        width = max((len(r) for r in rows), default=0) or 1
        sets = torch.full((len(rows), width), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            sets[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be an int tensor or a list of class sets, got {type(field).__name__}")
    sets[sets < 0] = -1
    sets, _ = sets.sort(dim=1, descending=True)  # valid ids first, padding last
    dup = torch.zeros_like(sets, dtype=torch.bool)
    dup[:, 1:] = sets[:, 1:] == sets[:, :-1]
    return sets.masked_fill(dup, -1).sort(dim=1, descending=True).values


def _iterable(item) -> bool:
    return isinstance(item, (list, tuple, set, frozenset, range)) or (
        isinstance(item, torch.Tensor) and item.dim() > 0)


def _iou(qs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """[q, C] IoU of the class sets of q query rows and C candidate rows (padding: -1, never matches)."""
    inter = torch.zeros(qs.shape[0], cs.shape[0], dtype=torch.float64, device=qs.device)
    for a in range(qs.shape[1]):
        qa = qs[:, a]
        if not bool((qa >= 0).any()):
            continue
        for b in range(cs.shape[1]):
            inter += ((qa.view(-1, 1) == cs[:, b].view(1, -1)) & (qa >= 0).view(-1, 1)).double()
    size_q = (qs >= 0).sum(dim=1).double().view(-1, 1)
    size_c = (cs >= 0).sum(dim=1).double().view(1, -1)
    union = size_q + size_c - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros((), dtype=torch.float64,
                                                                          device=qs.device))


# ---------------------------------------------------------------------------------------------------------------
# mAP and nDCG

def map_ndcg(queries: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None, *,
             relevance: Optional[Relevance] = None, query_classes=None, candidate_classes=None,
             scores: Optional[torch.Tensor] = None, relevant_threshold: float = 1.0,
             chunk_size: Optional[int] = None) -> Dict[str, float]:
    """``{"mAP": …, "nDCG": …}`` with graded relevance, EK-100 definitions (see the module docstring).

    Scores: ``queries`` [Q, D] and ``candidates`` [C, D], or a dense ``scores`` [Q, C].
    Relevance: either ``relevance``, a function ``relevance(query_rows: int64 [q]) -> [q, C]`` of non-negative
    values, or ``query_classes`` and ``candidate_classes`` (see ``class_overlap_relevance``).
    ``relevant_threshold``: the relevance at which a candidate counts as relevant for mAP (EK-100: 1).
    Queries without any relevant candidate are left out of the mean (nan when no query has one).
    """
    source = _ScoreSource(queries, candidates, scores)
    rel_fn = _relevance_fn(relevance, query_classes, candidate_classes, source)
    if isinstance(relevant_threshold, bool) or not isinstance(relevant_threshold, (int, float)) or not (
            math.isfinite(relevant_threshold) and relevant_threshold > 0):
        raise ValueError(f"relevant_threshold must be a finite number > 0, got {relevant_threshold!r}")
    chunk = _chunk(chunk_size, source.C, _SORT_BLOCK)
    positions = torch.arange(1, source.C + 1, dtype=torch.float64, device=source.device)
    discount = 1.0 / torch.log2(positions + 1.0)
    ap_sum, ap_count, ndcg_sum, ndcg_count = 0.0, 0, 0.0, 0
    for rows, block in source.blocks(chunk):
        rel = rel_fn(rows)
        if not isinstance(rel, torch.Tensor):
            raise TypeError(f"relevance must return a tensor, got {type(rel).__name__}")
        if tuple(rel.shape) != tuple(block.shape):
            raise ValueError(f"relevance returned shape {tuple(rel.shape)} for {rows.numel()} queries; "
                             f"expected {tuple(block.shape)}")
        rel = rel.to(device=block.device, dtype=torch.float64)
        if not bool(torch.isfinite(rel).all()) or bool((rel < 0).any()):
            raise ValueError("relevance must return finite values >= 0")
        ranked_rel = _ranked_relevance(block, rel)
        # mAP: precision at k with graded gains, summed at the relevant positions.
        relevant = ranked_rel >= relevant_threshold
        n_rel = relevant.sum(dim=1)
        precision = ranked_rel.cumsum(dim=1) / positions
        ap = (precision * relevant).sum(dim=1)
        has = n_rel > 0
        ap_sum += float((ap[has] / n_rel[has]).sum())
        ap_count += int(has.sum())
        # nDCG: DCG of the first k_i positions (k_i = number of candidates with relevance > 0) over the ideal.
        k_i = (rel > 0).sum(dim=1, keepdim=True)
        window = positions.view(1, -1) <= k_i
        dcg = (ranked_rel * discount * window).sum(dim=1)
        idcg = (_ideal_relevance(rel, int(k_i.max())) * discount * window).sum(dim=1)
        ok = k_i.view(-1) > 0
        ndcg_sum += float((dcg[ok] / idcg[ok]).sum())
        ndcg_count += int(ok.sum())
    return {"mAP": ap_sum / ap_count if ap_count else math.nan,
            "nDCG": ndcg_sum / ndcg_count if ndcg_count else math.nan}


def mean_average_precision(*args, **kwargs) -> float:
    """``map_ndcg(...)["mAP"]``."""
    return map_ndcg(*args, **kwargs)["mAP"]


def ndcg(*args, **kwargs) -> float:
    """``map_ndcg(...)["nDCG"]``."""
    return map_ndcg(*args, **kwargs)["nDCG"]


def _ranked_relevance(block: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Relevance in ranked order: scores descending, ties broken by ascending relevance (against the query)."""
    values, order = block.sort(dim=1, descending=True)
    ranked = rel.gather(1, order)
    new_group = values[:, 1:] != values[:, :-1]
    if bool(new_group.all()):
        return ranked
    # Equal scores (common with fp32 scores over many candidates): within each group of equal scores put the
    # least relevant first. Key = group index + r/(1+r), r/(1+r) ∈ [0, 1) increasing in r; sorting by it keeps the
    # groups in place and orders each by relevance.
    group = torch.zeros_like(ranked)
    group[:, 1:] = new_group.cumsum(dim=1)
    return ranked.gather(1, (group + ranked / (1.0 + ranked)).argsort(dim=1))


def _ideal_relevance(rel: torch.Tensor, k_max: int) -> torch.Tensor:
    """The first ``k_max`` relevances of the ideal list (sorted descending), zero-padded to the full width."""
    if k_max >= rel.shape[1] // 4:
        return rel.sort(dim=1, descending=True).values
    out = torch.zeros_like(rel)
    if k_max > 0:
        out[:, :k_max] = rel.topk(k_max, dim=1).values
    return out


def _relevance_fn(relevance, query_classes, candidate_classes, source: "_ScoreSource") -> Relevance:
    have_classes = query_classes is not None or candidate_classes is not None
    if (relevance is None) == (not have_classes):
        raise ValueError("give either relevance (a function) or query_classes and candidate_classes, not both")
    if relevance is None:
        if query_classes is None or candidate_classes is None:
            raise ValueError("query_classes and candidate_classes must be given together")
        relevance = class_overlap_relevance(query_classes, candidate_classes)
    elif not callable(relevance):
        raise TypeError(f"relevance must be a function of the query rows, got {type(relevance).__name__}")
    for attr, n, name in (("num_queries", source.Q, "queries"), ("num_candidates", source.C, "candidates")):
        got = getattr(relevance, attr, None)
        if got is not None and got != n:
            raise ValueError(f"{'query' if attr == 'num_queries' else 'candidate'}_classes describes {got} items "
                             f"but there are {n} {name}")
    return relevance


# ---------------------------------------------------------------------------------------------------------------
# Inputs

class _ScoreSource:
    """Blocks of the [Q, C] score matrix, from a dense matrix or from embeddings (computed per block)."""

    def __init__(self, queries, candidates, scores):
        if scores is not None:
            if queries is not None or candidates is not None:
                raise ValueError("give either scores or queries and candidates, not both")
            _check_float_matrix(scores, "scores")
            self.scores, self.Q, self.C = scores, scores.shape[0], scores.shape[1]
            self.device = scores.device
        else:
            if queries is None or candidates is None:
                raise ValueError("give queries and candidates (embeddings), or scores")
            _check_float_matrix(queries, "queries")
            _check_float_matrix(candidates, "candidates")
            if queries.shape[1] != candidates.shape[1]:
                raise ValueError(f"queries and candidates must have the same dimension D, got "
                                 f"{queries.shape[1]} and {candidates.shape[1]}")
            if queries.device != candidates.device:
                raise ValueError(f"queries and candidates must be on the same device, got {queries.device} "
                                 f"and {candidates.device}")
            self.scores = None
            cdt = torch.float64 if torch.float64 in (queries.dtype, candidates.dtype) else torch.float32
            self.queries, self.candidates = queries.to(cdt), candidates.to(cdt)
            self.Q, self.C, self.device = queries.shape[0], candidates.shape[0], queries.device
        if self.C < 1:
            raise ValueError("need at least one candidate")

    def blocks(self, chunk: int):
        for start in range(0, self.Q, chunk):
            rows = torch.arange(start, min(start + chunk, self.Q), device=self.device)
            if self.scores is not None:
                block = self.scores[start:start + chunk]
                if block.dtype not in (torch.float32, torch.float64):
                    block = block.float()
            else:
                block = self.queries[start:start + chunk] @ self.candidates.T
            yield rows, block


def _check_float_matrix(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (it contains NaN or Inf)")


def _targets(targets, Q: int, C: int) -> torch.Tensor:
    if targets is None:
        if Q != C:
            raise ValueError(f"targets is required when the number of queries ({Q}) differs from the number "
                             f"of candidates ({C})")
        return torch.arange(Q)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if tuple(targets.shape) != (Q,):
        raise ValueError(f"targets must have shape [{Q}], got {tuple(targets.shape)}")
    if Q and (int(targets.min()) < 0 or int(targets.max()) >= C):
        raise ValueError(f"targets must lie in [0, {C}), got values in [{int(targets.min())}, {int(targets.max())}]")
    return targets.to(torch.int64)


def _chunk(chunk_size, C: int, budget: int) -> int:
    if chunk_size is None:
        return max(1, budget // max(C, 1))
    _check_positive_int(chunk_size, "chunk_size")
    return chunk_size


def _check_positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_rank_vector(rank) -> None:
    if not isinstance(rank, torch.Tensor):
        raise TypeError(f"rank must be a torch.Tensor, got {type(rank).__name__}")
    if rank.dim() != 1:
        raise ValueError(f"rank must be 1-D, got shape {tuple(rank.shape)}")
