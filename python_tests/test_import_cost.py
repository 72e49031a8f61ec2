"""Importing mmts_kernels stays cheap: it never imports ``torch._dynamo`` (which imports triton, about 2 s on top of
torch's own import), nor triton; both load on first use (torch.compile, the triton backend). torch.compile of the
public API still treats the backend choice as a constant of the trace (mmts_kernels/backends.py)."""
from __future__ import annotations

import torch

from mmts_kernels import backends
from support import run_python


def test_import_loads_neither_dynamo_nor_triton():
    """``import mmts_kernels`` and then every module of the package but the Triton kernels themselves
    (``mmts_kernels.triton_backend.*``, which import triton by nature and load on the backend's first use)."""
    out = run_python("""
        import importlib, pkgutil, sys
        import mmts_kernels
        names = [m.name for m in pkgutil.walk_packages(mmts_kernels.__path__, "mmts_kernels.")
                 if not m.name.startswith("mmts_kernels.triton_backend.")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "triton" or m.startswith("torch._dynamo"))
        print(len(names), len(loaded), loaded[:5])
    """)
    assert out.returncode == 0, out.stderr
    modules, loaded = out.stdout.split()[:2]
    assert int(modules) >= 15 and loaded == "0", f"importing mmts_kernels' modules loaded {out.stdout.strip()}"


def test_the_light_mark_is_the_public_decorators():
    """compile_support marks a function by hand while dynamo is not loaded (as backends._choose is marked at import);
    the public decorator must mark a function the same way, else torch.compile would trace into the backend choice
    (and fail under fullgraph)."""
    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    mark = {k: v for k, v in vars(marked).items() if not k.startswith("__")}
    assert mark, "torch.compiler.assume_constant_result no longer marks the function with an attribute"
    assert mark.items() <= vars(backends._choose).items(), (mark, vars(backends._choose))


def test_fullgraph_compile_after_a_light_import():
    """The package imported first (dynamo not loaded yet), then torch.compile(fullgraph=True) of the public API with
    backend="auto": the choice is a constant of the trace and the value matches eager."""
    out = run_python("""
        import sys, torch
        import mmts_kernels as mk
        assert "torch._dynamo" not in sys.modules
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        tau = torch.rand(5, dtype=torch.float64) + 0.1
        compiled = torch.compile(lambda a, b, t: mk.info_nce(a, b, temperature=t), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, y, tau), mk.info_nce(x, y, temperature=tau), rtol=0, atol=0)
        print("ok")
    """, MMTS_KERNELS_DISABLE_CPP="1")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
