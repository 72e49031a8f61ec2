"""mmts_kernels.metrics against brute-force definitions written with Python loops (small N, ties forced by
small integer scores), chunked == unchunked, memory without an N×N block, and bad inputs."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmts_kernels import metrics
from support import AllocationRecorder

# ---------------------------------------------------------------------------------------------------------------
# Brute force: the definitions of the module docstring, one query and one candidate at a time.


def naive_rank(scores, target):
    """1 + number of other candidates scoring at least the positive."""
    pos = scores[target]
    return 1 + sum(1 for j, s in enumerate(scores) if j != target and s >= pos)


def naive_iou(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 0.0


def naive_relevance(q_items, c_items):
    """q_items[i] = (verbs, nouns) sets; rel = mean IoU over the two fields."""
    return [[sum(naive_iou(qf, cf) for qf, cf in zip(q, c)) / len(q) for c in c_items] for q in q_items]


def naive_ranked(scores, rel):
    """Relevances in ranked order: score descending, then relevance ascending (ties against the query)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], rel[j]))
    return [rel[j] for j in order]


def naive_ap(scores, rel, threshold=1.0):
    ranked = naive_ranked(scores, rel)
    total, gained, hits = 0.0, 0.0, 0
    for k, r in enumerate(ranked, start=1):
        gained += r
        if r >= threshold:
            total += gained / k
            hits += 1
    return total / hits if hits else None


def naive_ndcg(scores, rel):
    k_max = sum(1 for r in rel if r > 0)
    if k_max == 0:
        return None
    ranked = naive_ranked(scores, rel)
    ideal = sorted(rel, reverse=True)
    dcg = sum(ranked[k] / math.log2(k + 2) for k in range(k_max))
    idcg = sum(ideal[k] / math.log2(k + 2) for k in range(k_max))
    return dcg / idcg


def mean_of_defined(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Strategies: small integer-valued scores (many ties), small class sets.

@st.composite
def score_cases(draw, max_q=7, max_c=9):
    Q = draw(st.integers(1, max_q))
    C = draw(st.integers(1, max_c))
    scores = [[draw(st.integers(-2, 2)) for _ in range(C)] for _ in range(Q)]
    targets = [draw(st.integers(0, C - 1)) for _ in range(Q)]
    return scores, targets


@st.composite
def relevance_cases(draw, max_q=6, max_c=8):
    Q = draw(st.integers(1, max_q))
    C = draw(st.integers(1, max_c))
    scores = [[draw(st.integers(-2, 2)) for _ in range(C)] for _ in range(Q)]

    def item():
        verbs = draw(st.sets(st.integers(0, 2), min_size=1, max_size=1))
        nouns = draw(st.sets(st.integers(0, 3), min_size=0, max_size=3))
        return verbs, nouns

    return scores, [item() for _ in range(Q)], [item() for _ in range(C)]


def as_fields(items):
    """(verbs as an [N] tensor, nouns as a list of sets): the two descriptor forms the module accepts."""
    return torch.tensor([next(iter(v)) for v, _ in items]), [sorted(n) for _, n in items]


# ---------------------------------------------------------------------------------------------------------------
# Ranks and recall

@given(score_cases())
def test_ranks_match_brute_force_with_ties(case):
    scores, targets = case
    S = torch.tensor(scores, dtype=torch.float32)
    got = metrics.ranks(scores=S, targets=torch.tensor(targets))
    assert got.tolist() == [naive_rank(row, t) for row, t in zip(scores, targets)]


@given(score_cases(), st.integers(1, 4))
def test_embeddings_and_chunks_give_the_same_ranks(case, chunk):
    """Integer-valued embeddings: their scores are exact, so every chunking must agree with the dense matrix."""
    scores, targets = case
    Q, C = len(scores), len(scores[0])
    g = torch.Generator().manual_seed(Q * 31 + C)
    q = torch.randint(-2, 3, (Q, 3), generator=g).float()
    c = torch.randint(-2, 3, (C, 3), generator=g).float()
    t = torch.tensor(targets)
    dense = metrics.ranks(scores=q @ c.T, targets=t)
    assert torch.equal(metrics.ranks(q, c, t, chunk_size=chunk), dense)
    assert torch.equal(metrics.ranks(scores=q @ c.T, targets=t, chunk_size=chunk), dense)
    assert dense.tolist() == [naive_rank(row, ti) for row, ti in zip((q @ c.T).tolist(), targets)]


@given(score_cases(max_c=12))
def test_retrieval_metrics_match_brute_force(case):
    scores, targets = case
    r = [naive_rank(row, t) for row, t in zip(scores, targets)]
    got = metrics.retrieval_metrics(scores=torch.tensor(scores, dtype=torch.float64), targets=torch.tensor(targets),
                                    ks=(1, 2, 5, 10))
    for k in (1, 2, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(sum(x <= k for x in r) / len(r))
    assert got["median_rank"] == pytest.approx(statistics.median(r))
    assert got["mean_rank"] == pytest.approx(sum(r) / len(r))


def test_a_tie_with_the_positive_never_helps():
    S = torch.zeros(4, 4)
    assert metrics.ranks(scores=S).tolist() == [4, 4, 4, 4]
    S = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    assert metrics.ranks(scores=S).tolist() == [2, 2, 3]


def test_default_targets_are_the_diagonal():
    S = torch.tensor([[3.0, 1.0], [4.0, 2.0]])
    assert metrics.ranks(scores=S).tolist() == [1, 2]
    m = metrics.retrieval_metrics(scores=S, ks=(1,))
    assert m == {"R@1": 0.5, "median_rank": 1.5, "mean_rank": 1.5}


# ---------------------------------------------------------------------------------------------------------------
# mAP and nDCG

@given(relevance_cases(), st.sampled_from([None, 1, 2, 5]))
def test_map_ndcg_match_brute_force(case, chunk):
    scores, q_items, c_items = case
    rel = naive_relevance(q_items, c_items)
    want_map = mean_of_defined(naive_ap(s, r) for s, r in zip(scores, rel))
    want_ndcg = mean_of_defined(naive_ndcg(s, r) for s, r in zip(scores, rel))
    S = torch.tensor(scores, dtype=torch.float32)
    got = metrics.map_ndcg(scores=S, query_classes=as_fields(q_items), candidate_classes=as_fields(c_items),
                           chunk_size=chunk)
    dense = torch.tensor(rel, dtype=torch.float64)
    via_fn = metrics.map_ndcg(scores=S, relevance=lambda rows: dense[rows], chunk_size=chunk)
    for name, want in (("mAP", want_map), ("nDCG", want_ndcg)):
        for result in (got, via_fn):
            if math.isnan(want):
                assert math.isnan(result[name])
            else:
                assert result[name] == pytest.approx(want, rel=1e-12, abs=1e-12), name


@given(relevance_cases(), st.floats(0.2, 1.0))
def test_map_threshold_matches_brute_force(case, threshold):
    scores, q_items, c_items = case
    rel = naive_relevance(q_items, c_items)
    dense = torch.tensor(rel, dtype=torch.float64)
    got = metrics.mean_average_precision(scores=torch.tensor(scores, dtype=torch.float64),
                                         relevance=lambda rows: dense[rows], relevant_threshold=threshold)
    want = mean_of_defined(naive_ap(s, r, threshold) for s, r in zip(scores, rel))
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12, abs=1e-12)


@given(relevance_cases())
def test_ties_never_help_map_or_ndcg(case):
    """Breaking the ties in any other way (a tiny random perturbation) never scores lower."""
    scores, q_items, c_items = case
    kw = dict(query_classes=as_fields(q_items), candidate_classes=as_fields(c_items))
    S = torch.tensor(scores, dtype=torch.float64)
    tied = metrics.map_ndcg(scores=S, **kw)
    g = torch.Generator().manual_seed(len(scores))
    broken = metrics.map_ndcg(scores=S + 1e-3 * torch.rand(S.shape, generator=g, dtype=torch.float64), **kw)
    for name in ("mAP", "nDCG"):
        if not math.isnan(tied[name]):
            assert tied[name] <= broken[name] + 1e-12


def test_ek100_relevance_and_a_hand_worked_example():
    # Query: verb 0, nouns {1, 2}. Candidates: same verb & nouns (1.0); same verb, nouns {2, 3} (0.5·(1 + 1/3));
    # other verb, no shared noun (0).
    rel = metrics.class_overlap_relevance((torch.tensor([0]), [[1, 2]]),
                                          (torch.tensor([0, 0, 1]), [[1, 2], [2, 3], [4]]))
    assert rel(torch.tensor([0]))[0].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    # Ranking: the partial match first, then the full match, then the irrelevant one.
    S = torch.tensor([[0.5, 0.9, 0.1]])
    got = metrics.map_ndcg(scores=S, relevance=rel)
    assert got["mAP"] == pytest.approx((2 / 3 + 1.0) / 2)  # one relevant item, at k=2, graded precision
    dcg, idcg = 2 / 3 + 1 / math.log2(3), 1 + (2 / 3) / math.log2(3)
    assert got["nDCG"] == pytest.approx(dcg / idcg)


def test_class_sets_accept_padded_tensors_and_deduplicate():
    a = metrics.class_overlap_relevance(torch.tensor([[1, 2, -1], [3, 3, -1]]), [[1, 2], [3]])
    assert a(torch.tensor([0, 1])).tolist() == [[1.0, 0.0], [0.0, 1.0]]


# ---------------------------------------------------------------------------------------------------------------
# Chunking: equal results, and no N×N block in memory

def test_chunked_equals_unchunked_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    verbs, nouns = torch.randint(0, 5, (200,), generator=g), torch.randint(-1, 8, (200, 3), generator=g)
    kw = dict(query_classes=(verbs, nouns), candidate_classes=(verbs, nouns))
    S = (q.double() @ c.double().T)
    whole = metrics.map_ndcg(scores=S, chunk_size=200, **kw)
    for chunk in (3, 64):
        got = metrics.map_ndcg(q.double(), c.double(), chunk_size=chunk, **kw)
        assert got["mAP"] == pytest.approx(whole["mAP"], rel=1e-12)
        assert got["nDCG"] == pytest.approx(whole["nDCG"], rel=1e-12)
        assert torch.equal(metrics.ranks(q.double(), c.double(), chunk_size=chunk), metrics.ranks(scores=S))


def test_no_block_of_queries_times_candidates_is_allocated():
    g = torch.Generator().manual_seed(0)
    N, chunk = 400, 40
    q, c = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
    labels = torch.randint(0, 20, (N,), generator=g)
    with AllocationRecorder() as rec:
        metrics.retrieval_metrics(q, c, chunk_size=chunk)
        metrics.map_ndcg(q, c, query_classes=labels, candidate_classes=labels, chunk_size=chunk)
    op, numel = rec.largest()
    assert numel <= chunk * N, (op, numel)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: the error names the argument

E = torch.zeros(3, 2)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: metrics.ranks(scores=[[1.0]]), TypeError, "scores"),
    (lambda: metrics.ranks(scores=torch.zeros(3)), ValueError, "scores"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "scores"),
    (lambda: metrics.ranks(scores=torch.tensor([[0.0, float("nan")], [0.0, 0.0]])), ValueError, "scores"),
    (lambda: metrics.ranks(E, torch.zeros(3, 4)), ValueError, "dimension D"),
    (lambda: metrics.ranks(E), ValueError, "queries and candidates"),
    (lambda: metrics.ranks(E, E, scores=torch.zeros(3, 3)), ValueError, "scores"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 3)), ValueError, "targets"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 3), targets=torch.tensor([0, 3])), ValueError, "targets"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 3), targets=torch.tensor([0])), ValueError, "targets"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 3), targets=torch.tensor([0.0, 1.0])), TypeError, "targets"),
    (lambda: metrics.ranks(scores=torch.zeros(2, 2), chunk_size=0), ValueError, "chunk_size"),
    (lambda: metrics.retrieval_metrics(scores=torch.zeros(2, 2), ks=(0,)), ValueError, "ks"),
    (lambda: metrics.recall_at_k(torch.ones(2, 2), 1), ValueError, "rank"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2)), ValueError, "relevance"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), relevance=torch.zeros(2, 2)), TypeError, "relevance"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), relevance=lambda r: torch.zeros(1, 1)), ValueError,
     "relevance"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), relevance=lambda r: -torch.ones(r.numel(), 2)),
     ValueError, "relevance"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), query_classes=torch.tensor([0, 1])), ValueError,
     "candidate_classes"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), query_classes=torch.tensor([0, 1, 2]),
                              candidate_classes=torch.tensor([0, 1])), ValueError, "query_classes"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), query_classes=torch.tensor([0.0, 1.0]),
                              candidate_classes=torch.tensor([0, 1])), TypeError, "query_classes"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), query_classes=(torch.tensor([0, 1]),),
                              candidate_classes=(torch.tensor([0, 1]), torch.tensor([0, 1]))), ValueError, "fields"),
    (lambda: metrics.map_ndcg(scores=torch.zeros(2, 2), relevance=lambda r: torch.ones(r.numel(), 2),
                              relevant_threshold=0), ValueError, "relevant_threshold"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
