"""Contracts every backend meets the same way, beyond the hypothesis comparisons of each backend's own file.

- NaN in the inputs propagates as NaN (DESIGN §7): a NaN in one negative reaches exactly the per-anchor terms whose
  statistics include it, including the hardest negative (a NaN is the max).
- The positive logit in lse_i − pos_i/τ_i is the very S_{i,t_i} the log-sum-exp saw, so its rounding cancels: on
  near-duplicate pairs at a small τ an InfoNCE term is never negative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmts_kernels as mk
from support import backend_marker, test_device as device_for

BACKENDS = [pytest.param(b, marks=backend_marker(b)) for b in ("torch", "cpp", "triton")]
LOSSES = [dict(loss="infonce"), dict(loss="max_margin"), dict(loss="max_margin", hardest_negative=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kw", LOSSES, ids=["infonce", "max_margin", "hardest"])
def test_nan_in_one_negative(backend, symmetric, kw):
    """y_3 holds a NaN. It is a negative of every row, so every row term is NaN; in the symmetric case it is also
    the positive of column 3 and appears in no other column, so of the column terms exactly the one of column 3 is
    NaN. The other column terms do not depend on y_3 at all: they equal those of the batch with y_3 zeroed."""
    g = torch.Generator().manual_seed(0)
    N, M, D = 6, (6 if symmetric else 7), 4
    x, y = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    y[3, 1] = float("nan")
    dev = device_for(backend)
    extra = {} if symmetric else dict(symmetric=False, targets=torch.tensor([0, 1, 2, 4, 5, 6], device=dev))
    got = mk.contrastive_loss(x.to(dev), y.to(dev), reduction="none", backend=backend, **kw, **extra).cpu()

    pattern = torch.ones(N, dtype=torch.bool) if not symmetric else torch.tensor(
        [[True] * N, [j == 3 for j in range(N)]])
    assert torch.equal(got.isnan(), pattern), got
    if symmetric:
        clean = y.clone()
        clean[3] = 0.0
        want = mk.contrastive_loss(x, clean, reduction="none", backend="torch", **kw)
        keep = ~pattern
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_terms_are_never_negative(backend, symmetric):
    g = torch.Generator().manual_seed(0)
    N, D = 40, 40
    x = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    y = F.normalize(x + 0.3 * torch.randn(N, D, generator=g) / D**0.5, dim=-1)  # every positive wins by far
    dev = device_for(backend)
    extra = {} if symmetric else dict(symmetric=False, targets=torch.arange(N, device=dev))
    terms = mk.info_nce(x.to(dev), y.to(dev), 1e-3, reduction="none", backend=backend, **extra)
    assert (terms >= 0).all(), terms.min()
