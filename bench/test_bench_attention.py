"""Microbenchmarks of attention and decoding, ours against PyTorch's SDPA, with
pytest-benchmark (``pytest bench/ --benchmark-only``). The cases and what an iteration does
are those of ``fastarch bench`` (fastarch/bench/attention.py, decode.py), on small shapes;
``fastarch bench`` adds FlexAttention, larger shapes and TFLOP/s or GB/s."""

import pytest
import torch

from fastarch.bench import attention, decode
from fastarch.bench.report import DTYPE_NAMES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
SDPA = "sdpa_flash" if DEVICE == "cuda" else "sdpa"
CASES = [
    attention.Case(op, (1, 8, 512, 64), dtype, backward, DEVICE)
    for op in attention.OPS
    for dtype in DTYPES
    for backward in (False, True)
] + [decode.Case("attention_decode", (4, 8, 2048, 64), dtype, False, DEVICE) for dtype in DTYPES]


def _name(case) -> str:
    return f"{case.op}-{'x'.join(map(str, case.shape))}-{DTYPE_NAMES[case.dtype]}-{'fwdbwd' if case.backward else 'fwd'}"


@pytest.mark.parametrize("contender", ["ours:auto", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_attention(benchmark, case, contender: str) -> None:
    name = SDPA if contender == "sdpa" and isinstance(case, attention.Case) else contender
    iteration = case.contenders(["auto"], compile=False)[name]
    iteration()

    def timed() -> None:
        iteration()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = _name(case)
    benchmark.extra_info["work"] = case.work
    benchmark.extra_info["unit"] = case.unit
    benchmark(timed)
