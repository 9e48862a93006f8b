"""fastarch's Triton kernels, one module per op family; installed as ``fastarch.kernels``."""
