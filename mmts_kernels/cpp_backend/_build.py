"""Build and load the C++ extension (csrc/) on first use.

The sources are compiled with ninja (through ``torch.utils.cpp_extension.load``) the first time the backend is
asked for (``unavailable_reason`` or ``compute_stats``), never at ``import mmts_kernels``, and never at install
time (setup.py stays free of torch). The finished library is ``<torch extensions dir>/<name>/<name>.so`` with
``name = mmts_kernels_cpu_<hash>``; the hash covers the sources, the flags, the torch and Python versions and the
sources' location, so a change rebuilds, an unchanged tree reuses the cached library, and two checkouts (or
installs) on one machine keep separate libraries instead of rebuilding one in turn. Later processes load it with
``torch.ops.load_library``.

A build never blocks a later process, even when its builder is killed. It runs in a private folder beside the
library and the finished library is moved into place with one ``os.replace``, so other processes see either no
library or a whole one. An ``fcntl.flock`` lock lets one process build while concurrent ones (pytest -n, several
jobs) wait for it; the kernel drops the lock when its holder dies, and the next process takes it over, removes the
dead builder's folder and builds. (torch's own lock, a file that a killed builder leaves behind, made every later
process wait forever.) The one-time build says so on stderr when it starts and when it ends.

Set ``MMTS_KERNELS_DISABLE_CPP=1`` to turn the backend off, and ``MMTS_KERNELS_VERBOSE_BUILD=1`` to see the
compiler's output. At run time, ``MMTS_KERNELS_CPP_ISA=portable`` makes the float kernels skip their AVX2+FMA build
for the portable one (what CPUs without AVX2 run).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

# A source checkout has csrc/ beside the package; a wheel carries a copy inside it (see setup.py).
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC = next((p for p in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc") if p.is_dir()), _PACKAGE.parent / "csrc")
SOURCES = ("mmts_cpu.cpp", "topk_cpu.cpp")
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
    h.update(f"python{sys.version_info[0]}.{sys.version_info[1]}".encode())
    h.update(str(CSRC.resolve()).encode())  # separate checkouts and installs keep separate libraries
    return h.hexdigest()[:12]


def library_path() -> Path:
    """Where the finished library of the current sources lives (whether or not it is built yet)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    name = f"mmts_kernels_cpu_{_source_hash()}"
    return Path(root) / name / f"{name}{cpp_extension.LIB_EXT}"


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
    """Build (once per source hash) and load the operators; None on success, else why it failed (cached).
    ``_state["library"]`` is then the path of the loaded library."""
    if "reason" in _state:  # fast path without the lock (torch.compile traces through this call)
        return _state["reason"]
    with _lock:
        if "reason" in _state:
            return _state["reason"]
        reason = _precheck()
        if reason is None:
            try:
                library = library_path()
                _load_or_build(library)
                _state["library"] = library
            except Exception as exc:  # a failed build must leave the torch backend usable
                reason = (f"building the C++ extension failed ({_failure_detail(exc)}); "
                          "set MMTS_KERNELS_VERBOSE_BUILD=1 to see why")
        _state["reason"] = reason
        return reason


def _failure_detail(exc: Exception) -> str:
    """The compiler's first error lines when there are some (ninja builds the sources in parallel, so the output
    ends with whatever finished last), else the message's last lines."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    detail = " | ".join(errors[:2] or lines[-3:])[:500]
    return detail or type(exc).__name__


def _load_or_build(library: Path) -> None:
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(library.parent / "build.lock") as exclusive:
            if not library.is_file():  # else another process built it while this one waited
                if exclusive:
                    _remove_abandoned_builds(library.parent)
                _build_and_load(library)
                return
    torch.ops.load_library(str(library))


_PRIVATE_PREFIX = "build-"  # a builder's private folder, beside the library


def _build_and_load(library: Path) -> None:
    """Compile in a private folder, then move the library into place atomically (same file system: os.replace).
    ``cpp_extension.load`` loads what it built, from the private folder; the mapping outlives the move."""
    from torch.utils import cpp_extension

    private = Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-", dir=library.parent))
    print(f"mmts_kernels: building the C++ backend once, about a minute (cached in {library.parent})...",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        built = cpp_extension.load(
            name=library.parent.name,
            sources=[str(CSRC / n) for n in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            extra_include_paths=[str(CSRC)],
            build_directory=str(private),
            is_python_module=False,
            verbose=os.environ.get("MMTS_KERNELS_VERBOSE_BUILD", "") not in ("", "0"),
        )
        os.replace(built, library)
    except BaseException:
        print(f"mmts_kernels: building the C++ backend failed after {time.monotonic() - start:.0f} s; "
              "mmts_kernels.available_backends()['cpp'] says why", file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    print(f"mmts_kernels: the C++ backend is built ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)


def _remove_abandoned_builds(folder: Path) -> None:
    """Private folders of builders that died (only the lock's holder builds, and this process holds it)."""
    for stale in folder.glob(f"{_PRIVATE_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """One builder at a time, per library. An ``fcntl.flock`` lock belongs to its open file, so the kernel drops it
    when the holder dies however it dies (SIGKILL included): a dead builder never blocks the next process. The
    holder's pid is written into the file for the message of those who wait. Yields whether the lock is exclusive:
    without fcntl (Windows) the private folders still keep concurrent builds apart; they may just build twice."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"mmts_kernels: waiting for process {holder}, which is building the C++ backend...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock
