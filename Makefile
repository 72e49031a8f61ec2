# The two commands of the README: `make test` and `make bench`. Each creates .venv when missing and installs
# what it needs. --system-site-packages lets a GPU user's own torch (and triton) be used as they are.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmts-installed

.PHONY: test bench install clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install "triton==3.6.0"
	$(PY) -m pip install -e ".[test,bench]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
