# The two commands of the README: `make test` and `make bench`. Each creates .venv when missing and installs
# what it needs. --system-site-packages lets a GPU user's own torch (and triton) be used as they are.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmts-installed

.PHONY: test test-triton-latest bench install clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install "triton==3.6.0"
	$(PY) -m pip install -e ".[test,bench]"
	$(PY) -m pip install --no-deps "open-clip-torch==3.3.0"  # tests load its loss.py (needs only torch); --no-deps skips torchvision, timm, ...
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

# The Triton tests once more under the newest triton on PyPI (what a new user gets), beside the pinned one.
TRITON_LATEST := $(VENV)/triton-latest
$(TRITON_LATEST)/.installed: $(STAMP)
	$(PY) -m pip install --upgrade --no-deps --target $(TRITON_LATEST) triton
	touch $@

test-triton-latest: $(TRITON_LATEST)/.installed
	PYTHONPATH=$(TRITON_LATEST) $(PY) -c "import triton; print('triton', triton.__version__, triton.__file__)"
	PYTHONPATH=$(TRITON_LATEST) MMTS_KERNELS_REQUIRE_BACKENDS=triton $(PY) -m pytest python_tests/test_triton.py $(PYTEST_ARGS)
	PYTHONPATH=$(TRITON_LATEST) MMTS_KERNELS_REQUIRE_BACKENDS=triton $(PY) -m pytest python_tests/test_ntxent.py python_tests/test_topk.py python_tests/test_amcl.py python_tests/test_double_backward.py python_tests/test_sigmoid_labels_stats.py -k triton $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
