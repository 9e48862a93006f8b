// The portable CPU kernels (the *_generic.cpp files) are compiled twice on x86-64: for the
// target's baseline (level generic: SSE2 there, NEON on aarch64) and for AVX2 + FMA + F16C
// (level avx2, cpu/isa.h), each *_avx2.cpp being
//
//   #define FASTARCH_PORTABLE_AVX2
//   #include "x_generic.cpp"
//
// A *_generic.cpp includes everything it needs, then opens FASTARCH_PORTABLE_BEGIN (the AVX2
// build's target pragma) and closes FASTARCH_PORTABLE_END at its end. So every inline function
// and template of a header is parsed before the pragma and keeps the baseline target, also
// where the AVX2 code instantiates it: a copy the linker keeps for the whole extension never
// holds AVX2 instructions. (GCC 12 checked: a header's template instantiated below the pragma
// is compiled without it.) What is defined below the pragma is the file's own: in anonymous
// namespaces, or an entry point, which is a template on the build (kPortableBuild) and
// instantiated by its own file for it: `template <Isa I, Dtype D> void f(...)` declared in the
// kernels' header, `template void f<kPortableBuild, Dtype::f32>(...)` at the file's end.
//
// Code a *_generic.cpp defines for both builds' callers (group_norm_generic.cpp's plan and
// tables) is compiled in the baseline build only (#ifndef FASTARCH_PORTABLE_AVX2). Headers of
// building blocks that must take the build's target (portable_math.h, attn/attention_generic.h)
// open their own FASTARCH_PORTABLE_BEGIN after their includes and give their functions
// internal linkage, so that each build keeps its own copy.
//
// Callers pick the build with with_portable_build. The pragma's target does not define
// __AVX2__ or __FMA__: code that differs between the builds tests FASTARCH_PORTABLE_AVX2 or
// kPortableBuild.
#pragma once
#include "cpu/isa.h"

#ifdef FASTARCH_PORTABLE_AVX2
#define FASTARCH_PORTABLE_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FASTARCH_PORTABLE_END _Pragma("GCC pop_options")
#else
#define FASTARCH_PORTABLE_BEGIN
#define FASTARCH_PORTABLE_END
#endif

namespace fastarch::cpu {

#ifdef FASTARCH_PORTABLE_AVX2
constexpr Isa kPortableBuild = Isa::avx2;
#else
constexpr Isa kPortableBuild = Isa::generic;
#endif

// Calls fn.template operator()<I>() with I = Isa::avx2 when the portable kernels run their
// AVX2 build (portable_avx2()), else Isa::generic: the glue's one switch between the builds.
template <typename Fn>
decltype(auto) with_portable_build(Fn&& fn) {
#ifdef FASTARCH_WITH_AVX2
  if (portable_avx2()) return fn.template operator()<Isa::avx2>();
#endif
  return fn.template operator()<Isa::generic>();
}

}  // namespace fastarch::cpu
