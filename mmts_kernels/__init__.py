"""mmts_kernels: fused contrastive losses with per-sample temperatures and margins.

Where things are:
    api.py          the public functions (contrastive_loss, info_nce, max_margin)
    validation.py   every bad-input check, before any backend runs
    stats.py        the statistics contract every backend implements
    losses.py       the losses as O(N) functions of those statistics
    reference.py    the ``torch`` backend: the spec in code, materializes S
    backends.py     registry, availability and backend="auto"
    temperature.py  DySTreSS per-pair temperature
"""
from . import backends, schedules
from .api import contrastive_loss, info_nce, max_margin
from .backends import available_backends
from .temperature import DySTreSS

__all__ = [
    "contrastive_loss",
    "info_nce",
    "max_margin",
    "DySTreSS",
    "available_backends",
    "schedules",
]
__version__ = "0.1.0"
