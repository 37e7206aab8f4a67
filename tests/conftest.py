import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # `make test` builds the extension first: a broken build must fail the run, not skip every
    # C++ parity test as an optional backend
    if os.environ.get("VLMKERNELS_REQUIRE_EXT") == "1":
        from vlmkernels import _ext

        if _ext.C is None:
            raise pytest.UsageError(f"VLMKERNELS_REQUIRE_EXT=1 but vlmkernels._C is not importable: {_ext.IMPORT_ERROR}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add sync overhead, and on a loaded box spinning workers
    slow each small op down by 10x or more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return request.param
