"""Reading Hugging Face checkpoints: config.json, and the weights in any of the layouts
`save_pretrained` writes (model.safetensors, sharded safetensors with an index,
pytorch_model.bin read with weights_only=True, sharded .bin), put into a model by an explicit
name map. Every family module uses these; nothing here knows a family.

Errors name the file or the tensor and what was expected: a missing or unreadable file, a
tensor the map does not know (never silently dropped), a parameter no tensor filled, a shape
that does not fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file or tensor and why."""


def read_config(path: str | os.PathLike) -> dict:
    """The checkpoint directory's config.json as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face checkpoint directory holds one)")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must hold a JSON object of settings, got a {type(config).__name__}")
    return config


def check_sizes(config: object, names: Iterable[str]) -> None:
    """Each named field of a model config is an int >= 1 (a zero head count had divided by
    zero, a string or a float size failed deep in torch): a CheckpointError naming it."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config.json: {name} must be an int >= 1, got {value!r}")


def untie_stored_head(cfg, weights: dict[str, Tensor], embed_names: Iterable[str], path: object):
    """``cfg``, or a copy with tie_word_embeddings False when it is set but ``weights`` hold an
    lm_head.weight unlike the embeddings (the first of ``embed_names`` present): transformers
    (5.x) then keeps the stored head, untied, with a warning, and so do we, rather than drop it."""
    head = weights.get("lm_head.weight")
    embed = next((weights[name] for name in embed_names if name in weights), None)
    if not cfg.tie_word_embeddings or head is None or embed is None or torch.equal(head, embed):
        return cfg
    warnings.warn(f"{path}: tie_word_embeddings is set, but the checkpoint stores an lm_head.weight that differs"
                  " from the embeddings: the stored head is used, untied (as transformers does)")
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{file}: reading safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        return load_file(str(file))
    except Exception as e:  # a truncated or corrupt file: safetensors raises its own errors
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_bin(file: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors")
    return state


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in directory ``path``, by its checkpoint name, on the
    CPU in the stored dtype. Reads the first of WEIGHT_FILES present (an index names its
    shards, each read once)."""
    root = Path(path)
    for name in WEIGHT_FILES:
        file = root / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_safetensors(file) if name.endswith(".safetensors") else _read_bin(file)
        try:
            index = json.loads(file.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file}: not a weight index (a JSON with a weight_map: {e})") from None
        weights: dict[str, Tensor] = {}
        for shard in sorted(set(index.values())):
            shard_file = root / shard
            if not shard_file.is_file():
                raise CheckpointError(f"{file} names the shard {shard}, which is missing")
            part = _read_safetensors(shard_file) if shard.endswith(".safetensors") else _read_bin(shard_file)
            weights.update(part)
        missing = sorted(set(index) - set(weights))
        if missing:
            raise CheckpointError(f"{file} lists tensors its shards do not hold: {', '.join(missing[:5])}")
        return weights
    raise CheckpointError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_")


@contextlib.contextmanager
def without_random_init() -> Iterator[None]:
    """Modules built inside skip torch.nn.init's random initializers (nn.Linear's, nn.Embedding's
    and the convolutions' reset_parameters), as transformers' no_init_weights does: for a model
    whose every parameter load_into fills next (it names any it did not fill). The random
    numbers took ~1 s of SmolLM2-135M's 1.3 s from_pretrained on a 2-core CPU. Process-wide
    while the block runs."""
    saved = {name: getattr(nn.init, name) for name in _RANDOM_INITS}

    def leave(tensor: Tensor, *args, **kwargs) -> Tensor:
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, leave)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def load_into(
    model: nn.Module,
    weights: dict[str, Tensor],
    name_of: Callable[[str], str | None],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    optional: Iterable[str] = (),
) -> nn.Module:
    """Fills every parameter and persistent buffer of ``model`` from ``weights``.

    name_of(checkpoint name) gives the model's name for a tensor, or None for a tensor the
    model does not use (a pooler the family drops, position ids); a tensor whose name maps to
    nothing in the model is an error. ``optional``: model names that may stay unfilled (e.g. a
    head tied to the embeddings, filled by tying after this call). Tensors are cast to
    ``dtype`` (floating ones only) and moved to ``device``; the model is moved too. Returns it.
    """
    own = dict(model.named_parameters())
    own.update((n, b) for n, b in model.named_buffers() if n.split(".")[-1] not in _non_persistent(model, n))
    filled: set[str] = set()
    unknown = []
    for ckpt_name, tensor in weights.items():
        target = name_of(ckpt_name)
        if target is None:
            continue
        if target not in own:
            unknown.append(f"{ckpt_name} (as {target})" if target != ckpt_name else ckpt_name)
            continue
        slot = own[target]
        if tuple(tensor.shape) != tuple(slot.shape):
            raise CheckpointError(
                f"tensor {ckpt_name} has shape {tuple(tensor.shape)}, but {type(model).__name__}.{target} needs"
                f" {tuple(slot.shape)} (does config.json fit these weights?)"
            )
        with torch.no_grad():
            slot.copy_(tensor)
        filled.add(target)
    if unknown:
        raise CheckpointError(f"{type(model).__name__} has no place for the checkpoint's tensors: {', '.join(unknown[:8])}")
    missing = sorted(set(own) - filled - set(optional))
    if missing:
        raise CheckpointError(f"the checkpoint lacks tensors {type(model).__name__} needs: {', '.join(missing[:8])}")
    if dtype is not None:
        model.to(dtype)  # floating tensors only: integer buffers keep their dtype
    if device is not None:
        model.to(device)
    return model.eval()


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    """The names of the non-persistent buffers of the submodule holding ``buffer_name``."""
    module = model.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else model
    return set(getattr(module, "_non_persistent_buffers_set", ()))
