// See amx_kernels.hpp.
#include "amx_kernels.hpp"

#include "amx_gemm.hpp"

namespace pgf_ops {

bool amx_kernels_available() {
#if PGF_X86
  return amx_usable();
#else
  return false;
#endif
}

}  // namespace pgf_ops
