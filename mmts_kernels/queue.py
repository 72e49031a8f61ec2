"""A FIFO queue of negatives for MoCo-style losses (DESIGN §10): keys of past batches, detached.

MoCo keeps the momentum encoder's keys of the last K samples and scores each query against them as extra negatives.
With this library (B queries q, their keys k, the queue's rows Q):

    loss = mk.info_nce(q, torch.cat([k, queue.tensor]), temperature=τ, symmetric=False, targets=torch.arange(B))
    queue.enqueue(k)                                              # after the loss: this batch's keys join the queue

Row i's positive is column i (its own key); its negatives are the other B − 1 keys and the K queued rows. (MoCo's
own code scores q_i against the queue only, without the other keys of the batch; this recipe adds them.) AMCL's MoCo
form takes the same queue: ``mk.amcl_loss(q, k, net, queue=queue.tensor)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class FeatureQueue(nn.Module):
    """The last ``size`` rows enqueued (fewer until it fills), as ``.tensor`` [n, dim] (or [heads, n, dim]).

    A ring buffer: ``enqueue(keys)`` overwrites the oldest rows with ``keys.detach()`` ([B, dim], or [heads, B, dim]
    with ``heads``); when B > size only the newest ``size`` rows are kept. The rows of ``.tensor`` are in storage
    order (the ring's slots), which only matters to tie-breaking by column. The buffer is a module buffer: it follows
    ``.to(device)`` and is saved in ``state_dict``.
    """

    def __init__(self, size: int, dim: int, *, heads: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        for name, v in (("size", size), ("dim", dim), ("heads", 1 if heads is None else heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.size, self.dim, self.heads = size, dim, heads
        shape = (size, dim) if heads is None else (heads, size, dim)
        self.register_buffer("features", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("head", torch.zeros((), dtype=torch.int64, device=device))  # the next slot to write

    @property
    def tensor(self) -> torch.Tensor:
        """The queued rows: [n, dim] ([heads, n, dim]), n = min(rows enqueued so far, size)."""
        n = int(self.filled)
        return self.features[..., :n, :]

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys`` ([B, dim], or [heads, B, dim]), detached and cast to the queue's dtype."""
        want = f"[B, {self.dim}]" if self.heads is None else f"[{self.heads}, B, {self.dim}]"
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor {want}, got {type(keys).__name__}")
        expected_dims = 2 if self.heads is None else 3
        if keys.dim() != expected_dims or keys.shape[-1] != self.dim or \
                (self.heads is not None and keys.shape[0] != self.heads):
            raise ValueError(f"keys must have shape {want}, got {tuple(keys.shape)}")
        keys = keys.detach().to(self.features.dtype)[..., -self.size:, :]  # more than fits: the newest
        B = keys.shape[-2]
        slots = (int(self.head) + torch.arange(B, device=self.features.device)) % self.size
        self.features[..., slots, :] = keys.to(self.features.device)
        self.head.fill_((int(self.head) + B) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + B))
