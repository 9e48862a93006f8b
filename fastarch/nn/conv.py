"""Conv2d: torch.nn.Conv2d whose CPU inference runs oneDNN on a weight packed once (and can add
a residual in the same call), for the diffusion UNet (fastarch/models/unet_blocks.py) and
fastarch.optimize."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) whose forward(x, add=None) gives conv(x) + add.

    Without autograd on the CPU (inference, sampling), it runs oneDNN's convolution on a weight
    packed once into oneDNN's blocked layout, channels-last, the add fused into it: torch's
    conv2d re-lays the weight out on every call, which measured 2-4x the convolution itself on
    the DDPM-CIFAR10 UNet's 8x8 and 16x16 maps (Zen 4, fp32 and bf16). The packed copy is
    remade when the weight changes (an optimizer step or load_state_dict bumps its version) or
    the input shape does; a write through ``weight.data`` bumps no version, so call
    ``repack()`` after one. Everything else (autograd, CUDA, fp16, padding modes other than
    zeros, string paddings) runs torch's conv2d."""

    _packed: tuple | None = None

    def forward(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and _can_pack(x, self.weight):
            return self._packed_forward(x, add)
        y = self._conv_forward(x, self.weight, self.bias)
        return y if add is None else y + add

    def repack(self) -> None:
        """Forget the packed weight (after writing the weight through ``.data``)."""
        self._packed = None

    @classmethod
    def from_torch(cls, module: nn.Conv2d) -> Conv2d:
        """A fastarch Conv2d sharing ``module``'s parameters (no copy)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def __getstate__(self):  # copies (deepcopy for an EMA, pickling) repack on first use
        state = super().__getstate__().copy()
        state.pop("_packed", None)
        return state

    def _packed_forward(self, x: Tensor, add: Tensor | None) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(x.shape))
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            self._packed = (key, packed)
        args = (self._packed[1], self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        add = add.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", 1.0, None, [], "")


def _can_pack(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16_CONV))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling()
    )


# oneDNN's bf16 convolutions need AVX512-BF16 / AMX (else torch's conv2d, which converts)
_BF16_CONV = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
