"""Test-wide setup. Without a GPU the Triton kernels run under the interpreter on CPU tensors,
which must be switched on before triton is imported."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    n_gpu = torch.cuda.device_count() if _HAS_CUDA else 0
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {n_gpu}")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
