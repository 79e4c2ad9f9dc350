import pytest
import torch

from ffa.tuner import cache


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


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty tuner cache directory: no test reads the user's tunings."""
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "ffa-cache"))
    cache.reset()
    yield tmp_path / "ffa-cache"
    cache.reset()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems: waking a pool of CPU threads costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
