"""Backend registry: which implementations of ``compute_stats`` exist, whether they run here, and "auto".

Each backend is a module exposing

    unavailable_reason(device: torch.device | None) -> str | None   # None: usable (on that device)
    compute_stats(x, y, tau, margin, targets, request) -> Stats       # the contract of mmts_kernels.stats

The backend packages are light to import: importing mmts_kernels never imports triton or torch._dynamo, builds C++
or queries a GPU; those happen in ``unavailable_reason`` / ``compute_stats`` / torch.compile on first use
(python_tests/test_import_cost.py).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

from .compile_support import assume_constant_result

_MODULES = {
    "torch": "mmts_kernels.reference",
    "triton": "mmts_kernels.triton_backend",
    "cpp": "mmts_kernels.cpp_backend",
}


def _import_all() -> tuple[Dict[str, ModuleType], Dict[str, str]]:
    loaded, missing = {}, {}
    for name, path in _MODULES.items():
        try:
            loaded[name] = importlib.import_module(path)
        except ImportError as exc:  # a trimmed install: say so instead of failing to import the package
            missing[name] = f"the {name} backend cannot be imported: {exc}"
    return loaded, missing


_LOADED, _MISSING = _import_all()


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    if name in _MISSING:
        return _MISSING[name]
    return _LOADED[name].unavailable_reason(device)


def available_backends() -> Dict[str, Optional[str]]:
    """backend name -> None if it can run here (on some device of this machine), else the reason it cannot."""
    return {name: unavailable_reason(name) for name in _MODULES}


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ("auto" picks one) on ``device``; ValueError saying why if it cannot run."""
    return _LOADED[_choose(name, torch.device(device).type)]


# Under torch.compile the choice is a constant of the trace: it depends only on the backend name and the device
# type, and it reads the environment, imports triton or loads the C++ library, which dynamo would otherwise try to
# trace. It returns the backend's name, a constant dynamo can guard on.
@assume_constant_result
def _choose(name: str, device_type: str) -> str:
    device = torch.device(device_type)
    if name == "auto":
        preferred = "triton" if device_type == "cuda" else "cpp"
        name = preferred if unavailable_reason(preferred, device) is None else "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend={name!r} is not available for {device_type} tensors here: {reason}")
    return name
