// Which instruction set the CPU kernels use: AVX-512 when the CPU has it, else portable C++.
#pragma once
#include <string>

namespace fastarch::cpu {

enum class Isa { generic, avx512 };

bool cpu_has_avx512();       // F, BW, VL, DQ
bool cpu_has_avx512_bf16();  // AVX512-BF16: vcvtneps2bf16
Isa active_isa();
const char* isa_name(Isa isa);
// "auto" (the default), "generic" or "avx512"; avx512 fails on a CPU without it.
void set_isa(const std::string& name);

}  // namespace fastarch::cpu
