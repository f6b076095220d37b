// The actor's mean action in one fused pass. See actor_mean.hpp.
//
// Why: in the guided sampler the policy runs on all B*H guide states every reverse step. Run as torch ops (bf16
// addmm for each Linear, LayerNorm + ELU between them, tanh) each intermediate [B*H, hidden] activation goes to
// memory and back, and the three GEMMs and two norms are five dispatches: 0.77 ms for 2,560 rows at hidden 256 on a
// 2-core Sapphire Rapids, of which the GEMMs' arithmetic is about 0.18 ms. Here a block of 32 rows goes through
// the whole network in L1/L2-resident scratch: every layer (input, hidden, output; K and N zero-padded to whole
// tiles) as AMX bf16 tile products with fp32 accumulation and the bias loaded into the accumulators, LayerNorm + ELU
// with the AVX-512 row kernel of layer_norm_act (row_kernels.hpp) writing the bf16 operand of the next layer, and
// tanh on the output.
#include "actor_mean.hpp"

#include "amx_gemm.hpp"
#include "row_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace pgf_ops {
namespace {

constexpr int64_t kBlockRows = 32;  // two 16-row AMX tiles
// Below this many rows the calling thread does all: waking a worker costs about what it saves (hidden 256, 1 vs 2
// threads, whole op: 96 rows 67 vs 69 us, 128 rows 79 vs 60 us, 256 rows 119 vs 81 us).
constexpr int64_t kSerialRows = 128;

#if PGF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,amx-tile,amx-bf16")

// tanh(x) = sign(x) (-e) / (2 + e) with e = expm1(-2|x|) (about 1 ulp), so small |x| keep their relative accuracy;
// |x| > 44 gives e = -1, tanh = +-1. NaN lanes are returned as is.
PGF_INL(PGF_TGT) __m512 v_tanh(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign, x);
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)), _mm512_set1_ps(kExpLo));
  const __m512 e = v_expm1_nonpos(t);
  const __m512 r = _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), e), _mm512_add_ps(_mm512_set1_ps(2.0f), e));
  return _mm512_mask_mov_ps(_mm512_or_ps(r, _mm512_and_ps(x, sign)), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

struct Net {
  int64_t obs_dim, in_cols, hidden, layers, act_dim, out_cols;
  const uint16_t* w_in;
  const float *b_in, *ln_w, *ln_b;
  float eps;
  const uint16_t* w_hidden;
  const float* b_hidden;
  const uint16_t* w_out;
  const float* b_out;
};

struct Scratch {  // one thread's, 64-byte aligned
  uint16_t *x, *z;  // [32, in_cols], [32, hidden] bf16
  float *h, *norm;  // [32, max(hidden, out_cols)] fp32, kGroup rows for the LayerNorm kernel
};

// Rows [r0, r0 + n) (n <= 32) of the states through the network into mean; padding rows are zero.
void block(const Net& net, const float* states, int64_t r0, int64_t n, float* mean, const Scratch& sc) {
  const int64_t H = net.hidden, O = net.obs_dim, K = net.in_cols;
  std::fill(sc.x, sc.x + kBlockRows * K, uint16_t(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < O; c += 16) {
      const __mmask16 m = lanes(O - c);
      Store<uint16_t, true>::run(sc.x + i * K + c, m, v_load(states + (r0 + i) * O + c, m));
    }
  amx_gemm(sc.x, kBlockRows, K, net.w_in, H, sc.h, net.b_in, false);
  norm_act_rows<Act::Elu>(sc.h, sc.z, kBlockRows, net.ln_w, net.ln_b, H, net.eps, sc.norm);
  for (int64_t l = 1; l < net.layers; ++l) {
    amx_gemm(sc.z, kBlockRows, H, net.w_hidden + (l - 1) * H * H, H, sc.h, net.b_hidden + (l - 1) * H, false);
    norm_act_rows<Act::Elu>(sc.h, sc.z, kBlockRows, net.ln_w + l * H, net.ln_b + l * H, H, net.eps, sc.norm);
  }
  amx_gemm(sc.z, kBlockRows, H, net.w_out, net.out_cols, sc.h, net.b_out, false);
  const int64_t A = net.act_dim, P = net.out_cols;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < A; c += 16) {
      const __mmask16 m = lanes(A - c);
      _mm512_mask_storeu_ps(mean + (r0 + i) * A + c, m, v_tanh(_mm512_maskz_loadu_ps(m, sc.h + i * P + c)));
    }
}

// Blocks [b0, b1) of 32 rows on the calling thread (its own tile configuration and scratch).
void run_blocks(const Net& net, const float* states, int64_t rows, int64_t b0, int64_t b1, float* mean) {
  if (b0 >= b1) return;
  const int64_t hw = std::max(net.hidden, net.out_cols);
  std::vector<float> h(kBlockRows * hw + 16), norm(kGroup * net.hidden + 16);
  std::vector<uint16_t> x(kBlockRows * net.in_cols + 32), z(kBlockRows * net.hidden + 32);
  const Scratch sc{align64(x.data()), align64(z.data()), align64(h.data()), align64(norm.data())};
  configure_tiles();
  for (int64_t bl = b0; bl < b1; ++bl) {
    const int64_t r0 = bl * kBlockRows;
    block(net, states, r0, std::min(kBlockRows, rows - r0), mean, sc);
  }
  _tile_release();
}

#pragma GCC pop_options

#endif  // PGF_X86

}  // namespace

void actor_mean(const float* states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers, int64_t act_dim,
                const uint16_t* w_in, const float* b_in, const float* ln_w, const float* ln_b, float eps,
                const uint16_t* w_hidden, const float* b_hidden, const uint16_t* w_out, const float* b_out,
                float* mean, int threads) {
#if PGF_X86
  if (rows <= 0) return;
  const int64_t in_cols = (obs_dim + 31) / 32 * 32, out_cols = (act_dim + 15) / 16 * 16;
  const Net net{obs_dim, in_cols, hidden, layers, act_dim, out_cols, w_in, b_in, ln_w, ln_b, eps, w_hidden,
                b_hidden, w_out, b_out};
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int nt = rows < kSerialRows ? 1 : static_cast<int>(std::min<int64_t>(std::max(1, threads), blocks));
  for_block_ranges(blocks, nt, [&](int64_t b0, int64_t b1) { run_blocks(net, states, rows, b0, b1, mean); });
#else
  (void)states, (void)rows, (void)obs_dim, (void)hidden, (void)layers, (void)act_dim, (void)w_in, (void)b_in;
  (void)ln_w, (void)ln_b, (void)eps, (void)w_hidden, (void)b_hidden, (void)w_out, (void)b_out, (void)mean,
      (void)threads;
#endif
}

}  // namespace pgf_ops
