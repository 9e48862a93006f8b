"""transformers' decoder layers' decode step with no module calls inside it.

transformers' LlamaDecoderLayer runs a generated token through ~15 module calls, views and
small tensor ops per layer (two norms, four attention and three MLP projections, the rotary
function's slices and concatenations, the activation and its product, the residual adds);
for a small model at batch 1 on a CPU that Python costs as much as the kernels (SmolLM2-135M
in bf16: ~10 of a ~22 ms token on a 2-core AMD EPYC held to AVX2, the rest streaming the
weights), and swapping the layers inside it leaves all of it. fastarch.optimize changes the
class of each plain decoder layer of these families to its Fastarch* class (FUSED; the same
object, parameters, hooks and state_dict, as FastarchResnetBlock2D's in diffusers.py), whose
forward runs a decode step — one new token per sequence, inference — as one function of the
kernels fastarch's swapped layers would run, with transformers' own cache update between them
(the cache stays transformers' object, updated as transformers updates it):

- LLaMA (FastarchLlamaDecoderLayer), Mistral, Qwen2 (q/k/v biases) and Qwen3 (an RMSNorm over
  each head's q and k before the rotation): norm, q/k/v, the rotary kernel, the attention,
  o_proj with the residual add fused into the second norm, gate/up, the SwiGLU kernel, down.
  The attention mask transformers gives a step (padding, a sliding window that cuts the keys,
  a static cache's empty slots) goes to the attention (_step_mask).
- Gemma (FastarchGemmaDecoderLayer): LLaMA's step with Gemma's norms (x̂ * (1 + weight), the
  norm kernel's weight_offset) and its GELU-tanh gated MLP on the same gated kernel. Gemma 3
  (FastarchGemma3DecoderLayer): Qwen3's q/k norms, and a norm after the attention and after the
  MLP too (the first then fused with the residual add into the MLP's norm); its query scale and
  its sliding and full layers' own rotary tables come with the call. Gemma 2's attention logit
  soft-capping has no fastarch kernel: its layers are left as they are.
- GPT-2 (FastarchGPT2Block): layer norm, the fused q/k/v product of its Conv1D (K-major
  weights, read as they are), the attention, c_proj with the residual add fused into the
  second layer norm, c_fc with its bias added inside the GELU kernel, c_proj, the residual.
- GPT-NeoX / Pythia (FastarchGPTNeoXLayer): each head's q, k and v from one product, the rotary
  kernel on the first rotary_ndims channels, the MLP as GPT-2's, and the parallel residual
  (both norms of the layer's input, three-way sum) or the sequential one.
- OPT (FastarchOPTDecoderLayer): q/k/v, the attention at OPT's scale, out_proj, fc1, ReLU in
  place, fc2, the residual adds fused into the norms; pre-norm (OPT-125m) or post-norm (350m).

Every other call runs the layer's own forward as it is (the swapped layers inside it still
run fastarch's kernels): prefill (more than one token: compute-bound, the Python is noise
there), autograd, torch.compile and other modes, an attention mask of another shape than a
step's (B or 1, 1, 1, keys), hooks on the
layer's parts (transformers installs some when asked for hidden states or attentions), parts
that are not what optimize made of them (a LoRA wrapper on a projection), the attention not
on fastarch's implementation, rotary tables whose two halves differ (not LLaMA's rotate_half
layout), or a kernel backend unable to run the step. The results equal the layer's own
within the kernels' rounding: fastarch rounds the rotary embedding, the SwiGLU and the norm
after the residual add once each, where transformers rounds every elementwise op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaDecoderLayer, GemmaMLP
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3DecoderLayer, Gemma3MLP
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXLayer, GPTNeoXMLP
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer, MistralMLP
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3MLP

from fastarch import cuda_graphs
from fastarch.integrations.transformers import FastarchConv1D, fastarch_attention_forward
from fastarch.ops.dispatch import direct_call_allowed
from fastarch.ops.linear.backends import weight_layout
from fastarch.optimize import HFRMSNorm, LayerNorm, Linear, call_hooked
from fastarch.override import _KERNEL_DTYPES, kernel_for

# the gated MLPs' activations (transformers' ACT2FN["silu"], torch's SiLU; Gemma's
# "gelu_pytorch_tanh" and "gelu") -> the gated kernel's
_GATED = {SiLUActivation: "silu", nn.SiLU: "silu", GELUTanh: "gelu_tanh", NewGELUActivation: "gelu_tanh",
          GELUActivation: "gelu"}
# GPT-2's and GPT-NeoX's activations ("gelu_new", "gelu_pytorch_tanh", "gelu") -> the bias_gelu kernel's form
_GELU = {NewGELUActivation: "tanh", GELUTanh: "tanh", GELUActivation: "none"}


class _Tables:
    """The rotary kernel's fp32 tables made from transformers' position embeddings (cos, sin:
    (B or 1, 1, D), the two halves equal in LLaMA's layout), once per step: every layer gets
    the same tuple. Row b is sequence b's position, read with offsets 0 .. B - 1. None where
    the halves differ (another layout: the layer's own code runs)."""

    # the last two steps' (cos, sin, tables), newest first (Gemma 3's sliding and full layers
    # have a table each); one tuple, replaced whole: thread-safe
    last: tuple[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None], ...] = ()
    # whether a step found LLaMA's layout: a step that a CUDA graph is made from may not read
    # the halves (a read on the host), and takes it on trust from an earlier one (these layer
    # classes' rotary modules always make it: cat(freqs, freqs))
    seen_equal_halves = False

    @classmethod
    def of(cls, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        last = cls.last
        for entry in last:
            if entry[0] is cos and entry[1] is sin:
                return entry[2]
        tables = None
        half = cos.shape[-1] // 2
        if cos.shape == sin.shape and cos.dim() == 3 and cos.shape[1] == 1 and cos.shape[-1] % 2 == 0:
            halves = [(t[..., :half], t[..., half:]) for t in (cos, sin)]
            if cuda_graphs.recording():
                equal = cls.seen_equal_halves
            else:
                equal = cls.seen_equal_halves = all(torch.equal(a, b) for a, b in halves)
            if equal:
                tables = (halves[0][0][:, 0].float().contiguous(), halves[1][0][:, 0].float().contiguous(),
                          torch.arange(cos.shape[0], device=cos.device))
        cls.last = ((cos, sin, tables),) + last[:1]
        return tables


def _step_mask(x: object, mask: object) -> Tensor | None | bool:
    """For x, a decode step's hidden states (B, 1, hidden) in a kernel dtype, the attention mask
    transformers gives the step, as the step passes it to the attention: None (none, or a
    boolean mask that keeps every key: on the CPU the decode kernel then runs, the check costing
    less than the masked path) or the mask ((B or 1, 1, 1, keys), boolean or additive: padding,
    a sliding window, a static cache's empty slots); False for another x or mask (the layer's
    own code runs)."""
    if type(x) is not Tensor or x.dim() != 3 or x.shape[1] != 1 or x.dtype not in _KERNEL_DTYPES:
        return False
    if mask is None:
        return None
    if type(mask) is not Tensor or mask.dim() != 4 or mask.shape[0] not in (1, x.shape[0]) or mask.shape[1:3] != (1, 1):
        return False
    # (a graph's capture may read no value: cuda_graphs.recording(), and on a GPU it never asks)
    if mask.dtype == torch.bool and mask.device.type == "cpu" and not cuda_graphs.recording() and bool(mask.all()):
        return None
    return mask


class _StepFirst:
    """Mixed in before a decoder layer class: a call with keyword arguments only, no
    gradients, not compiling, tries self._decode_step (None: not a step it runs), else the
    layer's own forward."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if not args and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            out = self._decode_step(hidden_states, **kwargs)
            if out is not None:
                return out
        return super().forward(hidden_states, *args, **kwargs)


class _FusedDecodeStep(_StepFirst):
    """A LLaMA-style decoder layer whose decode step runs as one function on fastarch's kernels
    (see the module docstring); every other call is the layer's own forward. Mixed in before
    the layer class, which _attention and _mlp belong with; _qk_norm: per-head q and k norms
    (Qwen3, Gemma 3); _sandwich: norms after the attention and the MLP too (Gemma 3);
    _norm_offset: the norms' weight_offset (Gemma's 1 + weight)."""

    _attention: type
    _mlp: type
    _qk_norm = False
    _sandwich = False
    _norm_offset = 0.0

    def _decode_step(self, x: Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                     position_embeddings=None, past_key_values=None, **kwargs) -> Tensor | None:
        """The step, or None where the layer's own forward must run it."""
        cache = cache if cache is not None else past_key_values
        if cache is None or position_embeddings is None or kwargs:
            return None
        if (mask := _step_mask(x, attention_mask)) is False:
            return None
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        norm1, norm2 = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
        if type(attn) is not self._attention or type(mlp) is not self._mlp or attn.training and attn.attention_dropout:
            return None
        act = _GATED.get(type(mlp.act_fn))
        if attn.config._attn_implementation != "fastarch" or act is None:
            return None
        if getattr(attn, "attn_logit_softcapping", None) is not None:  # (Gemma 2's)
            return None
        a, m = attn._modules, mlp._modules
        linears = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])
        norms = (norm1, norm2)
        if self._sandwich:
            norms += (self._modules["pre_feedforward_layernorm"], self._modules["post_feedforward_layernorm"])
        if self._qk_norm:
            norms += (a["q_norm"], a["k_norm"])
        if any(type(n) is not HFRMSNorm for n in norms) or any(type(p) is not Linear for p in linears):
            return None
        if call_hooked((attn, mlp, mlp.act_fn) + norms + linears) or not direct_call_allowed((x,)):
            return None
        cos, sin = position_embeddings
        tables = _Tables.of(cos, sin) if type(cos) is Tensor and type(sin) is Tensor else None
        if tables is None or tables[0].shape[0] not in (1, x.shape[0]) or 2 * tables[0].shape[1] != attn.head_dim:
            return None
        return _Step(x, self.__dict__.get("_fastarch_backend"), mask).run(attn, norms, linears, tables, cache, act,
                                                                          self._norm_offset, self._sandwich)


class FastarchLlamaDecoderLayer(_FusedDecodeStep, LlamaDecoderLayer):
    _attention, _mlp = LlamaAttention, LlamaMLP


class FastarchMistralDecoderLayer(_FusedDecodeStep, MistralDecoderLayer):
    _attention, _mlp = MistralAttention, MistralMLP


class FastarchQwen2DecoderLayer(_FusedDecodeStep, Qwen2DecoderLayer):
    _attention, _mlp = Qwen2Attention, Qwen2MLP


class FastarchQwen3DecoderLayer(_FusedDecodeStep, Qwen3DecoderLayer):
    _attention, _mlp, _qk_norm = Qwen3Attention, Qwen3MLP, True


class FastarchGemmaDecoderLayer(_FusedDecodeStep, GemmaDecoderLayer):
    _attention, _mlp, _norm_offset = GemmaAttention, GemmaMLP, 1.0


class FastarchGemma3DecoderLayer(_FusedDecodeStep, Gemma3DecoderLayer):
    _attention, _mlp, _norm_offset, _qk_norm, _sandwich = Gemma3Attention, Gemma3MLP, 1.0, True, True


class FastarchGPT2Block(GPT2Block):
    """GPT2Block whose decode step runs as one function on fastarch's kernels (see the module
    docstring); every other call is GPT2Block.forward. transformers' GPT2Model passes the
    cache, the mask and the encoder states positionally."""

    def forward(self, hidden_states: Tensor, cache=None, attention_mask=None, encoder_hidden_states=None,
                *args, **kwargs) -> Tensor:
        if (not args and encoder_hidden_states is None and cache is not None and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            out = self._decode_step(hidden_states, cache, attention_mask, **kwargs)
            if out is not None:
                return out
        return super().forward(hidden_states, cache, attention_mask, encoder_hidden_states, *args, **kwargs)

    def _decode_step(self, x: Tensor, cache, attention_mask, encoder_attention_mask=None, use_cache=False,
                     position_ids=None, **kwargs) -> Tensor | None:
        """The step, or None where GPT2Block.forward must run it."""
        if kwargs or (mask := _step_mask(x, attention_mask)) is False:
            return None
        m = self._modules
        attn, mlp, ln_1, ln_2 = m["attn"], m["mlp"], m["ln_1"], m["ln_2"]
        if type(attn) is not GPT2Attention or type(mlp) is not GPT2MLP or attn.is_cross_attention:
            return None
        if type(ln_1) is not LayerNorm or type(ln_2) is not LayerNorm or attn.config._attn_implementation != "fastarch":
            return None
        a, f = attn._modules, mlp._modules
        convs = (a["c_attn"], a["c_proj"], f["c_fc"], f["c_proj"])
        dropouts = (a["attn_dropout"], a["resid_dropout"], f["dropout"])
        act = _GELU.get(type(f["act"]))
        if act is None or any(type(c) is not FastarchConv1D for c in convs) or any(d.training and d.p for d in dropouts):
            return None
        if call_hooked((attn, mlp, ln_1, ln_2, f["act"]) + convs + dropouts) or not direct_call_allowed((x,)):
            return None
        return _GPT2Step(x, self.__dict__.get("_fastarch_backend"), mask).run(attn, ln_1, ln_2, convs, act, cache)


class FastarchGPTNeoXLayer(_StepFirst, GPTNeoXLayer):
    """GPTNeoXLayer (Pythia, GPT-NeoX) whose decode step runs as one function on fastarch's
    kernels (see the module docstring); every other call is GPTNeoXLayer.forward."""

    def _decode_step(self, x: Tensor, attention_mask=None, position_ids=None, use_cache=False, layer_past=None,
                     position_embeddings=None, **kwargs) -> Tensor | None:
        """The step, or None where GPTNeoXLayer.forward must run it."""
        if layer_past is None or position_embeddings is None or kwargs:
            return None
        if (mask := _step_mask(x, attention_mask)) is False:
            return None
        m = self._modules
        attn, mlp, ln_1, ln_2 = m["attention"], m["mlp"], m["input_layernorm"], m["post_attention_layernorm"]
        if type(attn) is not GPTNeoXAttention or type(mlp) is not GPTNeoXMLP or attn.training and attn.attention_dropout:
            return None
        if type(ln_1) is not LayerNorm or type(ln_2) is not LayerNorm or attn.config._attn_implementation != "fastarch":
            return None
        a, f = attn._modules, mlp._modules
        linears = (a["query_key_value"], a["dense"], f["dense_h_to_4h"], f["dense_4h_to_h"])
        dropouts = (m["post_attention_dropout"], m["post_mlp_dropout"])
        act = _GELU.get(type(f["act"]))
        if act is None or any(type(p) is not Linear for p in linears) or any(d.training and d.p for d in dropouts):
            return None
        if call_hooked((attn, mlp, ln_1, ln_2, f["act"]) + linears + dropouts) or not direct_call_allowed((x,)):
            return None
        cos, sin = position_embeddings
        tables = _Tables.of(cos, sin) if type(cos) is Tensor and type(sin) is Tensor else None
        if tables is None or tables[0].shape[0] not in (1, x.shape[0]) or 2 * tables[0].shape[1] > attn.head_size:
            return None
        return _GPTNeoXStep(x, self.__dict__.get("_fastarch_backend"), mask).run(
            attn, ln_1, ln_2, linears, act, self.use_parallel_residual, tables, layer_past)


class FastarchOPTDecoderLayer(_StepFirst, OPTDecoderLayer):
    """OPTDecoderLayer (OPT-125m ...) whose decode step runs as one function on fastarch's
    kernels (see the module docstring); every other call is OPTDecoderLayer.forward."""

    def _decode_step(self, x: Tensor, attention_mask=None, cache=None, use_cache=False, position_ids=None,
                     past_key_values=None, **kwargs) -> Tensor | None:
        """The step, or None where OPTDecoderLayer.forward must run it."""
        cache = cache if cache is not None else past_key_values
        if cache is None or kwargs or (self.training and self.dropout):
            return None
        if (mask := _step_mask(x, attention_mask)) is False:
            return None
        m = self._modules
        attn, ln_1, ln_2 = m["self_attn"], m["self_attn_layer_norm"], m["final_layer_norm"]
        if type(attn) is not OPTAttention or attn.training and attn.dropout or type(m["activation_fn"]) is not nn.ReLU:
            return None
        if type(ln_1) is not LayerNorm or type(ln_2) is not LayerNorm or attn.config._attn_implementation != "fastarch":
            return None
        a = attn._modules
        linears = (a["q_proj"], a["k_proj"], a["v_proj"], a["out_proj"], m["fc1"], m["fc2"])
        if any(type(p) is not Linear for p in linears) or m["activation_fn"].inplace:
            return None
        if call_hooked((attn, ln_1, ln_2, m["activation_fn"]) + linears) or not direct_call_allowed((x,)):
            return None
        return _OPTStep(x, self.__dict__.get("_fastarch_backend"), mask).run(attn, ln_1, ln_2, linears,
                                                                             self.do_layer_norm_before, cache)


FUSED = {cls.__bases__[-1]: cls for cls in (FastarchLlamaDecoderLayer, FastarchMistralDecoderLayer,
                                            FastarchQwen2DecoderLayer, FastarchQwen3DecoderLayer,
                                            FastarchGemmaDecoderLayer, FastarchGemma3DecoderLayer, FastarchGPT2Block,
                                            FastarchGPTNeoXLayer, FastarchOPTDecoderLayer)}
"""transformers' decoder layer class -> the one fastarch.optimize makes of it (restore: back)."""


class _Step:
    """One decode step's kernels, all chosen before any runs (the cache update in the middle
    cannot be undone: past it there is no way back to the layer's own code)."""

    def __init__(self, x: Tensor, backend: str | None, mask: Tensor | None = None) -> None:
        self.x, self.backend, self.mask = x, backend, mask  # mask: the attention's (_step_mask)
        self.device, self.dtype, self.rows = x.device.type, x.dtype, x.shape[0]

    def _linear_kernel(self, layer: Linear, k: int):
        w, b = layer._parameters["weight"], layer._parameters["bias"]
        if w.dtype != self.dtype or w.dim() != 2 or w.shape[1] != k or b is not None and b.dtype != self.dtype:
            return None
        return kernel_for("linear", (self.device, self.dtype, self.rows, k, w.shape[0], *weight_layout(w)), self.backend)

    def _ln_params(self, ln: LayerNorm, hidden: int) -> tuple[Tensor | None, Tensor | None] | None:
        w, b = ln._parameters["weight"], ln._parameters["bias"]
        if ln.normalized_shape != (hidden,) or type(ln.eps) is not float:
            return None
        if any(t is not None and (t.dtype != self.dtype or t.shape != (hidden,)) for t in (w, b)):
            return None
        return tuple(None if t is None else t.contiguous() for t in (w, b))

    def _norm_weight(self, layer: HFRMSNorm, hidden: int, offset: float = 0.0) -> Tensor | None:
        w = layer._parameters["weight"]
        ok = w is not None and w.dtype == self.dtype and w.shape == (hidden,) and type(layer.eps) is float
        return w.contiguous() if ok and layer.weight_offset == offset else None

    @staticmethod
    def _product(kernel, y: Tensor, layer: Linear, bias: bool = True) -> Tensor:
        """layer's x W^T (+ b) on its chosen kernel."""
        b = layer._parameters["bias"] if bias else None
        return kernel.forward(y, layer._parameters["weight"], None if b is None else b.contiguous())

    def run(self, attn: torch.nn.Module, norms: tuple[HFRMSNorm, ...], linears: tuple[Linear, ...],
            tables: tuple[Tensor, Tensor, Tensor], cache, act: str = "silu", offset: float = 0.0,
            sandwich: bool = False) -> Tensor | None:
        """norms: the layer's two, then (sandwich) the MLP's two, then (Qwen3, Gemma 3) the
        attention's q and k norms, each with weight_offset ``offset``; act: the gated kernel's."""
        batch, _, hidden = self.x.shape
        D, heads, kv_heads = attn.head_dim, attn.config.num_attention_heads, attn.config.num_key_value_heads
        widths = (hidden, hidden, hidden, heads * D, hidden, hidden, linears[5].out_features)
        kernels = [self._linear_kernel(layer, k) for layer, k in zip(linears, widths)]
        layer_norms = 4 if sandwich else 2
        weights = [self._norm_weight(n, hidden if i < layer_norms else D, offset) for i, n in enumerate(norms)]
        shapes = tuple(layer.out_features for layer in linears)
        if (None in kernels or None in weights or shapes[:4] != (heads * D, kv_heads * D, kv_heads * D, hidden)
                or shapes[4:] != (widths[6], widths[6], hidden)):
            return None
        norm = kernel_for("rms_norm", (self.device, self.dtype, 1, 1), self.backend)
        rotary = kernel_for("rotary", (self.device, self.dtype, D, D), self.backend)
        gated = kernel_for("swiglu", (self.device, self.dtype, batch, widths[6]), self.backend)
        if norm is None or rotary is None or gated is None:
            return None
        q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = linears
        lq, lk, lv, lo, lg, lu, ld = kernels

        linear = self._product

        def rms(x: Tensor, i: int, residual: Tensor | None = None) -> tuple[Tensor, ...]:  # with norms[i]
            return norm.forward(x, residual, weights[i], None, norms[i].eps, True, offset)

        h = self.x.view(batch, hidden)
        y = rms(h, 0)[0]
        q, k, v = linear(lq, y, q_proj), linear(lk, y, k_proj), linear(lv, y, v_proj)
        if len(norms) > layer_norms:  # each head's q and k normalized over its D values
            q = rms(q.view(batch * heads, D), layer_norms)[0]
            k = rms(k.view(batch * kv_heads, D), layer_norms + 1)[0]
        cos, sin, offsets = tables
        q, k = rotary.forward(q.view(batch, heads, 1, D), k.view(batch, kv_heads, 1, D), cos, sin,
                              offsets if cos.shape[0] > 1 else None, False, False)
        keys, values = cache.update(k, v.view(batch, kv_heads, 1, D), attn.layer_idx)
        # transformers' attention function as the "fastarch" implementation runs it: the
        # decode kernel directly (or SDPA's path for a cache that returns what it cannot take)
        out, _ = fastarch_attention_forward(attn, q, keys, values, self.mask, scaling=attn.scaling)
        a = linear(lo, out.reshape(batch, heads * D), o_proj)
        if sandwich:  # Gemma 3: h + norm(a), normalized for the MLP and kept as its residual
            y, h = rms(rms(a, 1)[0], 2, h)[:2]
        else:  # h + a, normalized for the MLP and kept as its residual
            y, h = rms(a, 1, h)[:2]
        m = linear(ld, gated.forward(linear(lg, y, gate_proj), linear(lu, y, up_proj), act), down_proj)
        return torch.add(h, rms(m, 3)[0] if sandwich else m).view(batch, 1, hidden)


class _GPT2Step(_Step):
    """GPT2Block's decode step: its kernels, all chosen before any runs (as _Step's)."""

    def _conv_kernel(self, conv: FastarchConv1D, k: int):
        w, b = conv._parameters["weight"], conv._parameters["bias"]  # (in_features, out_features)
        if w.dtype != self.dtype or w.dim() != 2 or w.shape[0] != k or not w.is_contiguous() or b is None:
            return None
        if b.dtype != self.dtype or b.shape != (w.shape[1],):
            return None
        return kernel_for("linear", (self.device, self.dtype, self.rows, k, w.shape[1], *weight_layout(w.t())),
                          self.backend)

    def run(self, attn: GPT2Attention, ln_1: LayerNorm, ln_2: LayerNorm, convs: tuple[FastarchConv1D, ...], act: str,
            cache) -> Tensor | None:
        batch, _, hidden = self.x.shape
        heads, D = attn.num_heads, attn.head_dim
        inner = convs[2]._parameters["weight"].shape[-1]
        shapes = tuple(tuple(c._parameters["weight"].shape) for c in convs)
        if heads * D != hidden or shapes != ((hidden, 3 * hidden), (hidden, hidden), (hidden, inner), (inner, hidden)):
            return None
        kernels = [self._conv_kernel(c, k) for c, k in zip(convs, (hidden, hidden, hidden, inner))]
        p1, p2 = self._ln_params(ln_1, hidden), self._ln_params(ln_2, hidden)
        norm = kernel_for("layer_norm", (self.device, self.dtype, 1, 1), self.backend)
        gelu = kernel_for("bias_gelu", (self.device, self.dtype, batch, inner), self.backend)
        if None in kernels or p1 is None or p2 is None or norm is None or gelu is None:
            return None
        l_attn, l_proj, l_fc, l_out = kernels

        def conv(kernel, y: Tensor, c: FastarchConv1D, bias: bool = True) -> Tensor:
            return kernel.forward(y, c._parameters["weight"].t(), c._parameters["bias"].contiguous() if bias else None)

        h = self.x.view(batch, hidden)
        y = norm.forward(h, None, p1[0], p1[1], ln_1.eps, False)[0]
        qkv = conv(l_attn, y, convs[0])
        q, k, v = (qkv[:, i * hidden:(i + 1) * hidden].view(batch, heads, 1, D) for i in range(3))
        keys, values = cache.update(k, v, attn.layer_idx)
        out, _ = fastarch_attention_forward(attn, q, keys, values, self.mask, scaling=attn.scaling)
        y, h = norm.forward(conv(l_proj, out.reshape(batch, hidden), convs[1]), h, p2[0], p2[1], ln_2.eps, False)[:2]
        g = gelu.forward(conv(l_fc, y, convs[2], bias=False), convs[2]._parameters["bias"].contiguous(), act)
        return torch.add(h, conv(l_out, g, convs[3])).view(batch, 1, hidden)


class _GPTNeoXStep(_Step):
    """GPTNeoXLayer's decode step: its kernels, all chosen before any runs (as _Step's)."""

    def run(self, attn: GPTNeoXAttention, ln_1: LayerNorm, ln_2: LayerNorm, linears: tuple[Linear, ...], act: str,
            parallel: bool, tables: tuple[Tensor, Tensor, Tensor], cache) -> Tensor | None:
        batch, _, hidden = self.x.shape
        heads, D = attn.config.num_attention_heads, attn.head_size
        inner = linears[2].out_features
        shapes = tuple(tuple(p._parameters["weight"].shape) for p in linears)
        if heads * D != hidden or shapes != ((3 * hidden, hidden), (hidden, hidden), (inner, hidden), (hidden, inner)):
            return None
        kernels = [self._linear_kernel(p, k) for p, k in zip(linears, (hidden, hidden, hidden, inner))]
        p1, p2 = self._ln_params(ln_1, hidden), self._ln_params(ln_2, hidden)
        cos, sin, offsets = tables
        norm = kernel_for("layer_norm", (self.device, self.dtype, 1, 1), self.backend)
        rotary = kernel_for("rotary", (self.device, self.dtype, D, 2 * cos.shape[1]), self.backend)
        gelu = kernel_for("bias_gelu", (self.device, self.dtype, batch, inner), self.backend)
        if None in kernels or p1 is None or p2 is None or norm is None or rotary is None or gelu is None:
            return None
        l_qkv, l_dense, l_fc, l_out = kernels
        h = self.x.view(batch, hidden)
        qkv = self._product(l_qkv, norm.forward(h, None, p1[0], p1[1], ln_1.eps, False)[0], linears[0])
        qkv = qkv.view(batch, heads, 1, 3 * D)  # each head's q, k and v side by side
        q, k = rotary.forward(qkv[..., :D], qkv[..., D:2 * D], cos, sin, offsets if cos.shape[0] > 1 else None, False,
                              False)
        keys, values = cache.update(k, qkv[..., 2 * D:], attn.layer_idx)
        out, _ = fastarch_attention_forward(attn, q, keys, values, self.mask, scaling=attn.scaling)
        a = self._product(l_dense, out.reshape(batch, hidden), linears[1])
        fc_bias = linears[2]._parameters["bias"]

        def mlp(y: Tensor) -> Tensor:  # the first product's bias added inside the GELU kernel
            g = gelu.forward(self._product(l_fc, y, linears[2], bias=False),
                             None if fc_bias is None else fc_bias.contiguous(), act)
            return self._product(l_out, g, linears[3])

        if parallel:  # mlp(ln_2(h)) + attention + h, summed in transformers' order
            y = norm.forward(h, None, p2[0], p2[1], ln_2.eps, False)[0]
            return torch.add(torch.add(mlp(y), a), h).view(batch, 1, hidden)
        y, h = norm.forward(a, h, p2[0], p2[1], ln_2.eps, False)[:2]
        return torch.add(mlp(y), h).view(batch, 1, hidden)


class _OPTStep(_Step):
    """OPTDecoderLayer's decode step: its kernels, all chosen before any runs (as _Step's)."""

    def run(self, attn: OPTAttention, ln_1: LayerNorm, ln_2: LayerNorm, linears: tuple[Linear, ...], pre_norm: bool,
            cache) -> Tensor | None:
        batch, _, hidden = self.x.shape
        heads, D = attn.num_heads, attn.head_dim
        ffn = linears[4].out_features
        shapes = tuple(tuple(p._parameters["weight"].shape) for p in linears)
        if heads * D != hidden or shapes != ((hidden, hidden),) * 4 + ((ffn, hidden), (hidden, ffn)):
            return None
        kernels = [self._linear_kernel(p, k) for p, k in zip(linears, (hidden,) * 5 + (ffn,))]
        p1, p2 = self._ln_params(ln_1, hidden), self._ln_params(ln_2, hidden)
        norm = kernel_for("layer_norm", (self.device, self.dtype, 1, 1), self.backend)
        if None in kernels or p1 is None or p2 is None or norm is None or type(attn.scaling) is not float:
            return None
        l_q, l_k, l_v, l_out, l_fc1, l_fc2 = kernels
        h = self.x.view(batch, hidden)
        y = norm.forward(h, None, p1[0], p1[1], ln_1.eps, False)[0] if pre_norm else h
        # q scaled inside the attention (transformers scales the rounded product, then attends at scale 1)
        q, k, v = (self._product(kernel, y, p).view(batch, heads, 1, D) for kernel, p in zip(kernels[:3], linears))
        keys, values = cache.update(k, v, attn.layer_idx)
        out, _ = fastarch_attention_forward(attn, q, keys, values, self.mask, scaling=attn.scaling)
        a = self._product(l_out, out.reshape(batch, hidden), linears[3])

        def mlp(y: Tensor) -> Tensor:
            return self._product(l_fc2, torch.relu_(self._product(l_fc1, y, linears[4])), linears[5])

        if pre_norm:  # h + a, normalized for the MLP and kept as its residual; then h + a + mlp
            y, h = norm.forward(a, h, p2[0], p2[1], ln_2.eps, False)[:2]
            return torch.add(h, mlp(y)).view(batch, 1, hidden)
        h = norm.forward(a, h, p1[0], p1[1], ln_1.eps, False)[0]  # OPT-350m: each sum normalized
        return norm.forward(mlp(h), h, p2[0], p2[1], ln_2.eps, False)[0].view(batch, 1, hidden)
