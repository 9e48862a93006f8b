// qlinear_blocks_avx2.cpp's int8 products built with AVX-VNNI: vpdpbusd on ymm.
#define FASTARCH_INT8_AVX_VNNI
#include "qlinear_blocks_avx2.cpp"
