// The MLP denoiser's residual trunk as one fused CPU pass (bf16 GEMMs on AMX tiles or AVX-512 BF16, LayerNorm + ReLU
// and the residual adds in between). No torch headers: callers pass raw pointers (see bindings.cpp and
// polygrad_fast/cpu_residual_mlp.py).
#pragma once

#include "bf16_kernels.hpp"

#include <cstdint>

namespace pgf_ops {

// For each row of x [rows, in_dim] (bf16 bits):
//   h = W_in x + b_in                                           (fp32, [width])
//   h = h + W_k z_k + b_k,  z_k = bf16(relu(LN_k(h)))           for the depth residual blocks k = 0 .. depth - 1
//   out = bf16(W_out bf16(relu(LN_depth(h))) + b_out)           (bf16 bits, [rows, out_dim])
// LN_k: LayerNorm over width (fp32, two passes, eps) with affine ln_w[k], ln_b[k] ([depth + 1, width] fp32; row
// depth is the trunk's final norm). Weight matrices as bf16 bits in AMX's VNNI tile order (bf16_gemm.hpp), zero-padded:
// w_in [width, in_dim padded to 32], w_blocks the depth matrices [width, width] one after the other, w_out [out_dim
// padded to 16, width]; biases fp32: b_in [width], b_blocks [depth, width], b_out [out_dim padded to 16].
// Needs width % 32 == 0 and bf16_isa_runs(isa); rows split over `threads` OpenMP threads in blocks of 32 (results do
// not depend on `threads`; the two ISAs may differ in fp32 summation order).
void residual_mlp(const uint16_t* x, int64_t rows, int64_t in_dim, int64_t width, int64_t depth, int64_t out_dim,
                  const uint16_t* w_in, const float* b_in, const float* ln_w, const float* ln_b, float eps,
                  const uint16_t* w_blocks, const float* b_blocks, const uint16_t* w_out, const float* b_out,
                  uint16_t* out, int threads, Bf16Isa isa);

// out [rows, n] fp32 = a [rows, k] bf16 x W^T + bias, one GEMM as residual_mlp runs each layer (W in VNNI order,
// k % 32 == 0, n % 16 == 0, rows % 32 == 0; rows split over `threads`): what the sampler bench times as this
// package's GEMM floor next to oneDNN's.
void bf16_linear(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, const float* bias,
                 float* out, int threads, Bf16Isa isa);

}  // namespace pgf_ops
