"""The attention family's Triton kernels, one module per kernel group."""
