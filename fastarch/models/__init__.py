"""Complete models on fastarch's kernels, loaded from the checkpoints people already have.

    model = fastarch.models.from_pretrained("path/to/checkpoint")   # picks the family by model_type
    embedder = fastarch.models.SentenceEmbedder.from_pretrained("path/to/sentence-transformers-model")

One readable file per family; ``loading.py`` reads configs and weights for all of them. A family
module exposes a model class with ``from_pretrained(path, *, dtype=None, device=None)``;
FAMILIES maps each Hugging Face ``model_type`` to it (one line per family).
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from fastarch.models.loading import CheckpointError, read_config
from fastarch.models.sentence import SentenceEmbedder

# model_type -> "module:Class" (modules under fastarch.models, imported on first use)
FAMILIES: dict[str, str] = {
    "bert": "bert:Bert",
    "roberta": "bert:Roberta",
    "distilbert": "distilbert:DistilBert",
    "vit": "vit:ViT",
    "clip_text_model": "clip_text:CLIPText",
    "clip": "clip_text:CLIPText",  # a whole CLIPModel: its text tower only (the vision tower is not built)
    "gpt2": "gpt2:GPT2",
    "gpt_neo": "gpt2:GPT2",
    "gpt_bigcode": "starcoder:StarCoder",
    "llama": "llama:Llama",
    "mistral": "llama:Llama",
    "qwen2": "llama:Llama",
    "t5": "t5:T5",
    # diffusers configs carry no model_type: their _class_name stands in for it
    "UNet2DModel": "unet2d:UNet2D",
    "UNet2DConditionModel": "unet2d:UNet2D",
}

# a GGUF file's general.architecture -> model_type
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama"}


def from_pretrained(
    path: str | os.PathLike, *, gguf_file: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None, quantized: bool = False, activations: str = "exact",
) -> nn.Module:
    """The model of the Hugging Face checkpoint directory ``path`` (config.json + weights), in
    eval mode, cast to ``dtype`` and moved to ``device`` when given. The family comes from
    config.json's model_type (a diffusers config's _class_name); an unsupported one is an error that lists the supported ones.
    gguf_file: a llama.cpp GGUF file in the directory ``path`` (as transformers' gguf_file=;
    or ``path`` is a .gguf file): its general.architecture picks the family. quantized (GGUF
    only): keep the file's quantized projections and head as blocks (Q4_0 ... IQ4_XS; Llama.from_pretrained);
    activations="int8" (with quantized): their products on x rounded to int8, as llama.cpp's."""
    from fastarch.models.llama import check_activations, gguf_path

    check_activations(activations, quantized)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_pretrained: dtype must be a floating-point torch.dtype (torch.float16, ...) or None,"
                        f" got {dtype!r}")
    file = gguf_path(path, gguf_file)
    if file is not None:
        arch = _gguf_architecture(file)
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                f"{file}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
            )
        module_name, class_name = FAMILIES[GGUF_ARCHITECTURES[arch]].split(":")
        cls = getattr(importlib.import_module(f"fastarch.models.{module_name}"), class_name)
        return cls.from_pretrained(file, dtype=dtype, device=device, quantized=quantized, activations=activations)
    if quantized:
        raise ValueError(f"{path}: quantized=True keeps a GGUF file's quantized blocks; this is not a GGUF file"
                         " (fastarch.nn.QuantizedLinear.from_linear quantizes a layer)")
    config = read_config(path)
    key = "model_type" if "model_type" in config or "_class_name" not in config else "_class_name"
    model_type = config.get(key)
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{path}: {key} {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES)) or 'none yet'})"
        )
    module_name, class_name = FAMILIES[model_type].split(":")
    cls = getattr(importlib.import_module(f"fastarch.models.{module_name}"), class_name)
    return cls.from_pretrained(path, dtype=dtype, device=device)


def _gguf_architecture(file) -> str | None:
    """general.architecture of a GGUF file (its header read: a fraction of a second)."""
    from fastarch.models.gguf import _open

    return _open(file).value("general.architecture", None)


__all__ = ["from_pretrained", "SentenceEmbedder", "CheckpointError", "FAMILIES"]
