"""fastarch bench's rotary case: a tiny run prints its rows; the bytes it counts."""

from __future__ import annotations

import torch

from fastarch.bench import rope
from fastarch.cli import main


def test_bench_rotary_rows(capsys):
    args = ["bench", "--op", "rotary", "--device", "cpu", "--shapes", "2x3x8x16", "--dtype", "fp32,bf16",
            "--pass", "both", "--no-compile", "--rounds", "2"]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rotary ")]
    assert len(rows) == 4  # dtypes x passes
    assert all("2x3x8x16" in line and "cpu" in line for line in rows)


def test_bytes_moved():
    """q and k read, q_out and k_out written; cos and sin rows of S positions; twice with the backward."""
    case = rope.Case("rotary", (2, 3, 8, 16), torch.bfloat16, False, "cpu")
    assert case.bytes_moved == 4 * 2 * 3 * 8 * 16 * 2 + 2 * 8 * 8 * 4
    assert rope.Case("rotary", (2, 3, 8, 16), torch.bfloat16, True, "cpu").bytes_moved == 2 * case.bytes_moved
