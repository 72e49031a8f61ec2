"""The README's code runs as written: the Quickstart block and the MM-TS training loop are read from README.md
itself and executed."""
from __future__ import annotations

from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(after_heading: str) -> str:
    """The first ```python block after the line that contains ``after_heading``."""
    text = README.read_text()
    rest = text[text.index(after_heading):]
    return rest.split("```python\n", 1)[1].split("```", 1)[0]


def run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "<README>", "exec"), namespace)
    return namespace


def test_readme_quickstart_runs():
    ns = run(readme_block("## Quickstart"))
    assert torch.isfinite(ns["loss"]) and ns["video"].grad is not None and torch.isfinite(ns["video"].grad).all()


def test_readme_mmts_training_loop_runs():
    ns = run(readme_block("An MM-TS training loop"))
    assert torch.isfinite(ns["loss"])
    tau = ns["criterion"].values(0)
    assert tau.shape == (512,) and (tau > 0).all()
