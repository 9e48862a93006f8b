// qlinear_int8_avx2.cpp built with AVX-VNNI: the int8 products by vpdpbusd on ymm.
#define FASTARCH_INT8_AVX_VNNI
#include "qlinear_int8_avx2.cpp"
