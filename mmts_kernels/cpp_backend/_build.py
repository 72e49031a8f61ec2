"""Build and load the C++ extension (csrc/) on first use.

The sources are compiled with ninja through ``torch.utils.cpp_extension.load`` the first time the backend is
asked for (``unavailable_reason`` or ``compute_stats``), never at ``import mmts_kernels``, and never at install
time (setup.py stays free of torch). The build directory is ``<torch extensions dir>/mmts_kernels_cpu_<hash>``,
where the hash covers the sources, the flags and the torch version: a change rebuilds, an unchanged tree reuses
the cached library. ``cpp_extension`` holds a file lock on that directory, so concurrent processes (pytest -n,
several jobs) build once and the others wait. Set ``MMTS_KERNELS_DISABLE_CPP=1`` to turn the backend off, and
``MMTS_KERNELS_VERBOSE_BUILD=1`` to see the compiler's output. At run time, ``MMTS_KERNELS_CPP_ISA=portable``
makes the float kernels skip their AVX2+FMA build for the portable one (what CPUs without AVX2 run).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

# A source checkout has csrc/ beside the package; a wheel carries a copy inside it (see setup.py).
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC = next((p for p in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc") if p.is_dir()), _PACKAGE.parent / "csrc")
SOURCES = ("mmts_cpu.cpp",)
HEADERS = ("tile_kernels.h",)
# -O3 and OpenMP (at::parallel_for is an OpenMP region in the header; `omp simd` vectorizes the reductions);
# -fno-trapping-math lets the compiler if-convert the clamps of the exp (no effect on results); -ffp-contract=off
# keeps S/τ rounded identically in every pass (see csrc/tile_kernels.h).
# No -march=native: the AVX2 variants are compiled with a target pragma and picked at run time.
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {}


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def _precheck() -> Optional[str]:
    if os.environ.get("MMTS_KERNELS_DISABLE_CPP", "") not in ("", "0"):
        return "disabled by MMTS_KERNELS_DISABLE_CPP"
    missing = [n for n in SOURCES + HEADERS if not (CSRC / n).is_file()]
    if missing:
        return (f"its C++ sources are not installed ({CSRC} lacks {', '.join(missing)}); "
                "install mmts_kernels from a source checkout (pip install -e .)")
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH); install g++ or clang++ to build it"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed; pip install ninja"
    return None


def load() -> Optional[str]:
    """Build (once per source hash) and load the operators; None on success, else why it failed (cached)."""
    if "reason" in _state:  # fast path without the lock (torch.compile traces through this call)
        return _state["reason"]
    with _lock:
        if "reason" in _state:
            return _state["reason"]
        reason = _precheck()
        if reason is None:
            try:
                from torch.utils import cpp_extension

                name = f"mmts_kernels_cpu_{_source_hash()}"
                cpp_extension.load(
                    name=name,
                    sources=[str(CSRC / n) for n in SOURCES],
                    extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS),
                    extra_include_paths=[str(CSRC)],
                    is_python_module=False,
                    verbose=os.environ.get("MMTS_KERNELS_VERBOSE_BUILD", "") not in ("", "0"),
                )
            except Exception as exc:  # a failed build must leave the torch backend usable
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                detail = " | ".join(lines[-3:])[:500] if lines else type(exc).__name__
                reason = f"building the C++ extension failed ({detail}); set MMTS_KERNELS_VERBOSE_BUILD=1 to see why"
        _state["reason"] = reason
        return reason
