// Which instruction set the CPU kernels use: AVX-512 when the CPU has it and the extension was
// built with it (x86-64; setup.py's FASTARCH_CPU_AVX512), else portable C++.
#pragma once
#include <string>

namespace fastarch::cpu {

enum class Isa { generic, avx512 };

bool cpu_has_avx512();       // F, BW, VL, DQ (false on other architectures)
bool cpu_has_avx512_bf16();  // AVX512-BF16: vcvtneps2bf16
bool avx512_kernels_built();  // the *_avx512.cpp kernels are compiled in (FASTARCH_WITH_AVX512)
Isa active_isa();
const char* isa_name(Isa isa);
// "auto" (the default), "generic" or "avx512"; avx512 fails on a CPU without it or in a build
// without the AVX-512 kernels.
void set_isa(const std::string& name);

}  // namespace fastarch::cpu
