// Whether the fused AMX kernels (actor_mean, residual_mlp, amx_linear) can run in this process.
#pragma once

namespace pgf_ops {

// AMX-TILE + AMX-BF16 + AVX-512 (F/BW/VL/DQ, BF16) on the CPU, tile data enabled by the OS and granted to this
// process (arch_prctl), and PGF_CPU_OPS_NO_AMX unset.
bool amx_kernels_available();

}  // namespace pgf_ops
