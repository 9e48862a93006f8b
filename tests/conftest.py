import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU in Triton's interpreter. Triton reads this when
# it is imported, so it must be set before anything imports triton (fastarch does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastarch  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
