"""fastarch bench --dropin: prints the CPU, one row per workload with both times and the ratio
(the real workloads load MiniLM and a UNet; a tiny stand-in keeps this test fast)."""

import json

import torch

from fastarch.bench import dropin
from fastarch.cli import main


def test_prints_a_row_per_workload(tmp_path, capsys, monkeypatch):
    def tiny(device):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
        x = torch.randn(8, 16)
        return model, lambda m: m(x), "8x16"

    monkeypatch.setattr(dropin, "WORKLOADS", {"tiny": tiny})
    path = tmp_path / "dropin.json"
    assert main(["bench", "--dropin", "--device", "cpu", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fastarch bench --dropin:" in out and "speedup" in out
    row = next(line for line in out.splitlines() if line.startswith("tiny "))
    assert row.split()[-2] == "2"  # the Linear and the LayerNorm swapped
    saved = json.loads(path.read_text())["rows"][0]
    assert saved["workload"] == "tiny" and saved["speedup"] > 0 and saved["max_diff"] < 1e-5
