"""Benchmarks and experiments, runnable as modules: `python -m bench` (see bench/__main__.py)."""
