// The actor's mean action in one fused pass. See actor_mean.hpp.
//
// Why: in the guided sampler the policy runs on all B*H guide states every reverse step. Run as torch ops (bf16
// addmm for each Linear, LayerNorm + ELU between them, tanh) each intermediate [B*H, hidden] activation goes to
// memory and back, and the three GEMMs and two norms are five dispatches: 0.77 ms for 2,560 rows at hidden 256 on a
// 2-core Sapphire Rapids, of which the GEMMs' arithmetic is about 0.18 ms. Here a block of 32 rows goes through
// the whole network in L1/L2-resident scratch: every layer (input, hidden, output; K and N zero-padded to whole
// tiles) as bf16 products with fp32 accumulation (AMX tiles or AVX-512 BF16, bf16_gemm.hpp) and the bias loaded
// into the accumulators, LayerNorm + ELU
// with the AVX-512 row kernel of layer_norm_act (row_kernels.hpp) writing the bf16 operand of the next layer, and
// tanh on the output.
#include "actor_mean.hpp"

#include "bf16_gemm.hpp"
#include "row_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace pgf_ops {
namespace {

constexpr int64_t kBlockRows = 32;  // bf16: two 16-row AMX tiles
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
template <class Gemm>
void block(const Net& net, const float* states, int64_t r0, int64_t n, float* mean, const Scratch& sc) {
  const int64_t H = net.hidden, O = net.obs_dim, K = net.in_cols;
  std::fill(sc.x, sc.x + kBlockRows * K, uint16_t(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < O; c += 16) {
      const __mmask16 m = lanes(O - c);
      Store<uint16_t, true>::run(sc.x + i * K + c, m, v_load(states + (r0 + i) * O + c, m));
    }
  Gemm::run(sc.x, kBlockRows, K, net.w_in, H, sc.h, net.b_in, false, (O + 1) / 2 * 2);  // columns >= O are zero
  norm_act_rows<Act::Elu>(sc.h, sc.z, kBlockRows, net.ln_w, net.ln_b, H, net.eps, sc.norm);
  for (int64_t l = 1; l < net.layers; ++l) {
    Gemm::run(sc.z, kBlockRows, H, net.w_hidden + (l - 1) * H * H, H, sc.h, net.b_hidden + (l - 1) * H, false);
    norm_act_rows<Act::Elu>(sc.h, sc.z, kBlockRows, net.ln_w + l * H, net.ln_b + l * H, H, net.eps, sc.norm);
  }
  Gemm::run(sc.z, kBlockRows, H, net.w_out, net.out_cols, sc.h, net.b_out, false);
  const int64_t A = net.act_dim, P = net.out_cols;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < A; c += 16) {
      const __mmask16 m = lanes(A - c);
      _mm512_mask_storeu_ps(mean + (r0 + i) * A + c, m, v_tanh(_mm512_maskz_loadu_ps(m, sc.h + i * P + c)));
    }
}

// Blocks [b0, b1) of 32 rows on the calling thread (its own scratch, and tile configuration for AMX).
template <class Gemm>
void run_blocks(const Net& net, const float* states, int64_t rows, int64_t b0, int64_t b1, float* mean) {
  if (b0 >= b1) return;
  const int64_t hw = std::max(net.hidden, net.out_cols);
  std::vector<float> h(kBlockRows * hw + 16), norm(kGroup * net.hidden + 16);
  std::vector<uint16_t> x(kBlockRows * net.in_cols + 32), z(kBlockRows * net.hidden + 32);
  const Scratch sc{align64(x.data()), align64(z.data()), align64(h.data()), align64(norm.data())};
  Gemm::begin();
  for (int64_t bl = b0; bl < b1; ++bl) {
    const int64_t r0 = bl * kBlockRows;
    block<Gemm>(net, states, r0, std::min(kBlockRows, rows - r0), mean, sc);
  }
  Gemm::end();
}

#pragma GCC pop_options

// ---- fp32: the same network in fp32 (an fp32 Actor), GEMMs as FMA register tiles ----
//
// Why: where the sampler's policy copy is fp32 (no oneDNN bf16 on the CPU, or bf16 measured slower), as torch ops
// (three addmm, each with its bias broadcast copied into the output first, two LayerNorm + ELU, tanh) its [B*H,
// hidden] activations go to memory and back: 1.67 ms for 2,560 rows at hidden 256 (2 threads, AVX-512), where its
// 256 x 256 GEMM alone takes 0.96 ms.
// Here a block of 24 rows goes through the whole network in L1/L2: each layer as register tiles of 8 rows x 32
// columns (AVX-512: 16 accumulators) or 6 rows x 16 columns (AVX2: 12), the bias preloaded into the accumulators,
// the weight streamed from its 16-column panels, LayerNorm + ELU by the AVX-512 / AVX2 row kernels of row_kernels.hpp, tanh last.

constexpr int64_t kF32BlockRows = 24;  // 3 tiles of 8 rows (AVX-512), 4 of 6 (AVX2)

struct NetF32 {
  int64_t obs_dim, hidden, layers, act_dim, out_cols;
  const float *w_in, *b_in, *ln_w, *ln_b;
  float eps;
  const float *w_hidden, *b_hidden, *w_out, *b_out;
};

// tanh(x) = sign(x) (-e) / (2 + e) with e = expm1(-2|x|), as v_tanh; NaN is returned as is.
inline float tanh_scalar(float x) {
  if (x != x) return x;
  const float e = expm1_nonpos(std::max(-2.0f * std::fabs(x), kExpLo));
  return std::copysign(-e / (2.0f + e), x);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")

// out[r, 16 p + j] = bias[16 p + j] + sum_k a[r, k] W[16 p + j, k] for r < MR and the NP panels at w (panel_stride
// floats apart; a panel is W's 16 columns as [k][16]).
template <int MR, int NP>
PGF_INL(PGF_TGT) void fma_tile_avx512(const float* a, int64_t lda, int64_t k, const float* w, int64_t panel_stride,
                                      const float* bias, float* out, int64_t ldo) {
  __m512 c[MR][NP];
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) c[r][p] = _mm512_loadu_ps(bias + 16 * p);
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 b[NP];
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) b[p] = _mm512_loadu_ps(w + p * panel_stride + kk * 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) c[r][p] = _mm512_fmadd_ps(av, b[p], c[r][p]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * ldo + 16 * p, c[r][p]);
}

struct F32Avx512 {
  // out [24, n16] = bias + a [24, k] (row stride lda) W^T, W [n16, k] as n16 / 16 panels [k][16].
  static void gemm(const float* a, int64_t lda, int64_t k, const float* w, int64_t n16, const float* bias,
                   float* out) {
    const int64_t panels = n16 / 16, ps = k * 16;
    int64_t p = 0;
    for (; p + 2 <= panels; p += 2)
      for (int64_t r = 0; r < kF32BlockRows; r += 8)
        fma_tile_avx512<8, 2>(a + r * lda, lda, k, w + p * ps, ps, bias + 16 * p, out + r * n16 + 16 * p, n16);
    for (; p < panels; ++p)
      for (int64_t r = 0; r < kF32BlockRows; r += 8)
        fma_tile_avx512<8, 1>(a + r * lda, lda, k, w + p * ps, ps, bias + 16 * p, out + r * n16 + 16 * p, n16);
  }
  static void norm_elu(const float* h, float* z, const float* w, const float* b, int64_t width, float eps,
                       float* buf) {
    for (int64_t r = 0; r < kF32BlockRows; r += kGroup)
      avx512_group<float, float, Act::Elu, false, kGroup>(h + r * width, z + r * width, width, width, w, b, width,
                                                         width, eps, buf);
  }
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <int MR>
__attribute__((always_inline)) inline void fma_tile_avx2(const float* a, int64_t lda, int64_t k, const float* w,
                                                         const float* bias, float* out, int64_t ldo) {
  __m256 c[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    c[r][0] = _mm256_loadu_ps(bias);
    c[r][1] = _mm256_loadu_ps(bias + 8);
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(w + kk * 16), b1 = _mm256_loadu_ps(w + kk * 16 + 8);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
      c[r][0] = _mm256_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(av, b1, c[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(out + r * ldo, c[r][0]);
    _mm256_storeu_ps(out + r * ldo + 8, c[r][1]);
  }
}

struct F32Avx2 {
  static void gemm(const float* a, int64_t lda, int64_t k, const float* w, int64_t n16, const float* bias,
                   float* out) {
    for (int64_t p = 0; p < n16 / 16; ++p)
      for (int64_t r = 0; r < kF32BlockRows; r += 6)
        fma_tile_avx2<6>(a + r * lda, lda, k, w + p * k * 16, bias + 16 * p, out + r * n16 + 16 * p, n16);
  }
  static void norm_elu(const float* h, float* z, const float* w, const float* b, int64_t width, float eps,
                       float* buf) {
    (void)buf;
    for (int64_t r = 0; r < kF32BlockRows; r += kGroup)
      avx2_group<Act::Elu, kGroup>(h + r * width, z + r * width, width, width, w, b, width, eps);
  }
};

#pragma GCC pop_options

// Blocks [b0, b1) of 24 rows through the fp32 network on the calling thread; padding rows are zero input.
template <class Ops>
void f32_run_blocks(const NetF32& net, const float* states, int64_t rows, int64_t b0, int64_t b1, float* mean) {
  if (b0 >= b1) return;
  const int64_t O = net.obs_dim, H = net.hidden, P = net.out_cols, R = kF32BlockRows;
  std::vector<float> xb(R * O + 16), hb(R * std::max(H, P) + 16), zb(R * H + 16), nb(kGroup * H + 16);
  float *x = align64(xb.data()), *h = align64(hb.data()), *z = align64(zb.data()), *norm = align64(nb.data());
  for (int64_t bl = b0; bl < b1; ++bl) {
    const int64_t r0 = bl * R, n = std::min(R, rows - r0);
    std::fill(x, x + R * O, 0.0f);
    std::copy(states + r0 * O, states + (r0 + n) * O, x);
    Ops::gemm(x, O, O, net.w_in, H, net.b_in, h);
    Ops::norm_elu(h, z, net.ln_w, net.ln_b, H, net.eps, norm);
    for (int64_t l = 1; l < net.layers; ++l) {
      Ops::gemm(z, H, H, net.w_hidden + (l - 1) * H * H, H, net.b_hidden + (l - 1) * H, h);
      Ops::norm_elu(h, z, net.ln_w + l * H, net.ln_b + l * H, H, net.eps, norm);
    }
    Ops::gemm(z, H, H, net.w_out, P, net.b_out, h);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < net.act_dim; ++c) mean[(r0 + i) * net.act_dim + c] = tanh_scalar(h[i * P + c]);
  }
}

#endif  // PGF_X86

}  // namespace

const char* actor_mean_f32_isa() {
#if PGF_X86
  if (cpu_has_avx512() && !std::getenv("PGF_CPU_OPS_NO_AVX512")) return "avx512";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "";
}

void actor_mean_f32(const float* states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers,
                    int64_t act_dim, const float* w_in, const float* b_in, const float* ln_w, const float* ln_b,
                    float eps, const float* w_hidden, const float* b_hidden, const float* w_out, const float* b_out,
                    float* mean, int threads, bool avx512) {
#if PGF_X86
  if (rows <= 0) return;
  const NetF32 net{obs_dim, hidden, layers, act_dim, (act_dim + 15) / 16 * 16, w_in, b_in, ln_w, ln_b, eps,
                   w_hidden, b_hidden, w_out, b_out};
  const int64_t blocks = (rows + kF32BlockRows - 1) / kF32BlockRows;
  const int nt = rows < kSerialRows ? 1 : static_cast<int>(std::min<int64_t>(std::max(1, threads), blocks));
  for_block_ranges(blocks, nt, [&](int64_t b0, int64_t b1) {
    if (avx512) f32_run_blocks<F32Avx512>(net, states, rows, b0, b1, mean);
    else f32_run_blocks<F32Avx2>(net, states, rows, b0, b1, mean);
  });
#else
  (void)states, (void)rows, (void)obs_dim, (void)hidden, (void)layers, (void)act_dim, (void)w_in, (void)b_in;
  (void)ln_w, (void)ln_b, (void)eps, (void)w_hidden, (void)b_hidden, (void)w_out, (void)b_out, (void)mean,
      (void)threads, (void)avx512;
#endif
}

void actor_mean(const float* states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers, int64_t act_dim,
                const uint16_t* w_in, const float* b_in, const float* ln_w, const float* ln_b, float eps,
                const uint16_t* w_hidden, const float* b_hidden, const uint16_t* w_out, const float* b_out,
                float* mean, int threads, Bf16Isa isa) {
#if PGF_X86
  if (rows <= 0) return;
  const int64_t in_cols = (obs_dim + 31) / 32 * 32, out_cols = (act_dim + 15) / 16 * 16;
  const Net net{obs_dim, in_cols, hidden, layers, act_dim, out_cols, w_in, b_in, ln_w, ln_b, eps, w_hidden,
                b_hidden, w_out, b_out};
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int nt = rows < kSerialRows ? 1 : static_cast<int>(std::min<int64_t>(std::max(1, threads), blocks));
  for_block_ranges(blocks, nt, [&](int64_t b0, int64_t b1) {
    with_bf16_gemm(isa, [&](auto gemm) { run_blocks<decltype(gemm)>(net, states, rows, b0, b1, mean); });
  });
#else
  (void)states, (void)rows, (void)obs_dim, (void)hidden, (void)layers, (void)act_dim, (void)w_in, (void)b_in;
  (void)ln_w, (void)ln_b, (void)eps, (void)w_hidden, (void)b_hidden, (void)w_out, (void)b_out, (void)mean,
      (void)threads, (void)isa;
#endif
}

}  // namespace pgf_ops
