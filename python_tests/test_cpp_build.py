"""How the cpp backend is built and when it is not used (mmts_kernels/cpp_backend/_build.py), as the README states:
MMTS_KERNELS_DISABLE_CPP=1 turns it off, a failed build leaves ``available_backends()["cpp"]`` saying why and
``backend="auto"`` on torch, the build follows the sources (changed sources are compiled again, under a new name;
unchanged ones reuse the cached library) and their location (two checkouts keep two libraries), and a builder killed
mid-build (SIGTERM or SIGKILL) never blocks the next process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mmts_kernels as mk
from mmts_kernels import backends
from mmts_kernels.cpp_backend import _build
from support import backend_marker, run_python

CPU = torch.device("cpu")
x4, y4 = torch.randn(4, 3), torch.randn(4, 3)


@pytest.fixture
def fresh_build(monkeypatch):
    """This process forgets the outcome of its build (the loaded library stays loaded); restored afterwards."""
    monkeypatch.setattr(_build, "_state", {})


@pytest.fixture
def source_copy(tmp_path, monkeypatch, fresh_build):
    """The backend builds from a copy of csrc/ (returned) into a private extensions directory."""
    src = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, src)
    monkeypatch.setattr(_build, "CSRC", src)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return src


def test_disable_environment_variable_turns_cpp_off():
    """In a fresh process: the library is never built or loaded, the reason names the variable, auto uses torch."""
    out = run_python("""
        import torch, mmts_kernels as mk
        from mmts_kernels import backends
        print(mk.available_backends()["cpp"])
        print(backends.resolve("auto", torch.device("cpu")).__name__)
        print(hasattr(torch.ops.mmts_kernels, "cpu_stats"))
        try:
            mk.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cpp")
        except ValueError as exc:
            print("refused:", exc)
    """, MMTS_KERNELS_DISABLE_CPP="1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["disabled by MMTS_KERNELS_DISABLE_CPP", "mmts_kernels.reference", "False"], lines
    assert lines[3].startswith("refused: backend='cpp'") and "MMTS_KERNELS_DISABLE_CPP" in lines[3], lines


@pytest.mark.parametrize("value,disabled", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_disable_values(monkeypatch, fresh_build, value, disabled):
    monkeypatch.setenv("MMTS_KERNELS_DISABLE_CPP", value)
    assert (_build._precheck() == "disabled by MMTS_KERNELS_DISABLE_CPP") == disabled


@backend_marker("cpp")
def test_failed_build_says_why_and_auto_uses_torch(source_copy):
    """Sources that do not compile: the cached library of the good sources is not reused (the sources changed),
    the build fails, the reason says so, "auto" picks torch, backend="cpp" is refused with that reason, and the
    failed build leaves neither a library nor its private folder behind."""
    for name in _build.SOURCES:  # every source, with a fatal error (a missing header), so the compiler stops at once
        cpp = source_copy / name
        cpp.write_text('#include "planted_by_test_cpp_build.h"\n' + cpp.read_text())
    reason = mk.available_backends()["cpp"]
    assert reason is not None and reason.startswith("building the C++ extension failed"), reason
    assert "planted_by_test_cpp_build.h" in reason, reason
    assert backends.resolve("auto", CPU).__name__ == "mmts_kernels.reference"
    torch.testing.assert_close(mk.info_nce(x4, y4), mk.info_nce(x4, y4, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend='cpp'.*building the C.. extension failed"):
        mk.info_nce(x4, y4, backend="cpp")
    folder = _build.library_path().parent
    assert not _build.library_path().exists() and not list(folder.glob("build-*")), list(folder.iterdir())


def test_changed_sources_are_built_again(source_copy):
    """The library's name (its folder) carries a hash of every source and header: an edit of either builds a new
    library, unchanged sources load the cached one."""
    first = _build.library_path()
    assert _build.library_path() == first
    (source_copy / "tile_kernels.h").write_text((source_copy / "tile_kernels.h").read_text() + "\n// edited\n")
    second = _build.library_path()
    (source_copy / "mmts_cpu.cpp").write_text((source_copy / "mmts_cpu.cpp").read_text() + "\n// edited\n")
    third = _build.library_path()
    assert len({first, second, third}) == 3
    assert all(p.name.startswith("mmts_kernels_cpu_") and p.parent.name == p.name.split(".")[0]
               for p in (first, second, third))


def test_separate_checkouts_keep_separate_libraries(tmp_path, monkeypatch):
    """Identical sources at two locations (two clones, two installs) get two libraries, so neither rebuilds the
    other's; the same location always names the same one."""
    paths = []
    for where in ("clone_a", "clone_b"):
        shutil.copytree(_build.CSRC, tmp_path / where / "csrc")
        monkeypatch.setattr(_build, "CSRC", tmp_path / where / "csrc")
        paths.append(_build.library_path())
        assert _build.library_path() == paths[-1]
    assert paths[0] != paths[1]


# ---------------------------------------------------------------------------------------------------------------
# A builder killed mid-build. torch's own file lock stayed behind and every later process waited on it forever.

# The builds go through _build.load() exactly as the backend's do, with one small source instead of csrc/ (its
# compilation is shorter, yet long enough to be killed halfway); a process prints the reason (None) and the probe
# op's output, so it has loaded the library.
PROBE_SOURCE = """
#include <ATen/ATen.h>
#include <torch/library.h>

at::Tensor probe(const at::Tensor& x) { return x + 1; }

TORCH_LIBRARY(mmts_kernels_build_probe, m) { m.def("probe(Tensor x) -> Tensor", &probe); }
"""
BUILD_SCRIPT = """
import sys
from pathlib import Path
import torch
from mmts_kernels.cpp_backend import _build
_build.CSRC, _build.SOURCES, _build.HEADERS = Path(sys.argv[1]), ("probe.cpp",), ()
print(_build.load(), torch.ops.mmts_kernels_build_probe.probe(torch.zeros(1)).item())
"""
STARTED = "building the C++ backend once"
FINISHED = "the C++ backend is built"


class _Process:
    """``script`` with the probe's folder as argument, in a fresh interpreter with this one's import path, in its own
    session (so its process group, compilers included, can be signalled and cleaned up); a thread collects its
    stderr as it comes."""

    def __init__(self, env: dict, csrc: Path, script: str = BUILD_SCRIPT):
        self.popen = subprocess.Popen([sys.executable, "-c", script, str(csrc)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})
        self.pid = self.popen.pid
        self.lines: list = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.popen.stderr), daemon=True)
        self._reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        """Until a line of stderr contains ``text``; fails after ``timeout`` seconds or if the process ends first."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            ended = not self._reader.is_alive()  # stderr closed: the process is gone (its last lines are in)
            if (ended and text not in self.stderr) or time.monotonic() > deadline:
                pytest.fail(f"no stderr line with {text!r} (after {timeout} s or at exit): {self.stderr[-2000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> tuple:
        """(return code, stdout, stderr) once the process ends; subprocess.TimeoutExpired after ``timeout`` s."""
        code = self.popen.wait(timeout=timeout)
        self._reader.join()
        return code, self.popen.stdout.read(), self.stderr

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()


def _probe_sources(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "probe.cpp").write_text(PROBE_SOURCE)
    return folder


@backend_marker("cpp")
def test_a_killed_build_never_blocks_the_next_process(tmp_path):
    """Two builders killed mid-build: one by SIGTERM to its whole process group (what `timeout`, a scheduler or a
    terminal send), one by SIGKILL to the Python process alone (its compilers live on as orphans, and Python runs
    no cleanup). The next process takes the build over and finishes within a bounded time, removes their private
    folders, and later processes load the cached library without building."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    csrc = _probe_sources(tmp_path / "csrc")
    started = []
    try:
        for sig, whole_group in ((signal.SIGTERM, True), (signal.SIGKILL, False)):
            victim = _Process(env, csrc)
            started.append(victim)
            victim.wait_for(STARTED, timeout=180)
            time.sleep(2)  # ninja and the compiler are running in the victim's private folder
            assert list((tmp_path / "extensions").glob("mmts_kernels_cpu_*/build-*/build.ninja"))
            if whole_group:
                os.killpg(victim.pid, sig)
            else:
                os.kill(victim.pid, sig)
            assert victim.popen.wait(timeout=30) == -sig

        builder = _Process(env, csrc)
        started.append(builder)
        builder.wait_for(STARTED, timeout=180)  # the orphaned compilers do not hold the lock
        for victim in started[:2]:
            victim.kill_group()  # from now on the orphans would only take CPU
        code, out, err = builder.finish(timeout=400)
        assert code == 0 and out.split() == ["None", "1.0"] and FINISHED in err, err[-3000:]
    finally:
        for proc in started:
            proc.kill_group()

    library, = (tmp_path / "extensions").glob("mmts_kernels_cpu_*/mmts_kernels_cpu_*.so")
    assert not list(library.parent.glob("build-*")), list(library.parent.iterdir())  # the dead builders' folders
    code, out, err = _Process(env, csrc).finish(timeout=120)
    assert code == 0 and out.split() == ["None", "1.0"] and "mmts_kernels:" not in err, err[-3000:]


# Loads whatever library sits at the probe's place (the test puts the backend's own there) and says whether the
# backend's operators are registered.
LOAD_SCRIPT = BUILD_SCRIPT.replace("torch.ops.mmts_kernels_build_probe.probe(torch.zeros(1)).item()",
                                   "hasattr(torch.ops.mmts_kernels, 'cpu_stats')")


@backend_marker("cpp")
def test_a_live_builder_is_waited_for(tmp_path, monkeypatch):
    """While another process holds the build lock (here: this test), a process says whom it waits for, and once the
    holder has put the library in place (here: a copy of the backend's) it loads it instead of building its own."""
    import fcntl

    assert mk.available_backends()["cpp"] is None
    built_elsewhere = _build._state["library"]
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    csrc = _probe_sources(tmp_path / "csrc")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setattr(_build, "CSRC", csrc)
    monkeypatch.setattr(_build, "SOURCES", ("probe.cpp",))
    monkeypatch.setattr(_build, "HEADERS", ())
    library = _build.library_path()
    library.parent.mkdir(parents=True)
    with open(library.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(str(os.getpid()))
        lock.flush()
        waiter = _Process(env, csrc, LOAD_SCRIPT)
        try:
            waiter.wait_for(f"waiting for process {os.getpid()}, which is building", timeout=120)
            shutil.copy(built_elsewhere, library.with_suffix(".tmp"))
            os.replace(library.with_suffix(".tmp"), library)  # what a builder does when it is done
        except BaseException:
            waiter.kill_group()
            raise
    code, out, err = waiter.finish(timeout=120)
    assert code == 0 and out.split() == ["None", "True"] and STARTED not in err, err[-3000:]
