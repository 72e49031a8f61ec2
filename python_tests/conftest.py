"""Hypothesis profiles: "ci" (default; bounded so the suite stays within minutes on 2 cores), "dev", "thorough".
Pick one with HYPOTHESIS_PROFILE=...

Required backends (support.required_backends: MMTS_KERNELS_REQUIRE_BACKENDS, or cpp and triton under CI=true): if one
of them cannot run here, the session stops with an error before the first test, instead of skipping its tests.
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before triton is first imported
# (import mmts_kernels does not import it; torch._dynamo does, i.e. torch.compile and opcheck, and so does the triton
# backend's first use); on a CUDA machine nothing changes.
# An inherited TRITON_INTERPRET=0 is kept: the triton backend then cannot run, which is a skip on a user's machine
# and an error where triton is required.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # `import support` from every test file

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionstart(session):
    import support  # after TRITON_INTERPRET is settled: support imports mmts_kernels

    missing = support.missing_required_backends()
    if missing:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in missing.items())
        pytest.exit(f"required backends cannot run here ({support.REQUIRE_ENV} / CI=true), so their tests would "
                    f"only be skipped:\n{lines}", returncode=1)
