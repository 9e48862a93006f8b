"""The linear layer on block-quantized weights: quantized_linear (y = x W^T + b with W given
as GGUF's blocks, as the file stores them: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
IQ4_NL, IQ4_XS),
with kernels that read the blocks once for a decode step's few rows of x: a Q4_K weight is
0.56 bytes where bf16 is 2.

api.py: the public function and its torch op (fake implementation, autograd for x and the
bias); formats.py: the block formats (ggml's dequantized values, quantizers); reference.py:
the definition of correct (PyTorch's GEMM on those values); backends.py: the one table of
backends; triton.py: the Triton kernel's op.
"""

from fastarch.ops.qlinear.api import quantized_linear
from fastarch.ops.qlinear.formats import BLOCK_BYTES, BLOCK_VALUES, QUANTS, dequantize_blocks, quantize_blocks

__all__ = ["quantized_linear", "dequantize_blocks", "quantize_blocks", "QUANTS", "BLOCK_BYTES", "BLOCK_VALUES"]
