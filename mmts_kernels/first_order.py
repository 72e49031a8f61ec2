"""A fused backward that can be differentiated once, and says so clearly when asked for a second time.

The fused backends compute the gradients of the statistics (dx, dy, dτ, dm) with kernels that have no derivative of
their own. Autograd's fallback for such a kernel lets a second differentiation run through it and returns zeros
with only a warning (and a dτ built from saved statistics misses the terms through them), so

    g, = torch.autograd.grad(loss, x, create_graph=True); torch.autograd.grad(g.sum(), x)

would be silently wrong. ``first_order_only`` wraps a ``register_autograd`` backward: with ``create_graph=False``
(grad mode off inside the backward: every first-order use, torch.compile and opcheck) it is the backward itself;
with ``create_graph=True`` the backward runs without recording and each gradient it returns carries a node that
raises a RuntimeError naming the backend as soon as anything differentiates through it (the mechanism of
``torch.autograd.function.once_differentiable``). Gradients that are never differentiated again stay usable.
The ``torch`` backend (plain autograd) computes second-order gradients exactly.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch._C import _functions


def double_backward_message(backend: str) -> str:
    return (f"double backward (differentiating a gradient, e.g. torch.autograd.grad(loss, x, create_graph=True) and "
            f"then a gradient of the result) is not supported by the {backend} backend, whose backward kernels "
            f"have no derivative; use backend=\"torch\" for second-order gradients")


def first_order_only(backward: Callable, backend: str) -> Callable:
    """``backward`` (ctx, *grads) -> gradients, guarded against a second differentiation (see the module)."""
    message = double_backward_message(backend).encode()

    @functools.wraps(backward)
    def guarded(ctx, *grads):
        if not torch.is_grad_enabled():  # create_graph=False: nothing will differentiate the result
            return backward(ctx, *grads)
        with torch.no_grad():
            gradients = backward(ctx, *grads)
        sources = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        return _raise_when_differentiated(tuple(gradients), sources, message)

    return guarded


def _raise_when_differentiated(gradients: tuple, sources: list, message: bytes) -> tuple:
    """Each tensor of ``gradients`` replaced by an alias whose grad_fn raises ``message`` when autograd runs it.

    The error node also takes ``sources`` (what the gradients depend on: the saved inputs and upstream gradients
    that require grad) as inputs, so a later ``autograd.grad(..., inputs=x)`` finds a path through the node to x and
    runs it, rather than reporting x as unused (or, with allow_unused=True, returning None)."""
    tensors = [g for g in gradients if isinstance(g, torch.Tensor)]
    if not tensors:
        return gradients
    aliases = [t.detach().requires_grad_() for t in tensors]  # an input that requires grad gives outputs a grad_fn
    guarded = _functions.DelayedError(message, len(aliases) + len(sources))(*aliases, *sources)
    guarded = iter(guarded if isinstance(guarded, tuple) else (guarded,))
    return tuple(next(guarded) if isinstance(g, torch.Tensor) else g for g in gradients)
