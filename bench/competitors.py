"""What users would run instead of this library: the losses the benchmarks compare against.

    openclip          open_clip's ``ClipLoss`` with MM-TS's per-sample τ, eager: ``S = x @ y.T`` in the input dtype,
                      then ``F.cross_entropy`` over ``S / τ[:, None]`` (rows) and over ``Sᵀ / τ[:, None]`` (columns,
                      so column j uses τ_j as in the official MM-TS code), averaged. Dividing by the fp32 τ promotes the
                      logits to fp32, as the same line does in a user's code. Max-margin: the same S and the plain-torch
                      hinge over all negatives (or the hardest one), both directions, reduced as the library reduces it.
                      Sigmoid (SigLIP): open_clip's own ``SigLipLoss`` from the installed open-clip-torch (its
                      ``loss.py``, loaded by file: ``import open_clip`` needs torchvision), called with the per-row
                      logit scale 1/τ_i as an [N, 1] ``logit_scale`` (open_clip computes ``logit_scale *
                      image_features @ text_features.T``, so it scales row i) and the bias ``SIGLIP_BIAS``.
    openclip_compile  the same function under ``torch.compile``.
    openclip_chunked  the sigmoid loss only: open_clip's chunked ``SigLipLoss(chunk_size=SIGLIP_CHUNK)``
                      (``openclip_siglip_chunked``; written here, as no open-clip-torch release has it yet).
    inf_cl            Inf-CL's ``cal_inf_loss`` (only called, when the ``inf_cl`` package is importable), both
                      directions averaged, with one scalar τ (it has no per-sample τ), InfoNCE only, CUDA only.

Each returns ``f(x, y, per_sample) -> scalar loss`` for ``x, y`` [N, D] with the positive of row i in column i;
``per_sample`` is the [N] temperature (InfoNCE, sigmoid) or margin (max-margin). Work: 2·N·N·D FLOPs forward for S,
4·N·N·D backward for dS·y and dSᵀ·x, like every implementation; they also write S and its softmax or sigmoid
(O(N²) memory; the chunked one too, since autograd keeps every chunk's logits for the backward).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn.functional as F

COMPETITORS = ("openclip", "openclip_compile", "openclip_chunked", "inf_cl")
SIGLIP_BIAS = -10.0  # the bias of every sigmoid row: open_clip's init_logit_bias for SigLIP models
SIGLIP_CHUNK = 512  # open_clip's chunk_size in the example of the PR that added it (mlfoundations/open_clip#1145)
OPEN_CLIP_MISSING = "open-clip-torch is not installed (pip install --no-deps open-clip-torch)"


@functools.lru_cache(maxsize=None)
def open_clip_loss_module() -> Optional[ModuleType]:
    """open_clip/loss.py of the installed open-clip-torch as a module, loaded by file (``find_spec`` locates the
    package without importing it: ``import open_clip`` needs torchvision, loss.py only torch), or None when
    open-clip-torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    sys.modules.setdefault(loss_spec.name, module)  # torch.compile's guards look the module up by name
    return module


def unavailable_reason(name: str, device: torch.device, loss: Optional[str] = "infonce",
                       dystress=None) -> Optional[str]:
    """None when competitor ``name`` can run ``loss`` on ``device`` (``loss=None``: some loss), else why not."""
    if name not in COMPETITORS:
        raise ValueError(f"unknown competitor {name!r}; known: {COMPETITORS}")
    if name == "openclip_chunked" and loss not in (None, "sigmoid"):
        return "open_clip chunks its SigLipLoss only (the sigmoid loss)"
    if name in ("openclip", "openclip_compile") and loss == "sigmoid" and open_clip_loss_module() is None:
        return OPEN_CLIP_MISSING
    if name != "inf_cl":
        return None
    if importlib.util.find_spec("inf_cl") is None:
        return "the inf_cl package is not installed (pip install inf-cl)"
    if torch.device(device).type != "cuda":
        return "Inf-CL runs on CUDA GPUs only"
    if loss not in (None, "infonce") or dystress is not None:
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
    if name == "openclip_chunked":
        if loss != "sigmoid":
            raise ValueError(f"openclip_chunked: {unavailable_reason(name, torch.device('cpu'), loss)}")
        return openclip_siglip_chunked

    def f(x, y, per_sample):
        if loss == "infonce":
            return openclip_infonce(x, y, per_sample, dystress=dystress)
        if loss == "sigmoid":
            return openclip_siglip(x, y, per_sample)
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


def openclip_siglip(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """open_clip's ``SigLipLoss`` itself, one process: −(1/N) Σ_ij log σ(z_ij (S_ij/τ_i + b)), b = SIGLIP_BIAS.
    The scale is cast to the features' dtype, as open_clip's 0-dim float32 ``logit_scale.exp()`` leaves low-precision
    features in their dtype (an [N, 1] float32 one would promote them to float32)."""
    module = open_clip_loss_module()
    if module is None:
        raise RuntimeError(OPEN_CLIP_MISSING)
    return module.SigLipLoss()(x, y, tau.reciprocal().to(x.dtype)[:, None], SIGLIP_BIAS)


def openclip_siglip_chunked(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor,
                            chunk_size: int = SIGLIP_CHUNK) -> torch.Tensor:
    """open_clip's chunked sigmoid loss, ``SigLipLoss(chunk_size=…)._chunked_loss`` on its main branch
    (mlfoundations/open_clip#1145, commit 9307b60; in no open-clip-torch release up to 3.3.0, so written here after
    it, with the per-row scale 1/τ_i taken with each chunk's rows). Per chunk of ``chunk_size`` image rows: the
    logits u = (1/τ) x_chunk yᵀ + b, every pair scored as a negative, Σ softplus(u), and each positive corrected by
    −u_ii (log σ(u) = log σ(−u) + u); the chunk sums accumulate in a float32 scalar (a float64 one for float64
    logits, by promotion) and the total is divided by N. Like open_clip's, it takes ``F.softplus`` with its default
    threshold (v itself above 20, off by < 2.1e-9 per pair). The forward holds one chunk's logits at a time, but
    autograd keeps every chunk's for the backward: O(N²) memory again (mlfoundations/open_clip#1214)."""
    n = x.shape[0]
    scale = tau.reciprocal().to(x.dtype)[:, None]
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = scale[start:stop] * x[start:stop] @ y.T + SIGLIP_BIAS
        local = torch.arange(stop - start, device=x.device)
        total = total + (F.softplus(logits).sum() - logits[local, start + local].sum())
    return total / n


def inf_cl_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE through Inf-CL with the scalar τ = mean(τ_i) (Inf-CL takes one ``scale`` = 1/τ)."""
    from inf_cl import cal_inf_loss

    scale = tau.float().mean().reciprocal()
    return 0.5 * (cal_inf_loss(x, y, scale=scale) + cal_inf_loss(y, x, scale=scale))
