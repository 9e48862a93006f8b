"""BERT and RoBERTa encoders on fastarch's kernels, loaded from Hugging Face checkpoints.

    model = Bert.from_pretrained("path/to/bert")           # or fastarch.models.from_pretrained
    out = model(input_ids, attention_mask)                 # out.last_hidden_state (B, S, H), out.pooler_output
    mlm = model.masked_lm(input_ids, attention_mask, labels=labels)   # mlm.logits (B, S, V), mlm.loss

The real tokens of a padded batch are packed (packing.py) before the embeddings, so every
linear, norm and attention runs on real tokens only: attention through the variable-length
path of ``fastarch.ops.attention``, every post-LN residual through ``ops.add_layer_norm``,
the MLP's activation through ``ops.bias_gelu``. Outputs are zero at padding positions.

Block (post-LN, as the original BERT):
    x = LayerNorm(x + Out(Attention(QKV(x))))
    x = LayerNorm(x + Down(GELU(Up(x))))
RoBERTa is the same network with positions counted from padding_idx + 1 over the non-padding
tokens, and an MLM head whose activation is always the erf GELU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastarch import ops
from fastarch.models.loading import CheckpointError, load_into, read_config, read_weights
from fastarch.models.packing import Packing, pack, unpack, unpad

# config.json's hidden_act -> the ``approximate`` argument of ops.bias_gelu
GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def gelu_approximation(hidden_act: object, where: str) -> str:
    if hidden_act not in GELU_APPROXIMATION:
        raise CheckpointError(
            f"{where}: activation {hidden_act!r} is not supported (supported: {', '.join(GELU_APPROXIMATION)})"
        )
    return GELU_APPROXIMATION[hidden_act]


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BertConfig:
    """Every hyperparameter the BERT / RoBERTa models read from config.json (defaults: those of
    transformers' BertConfig, or RobertaConfig for model_type "roberta")."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_seqlen(self) -> int:
        """The longest sequence the position table holds (RoBERTa's positions start at pad + 1)."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> BertConfig:
        """The config of a transformers config.json dict; what this file does not build is an
        error naming the setting."""
        model_type = d.get("model_type")
        if model_type not in ("bert", "roberta"):
            raise CheckpointError(f"{where}: model_type {model_type!r} is not BERT or RoBERTa")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{where}: position_embedding_type {d['position_embedding_type']!r} is not supported (only 'absolute')"
            )
        for flag in ("is_decoder", "add_cross_attention"):
            if d.get(flag):
                raise CheckpointError(f"{where}: {flag}=true is not supported (encoders only)")
        defaults = {"vocab_size": 50265, "pad_token_id": 1} if model_type == "roberta" else {}
        fields = {f: d[f] for f in cls.__dataclass_fields__ if f in d and (d[f] is not None or f == "pad_token_id")}
        config = cls(**{**defaults, **fields})
        if model_type == "roberta" and not isinstance(config.pad_token_id, int):
            raise CheckpointError(f"{where}: RoBERTa needs pad_token_id (its positions start after it), got {config.pad_token_id!r}")
        gelu_approximation(config.hidden_act, f"{where} hidden_act")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(
                f"{where}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads"
                f" {config.num_attention_heads}"
            )
        if config.max_seqlen < 1:
            raise CheckpointError(f"{where}: max_position_embeddings {config.max_position_embeddings} leaves no position")
        return config


# ----------------------------------------------------------------------------- the encoder block


class EncoderLayer(nn.Module):
    """A post-LN transformer block on packed tokens (BERT, RoBERTa, DistilBERT)."""

    def __init__(
        self, hidden: int, heads: int, intermediate: int, approximate: str, eps: float,
        attention_dropout: float, hidden_dropout: float,
    ):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.approximate, self.eps = approximate, eps
        self.attention_dropout, self.hidden_dropout = attention_dropout, hidden_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)  # the checkpoint's query, key, value stacked: one matmul
        self.out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        """x: (total, hidden), the packed tokens -> (total, hidden)."""
        total, hidden = x.shape
        q, k, v = ops.linear(x, self.qkv.weight, self.qkv.bias).view(total, 3, self.heads, self.head_dim).unbind(1)
        a = ops.attention(
            q, k, v,
            cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
            max_seqlen_q=packing.max_seqlen, max_seqlen_k=packing.max_seqlen,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        a = F.dropout(ops.linear(a.reshape(total, hidden), self.out.weight, self.out.bias), self.hidden_dropout, self.training)
        x, _ = ops.add_layer_norm(a, x, self.attn_norm.weight, self.attn_norm.bias, self.eps)
        h = ops.bias_gelu(ops.linear(x, self.up.weight), self.up.bias, self.approximate)
        h = F.dropout(ops.linear(h, self.down.weight, self.down.bias), self.hidden_dropout, self.training)
        x, _ = ops.add_layer_norm(h, x, self.mlp_norm.weight, self.mlp_norm.bias, self.eps)
        return x


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> the vocabulary projection, whose weight is the word
    embeddings' (tied) unless the config unties it."""

    def __init__(self, hidden: int, vocab: int, approximate: str, eps: float, tied: bool):
        super().__init__()
        self.approximate, self.eps = approximate, eps
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = None if tied else nn.Parameter(torch.empty(vocab, hidden))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x: (total, hidden) -> logits (total, vocab)."""
        h = ops.bias_gelu(ops.linear(x, self.dense.weight), self.dense.bias, self.approximate)
        h = ops.layer_norm(h, self.norm.weight, self.norm.bias, self.eps)
        return ops.linear(h, word_embeddings if self.decoder is None else self.decoder, self.bias)


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, S, hidden), zeros at padding positions
    pooler_output: Tensor | None  # (B, hidden): tanh(dense(the first token)), when the model has a pooler


class MaskedLMOutput(NamedTuple):
    logits: Tensor  # (B, S, vocab), zeros at padding positions
    loss: Tensor | None  # mean cross-entropy over the real tokens whose label is not -100


def check_input_ids(input_ids: object, vocab_size: int, max_seqlen: int) -> None:
    """input_ids: (B, S) integers, each in [0, vocab_size), S at most max_seqlen."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seqlen) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.shape[1] > max_seqlen:
        raise ValueError(
            f"input_ids holds sequences of {input_ids.shape[1]} tokens, but the model's position table holds"
            f" {max_seqlen} (truncate them, e.g. tokenizer(..., truncation=True, max_length={max_seqlen}))"
        )
    check_ids_in_range(input_ids, vocab_size, "input_ids", "the vocabulary size")


def check_ids_in_range(ids: Tensor, bound: int, name: str, what: str) -> None:
    # Read back on the host on every device: one scalar pair, where unpad waits for the
    # device anyway; a device-side assert would leave a GPU context unusable. Under
    # torch.compile the compiled lookup's own bounds check reports it.
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < 0 or high >= bound:
        first = ids[(ids < 0) | (ids >= bound)][0].item()
        raise ValueError(f"{name} holds {first}, outside [0, {bound}) ({what} is {bound})")


def masked_lm_output(model: nn.Module, x: Tensor, packing: Packing, input_ids: Tensor, labels: Tensor | None) -> MaskedLMOutput:
    """The masked-LM head on the packed hidden states x (total, C): logits unpacked to (B, S,
    vocab), and with labels (B, S) (-100 = no label) the mean cross-entropy over the labelled
    real tokens."""
    logits = model.mlm(x, model.word_embeddings.weight)
    loss = None
    if labels is not None:
        check_like(labels, "labels", input_ids)
        loss = F.cross_entropy(logits.float(), pack(labels, packing).long(), ignore_index=-100)
    return MaskedLMOutput(unpack(logits, packing), loss)


def check_like(t: object, name: str, input_ids: Tensor) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {getattr(t, 'shape', type(t))}")
    if t.device != input_ids.device:
        raise ValueError(f"{name} must be on input_ids' device {input_ids.device}, got {t.device}")


# ----------------------------------------------------------------------------- the model


class Bert(nn.Module):
    """BERT: embeddings (word + token type + position, LayerNorm), post-LN encoder layers, an
    optional pooler and an optional masked-LM head tied to the word embeddings."""

    config_class = BertConfig
    takes_token_type_ids = True
    position_padding_idx: int | None = None  # RoBERTa's position table has a padding row

    def __init__(self, config: BertConfig, *, pooler: bool = True, mlm_head: bool = True):
        super().__init__()
        self.config = config
        c = config
        approximate = gelu_approximation(c.hidden_act, "hidden_act")
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, approximate, c.layer_norm_eps,
                         c.attention_probs_dropout_prob, c.hidden_dropout_prob)
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if pooler else None
        self.mlm = MaskedLMHead(c.hidden_size, c.vocab_size, self.mlm_approximation(), c.layer_norm_eps,
                                c.tie_word_embeddings) if mlm_head else None

    def mlm_approximation(self) -> str:
        return gelu_approximation(self.config.hidden_act, "hidden_act")

    # ------------------------------------------------------------------------- forward

    def packed_position_ids(self, input_ids: Tensor, packing: Packing) -> Tensor:
        """(total,) positions of the real tokens: 0 .. S-1 over the padded row, as transformers."""
        return packing.indices % input_ids.shape[1]

    def encode_packed(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
    ) -> tuple[Tensor, Packing]:
        """The last hidden states of the real tokens, packed: (total, hidden), and the Packing."""
        c = self.config
        check_input_ids(input_ids, c.vocab_size, c.max_seqlen)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        check_like(attention_mask, "attention_mask", input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_like(token_type_ids, "token_type_ids", input_ids)
        check_ids_in_range(token_type_ids, c.type_vocab_size, "token_type_ids", "type_vocab_size")
        packing = unpad(attention_mask)
        ids, types, positions = pack(input_ids, packing), pack(token_type_ids, packing), self.packed_position_ids(input_ids, packing)
        x = (
            F.embedding(ids, self.word_embeddings.weight, padding_idx=c.pad_token_id)
            + F.embedding(types, self.token_type_embeddings.weight)
            + F.embedding(positions, self.position_embeddings.weight, padding_idx=self.position_padding_idx)
        )
        x = ops.layer_norm(x, self.embedding_norm.weight, self.embedding_norm.bias, c.layer_norm_eps)
        x = F.dropout(x, c.hidden_dropout_prob, self.training)
        for layer in self.layers:
            x = layer(x, packing)
        return x, packing

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> EncoderOutput:
        """input_ids: (B, S) int64/int32; attention_mask: (B, S) bool or 0/1 integers (default:
        every token real); token_type_ids: (B, S) (default zeros). Returns last_hidden_state
        (B, S, hidden), zeros at padding positions, and pooler_output (B, hidden) or None."""
        x, packing = self.encode_packed(input_ids, attention_mask, token_type_ids)
        hidden = unpack(x, packing)
        pooled = None
        if self.pooler is not None:
            pooled = torch.tanh(ops.linear(hidden[:, 0], self.pooler.weight, self.pooler.bias))
        return EncoderOutput(hidden, pooled)

    def masked_lm(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> MaskedLMOutput:
        """Masked-LM logits (B, S, vocab) (the head runs on the real tokens only; zeros at
        padding), and with labels (B, S) (-100 = no label) the mean cross-entropy over the
        labelled real tokens."""
        if self.mlm is None:
            raise RuntimeError(f"this {type(self).__name__} has no masked-LM head (its checkpoint held none)")
        x, packing = self.encode_packed(input_ids, attention_mask, token_type_ids)
        return masked_lm_output(self, x, packing, input_ids, labels)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def random(
        cls,
        config: dict | BertConfig | None = None,
        *,
        seed: int = 0,
        pooler: bool = True,
        mlm_head: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Bert:
        """A randomly initialized model, no checkpoint needed (benchmarks, tests): ``config`` a
        config.json-style dict (model_type defaults to this class's) or a BertConfig; None gives
        bert-base (BertConfig's defaults). Initialized as transformers does (weights normal(0,
        0.02), biases 0, LayerNorm weights 1), in eval mode."""
        if not isinstance(config, BertConfig):
            config = cls.config_class.from_dict({"model_type": cls.model_type, **(config or {})}, "config")
        return init_random(cls(config, pooler=pooler, mlm_head=mlm_head), seed, dtype, device)

    model_type = "bert"
    encoder_prefix = "bert."  # how a *ForMaskedLM / *ForPreTraining checkpoint names the encoder

    head_prefix = "cls.predictions."

    @classmethod
    def head_names(cls, config: BertConfig, names: set[str]) -> list[tuple[str, str | None]]:
        """(checkpoint name pattern, model name) of the masked-LM head's tensors (None: a tensor
        the model does not use) of a checkpoint holding the tensors ``names``; the encoder's
        are ENCODER_NAMES."""
        decoder = None if config.tie_word_embeddings else "mlm.decoder"  # tied: the word embeddings
        return [
            (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm.dense.\1"),
            (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm.norm.\1"),
            *cls.output_bias_names(config, names),
            (r"cls\.predictions\.decoder\.weight", decoder),
            (r"cls\.seq_relationship\.(weight|bias)", None),  # BertForPreTraining's next-sentence head: not built
        ]

    @classmethod
    def output_bias_names(cls, config: BertConfig, names: set[str]) -> list[tuple[str, str | None]]:
        """Which of the head's two output biases is the one transformers adds. Tied, the
        decoder's bias is the head's ``bias`` (one tensor, saved under either name or both);
        untied (transformers >= 5), the decoder has its own bias, the one its forward adds, and
        ``bias`` is unused, unless the checkpoint holds no decoder bias (written while the two
        were one tensor)."""
        head_bias, decoder_bias = cls.head_prefix + "bias", cls.head_prefix + "decoder.bias"
        names = {re.sub(r"^(?:bert|roberta)\.", "", n) for n in names}
        use_decoder = decoder_bias in names and (not config.tie_word_embeddings or head_bias not in names)
        return [
            (re.escape(head_bias), None if use_decoder else "mlm.bias"),
            (re.escape(decoder_bias), "mlm.bias" if use_decoder else None),
        ]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Bert:
        """The model of a transformers checkpoint directory (config.json + weights of a *Model,
        *ForMaskedLM or *ForPreTraining checkpoint, or of a sentence-transformers model). The
        pooler and the masked-LM head are built when the checkpoint holds them. In eval mode,
        fp32 unless ``dtype``, on the CPU unless ``device``."""
        config = cls.config_class.from_dict(read_config(path), f"{path}/config.json")
        if config.model_type != cls.model_type:
            raise CheckpointError(f"{path}/config.json: model_type {config.model_type!r}, not {cls.model_type!r}")
        return build_from_checkpoint(cls, config, path, ENCODER_NAMES, cls.encoder_prefix,
                                     lambda names: cls.head_names(config, names),
                                     dtype=dtype, device=device)


class Roberta(Bert):
    """RoBERTa: BERT with positions padding_idx + 1, padding_idx + 2, ... over the non-padding
    tokens (padding tokens get padding_idx) and an erf-GELU masked-LM head."""

    model_type = "roberta"
    encoder_prefix = "roberta."

    @property
    def position_padding_idx(self) -> int:
        return self.config.pad_token_id

    def packed_position_ids(self, input_ids: Tensor, packing: Packing) -> Tensor:
        # as transformers: counted over the tokens that are not the padding id, whatever the
        # attention mask says
        real = (input_ids != self.config.pad_token_id).to(torch.int32)
        return pack((real.cumsum(1, dtype=torch.int32) * real).long() + self.config.pad_token_id, packing)

    def mlm_approximation(self) -> str:
        return "none"  # transformers' RobertaLMHead applies the erf GELU whatever hidden_act says

    head_prefix = "lm_head."

    @classmethod
    def head_names(cls, config: BertConfig, names: set[str]) -> list[tuple[str, str | None]]:
        decoder = None if config.tie_word_embeddings else "mlm.decoder"
        return [
            (r"lm_head\.dense\.(weight|bias)", r"mlm.dense.\1"),
            (r"lm_head\.layer_norm\.(weight|bias)", r"mlm.norm.\1"),
            *cls.output_bias_names(config, names),
            (r"lm_head\.decoder\.weight", decoder),
        ]


# transformers' BertModel / RobertaModel tensor names -> ours ("{query,key,value}": the three
# projections, stacked by fuse_projections)
ENCODER_NAMES: list[tuple[str, str | None]] = [
    (r"embeddings\.word_embeddings\.weight", "word_embeddings.weight"),
    (r"embeddings\.position_embeddings\.weight", "position_embeddings.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "token_type_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embedding_norm.\1"),
    (r"embeddings\.position_ids", None),  # a buffer of 0 .. max_position_embeddings - 1
    (r"encoder\.layer\.(\d+)\.attention\.self\.\{query,key,value\}\.(weight|bias)", r"layers.\1.qkv.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.up.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.down.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.\1"),
]


# ----------------------------------------------------------------------------- loading, shared with distilbert.py


def init_random(model: nn.Module, seed: int, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Module:
    """transformers' initialization of an encoder, drawn from ``seed`` on the CPU (the same
    model on every device): LayerNorm weights 1, biases 0, other weights normal(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
    return model.to(dtype=dtype, device=device).eval()


def fuse_projections(weights: dict[str, Tensor], parts: tuple[str, str, str]) -> dict[str, Tensor]:
    """``weights`` with every attention's three projections (named ``<stem>.<part>.weight`` /
    ``.bias`` for the parts, e.g. query, key, value) stacked in that order into one tensor named
    ``<stem>.{query,key,value}.weight``: the fused QKV matmul's weight."""
    pattern = re.compile(rf"(.+)\.({'|'.join(parts)})\.(weight|bias)")
    fused: dict[str, Tensor] = {}
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in weights.items():
        m = pattern.fullmatch(name)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = tensor
        else:
            fused[name] = tensor
    for (stem, kind), found in groups.items():
        missing = [p for p in parts if p not in found]
        if missing:
            raise CheckpointError(f"the checkpoint holds {stem}.{next(iter(found))}.{kind} but lacks {stem}.{missing[0]}.{kind}")
        shapes = [tuple(found[p].shape) for p in parts]
        if len(set(shapes)) != 1:
            raise CheckpointError(f"{stem}.{{{','.join(parts)}}}.{kind} differ in shape: {shapes}")
        fused[f"{stem}.{{{','.join(parts)}}}.{kind}"] = torch.cat([found[p] for p in parts])
    return fused


def build_from_checkpoint(
    cls: type,
    config: object,
    path: str | os.PathLike,
    encoder_names: list[tuple[str, str | None]],
    encoder_prefix: str,
    head_names: Callable[[set[str]], list[tuple[str, str | None]]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    parts: tuple[str, str, str] = ("query", "key", "value"),
) -> nn.Module:
    """Reads the weights of ``path``, maps every tensor through the name tables (encoder names
    with or without ``encoder_prefix``; the head's, ``head_names(the checkpoint's tensor
    names)``, as they are; an unknown tensor is an error naming it), builds ``cls(config, pooler=..., mlm_head=...)`` with the parts the checkpoint
    holds, and fills it (load_into checks the shapes and that nothing is missing)."""
    weights = fuse_projections(read_weights(path), parts)
    table = [(re.compile(rf"(?:{re.escape(encoder_prefix)})?{p}"), t) for p, t in encoder_names]
    table += [(re.compile(p), t) for p, t in head_names(set(weights))]
    target: dict[str, str | None] = {}
    unknown = []
    for name in weights:
        plain = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        for pattern, model_name in table:
            m = pattern.fullmatch(plain)
            if m:
                target[name] = None if model_name is None else m.expand(model_name)
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{path}: tensors {cls.__name__} does not know: {', '.join(sorted(unknown)[:8])}")
    built = {t.split(".")[0] for t in target.values() if t}
    with torch.device("meta"):  # no random initialization: every tensor is filled below
        model = cls(config, pooler="pooler" in built, mlm_head="mlm" in built)
    model.to_empty(device=device if device is not None else "cpu")
    if dtype is not None:
        model.to(dtype)
    return load_into(model, weights, target.__getitem__, dtype=dtype, device=device)

