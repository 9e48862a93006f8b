"""Sentence embeddings from sentence-transformers models, on fastarch's encoders.

    embedder = SentenceEmbedder.from_pretrained("path/to/all-MiniLM-L6-v2")
    vectors = embedder.encode(["a sentence", "another"])     # (2, 384) float32, L2-normalized

Reads the sentence-transformers layout: modules.json naming a Transformer (the checkpoint and
its tokenizer, sentence_bert_config.json's max_seq_length and do_lower_case), a Pooling
(its config.json: cls / max / mean / mean_sqrt_len_tokens / weightedmean / lasttoken, several
concatenated in that order) and an optional Normalize module. Tokenizes with transformers'
AutoTokenizer on the model directory. ``encode`` gives what ``SentenceTransformer.encode``
gives for the same model: the same truncation, pooling and normalization.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastarch.models.loading import CheckpointError
from fastarch.models.packing import Packing

if TYPE_CHECKING:
    import numpy as np

# sentence-transformers' legacy pooling flags, in the order it concatenates the modes
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = tuple(POOLING_FLAGS.values())


def _read_json(file: Path) -> dict | list:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None


def _pooling_modes(config: dict, where: Path) -> tuple[str, ...]:
    """The pooling modes of a Pooling module's config.json, old (boolean flags) or new layout."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for flag, m in POOLING_FLAGS.items() if config.get(flag)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise CheckpointError(f"{where}: pooling mode {bad[0] if bad else modes!r} is not one of {', '.join(POOLING_MODES)}")
    return modes


def pool(x: Tensor, packing: Packing, modes: tuple[str, ...]) -> Tensor:
    """Sentence vectors (B, len(modes) * hidden), fp32, from the packed token states x
    (total, hidden): sentence-transformers' pooling over each row's real tokens."""
    x = x.float()
    batch, hidden = packing.batch, x.shape[1]
    cu = packing.cu_seqlens.long()
    lengths = (cu[1:] - cu[:-1]).to(x.dtype).unsqueeze(1)
    row = packing.indices // packing.seqlen  # the sentence of each packed token
    out = []
    for mode in modes:
        if mode == "cls":  # the first real token
            out.append(x[cu[:-1].clamp(max=max(x.shape[0] - 1, 0))])
        elif mode == "lasttoken":
            out.append(x[(cu[1:] - 1).clamp(min=0)])
        elif mode == "max":
            padded = x.new_full((batch * packing.seqlen, hidden), float("-inf")).index_copy(0, packing.indices, x)
            out.append(padded.view(batch, packing.seqlen, hidden).amax(1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = x.new_zeros(batch, hidden).index_add(0, row, x)
            count = lengths.clamp(min=1e-9)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        else:  # weightedmean: the i-th real token of a row weighs i + 1
            weight = (torch.arange(x.shape[0], device=x.device) - cu[row] + 1).to(x.dtype).unsqueeze(1)
            total = x.new_zeros(batch, hidden).index_add(0, row, x * weight)
            out.append(total / (lengths * (lengths + 1) / 2).clamp(min=1e-9))
    return torch.cat(out, dim=1)


class SentenceEmbedder:
    """A sentence-transformers model (encoder + pooling + optional normalization) on fastarch's
    encoders. Build with ``from_pretrained``."""

    def __init__(self, model, tokenizer, max_seq_length: int, pooling_modes: tuple[str, ...], normalize: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pooling_modes = pooling_modes
        self.normalize = normalize  # the model ends with a Normalize module

    @property
    def dim(self) -> int:
        return self.model.word_embeddings.embedding_dim * len(self.pooling_modes)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> SentenceEmbedder:
        """The sentence-transformers model in directory ``path`` (modules.json and its modules'
        folders). The encoder is any family of fastarch.models.from_pretrained with a
        ``encode_packed`` (BERT, RoBERTa, DistilBERT)."""
        from transformers import AutoTokenizer

        from fastarch.models import from_pretrained

        root = Path(path)
        modules = _read_json(root / "modules.json")
        if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
            raise CheckpointError(f"{root / 'modules.json'}: expected a list of modules with a type each")
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        supported = ["Transformer", "Pooling", "Normalize"]
        if kinds not in (supported, supported[:2]):
            raise CheckpointError(
                f"{root / 'modules.json'}: modules {kinds} are not supported (supported: Transformer, Pooling,"
                " and optionally Normalize, in that order)"
            )
        encoder_dir = root / modules[0].get("path", "")
        st_file = encoder_dir / "sentence_bert_config.json"
        st_config = _read_json(st_file) if st_file.is_file() else {}
        limit = st_config.get("max_seq_length")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise CheckpointError(f"{st_file}: max_seq_length must be a positive integer, got {limit!r}")
        model = from_pretrained(encoder_dir, dtype=dtype, device=device)
        if not hasattr(model, "encode_packed"):
            raise CheckpointError(f"{encoder_dir}: a {type(model).__name__} cannot embed sentences")
        tokenizer_kwargs = {}
        if st_config.get("max_seq_length") is not None:
            tokenizer_kwargs["model_max_length"] = st_config["max_seq_length"]
        tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir), **tokenizer_kwargs)
        longest = model.config.max_seqlen
        # as sentence-transformers: max_seq_length, else the tokenizer's limit capped by the
        # position table (the usable part of it: RoBERTa's starts after the padding id)
        max_seq_length = st_config.get("max_seq_length") or min(tokenizer.model_max_length, longest)
        if max_seq_length > longest:
            raise CheckpointError(f"{st_file}: max_seq_length {max_seq_length} exceeds the model's {longest} positions")
        if st_config.get("do_lower_case"):
            from tokenizers.normalizers import Lowercase, Sequence

            # as sentence-transformers: lowercase before the tokenizer's own normalization
            backend = tokenizer.backend_tokenizer
            backend.normalizer = Sequence([Lowercase()] + ([backend.normalizer] if backend.normalizer else []))
        pooling_dir = root / modules[1].get("path", "")
        modes = _pooling_modes(_read_json(pooling_dir / "config.json"), pooling_dir / "config.json")
        normalize = len(modules) == 3
        if normalize:
            norm_config = root / modules[2].get("path", "") / "config.json"
            norm_config = _read_json(norm_config) if norm_config.is_file() else {}
            if norm_config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
                raise CheckpointError(f"{root}: a Normalize of {norm_config['module_input_name']} is not supported")
        return cls(model, tokenizer, max_seq_length, modes, normalize)

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | list[str],
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = False,
    ) -> Tensor | np.ndarray:
        """Embeddings (N, dim) float32 on the CPU of ``sentences`` (a single string: (dim,)),
        whatever the model's dtype (pooling and normalization run in fp32).

        Truncates each sentence to max_seq_length tokens; batches sentences of alike lengths
        (sorted by token count, longest first) and returns them in the given order.
        normalize_embeddings: L2-normalize (a model that ends with Normalize always does).
        show_progress_bar: a tqdm bar over the batches. convert_to_numpy: a numpy array instead.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("sentences must be a string or a list of strings")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        result = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if texts:
            self._encode_into(result, texts, batch_size, normalize_embeddings, show_progress_bar)
        if single:
            result = result[0]
        return result.numpy() if convert_to_numpy else result

    def _encode_into(
        self, result: Tensor, texts: list[str], batch_size: int, normalize_embeddings: bool, show_progress_bar: bool
    ) -> None:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") if getattr(self.model, "takes_token_type_ids", False) else None
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Batches")
        device = self.model.word_embeddings.weight.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = self.tokenizer.padding_side == "left"
        for batch in batches:
            width = len(ids[batch[0]])
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            token_types = torch.zeros(len(batch), width, dtype=torch.long) if types is not None else None
            for row, i in enumerate(batch):
                n = len(ids[i])
                cols = slice(width - n, width) if left else slice(0, n)
                input_ids[row, cols] = torch.tensor(ids[i], dtype=torch.long)
                mask[row, cols] = True
                if token_types is not None:
                    token_types[row, cols] = torch.tensor(types[i], dtype=torch.long)
            args = (input_ids.to(device), mask.to(device))
            if token_types is not None:
                args += (token_types.to(device),)
            x, packing = self.model.encode_packed(*args)
            vectors = pool(x, packing, self.pooling_modes)
            if self.normalize or normalize_embeddings:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            result[torch.tensor(batch)] = vectors.cpu()
