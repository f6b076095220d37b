// Which bf16 GEMM the fused kernels (actor_mean, residual_mlp, bf16_linear) run in this process.
#pragma once

namespace pgf_ops {

enum class Bf16Isa { Amx, Avx512Bf16 };

// "amx": AMX-TILE + AMX-BF16 + AVX-512 (F/BW/VL/DQ, BF16) on the CPU, tile data enabled by the OS and granted to
// this process (arch_prctl), PGF_CPU_OPS_NO_AMX unset; else "avx512bf16": AVX-512 F/BW/VL/DQ + BF16 on the CPU and
// PGF_CPU_OPS_NO_AVX512BF16 unset; else "" (no fused bf16 kernel runs).
const char* bf16_kernels_isa();

// Whether `isa` runs here: Amx only where bf16_kernels_isa() is "amx", Avx512Bf16 wherever it is not "".
bool bf16_isa_runs(Bf16Isa isa);

}  // namespace pgf_ops
