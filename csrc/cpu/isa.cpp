#include "isa.h"

#include <atomic>
#include <stdexcept>

namespace fastarch::cpu {
namespace {
std::atomic<int> g_override{-1};  // -1: auto
}

// __builtin_cpu_supports exists for x86 targets only (GCC).
#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
#endif

bool avx512_kernels_built() {
#ifdef FASTARCH_WITH_AVX512
  return true;
#else
  return false;
#endif
}

Isa active_isa() {
  const int forced = g_override.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  return avx512_kernels_built() && cpu_has_avx512() ? Isa::avx512 : Isa::generic;
}

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : "generic"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_override = -1;
  } else if (name == "generic") {
    g_override = static_cast<int>(Isa::generic);
  } else if (name == "avx512") {
    if (!avx512_kernels_built()) {
      throw std::invalid_argument(
          "fastarch._C was built without the AVX-512 kernels (not an x86-64 build, or FASTARCH_CPU_AVX512=0)");
    }
    if (!cpu_has_avx512()) throw std::invalid_argument("this CPU lacks AVX-512 (F, BW, VL, DQ)");
    g_override = static_cast<int>(Isa::avx512);
  } else {
    throw std::invalid_argument("isa must be 'auto', 'generic' or 'avx512', got '" + name + "'");
  }
}

}  // namespace fastarch::cpu
