"""fastarch bench --model unet --quick: a tiny UNet in place of the CIFAR-10 one, one round; the
rows are timed, ours agrees with diffusers, and the JSON holds them."""

import json

import pytest

pytest.importorskip("diffusers")

from fastarch import cli
from fastarch.bench import unet


def test_bench_unet_quick_rows(tmp_path, monkeypatch, capsys):
    tiny = {**unet.CONFIG, "sample_size": 8, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 8}
    monkeypatch.setattr(unet, "CONFIG", tiny)
    monkeypatch.setattr(unet, "QUICK_DDIM_STEPS", 2)
    path = tmp_path / "unet.json"
    assert cli.main(["bench", "--model", "unet", "--quick", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "forward  batch 4" in out and "ddim     batch 1   2 steps" in out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["case"], r["dtype"]) for r in rows] == [("forward", "fp32"), ("ddim", "fp32"), ("forward", "bf16")]
    for r in rows:
        assert r["ours_ms"] > 0 and r["diffusers_ms"] > 0 and r["vs"] > 0, r
        assert r["rel_diff"] <= (1e-4 if r["dtype"] == "fp32" else 0.1), r


def test_graph_row_reports_a_graph_not_kept(tmp_path, monkeypatch):
    """The "graph" row (run on a GPU only) on the CPU, where no graph can be captured: a row
    naming why ours has no time, not a crash or an eager time under its name; with the CPU's
    tensors let through to a capture, which fails there, a warning and the capture's error."""
    import diffusers
    import torch

    from fastarch.cuda_graphs import GraphedCall
    from fastarch.models.unet2d import UNet2D

    tiny = {**unet.CONFIG, "sample_size": 8, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 8}
    torch.manual_seed(0)
    diffusers.UNet2DModel(**tiny).save_pretrained(tmp_path)
    ours, theirs = UNet2D.from_pretrained(tmp_path), diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    row = unet._graphed_step(ours, theirs, x, t, "fp32", 1, "cpu")
    assert row.case == "graph" and row.ours_ms is None and "no capture (not on a GPU" in row.errors["ours"]
    monkeypatch.setattr(GraphedCall, "_on_graph_device", lambda self, t: True)
    monkeypatch.setattr(GraphedCall, "_warm_up", lambda self, run: run())
    with pytest.warns(RuntimeWarning, match="the graph row without a CUDA graph: the capture failed"):
        row = unet._graphed_step(ours, theirs, x, t, "fp32", 1, "cpu")
    assert "the capture failed" in row.errors["ours"]
    assert row.case == "graph" and row.ours_ms is None and "not kept" in row.errors["ours"]
