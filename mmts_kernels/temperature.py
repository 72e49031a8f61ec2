"""Per-pair temperatures.

DySTreSS (Manna et al.) gives every logit its own temperature, a cosine function of the pair's
similarity s (detached by default, as in the official SimCLR/MoCo code; ``detach=False`` as in its DCL code):

    τ(s) = τ_min + ½ (τ_max − τ_min) (1 + cos(π (1 + s)))
    τ'(s) = −½ (τ_max − τ_min) π sin(π (1 + s))      (used only with detach=False)

so τ(−1) = τ_max, τ(0) = τ_min, τ(1) = τ_max. Pass an instance as ``temperature=`` to any InfoNCE entry.
The formula assumes cosine similarities (unit-norm inputs, or ``normalize=True``); it is applied to the raw
dot product as given, because the library never normalizes silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The largest temperature any loss accepts. Contrastive temperatures live well below it (CLIP's 0.07, TS's
# τ_max = 1.0, AMCL's τ_max = 2). CLIP-style code carries the logit scale 1/τ instead (open_clip: ≈ 14.3 at init,
# clamped at 100); passed as a temperature it flattens the softmax, and the loss sits at ≈ log N while nothing is
# learned, with no error. A value above this bound can only be such a scale, so it is refused.
MAX_TEMPERATURE = 5.0


def logit_scale_message(name: str, value: float) -> str:
    """The error for a temperature above ``MAX_TEMPERATURE``: it names the argument and says what to pass."""
    return (f"{name} = {value:g} is above {MAX_TEMPERATURE:g}: it looks like a logit scale (1/τ; CLIP's is ≈ 14.3 "
            f"at init, up to 100), not a temperature, and would leave the loss near log N, learning nothing. Pass "
            f"1 / logit_scale (or logit_scale.exp().reciprocal() if you hold its log, as open_clip's parameter is)")


@dataclass(frozen=True)
class DySTreSS:
    """Similarity-dependent temperature τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))."""

    tau_min: float = 0.1
    tau_max: float = 0.2
    # True (the official SimCLR/MoCo code): τ is a constant of the step, τ(sg(s)), so ∂(s/τ)/∂s = 1/τ.
    # False (DySTreSS's DCL code): the gradient also flows through τ(s): ∂(s/τ(s))/∂s = 1/τ − s·τ'(s)/τ².
    detach: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.detach, bool):
            raise TypeError(f"DySTreSS: detach must be a bool, got {type(self.detach).__name__}")
        for name in ("tau_min", "tau_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"DySTreSS: {name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"DySTreSS: {name} must be finite and > 0, got {value}")
            if value > MAX_TEMPERATURE:
                raise ValueError(logit_scale_message(f"DySTreSS: {name}", value))
        if self.tau_max < self.tau_min:
            raise ValueError(f"DySTreSS: tau_max ({self.tau_max}) must be >= tau_min ({self.tau_min})")

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """τ for similarities ``s`` (any shape); the caller detaches ``s`` when ``self.detach`` (``on``)."""
        half_range = 0.5 * (self.tau_max - self.tau_min)
        return self.tau_min + half_range * (1.0 + torch.cos(math.pi * (1.0 + s)))

    def on(self, s: torch.Tensor) -> torch.Tensor:
        """τ(s) as the loss uses it: τ(sg(s)) when ``detach``, else differentiable through s."""
        return self(s.detach() if self.detach else s)
