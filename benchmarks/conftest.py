"""Benchmarks: GPU ones need torch with CUDA and numba-cuda; they skip with a reason elsewhere."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        ok = torch.cuda.is_available()
        why = "torch sees no CUDA device"
    except ImportError:
        ok, why = False, "torch not installed"
    if ok:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"GPU benchmark: {why}"))
