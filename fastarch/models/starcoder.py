"""StarCoder / SantaCoder (transformers' GPT-BigCode, model_type gpt_bigcode) on fastarch's kernels.

    model = StarCoder.from_pretrained("path/to/starcoder")   # GPTBigCodeForCausalLM's checkpoint
    logits = model(input_ids, attention_mask)                 # (B, S, vocab)
    ids = fastarch.models.generate.generate(model, input_ids, attention_mask, max_new_tokens=20)

GPT-2's architecture (pre-LN blocks, learned positions, a GELU MLP, the LM head tied to the token
embeddings) with nn.Linear weights instead of Conv1D's, and multi-query attention: with
multi_query (the default, StarCoder's) every query head reads one shared key/value head, so
the cache holds one head per layer. The forward passes, the decoder protocol and the fused
norms are GPT2's (gpt2.py); only the attention's q/k/v split and the loading differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastarch.models.gpt2 import GPT2, GPT2Config, _model_name
from fastarch.models.loading import (
    CheckpointError, load_into, read_config, read_weights, untie_stored_head, without_random_init,
)

# GPT2Config's keys that GPT-BigCode does not have (a gpt_bigcode config.json carrying them is
# read as transformers reads it: without them)
_GPT2_ONLY = {"attention_layers", "window_size", "qkv_bias", "scale_attn_by_inverse_layer_idx"}


@dataclass
class StarCoderConfig(GPT2Config):
    """GPT-BigCode's hyperparameters (its config.json names are GPT-2's, plus multi_query);
    the defaults are transformers' GPTBigCodeConfig's."""

    activation_function: str = "gelu_pytorch_tanh"
    multi_query: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    @classmethod
    def from_dict(cls, config: dict) -> StarCoderConfig:
        """From a config.json of model_type gpt_bigcode."""
        model_type = config.get("model_type", "gpt_bigcode")
        if model_type != "gpt_bigcode":
            raise CheckpointError(f"StarCoderConfig reads model_type gpt_bigcode, got {model_type!r}")
        if config.get("add_cross_attention"):
            raise CheckpointError("config.json: add_cross_attention (GPT-BigCode as a seq2seq decoder) is not supported")
        names = {f.name for f in fields(cls)} - _GPT2_ONLY
        # a null n_inner means 4 * n_embd, a null bos/eos "none" (not the 50256 default)
        nullable = {"n_inner", "bos_token_id", "eos_token_id"}
        cfg = cls(**{k: v for k, v in config.items() if k in names and (v is not None or k in nullable)})
        cfg.check()
        return cfg

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head


class StarCoder(GPT2):
    """GPT-BigCode language model (StarCoder, SantaCoder, tiny_starcoder): token ids -> next-token
    logits. c_attn's output holds, with multi_query, q (n_embd) then k and v (head_dim each);
    without, per head q, k, v (head_dim each), head after head."""

    config: StarCoderConfig

    def _qkv(self, layer: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        H, D = self.n_head, self.head_dim
        qkv = self.h[layer].c_attn(y)
        if self.config.multi_query:
            q, k, v = qkv.split([H * D, D, D], dim=-1)
            return q.unflatten(-1, (H, D)), k.unsqueeze(-2), v.unsqueeze(-2)
        return qkv.unflatten(-1, (H, 3, D)).unbind(-2)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> StarCoder:
        """The model of a transformers GPT-BigCode checkpoint directory (GPTBigCodeForCausalLM or
        GPTBigCodeModel), in eval mode."""
        weights = read_weights(path)
        cfg = untie_stored_head(StarCoderConfig.from_dict(read_config(path)), weights,
                                ("transformer.wte.weight", "wte.weight"), path)
        with without_random_init():  # load_into fills every parameter
            model = cls(cfg)
        tied = cfg.tie_word_embeddings

        def name_of(ckpt_name: str) -> str | None:
            if ckpt_name.removeprefix("transformer.") in ("bias", "masked_bias"):
                return None  # the causal-mask buffer older transformers saved
            target = _model_name(ckpt_name)  # the module names are GPT-2's
            return None if tied and target == "lm_head.weight" else target  # a copy of wte, if saved

        return load_into(model, weights, name_of, dtype=dtype, device=device,
                         optional=["lm_head.weight"] if tied else [])


__all__ = ["StarCoder", "StarCoderConfig"]
