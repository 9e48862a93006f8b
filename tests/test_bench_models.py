"""fastarch bench --model: a tiny run times ours against sentence-transformers on the real
MiniLM and records that both embed alike."""

import json

from fastarch import cli
from fastarch.bench import models


def test_bench_model_minilm_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "SENTENCES", 4)
    monkeypatch.setattr(models, "BATCHES", (2,))
    monkeypatch.setattr(models, "SETS", ("mixed",))
    monkeypatch.setattr(models, "onnx_encoder", lambda *a: None)  # the ONNX export alone takes ~20 s
    path = tmp_path / "models.json"
    assert cli.main(["bench", "--model", "minilm", "--dtype", "fp32", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "minilm   mixed   batch 2" in out and "sentence-transformers" in out
    (row,) = json.loads(path.read_text())["rows"]
    assert row["ours_per_s"] > 0 and row["theirs"]["sentence-transformers"] > 0
    assert row["errors"]["onnxruntime"] == "onnxruntime is not installed"
    # fp32 against sentence-transformers' fp32: the same embedding up to rounding
    assert row["min_cosine"]["ours"] > 0.99999 and row["min_cosine"]["sentence-transformers"] > 0.999999
