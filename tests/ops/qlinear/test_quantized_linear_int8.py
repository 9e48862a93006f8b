"""fastarch.ops.quantized_linear(..., activations="int8"): x rounded to int8 per 32 values
(reference.quantize_activations, the definition) and multiplied into W's values. The rounding
itself is checked on hand-made blocks (ties to even, the largest value to +-127, zeros, inf and
NaN); the kernels (every build of the CPU kernel, every format and row count, fp32/fp16/bf16,
the direct kernels and the dequantize-and-GEMM path past 16 rows) against an fp64 product of
the rounded x with W's exact values.

Tolerance: the kernels multiply W's integer codes by x's int8 codes exactly (int32 sums of 4)
and scale each sum by W's scale times x's, in fp32; the reference rounds each d q to fp32
first. Both are fp32 sums of at most K terms, so |ours - fp64| <= 2 K u32 sum_k |x~_k| (|a_k u_k|
+ |b_k|) with a value written a u + b (the kernels' two parts; their sum is W's value)
bounded here by 3 |w|max per value (a u and b each within the block's range of values), plus
the dtype's rounding of the result, u |y|."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops
from fastarch.nn import QuantizedLinear, QuantizedLinearStack, set_activations
from fastarch.ops.qlinear import BLOCK_BYTES, BLOCK_VALUES, QUANTS, dequantize_blocks, quantize_blocks
from fastarch.ops.qlinear.backends import GGML_IDS, QuantizedLinearProblem, _cuda_supports, _triton_supports
from fastarch.ops.qlinear.reference import quantize_activations

UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make(rows, k, n, quant, dtype, seed=0):
    k = -(-k // BLOCK_VALUES[quant]) * BLOCK_VALUES[quant]
    g = torch.Generator().manual_seed(seed + rows * 7919 + k * 31 + n)
    x = (torch.randn(rows, k, generator=g) * torch.rand(rows, k, generator=g) * 4).to(dtype)
    blocks = quantize_blocks(torch.randn(n, k, generator=g) / k**0.5, quant)
    b = torch.randn(n, generator=g).to(dtype)
    return x, blocks, b


def check(ours, x, blocks, quant, b):
    w = dequantize_blocks(blocks, quant).double()
    xq = quantize_activations(x).double()
    ref = xq @ w.T + b.double()
    k = x.shape[-1]
    wmax = w.abs().amax(1)  # per output column: a u and b are each within the row's range of values
    bound = 2 * k * UNIT[torch.float32] * (xq.abs().sum(1, keepdim=True) * 3 * wmax) + UNIT[x.dtype] * ref.abs()
    err = (ours.double() - ref).abs()
    assert ours.dtype == x.dtype and (err <= bound + 1e-30).all(), f"worst error / bound {(err / bound).max():.3g}"
    return err, bound


def test_rounding_of_x_is_the_definition():
    """Per 32 values: d = max|x| / 127, q = round(x 127 / max|x|), ties to even; the largest
    value becomes +-127 d exactly; zeros stay zero; a block with an inf or a NaN is NaN."""
    x = torch.zeros(5, 64)
    x[0, :32] = torch.arange(32) - 15.0
    x[0, 31] = 127.0  # max |x| = 127: q = round(x), ties to even
    x[0, :6] = torch.tensor([2.5, 3.5, -2.5, -0.5, 0.5, 1.5])
    x[0, 32:] = torch.linspace(-3, 1, 32)
    x[2, 3] = float("inf")
    x[3, 40] = float("nan")
    x[4, :32] = 1e-30  # tiny but nonzero: q = 127 each
    xq = quantize_activations(x)
    assert xq[0, :6].tolist() == [2.0, 4.0, -2.0, -0.0, 0.0, 2.0]
    assert xq[0, 31].item() == 127.0
    assert xq[0, 6:31].tolist() == (torch.arange(6, 31) - 15.0).tolist()
    assert abs(xq[0, 32].item() + 3) <= 3 * 2**-23  # the largest |x| maps to -127 d (d = 3 / 127 in fp32)
    err = (xq[0, 32:] - x[0, 32:]).abs().max().item()
    assert 0 < err <= 3 / 254 * (1 + 1e-6)  # half a step of d = 3 / 127
    assert torch.equal(xq[1], torch.zeros(64))  # zeros
    assert xq[2, :32].isnan().all() and torch.equal(xq[2, 32:], torch.zeros(32))  # the block of the inf only
    assert xq[3, 32:].isnan().all() and torch.equal(xq[3, :32], torch.zeros(32))
    assert torch.allclose(xq[4, :32], torch.full((32,), 1e-30), rtol=1e-6, atol=0)
    assert xq.dtype == torch.float32 and quantize_activations(x.double()).dtype == torch.float32


# (level, int8 products): every way the CPU multiplies x rounded to int8 (csrc/cpu/isa.h,
# Int8Products), each at the levels where it runs: x's rounded values on the exact kernels
# (portable and AVX-512), vpmaddubsw and AVX-VNNI's vpdpbusd (AVX2 build; also at level avx512
# on CPUs without AVX512-VNNI), AVX512-VNNI's vpdpbusd.
INT8_PATHS = [("generic", "exact"), ("avx2", "exact"), ("avx2", "avx2"), ("avx2", "avx_vnni"), ("avx512", "exact"),
              ("avx512", "avx2"), ("avx512", "avx512_vnni")]


# Where each format's blocks hold fp16 fields (d, and m or dmin).
FP16_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "q4_k": [0, 2], "q5_k": [0, 2],
               "q6_k": [208], "iq4_nl": [0], "iq4_xs": [0]}


@pytest.fixture
def int8_products(cpu_isa):
    """Selects (level, int8 products) for one test; what this CPU or build cannot run skips it
    with the reason; the defaults are restored afterwards."""
    from fastarch import _C

    def select(level, products):
        cpu_isa(level)
        try:
            _C._set_cpu_int8(products)
        except ValueError as e:
            pytest.skip(f"the int8 products {products} cannot run here: {e}")
        if products != "auto":
            assert _extension_info()["cpu_int8_products"] == products

    yield select
    _C._set_cpu_int8(DEFAULT_INT8)


def _extension_info():
    from fastarch import _extension

    return _extension.build_info()


# The int8 products the process runs (FASTARCH_CPU_INT8, read at import): what a test restores.
DEFAULT_INT8 = os.environ.get("FASTARCH_CPU_INT8", "").strip() or "auto"


@pytest.mark.parametrize("path", INT8_PATHS, ids="-".join)
@pytest.mark.parametrize("quant", QUANTS)
def test_cpu_kernel_each_build_format_and_row_count(int8_products, path, quant):
    """Every way of multiplying (INT8_PATHS), 1-17 rows (the row groups of 8 and 4, the one- and
    two-row kernels' two sets of sums; with AVX512-VNNI the packed panels past 5 rows, 16 on
    Q4_K/Q5_K/Q6_K, 8 rows a pass and the rest) and 40 and 61 (elsewhere x rounded, then the
    dequantized GEMM), an odd
    count of 32-value blocks (a pair's second block absent), fp32/fp16/bf16; W's codes at their
    extremes (all 0 and all the largest: vpmaddubsw's pairs of products are closest to
    saturating there, |v| 128 for Q8_0's -128) as well as random."""
    int8_products(*path)
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows in list(range(1, 18)) + [40, 61]:
            x, blocks, b = make(rows, 96 if BLOCK_VALUES[quant] == 32 else 512, 35, quant, dtype)
            y = torch.ops.fastarch._quantized_linear(x, blocks, GGML_IDS[quant], b, False, True)
            err, bound = check(y, x, blocks, quant, b)
            if dtype == torch.float32:
                worst = max(worst, (err / bound).max().item())
    assert worst > 0  # (the products are not the reference's: the check compares something)
    x, blocks, b = make(5, 96 if BLOCK_VALUES[quant] == 32 else 512, 6, quant, torch.float32, seed=3)
    x = x.sign() * 3.0  # every code of x +-127
    half = torch.tensor(np.array([np.float16(0.5)]).view(np.uint8))
    for fill in (0x00, 0xFF, 0x80):  # codes and scales' bytes all 0, all 1 bits, Q8_0's -128
        extreme = blocks.clone()
        extreme[:, :] = fill
        each = extreme.view(extreme.shape[0], -1, BLOCK_BYTES[quant])
        for at in FP16_FIELDS[quant]:  # finite fp16 scales and mins
            each[:, :, at:at + 2] = half
        y = torch.ops.fastarch._quantized_linear(x, extreme, GGML_IDS[quant], b, False, True)
        check(y, x, extreme, quant, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant", QUANTS)
def test_op_matches_reference_backend(quant, dtype):
    """The cpu backend against the reference backend (rounded x, then PyTorch's GEMM) at a decode
    step's rows and a prefill's, with SmolLM2's width; and against x's exact product within the
    rounding of x (relative 1/254 of each 32 values' largest: ~1% of the result here)."""
    for rows in (1, 8, 20):
        x, blocks, b = make(rows, 576, 64, quant, dtype, seed=1)
        ours = ops.quantized_linear(x, blocks, quant, b, activations="int8")
        check(ours, x, blocks, quant, b)
        ref = ops.quantized_linear(x, blocks, quant, b, activations="int8", backend="reference")
        check(ref, x, blocks, quant, b)
        exact = ops.quantized_linear(x, blocks, quant, b)
        scale = exact.float().abs().max()
        assert 0 < (ours.float() - exact.float()).abs().max() <= 0.03 * scale


@pytest.mark.parametrize("quant", ["q4_1", "q8_0", "q4_k", "q6_k"])
def test_nan_and_inf(quant):
    """A NaN or an inf in x spoils its row (its block of 32 becomes NaN); a NaN scale in W its
    column: on the kernel and the reference backend alike, a decode step's rows and a prefill's."""
    x, blocks, b = make(20, 256, 20, quant, torch.float32)
    x[1, 5] = float("nan")
    x[2, 200] = float("inf")
    x[19, 0] = float("nan")
    blocks = blocks.clone()
    at = 208 if quant == "q6_k" else 0
    blocks[7, at:at + 2] = torch.tensor(np.array([np.float16("nan")]).view(np.uint8))
    nan = torch.zeros(20, 20, dtype=torch.bool)
    nan[[1, 2, 19], :] = True
    nan[:, 7] = True
    for backend in ("cpu", "reference"):
        for rows in (slice(0, 20), slice(0, 3), slice(0, 1)):
            y = ops.quantized_linear(x[rows], blocks, quant, b, activations="int8", backend=backend)
            assert torch.equal(y.isnan(), nan[rows]), backend


def test_gradients_are_the_exact_layers():
    """The rounding passes gradients straight through: d/dx is dy W, as for activations "exact"."""
    x, blocks, b = make(4, 64, 12, "q4_0", torch.float32)
    grads = []
    for activations in ("exact", "int8"):
        xg = x.clone().requires_grad_(True)
        ops.quantized_linear(xg, blocks, "q4_0", b, activations=activations).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[1], torch.ones(4, 12) @ dequantize_blocks(blocks, "q4_0"))


def test_module_stack_and_set_activations():
    lin = torch.nn.Linear(256, 24)
    layer = QuantizedLinear.from_linear(lin, "q4_k", activations="int8")
    x = torch.randn(2, 3, 256)
    assert layer.activations == "int8" and "activations=int8" in repr(layer)
    assert torch.equal(layer(x), ops.quantized_linear(x, layer.weight, "q4_k", lin.bias, activations="int8"))
    stack = QuantizedLinearStack([QuantizedLinear.from_linear(torch.nn.Linear(256, n), "q6_k") for n in (8, 16)])
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(24, 256), stack)
    assert set_activations(model, "int8") == 3
    y = stack(x)
    assert torch.equal(y, torch.cat([ops.quantized_linear(x, p.weight, "q6_k", p.bias, activations="int8")
                                     for p in stack.parts], -1))
    assert set_activations(model, "exact") == 3 and layer.activations == "exact"
    assert not torch.equal(stack(x), y)
    with pytest.raises(ValueError, match="activations must be 'exact' or 'int8', got 'int4'"):
        set_activations(model, "int4")
    with pytest.raises(ValueError, match="activations must be 'exact' or 'int8', got 'fp8'"):
        layer.activations = "fp8"


def test_bad_activations_and_gpu_backends():
    x, blocks, b = make(2, 64, 3, "q8_0", torch.float32)
    with pytest.raises(ValueError, match="activations must be 'exact' or 'int8', got 'q8'"):
        ops.quantized_linear(x, blocks, "q8_0", b, activations="q8")
    for supports in (_cuda_supports, _triton_supports):
        why = supports(QuantizedLinearProblem("cuda", torch.bfloat16, 1, 256, 8, "q4_0", "int8"))
        assert why is not None
    assert "int8" in str(_cuda_supports(QuantizedLinearProblem("cuda", torch.bfloat16, 1, 256, 8, "q4_0", "int8")))


def test_opcheck_and_compile():
    x, blocks, b = make(3, 64, 7, "q4_1", torch.float32)
    torch.library.opcheck(torch.ops.fastarch.quantized_linear.default, (x, blocks, "q4_1", b, "int8", ""))
    torch.library.opcheck(torch.ops.fastarch._quantized_linear.default, (x, blocks, 3, b, False, True))
    compiled = torch.compile(lambda x: ops.quantized_linear(x, blocks, "q4_1", b, activations="int8") * 2,
                             fullgraph=True)
    assert torch.equal(compiled(x), ops.quantized_linear(x, blocks, "q4_1", b, activations="int8") * 2)


def test_info_names_the_int8_path(int8_products):
    """build_info (fastarch info) names how the int8 products run: by default the fastest this
    CPU and level have (AVX512-VNNI at level avx512 and above where the flags list it; at level
    avx2 AVX-VNNI, else vpmaddubsw; at level generic x's rounded values on the exact kernels)."""
    from pathlib import Path

    from fastarch import _C

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    int8_products("generic", "auto")
    assert _extension_info()["cpu_int8_products"] == "exact"
    int8_products("avx2", "auto")
    assert _extension_info()["cpu_int8_products"] == ("avx_vnni" if "avx_vnni" in flags else "avx2")
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
    at_auto = _extension_info()
    if at_auto["cpu_isa"] in ("avx512", "avx512_bf16", "amx") and "avx512_vnni" in flags:
        assert at_auto["cpu_int8_products"] == "avx512_vnni"
    _C._set_cpu_int8("exact")
    assert _extension_info()["cpu_int8_products"] == "exact"
    with pytest.raises(ValueError, match="int8 products must be 'auto', 'exact', 'avx2', 'avx_vnni' or 'avx512_vnni', got 'vnni'"):
        _C._set_cpu_int8("vnni")
