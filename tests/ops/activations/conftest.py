import pytest

import backend_rows  # tests/backend_rows.py
from fastarch._extension import _C


@pytest.fixture
def cpu_isa():
    """Selects the CPU kernels' instruction set for one test, then restores the default."""
    yield backend_rows.set_cpu_isa
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
