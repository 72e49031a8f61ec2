"""NaN in the inputs propagates as NaN (DESIGN §7), the same way in every backend: a NaN in one negative reaches
exactly the per-anchor terms whose statistics include it, including the hardest negative (a NaN is the max)."""
from __future__ import annotations

import pytest
import torch

import mmts_kernels as mk
from support import backend_marker, test_device as device_for

BACKENDS = [pytest.param(b, marks=backend_marker(b)) for b in ("torch", "cpp", "triton")]
LOSSES = [dict(loss="infonce"), dict(loss="max_margin"), dict(loss="max_margin", hardest_negative=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kw", LOSSES, ids=["infonce", "max_margin", "hardest"])
def test_nan_in_one_negative(backend, symmetric, kw):
    g = torch.Generator().manual_seed(0)
    N, M, D = 6, (6 if symmetric else 7), 4
    x, y = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    y[3, 1] = float("nan")  # a negative of every row; in the symmetric case also column 3's positive
    extra = {} if symmetric else dict(symmetric=False, targets=torch.tensor([0, 1, 2, 4, 5, 6]))
    want = mk.contrastive_loss(x, y, reduction="none", backend="torch", **kw, **extra)
    dev = device_for(backend)
    got = mk.contrastive_loss(x.to(dev), y.to(dev), reduction="none", backend=backend, **kw, **extra).cpu()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert want.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
