// Fused LayerNorm + activation, CPU. See layer_norm_act.hpp.
//
// Per row (a row of 256..1024 floats fits in L1): load once into an fp32 scratch row (bf16 -> fp32 is a 16-bit
// shift) while summing; mean; second pass over the scratch row for the biased variance (two-pass, as torch: stable
// for rows with a large mean and a small spread); rstd = 1 / sqrt(var + eps); then (x - mean) * rstd * w + b, the
// activation, and the store (fp32 -> bf16 rounds to nearest even, NaN -> 0x7FC0, like c10::BFloat16).
// ELU (alpha 1) = x > 0 ? x : expm1(x), with a Cephes-style range-reduced expm1: x = n ln2 + r, |r| <= ln2/2,
// e^r - 1 = r + r^2 P(r) (P of degree 4, see kP0), expm1(x) = 2^n (e^r - 1) + (2^n - 1). For n = 0 this is
// e^r - 1 itself, so small |x| keep their relative accuracy (no 1 - 1 cancellation).
//
// Two implementations: AVX-512 intrinsics (F+BW+VL, runtime-checked) and portable C++ that GCC auto-vectorises,
// cloned for AVX2 and the baseline ISA (target_clones). Rows are independent, so any thread count gives the same
// bits; inside one implementation the reduction order is fixed.
#include "layer_norm_act.hpp"
#include "row_kernels.hpp"

#include <algorithm>
#include <vector>

namespace pgf_ops {
namespace {

// Below this many elements the whole call runs on the calling thread (waking workers costs more than it saves).
constexpr int64_t kSerialElems = 16384;


template <typename T, Act A>
inline void generic_rows_impl(const void* xv, void* yv, const float* w, const float* b, int64_t r0, int64_t r1,
                              int64_t width, int64_t xs, int64_t ys, float eps, float* buf) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  for (int64_t r = r0; r < r1; ++r) generic_row<T, A>(x + r * xs, y + r * ys, w, b, width, eps, buf);
}

#if PGF_X86 && defined(__GNUC__) && !defined(__clang__)
#define PGF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PGF_CLONES
#endif

PGF_CLONES
void generic_rows(const void* x, void* y, const float* w, const float* b, int64_t r0, int64_t r1, int64_t width,
                  int64_t xs, int64_t ys, DType dt, float eps, Act act, float* buf) {
#define PGF_CASE(T, A) generic_rows_impl<T, A>(x, y, w, b, r0, r1, width, xs, ys, eps, buf)
  if (dt == DType::BF16) {
    if (act == Act::Elu) PGF_CASE(uint16_t, Act::Elu);
    else if (act == Act::Relu) PGF_CASE(uint16_t, Act::Relu);
    else PGF_CASE(uint16_t, Act::None);
  } else {
    if (act == Act::Elu) PGF_CASE(float, Act::Elu);
    else if (act == Act::Relu) PGF_CASE(float, Act::Relu);
    else PGF_CASE(float, Act::None);
  }
#undef PGF_CASE
}

#if PGF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")

template <typename T, Act A, bool NativeBf16>
PGF_INL(PGF_TGT) void avx512_rows_body(const void* xv, void* yv, const float* w, const float* b, int64_t r0,
                                       int64_t r1, int64_t width, int64_t xs, int64_t ys, float eps, float* buf) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t padded = (width + 15) & ~int64_t(15);
  int64_t r = r0;
  for (; r + kGroup <= r1; r += kGroup)
    avx512_group<T, T, A, NativeBf16, kGroup>(x + r * xs, y + r * ys, xs, ys, w, b, width, padded, eps, buf);
  for (; r < r1; ++r)
    avx512_group<T, T, A, NativeBf16, 1>(x + r * xs, y + r * ys, xs, ys, w, b, width, padded, eps, buf);
}

template <typename T, Act A>
void avx512_rows_impl(const void* x, void* y, const float* w, const float* b, int64_t r0, int64_t r1, int64_t width,
                      int64_t xs, int64_t ys, float eps, float* buf) {
  avx512_rows_body<T, A, false>(x, y, w, b, r0, r1, width, xs, ys, eps, buf);
}

template <Act A>
void avx512bf16_rows_impl(const void* x, void* y, const float* w, const float* b, int64_t r0, int64_t r1,
                          int64_t width, int64_t xs, int64_t ys, float eps, float* buf) {
  avx512_rows_body<uint16_t, A, true>(x, y, w, b, r0, r1, width, xs, ys, eps, buf);
}

#pragma GCC pop_options

void avx512_rows(const void* x, void* y, const float* w, const float* b, int64_t r0, int64_t r1, int64_t width,
                 int64_t xs, int64_t ys, DType dt, float eps, Act act, float* buf) {
#define PGF_CASE(A)                                                                              \
  do {                                                                                           \
    if (dt == DType::F32) avx512_rows_impl<float, A>(x, y, w, b, r0, r1, width, xs, ys, eps, buf); \
    else if (cpu_has_avx512bf16()) avx512bf16_rows_impl<A>(x, y, w, b, r0, r1, width, xs, ys, eps, buf); \
    else avx512_rows_impl<uint16_t, A>(x, y, w, b, r0, r1, width, xs, ys, eps, buf);            \
  } while (0)
  if (act == Act::Elu) PGF_CASE(Act::Elu);
  else if (act == Act::Relu) PGF_CASE(Act::Relu);
  else PGF_CASE(Act::None);
#undef PGF_CASE
}
#endif  // PGF_X86

#if PGF_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <Act A>
void avx2_rows_impl(const float* x, float* y, const float* w, const float* b, int64_t r0, int64_t r1,
                    int64_t width, int64_t xs, int64_t ys, float eps) {
  int64_t r = r0;
  for (; r + kGroup <= r1; r += kGroup) avx2_group<A, kGroup>(x + r * xs, y + r * ys, xs, ys, w, b, width, eps);
  for (; r < r1; ++r) avx2_group<A, 1>(x + r * xs, y + r * ys, xs, ys, w, b, width, eps);
}

#pragma GCC pop_options

// fp32 rows of a width that is a multiple of 8 on an AVX2 + FMA CPU without AVX-512 (2,560 x 256 with ELU, 2
// threads, Sapphire Rapids with AVX-512 off: 0.39 ms portable, 0.17 ms here).
void avx2_rows(const void* x, void* y, const float* w, const float* b, int64_t r0, int64_t r1, int64_t width,
               int64_t xs, int64_t ys, float eps, Act act) {
  const float* xf = static_cast<const float*>(x);
  float* yf = static_cast<float*>(y);
  if (act == Act::Elu) avx2_rows_impl<Act::Elu>(xf, yf, w, b, r0, r1, width, xs, ys, eps);
  else if (act == Act::Relu) avx2_rows_impl<Act::Relu>(xf, yf, w, b, r0, r1, width, xs, ys, eps);
  else avx2_rows_impl<Act::None>(xf, yf, w, b, r0, r1, width, xs, ys, eps);
}
#endif  // PGF_X86

bool use_avx2() {
#if PGF_X86
  static const bool on = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return on;
#else
  return false;
#endif
}

bool use_avx512() {
#if PGF_X86
  static const bool on = cpu_has_avx512() && !std::getenv("PGF_CPU_OPS_NO_AVX512");
  return on;
#else
  return false;
#endif
}

}  // namespace

const char* layer_norm_act_isa() {
  if (use_avx512()) return "avx512";
  if (use_avx2()) return "avx2";  // fp32 rows of a width that is a multiple of 8; the rest portable (AVX2 clone)
  return "generic";
}

void layer_norm_act(const void* x, void* y, const void* w, const void* b, int64_t rows, int64_t width,
                    int64_t x_row_stride, int64_t y_row_stride, DType dt, float eps, Act act, int threads) {
  if (rows <= 0 || width <= 0) return;
  const bool vec = use_avx512(), avx2 = !vec && use_avx2() && dt == DType::F32 && width % 8 == 0;
  const int64_t padded = (width + 15) & ~int64_t(15);
  // fp32 copies of the affine parameters, converted once per call and shared by all threads, padded to whole
  // vectors; ones / zeros when absent (v * 1 + 0 is v), so both paths always apply them.
  std::vector<float> wf(padded, 1.0f), bf(padded, 0.0f);
  for (int64_t i = 0; w && i < width; ++i)
    wf[i] = dt == DType::BF16 ? bf16_to_f32(static_cast<const uint16_t*>(w)[i]) : static_cast<const float*>(w)[i];
  for (int64_t i = 0; b && i < width; ++i)
    bf[i] = dt == DType::BF16 ? bf16_to_f32(static_cast<const uint16_t*>(b)[i]) : static_cast<const float*>(b)[i];
  const float* wp = wf.data();
  const float* bp = bf.data();

  auto run = [&](int64_t r0, int64_t r1) {
    // 64-byte aligned scratch row, padded to whole vectors.
    std::vector<float> storage(padded * 4 + 16);  // kGroup scratch rows
    float* buf = align64(storage.data());
#if PGF_X86
    if (vec) {
      avx512_rows(x, y, wp, bp, r0, r1, width, x_row_stride, y_row_stride, dt, eps, act, buf);
      return;
    }
    if (avx2) {
      avx2_rows(x, y, wp, bp, r0, r1, width, x_row_stride, y_row_stride, eps, act);
      return;
    }
#endif
    generic_rows(x, y, wp, bp, r0, r1, width, x_row_stride, y_row_stride, dt, eps, act, buf);
  };

  int nt = std::max(1, threads);
  if (rows * width < kSerialElems || rows < 2) nt = 1;
  nt = static_cast<int>(std::min<int64_t>(nt, rows));
  for_block_ranges(rows, nt, run);  // thread t owns rows [t rows / n, (t + 1) rows / n)
}

}  // namespace pgf_ops
