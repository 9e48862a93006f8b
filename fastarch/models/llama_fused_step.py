"""A LLaMA decode step's layers in one call of the C++ loop ``fastarch::_llama_decode_layers``
(csrc/cpu/models/llama_decode_cpu.cpp) instead of ~11 op calls per layer from Python.

The loop calls the very kernels that the registry chose for each op of the step, with the same
arguments in the same order, so the result is bit for bit that of the op-by-op loop in
Llama._blocks; it only removes the Python between them (argument checks, backend choice and
dispatch: ~15 us per call, ~330 calls per step of a 30-layer model, a fifth of SmolLM2-135M's
fp32 step on a 2-core CPU). It is taken when that is true of every op: each chose its CPU kernel
(the products may instead have chosen PyTorch's GEMM, which the loop calls then), nothing needs
torch's dispatcher (gradients, torch.compile, tracing, modes) and every weight is a plain
contiguous tensor of the step's dtype. Otherwise Llama runs the op-by-op loop, which also raises
the errors of bad input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarch import registry
from fastarch.ops import dispatch
from fastarch.ops.activations.backends import ActivationProblem
from fastarch.ops.attn.args import AttentionProblem
from fastarch.ops.linear.backends import LinearProblem, cpu_gemm
from fastarch.ops.norms.backends import NormProblem
from fastarch.ops.rope.backends import RotaryProblem

_PLAIN = (Tensor, torch.nn.Parameter)


def _chosen(op: str, problem: object, requested: str) -> str | None:
    try:
        return registry.choose(op, problem, requested).name
    except registry.NoBackendError:  # the op-by-op loop raises it, with its reasons
        return None


def linear_in_one_call(model, x: Tensor, cache, window_left: int) -> bool | None:
    """For model (a Llama) decoding rows x (B n, C) against cache (a KVCache): None when the
    step must run op by op, else whether the one call's products run on the linear kernel
    (True) or on PyTorch's GEMM (False), as the registry chose for them."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not dispatch.direct_call_allowed((x, *cache.k, *cache.v)):
        return None
    if any(t.dtype != x.dtype or t.device != x.device for t in (*cache.k, *cache.v)):  # op by op names it
        return None
    if not _extension_has_loop():
        return None
    block = model.layers[0]
    rows, dtype, device = x.shape[0], x.dtype, x.device.type
    H, Hkv, D = model.n_head, model.n_kv, model.head_dim
    cos, _ = model._rope(x.device)
    requested = registry.requested_backend()
    kernels = {
        "rms_norm": NormProblem(device, dtype, rows, x.shape[1]),
        "add_rms_norm": NormProblem(device, dtype, rows, x.shape[1]),
        "rotary": RotaryProblem(device, dtype, D, 2 * cos.shape[-1]),
        "append_kv": AttentionProblem(device, dtype, D, D, Hkv, Hkv, decode=True),
        "attention_decode": AttentionProblem(device, dtype, D, D, H, Hkv, window=window_left >= 0, decode=True),
        "swiglu": ActivationProblem(device, dtype, rows, block.down_proj.in_features),
    }
    if any(_chosen(op, problem, requested) != "cpu" for op, problem in kernels.items()):
        return None
    linears = {
        _chosen("linear", LinearProblem(device, dtype, rows, layer.in_features, layer.out_features, True), requested)
        for layer in (block.qkv_proj, block.o_proj, block.gate_up_proj, block.down_proj)
    }
    if linears not in ({"cpu"}, {"reference"}) or (linears == {"cpu"} and cpu_gemm(rows, dtype)):
        return None  # mixed, or oneDNN's matmul (the loop calls the kernel or at::linear)
    return linears == {"cpu"}


def _extension_has_loop() -> bool:
    return hasattr(torch.ops.fastarch, "_llama_decode_layers")  # False for a build without the C++ loop


_NORMS = ("input_layernorm", "post_attention_layernorm")
_WEIGHTS = ("input_layernorm", "qkv_proj", "o_proj", "post_attention_layernorm", "gate_up_proj", "down_proj")
_BIASED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def step_arguments(model, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor | None], list[float]] | None:
    """The loop's weights, biases and eps in its order (see csrc/ops.cpp), or None when a
    parameter is not a plain contiguous tensor of dtype on the CPU, or not a plain parameter
    (a parametrized weight): the op-by-op loop handles or refuses those. Gathered every step
    (a layer may have been replaced) from the modules' own dictionaries: nn.Module's attribute
    lookup would cost ~0.5 ms of a step."""
    weights: list[Tensor] = []
    biases: list[Tensor | None] = []
    eps: list[float] = []
    try:
        for block in model.layers:
            parts = block._modules
            weights += [parts[name]._parameters["weight"] for name in _WEIGHTS]
            biases += [parts[name]._parameters["bias"] for name in _BIASED]
            eps += [parts[name].eps for name in _NORMS]
        weights.append(model._modules["norm"]._parameters["weight"])
        eps.append(model._modules["norm"].eps)
    except (KeyError, AttributeError):  # a parametrized weight, a replaced layer of another kind
        return None
    for t in weights + [b for b in biases if b is not None]:
        if type(t) not in _PLAIN or t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
            return None
    return weights, biases, [float(e) for e in eps]
