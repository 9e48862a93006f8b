import os

# pytest -n auto runs a worker per core, and each worker's OpenMP threads (PyTorch's and the
# CPU kernels') default to a thread per core as well. OpenMP's idle threads spin while they
# wait, so on a busy machine they burn the cores the other workers' threads need: the CPU
# kernel tests ran 3-4x slower on two cores. Passive waiting (the threads sleep) changes no
# result. OpenMP reads this when it starts, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# What fastarch keeps between runs (a GGUF file's tokenizer: fastarch.models.gguf) goes to a
# directory of this run's, not the user's ~/.cache/fastarch.
if "FASTARCH_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FASTARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastarch-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on the CPU in Triton's interpreter. Triton reads this when
# it is imported, so it must be set before anything imports triton (fastarch does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastarch  # noqa: E402,F401
import triton_interpreter  # noqa: E402  (tests/triton_interpreter.py)

if os.environ.get("TRITON_INTERPRET") == "1":
    triton_interpreter.install()  # about a quarter less interpreted time, the same results

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_isa():
    """Selects the CPU kernels' instruction set for one test (backend_rows.set_cpu_isa: a level
    this CPU or build cannot run skips it with the reason), then restores the default."""
    import backend_rows  # tests/backend_rows.py

    yield backend_rows.set_cpu_isa
    backend_rows.set_cpu_isa(backend_rows.DEFAULT_ISA)
