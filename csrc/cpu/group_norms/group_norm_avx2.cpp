// group_norm_generic.cpp built for AVX2 + FMA + F16C: the portable kernels at level avx2 (cpu/isa.h, cpu/portable.h).
#define FASTARCH_PORTABLE_AVX2
// (its lambdas capture types of its unnamed namespace, which GCC flags in an included file)
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#include "group_norm_generic.cpp"
