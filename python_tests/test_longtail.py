"""Tests of the long-tail experiment (`python -m bench.longtail`): its statistics, controls, data and tuning, and a
tiny end-to-end run. Each runs in seconds."""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `bench` is not an installed package: import it from the checkout

from bench import longtail, longtail_data, longtail_methods, longtail_stats  # noqa: E402
