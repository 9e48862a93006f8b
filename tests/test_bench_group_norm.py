"""fastarch bench --op group_norm / group_norm_nhwc: a quick run prints the rows and saves them;
the bytes it counts."""

import json

import pytest
import torch

from fastarch.bench import group_norms
from fastarch.cli import main


def test_bench_group_norm_quick(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--quick", "--op", "group_norm,group_norm_nhwc", "--device", "cpu", "--shapes", "2x64x9x9",
            "--dtype", "fp32,bf16", "--pass", "both", "--no-compile", "--rounds", "2", "--json", str(path)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("group_norm")]
    assert len(table) == 2 * 2 * 2  # layouts x dtypes x passes
    assert all("2x64x9x9" in line and " cpu/" in line and "(auto)" in line for line in table)  # cpu/<isa level>
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"group_norm", "group_norm_nhwc"}
    for row in rows:
        assert row["ran"].startswith("cpu/") and row["ours_us"] > 0 and row["baseline_us"]["eager"] > 0 and not row["errors"]
        assert row["unit"] == "GB/s" and row["rate"] > 0


N, C, H, W = 2, 64, 9, 9
E = N * C * H * W
STATS = 2 * N * 32 * 4  # mean and rstd, fp32, 32 groups
# x read, y written, weight and bias read, the statistics written
FWD = 2 * E * 4 + 2 * C * 4 + STATS
# x and dy read, dx written, weight and bias read, dweight and dbias written, statistics read
BWD = 3 * E * 4 + 4 * C * 4 + STATS


@pytest.mark.parametrize("op", ["group_norm", "group_norm_nhwc"])
@pytest.mark.parametrize("backward, expected", [(False, FWD), (True, FWD + BWD)])
def test_bytes_moved(op, backward, expected):
    assert group_norms.Case(op, (N, C, H, W), torch.float32, backward, "cpu").work == expected
