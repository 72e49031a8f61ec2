"""Label-aware positives (issue 18 item 2): ``labels=`` and ``same_label=`` on ``info_nce`` / ``contrastive_loss``
(InfoNCE and max-margin) and ``nt_xent``, on every backend, against float64 formulas written from the papers,
independently of the library (no ``mmts_kernels`` code). With P_i the columns of row i's class (its target among
them; in NT-Xent every other row of the class, the other view included):

    same_label="positive"  InfoNCE: SupCon's L_out,  L_i = log Σ_j exp(S_ij/τ_i) − mean_{p∈P_i} S_ip/τ_i
                           NT-Xent: the same over j ≠ a (decoupled: j ∉ P(a) ∪ {a})
    same_label="ignore"    the columns of P_i other than the target leave the denominator (false-negative
                           elimination): L_i = log Σ_{j ∉ P_i \\ {t_i}} exp(S_ij/τ_i) − S_{i,t_i}/τ_i
    max-margin (both)      the columns of P_i are never negatives: Σ_{j ∉ P_i} relu(m_i + S_ij − S_{i,t_i})

The symmetric losses give the columns the same treatment (column j: the rows of its class). Values and every
gradient (x, y, τ, margin) to 1e-9 relative in float64 on ``torch``, ``cpp`` and ``triton`` (interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmts_kernels as mk
import support
from support import assert_matches_formula, backend_marker

BACKENDS = [pytest.param(name, marks=backend_marker(name)) for name in ("torch", "cpp", "triton")]


# ---------------------------------------------------------------------------------------------------------------
# The formulas (one head, float64, materialized, loops where they read more plainly).

def infonce_rows(S, tau, targets, same, mode):
    """Row losses [N] of InfoNCE with labels; S [N, M], tau [N] (row i's τ), same [N, M] bool."""
    out = []
    for i in range(S.shape[0]):
        logits = S[i] / tau[i]
        t = int(targets[i])
        if mode == "positive":
            out.append(torch.logsumexp(logits, 0) - logits[same[i]].mean())
        else:
            keep = ~same[i]
            keep[t] = True
            out.append(torch.logsumexp(logits[keep], 0) - logits[t])
    return torch.stack(out)


def hinge_rows(S, margin, targets, same, hardest):
    out = []
    for i in range(S.shape[0]):
        negatives = S[i][~same[i]]
        violation = margin[i] + negatives - S[i, int(targets[i])]
        if hardest:
            out.append(torch.relu(violation.max()) if negatives.numel() else 0 * S[i, 0])  # no negative: 0
        else:
            out.append(torch.relu(violation).sum())
    return torch.stack(out)


def contrastive_formula(x, y, value, targets, lx, ly, *, loss, mode, symmetric, hardest):
    """[2, N] (symmetric) or [N] per-anchor terms of one head."""
    S = x @ y.T
    same = lx[:, None] == ly[None, :]
    if loss == "infonce":
        row = infonce_rows(S, value, targets, same, mode)
        col = infonce_rows(S.T, value, torch.arange(S.shape[0]), same.T, mode) if symmetric else None
    else:
        row = hinge_rows(S, value, targets, same, hardest)
        col = hinge_rows(S.T, value, torch.arange(S.shape[0]), same.T, hardest) if symmetric else None
    return torch.stack((row, col)) if symmetric else row


def ntxent_formula(z1, z2, tau, labels, *, mode, decoupled):
    """[2, B] SupCon / false-negative-eliminating NT-Xent of one head; tau [2B] per anchor."""
    B = z1.shape[0]
    Z = torch.cat((z1, z2))
    S = Z @ Z.T
    L = torch.cat((labels, labels))
    out = []
    for a in range(2 * B):
        logits = S[a] / tau[a]
        p = (a + B) % (2 * B)
        others = torch.arange(2 * B) != a
        positives = (L == L[a]) & others
        if mode == "positive":
            keep = others & ~positives if decoupled else others
            out.append(torch.logsumexp(logits[keep], 0) - logits[positives].mean())
        else:
            keep = others & ~positives
            if not decoupled:
                keep[p] = True
            out.append(torch.logsumexp(logits[keep], 0) - logits[p])
    return torch.stack(out).view(2, B)


def reduce(terms, reduction, count):
    if reduction == "none":
        return terms
    per_head = terms.flatten(1).sum(1)
    return per_head.sum() if reduction == "sum" else (per_head / count).sum()


# ---------------------------------------------------------------------------------------------------------------
# Cases.

@dataclass(frozen=True)
class Case:
    N: int
    M: int
    D: int
    loss: str = "infonce"  # infonce | max_margin | hardest | nt_xent
    mode: str = "positive"
    symmetric: bool = True
    reduction: str = "mean"
    H: Optional[int] = None
    classes: int = 3
    decoupled: bool = False
    learnable: bool = True
    seed: int = 0


@st.composite
def cases(draw, max_n: int = 10, max_d: int = 5) -> Case:
    loss = draw(st.sampled_from(("infonce", "max_margin", "hardest", "nt_xent")))
    N = draw(st.integers(2, max_n))
    symmetric = loss != "nt_xent" and draw(st.booleans())
    M = N if symmetric or loss == "nt_xent" else draw(st.integers(2, max_n))
    classes = draw(st.integers(1, N + 2))
    decoupled = loss == "nt_xent" and draw(st.booleans())
    if decoupled:
        classes = max(classes, 2)  # an anchor needs a negative of another class (else the loss is undefined)
    return Case(N=N, M=M, D=draw(st.integers(1, max_d)), loss=loss, mode=draw(st.sampled_from(("positive", "ignore"))),
                symmetric=symmetric, reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                H=draw(st.sampled_from((None, 2))), classes=classes, decoupled=decoupled,
                learnable=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(case: Case, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(case.seed)
    H = case.H or 1
    lead = () if case.H is None else (case.H,)
    x = (torch.randn(*lead, case.N, case.D, generator=g, dtype=torch.float64) / case.D ** 0.5).to(dtype).to(device)
    y = (torch.randn(*lead, case.M, case.D, generator=g, dtype=torch.float64) / case.D ** 0.5).to(dtype).to(device)
    leaves = {"x": x.requires_grad_(), "y": y.requires_grad_()}
    infonce = case.loss in ("infonce", "nt_xent")
    lo, hi = (0.1, 0.8) if infonce else (0.05, 0.5)
    value = (lo + (hi - lo) * torch.rand(case.N, generator=g, dtype=torch.float64)).to(dtype).to(device)
    if case.learnable:
        leaves["value"] = value.requires_grad_()
    targets = None
    if case.loss == "nt_xent" or case.symmetric:
        labels_y = torch.arange(case.M) % case.classes
        labels_y = labels_y[torch.randperm(case.M, generator=g)]
        labels_x = labels_y
    else:
        targets = torch.randint(0, case.M, (case.N,), generator=g)
        labels_y = torch.randint(0, case.classes, (case.M,), generator=g)
        labels_x = labels_y[targets]
    shape = ((case.H,) if case.H else ()) + ((2,) if case.symmetric or case.loss == "nt_xent" else ()) + (case.N,)
    upstream = (0.5 + torch.rand(shape if case.reduction == "none" else (), generator=g,
                                 dtype=torch.float64)).to(device)
    return dict(leaves=leaves, value=value, targets=targets, labels=(labels_x, labels_y), H=H, upstream=upstream)


def library(case: Case, inp, backend: str):
    x, y = inp["leaves"]["x"], inp["leaves"]["y"]
    dev = x.device
    lx, ly = (t.to(dev) for t in inp["labels"])
    common = dict(reduction=case.reduction, backend=backend, same_label=case.mode)
    if case.loss == "nt_xent":
        return mk.nt_xent(x, y, inp["value"], labels=lx, decoupled=case.decoupled, **common)
    labels = lx if case.symmetric else (lx, ly)
    targets = None if inp["targets"] is None else inp["targets"].to(dev)
    if case.loss == "infonce":
        return mk.info_nce(x, y, inp["value"], labels=labels, targets=targets, symmetric=case.symmetric, **common)
    return mk.max_margin(x, y, inp["value"], labels=labels, targets=targets, symmetric=case.symmetric,
                         hardest_negative=case.loss == "hardest", **common)


def formula(case: Case, inp):
    x, y = inp["leaves"]["x"], inp["leaves"]["y"]
    x3, y3 = (x, y) if case.H else (x.unsqueeze(0), y.unsqueeze(0))
    lx, ly = inp["labels"]
    value = inp["value"]
    heads = []
    for h in range(x3.shape[0]):
        if case.loss == "nt_xent":
            heads.append(ntxent_formula(x3[h], y3[h], torch.cat((value, value)), lx, mode=case.mode,
                                        decoupled=case.decoupled))
        else:
            targets = inp["targets"] if inp["targets"] is not None else torch.arange(case.N)
            heads.append(contrastive_formula(x3[h], y3[h], value, targets, lx, ly,
                                             loss="infonce" if case.loss == "infonce" else "max_margin",
                                             mode=case.mode, symmetric=case.symmetric,
                                             hardest=case.loss == "hardest"))
    terms = torch.stack(heads)
    anchors = terms[0].numel()
    count = anchors * (case.M - 1) if case.loss == "max_margin" else anchors
    out = reduce(terms, case.reduction, count)
    return out.squeeze(0) if case.reduction == "none" and not case.H else out


def check_case(case: Case, backend: str, tol: float = 1e-9) -> None:
    ref_inp = make_inputs(case)
    ref = formula(case, ref_inp)
    # allow_unused: with one class no column is a negative, and the margin takes no part
    ref_grads = torch.autograd.grad((ref * ref_inp["upstream"]).sum(), list(ref_inp["leaves"].values()),
                                    allow_unused=True, materialize_grads=True)
    inp = make_inputs(case, torch.float64, support.test_device(backend))
    out = library(case, inp, backend)
    grads = torch.autograd.grad((out.double() * inp["upstream"]).sum(), list(inp["leaves"].values()),
                                allow_unused=True, materialize_grads=True)
    assert_matches_formula(backend, out, dict(zip(inp["leaves"], grads)), ref, dict(zip(inp["leaves"], ref_grads)),
                           tol, case)


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients.

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(case=cases())
def test_matches_the_formulas_float64(backend, case):
    check_case(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ("infonce", "max_margin", "hardest", "nt_xent"))
@pytest.mark.parametrize("mode", ("positive", "ignore"))
def test_one_big_class_and_singletons(backend, loss, mode):
    """One class: under "ignore" only the target is left (InfoNCE's loss is 0, max-margin has no negatives);
    singletons: the labels change nothing."""
    for classes in (1, 9):
        check_case(Case(N=9, M=9, D=3, loss=loss, mode=mode, classes=classes, seed=classes), backend)


def test_singletons_equal_the_unlabelled_losses():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    ids = torch.arange(6)
    for mode in ("positive", "ignore"):
        for fn, kw in ((mk.info_nce, {}), (mk.max_margin, {}), (mk.max_margin, {"hardest_negative": True}),
                       (mk.nt_xent, {}), (mk.nt_xent, {"decoupled": True})):
            plain = fn(x, y, **kw, backend="torch")
            torch.testing.assert_close(fn(x, y, **kw, labels=ids, same_label=mode, backend="torch"), plain)


def test_cluster_labels_plug_in():
    """``mk.clusters`` assignments are labels as they come (an [N] int64 tensor)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    clusters = mk.clusters_from_labels(torch.tensor([3, 1, 3, 2, 1, 1, 0, 3]))
    out = mk.info_nce(x, y, 0.1, labels=clusters.labels, backend="torch")
    ref = contrastive_formula(x.double(), y.double(), torch.full((8,), 0.1, dtype=torch.float64), torch.arange(8),
                              clusters.labels, clusters.labels, loss="infonce", mode="positive", symmetric=True,
                              hardest=False)
    torch.testing.assert_close(out.double(), ref.sum() / 16, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("call, error, match", [
    (lambda x, y, l: mk.info_nce(x, y, labels=l[:4]), ValueError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y, labels=l.double()), TypeError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y, labels=l.bool()), TypeError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y, labels=l.tolist()), TypeError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y, labels=(l, l, l)), TypeError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y, labels=l, same_label="negative"), ValueError, "same_label"),
    (lambda x, y, l: mk.info_nce(x, y, labels=l, same_label=1), TypeError, "same_label"),
    (lambda x, y, l: mk.info_nce(x, y[:4], labels=l, symmetric=False, targets=torch.zeros(6, dtype=torch.long)),
     ValueError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y[:4], labels=(l, l[:3]), symmetric=False,
                                 targets=torch.zeros(6, dtype=torch.long)), ValueError, "labels"),
    (lambda x, y, l: mk.info_nce(x, y[:4], labels=(l, torch.arange(4)), symmetric=False,
                                 targets=torch.zeros(6, dtype=torch.long)), ValueError, "target"),
    (lambda x, y, l: mk.info_nce(x, y, mk.DySTreSS(0.1, 0.5), labels=l), ValueError, "same_label"),
    (lambda x, y, l: mk.nt_xent(x, y, labels=(l, l)), TypeError, "labels"),
    (lambda x, y, l: mk.nt_xent(x, y, labels=l[:5]), ValueError, "labels"),
    (lambda x, y, l: mk.nt_xent(x, y, labels=torch.zeros(6, dtype=torch.long), decoupled=True), ValueError,
     "labels"),
])
def test_bad_input(call, error, match):
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    with pytest.raises(error, match=match):
        call(x, y, labels)


def test_dystress_with_ignore_is_supported():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    out = mk.info_nce(x, y, mk.DySTreSS(0.1, 0.5), labels=labels, same_label="ignore", backend="torch")
    plain = mk.info_nce(x, y, mk.DySTreSS(0.1, 0.5), backend="torch")
    assert torch.isfinite(out) and out < plain  # fewer negatives in every denominator
