"""fastarch.ops.quantized_linear: the block formats (every one of QUANTS) against gguf-py (the package llama.cpp
ships), every backend against an fp64 product with W's dequantized values, the CPU kernel at
every instruction-set level and row count (its direct path up to 16 rows, its dequantize-and-
GEMM path past them), NaN, gradients, the module, errors, opcheck and torch.compile.

Tolerance: ours and the reference both take W's exact values (ggml's, fp32) and sum K products
in fp32 in different orders, then round once to the dtype. So |ours - fp64| is bounded by
K * u32 * sum_k |x_k w_k| (fp32 summation, u32 = 2^-24, any order; doubled for slack) plus the
dtype's rounding of the result, u * |y| (u = 2^-24 fp32, 2^-11 fp16, 2^-8 bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import backend_rows  # tests/backend_rows.py
from fastarch import ops, registry
from fastarch._extension import _C
from fastarch.nn import QuantizedLinear
from fastarch.ops.qlinear import BLOCK_VALUES, QUANTS, dequantize_blocks, quantize_blocks
from fastarch.ops.qlinear.backends import CUDA_QUANTS, GGML_IDS, QuantizedLinearProblem, _cuda_supports

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
# (in_features, out_features): one block, SmolLM2's widths, out_features off the 16-column chunks;
# in_features rounded up to a multiple of the format's block (256 for the k-quants)
SHAPES = [(32, 5), (576, 960), (1536, 37), (96, 100)]
SCALE_AT = {"q6_k": 208}
GGUF_PY_WRITES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # the formats gguf-py quantizes too  # the byte of a block's (first) fp16 scale d: 0 but in Q6_K
BACKEND_ROWS = {"cpu": [1, 3, 8, 9, 17], "reference": [1, 20], "triton": [1, 3, 16], "cuda": [1, 3, 16]}


def make(rows, k, n, quant, dtype, bias=True, device="cpu"):
    k = -(-k // BLOCK_VALUES[quant]) * BLOCK_VALUES[quant]
    g = torch.Generator().manual_seed(rows * 7919 + k * 31 + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    blocks = quantize_blocks(torch.randn(n, k, generator=g) / k**0.5, quant)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x.to(device), blocks.to(device), None if b is None else b.to(device)


def check(ours, x, blocks, quant, b):
    w = dequantize_blocks(blocks.cpu(), quant).double()
    xd = x.cpu().double()
    ref = xd @ w.T + (0 if b is None else b.cpu().double())
    assert ours.shape == ref.shape and ours.dtype == x.dtype
    bound = 2 * x.shape[-1] * UNIT[torch.float32] * (xd.abs() @ w.abs().T) + UNIT[x.dtype] * ref.abs() + 1e-30
    err = (ours.cpu().double() - ref).abs()
    assert (err <= bound).all(), f"worst error / bound {(err / bound).max().item():.3g}"


def random_blocks(n, k, quant, seed=0):
    """Blocks of random bytes (every bit pattern of the values and scales), the fp16 scales
    kept finite: what no quantizer writes but a reader must read."""
    blocks = quantize_blocks(torch.zeros(n, k), quant)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, blocks.shape, generator=g, dtype=torch.uint8)
    values = dequantize_blocks(raw, quant)
    while not values.isfinite().all():  # an inf/NaN fp16 scale: redraw those rows
        bad = ~values.isfinite().all(1)
        raw[bad] = torch.randint(0, 256, (int(bad.sum()), raw.shape[1]), generator=g, dtype=torch.uint8)
        values = dequantize_blocks(raw, quant)
    return raw


@pytest.mark.parametrize("quant", QUANTS)
def test_formats_match_gguf_py(quant):
    """dequantize_blocks gives gguf-py's values bit for bit, on quantize_blocks' blocks (zeros,
    one repeated value and mixed signs included) and on random bytes; quantize_blocks gives
    gguf-py's bytes for the formats gguf-py writes (it has no k-quant or IQ4 quantizer), and each value
    as near w as the format's bits allow."""
    from gguf import GGMLQuantizationType
    from gguf import quants

    kind = getattr(GGMLQuantizationType, quant.upper())
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    w[5, :32] = 0.75
    w[6] *= 1e-3
    blocks = quantize_blocks(w, quant)
    if quant in GGUF_PY_WRITES:
        assert np.array_equal(blocks.numpy(), quants.quantize(w.numpy(), kind))
    for b in (blocks, random_blocks(16, 512, quant)):
        assert np.array_equal(dequantize_blocks(b, quant).numpy(), quants.dequantize(b.numpy(), kind))
    # the rounding error of a uniform grid of step h is h / sqrt(12) rms: ~0.08 of w's scale at 4 bits
    # (16 levels over a block's range), half that per further bit
    # (per row: the row scaled by 1e-3 and the constant one count alone)
    err = (dequantize_blocks(blocks, quant) - w).square().mean(1).sqrt()
    scale = w.square().mean(1).sqrt()
    bound = {"q4": 0.1, "q5": 0.05, "q6": 0.025, "q8": 0.007}[quant.removeprefix("i")[:2]]
    assert (err[scale > 0] <= bound * scale[scale > 0]).all(), (err / scale).max()
    assert torch.equal(dequantize_blocks(blocks[3:4], quant), torch.zeros(1, 512))


def backend_quants(backend: str) -> tuple[str, ...]:
    """The formats a backend reads (the CUDA kernel 3 of them: the table sends the rest to Triton)."""
    return CUDA_QUANTS if backend == "cuda" else QUANTS


CASES = [
    pytest.param(backend, device, rows, shape, quant, marks=p.marks, id=f"{backend}-{quant}-{rows}x{shape[0]}x{shape[1]}")
    for p in backend_rows.rows("quantized_linear")
    for backend, device in [p.values]
    for quant in backend_quants(backend)
    for rows in BACKEND_ROWS[backend]
    for shape in (SHAPES[:1] + SHAPES[3:] if backend == "triton" and device == "cpu" else SHAPES)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device,rows,shape,quant", CASES)
def test_matches_reference(backend, device, rows, shape, quant, dtype):
    x, blocks, b = make(rows, *shape, quant, dtype, bias=rows % 2 == 1, device=device)
    backend_rows.require("quantized_linear", backend, QuantizedLinearProblem.of(x, blocks, quant))
    check(ops.quantized_linear(x, blocks, quant, b, backend=backend), x, blocks, quant, b)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("quant", QUANTS)
def test_cpu_kernel_each_build_and_row_count(cpu_isa, isa, quant):
    """Each build of the kernel, at every row count of its row groups (1-8, 9-16 in two groups)
    and past its direct rows (the dequantized GEMM), fp32 and bf16, with strided rows of x."""
    cpu_isa(isa)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in list(range(1, 18)) + [40]:
            x, blocks, b = make(rows, 96, 35, quant, dtype)
            k = x.shape[1]
            wide = torch.zeros(rows, k + 64, dtype=dtype)
            wide[:, 7:7 + k] = x
            xs = wide[:, 7:7 + k]  # rows k + 64 apart
            check(torch.ops.fastarch._quantized_linear(xs, blocks, GGML_IDS[quant], b), x, blocks, quant, b)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("quant", QUANTS)
def test_cpu_kernel_reads_every_value_exactly(cpu_isa, isa, quant):
    """Rows of the identity pick single weights: with one-hot rows of x every output is one of
    W's values times 1, so the kernel's values must equal ggml's bit for bit, on random bytes,
    in the direct kernel (16 rows at a time) and the dequantized GEMM (all rows at once)."""
    cpu_isa(isa)
    blocks = random_blocks(19, 512, quant, seed=1)
    eye = torch.eye(512)
    op = torch.ops.fastarch._quantized_linear
    w_t = dequantize_blocks(blocks, quant).T
    assert torch.equal(torch.cat([op(eye[i:i + 16], blocks, GGML_IDS[quant], None) for i in range(0, 512, 16)]), w_t)
    assert torch.equal(op(eye, blocks, GGML_IDS[quant], None), w_t)
    for i in range(0, 512, 37):  # the one- and two-row kernels (two sets of accumulators), bf16 x too
        assert torch.equal(op(eye[i:i + 1], blocks, GGML_IDS[quant], None), w_t[i:i + 1])
        assert torch.equal(op(eye[i:i + 2], blocks, GGML_IDS[quant], None), w_t[i:i + 2])
        assert torch.equal(op(eye[i:i + 1].bfloat16(), blocks, GGML_IDS[quant], None), w_t[i:i + 1].bfloat16())


def test_cuda_kernel_sends_the_other_formats_to_triton():
    """The CUDA kernel reads Q4_0/Q4_1/Q8_0; for the other formats the table says so (and the
    Triton kernel, next in the table, runs them on a GPU)."""
    for quant in QUANTS:
        why = _cuda_supports(QuantizedLinearProblem("cuda", torch.bfloat16, 1, 256, 8, quant))
        if quant in CUDA_QUANTS:
            assert why is None or "reads" not in str(why)
        else:
            assert "the CUDA kernel reads q4_0, q4_1, q8_0" in str(why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_many_rows_over_several_dequantized_slices(dtype):
    """Past 16 rows the CPU kernel dequantizes 1024 weight rows at a time: 2100 rows take three
    slices, the last a partial one, each written to its own output columns."""
    x, blocks, b = make(20, 64, 2100, "q4_1", dtype)
    check(torch.ops.fastarch._quantized_linear(x, blocks, 3, b), x, blocks, "q4_1", b)


@pytest.mark.parametrize("backend,device,quant", [
    pytest.param(*p.values, quant, marks=p.marks, id=f"{p.values[0]}-{quant}")
    for p in backend_rows.rows("quantized_linear") for quant in backend_quants(p.values[0])
])
def test_nan_stays_in_its_row_and_column(backend, device, quant):
    """A NaN in x spoils its row only; a NaN scale in one block of W its output column only."""
    x, blocks, b = make(3, 64, 20, quant, torch.float32, device=device)
    x[1, 5] = float("nan")
    blocks = blocks.clone()
    at = SCALE_AT.get(quant, 0)
    blocks[7, at:at + 2] = torch.tensor(np.array([np.float16("nan")]).view(np.uint8))  # row 7's first scale d
    backend_rows.require("quantized_linear", backend, QuantizedLinearProblem.of(x, blocks, quant))
    y = ops.quantized_linear(x, blocks, quant, b, backend=backend).cpu()
    nan = torch.zeros(3, 20, dtype=torch.bool)
    nan[1, :] = True
    nan[:, 7] = True
    assert torch.equal(y.isnan(), nan)


@pytest.mark.parametrize("quant", QUANTS)
def test_gradients_flow_to_x_and_bias(quant):
    x, blocks, b = make(5, 64, 12, quant, torch.float64)
    x.requires_grad_(True)
    b.requires_grad_(True)
    torch.autograd.gradcheck(lambda x, b: ops.quantized_linear(x, blocks, quant, b), (x, b))
    xf, bf = x.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    y = ops.quantized_linear(xf, blocks, quant, bf)
    y.square().sum().backward()
    w = dequantize_blocks(blocks, quant)
    dy = 2 * y.detach()
    torch.testing.assert_close(xf.grad, dy @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bf.grad, dy.sum(0))


def test_module_from_linear_and_leading_dims():
    lin = torch.nn.Linear(64, 24)
    q = QuantizedLinear.from_linear(lin, "q8_0")
    assert q.bias is lin.bias and q.weight.dtype == torch.uint8 and tuple(q.weight.shape) == (24, 2 * 34)
    x = torch.randn(2, 3, 64)
    y = q(x)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dequantize_blocks(q.weight, "q8_0"), lin.bias))
    # the blocks round W to 8 bits per block: close to the float layer's product
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()
    assert set(q.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="in_features must be a multiple of 32"):
        QuantizedLinear(40, 3, "q4_0")
    with pytest.raises(ValueError, match="in_features must be a multiple of 256"):
        QuantizedLinear(64, 3, "q5_k")
    with pytest.raises(ValueError, match="quant must be one of"):
        QuantizedLinear(64, 3, "q3_k")


def test_stack_of_formats_is_the_concatenation():
    """QuantizedLinearStack: parts in their own formats, outputs concatenated; gradients to x."""
    from fastarch.nn import QuantizedLinearStack

    g = torch.Generator().manual_seed(6)
    parts = [QuantizedLinear.from_linear(torch.nn.Linear(256, n), q) for n, q in ((64, "q4_k"), (32, "q6_k"))]
    stack = QuantizedLinearStack(parts)
    assert (stack.in_features, stack.out_features) == (256, 96)
    x = torch.randn(3, 256, generator=g, requires_grad=True)
    y = stack(x)
    assert torch.equal(y, torch.cat([p(x) for p in parts], -1))
    y.sum().backward()
    w = torch.cat([dequantize_blocks(p.weight, p.quant) for p in parts])
    torch.testing.assert_close(x.grad, torch.ones(3, 96) @ w)
    for bad in ([parts[0], QuantizedLinear.from_linear(torch.nn.Linear(512, 8), "q4_k")], [], [torch.nn.Linear(256, 4)]):
        with pytest.raises(ValueError, match="parts must be QuantizedLinear layers of one in_features"):
            QuantizedLinearStack(bad)


def test_widen_to_q8_0_keeps_the_values():
    """Q4_0 and Q5_0 blocks as Q8_0 blocks: the same values bit for bit (random bytes); other
    formats (an offset, or sub-block scales) are refused."""
    from fastarch.ops.qlinear.formats import widen_to_q8_0

    for quant in ("q4_0", "q5_0", "q8_0"):
        blocks = random_blocks(7, 256, quant, seed=2)
        wide = widen_to_q8_0(blocks, quant)
        assert wide.shape == (7, 8 * 34) and torch.equal(dequantize_blocks(wide, "q8_0"), dequantize_blocks(blocks, quant))
    with pytest.raises(ValueError, match="q4_1 values are not all q d"):
        widen_to_q8_0(random_blocks(2, 256, "q4_1"), "q4_1")


X = torch.randn(2, 64)
Q8 = quantize_blocks(torch.randn(3, 64), "q8_0")


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((X, Q8, "q3_k", None), ValueError, "quant must be one of"),
        ((X, Q8, "q4_k", None), ValueError, r"in_features a multiple of 256 \(q4_k's block\)"),
        ((X, Q8, "q4_1", None), ValueError, r"weight must be uint8 \(out_features, 40\)"),
        ((X, Q8.float(), "q8_0", None), ValueError, "weight must be uint8"),
        ((X.int(), Q8, "q8_0", None), TypeError, "x must be float32"),
        ((torch.randn(2, 48), Q8, "q8_0", None), ValueError, "multiple of 32"),
        ((X, Q8, "q8_0", torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
        ((X, Q8, "q8_0", torch.randn(3).double()), TypeError, "bias must have x's dtype"),
        (("x", Q8, "q8_0", None), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        ops.quantized_linear(*args)


def test_kernel_op_checks_its_arguments():
    op = torch.ops.fastarch._quantized_linear
    with pytest.raises(RuntimeError, match="quant must be a ggml type id"):
        op(X, Q8, 5, None)
    with pytest.raises(RuntimeError, match="in_features must be a multiple of 256"):
        op(X, Q8, 12, None)
    with pytest.raises(RuntimeError, match="blocks must be contiguous uint8"):
        op(X, Q8[:, :40], 8, None)
    with pytest.raises(RuntimeError, match="in_features must be a multiple of 32"):
        op(torch.randn(2, 40), Q8, 8, None)


def test_empty_and_choice():
    y = ops.quantized_linear(torch.randn(0, 64), Q8, "q8_0")
    assert y.shape == (0, 3)
    assert registry.choose("quantized_linear", QuantizedLinearProblem("cpu", torch.float32, 1, 64, 3, "q8_0")).name \
        == ("cpu" if _C is not None else "reference")


def test_opcheck_and_compile():
    x, blocks, b = make(3, 64, 7, "q4_1", torch.float32)
    torch.library.opcheck(torch.ops.fastarch.quantized_linear.default, (x, blocks, "q4_1", b, "exact", ""))
    torch.library.opcheck(torch.ops.fastarch._quantized_linear.default, (x, blocks, 3, b))
    compiled = torch.compile(lambda x: ops.quantized_linear(x, blocks, "q4_1", b) * 2, fullgraph=True)
    assert torch.equal(compiled(x), ops.quantized_linear(x, blocks, "q4_1", b) * 2)
