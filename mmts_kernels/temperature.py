"""Per-pair temperatures.

DySTreSS (Manna et al.) gives every logit its own temperature, a cosine function of the pair's
similarity s (detached, as in the official code):

    τ(s) = τ_min + ½ (τ_max − τ_min) (1 + cos(π (1 + s)))

so τ(−1) = τ_max, τ(0) = τ_min, τ(1) = τ_max. Pass an instance as ``temperature=`` to any InfoNCE entry.
The formula assumes cosine similarities (unit-norm inputs, or ``normalize=True``); it is applied to the raw
dot product as given, because the library never normalizes silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DySTreSS:
    """Similarity-dependent temperature τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))."""

    tau_min: float = 0.1
    tau_max: float = 0.2

    def __post_init__(self) -> None:
        for name in ("tau_min", "tau_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"DySTreSS: {name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"DySTreSS: {name} must be finite and > 0, got {value}")
        if self.tau_max < self.tau_min:
            raise ValueError(f"DySTreSS: tau_max ({self.tau_max}) must be >= tau_min ({self.tau_min})")

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """τ for similarities ``s`` (any shape); the caller detaches ``s``."""
        half_range = 0.5 * (self.tau_max - self.tau_min)
        return self.tau_min + half_range * (1.0 + torch.cos(math.pi * (1.0 + s)))
