"""CI cannot pass with a backend that does not run: a required backend (support.required_backends) that cannot run
stops the session with its reason, and its tests are never skipped; elsewhere they are skipped with the reason."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import support
from mmts_kernels import backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env,expected", [
    (dict(CI="true"), {"cpp", "triton"}),
    (dict(CI="true", MMTS_KERNELS_REQUIRE_BACKENDS=""), set()),
    (dict(CI="true", MMTS_KERNELS_REQUIRE_BACKENDS="triton"), {"triton"}),
    (dict(MMTS_KERNELS_REQUIRE_BACKENDS="cpp,triton"), {"cpp", "triton"}),
    (dict(), set()),
])
def test_required_backends(monkeypatch, env, expected):
    for name in ("CI", support.REQUIRE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert support.required_backends() == expected


def test_unknown_required_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(support.REQUIRE_ENV, "cpp cuda")
    with pytest.raises(ValueError, match="cuda"):
        support.required_backends()


@pytest.mark.parametrize("required,skipped", [("cpp", False), ("", True)])
def test_marker_skips_only_a_backend_that_is_not_required(monkeypatch, required, skipped):
    monkeypatch.setattr(backends._LOADED["cpp"], "unavailable_reason", lambda device=None: "simulated")
    monkeypatch.setenv(support.REQUIRE_ENV, required)
    marker = support.backend_marker("cpp")
    assert marker.args[0] is skipped and "simulated" in marker.kwargs["reason"]


def test_session_stops_when_a_required_backend_cannot_run():
    """A real pytest session with the C++ backend turned off where it is required: an error with the reason, before
    the test runs (where it is not required, the marker test above shows the skip)."""
    env = {**os.environ, "MMTS_KERNELS_DISABLE_CPP": "1", support.REQUIRE_ENV: "cpp"}
    target = "python_tests/test_validation.py::test_available_backends_reports_every_backend"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cpp: disabled by MMTS_KERNELS_DISABLE_CPP" in out.stdout + out.stderr
    assert "1 passed" not in out.stdout, out.stdout
