// The residual trunk in one fused pass. See residual_mlp.hpp.
//
// Why: run as torch ops, each of the trunk's 8 GEMMs is one oneDNN call from Python and each LayerNorm + ReLU one
// pass of inductor's code over [B, width]; at the paper's Hopper shapes (width 1024, 6 blocks, B = 256) the
// LayerNorms and the Python around the GEMMs cost about 0.66 ms per reverse step next to the GEMMs' 1.6 ms on a
// 2-core Sapphire Rapids. Here each thread takes a contiguous range of rows and runs it, a chunk at a time, through
// every layer with no barrier between layers: the GEMM (AMX tiles or AVX-512 BF16, bf16_gemm.hpp) panel-outer over
// the chunk's 32-row blocks, the residual add in the accumulators, the bias and LayerNorm + ReLU (row_kernels.hpp)
// on rows still in L2, writing the bf16 operand of the next GEMM.
#include "residual_mlp.hpp"

#include "bf16_gemm.hpp"
#include "row_kernels.hpp"

#include <algorithm>
#include <vector>

namespace pgf_ops {
namespace {

constexpr int64_t kBlock = 32;       // rows per GEMM block (two 16-row AMX tiles)
constexpr int64_t kChunkRows = 128;  // rows a thread carries through all layers at once (its h and z stay in L2)

#if PGF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,amx-tile,amx-bf16")

struct Trunk {
  int64_t in_dim, in_cols, width, depth, out_dim, out_cols;
  const uint16_t* w_in;
  const float *b_in, *ln_w, *ln_b;
  float eps;
  const uint16_t* w_blocks;
  const float* b_blocks;
  const uint16_t* w_out;
  const float* b_out;
};

struct Scratch {  // one thread's, 64-byte aligned, kChunkRows rows each
  uint16_t *x, *z;  // [rows, in_cols], [rows, width] bf16
  float *h, *o, *norm;  // [rows, width], [rows, out_cols] fp32; kGroup rows for the LayerNorm kernel
};

void add_bias(float* h, int64_t rows, const float* b, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; c += 16) {
      float* p = h + r * width + c;
      _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(b + c)));
    }
}

// Rows [r0, r0 + n) of x through the trunk into out; n <= kChunkRows, the padding up to whole blocks is zero input.
template <class Gemm>
void chunk(const Trunk& t, const uint16_t* x, int64_t r0, int64_t n, uint16_t* out, const Scratch& sc) {
  const int64_t W = t.width, K = t.in_cols, rows = (n + kBlock - 1) / kBlock * kBlock;
  std::fill(sc.x, sc.x + rows * K, uint16_t(0));
  for (int64_t i = 0; i < n; ++i) std::copy(x + (r0 + i) * t.in_dim, x + (r0 + i + 1) * t.in_dim, sc.x + i * K);
  Gemm::run(sc.x, rows, K, t.w_in, W, sc.h, t.b_in, false, (t.in_dim + 1) / 2 * 2);  // columns >= in_dim zero
  for (int64_t k = 0; k < t.depth; ++k) {
    norm_act_rows<Act::Relu>(sc.h, sc.z, rows, t.ln_w + k * W, t.ln_b + k * W, W, t.eps, sc.norm);
    const float* b_k = t.b_blocks + k * W;
    if constexpr (Gemm::kBiasWithAccumulate) {
      Gemm::run(sc.z, rows, W, t.w_blocks + k * W * W, W, sc.h, b_k, true);  // h += b_k + W_k z: the residual add
    } else {
      Gemm::run(sc.z, rows, W, t.w_blocks + k * W * W, W, sc.h, nullptr, true);
      add_bias(sc.h, rows, b_k, W);
    }
  }
  norm_act_rows<Act::Relu>(sc.h, sc.z, rows, t.ln_w + t.depth * W, t.ln_b + t.depth * W, W, t.eps, sc.norm);
  Gemm::run(sc.z, rows, W, t.w_out, t.out_cols, sc.o, t.b_out, false);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < t.out_dim; c += 16) {
      const __mmask16 m = lanes(t.out_dim - c);
      const __m512 v = _mm512_maskz_loadu_ps(m, sc.o + i * t.out_cols + c);
      Store<uint16_t, true>::run(out + (r0 + i) * t.out_dim + c, m, v);
    }
}

// Rows [r_lo, r_hi) on the calling thread, kChunkRows at a time (its own scratch, and tile configuration for AMX).
template <class Gemm>
void run_rows(const Trunk& t, const uint16_t* x, int64_t r_lo, int64_t r_hi, uint16_t* out) {
  if (r_lo >= r_hi) return;
  const int64_t C = kChunkRows;
  std::vector<uint16_t> xb(C * t.in_cols + 32), zb(C * t.width + 32);
  std::vector<float> hb(C * t.width + 16), ob(C * t.out_cols + 16), nb(kGroup * t.width + 16);
  const Scratch sc{align64(xb.data()), align64(zb.data()), align64(hb.data()), align64(ob.data()),
                   align64(nb.data())};
  Gemm::begin();
  for (int64_t r0 = r_lo; r0 < r_hi; r0 += C) chunk<Gemm>(t, x, r0, std::min(C, r_hi - r0), out, sc);
  Gemm::end();
}

// Row blocks [b0, b1) of one bf16_linear call on the calling thread.
template <class Gemm>
void linear_blocks(const uint16_t* a, int64_t b0, int64_t b1, int64_t k, const uint16_t* w, int64_t n,
                   const float* bias, float* out) {
  if (b1 <= b0) return;
  Gemm::begin();
  Gemm::run(a + b0 * kBlock * k, (b1 - b0) * kBlock, k, w, n, out + b0 * kBlock * n, bias, false);
  Gemm::end();
}

#pragma GCC pop_options
#endif  // PGF_X86

}  // namespace

void residual_mlp(const uint16_t* x, int64_t rows, int64_t in_dim, int64_t width, int64_t depth, int64_t out_dim,
                  const uint16_t* w_in, const float* b_in, const float* ln_w, const float* ln_b, float eps,
                  const uint16_t* w_blocks, const float* b_blocks, const uint16_t* w_out, const float* b_out,
                  uint16_t* out, int threads, Bf16Isa isa) {
#if PGF_X86
  if (rows <= 0) return;
  const Trunk t{in_dim, (in_dim + 31) / 32 * 32, width, depth, out_dim, (out_dim + 15) / 16 * 16, w_in, b_in,
                ln_w, ln_b, eps, w_blocks, b_blocks, w_out, b_out};
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  const int nt = static_cast<int>(std::min<int64_t>(std::max(1, threads), blocks));
  for_block_ranges(blocks, nt, [&](int64_t b0, int64_t b1) {
    const int64_t r_lo = std::min(rows, b0 * kBlock), r_hi = std::min(rows, b1 * kBlock);
    with_bf16_gemm(isa, [&](auto gemm) { run_rows<decltype(gemm)>(t, x, r_lo, r_hi, out); });
  });
#else
  (void)x, (void)rows, (void)in_dim, (void)width, (void)depth, (void)out_dim, (void)w_in, (void)b_in, (void)ln_w;
  (void)ln_b, (void)eps, (void)w_blocks, (void)b_blocks, (void)w_out, (void)b_out, (void)out, (void)threads, (void)isa;
#endif
}

void bf16_linear(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, const float* bias,
                 float* out, int threads, Bf16Isa isa) {
#if PGF_X86
  const int64_t blocks = rows / kBlock;
  const int nt = static_cast<int>(std::min<int64_t>(std::max(1, threads), std::max<int64_t>(blocks, 1)));
  for_block_ranges(blocks, nt, [&](int64_t b0, int64_t b1) {
    with_bf16_gemm(isa, [&](auto gemm) { linear_blocks<decltype(gemm)>(a, b0, b1, k, w, n, bias, out); });
  });
#else
  (void)a, (void)rows, (void)k, (void)w, (void)n, (void)bias, (void)out, (void)threads, (void)isa;
#endif
}

}  // namespace pgf_ops
