"""A LLaMA model's layers in one call of a C++ loop (csrc/cpu/models/llama_layers_cpu.cpp)
instead of ~11 op calls per layer from Python: ``fastarch::_llama_decode_layers`` for a decode
step, ``fastarch::_llama_prefill_layers`` for the prefill of packed prompts.

The loops call the very kernels that the registry chose for each op, with the same arguments in
the same order, so the result is bit for bit that of the op-by-op loop in Llama._blocks; they
only remove the Python between them (argument checks, backend choice and dispatch: ~15 us per
call, ~330 calls per step of a 30-layer model, a fifth of SmolLM2-135M's fp32 decode step on a
2-core CPU, and most of the time to the first token of a short prompt). A loop is taken when
that is true of every op: each chose its CPU kernel (the products may instead have chosen
PyTorch's GEMM or oneDNN's matmul, which the loop calls then), nothing needs torch's dispatcher
(gradients, torch.compile, tracing, modes) and every weight is a plain contiguous tensor of the
step's dtype. Otherwise Llama runs the op-by-op loop, which also raises the errors of bad input.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.activations.backends import ActivationProblem
from fastarch.ops.attn.args import AttentionProblem
from fastarch.nn import QuantizedLinear, QuantizedLinearStack
from fastarch.ops.linear.backends import LinearProblem, cpu_product, onednn_gemm
from fastarch.ops.norms.backends import NormProblem
from fastarch.ops.qlinear.backends import DIRECT_ROWS, GGML_IDS, QuantizedLinearProblem
from fastarch.ops.rope.backends import RotaryProblem

_PLAIN = (Tensor, torch.nn.Parameter)


def _chosen(op: str, problem: object, requested: str) -> str | None:
    try:
        return registry.choose(op, problem, requested).name
    except registry.NoBackendError:  # the op-by-op loop raises it, with its reasons
        return None


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""A Llama Block's linear layers, in the order a layer runs them."""
PRODUCTS = {"torch": 0, "kernel": 1, "onednn": 2, "widened": 3}
QUANTIZED_ONEDNN = 4
"""Added to the prefill loop's ``products`` when the quantized layers' products past their
kernel's rows run on oneDNN's matmul (as fastarch.ops.quantized_linear's cpu backend chose)."""


def _quantized_onednn(model, rows: int) -> bool:
    """Whether model's quantized layers (if any) run ``rows`` rows on oneDNN's matmul."""
    block = model.layers[0]
    quantized = any(type(block._modules[name]) is QuantizedLinear for name in PROJECTIONS)
    return quantized and rows > DIRECT_ROWS and onednn_gemm()
"""Where the loops run the products (their ``products`` argument): PyTorch's GEMM (the linear
op's reference backend), the linear kernel, oneDNN's matmul (the cpu backend past its kernel's
fp32 rows) or PyTorch's fp32 GEMM on 16-bit tensors widened (past its 16-bit rows at level
avx2); fastarch/ops/linear/backends.py, cpu_product."""


def _loop_allowed(x: Tensor, caches: list[Tensor], loop: str) -> bool:
    """Whether x's layers may run in the C++ loop at all: on the CPU, without gradients or
    anything else that needs torch's dispatcher, with caches of x's dtype (the op-by-op loop
    names a mismatch) and an extension that has the loop."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not dispatch.direct_call_allowed((x, *caches)):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in caches):
        return False
    return hasattr(torch.ops.fastarch, loop)  # False for a build without the C++ loop


def _products(model, rows: int, dtype: torch.dtype, requested: str, kernels: dict) -> str | None:
    """Where the products of ``rows`` rows run (a PRODUCTS key), or None when some op of
    ``kernels`` (name -> problem) did not choose its CPU kernel, or the four projections chose
    differently."""
    if any(_chosen(op, problem, requested) != "cpu" for op, problem in kernels.items()):
        return None
    block = model.layers[0]
    layers = [block._modules[name] for name in PROJECTIONS]
    quantized = [layer for layer in layers if type(layer) is QuantizedLinear]
    if any(_chosen("quantized_linear", QuantizedLinearProblem("cpu", dtype, rows, q.in_features, q.out_features,
                                                               q.quant, q.activations), requested) != "cpu"
           for q in quantized):
        return None
    linears = {
        _chosen("linear", LinearProblem("cpu", dtype, rows, layer.in_features, layer.out_features, True), requested)
        for layer in layers if type(layer) is not QuantizedLinear
    }
    if not linears:  # every product on quantized blocks (their GEMM: QUANTIZED_ONEDNN)
        return "kernel"
    if linears == {"reference"}:
        return "torch"
    if linears == {"cpu"}:
        return cpu_product(rows, dtype)
    return None  # mixed


def _kernel_problems(model, x: Tensor, attention: dict) -> dict:
    """The problems (op -> problem) of the CPU kernels a loop calls on rows x (rows, C): the
    norms, rotary and SwiGLU of every layer, and ``attention`` (the loop's attention ops)."""
    rows, dtype, device = x.shape[0], x.dtype, x.device.type
    cos, _ = model._rope(x.device)
    return {
        "rms_norm": NormProblem(device, dtype, rows, x.shape[1]),
        "add_rms_norm": NormProblem(device, dtype, rows, x.shape[1]),
        "rotary": RotaryProblem(device, dtype, model.head_dim, 2 * cos.shape[-1]),
        "swiglu": ActivationProblem(device, dtype, rows, model.layers[0].down_proj.in_features),
        **attention,
    }


def linear_in_one_call(model, x: Tensor, cache, window_left: int) -> bool | None:
    """For model (a Llama) decoding rows x (B n, C) against cache (a KVCache): None when the
    step must run op by op, else whether the one call's products run on the linear kernel
    (True) or on PyTorch's GEMM (False), as the registry chose for them."""
    if not _loop_allowed(x, [*cache.k, *cache.v], "_llama_decode_layers"):
        return None
    dtype, device, H, Hkv, D = x.dtype, x.device.type, model.n_head, model.n_kv, model.head_dim
    kernels = _kernel_problems(model, x, {
        "append_kv": AttentionProblem(device, dtype, D, D, Hkv, Hkv, decode=True),
        "attention_decode": AttentionProblem(device, dtype, D, D, H, Hkv, window=window_left >= 0, decode=True),
    })
    products = _products(model, x.shape[0], dtype, registry.requested_backend(), kernels)
    if products is None or products in ("onednn", "widened") or _quantized_onednn(model, x.shape[0]):
        return None  # the decode loop calls the kernel or at::linear (quantized layers: their kernel)
    return products == "kernel"


# decode_plan's memo: per model, (dtype, rows, window, requested backend, oneDNN's fp32 rule) ->
# (the cache it was made with, its answer), kept while nothing that it read changed. What it
# reads can change through a registration (a layer, parameter or buffer set on any module:
# fastarch.optimize, load_state_dict(assign=True), a parametrization), the registry's choices
# (clear_choices), a quantized layer's activations (QuantizedLinear.changes) or the model's
# conversion (Llama._apply calls forget); every registration in the process, and every clear,
# starts every model's memo over.
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_generation = 0


def _changed(*_: object) -> None:
    global _generation
    _generation += 1


nn.modules.module.register_module_module_registration_hook(_changed)
nn.modules.module.register_module_parameter_registration_hook(_changed)
nn.modules.module.register_module_buffer_registration_hook(_changed)
registry.on_clear_choices(_changed)


def forget(model) -> None:
    """Drops model's remembered decode plans (its parameters were converted)."""
    _MEMO.pop(model, None)


def decode_plan(model, x: Tensor, cache, window_left: int) -> tuple[bool, tuple] | None:
    """For model (a Llama) decoding rows x (B n, C) against cache: None when the step runs op by
    op, else (linear_in_one_call's answer, step_arguments' lists). Both walk every layer (~0.4
    ms of SmolLM2-135M's 4-5 ms decode step on a 2-core CPU, where the step's weights have just
    pushed the modules out of the caches), so their answer is remembered per model and asked
    again only when something it read may have changed (see _MEMO); grad mode, modes and
    tracing are checked at every step. The C++ loop checks each weight's dtype, device and
    layout itself (a parameter's .data replaced in place goes unseen here)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not dispatch.direct_call_allowed((x,)):
        return None
    memo = _MEMO.get(model)
    generation = (_generation, QuantizedLinear.changes)
    if memo is None or memo[0] != generation:
        memo = _MEMO[model] = (generation, {})
    key = (x.dtype, x.shape[0], window_left, registry.requested_backend(), x.shape[0] > DIRECT_ROWS and onednn_gemm())
    hit = memo[1].get(key)
    if hit is not None and hit[0]() is cache:
        return hit[1]
    linear_kernel = linear_in_one_call(model, x, cache, window_left)
    step = None if linear_kernel is None else step_arguments(model, x.dtype)
    plan = None if step is None else (linear_kernel, step)
    memo[1][key] = (weakref.ref(cache), plan)
    return plan


def prefill_products(model, x: Tensor, cache, window_left: int) -> int | None:
    """For model (a Llama) prefilling the packed tokens x (total, C), into cache (an empty
    KVCache) or none: None when the prefill must run op by op, else the loop's ``products``."""
    caches = [] if cache is None else [*cache.k, *cache.v]
    if x.shape[0] == 0 or model.training or not _loop_allowed(x, caches, "_llama_prefill_layers"):
        return None  # (training: the attention's dropout runs op by op)
    dtype, device, H, Hkv, D = x.dtype, x.device.type, model.n_head, model.n_kv, model.head_dim
    attention = {"attention": AttentionProblem(device, dtype, D, D, H, Hkv, varlen=True, window=window_left >= 0)}
    if cache is not None:
        attention["append_kv"] = AttentionProblem(device, dtype, D, D, Hkv, Hkv, decode=True)
    products = _products(model, x.shape[0], dtype, registry.requested_backend(), _kernel_problems(model, x, attention))
    if products is None:
        return None
    return PRODUCTS[products] + (QUANTIZED_ONEDNN if _quantized_onednn(model, x.shape[0]) else 0)


_NORMS = ("input_layernorm", "post_attention_layernorm")
MORE_PARTS = 256
"""Added to a stack part's quant when another part of its stack follows (csrc/ops.cpp)."""
INT8 = 512
"""Added to a quantized part's quant when its x is rounded to int8 (activations "int8")."""
_WEIGHTS = ("input_layernorm", "qkv_proj", "o_proj", "post_attention_layernorm", "gate_up_proj", "down_proj")


def step_arguments(
    model, dtype: torch.dtype
) -> tuple[list[Tensor], list[int], list[Tensor | None], list[float]] | None:
    """The loop's weights, their quants, biases and eps in its order (see csrc/ops.cpp), or None
    when a parameter is not a plain contiguous tensor of dtype on the CPU, or not a plain
    parameter (a parametrized weight): the op-by-op loop handles or refuses those. A norm's
    weight and a dense projection's quant is 0, a QuantizedLinear's its ggml type id (+ INT8 for
    activations "int8"); a QuantizedLinearStack gives each part's weight, quant (+ MORE_PARTS but
    on its last part) and bias. Read from the modules' own dictionaries (nn.Module's attribute lookup would cost ~0.5
    ms of a step); a prefill gathers them each time, a decode step through decode_plan's memo."""
    weights: list[Tensor] = []
    quants: list[int] = []
    biases: list[Tensor | None] = []
    eps: list[float] = []
    try:
        for block in model.layers:
            modules = block._modules
            for name in _WEIGHTS:
                layer = modules[name]
                if name in _NORMS:
                    weights.append(layer._parameters["weight"])
                    quants.append(0)
                    continue
                parts = list(layer._modules["parts"]) if type(layer) is QuantizedLinearStack else [layer]
                for i, part in enumerate(parts):
                    blocks = type(part) is QuantizedLinear
                    weights.append(part._buffers["weight"] if blocks else part._parameters["weight"])
                    quants.append(_quant(part) + (MORE_PARTS if i + 1 < len(parts) else 0))
                    biases.append(part._parameters["bias"])
            eps += [modules[name].eps for name in _NORMS]
        weights.append(model._modules["norm"]._parameters["weight"])
        quants.append(0)
        eps.append(model._modules["norm"].eps)
    except (KeyError, AttributeError):  # a parametrized weight, a replaced layer of another kind
        return None
    for t in weights + [b for b in biases if b is not None]:
        if type(t) not in _PLAIN or t.dtype not in (dtype, torch.uint8) or not t.is_cpu or not t.is_contiguous():
            return None
    return weights, quants, biases, [float(e) for e in eps]


def _quant(layer) -> int:
    """A QuantizedLinear's format as the C++ loop takes it (its ggml type id, + INT8 for
    activations "int8"); 0 for a dense layer."""
    if type(layer) is not QuantizedLinear:
        return 0
    return GGML_IDS[layer.quant] + (INT8 if layer._activations == "int8" else 0)
