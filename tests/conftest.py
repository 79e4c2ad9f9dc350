import pytest
import torch

from ffa import _lib
from ffa.tuner import cache


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip where there is no CUDA GPU, and only then: every other test runs, and
    fails if something it needs is missing (the test extra's packages, the compiled library)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def library_for_gpu_tests(request):
    """A GPU test on a machine with a GPU fails, with the loader's reason, when the compiled library
    cannot be used (not built, or of another version), instead of being skipped."""
    if "gpu" in request.keywords:
        _lib.load()


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
