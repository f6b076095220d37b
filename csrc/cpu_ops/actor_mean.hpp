// The actor's mean action, tanh(MLP(s)), as one fused CPU pass over blocks of rows: bf16 with AMX-BF16 tile or AVX-512
// BF16 GEMMs, or fp32 with AVX-512 / AVX2 FMA register tiles.
// No torch headers: callers pass raw pointers (see bindings.cpp and polygrad_fast/cpu_actor.py).
#pragma once

#include "bf16_kernels.hpp"

#include <cstdint>

namespace pgf_ops {

// For each row r of states [rows, obs_dim] (fp32):
//   z_0 = bf16(s_r);  h_1 = W_in z_0 + b_in;  z_1 = bf16(ELU(LN_0(h_1)))
//   h_{l+1} = W_l z_l + b_l,  z_{l+1} = bf16(ELU(LN_l(h_{l+1})))     for l = 1 .. layers - 1
//   mean[r, :] = tanh(W_out z_layers + b_out)                        (fp32, [rows, act_dim])
// where bf16() rounds to nearest even, the h and the output are accumulated in fp32, and LN_l is LayerNorm over
// `hidden` (fp32, two passes, eps) with affine ln_w[l], ln_b[l] ([layers, hidden] fp32). Every weight matrix W [N, K]
// is given as bf16 bits in AMX's VNNI tile order, [N / 16][K / 2][16][2] with entry (nb, kp, n, j) = W[16 nb + n]
// [2 kp + j], zero-padded to K a multiple of 32 and N of 16:
//   w_in: W_in [hidden, obs_dim padded to a multiple of 32], b_in [hidden] fp32;
//   w_hidden: the layers - 1 matrices W_l [hidden, hidden] one after the other, b_hidden [layers - 1, hidden] fp32;
//   w_out: W_out [act_dim padded to a multiple of 16, hidden], b_out [that padded act_dim] fp32 (padding 0).
// Needs hidden % 32 == 0 and bf16_isa_runs(isa); rows split over `threads` OpenMP threads in blocks of 32 (results
// do not depend on `threads`; the two ISAs may differ in fp32 summation order).
void actor_mean(const float* states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers, int64_t act_dim,
                const uint16_t* w_in, const float* b_in, const float* ln_w, const float* ln_b, float eps,
                const uint16_t* w_hidden, const float* b_hidden, const uint16_t* w_out, const float* b_out,
                float* mean, int threads, Bf16Isa isa);

// The same network in fp32 for an fp32 actor: z_0 = s_r, no bf16 rounding anywhere, LN_l as above, tanh in fp32.
// Every weight matrix W [N, K] is fp32 in 16-column panels, [N / 16][K][16] with entry (p, k, j) = W[16 p + j][k],
// N zero-padded to a multiple of 16 (K unpadded): w_in [hidden / 16][obs_dim][16], w_hidden the layers - 1 matrices
// [hidden / 16][hidden][16] one after the other, w_out [act_dim padded to 16 / 16][hidden][16], b_out padded alike.
// Needs hidden % 16 == 0; avx512 selects the AVX-512 kernel (else AVX2 + FMA), which the CPU must have
// (actor_mean_f32_isa). Rows split over `threads` in blocks of 24 (results do not depend on `threads`).
void actor_mean_f32(const float* states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers,
                    int64_t act_dim, const float* w_in, const float* b_in, const float* ln_w, const float* ln_b,
                    float eps, const float* w_hidden, const float* b_hidden, const float* w_out, const float* b_out,
                    float* mean, int threads, bool avx512);

// "avx512" where actor_mean_f32 can run its AVX-512 kernel (and PGF_CPU_OPS_NO_AVX512 is unset), else "avx2" where the
// CPU has AVX2 and FMA, else "".
const char* actor_mean_f32_isa();

}  // namespace pgf_ops
