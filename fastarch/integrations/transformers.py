"""fastarch as a transformers attention implementation. Importing this module registers
"fastarch" in transformers' AttentionInterface (the attention call) and AttentionMaskInterface
(the masks: SDPA's, so a model gets None where a causal or full mask suffices and a boolean
(B, 1, Sq, Sk) mask otherwise — padding, sliding windows and packed sequences are in it)::

    import fastarch.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastarch")
    # or: model.set_attn_implementation("fastarch"), or fastarch.optimize(model)

Each call runs fastarch.ops.attention where a fastarch kernel backend can run it, grouped-
query heads natively (no repeated k/v), and transformers' own SDPA function otherwise (what
fastarch has no kernel for, such as a position bias that needs a gradient), so its results are
SDPA's within the kernels' rounding. Attention logit soft-capping (Gemma 2) and attention sinks
(gpt-oss) have neither a fastarch kernel nor a place in SDPA (which refuses the first and would
drop the second): a call with them is a ValueError, and fastarch.optimize leaves such models'
attention as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import StaticCache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from fastarch import cuda_graphs, ops
from fastarch.optimize import linear_no_kernel, linear_or_none
from fastarch.override import _sdpa_backend, attention_direct

NAME = "fastarch"
# attention options neither fastarch nor SDPA runs -> what they are
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks"}


def _with_position_bias(bias: Tensor, mask: Tensor | None, causal: bool, sq: int, sk: int) -> Tensor:
    """T5's relative position bias folded into one additive mask (what SDPA's path does):
    blocked entries get the dtype's lowest value, as transformers' eager path adds."""
    lowest = torch.finfo(bias.dtype).min
    if mask is None:
        if not causal:
            return bias
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=bias.device).tril()  # top-left, as SDPA's is_causal
        return torch.where(allowed, bias, lowest)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest)
    return bias + mask


def fastarch_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature. query (B, H, Sq, D), key and value
    (B, Hkv, Sk, D); attention_mask None, bool (True = attend) or additive, broadcastable to
    (B, H, Sq, Sk). Returns (out (B, Sq, H, D), None): no attention weights, as SDPA's."""

    def sdpa() -> tuple[Tensor, None]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)

    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='fastarch': {name} ({what}, {type(module).__name__}) has no fastarch "
                             "kernel, and SDPA's path would not apply it; run this model's attention as 'eager' "
                             "(fastarch.optimize leaves it so)")
    if query.dim() != 4:
        return sdpa()
    if attention_mask is None and position_bias is None and query.shape[2] == 1 and not dropout:
        out = _decode_direct(query, key, value, scaling, module.__dict__.get("_fastarch_backend"))
        if out is not None:
            return out, None
    sq, sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # SDPA's rule: a mask, or a single query (decoding: it sees every cached key), means no is_causal
    causal = bool(causal) and sq > 1 and attention_mask is None
    if causal and sk < sq:
        return sdpa()
    mask = attention_mask
    if position_bias is not None:
        if position_bias.requires_grad and torch.is_grad_enabled():
            return sdpa()  # fastarch gives the mask no gradient; T5's learned bias needs one
        mask = _with_position_bias(position_bias, mask, causal, sq, sk)
        causal = False
    backend = module.__dict__.get("_fastarch_backend")
    chosen = _sdpa_backend(query, key, value, mask, dropout, causal, scaling, query.shape[1] != key.shape[1], backend)
    if not chosen or (mask is not None and mask.dim() != 4):
        return sdpa()
    if causal and sk > sq:
        # SDPA's is_causal aligns top-left (a static cache's prefill: the keys past the queries
        # are empty slots); fastarch's aligns bottom-right, the same over the first sq keys
        key, value = key[:, :, :sq], value[:, :, :sq]
    out = ops.attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, dropout_p=dropout, backend=chosen)
    return out.transpose(1, 2).contiguous(), None


def _decode_direct(query: Tensor, key: Tensor, value: Tensor, scaling: float | None, backend: str | None) -> Tensor | None:
    """A decode step's attention (one query per sequence, seeing every key: no mask) by the
    attention kernel called directly (fastarch.override.attention_direct), as (B, 1, H, Dv);
    None where the general path must run."""
    out = attention_direct(query, key, value, scaling, backend)
    return None if out is None else out.transpose(1, 2).contiguous()


AttentionInterface.register(NAME, fastarch_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def _static_cache_tensors(cache: StaticCache) -> list[Tensor] | None:
    """A StaticCache as a CUDA graph's state argument (fastarch.cuda_graphs): its layers' keys,
    values and lengths, every one a device tensor updated in place (StaticLayer.update: an
    index_copy_ at cumulative_length, then its add_). None before the first update allocates
    them, for an offloading cache (its tensors move) and for sliding-window layers (they count
    in a Python int, which a replay would not advance)."""
    if getattr(cache, "offloading", False):
        return None
    tensors = []
    for layer in cache.layers:
        if type(layer) is not StaticLayer or not layer.is_initialized:
            return None
        tensors += (layer.keys, layer.values, layer.cumulative_length)
    return tensors


cuda_graphs.register_state(StaticCache, _static_cache_tensors)


# ----------------------------------------------------------------------------- fastarch.optimize


class FastarchConv1D(Conv1D):
    """transformers' Conv1D (GPT-2's and its kin's projections: y = x W + b with W stored
    (in_features, out_features)) on fastarch's linear op: W.t() is the op's K-major weight,
    which its CPU kernel streams as it is, no transposed copy. optimize changes each plain
    Conv1D's class to this one (the same object and parameters); what the op would not run
    (linear_or_none) runs Conv1D's own addmm."""

    def forward(self, x: Tensor) -> Tensor:
        w = self._parameters["weight"]
        y = linear_or_none(x, w.t(), self._parameters["bias"], self.__dict__.get("_fastarch_backend"))
        return super().forward(x) if y is None else y



def _pretrained_models(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost transformers models in ``model`` (itself, or e.g. the BertModel inside a
    SentenceTransformer): set_attn_implementation on one covers the models inside it."""
    from transformers import PreTrainedModel

    found: list[tuple[str, torch.nn.Module]] = []
    for path, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(path.startswith(f"{p}.") or not p for p, _ in found):
            found.append((path, m))
    return found


def optimize_model(model: torch.nn.Module, report, backend: str | None) -> None:
    """fastarch.optimize's transformers part: set_attn_implementation("fastarch") on each
    outermost PreTrainedModel (its previous implementation is kept for restore_model), and
    BERT-style encoders run unpadded (fastarch.optimize's restore walk puts them back)."""
    for path, m in _pretrained_models(model):
        previous = m.config._attn_implementation
        kind = type(m).__name__
        if previous == NAME:
            report.add(path, kind, True, "attention implementation already fastarch")
            continue
        if why := _attention_options_reason(m):
            report.add(path, kind, False, f"attention stays {previous!r}: {why}")
            continue
        try:
            m.set_attn_implementation(NAME)
        except (ValueError, KeyError, ImportError) as e:
            report.add(path, kind, False, f"attention stays {previous!r}: set_attn_implementation refused ({e})")
            continue
        if m.config._attn_implementation != NAME:
            report.add(path, kind, False, f"attention stays {previous!r}: the model cannot change it (no AttentionInterface)")
            continue
        _set_inner(m, NAME)
        m.__dict__["_fastarch_attn_implementation"] = previous
        if backend is not None:
            for sub in m.modules():
                sub.__dict__["_fastarch_backend"] = backend
        report.add(path, kind, True, f"attention implementation {previous!r} -> 'fastarch'")
    _swap_encoders(model, report, backend)
    _swap_decoder_layers(model, report)
    _swap_conv1d(model, report, backend)


def _attention_options_reason(model: torch.nn.Module) -> str | None:
    """Why model's attention must stay as it is (an option of _UNSUPPORTED_KWARGS that its
    attention modules pass), or None."""
    for path, m in model.named_modules():
        if getattr(m, "attn_logit_softcapping", None) is not None:
            return f"{path} caps its attention logits (attn_logit_softcapping): no fastarch kernel does"
        if isinstance(getattr(m, "sinks", None), Tensor):
            return f"{path} has attention sinks: no fastarch kernel runs them"
    return None


def _swap_encoders(model: torch.nn.Module, report, backend: str | None) -> None:
    """BERT-style encoders -> UnpaddedEncoder (unpadded_encoder.py), in place."""
    from fastarch.integrations.unpadded_encoder import UnpaddedEncoder, bert_style_reason

    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            kind = type(child)
            if child is None or isinstance(child, UnpaddedEncoder) or not kind.__name__.endswith("Encoder"):
                continue
            if not kind.__module__.startswith("transformers.models."):
                continue
            path = f"{parent_path}.{name}" if parent_path else name
            if why := bert_style_reason(child):
                report.add(path, kind.__name__, False, f"runs padded: {why}")
                continue
            setattr(parent, name, UnpaddedEncoder(child, backend))
            report.add(path, kind.__name__, True, "-> UnpaddedEncoder: the real tokens only (0 at padding positions)")


def _swap_decoder_layers(model: torch.nn.Module, report) -> None:
    """Each plain LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 3, GPT-2, GPT-NeoX or OPT decoder layer made its
    Fastarch* class (decoder_layer.py) by changing its class: the same object, parameters and
    hooks."""
    from fastarch.integrations.decoder_layer import FUSED

    for path, m in model.named_modules():
        if (fused := FUSED.get(type(m))) is not None:
            m.__class__ = fused
            report.add(path, fused.__bases__[-1].__name__, True,
                       f"-> {fused.__name__} (a decode step as one function of fastarch's kernels)")


def _swap_conv1d(model: torch.nn.Module, report, backend: str | None) -> None:
    """Each plain Conv1D that a fastarch linear kernel runs made a FastarchConv1D by changing
    its class (its hooks still run: it is still called)."""
    for path, m in model.named_modules():
        if type(m) is Conv1D:
            if why := linear_no_kernel(m.weight.t(), backend):
                report.add(path, "Conv1D", False, why)
                continue
            m.__class__ = FastarchConv1D
            if backend is not None:
                m.__dict__["_fastarch_backend"] = backend
            report.add(path, "Conv1D", True, "-> FastarchConv1D (fastarch.ops.linear on its weight as it is: K-major)")


def restore_model(model: torch.nn.Module) -> None:
    """Undo optimize_model: the previous attention implementations, no forced backend, plain
    decoder layers."""
    from fastarch.integrations.decoder_layer import FUSED

    plain = {fused: cls for cls, fused in FUSED.items()} | {FastarchConv1D: Conv1D}
    for m in model.modules():
        if (cls := plain.get(type(m))) is not None:
            m.__class__ = cls
    for _, m in _pretrained_models(model):
        previous = m.__dict__.pop("_fastarch_attn_implementation", None)
        for sub in m.modules():
            sub.__dict__.pop("_fastarch_backend", None)
        if previous is not None:
            m.set_attn_implementation(previous)
            _set_inner(m, previous)


def _set_inner(model: torch.nn.Module, implementation: str) -> None:
    """set_attn_implementation on the models inside ``model`` that did not follow it: where a
    transformers release gives inner models their own copy of the config (T5's encoder and
    decoder stacks in transformers 5.17), the outer call leaves them as they were."""
    from transformers import PreTrainedModel

    for sub in model.modules():
        if sub is not model and isinstance(sub, PreTrainedModel) and sub.config._attn_implementation != implementation:
            sub.set_attn_implementation(implementation)
