"""Packaging. The C++ CPU backend (csrc/) is compiled with ninja on first use and cached
(mmts_kernels.cpp_backend), so installing needs no compiler and no torch in the build environment."""
from setuptools import setup

setup()
