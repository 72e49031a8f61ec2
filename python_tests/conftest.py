"""Hypothesis profiles: "ci" (default; bounded so the suite stays within minutes on 2 cores), "dev", "thorough".
Pick one with HYPOTHESIS_PROFILE=..."""
import os
import sys

import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run under Triton's interpreter. It must be chosen before triton is first imported
# (import mmts_kernels imports torch._dynamo, which imports triton.language); on a CUDA machine nothing changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # `import support` from every test file

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
