"""Conv2d: torch.nn.Conv2d whose CPU inference runs on a weight transformed once (and can add
a residual in the same call), for the diffusion UNet (fastarch/models/unet_blocks.py) and
fastarch.optimize: fp32 3x3 convolutions (stride 1, padding 1) by our Winograd F(2x2, 3x3)
kernel at CPU level avx2 and above (its AVX-512 build, or the AVX2 build of the portable
kernels), the rest by oneDNN on its packed layout; at level avx2, bf16 and fp16 on those fp32
paths, widened."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from fastarch import _extension
from fastarch.ops.linear.backends import widens
from fastarch.nn._source import check_source

# FASTARCH_CONV_WINOGRAD=0 sends the 3x3 convolutions to oneDNN too (read at import; tests
# and benchmarks set WINOGRAD).
WINOGRAD = os.environ.get("FASTARCH_CONV_WINOGRAD", "1").strip() != "0"


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) whose forward(x, add=None) gives conv(x) + add.

    Without autograd on the CPU (inference, sampling), on a weight transformed once,
    channels-last, the add fused into the call:
    - fp32 3x3, stride 1, padding 1, one group, at CPU level avx2 or above (csrc/cpu/isa.h):
      Winograd's F(2x2, 3x3) (``fastarch::_winograd_conv3x3``, csrc/cpu/conv/winograd.h): 16
      multiplications per 2x2 outputs where the direct convolution has 36: 1.4-1.95x oneDNN's
      direct convolution on the DDPM-CIFAR10 UNet's maps with AVX-512, and 1.3-1.85x oneDNN
      restricted to AVX2 at level avx2 (Zen 4; bench/conv3x3.py), with smaller errors against
      fp64 than it (the transforms' coefficients are 0, +-1 and +-1/2). Not at level generic:
      there the op runs the portable kernels' baseline build, 1.6-2.1x oneDNN restricted to
      SSE4.1 but 0.3-0.35x the AVX2 convolution that oneDNN runs under a forced level generic
      on an AVX2 CPU (and unmeasured on aarch64).
    - otherwise oneDNN's convolution on its blocked layout: torch's conv2d re-lays the weight
      out on every call, which measured 2-4x the convolution itself on the UNet's 8x8 and
      16x16 maps (Zen 4, fp32 and bf16).
    - bf16 and fp16 at level avx2 (a CPU without AVX-512, where neither oneDNN nor torch's
      conv2d has a 16-bit vector path: ~100x slower than fp32 on an AMD Zen 3): the fp32 paths
      above on x, the weight, the bias and the addend widened exactly, the output rounded once.
    The transformed copy (16/9 of the weight's memory for Winograd, about 1x for oneDNN; in fp32,
    so twice that of a widened 16-bit weight) is kept
    beside the parameter and remade when the weight changes (an optimizer step or
    load_state_dict bumps its version) or the input shape does; a write through
    ``weight.data`` bumps no version, so call ``repack()`` after one. Everything else
    (autograd, CUDA, fp16 and bf16 without AVX512-BF16 at levels other than avx2, padding modes
    other than zeros, string paddings) runs torch's conv2d."""

    _packed: tuple | None = None

    def forward(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        if (
            self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and _can_pack(x, self.weight)
            and x.dim() == 4
            and x.shape[1] == self.in_channels  # (torch's conv2d says what is wrong otherwise)
        ):
            fused = add is None or self._fusable(x, add)
            inner = add if fused else None
            dtype, wide = x.dtype, _widened(x)
            if wide:  # the fp32 kernels on the 16-bit tensors widened, the output rounded once
                x, inner = x.float(), None if inner is None else inner.float()
            if self._winograd_fits(x):
                y = self._winograd_forward(x, inner, wide)
            else:
                y = self._packed_forward(x, inner, wide)
            y = y.to(dtype) if wide else y
            return y if fused else y + add
        y = self._conv_forward(x, self.weight, self.bias)
        return y if add is None else y + add

    def _fusable(self, x: Tensor, add: Tensor) -> bool:
        """Whether the kernels can take ``add`` into the call: a tensor of the output's exact
        shape and x's dtype and device (anything else is added after, by torch's rules: a
        broadcast, a promotion, or torch's error)."""
        if not isinstance(add, Tensor) or add.dtype != x.dtype or add.device != x.device or add.dim() != 4:
            return False
        n, _, h, w = x.shape
        out = [n, self.out_channels]
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return list(add.shape) == out

    def repack(self) -> None:
        """Forget the packed weight (after writing the weight through ``.data``)."""
        self._packed = None

    @classmethod
    def from_torch(cls, module: nn.Conv2d) -> Conv2d:
        """A fastarch Conv2d sharing ``module``'s parameters (no copy)."""
        check_source(cls, module, nn.Conv2d)
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta")
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def __getstate__(self):  # copies (deepcopy for an EMA, pickling) repack on first use
        state = super().__getstate__().copy()
        state.pop("_packed", None)
        return state

    def _winograd_fits(self, x: Tensor) -> bool:
        return (
            WINOGRAD
            and x.dtype == torch.float32
            and x.dim() == 4
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and tuple(self.padding) == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and min(self.in_channels, self.out_channels) >= _WINOGRAD_MIN_CHANNELS
            and _extension._C is not None
            and (_extension._C._cpu_avx512() or _extension._C._cpu_portable_avx2())
        )

    def _transformed(self, layout: object, make, wide: bool) -> Tensor:
        """The weight in a kernel's layout, made by make(weight) (wide: from the weight widened
        to fp32) and kept until the weight or the layout (its key: "winograd", or the input
        shape oneDNN packs for) changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, layout, wide)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, make(w.detach().float() if wide else w.detach()))
        return self._packed[1]

    def _bias(self, wide: bool) -> Tensor | None:
        return None if self.bias is None else self.bias.detach().float() if wide else self.bias.detach()

    def _winograd_forward(self, x: Tensor, add: Tensor | None, wide: bool) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if add is not None:
            add = add.contiguous(memory_format=torch.channels_last)
        bias = self._bias(wide)
        u = self._transformed("winograd", winograd_weight, wide)
        return torch.ops.fastarch._winograd_conv3x3(x, u, self.out_channels, None if bias is None else bias.contiguous(),
                                                    add)

    def _packed_forward(self, x: Tensor, add: Tensor | None, wide: bool) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        packed = self._transformed(
            tuple(x.shape), lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape)), wide)
        args = (packed, self._bias(wide), *geometry)
        if add is None or _ambiguous_layout(add):
            y = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
            return y if add is None else y + add
        add = add.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", 1.0, None, [], "")


def _ambiguous_layout(t: Tensor) -> bool:
    """Whether a 4-d tensor is both NCHW- and channels-last-contiguous in torch's eyes (one
    pixel, or one channel): oneDNN's fused add refuses such an addend in torch 2.11 ("could not
    create a memory"), so the add runs after the convolution."""
    _, c, h, w = t.shape
    return h * w == 1 or c == 1


# Below 16 channels on either side the kernel's 16-channel blocks and 32-channel panels are
# mostly padding: oneDNN is faster (4x3->128 at 32x32: 0.32x; 4x128->3: 0.89x; Zen 4). At 16
# the two are close with either build (4x16->16 at 32x32: 0.77x with AVX-512, 0.74x at level
# avx2; 4x16->64: 1.29x and 1.09x).
_WINOGRAD_MIN_CHANNELS = 16

# F(2x2, 3x3)'s filter transform: U = G g G^T for each (out, in) channel pair's 3x3 filter g.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight: Tensor) -> Tensor:
    """The (Co, Ci, 3, 3) weight as ``fastarch::_winograd_conv3x3`` takes it: U = G g G^T at
    the 16 positions of a 4x4 tile, computed in fp64 and rounded once to fp32, laid out
    (16, panels, Ci rounded up to 16, 32): output channels in panels of 32, zero-padded."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: weight must be (out, in, 3, 3), got {tuple(weight.shape)}")
    co, ci = weight.shape[:2]
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g).reshape(16, ci, co)
    ci_pad, panels = -(-ci // 16) * 16, -(-co // 32)
    u = nn.functional.pad(u, (0, panels * 32 - co, 0, ci_pad - ci))
    return u.view(16, ci_pad, panels, 32).permute(0, 2, 1, 3).contiguous().float()


def _can_pack(x: Tensor, weight: Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()  # first: dynamo folds it and traces nothing after it
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16_CONV) or _widened(x))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and torch.backends.mkldnn.is_available()
    )


# oneDNN's bf16 convolutions need AVX512-BF16 / AMX (else torch's conv2d, which converts)
_BF16_CONV = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _widened(x: Tensor) -> bool:
    """Whether a 16-bit x runs the fp32 kernels on its values widened (exactly), the output
    rounded once: at CPU level avx2 (fastarch.ops.linear.backends.widens), where neither oneDNN
    nor torch's conv2d has a 16-bit vector path (AMD EPYC Zen 3, 2 threads: a bf16 4x128x16x16
    3x3 convolution 165 ms, fp32 2 ms), unless oneDNN runs bf16 (_BF16_CONV)."""
    return widens(x) and not (x.dtype == torch.bfloat16 and _BF16_CONV)
