"""Llama.from_pretrained(gguf, quantized=True): the file's projections and head kept as blocks
(fastarch.nn.QuantizedLinear, in every format fastarch.ops.quantized_linear reads; a stack of
mixed formats as a QuantizedLinearStack). The blocks hold the values the dequantized model
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
from fastarch.nn import QuantizedLinear, QuantizedLinearStack
from fastarch.ops.qlinear import BLOCK_VALUES, dequantize_blocks
from test_gguf import smollm2_path, tiny_llama, write_llama_gguf  # tests/models/test_gguf.py

QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _tiny(qtype: str, tie: bool = False, **kwargs):
    """tiny_llama, its widths multiples of 256 for the super-blocks of the k-quants and IQ4_XS."""
    if BLOCK_VALUES[qtype.lower()] == 256:
        return tiny_llama(tie, hidden_size=256, intermediate_size=512, **kwargs)
    return tiny_llama(tie, **kwargs)


def _taken(monkeypatch):
    """The answers of the one-call loops' gates while the block runs: lists of what
    linear_in_one_call (decode) and prefill_products (prefill) answered (None: op by op)."""
    taken = {"decode": [], "prefill": []}

    def spy(key, real):
        def answer(*args):
            taken[key].append(real(*args))
            return taken[key][-1]
        return answer

    for key, name in (("decode", "linear_in_one_call"), ("prefill", "prefill_products")):
        monkeypatch.setattr(fused_step, name, spy(key, getattr(fused_step, name)))
    return taken


def _op_by_op(monkeypatch):
    monkeypatch.setattr(fused_step, "step_arguments", lambda *a, **k: None)
    monkeypatch.setattr(fused_step, "prefill_products", lambda *a, **k: None)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_quantized_model_matches_dequantized(tmp_path, qtype, tie, monkeypatch):
    file = write_llama_gguf(tmp_path / "tiny.gguf", _tiny(qtype, tie), qtype)
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

    file = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), "Q8_0")
    config, weights = read_gguf(file, quantized=True)
    quants = config.pop("quantization")
    k = "model.layers.0.self_attn.k_proj.weight"
    weights[k] = dequantize_blocks(weights[k], quants.pop(k))  # as if the file stored k as F32
    stacked = _stack(weights, LlamaConfig.from_dict(config), quants)
    assert stacked["layers.0.qkv_proj.weight"].dtype == torch.float32
    assert stacked["layers.1.qkv_proj.weight"].dtype == torch.uint8
    assert "layers.0.qkv_proj.weight" not in quants and quants["layers.1.qkv_proj.weight"] == "q8_0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "qkv-bias"])
def test_mixed_file_as_llama_quantize_writes_q4_k_m(tmp_path, monkeypatch, bias, dtype):
    """A file of mixed formats as llama-quantize's Q4_K_M (Q4_K, with v, down and the head in
    Q6_K where it spends more bits, here v in layer 0 only; gate Q5_K beside up in layer 1):
    every layer keeps its own format's blocks, layer 0's q/k/v and layer 1's gate/up as
    QuantizedLinearStacks (their biases, Qwen2-style, split with them); the model equals the
    dequantized one, and its one-call decode and prefill loops (each part its own product) are
    taken and equal the op-by-op loop."""
    layout = {"": "Q4_K", "blk.0.attn_v": "Q6_K", "blk.1.ffn_gate": "Q5_K", "ffn_down": "Q6_K", "output": "Q6_K"}
    file = write_llama_gguf(tmp_path / "mixed.gguf", _tiny("Q4_K", attention_bias=bias), layout)
    dense, model = Llama.from_pretrained(file), Llama.from_pretrained(file, quantized=True, dtype=dtype)
    stack, block = model.layers[0].qkv_proj, model.layers[1]
    assert type(stack) is QuantizedLinearStack and [p.quant for p in stack.parts] == ["q4_k", "q4_k", "q6_k"]
    assert [p.quant for p in block.gate_up_proj.parts] == ["q5_k", "q4_k"]
    assert (block.qkv_proj.quant, block.o_proj.quant, block.down_proj.quant) == ("q4_k", "q4_k", "q6_k")
    assert model.lm_head.quant == "q6_k" and (stack.parts[2].bias is not None) == bias
    for ours, theirs in zip(model.layers, dense.layers):  # the blocks hold the dequantized values
        for name in ("qkv_proj", "gate_up_proj"):
            layer, ref = getattr(ours, name), getattr(theirs, name)
            parts = layer.parts if type(layer) is QuantizedLinearStack else [layer]
            assert torch.equal(torch.cat([dequantize_blocks(p.weight, p.quant) for p in parts]), ref.weight)
            if ref.bias is not None:  # (q/k/v's with attention_bias; gate/up have none)
                assert torch.equal(torch.cat([p.bias for p in parts]).float(), ref.bias.to(dtype).float())
    weights, quants, biases, _ = fused_step.step_arguments(model, dtype)  # the one-call loops take it
    more = fused_step.MORE_PARTS
    assert quants[:8] == [0, 12 + more, 12 + more, 14, 12, 0, 12, 14] and quants[8:15] == [0, 12, 12, 0, 13 + more, 12, 14]
    assert weights[3] is stack.parts[2].weight and len(biases) == sum(q != 0 for q in quants)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ours = dense(ids), model(ids).float()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.05) * scale
    taken = _taken(monkeypatch)
    out = generate(model, ids, max_new_tokens=10)
    assert taken["prefill"] and None not in taken["prefill"] and taken["decode"] and None not in taken["decode"]
    if dtype == torch.float32:
        assert torch.equal(out, generate(dense, ids, max_new_tokens=10))
    _op_by_op(monkeypatch)
    assert torch.equal(generate(model, ids, max_new_tokens=10), out)


def test_one_call_loops_told_each_weights_format(tmp_path, monkeypatch):
    """Q4_K weights (as many bytes per row as Q4_0) with Q6_K ones in the one-call decode and
    prefill loops: each weight's format passed, the tokens those of the op-by-op loop."""
    file = write_llama_gguf(tmp_path / "k.gguf", _tiny("Q4_K"), {"": "Q4_K", "ffn_down": "Q6_K"})
    model = Llama.from_pretrained(file, quantized=True)
    weights, quants, *_ = fused_step.step_arguments(model, torch.float32)  # the loop takes these
    assert quants[:7] == [0, 12, 12, 0, 12, 14, 0] and weights[1].dtype == torch.uint8
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    taken = _taken(monkeypatch)
    with torch.inference_mode():
        logits = model(ids)
    out = generate(model, ids, max_new_tokens=10)
    assert None not in taken["prefill"] + taken["decode"]
    _op_by_op(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(model(ids), logits)  # the same kernels in the same order: the same bits
    assert torch.equal(generate(model, ids, max_new_tokens=10), out)


def test_one_call_loops_check_their_lists(tmp_path, monkeypatch):
    """Lists that do not describe the layers are a clear error of the C++ loop, not a misread:
    a quant that does not fit its weight (0 for blocks; Q4_K's id for Q6_K bytes, whose rows
    have another length; a norm's weight with a format), a stack flag on a layer that takes one
    weight, a flag that makes a stack swallow the next layer's weights. (A Q4_0 id for Q4_K
    blocks cannot be caught: their rows are as long. step_arguments names the formats.)"""
    file = write_llama_gguf(tmp_path / "k.gguf", _tiny("Q4_K"), {"": "Q4_K", "ffn_down": "Q6_K"})
    model = Llama.from_pretrained(file, quantized=True)
    original = fused_step.step_arguments
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(7))
    more = fused_step.MORE_PARTS
    for j, value, match in [(1, 0, "with quant 0"), (2, 12 + more, "marked as a part of a stack"),
                            (0, 12, "a norm's weight"), (5, 12, "blocks must be contiguous uint8"),
                            (1, 12 + more, "a norm's weight")]:
        def tampered(*args, j=j, value=value):
            weights, quants, biases, eps = original(*args)
            return weights, quants[:j] + [value] + quants[j + 1:], biases, eps

        monkeypatch.setattr(fused_step, "step_arguments", tampered)
        with torch.inference_mode(), pytest.raises(RuntimeError, match=match):
            model(ids)


def test_stack_of_q4_0_q5_0_and_q8_0_kept_as_q8_0_blocks(tmp_path):
    """q in Q4_0, k in Q5_0, v in Q8_0 (a Q4_K_M file's narrow layers: q, k Q5_0, v Q8_0): the
    stack is Q8_0 blocks of the same values, and the model equals the dequantized one."""
    file = write_llama_gguf(tmp_path / "mixed.gguf", tiny_llama(), {"": "Q5_0", "attn_v": "Q8_0", "attn_q": "Q4_0"})
    dense, model = Llama.from_pretrained(file), Llama.from_pretrained(file, quantized=True)
    assert model.layers[0].qkv_proj.quant == "q8_0" and model.layers[0].o_proj.quant == "q5_0"
    for ours, theirs in zip(model.layers, dense.layers):
        assert torch.equal(dequantize_blocks(ours.qkv_proj.weight, "q8_0"), theirs.qkv_proj.weight)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, ids, max_new_tokens=8), generate(dense, ids, max_new_tokens=8))


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


def test_cli_generate_quantized(capsys, monkeypatch):
    """``fastarch generate`` on the default SmolLM2 file keeps its blocks on the CPU (the
    default; ``--quantized`` says so), ``--no-quantized`` dequantizes: the same greedy text in fp32."""
    from fastarch.cli import main
    from fastarch.models.generate import TextGenerator

    asked = []
    real = TextGenerator.from_pretrained.__func__
    monkeypatch.setattr(TextGenerator, "from_pretrained",
                        classmethod(lambda cls, *a, **k: asked.append(k["quantized"]) or real(cls, *a, **k)))
    argv = ["generate", "The capital of France is", "--max-new-tokens", "8", "--dtype", "fp32"]
    assert main(argv + ["--no-quantized"]) == 0
    plain = capsys.readouterr().out
    assert main(argv) == 0 and main(argv + ["--quantized"]) == 0
    out = capsys.readouterr().out
    assert out == plain * 2 and plain.strip() and asked == [False, True, True]


@pytest.mark.parametrize("layout", [{"": "Q4_1", "output": "Q8_0"}, {"": "Q4_K", "blk.0.attn_v": "Q6_K", "output": "Q6_K"}],
                         ids=["q4_1", "q4_k_m"])
def test_int8_activations_one_call_loops_equal_op_by_op(tmp_path, monkeypatch, layout):
    """activations="int8" (x rounded to int8 for the products on blocks, a stack's parts each):
    the one-call decode and prefill loops are told (INT8 on each part's quant) and give the
    op-by-op loop's tokens bit for bit; the logits stay within the rounding of x (~1%) of the
    exact model's."""
    qtype = layout[""]
    file = write_llama_gguf(tmp_path / "tiny.gguf", _tiny(qtype), layout)
    exact = from_pretrained(file, quantized=True)
    model = from_pretrained(file, quantized=True, activations="int8")
    layers = [m for m in model.modules() if type(m) is QuantizedLinear]
    assert layers and all(m.activations == "int8" for m in layers)
    _, quants, *_ = fused_step.step_arguments(model, torch.float32)
    assert all(q & fused_step.INT8 for q in quants if q)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref, ours = exact(ids), model(ids)
    scale = ref.abs().max().item()
    assert 0 < (ours - ref).abs().max().item() <= 0.02 * scale
    taken = _taken(monkeypatch)
    out = generate(model, ids, max_new_tokens=10)
    assert None not in taken["prefill"] + taken["decode"]
    _op_by_op(monkeypatch)
    assert torch.equal(generate(model, ids, max_new_tokens=10), out)


def test_int8_activations_set_after_a_step_are_used(tmp_path, monkeypatch):
    """Setting activations on a loaded model after it decoded: the next steps' one-call loop is
    given the new lists (the decode plan remembered per model is made again), and the tokens are
    those of a model loaded with it."""
    from fastarch.nn import set_activations

    file = write_llama_gguf(tmp_path / "tiny.gguf", _tiny("Q8_0"), "Q8_0")
    model = from_pretrained(file, quantized=True)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(9))
    planned = []
    real = fused_step.step_arguments
    monkeypatch.setattr(fused_step, "step_arguments", lambda *a: planned.append(real(*a)) or planned[-1])
    options = dict(max_new_tokens=12, do_sample=True, temperature=2.0, seed=3)
    generate(model, ids, **options)
    assert planned and not any(q & fused_step.INT8 for q in planned[-1][1])
    set_activations(model, "int8")
    rounded = generate(model, ids, **options)
    assert all(q & fused_step.INT8 for q in planned[-1][1] if q)
    assert torch.equal(rounded, generate(from_pretrained(file, quantized=True, activations="int8"), ids, **options))
    with pytest.raises(ValueError, match="activations='int8' rounds x .* needs quantized=True"):
        from_pretrained(file, activations="int8")
    with pytest.raises(ValueError, match="activations must be 'exact' or 'int8', got 'int4'"):
        from_pretrained(file, quantized=True, activations="int4")


def test_cli_generate_int8_activations(capsys):
    """``fastarch generate --activations int8`` on the default SmolLM2 file: text from the
    rounded products (a greedy reply that starts as the exact one's); with --no-quantized it is
    refused with the reason."""
    from fastarch.cli import main

    argv = ["generate", "The capital of France is", "--max-new-tokens", "4", "--dtype", "fp32"]
    assert main(argv) == 0
    exact = capsys.readouterr().out
    assert main(argv + ["--activations", "int8"]) == 0
    rounded = capsys.readouterr().out
    assert rounded.strip() and rounded.split()[:1] == exact.split()[:1]
    assert main(argv + ["--activations", "int8", "--no-quantized"]) == 2
    assert "rounds x for a GGUF file's quantized layers" in capsys.readouterr().err
