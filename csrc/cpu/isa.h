// Which instruction set the CPU kernels use, as one ordered level chosen once per process (the
// fastest this CPU and build run, unless forced by FASTARCH_CPU_ISA or _set_cpu_isa):
//   generic      portable C++ (every CPU; the only level of a build without the x86 kernels)
//   avx2         the same portable C++ compiled a second time for AVX2 + FMA + F16C (cpu/portable.h:
//                the *_avx2.cpp files), on x86 CPUs without AVX-512 (Zen 2/3, Haswell to Alder Lake)
//   avx512       the *_avx512.cpp kernels without AVX512-BF16 instructions (a Skylake-X or
//                Ice Lake Xeon: bf16 attention then runs the portable kernels)
//   avx512_bf16  the same kernels with vdpbf16ps / vcvtneps2bf16 (Zen 4, Cooper Lake)
//   amx          avx512_bf16, and the bf16 attention forward's and backward's products through
//                oneDNN's brgemm (at::native::cpublas::brgemm), which runs them on the AMX tiles
// A level above what the CPU runs cannot be forced (set_isa throws with the reason).
#pragma once
#include <cstdint>
#include <string>

#include "cpu/dtype.h"

namespace fastarch::cpu {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

bool cpu_has_avx2();         // AVX2, FMA and F16C (false on other architectures)
bool cpu_has_avx512();       // F, BW, VL, DQ (false on other architectures)
bool cpu_has_avx512_bf16();  // AVX512-BF16: vdpbf16ps, vcvtneps2bf16
bool cpu_has_avx512_vnni();  // AVX512-VNNI: vpdpbusd (Cascade Lake, Ice Lake, Zen 4 and later)
bool cpu_has_avx_vnni();     // AVX-VNNI: vpdpbusd on ymm, VEX-encoded (Alder Lake, Sapphire Rapids, Zen 5)
// AMX-TILE and AMX-BF16 in cpuid, the tile state enabled by the OS (XCR0), and this process
// granted it (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once).
bool cpu_has_amx();
// Why cpu_has_amx() is false ("" when it is true).
const char* cpu_amx_missing();
bool avx2_kernels_built();    // the *_avx2.cpp builds of the portable kernels are compiled in (FASTARCH_WITH_AVX2)
bool avx512_kernels_built();  // the *_avx512.cpp kernels are compiled in (FASTARCH_WITH_AVX512)

Isa active_isa();
Isa best_isa();  // what "auto" selects
const char* isa_name(Isa isa);
// The portable kernels run their AVX2 build (level avx2 or above, in a build that has it: every
// CPU with AVX-512 has AVX2, FMA and F16C).
inline bool portable_avx2() { return active_isa() >= Isa::avx2 && avx2_kernels_built(); }
// The AVX-512 kernels run (level avx512 or above).
inline bool isa_avx512() { return active_isa() >= Isa::avx512; }
// Whether the AVX-512 row kernels (norms, activations, group_norm) run dtype d: they have no fp64 build.
inline bool use_avx512(Dtype d) { return d != Dtype::f64 && isa_avx512(); }
// How the quantized linear layer multiplies x rounded to int8 (activations "int8"), the fastest
// this CPU and level run, ordered: x's rounded values on the exact kernels of the level (every
// CPU), W's codes times x's codes in int32 by vpmaddubsw + vpmaddwd (AVX2), by vpdpbusd on ymm
// (AVX-VNNI), by vpdpbusd on zmm (AVX512-VNNI, level avx512 and above).
enum class Int8Products { exact = 0, avx2 = 1, avx_vnni = 2, avx512_vnni = 3 };
Int8Products int8_products();
const char* int8_products_name(Int8Products p);
// "auto" (the default) or a name above: the fastest up to that one (for tests and benchmarks);
// one this CPU or build cannot run throws std::invalid_argument saying why.
void set_int8_products(const std::string& name);
// Those kernels may use the AVX512-BF16 instructions (level avx512_bf16 or above).
inline bool isa_bf16() { return active_isa() >= Isa::avx512_bf16; }
// "auto" (the default), "generic", "avx2", "avx512", "avx512_bf16" or "amx"; a level this CPU or build
// cannot run throws std::invalid_argument saying why.
void set_isa(const std::string& name);

// Whether a pointwise-style kernel writes an output of `bytes` with streaming (non-temporal)
// stores: from 4 MB up. They skip the read-for-ownership of each destination line (a third of
// a norm's memory traffic) and leave the cache to the inputs; smaller outputs stay in cache for
// the next op. FASTARCH_CPU_STREAM=0 or 1 forces the answer (read once), to measure the rule.
// Measured on the 2-core EPYC (32 MB L3), FASTARCH_CPU_STREAM=1 against =0: layer_norm
// 4096x768 fp32 forward ~1.1x, add_layer_norm forward ~1.25x, forward+backward ~1.35x faster.
// (Callers also need every 16-value chunk of the output whole and aligned.)
bool stream_output(int64_t bytes);

// Whether the attention forward and backward of bf16 (or else fp32 / fp16) inputs run their
// products through brgemm (attn/brgemm.h; attention_fwd_brgemm.cpp, attention_bwd_avx512.cpp),
// as the mode says (attn/brgemm.h's attention_brgemm adds its check): "auto" (the default):
// bf16 at level amx (the AMX tiles), fp32 and fp16 never (oneDNN's fp32 brgemm measured at
// parity with our FMA tiles on a Zen 4, 0.92-1.09x; owed on an Intel Xeon); "on": every dtype
// at level avx512_bf16 or above, i.e. on any AVX512-BF16 CPU, where oneDNN's brgemm runs
// AVX-512 code (to test the path, or to compare it with our tiles); "off": never (our tiles,
// also on an AMX CPU).
void set_brgemm(const std::string& mode);
bool use_brgemm_attention(bool bf16);
const char* brgemm_mode();

}  // namespace fastarch::cpu
