// The Python module fastarch._C. Importing it registers the kernels (static initializers in
// the other translation units); build_info() says what was compiled in.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"

#define FASTARCH_STR_(x) #x
#define FASTARCH_STR(x) FASTARCH_STR_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastarch compiled kernels";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef FASTARCH_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    pybind11::list cpu_kernels;  // the builds of the CPU kernels compiled in
    cpu_kernels.append("generic");
    if (fastarch::cpu::avx512_kernels_built()) cpu_kernels.append("avx512");
    info["cpu_kernels"] = cpu_kernels;
    info["cpu_isa"] = fastarch::cpu::isa_name(fastarch::cpu::active_isa());  // the one in use now
    info["cpu_has_avx512"] = fastarch::cpu::cpu_has_avx512();
    info["cpu_has_avx512_bf16"] = fastarch::cpu::cpu_has_avx512_bf16();
    info["compiler"] = std::string("gcc ") + FASTARCH_STR(__GNUC__) "." FASTARCH_STR(__GNUC_MINOR__);
    return info;
  });
  // For tests and benchmarks: run the CPU kernels' portable build on an AVX-512 machine.
  m.def("_set_cpu_isa", [](const std::string& name) { fastarch::cpu::set_isa(name); });
}
