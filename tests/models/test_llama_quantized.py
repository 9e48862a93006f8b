"""Llama.from_pretrained(gguf, quantized=True): the file's Q4_0/Q4_1/Q8_0 projections and head
kept as blocks (fastarch.nn.QuantizedLinear). The blocks hold the values the dequantized model
holds, so in fp32 the two models differ only in the order of the products' fp32 sums: logits
within ~1e-5 of their scale, the same greedy tokens; the one-call decode/prefill loops equal
the op-by-op loop bit for bit, as for dense weights."""

from __future__ import annotations

import pytest
import torch

from fastarch.models import from_pretrained
from fastarch.models import llama_fused_step as fused_step
from fastarch.models.generate import generate
from fastarch.models.llama import Llama, _stack
from fastarch.nn import QuantizedLinear
from test_gguf import smollm2_path, tiny_llama, write_llama_gguf  # tests/models/test_gguf.py

QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _op_by_op(monkeypatch):
    monkeypatch.setattr(fused_step, "step_arguments", lambda *a, **k: None)
    monkeypatch.setattr(fused_step, "prefill_products", lambda *a, **k: None)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_quantized_model_matches_dequantized(tmp_path, qtype, tie, monkeypatch):
    file = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(tie), qtype)
    dense = Llama.from_pretrained(file)
    model = from_pretrained(file, quantized=True)
    quant = qtype.lower()
    for block in model.layers:
        for layer in (block.qkv_proj, block.o_proj, block.gate_up_proj, block.down_proj):
            assert type(layer) is QuantizedLinear and layer.quant == quant
    assert type(model.lm_head) is QuantizedLinear and model.lm_head.quant == quant
    assert model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(model.embed_tokens.weight, dense.embed_tokens.weight, rtol=0, atol=0)

    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        ref, ours = dense(ids, mask), model(ids, mask)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-5 * scale
    fused = generate(model, ids, mask, max_new_tokens=12)
    assert torch.equal(fused, generate(dense, ids, mask, max_new_tokens=12))
    _op_by_op(monkeypatch)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=12), fused)


def test_bf16_quantized_model(tmp_path):
    """bf16 activations on the blocks' exact values: within bf16's rounding of the fp32 model."""
    file = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), "Q4_1")
    ref = Llama.from_pretrained(file)
    model = Llama.from_pretrained(file, quantized=True, dtype=torch.bfloat16)
    assert model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r, y = ref(ids), model(ids).float()
    assert (y - r).abs().max().item() <= 0.05 * r.abs().max().item()
    out = generate(model, ids, max_new_tokens=6)
    assert out.shape == (1, 15)


def test_mixed_formats_in_one_stack_are_dequantized(tmp_path):
    """A layer whose q, k and v come in different formats stacks them dequantized (the rest
    stay blocks)."""
    from fastarch.models.gguf import read_gguf
    from fastarch.models.llama import LlamaConfig
    from fastarch.ops.qlinear import dequantize_blocks

    file = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), "Q8_0")
    config, weights = read_gguf(file, quantized=True)
    quants = config.pop("quantization")
    k = "model.layers.0.self_attn.k_proj.weight"
    weights[k] = dequantize_blocks(weights[k], quants.pop(k))  # as if the file stored k as F32
    stacked = _stack(weights, LlamaConfig.from_dict(config), quants)
    assert stacked["layers.0.qkv_proj.weight"].dtype == torch.float32
    assert stacked["layers.1.qkv_proj.weight"].dtype == torch.uint8
    assert "layers.0.qkv_proj.weight" not in quants and quants["layers.1.qkv_proj.weight"] == "q8_0"


def test_quantized_needs_a_gguf_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        from_pretrained(tmp_path, quantized=True)


def test_real_smollm2_quantized_same_greedy_tokens():
    """The real SmolLM2-135M Q4_1 file (Q4_1 projections, a Q8_0 tied head): fp32 greedy tokens
    equal the dequantized model's."""
    file = smollm2_path()
    dense, model = Llama.from_pretrained(file), Llama.from_pretrained(file, quantized=True)
    assert model.lm_head.quant == "q8_0" and model.layers[0].qkv_proj.quant == "q4_1"
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2]])
    assert torch.equal(generate(model, ids, max_new_tokens=16), generate(dense, ids, max_new_tokens=16))


def test_cli_generate_quantized(capsys):
    """``fastarch generate --quantized`` on the default SmolLM2 file: the same greedy text in fp32."""
    from fastarch.cli import main

    argv = ["generate", "The capital of France is", "--max-new-tokens", "8", "--dtype", "fp32"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--quantized"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()
