"""How the cpp backend is built and when it is not used (mmts_kernels/cpp_backend/_build.py), as the README states:
MMTS_KERNELS_DISABLE_CPP=1 turns it off, a failed build leaves ``available_backends()["cpp"]`` saying why and
``backend="auto"`` on torch, and the build follows the sources (changed sources are compiled again, under a new name;
unchanged ones reuse the cached library)."""
from __future__ import annotations

import shutil

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
    """A source that does not compile: the cached library of the good sources is not reused (the sources changed),
    the build fails, the reason says so, "auto" picks torch, and backend="cpp" is refused with that reason."""
    cpp = source_copy / "mmts_cpu.cpp"
    cpp.write_text("#error planted by test_cpp_build\n" + cpp.read_text())
    reason = mk.available_backends()["cpp"]
    assert reason is not None and reason.startswith("building the C++ extension failed"), reason
    assert "planted by test_cpp_build" in reason, reason
    assert backends.resolve("auto", CPU).__name__ == "mmts_kernels.reference"
    torch.testing.assert_close(mk.info_nce(x4, y4), mk.info_nce(x4, y4, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend='cpp'.*building the C.. extension failed"):
        mk.info_nce(x4, y4, backend="cpp")


@backend_marker("cpp")
def test_changed_sources_are_built_again(source_copy, monkeypatch):
    """The library's name (its build directory) carries a hash of every source and header: an edit of either
    builds a new library, unchanged sources load the cached one."""
    from torch.utils import cpp_extension

    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: names.append(name))

    def build_name() -> str:
        _build._state.clear()
        assert _build.load() is None
        return names[-1]

    first = build_name()
    assert build_name() == first
    (source_copy / "tile_kernels.h").write_text((source_copy / "tile_kernels.h").read_text() + "\n// edited\n")
    second = build_name()
    (source_copy / "mmts_cpu.cpp").write_text((source_copy / "mmts_cpu.cpp").read_text() + "\n// edited\n")
    third = build_name()
    assert len({first, second, third}) == 3, names
    assert all(n.startswith("mmts_kernels_cpu_") for n in names)
