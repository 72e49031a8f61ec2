"""The ``triton`` backend: the statistics of S = x yᵀ from one fused pass over its tiles, and a tile-recomputing
backward; S is never stored (DESIGN §3, §6).

    forward.py   one program per S tile → row and column partials (online log-sum-exp, hinge, hardest
                 negative), a fixed-order merge kernel, the launcher over column panels
    backward.py  the ∂L/∂S panel kernel + cuBLAS GEMMs for dx = dS·y and dy = dSᵀ·x, closed forms for τ and margins
    op.py        torch.library ops (fake implementations, autograd), tile configurations
    _tiles.py    the shared S tile, logits, DySTreSS τ, hardest negative;  _compat.py  an interpreter fix for NumPy ≥ 2.4

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (the interpreter: slow, for tests). Importing this
package imports neither triton nor torch.cuda state; the kernels load on the first ``compute_stats``. Triton decides
between compiler and interpreter when a kernel is defined, so ``TRITON_INTERPRET`` must be set before that.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..stats import Stats, StatsRequest

# the op's outputs, in order (op.FIELDS; repeated so that importing the backend does not import triton)
FIELDS = ("pos", "lse", "hinge", "cnt", "hard", "arg", "ws", "lse_c", "hinge_c", "cnt_c", "hard_c", "arg_c", "ws_c",
          "sig")
_SAME_LABEL = {None: 0, "mask": 1, "positive": 2}  # the op's same_label argument (and the kernels' LABELS)

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    # find_spec, not import: importing triton defines its standard library's jit functions, which fixes compiler
    # vs interpreter for the whole process (TRITON_INTERPRET is read then), and this runs at test collection.
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the backend can run on ``device`` (or, for None, on some device of this machine)."""
    if not _triton_importable():
        return "triton is not installed (pip install triton; it needs a CUDA GPU, or TRITON_INTERPRET=1 on the CPU)"
    if device is None:
        if _interpret_env() or torch.cuda.is_available():
            return None
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the kernels on the CPU, tests only)"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpret_env():
        return None
    if device.type == "cpu":
        return ("triton kernels run on CUDA GPUs; on the CPU only under the interpreter (set TRITON_INTERPRET=1 "
                "before the first triton call, tests only), or use backend='cpp' or 'torch'")
    return f"triton kernels run on CUDA GPUs, not on {device.type} tensors"


def _ops():
    """Import the kernels and register the ops on first use (triton is imported here, not at package import).
    A plain import statement: under torch.compile the import runs for real while tracing, without a graph break."""
    from . import op

    return op


def _check_mode(x: torch.Tensor) -> None:
    from . import forward

    # triton.jit reads TRITON_INTERPRET when a function is defined: ours are defined on first use
    if x.device.type == "cpu" and type(forward.tile_kernel).__name__ != "InterpretedFunction":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the backend's "
                         "kernels are first loaded in this process; it was not set then")


def compute_stats(x, y, tau, margin, targets, request: StatsRequest, self_cols=None, *, bias=None,
                  labels=None) -> Stats:
    """The contract of ``mmts_kernels.stats``: requested fields as [H, N] tensors, differentiable in x, y, τ, m and
    the sigmoid's bias."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"backend='triton' supports float64, float32, bfloat16 and float16 inputs, got {x.dtype}")
    _ops()
    if not torch.compiler.is_compiling():
        _check_mode(x)
    dystress = request.dystress
    lse, hinge, hard, cols, sigmoid = request.lse, request.hinge, request.hard, request.cols, request.sigmoid
    same_label = _SAME_LABEL[request.same_label]
    extra = {}
    if sigmoid or same_label:  # the new trailing arguments, only when used: the op's other calls stay as they were
        extra = dict(bias=bias if sigmoid else None, labels_x=labels[0] if same_label else None,
                     labels_y=labels[1] if same_label else None, sigmoid=sigmoid, same_label=same_label)
    outs = torch.ops.mmts_kernels.triton_stats(
        x, y,
        tau if (lse and dystress is None) or sigmoid else None,
        margin if hinge else None,  # the hardest-negative loss adds its margin outside the statistics
        targets, lse, hinge, hard, lse and request.ws, cols, dystress is not None,
        float(dystress.tau_min) if dystress is not None else 0.0,
        float(dystress.tau_max) if dystress is not None else 0.0,
        request.deterministic, self_cols, request.decoupled, dystress is not None and not dystress.detach,
        **extra,
    )
    wanted = {"pos": True, "lse": lse, "hinge": hinge, "cnt": hinge, "hard": hard, "arg": hard,
              "ws": lse and request.ws}
    wanted.update({f"{k}_c": on and cols for k, on in list(wanted.items()) if k != "pos"})
    wanted["sig"] = sigmoid
    return Stats(**{name: out for name, out in zip(FIELDS, outs) if wanted.get(name)})


def compute_topk(x, y, targets, self_cols, k: int, deterministic: bool) -> torch.Tensor:
    """The top-k statistic of ``mmts_kernels.topk``: [H, N, k] int64 (``topk.py``; deterministic by construction)."""
    del deterministic
    if x.dtype not in _DTYPES:
        raise ValueError(f"backend='triton' supports float64, float32, bfloat16 and float16 inputs, got {x.dtype}")
    _ops()  # the interpreter fixes and the tile helpers the top-k kernel shares
    if not torch.compiler.is_compiling():
        _check_mode(x)
    from . import topk

    return torch.ops.mmts_kernels.triton_topk(x, y, targets, self_cols, k)
