"""Microbenchmarks of the norm ops, ours against PyTorch eager, with pytest-benchmark:

    pytest bench/ --benchmark-only

Each group is one case (op, shape, dtype, pass) with two entries, ours and eager. The cases
and what an iteration does (forward, or forward + backward with fixed output gradients) are
those of ``fastarch bench`` (fastarch/bench/norms.py), on small shapes so the file runs in a
couple of minutes; ``fastarch bench`` adds torch.compile, larger shapes and GB/s.
"""

import pytest
import torch

from fastarch.bench import norms
from fastarch.bench.report import DTYPE_NAMES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1024, 768), (256, 4096)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
CASES = [
    norms.Case(op, shape, dtype, backward, DEVICE)
    for op in norms.OPS
    for shape in SHAPES
    for dtype in DTYPES
    for backward in (False, True)
]


def _name(case: norms.Case) -> str:
    shape = "x".join(map(str, case.shape))
    return f"{case.op}-{shape}-{DTYPE_NAMES[case.dtype]}-{'fwdbwd' if case.backward else 'fwd'}"


@pytest.mark.parametrize("contender", ["ours:auto", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_norm(benchmark, case: norms.Case, contender: str) -> None:
    iteration = case.contenders(["auto"], compile=False)[contender]
    iteration()  # fails here, not inside the timer, when it cannot run

    def timed() -> None:
        iteration()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = _name(case)
    benchmark.extra_info["bytes"] = case.bytes_moved
    benchmark(timed)
