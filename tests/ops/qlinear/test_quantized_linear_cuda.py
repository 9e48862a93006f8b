"""torch.ops.fastarch._quantized_linear on CUDA tensors (csrc/cuda/qlinear): every format and
dtype, at the row counts of its row groups (1, 3, 16) and past them (17, 40: several groups of
16), shapes of one block, SmolLM2's widths and out_features off the warps' columns, with and
without bias; strided and misaligned rows of x, blocks at every byte offset; NaN, empty inputs,
the argument errors and opcheck. Judged as test_quantized_linear.py judges every backend
(check(): the fp64 product with W's exact values, within fp32 summation's bound and the dtype's
rounding). Every test needs a CUDA device and skips without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastarch import availability
from fastarch.ops.qlinear import BLOCK_BYTES
from fastarch.ops.qlinear.backends import CUDA_QUANTS as QUANTS  # (the Triton kernel reads the others there)
from fastarch.ops.qlinear.backends import GGML_IDS
from test_quantized_linear import check, make  # tests/ops/qlinear/test_quantized_linear.py

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1: the one-row kernel; 3: a group of 4 rows; 16: of 16; 17, 40: more than one group of 16
ROWS = [1, 3, 16, 17, 40]
# (in_features, out_features): one block, SmolLM2's widths, out_features odd (the warps' 2 columns)
SHAPES = [(32, 5), (576, 960), (1536, 37)]


@pytest.fixture(autouse=True)
def _cuda_kernels():
    why = availability.cuda() or availability.cuda_device_reason()
    if why:
        pytest.skip(f"the CUDA kernels cannot run here: {why}")


def qlinear(x, blocks, quant, b):
    return torch.ops.fastarch._quantized_linear(x, blocks, GGML_IDS[quant], b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference(rows, shape, quant, dtype, bias):
    x, blocks, b = make(rows, *shape, quant, dtype, bias=bias, device="cuda")
    y = qlinear(x, blocks, quant, b)
    assert y.device == x.device and y.is_contiguous()
    check(y, x, blocks, quant, b)


@pytest.mark.parametrize("offset", [0, 7], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_strided_rows_of_x(rows, quant, dtype, offset):
    """Rows of x 200 elements apart, starting at element 0 (the vector loads) or 7 (no longer
    aligned for them: element loads)."""
    x, blocks, b = make(rows, 96, 35, quant, dtype, device="cuda")
    wide = torch.zeros(rows, 200, dtype=dtype, device="cuda")
    wide[:, offset:offset + 96] = x
    xs = wide[:, offset:offset + 96]
    assert xs.stride(0) == 200
    check(qlinear(xs, blocks, quant, b), x, blocks, quant, b)


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("rows", [1, 5])
def test_blocks_at_any_byte_address(rows, quant, offset):
    """Blocks in a larger buffer at byte offsets 0-3: the kernel reads a block's aligned words and
    shifts them into place, at every alignment of the block's first byte."""
    x, blocks, b = make(rows, 160, 33, quant, torch.float32, device="cuda")
    buffer = torch.zeros(blocks.numel() + 8, dtype=torch.uint8, device="cuda")
    buffer[offset:offset + blocks.numel()] = blocks.flatten()
    shifted = buffer[offset:offset + blocks.numel()].view(blocks.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 4 == offset % 4
    check(qlinear(x, shifted, quant, b), x, blocks, quant, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("rows", [3, 17])
def test_nan_stays_in_its_row_and_column(rows, quant, dtype):
    """A NaN in x spoils its row only; a NaN scale d in one block (the second) of W's row 7 its
    output column only."""
    x, blocks, b = make(rows, 64, 20, quant, dtype, device="cuda")
    x[1, 5] = float("nan")
    blocks = blocks.clone()
    per = BLOCK_BYTES[quant]
    blocks[7, per:per + 2] = torch.tensor(np.array([np.float16("nan")]).view(np.uint8), device="cuda")
    y = qlinear(x, blocks, quant, b).cpu()
    nan = torch.zeros(rows, 20, dtype=torch.bool)
    nan[1, :] = True
    nan[:, 7] = True
    assert torch.equal(y.isnan(), nan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS)
def test_empty_inputs(quant, dtype):
    """No rows or no output columns: an empty result; no in_features: the bias in every row, or
    zeros."""
    x, blocks, b = make(3, 64, 7, quant, dtype, device="cuda")
    assert qlinear(x[:0], blocks, quant, b).shape == (0, 7)
    y = qlinear(x, blocks[:0], quant, b[:0])
    assert y.shape == (3, 0) and y.dtype == dtype and y.is_cuda
    none = torch.empty(3, 0, dtype=dtype, device="cuda")
    no_blocks = torch.empty(7, 0, dtype=torch.uint8, device="cuda")
    assert torch.equal(qlinear(none, no_blocks, quant, b), b.expand(3, 7))
    assert torch.equal(qlinear(none, no_blocks, quant, None), torch.zeros(3, 7, dtype=dtype, device="cuda"))


def _q8(rows=2, k=64, n=3):
    x, blocks, _ = make(rows, k, n, "q8_0", torch.float32, bias=False, device="cuda")
    return x, blocks


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda x, w: (x, w, 5, None), r"quant must be a ggml type id of Q4_0 \(2\).*got 5"),
        (lambda x, w: (x, w[:, :40], 8, None), "blocks must be contiguous uint8"),
        (lambda x, w: (x, w, 3, None), r"blocks must be contiguous uint8 \(out_features, 40\)"),
        (lambda x, w: (x, w.float(), 8, None), "blocks must be contiguous uint8"),
        (lambda x, w: (x[:, :40], w, 8, None), "in_features must be a multiple of 32"),
        (lambda x, w: (x.int(), w, 8, None), "x must be float32, float16 or bfloat16"),
        (lambda x, w: (x[None], w, 8, None), "x must be 2-D"),
        (lambda x, w: (torch.randn(64, 2, device="cuda").t(), w, 8, None), "contiguous last dim"),
        (lambda x, w: (x.cpu(), w, 8, None), "x must be a CUDA tensor"),
        (lambda x, w: (x, w.cpu(), 8, None), "blocks must be on x's device"),
        (lambda x, w: (x, w, 8, torch.randn(4, device="cuda")), r"bias must be a contiguous \(3,\)"),
        (lambda x, w: (x, w, 8, torch.randn(3, device="cuda").double()), "bias must be"),
        (lambda x, w: (x, w, 8, torch.randn(3)), "bias must be"),
    ],
    ids=["quant", "blocks-narrowed", "blocks-width", "blocks-dtype", "in-features", "x-dtype", "x-3d",
         "x-last-dim", "x-cpu", "blocks-cpu", "bias-shape", "bias-dtype", "bias-cpu"],
)
def test_kernel_op_checks_its_arguments(args, match):
    x, blocks = _q8()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastarch._quantized_linear(*args(x, blocks))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device():
    """Inputs on the second GPU while the first is current: the kernel runs on theirs."""
    x, blocks, b = make(3, 96, 35, "q4_0", torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        y = qlinear(x, blocks, "q4_0", b)
    assert y.device == x.device
    check(y, x, blocks, "q4_0", b)


def test_opcheck():
    x, blocks, b = make(3, 64, 7, "q4_1", torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.fastarch._quantized_linear.default, (x, blocks, 3, b))
