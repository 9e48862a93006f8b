#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace fastarch::cpu {
namespace {
std::atomic<int> g_override{-1};  // -1: auto
std::atomic<int> g_brgemm{0};     // 0 auto, 1 on, 2 off
std::atomic<int> g_int8_cap{3};   // the fastest Int8Products allowed (3: all)
}  // namespace

// __builtin_cpu_supports exists for x86 targets only (GCC).
#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool cpu_has_avx512_vnni() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

bool cpu_has_avx_vnni() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
  return has;
}

namespace {
const char* amx_check() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return "cpuid leaf 7 is missing";
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  if (!tile || !bf16) return "this CPU lacks AMX (AMX-TILE and AMX-BF16 in cpuid leaf 7)";
  if (!cpu_has_avx512_bf16()) return "this CPU has AMX but lacks AVX512-BF16";
  // The OS must save the tile state (XCR0 bits 17 XTILECFG and 18 XTILEDATA).
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return "the OS does not enable XSAVE (no OSXSAVE)";
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return "the OS does not enable the AMX tile state (XCR0 bits 17, 18)";
#if defined(__linux__)
  // Linux hands the tile data state to a process only on request (kernel 5.16+).
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "Linux refused the AMX tile permission (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))";
  return "";
#else
  return "AMX is only used on Linux (the tile permission request)";
#endif
}
}  // namespace

const char* cpu_amx_missing() {
  static const char* why = amx_check();
  return why;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
bool cpu_has_avx512_vnni() { return false; }
bool cpu_has_avx_vnni() { return false; }
const char* cpu_amx_missing() { return "not an x86-64 CPU (AMX)"; }
#endif

bool cpu_has_amx() { return cpu_amx_missing()[0] == '\0'; }

bool avx2_kernels_built() {
#ifdef FASTARCH_WITH_AVX2
  return true;
#else
  return false;
#endif
}

bool avx512_kernels_built() {
#ifdef FASTARCH_WITH_AVX512
  return true;
#else
  return false;
#endif
}

Isa best_isa() {
  if (!avx512_kernels_built() || !cpu_has_avx512()) return avx2_kernels_built() && cpu_has_avx2() ? Isa::avx2 : Isa::generic;
  if (!cpu_has_avx512_bf16()) return Isa::avx512;
  return cpu_has_amx() ? Isa::amx : Isa::avx512_bf16;
}

Isa active_isa() {
  const int forced = g_override.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  static const Isa best = best_isa();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic:
      return "generic";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::avx512_bf16:
      return "avx512_bf16";
    case Isa::amx:
      return "amx";
  }
  return "?";
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_override = -1;
    return;
  }
  Isa want;
  if (name == "generic") {
    want = Isa::generic;
  } else if (name == "avx2") {
    want = Isa::avx2;
  } else if (name == "avx512") {
    want = Isa::avx512;
  } else if (name == "avx512_bf16") {
    want = Isa::avx512_bf16;
  } else if (name == "amx") {
    want = Isa::amx;
  } else {
    throw std::invalid_argument(
        "isa must be 'auto', 'generic', 'avx2', 'avx512', 'avx512_bf16' or 'amx', got '" + name + "'");
  }
  if (want == Isa::avx2) {
    if (!avx2_kernels_built()) {
      throw std::invalid_argument(
          "fastarch._C was built without the AVX2 kernels (not an x86-64 build, or FASTARCH_CPU_AVX2=0)");
    }
    if (!cpu_has_avx2()) throw std::invalid_argument("this CPU lacks AVX2, FMA or F16C");
  }
  if (want >= Isa::avx512) {
    if (!avx512_kernels_built()) {
      throw std::invalid_argument(
          "fastarch._C was built without the AVX-512 kernels (not an x86-64 build, or FASTARCH_CPU_AVX512=0)");
    }
    if (!cpu_has_avx512()) throw std::invalid_argument("this CPU lacks AVX-512 (F, BW, VL, DQ)");
  }
  if (want >= Isa::avx512_bf16 && !cpu_has_avx512_bf16()) throw std::invalid_argument("this CPU lacks AVX512-BF16");
  if (want == Isa::amx && !cpu_has_amx()) throw std::invalid_argument(cpu_amx_missing());
  g_override = static_cast<int>(want);
}

void set_brgemm(const std::string& mode) {
  if (mode == "auto") {
    g_brgemm = 0;
  } else if (mode == "on") {
    if (!avx512_kernels_built() || !cpu_has_avx512_bf16()) {
      throw std::invalid_argument(
          "the brgemm attention needs AVX512-BF16 and a build with the AVX-512 kernels (this CPU or build lacks them)");
    }
    g_brgemm = 1;
  } else if (mode == "off") {
    g_brgemm = 2;
  } else {
    throw std::invalid_argument("brgemm must be 'auto', 'on' or 'off', got '" + mode + "'");
  }
}

bool use_brgemm_attention(bool bf16) {
  switch (g_brgemm.load(std::memory_order_relaxed)) {
    case 1:
      return active_isa() >= Isa::avx512_bf16;
    case 2:
      return false;
    default:
      return bf16 && active_isa() == Isa::amx;
  }
}

const char* brgemm_mode() {
  switch (g_brgemm.load(std::memory_order_relaxed)) {
    case 1:
      return "on";
    case 2:
      return "off";
    default:
      return "auto";
  }
}

namespace {
// Whether the int8 products p can run at level isa (ignoring the cap).
bool int8_runs(Int8Products p, Isa isa) {
  const bool avx2 = isa >= Isa::avx2 && avx2_kernels_built();  // (the *_avx2.cpp units)
  switch (p) {
    case Int8Products::avx512_vnni:
      return isa >= Isa::avx512 && cpu_has_avx512_vnni();
    case Int8Products::avx_vnni:
      return avx2 && cpu_has_avx_vnni();
    case Int8Products::avx2:
      return avx2;
    case Int8Products::exact:
      return true;
  }
  return false;
}
}  // namespace

Int8Products int8_products() {
  const Isa isa = active_isa();
  for (int p = g_int8_cap.load(std::memory_order_relaxed); p > 0; --p) {
    if (int8_runs(static_cast<Int8Products>(p), isa)) return static_cast<Int8Products>(p);
  }
  return Int8Products::exact;
}

const char* int8_products_name(Int8Products p) {
  switch (p) {
    case Int8Products::exact:
      return "exact";
    case Int8Products::avx2:
      return "avx2";
    case Int8Products::avx_vnni:
      return "avx_vnni";
    case Int8Products::avx512_vnni:
      return "avx512_vnni";
  }
  return "?";
}

void set_int8_products(const std::string& name) {
  if (name == "auto") {
    g_int8_cap = static_cast<int>(Int8Products::avx512_vnni);
    return;
  }
  for (int p = 0; p <= static_cast<int>(Int8Products::avx512_vnni); ++p) {
    if (name != int8_products_name(static_cast<Int8Products>(p))) continue;
    if (!int8_runs(static_cast<Int8Products>(p), best_isa())) {  // (exact always runs)
      static constexpr const char* kNeeds[] = {"", "AVX2 and the AVX2 kernels", "AVX-VNNI and the AVX2 kernels",
                                               "AVX512-VNNI and the AVX-512 kernels"};
      throw std::invalid_argument("the int8 products '" + name + "' cannot run on this CPU or build (they need " +
                                  kNeeds[p] + ")");
    }
    g_int8_cap = p;
    return;
  }
  throw std::invalid_argument("int8 products must be 'auto', 'exact', 'avx2', 'avx_vnni' or 'avx512_vnni', got '" +
                              name + "'");
}

bool stream_output(int64_t bytes) {
  constexpr int64_t kStreamBytes = int64_t{4} << 20;
  static const int forced = [] {
    const char* v = std::getenv("FASTARCH_CPU_STREAM");
    return v && (v[0] == '0' || v[0] == '1') ? v[0] - '0' : -1;
  }();
  return forced >= 0 ? forced == 1 : bytes >= kStreamBytes;
}

}  // namespace fastarch::cpu
