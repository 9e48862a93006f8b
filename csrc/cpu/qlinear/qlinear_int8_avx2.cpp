// qlinear_int8_generic.cpp built for AVX2 + FMA + F16C: the portable kernels at level avx2 (cpu/isa.h, cpu/portable.h).
#define FASTARCH_PORTABLE_AVX2
#include "qlinear_int8_generic.cpp"
