"""fastarch bench --model smollm2: a tiny run times ours against transformers' generate and
records that both chose the same greedy tokens. The model is a small random LLaMA written with
save_pretrained, loaded by both as the bench loads the GGUF (loading and dequantizing the real
SmolLM2 file takes ~25 s here); bench --model smollm2 on the real file is run by hand."""

import json

import pytest
import torch

from fastarch import cli
from fastarch.bench import generation


def test_bench_model_smollm2_rows(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fastarch.models import from_pretrained

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")

    def load_models(file, dtype):
        assert file == tmp_path / "model.gguf"
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=dtype).eval()
        return from_pretrained(tmp_path / "llama", dtype=dtype), theirs

    monkeypatch.setattr(generation, "gguf_file", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(generation, "load_models", load_models)
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(generation, "SHORT_PROMPT", 4)
    monkeypatch.setattr(generation, "NEW_TOKENS", 16)  # decode well above the timing noise
    monkeypatch.setattr(generation, "BATCHES", (2,))
    path = tmp_path / "generation.json"
    assert cli.main(["bench", "--model", "smollm2", "--dtype", "fp32", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "prefill  batch 1" in out and "decode   batch 2" in out and "transformers" in out
    doc = json.loads(path.read_text())
    assert doc["machine"]["copy_bandwidth_gbps"] > 0
    prefill, decode = doc["rows"]
    assert (prefill["figure"], prefill["prompt_tokens"], decode["figure"], decode["batch"]) == ("prefill", 12, "decode", 2)
    for row in (prefill, decode):
        assert row["ours_tokens_per_s"] > 0 and row["theirs"]["transformers"] > 0 and row["vs"]["transformers"] > 0
        assert row["same_tokens"] is True  # fp32: the same greedy tokens as transformers
    # fp32 bytes per step / batch 2: the parameters (the tied embedding once) + each row's keys
    # and values (2 layers, 2 kv heads of 16) at the mean length 4 + 16 / 2
    params = 512 * 64 + 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64 + 2 * 64) + 64
    cache_per_row = 2 * 2 * 2 * 16 * 12
    assert decode["bytes_per_token"] == pytest.approx(4 * (params + 2 * cache_per_row) / 2)
    # the fraction of the copy bandwidth the decode's traffic takes (a model this small sits in
    # the caches, so it may exceed 1)
    expected = decode["bytes_per_token"] * decode["ours_tokens_per_s"] / (doc["machine"]["copy_bandwidth_gbps"] * 1e9)
    assert decode["bandwidth_fraction"]["ours"] == pytest.approx(expected)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert decode["errors"]["llama.cpp"] == "not installed"


def test_bench_model_smollm2_runs_alone():
    with pytest.raises(SystemExit, match="runs alone"):
        cli.main(["bench", "--model", "smollm2,minilm"])
