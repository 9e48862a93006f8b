"""fastarch bench --model smollm2: a tiny run times ours against transformers' generate and
records that both chose the same greedy tokens. The model is a small random LLaMA written with
save_pretrained, loaded by both as the bench loads the GGUF (loading and dequantizing the real
SmolLM2 file takes ~25 s here); bench --model smollm2 on the real file is run by hand."""

import json
import time

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

    def load_models(file, dtype, device):
        assert file == tmp_path / "model.gguf" and device == "cpu"
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=dtype).eval()
        return from_pretrained(tmp_path / "llama", dtype=dtype), theirs

    def load_blocks(file, dtype, device):  # the contender on quantized blocks: the projections as Q8_0
        from fastarch.nn import QuantizedLinear

        model = from_pretrained(tmp_path / "llama", dtype=dtype)
        for block in model.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                setattr(block, name, QuantizedLinear.from_linear(getattr(block, name), "q8_0"))
        return model

    monkeypatch.setattr(generation, "load_blocks", load_blocks)
    monkeypatch.setattr(generation, "gguf_file", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(generation, "load_models", load_models)
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(generation, "SHORT_PROMPT", 4)
    monkeypatch.setattr(generation, "NEW_TOKENS", 48)  # decode well above the timing noise, also under load
    monkeypatch.setattr(generation, "BATCHES", (1, 2))

    def llama_cpp(ids, new):  # a stand-in with the real one's limits (the GGUF here is not real)
        if ids.shape[0] != 1:
            raise NotImplementedError("llama-cpp-python's generate runs one sequence at a time")
        time.sleep(0.002 * new)  # a time per token, well above the timing noise
        return torch.zeros(1, new, dtype=torch.long)

    monkeypatch.setattr(generation, "llama_cpp_generator", lambda file: llama_cpp)
    monkeypatch.setattr(generation, "gguf_tensor_bytes", lambda file: 10_000)
    path = tmp_path / "generation.json"
    args = ["bench", "--model", "smollm2", "--device", "cpu", "--dtype", "fp32", "--rounds", "1", "--json", str(path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "prefill  batch 1" in out and "decode   batch 2" in out and "transformers" in out
    doc = json.loads(path.read_text())
    assert doc["machine"]["copy_bandwidth_gbps"] > 0
    prefill, alone, decode = doc["rows"]
    assert (prefill["figure"], prefill["prompt_tokens"], decode["figure"], decode["batch"]) == ("prefill", 12, "decode", 2)
    for row in (prefill, alone, decode):
        assert row["ours_tokens_per_s"] > 0 and row["theirs"]["transformers"] > 0 and row["vs"]["transformers"] > 0
        assert row["same_tokens"] is True  # fp32: the same greedy tokens as transformers
    # fp32 bytes per step / batch 2: the parameters (the tied embedding once) + each row's keys
    # and values (2 layers, 2 kv heads of 16) at the mean length 4 + 48 / 2
    params = 512 * 64 + 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64 + 2 * 64) + 64
    cache_per_row = 2 * 2 * 2 * 16 * 28
    assert decode["bytes_per_token"] == pytest.approx(4 * (params + 2 * cache_per_row) / 2)
    # the fraction of the copy bandwidth the decode's traffic takes (a model this small sits in
    # the caches, so it may exceed 1)
    expected = decode["bytes_per_token"] * decode["ours_tokens_per_s"] / (doc["machine"]["copy_bandwidth_gbps"] * 1e9)
    assert decode["bandwidth_fraction"]["ours"] == pytest.approx(expected)
    # ours on Q8_0 blocks: the projections' 34 bytes per 32 weights, the rest (embedding, norms) in fp32
    blocks = generation.BLOCKS
    assert decode["theirs"][blocks] > 0 and decode["vs"][blocks] > 0
    projections = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64)
    block_bytes = 34 / 32 * projections + 4 * (params - projections) + 4 * 2 * cache_per_row
    expected = block_bytes / 2 * decode["theirs"][blocks] / (doc["machine"]["copy_bandwidth_gbps"] * 1e9)
    assert decode["bandwidth_fraction"][blocks] == pytest.approx(expected)
    # llama.cpp's traffic is its own: the file's tensors and an fp16 cache (batch 1 only)
    assert "NotImplementedError" in decode["errors"]["llama.cpp"]
    llama_bytes = 10_000 + 2 * 2 * 2 * 16 * 2 * 28
    assert alone["llama_cpp_bytes_per_token"] == pytest.approx(llama_bytes)
    expected = llama_bytes * alone["theirs"]["llama.cpp"] / (doc["machine"]["copy_bandwidth_gbps"] * 1e9)
    assert alone["bandwidth_fraction"]["llama.cpp"] == pytest.approx(expected)


def test_llama_cpp_reads_the_gguf_files_tensors():
    """The real SmolLM2 Q4_1 file: its tensors are nearly the whole file (the rest is metadata
    and the tokenizer)."""
    file = generation.gguf_file()
    size = file.stat().st_size
    assert 0.9 * size < generation.gguf_tensor_bytes(file) < size


def test_bench_model_smollm2_runs_alone():
    with pytest.raises(SystemExit, match="runs alone"):
        cli.main(["bench", "--model", "smollm2,minilm"])


def test_random_weights_have_smollm2s_architecture():
    """--random-weights builds SMOLLM2_CONFIG: the architecture transformers reads from the real
    GGUF file's metadata, field by field."""
    from transformers import AutoConfig, LlamaConfig

    file = generation.gguf_file()
    real = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    ours = LlamaConfig(**generation.SMOLLM2_CONFIG)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "tie_word_embeddings",
                  "rope_parameters", "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias"):
        assert getattr(ours, field) == getattr(real, field), field
    assert ours.rms_norm_eps == pytest.approx(real.rms_norm_eps, rel=1e-6)  # (the file stores it as fp32)


def test_bench_model_smollm2_with_random_weights(tmp_path, monkeypatch, capsys):
    """--random-weights: the same rows from SMOLLM2_CONFIG's model (here a tiny stand-in) with
    random weights, no GGUF file read and llama.cpp not run."""
    tiny = {**generation.SMOLLM2_CONFIG, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    monkeypatch.setattr(generation, "SMOLLM2_CONFIG", tiny)
    monkeypatch.setattr(generation, "gguf_file", lambda: pytest.fail("the GGUF file was looked for"))
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(generation, "SHORT_PROMPT", 4)
    monkeypatch.setattr(generation, "NEW_TOKENS", 48)
    monkeypatch.setattr(generation, "BATCHES", (1,))
    path = tmp_path / "generation.json"
    args = ["bench", "--model", "smollm2", "--random-weights", "--device", "cpu", "--dtype", "fp32", "--rounds", "1",
            "--json", str(path)]
    assert cli.main(args) == 0
    assert "random (SMOLLM2_CONFIG) weights" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert doc["machine"]["weights"] == "random (SMOLLM2_CONFIG)"
    for row in doc["rows"]:
        assert row["ours_tokens_per_s"] > 0 and row["theirs"]["transformers"] > 0
        assert row["same_tokens"] is True and "random weights" in row["errors"]["llama.cpp"]
    # the parameters counted are the tiny model's (fp32, the tied embedding once)
    params = 512 * 64 + 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64 + 2 * 64) + 64
    assert doc["rows"][1]["bytes_per_token"] == pytest.approx(4 * (params + 2 * 2 * 2 * 16 * 28))


def test_random_weights_apply_to_smollm2_and_dropin_only():
    with pytest.raises(SystemExit, match="--random-weights applies to"):
        cli.main(["bench", "--model", "minilm", "--random-weights"])
    with pytest.raises(SystemExit, match="--random-weights applies to"):
        cli.main(["bench", "--op", "rms_norm", "--random-weights"])


def test_gguf_file_option_is_checked(tmp_path):
    """--gguf-file names a file for --model smollm2 only, and must exist."""
    with pytest.raises(SystemExit, match="is not a file"):
        cli.main(["bench", "--model", "smollm2", "--gguf-file", str(tmp_path / "absent.gguf")])
    with pytest.raises(SystemExit, match="--gguf-file applies to --model smollm2"):
        cli.main(["bench", "--op", "layer_norm", "--gguf-file", str(tmp_path / "absent.gguf")])
