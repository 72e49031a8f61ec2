"""torch.compile support that costs nothing at import time.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (which imports triton: about 2 s on top of
torch's own import) only to set the attribute that dynamo reads when it meets a call of the marked function.
``assume_constant_result`` here does the same without that import while dynamo is not loaded; dynamo reads the mark
when it traces, by which time it is loaded. python_tests/test_import_cost.py checks that the public decorator still
marks a function exactly this way, and that ``import mmts_kernels`` loads neither dynamo nor triton.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def assume_constant_result(fn: F) -> F:
    """Under torch.compile, a call of ``fn`` is run once at trace time and its result is a constant of the graph."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn
