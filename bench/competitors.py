"""What users would run instead of this library: the losses the benchmarks compare against.

    openclip          open_clip's ``ClipLoss`` with MM-TS's per-sample τ, eager: ``S = x @ y.T`` in the input dtype,
                      then ``F.cross_entropy`` over ``S / τ[:, None]`` (rows) and over ``Sᵀ / τ[:, None]`` (columns,
                      so column j uses τ_j as in the official MM-TS code), averaged. Dividing by the fp32 τ promotes the
                      logits to fp32, as the same line does in a user's code. Max-margin: the same S and the plain-torch
                      hinge over all negatives (or the hardest one), both directions, reduced as the library reduces it.
    openclip_compile  the same function under ``torch.compile``.
    inf_cl            Inf-CL's ``cal_inf_loss`` (only called, when the ``inf_cl`` package is importable), both
                      directions averaged, with one scalar τ (it has no per-sample τ), InfoNCE only, CUDA only.

Each returns ``f(x, y, per_sample) -> scalar loss`` for ``x, y`` [N, D] with the positive of row i in column i;
``per_sample`` is the [N] temperature (InfoNCE) or margin (max-margin). Work: 2·N·N·D FLOPs forward for S, 4·N·N·D
backward for dS·y and dSᵀ·x, like every implementation; they also write S and its softmax (O(N²) memory).
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

COMPETITORS = ("openclip", "openclip_compile", "inf_cl")


def unavailable_reason(name: str, device: torch.device, loss: str = "infonce", dystress=None) -> Optional[str]:
    """None when competitor ``name`` can run this loss on ``device``, else why not."""
    if name not in COMPETITORS:
        raise ValueError(f"unknown competitor {name!r}; known: {COMPETITORS}")
    if name != "inf_cl":
        return None
    if importlib.util.find_spec("inf_cl") is None:
        return "the inf_cl package is not installed (pip install inf-cl)"
    if torch.device(device).type != "cuda":
        return "Inf-CL runs on CUDA GPUs only"
    if loss != "infonce" or dystress is not None:
        return "Inf-CL computes InfoNCE with one scalar temperature only"
    return None


def loss_function(name: str, loss: str = "infonce", *, hardest_negative: bool = False,
                  dystress=None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(x, y, per_sample)`` for competitor ``name``; ``dystress`` (an ``mk.DySTreSS``) replaces the per-sample τ."""
    if name == "inf_cl":
        if loss != "infonce" or dystress is not None:
            raise ValueError("inf_cl: InfoNCE with a scalar temperature only")
        return inf_cl_loss
    if name not in COMPETITORS:
        raise ValueError(f"unknown competitor {name!r}; known: {COMPETITORS}")

    def f(x, y, per_sample):
        if loss == "infonce":
            return openclip_infonce(x, y, per_sample, dystress=dystress)
        return openclip_max_margin(x, y, per_sample, hardest_negative=hardest_negative)

    if name == "openclip_compile":
        return torch.compile(f, dynamic=False)
    return f


def openclip_infonce(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor, dystress=None,
                     targets: torch.Tensor = None) -> torch.Tensor:
    """Symmetric; with ``targets`` one-directional (row i's positive is column ``targets[i]``, open_clip's local
    loss on a rectangular batch)."""
    S = x @ y.T
    if targets is not None:
        return F.cross_entropy(S / tau[:, None], targets)
    labels = torch.arange(S.shape[0], device=S.device)
    if dystress is not None:  # DySTreSS: τ_ij from the detached similarity, every logit its own
        tau_ij = dystress(S.detach().to(torch.promote_types(S.dtype, torch.float32)))
        return 0.5 * (F.cross_entropy(S / tau_ij, labels) + F.cross_entropy(S.T / tau_ij.T, labels))
    return 0.5 * (F.cross_entropy(S / tau[:, None], labels) + F.cross_entropy(S.T / tau[:, None], labels))


def openclip_max_margin(x: torch.Tensor, y: torch.Tensor, margin: torch.Tensor,
                        hardest_negative: bool = False) -> torch.Tensor:
    S = x @ y.T
    N = S.shape[0]
    pos = S.diagonal()
    eye = torch.eye(N, dtype=torch.bool, device=S.device)
    if hardest_negative:  # VSE++: the hardest negative of each row and of each column, Σ / 2N
        negatives = S.masked_fill(eye, float("-inf"))
        row = torch.relu(margin + negatives.amax(dim=1) - pos)
        col = torch.relu(margin + negatives.amax(dim=0) - pos)
        return (row.sum() + col.sum()) / (2 * N)
    # every negative, both directions (column j: its positive S_jj and margin m_j), Σ / 2N(N−1)
    row = torch.relu(margin[:, None] + S - pos[:, None]).masked_fill(eye, 0.0)
    col = torch.relu(margin[None, :] + S - pos[None, :]).masked_fill(eye, 0.0)
    return (row.sum() + col.sum()) / (2 * N * (N - 1))


def plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """SimCLR NT-Xent as TS / lightly users write it: the 2B × 2B similarity of both views materialized, the
    self-similarity masked, anchor a's positive at a ± B; per-sample τ_i shared by both views of sample i."""
    B = z1.shape[0]
    z = torch.cat([z1, z2])
    S = z @ z.T
    eye = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = (S / torch.cat([tau, tau])[:, None]).masked_fill(eye, float("-inf"))
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(logits, targets)


def inf_cl_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE through Inf-CL with the scalar τ = mean(τ_i) (Inf-CL takes one ``scale`` = 1/τ)."""
    from inf_cl import cal_inf_loss

    scale = tau.float().mean().reciprocal()
    return 0.5 * (cal_inf_loss(x, y, scale=scale) + cal_inf_loss(y, x, scale=scale))
