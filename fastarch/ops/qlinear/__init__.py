"""The linear layer on block-quantized weights: quantized_linear (y = x W^T + b with W given
as GGUF's Q4_0, Q4_1 or Q8_0 blocks, as the file stores them), with kernels that read the
blocks once for a decode step's few rows of x: a Q4_1 weight is 0.625 bytes where bf16 is 2.

api.py: the public function and its torch op (fake implementation, autograd for x and the
bias); reference.py: the formats and the definition of correct (ggml's dequantized values,
PyTorch's GEMM); backends.py: the one table of backends; triton.py: the Triton kernel's op.
"""

from fastarch.ops.qlinear.api import QUANTS, quantized_linear
from fastarch.ops.qlinear.reference import dequantize_blocks, quantize_blocks

__all__ = ["quantized_linear", "dequantize_blocks", "quantize_blocks", "QUANTS"]
