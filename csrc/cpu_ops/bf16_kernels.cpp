// See bf16_kernels.hpp.
#include "bf16_kernels.hpp"

#include "bf16_gemm.hpp"

namespace pgf_ops {

const char* bf16_kernels_isa() {
#if PGF_X86
  if (amx_usable()) return "amx";
  if (cpu_has_avx512bf16()) return "avx512bf16";
#endif
  return "";
}

bool bf16_isa_runs(Bf16Isa isa) {
  const char* best = bf16_kernels_isa();
  return isa == Bf16Isa::Amx ? best[0] == 'a' : best[0] != '\0';
}

}  // namespace pgf_ops
