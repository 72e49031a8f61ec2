"""The statistics contract's sigmoid statistic and label-aware exclusions (issue 18), backend by backend.

Each fused backend's ``compute_stats`` is checked against the torch backend (``mmts_kernels.reference``, the
contract in code) in float64 on random inputs: every requested field, and the gradients of a random weighted sum of
the differentiable fields with respect to x, y, τ, the bias and the margin, to 1e-9 relative. The cases cover what
the losses request:

    sigmoid            sig alone, arbitrary targets with N ≠ M, per-row τ and bias requiring grad
    sigmoid_ring       targets with −1 rows (the distributed ring's blocks of other ranks)
    sigmoid_positive   same_label="positive": every same-label column is a positive (z = +1)
    sigmoid_mask       same_label="mask": same-label columns other than the target leave the sum
    lse_mask           InfoNCE with false-negative elimination, rows and (symmetric) columns, τ requiring grad
    lse_mask_targets   one-directional, N ≠ M, targets consistent with the labels
    ntxent_mask        self columns + mask (+ decoupled): SupCon-style exclusions on Z against itself
    dystress_mask      DySTreSS τ(S) (detach=False) with the mask
    hinge_mask         max-margin over all negatives, rows and columns, margin requiring grad
    hard_mask          hardest negative, rows and columns

Labels are drawn with a random number of classes, from one big class to all singletons.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmts_kernels import backends, reference
from mmts_kernels.stats import StatsRequest
from mmts_kernels.temperature import DySTreSS
from support import backend_marker, rel_err, targets_and_labels

FUSED = [pytest.param(name, marks=backend_marker(name)) for name in ("cpp", "triton")]
KINDS = ("sigmoid", "sigmoid_ring", "sigmoid_positive", "sigmoid_mask", "lse_mask", "lse_mask_targets",
         "ntxent_mask", "dystress_mask", "hinge_mask", "hard_mask")
INT_FIELDS = ("cnt", "arg", "cnt_c", "arg_c")
NO_GRAD_FIELDS = INT_FIELDS + ("ws", "ws_c")  # ws only feeds the fused backward's ∂lse/∂τ


def make_case(kind: str, H: int, N: int, M: int, D: int, classes: int, seed: int):
    """(args, kwargs) of compute_stats for one case, float64 leaves requiring grad where the loss would."""
    g = torch.Generator().manual_seed(seed)
    square = kind in ("sigmoid_positive", "lse_mask", "hinge_mask", "hard_mask", "dystress_mask")
    if square or kind == "ntxent_mask":
        M = N
    x = torch.randn(H, N, D, generator=g, dtype=torch.float64)
    y = torch.randn(H, M, D, generator=g, dtype=torch.float64) if kind != "ntxent_mask" else x
    if kind == "dystress_mask":  # τ(S) is meant for cosine similarities
        x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    else:
        x, y = x / D ** 0.5, (y / D ** 0.5 if y is not x else None)
    leaves = {"x": x.requires_grad_()}
    if y is None:
        y = x
    else:
        leaves["y"] = y.requires_grad_()
    tau = (0.05 + torch.rand(H, N, generator=g, dtype=torch.float64)).requires_grad_()
    bias = (torch.rand(H, N, generator=g, dtype=torch.float64) * 6 - 4).requires_grad_()
    margin = (0.05 + 0.4 * torch.rand(H, N, generator=g, dtype=torch.float64)).requires_grad_()

    layout = "views" if kind == "ntxent_mask" else "square" if square else "rect"
    targets, self_cols, lx, ly = targets_and_labels(layout, N, M, classes, g, ring=kind == "sigmoid_ring")

    req = dict(deterministic=False)
    kwargs = {"self_cols": self_cols}
    use = {"tau": False, "bias": False, "margin": False}
    if kind.startswith("sigmoid"):
        req.update(sigmoid=True, same_label={"sigmoid_positive": "positive", "sigmoid_mask": "mask",
                                             "sigmoid_ring": "mask"}.get(kind))
        use.update(tau=True, bias=True)
    elif kind in ("lse_mask", "lse_mask_targets", "ntxent_mask"):
        req.update(lse=True, ws=True, cols=kind == "lse_mask", same_label="mask",
                   decoupled=kind == "ntxent_mask" and seed % 2 == 0)
        use.update(tau=True)
    elif kind == "dystress_mask":
        req.update(lse=True, cols=True, same_label="mask", dystress=DySTreSS(0.1, 0.6, detach=False))
    elif kind == "hinge_mask":
        req.update(hinge=True, cols=True, same_label="mask")
        use.update(margin=True)
    else:
        req.update(hard=True, cols=True, same_label="mask")
    request = StatsRequest(**req)
    for name in ("tau", "bias", "margin"):
        if use[name]:
            leaves[name] = locals()[name]
    kwargs["bias"] = bias if use["bias"] else None
    kwargs["labels"] = (lx, ly) if request.same_label else None
    args = (x, y, tau if use["tau"] else None, margin if use["margin"] else None, targets, request)
    return args, kwargs, leaves


def run_stats(impl, args, kwargs, leaves, seed: int):
    """The backend's fields and the gradients of a fixed random weighting of its differentiable fields."""
    stats = impl.compute_stats(*args, **kwargs)
    fields = {k: v for k, v in stats._asdict().items() if v is not None}
    g = torch.Generator().manual_seed(seed + 1)
    # a row the mask leaves without a negative has hard = −inf: no gradient there (the contract)
    total = sum((torch.randn(v.shape, generator=g, dtype=v.dtype) * v).where(v.isfinite(), 0.0).sum()
                for k, v in fields.items() if k not in NO_GRAD_FIELDS)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {k: v.detach() for k, v in fields.items()}, dict(zip(leaves, grads))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
@given(
    H=st.integers(1, 2),
    N=st.integers(2, 37),
    M=st.integers(2, 41),
    D=st.integers(1, 19),
    classes=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_fused_stats_match_reference_float64(backend, kind, H, N, M, D, classes, seed):
    if kind == "ntxent_mask":
        N = 2 * max(2, N // 2)
    impl = backends.resolve(backend, torch.device("cpu"))
    args, kwargs, leaves = make_case(kind, H, N, M, D, classes, seed)
    ref_fields, ref_grads = run_stats(reference, args, kwargs, leaves, seed)
    out_fields, out_grads = run_stats(impl, args, kwargs, leaves, seed)
    assert set(out_fields) >= set(ref_fields) - {"ws", "ws_c"}, (set(ref_fields), set(out_fields))
    for name, ref in ref_fields.items():
        if name not in out_fields:
            continue
        out = out_fields[name]
        assert out.shape == ref.shape, name
        if name in ("arg", "arg_c"):  # unspecified where no negative is left
            has = ref_fields["hard" if name == "arg" else "hard_c"].isfinite()
            assert torch.equal(out.cpu()[has], ref[has]), name
        elif name in INT_FIELDS:
            assert torch.equal(out.cpu(), ref), name
        elif name in ("hard", "hard_c"):
            assert torch.equal(out.cpu().isfinite(), ref.isfinite()), name
            assert rel_err(out[ref.isfinite()], ref[ref.isfinite()]) <= 1e-9, name
        else:
            assert out.dtype == torch.float64, name
            assert rel_err(out, ref) <= 1e-9, (name, rel_err(out, ref))
    for name, ref in ref_grads.items():
        assert rel_err(out_grads[name], ref) <= 1e-9, (name, rel_err(out_grads[name], ref))


@pytest.mark.parametrize("backend", FUSED)
def test_sigmoid_float32_large_logits(backend):
    """|u| up to ~60 in fp32: softplus stays finite and matches the float64 reference to fp32 accuracy."""
    g = torch.Generator().manual_seed(3)
    N, M, D = 33, 20, 8
    x = torch.nn.functional.normalize(torch.randn(1, N, D, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(1, M, D, generator=g), dim=-1)
    tau = torch.full((1, N), 0.02)
    bias = torch.full((1, N), -10.0)
    targets = torch.randint(0, M, (N,), generator=g)
    request = StatsRequest(sigmoid=True)
    impl = backends.resolve(backend, torch.device("cpu"))
    out = impl.compute_stats(x, y, tau, None, targets, request, bias=bias).sig
    ref = reference.compute_stats(x.double(), y.double(), tau.double(), None, targets, request,
                                  bias=bias.double()).sig
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5
