"""Reading LLaMA-architecture GGUF files (llama.cpp's format) as a Hugging Face checkpoint:
a LlamaConfig-style dict and the weights under transformers' names, dequantized to a float
dtype by vectorized torch code here. The header is parsed here too (_Header: gguf-py's reader
took ~4 s on a vocabulary's metadata); the `gguf` package names unsupported types, and
transformers reads the tokenizer with it.

    config, weights = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # needs transformers

Errors are CheckpointError naming the file, key, tensor or type: another architecture, a
quantization type we cannot dequantize, a truncated or corrupt file, a missing file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastarch.models.loading import CheckpointError
from fastarch.ops.qlinear.backends import GGML_IDS
from fastarch.ops.qlinear.formats import (  # the quantized linear layer's formats and their readers
    bit_fields as _bits, f16_at as _f16, field as _field, iq4_nl_values, iq4_xs_values, q4_0_values, q4_1_values,
    q4_k_values, q5_0_values, q5_1_values, q5_k_values, q6_k_values, q8_0_values,
)

# ---------------------------------------------------------------------------------------------
# Dequantization. Each ggml type stores a row as blocks of `block` values in `nbytes` bytes;
# a dequantizer maps uint8 blocks (n, nbytes) to float32 values (n, block). The arithmetic
# follows ggml's reference order (scale products in fp32, then one multiply and one add or
# subtract, never fused) so the result is bit-identical to ggml's and gguf-py's dequantize.
# ---------------------------------------------------------------------------------------------

QK_K = 256  # values per super-block of the k-quants


def _q2_k(b: Tensor) -> Tensor:  # scales: 16 bytes (4-bit scale | 4-bit min), qs: 64, d, dmin
    n = b.shape[0]
    sc = _field(b, 0, 16)
    dl = (_f16(b, 80) * (sc & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = _bits(_field(b, 16, 80).reshape(n, 2, 32), 4, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:  # hmask: 32, qs: 64, scales: 12 (6-bit, packed), d
    n = b.shape[0]
    scales = _field(b, 96, 108)
    low = _bits(_field(scales, 0, 8), 2, 4).reshape(n, 16)
    high = _bits(_field(scales, 8, 12), 4, 2).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (_f16(b, 108) * sc.float()).view(n, 16, 1)
    ql = _bits(_field(b, 32, 96).reshape(n, 2, 32), 4, 2).reshape(n, 16, 16).to(torch.int8)
    hm = _bits(_field(b, 0, 32), 8).reshape(n, 16, 16).to(torch.int8)
    q = ql - ((1 - hm) << 2)  # a clear hmask bit subtracts 4
    return (dl * q.float()).view(n, QK_K)


def _q8_k(b: Tensor) -> Tensor:  # d: f32, qs: 256 int8, bsums: 16 int16 (unused here)
    return _field(b, 0, 4).view(torch.float32) * _field(b, 4, 260).view(torch.int8).float()


# ggml type id -> (name, values per block, bytes per block, dequantizer or None for a plain dtype)
GGML_TYPES: dict[int, tuple[str, int, int, Callable[[Tensor], Tensor] | None]] = {
    0: ("F32", 1, 4, None),
    1: ("F16", 1, 2, None),
    2: ("Q4_0", 32, 18, q4_0_values),
    3: ("Q4_1", 32, 20, q4_1_values),
    6: ("Q5_0", 32, 22, q5_0_values),
    7: ("Q5_1", 32, 24, q5_1_values),
    8: ("Q8_0", 32, 34, q8_0_values),
    10: ("Q2_K", QK_K, 84, _q2_k),
    11: ("Q3_K", QK_K, 110, _q3_k),
    12: ("Q4_K", QK_K, 144, q4_k_values),
    13: ("Q5_K", QK_K, 176, q5_k_values),
    14: ("Q6_K", QK_K, 210, q6_k_values),
    15: ("Q8_K", QK_K, 292, _q8_k),
    20: ("IQ4_NL", 32, 18, iq4_nl_values),
    23: ("IQ4_XS", QK_K, 136, iq4_xs_values),
    30: ("BF16", 1, 2, None),
}
_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def _supported() -> str:
    return ", ".join(name for name, *_ in GGML_TYPES.values())


def _type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


def dequantize(data: Tensor, ggml_type: int, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values of a ggml tensor. data: uint8 (nbytes,), the tensor's bytes as stored
    (little-endian); shape: the torch shape (outermost first; the last dim is ggml's ne0, the
    one the blocks run along). Returns ``shape`` in ``dtype``."""
    if ggml_type not in GGML_TYPES:
        raise CheckpointError(f"cannot dequantize {_type_name(ggml_type)} (supported: {_supported()})")
    name, block, nbytes, fn = GGML_TYPES[ggml_type]
    numel = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block:
        raise CheckpointError(f"a {name} tensor's rows hold blocks of {block} values; shape {tuple(shape)} does not fit")
    expected = numel // block * nbytes
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != expected:
        raise CheckpointError(f"a {name} tensor of shape {tuple(shape)} takes {expected} bytes; got {data.numel()}")
    if fn is None:
        return data.view(_PLAIN[ggml_type]).reshape(shape).to(dtype)
    return fn(data.view(-1, nbytes)).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Names and the q/k row order. llama.cpp's converter reorders each head's q and k rows from
# the rotate-half layout (first half of the head dim, then second half) to interleaved pairs
# (row 2i = row i, row 2i+1 = row i + head_dim/2) so its RoPE rotates adjacent rows; we undo it.
# ---------------------------------------------------------------------------------------------

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """transformers' LlamaForCausalLM name of a llama GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None for a name llama has no place for."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def unpermute_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row interleave. w: (n_heads * head_dim, ...) -> same shape."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows do not split into {n_heads} heads of an even head dim")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# The file.
# ---------------------------------------------------------------------------------------------

_REQUIRED = object()

# GGUF metadata value types (gguf's GGUFValueType): scalars as struct formats, and the two
# composite types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Array:
    """An array metadata value, not read (read_gguf needs none: the vocabulary is the tokenizer's)."""

    def __init__(self, kind: int, count: int) -> None:
        self.kind, self.count = kind, count


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml's order: the row (innermost) first
    offset: int  # in the file


class _Header:
    """A GGUF file's metadata (key -> int, float, bool, str, or an _Array left unread) and
    tensor infos, parsed from its header; the tensors' bytes are read on request (data).

    gguf's GGUFReader builds a numpy view for every element of every metadata array: ~4 s for
    SmolLM2's 49152-token vocabulary and its merges on a 2-core CPU, once for the model and
    once more for the tokenizer's ids, where the file's tensors load in a fraction of a second.
    This reader walks an array of strings by its length fields alone and builds no value it is
    not asked for; it reads the layout gguf-py reads (versions 2 and 3, little-endian), and
    tests check its values against gguf-py's on every file they write."""

    def __init__(self, file: Path) -> None:
        import mmap
        import struct

        self.file = file
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        buf, unpack = self._map, struct.unpack_from
        self._size = len(buf)
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{file}: not a readable GGUF file (no GGUF magic)")
        (version,) = unpack("<I", buf, 4)
        if version & 0xFFFF == 0:
            raise CheckpointError(f"{file}: a big-endian GGUF file; only little-endian files are supported")
        if version not in (2, 3):
            raise CheckpointError(f"{file}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = unpack("<QQ", buf, 8)
        pos = 24

        def string(at: int) -> tuple[str, int]:
            (n,) = unpack("<Q", buf, at)
            if at + 8 + n > self._size:
                raise struct.error("a string runs past the end of the file")
            return bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

        def skip(kind: int, at: int, count: int) -> int:  # count values of kind from at: where they end
            if kind in _SCALARS:
                end = at + count * struct.calcsize(_SCALARS[kind])
            elif kind == _STRING:
                end = at
                for _ in range(count):
                    end += 8 + unpack("<Q", buf, end)[0]
            elif kind == _ARRAY:
                end = at
                for _ in range(count):
                    inner, n = unpack("<IQ", buf, end)
                    end = skip(inner, end + 12, n)
            else:
                raise struct.error(f"unknown metadata value type {kind}")
            if end > self._size:
                raise struct.error("a metadata array runs past the end of the file")
            return end

        self.metadata: dict[str, object] = {}
        self._kinds: dict[str, int] = {}
        try:
            for _ in range(n_kv):
                key, pos = string(pos)
                if key in self.metadata:
                    raise struct.error(f"metadata key {key} appears twice")
                (kind,) = unpack("<I", buf, pos)
                pos += 4
                if kind in _SCALARS:
                    (self.metadata[key],) = unpack(_SCALARS[kind], buf, pos)
                    pos += struct.calcsize(_SCALARS[kind])
                elif kind == _STRING:
                    self.metadata[key], pos = string(pos)
                elif kind == _ARRAY:
                    inner, count = unpack("<IQ", buf, pos)
                    self.metadata[key] = _Array(inner, count)
                    pos = skip(inner, pos + 12, count)
                else:
                    raise struct.error(f"metadata key {key} has unknown value type {kind}")
                self._kinds[key] = kind
            infos = []
            for _ in range(n_tensors):
                name, pos = string(pos)
                (n_dims,) = unpack("<I", buf, pos)
                if n_dims > 8:
                    raise struct.error(f"tensor {name} has {n_dims} dimensions")
                shape = unpack(f"<{n_dims}Q", buf, pos + 4)
                ggml_type, offset = unpack("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                infos.append((name, ggml_type, shape, offset))
        except struct.error as e:  # cut short, or a length field that does not fit
            raise CheckpointError(f"{file}: not a readable GGUF file ({e})") from None
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{file}: general.alignment is {align!r}; expected a power of two")
        start = -(-pos // align) * align
        self.tensors = [_TensorInfo(name, t, shape, start + offset) for name, t, shape, offset in infos]

    def value(self, key: str, default=_REQUIRED):
        """The scalar or string metadata value ``key`` (a float32 as its shortest decimal: 1e-05,
        not 9.999999747378752e-06, as the original config.json had it)."""
        if key not in self.metadata:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.file}: metadata key {key} is missing")
            return default
        value = self.metadata[key]
        if isinstance(value, _Array):
            raise CheckpointError(f"{self.file}: metadata key {key} is not a single value")
        if self._kinds[key] == 6:  # float32
            return float(str(np.float32(value)))
        return value

    def data(self, tensor: _TensorInfo, nbytes: int) -> np.ndarray:
        """A copy of the tensor's nbytes bytes (its type's size; the file is mapped read-only)."""
        if tensor.offset + nbytes > self._size:
            raise CheckpointError(f"{self.file}: tensor {tensor.name} runs past the end of the file (truncated?)")
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=tensor.offset).copy()


def _open(path: str | os.PathLike) -> _Header:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return _Header(file)


def tensor_bytes(path: str | os.PathLike, *, embedding_rows: int | None = None) -> int:
    """The bytes of every tensor of a GGUF file, as stored. embedding_rows: an untied embedding
    table (the file has an output.weight) counted as that many of its rows, what a decode step's
    lookup reads (a tied one is the output head, read whole): llama.cpp's bytes per step, its
    own quantized weights. A tensor of a type that cannot be dequantized here is an error
    naming it."""
    tensors = _open(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        if t.ggml_type not in GGML_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} is {_type_name(t.ggml_type)} (supported: {_supported()})")
        _, block, block_bytes, _ = GGML_TYPES[t.ggml_type]
        nbytes = math.prod(t.shape) // block * block_bytes
        if embedding_rows is not None and untied and t.name == "token_embd.weight":
            nbytes = nbytes // int(t.shape[1]) * embedding_rows  # (gguf-py's shape: columns first)
        total += nbytes
    return total


def _config(reader, file: Path, tensor_names: set[str], vocab_rows: int | None) -> dict:
    arch = reader.value("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if reader.value("llama.expert_count", 0):
        raise CheckpointError(f"{file}: a mixture-of-experts llama (llama.expert_count > 0) is not supported")

    def get(key, default=_REQUIRED, kind=int):
        value = reader.value(f"llama.{key}", default)
        ok = value is None or (isinstance(value, kind) and not isinstance(value, bool) and (kind is str or value > 0))
        if kind is float:
            ok = ok or (isinstance(value, int) and value > 0)
        if not ok:
            raise CheckpointError(f"{file}: metadata key llama.{key} is {value!r}; expected a positive {kind.__name__}")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None) or hidden // heads
    vocab = get("vocab_size", None)
    if vocab_rows is not None and vocab is not None and vocab != vocab_rows:
        raise CheckpointError(f"{file}: llama.vocab_size is {vocab} but token_embd.weight has {vocab_rows} rows")
    if vocab_rows is None and vocab is None:
        raise CheckpointError(f"{file}: no token_embd.weight and no llama.vocab_size")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": get("rope.freq_base", 10000.0, float),  # llama.cpp's default when absent
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab_rows if vocab_rows is not None else vocab,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for key, hf_key in (("bos_token_id",) * 2, ("eos_token_id",) * 2, ("padding_token_id", "pad_token_id")):
        token = reader.value(f"tokenizer.ggml.{key}", None)
        if token is not None:
            config[hf_key] = token
    rope_type = get("rope.scaling.type", None, str)
    factor = get("rope.scaling.factor", None, float) or get("rope.scale_linear", None, float)
    if rope_type is None and factor is not None:
        rope_type = "linear"  # the older key rope.scale_linear
    if rope_type not in (None, "none"):
        if factor is None:
            raise CheckpointError(f"{file}: RoPE scaling {rope_type!r} without llama.rope.scaling.factor")
        scaling = {"rope_type": rope_type, "factor": factor}
        original = get("rope.scaling.original_context_length", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        config["rope_scaling"] = scaling
    return config


def read_gguf(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, quantized: bool = False
) -> tuple[dict, dict[str, Tensor]]:
    """A llama GGUF file as (config, weights): config a Hugging Face LlamaConfig-style dict,
    weights every tensor under transformers' LlamaForCausalLM name (lm_head.weight only when
    the file has output.weight: otherwise config["tie_word_embeddings"] is True), dequantized
    to ``dtype`` on the CPU, q/k rows in transformers' order. A Llama 3.1 file's rope_freqs.weight
    becomes config["rope_scaling"] (rope_type "llama3") rather than a weight.

    quantized: keep the projections' and the head's tensors of the formats that
    fastarch.ops.quantized_linear reads (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) as they
    are stored, uint8 blocks (rows, bytes per row), listed in config["quantization"] (name ->
    "q4_0", ..., "iq4_xs"); a tied head then comes as such an lm_head.weight beside the
    dequantized embeddings."""
    if not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating dtype, got {dtype}")
    file = Path(path)
    reader = _open(file)
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    config = _config(reader, file, names, int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else None)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, Tensor] = {}
    quants: dict[str, str] = {}
    for t in reader.tensors:
        target = "rope_freqs" if t.name == "rope_freqs.weight" else hf_name(t.name)
        if target is None:
            raise CheckpointError(f"{file}: tensor {t.name} has no place in a llama model")
        ggml_type = t.ggml_type
        if ggml_type not in GGML_TYPES:
            raise CheckpointError(f"{file}: tensor {t.name} is {_type_name(ggml_type)}, which cannot be dequantized"
                                  f" here (supported: {_supported()})")
        shape = tuple(reversed(t.shape))
        _, block, block_bytes, _ = GGML_TYPES[ggml_type]
        count = math.prod(shape)
        if count % block:
            raise CheckpointError(f"{file}: tensor {t.name} of shape {shape} is not a whole number of"
                                  f" {_type_name(ggml_type)} blocks of {block} values")
        try:
            raw = reader.data(t, count // block * block_bytes)
            out = torch.float32 if target == "rope_freqs" else dtype
            kept = _KEPT.get(ggml_type) if quantized and len(shape) == 2 else None
            if kept is not None and (target.endswith("_proj.weight") or target == "lm_head.weight"):
                value = _blocks(raw, ggml_type, shape)
                quants[target] = kept
            else:
                value = dequantize(torch.from_numpy(raw), ggml_type, shape, dtype=out)
                if kept is not None and target == "model.embed_tokens.weight" and "output.weight" not in names:
                    weights["lm_head.weight"] = _blocks(raw, ggml_type, shape)  # the tied head, as stored
                    quants["lm_head.weight"] = kept
        except CheckpointError as e:
            raise CheckpointError(f"{file}: tensor {t.name}: {e}") from None
        except (ValueError, TypeError) as e:  # a data region cut short by truncation
            raise CheckpointError(f"{file}: tensor {t.name} is not readable ({e})") from None
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if kind in heads:
            try:
                value = unpermute_rows(value, heads[kind])
            except CheckpointError as e:
                raise CheckpointError(f"{file}: tensor {t.name}: {e}") from None
        weights[target] = value
    if "rope_freqs" in weights:
        config["rope_scaling"] = _llama3_rope_scaling(weights.pop("rope_freqs").double(), config, file)
    if quantized:
        config["quantization"] = quants
    return config, weights


# the block formats read_gguf(quantized=True) keeps: ggml type id -> fastarch.ops.quantized_linear's quant
_KEPT = {ggml_id: quant for quant, ggml_id in GGML_IDS.items()}


def _blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """A tensor's bytes as its rows of blocks, uint8 (rows, bytes per row), checked as dequantize checks them."""
    name, block, nbytes, _ = GGML_TYPES[ggml_type]
    rows, cols = shape
    if cols % block or raw.size != rows * cols // block * nbytes:
        raise CheckpointError(f"a {name} tensor of shape {tuple(shape)} takes {rows * cols // block * nbytes} bytes;"
                              f" got {raw.size}")
    return torch.from_numpy(raw).view(rows, cols // block * nbytes)


def _llama3_factors(scaling: dict, head_dim: int, theta: float) -> Tensor:
    """llama.cpp's rope_freqs for a Llama 3.1 rope_scaling: how much each frequency is divided by."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * torch.pi / freqs
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, scaling["factor"], mid))


def _llama3_rope_scaling(factors: Tensor, config: dict, file: Path) -> dict:
    """The Llama 3.1 rope_scaling whose per-frequency factors are rope_freqs.weight. The file
    keeps only the table; its parameters are found among the ones Meta's models use."""
    if "rope_scaling" in config:
        raise CheckpointError(f"{file}: both rope.scaling metadata and rope_freqs.weight; which applies is unclear")
    head_dim, theta = config["head_dim"], config["rope_theta"]
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{file}: rope_freqs.weight has shape {tuple(factors.shape)}; expected ({head_dim // 2},)")
    factor = float(str(np.float32(factors.max().item())))
    # Only old / low and old / high (the band edges) shape the table, so low_freq_factor is
    # fixed at Meta's 1 and the search runs over the context and the high factor.
    for high in (4.0, 2.0, 8.0):
        for old in (8192, 4096, 16384, 32768, 2048):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                       "original_max_position_embeddings": old}
            if torch.allclose(_llama3_factors(scaling, head_dim, theta), factors, rtol=1e-5, atol=0):
                return scaling
    raise CheckpointError(f"{file}: rope_freqs.weight is not a Llama 3.1 RoPE scaling this reader recognizes"
                          f" (factors {factors.tolist()[:4]}...)")


def tokenizer_from_gguf(path: str | os.PathLike):
    """The file's tokenizer as transformers builds it from the GGUF metadata (a fast tokenizer;
    needs transformers and tokenizers, imported only here), its bos, eos and padding tokens
    those of the metadata (transformers 5.17 took SmolLM2's eos as <|im_start|>, not the file's
    <|im_end|>).

    transformers reads the file's whole metadata with gguf-py to build it (~3.5 s for
    SmolLM2-135M on a 2-core CPU), so the tokenizer is kept, as save_pretrained writes it, under
    the fastarch cache (FASTARCH_CACHE_DIR, else $XDG_CACHE_HOME/fastarch or ~/.cache/fastarch)
    for the file's path, size and modification time and the transformers version; the next call
    loads that (~0.2 s). FASTARCH_CACHE_DIR="" keeps nothing."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError("a GGUF tokenizer needs transformers (pip install transformers tokenizers gguf)") from None
    kept = _tokenizer_cache(file, transformers.__version__)
    if kept is not None and kept.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(kept))
        except Exception:  # (an entry damaged since it was written: built again below)
            import shutil

            shutil.rmtree(kept, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    reader = _open(file)
    for key, attr in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token")):
        token = reader.value(f"tokenizer.ggml.{key}", None)
        if token is not None and 0 <= token < len(tokenizer) and getattr(tokenizer, f"{attr}_id") != token:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token))
    if kept is not None:
        _keep(tokenizer, kept)
    return tokenizer


def _tokenizer_cache(file: Path, version: str) -> Path | None:
    """Where tokenizer_from_gguf keeps file's tokenizer (None: FASTARCH_CACHE_DIR="")."""
    import hashlib

    root = os.environ.get("FASTARCH_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "fastarch")
    if not root:
        return None
    stat = file.stat()
    key = f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{version}"
    return Path(root) / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _keep(tokenizer, where: Path) -> None:
    """tokenizer saved to where, whole or not at all (a directory renamed into place); a cache
    that cannot be written is skipped."""
    import shutil
    import tempfile

    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=where.parent, prefix=".saving-"))
        try:
            tokenizer.save_pretrained(str(staging))
            os.replace(staging, where)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # (another process kept it first, or no room)
    except OSError:
        pass


__all__ = ["read_gguf", "tokenizer_from_gguf", "dequantize", "hf_name", "unpermute_rows", "GGML_TYPES"]
