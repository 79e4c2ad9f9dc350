import pytest
import torch


def gpu_ready():
    if not torch.cuda.is_available():
        return False
    from ffa import _lib
    return _lib.available()


def pytest_collection_modifyitems(config, items):
    if gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the compiled FFA library")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
