"""Backend registry: which implementations of ``compute_stats`` exist, whether they run here, and "auto".

Each backend is a module exposing

    unavailable_reason(device: torch.device | None) -> str | None   # None: usable (on that device)
    compute_stats(x, y, tau, margin, targets, request) -> Stats       # the contract of mmts_kernels.stats

Modules are imported lazily: importing mmts_kernels never imports triton, builds C++ or queries a GPU.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

_MODULES = {
    "torch": "mmts_kernels.reference",
    "triton": "mmts_kernels.triton_backend",
    "cpp": "mmts_kernels.cpp_backend",
}


def _module(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[name]:
            return None, f"the {name} backend is not part of this version of mmts_kernels yet"
        return None, f"the {name} backend cannot be imported: {exc}"


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    module, reason = _module(name)
    return reason if module is None else module.unavailable_reason(device)


def available_backends() -> Dict[str, Optional[str]]:
    """backend name -> None if it can run here (on some device of this machine), else the reason it cannot."""
    return {name: unavailable_reason(name) for name in _MODULES}


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ("auto" picks one) on ``device``; ValueError saying why if it cannot run."""
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp"
        name = preferred if unavailable_reason(preferred, device) is None else "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend={name!r} is not available for {device.type} tensors here: {reason}")
    module, _ = _module(name)
    return module
