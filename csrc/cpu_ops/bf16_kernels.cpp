// See bf16_kernels.hpp.
#include "bf16_kernels.hpp"

#include "bf16_gemm.hpp"

#include <string>

namespace pgf_ops {

const char* bf16_kernels_isa() {
#if PGF_X86
  if (amx_usable()) return "amx";
  if (cpu_has_avx512bf16()) return "avx512bf16";
#endif
  return "";
}

bool bf16_isa_runs(Bf16Isa isa) {
  const std::string best = bf16_kernels_isa();
  return isa == Bf16Isa::Amx ? best == "amx" : !best.empty();  // an AMX CPU runs AVX-512 BF16 too
}

}  // namespace pgf_ops
