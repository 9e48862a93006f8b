// The PyTorch headers the op-registering units include, precompiled once per build by setup.py
// (_precompiled_torch_headers) into the build's pch/ directory, which the compiler searches
// first: each of those units includes this file first, and parsing these headers (torch/library.h
// alone ~11 s) was most of its compile time. The units still include what they use themselves,
// and without the precompiled header (FASTARCH_PCH=0) this plain file is found in csrc/pch/.
// (No include guard: it is a unit's first include, and a precompiled header's main file.)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
