// Row-level math shared by the fused CPU kernels (layer_norm_act.cpp, actor_mean.cpp, residual_mlp.cpp): bf16
// conversion, the range-reduced expm1 of ELU, the portable and the AVX-512 LayerNorm + activation, and the split of
// rows over OpenMP threads. Everything sits in
// an anonymous namespace: each kernel file compiles its own copy (no cross-file symbols, no ODR concerns).
#pragma once

#include "layer_norm_act.hpp"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PGF_X86 1
#include <immintrin.h>
#else
#define PGF_X86 0
#endif

namespace pgf_ops {
namespace {

// Range reduction as Cephes expf (ln2 split in a short high part and a low part).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLn2 = 0.693147180559945309f;  // rounded to fp32 (AVX-512 path: one FMA, see v_elu)
// e^r - 1 = r + r^2 P(r) on |r| <= ln2/2, P of degree 4: a near-minimax fit of the relative error (iteratively
// reweighted least squares on Chebyshev nodes, coefficients rounded to fp32); about 1 fp32 ulp over the interval
// (Cephes expf's degree-5 P is more than fp32 needs; one FMA less per vector).
constexpr float kP0 = 0.0013882522471249104f, kP1 = 0.00836651399731636f, kP2 = 0.04166720062494278f,
                kP3 = 0.1666654348373413f, kP4 = 0.4999999701976776f;
constexpr float kExpLo = -88.0f;  // expm1(x) rounds to -1 below this; also keeps 2^n a normal or zero float


inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN -> canonical quiet NaN, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}


// p rounded up to the next 64-byte boundary (scratch buffers allocated 64 bytes long, for aligned vector access).
template <typename T>
inline T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

inline float expm1_nonpos(float t) {  // t in [kExpLo, 0]; branch-free so loops over it vectorise
  // n = round(t / ln2) with the 1.5 * 2^23 trick; with 127 added, the low mantissa bits of nf hold the biased
  // exponent n + 127 in [0, 127], so (bits << 23) is 2^n as a float (0 for n = -127: fine, expm1 = -1 there).
  const float magic = 12582912.0f + 127.0f;
  const float nf = t * kLog2e + magic;
  const float n = nf - magic;
  float r = t - n * kLn2Hi;  // Cephes split: n * kLn2Hi is exact (kLn2Hi has 9 significant bits)
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  const float q = p * (r * r) + r;  // e^r - 1
  uint32_t bits;
  std::memcpy(&bits, &nf, 4);
  bits <<= 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return q * s + (s - 1.0f);
}


// The portable LayerNorm + activation of one row (layer_norm_act's fallback, the fp32 actor's AVX2 path), which
// GCC vectorises for the ISA of the function it is inlined into. Branch-free, so the loops vectorise. ELU as the AVX-512 path: t = -min(|v|, 88), max(expm1(t), v) (for
// v <= 0, expm1(v) >= v; for v > 0, expm1(t) < 0 < v); a NaN v fails both comparisons and is returned as is.
template <Act A>
inline float act_scalar(float v) {
  if constexpr (A == Act::Relu) {
    return v < 0.0f ? 0.0f : v;  // NaN is not < 0: propagates, like torch.relu
  } else if constexpr (A == Act::Elu) {
    const float a = std::fabs(v);
    const float t = -(a < -kExpLo ? a : -kExpLo);
    const float e = expm1_nonpos(t);
    return e > v ? e : v;
  } else {
    return v;
  }
}

template <typename T>
inline float load_scalar(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_f32(p[i]);
  else return p[i];
}

template <typename T>
inline void store_scalar(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, uint16_t>) p[i] = f32_to_bf16(v);
  else p[i] = v;
}

template <typename T, Act A>
inline void generic_row(const T* __restrict x, T* __restrict y, const float* __restrict w, const float* __restrict b,
                        int64_t width, float eps, float* __restrict buf) {
  float sum = 0.0f;
  for (int64_t i = 0; i < width; ++i) buf[i] = load_scalar(x, i);
  // 8 partial sums in a fixed order (vectorisable without -ffast-math reassociation).
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= width; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += buf[i + k];
  for (int k = 0; k < 8; ++k) sum += part[k];
  for (; i < width; ++i) sum += buf[i];
  const float mean = sum / static_cast<float>(width);
  float vpart[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float var = 0.0f;
  i = 0;
  for (; i + 8 <= width; i += 8)
    for (int k = 0; k < 8; ++k) {
      float d = buf[i + k] - mean;
      vpart[k] += d * d;
    }
  for (int k = 0; k < 8; ++k) var += vpart[k];
  for (; i < width; ++i) {
    float d = buf[i] - mean;
    var += d * d;
  }
  var /= static_cast<float>(width);
  const float rstd = 1.0f / std::sqrt(var + eps);
  for (int64_t j = 0; j < width; ++j) buf[j] = act_scalar<A>((buf[j] - mean) * rstd * w[j] + b[j]);
  for (int64_t j = 0; j < width; ++j) store_scalar(y, j, buf[j]);
}


// fn(b0, b1) on nt OpenMP threads (the calling thread alone when nt <= 1), thread i of n taking the contiguous
// range [blocks i / n, blocks (i + 1) / n) of `blocks` row blocks: each thread keeps its rows for a whole call.
template <typename Fn>
inline void for_block_ranges(int64_t blocks, int nt, Fn&& fn) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int n = omp_get_num_threads(), i = omp_get_thread_num();
      fn(blocks * i / n, blocks * (i + 1) / n);
    }
    return;
  }
#endif
  fn(int64_t(0), blocks);
}

#if PGF_X86
// ---- AVX2 + FMA: LayerNorm + activation of fp32 rows, 8 lanes (the CPUs without AVX-512) ----
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// expm1(t) for t in [kExpLo, 0]: v_expm1_nonpos below in 8 lanes (the same polynomial and range reduction).
__attribute__((always_inline)) inline __m256 v8_expm1_nonpos(__m256 t) {
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 nf = _mm256_fmadd_ps(t, _mm256_set1_ps(kLog2e), magic);
  const __m256 n = _mm256_sub_ps(nf, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), t);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  const __m256 q = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(nf), 23));
  return _mm256_fmadd_ps(q, s, _mm256_sub_ps(s, _mm256_set1_ps(1.0f)));
}

// As v_act: ELU(v) = max(expm1(-min(|v|, 88)), v), ReLU = max(0, v); MAXPS returns its second operand (v) when
// either is NaN, so NaN propagates.
template <Act A>
__attribute__((always_inline)) inline __m256 v8_act(__m256 v) {
  if constexpr (A == Act::Relu) {
    return _mm256_max_ps(_mm256_setzero_ps(), v);
  } else if constexpr (A == Act::Elu) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 t = _mm256_or_ps(_mm256_min_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(-kExpLo)), sign);
    return _mm256_max_ps(v8_expm1_nonpos(t), v);
  } else {
    return v;
  }
}

__attribute__((always_inline)) inline float v8_sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// G fp32 rows of `width` (a multiple of 8) at once, interleaved as avx512_group (two passes for mean and variance,
// straight from x: no scratch row for fp32 input), y = act((x - mean) rstd w + b).
template <Act A, int G>
__attribute__((always_inline)) inline void avx2_group(const float* __restrict x, float* __restrict y, int64_t xs,
                                                      int64_t ys, const float* __restrict w,
                                                      const float* __restrict b, int64_t width, float eps) {
  const float inv_w = 1.0f / static_cast<float>(width);
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= width; i += 16)
    for (int g = 0; g < G; ++g) {
      acc[g][0] = _mm256_add_ps(acc[g][0], _mm256_loadu_ps(x + g * xs + i));
      acc[g][1] = _mm256_add_ps(acc[g][1], _mm256_loadu_ps(x + g * xs + i + 8));
    }
  for (; i < width; i += 8)
    for (int g = 0; g < G; ++g) acc[g][0] = _mm256_add_ps(acc[g][0], _mm256_loadu_ps(x + g * xs + i));
  __m256 vm[G];
  for (int g = 0; g < G; ++g) {
    vm[g] = _mm256_set1_ps(v8_sum(_mm256_add_ps(acc[g][0], acc[g][1])) * inv_w);
    acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  }
  for (i = 0; i + 16 <= width; i += 16)
    for (int g = 0; g < G; ++g) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + g * xs + i), vm[g]);
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + g * xs + i + 8), vm[g]);
      acc[g][0] = _mm256_fmadd_ps(d0, d0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(d1, d1, acc[g][1]);
    }
  for (; i < width; i += 8)
    for (int g = 0; g < G; ++g) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + g * xs + i), vm[g]);
      acc[g][0] = _mm256_fmadd_ps(d0, d0, acc[g][0]);
    }
  __m256 vr[G];
  for (int g = 0; g < G; ++g) {
    const float var = v8_sum(_mm256_add_ps(acc[g][0], acc[g][1])) * inv_w;
    vr[g] = _mm256_set1_ps(1.0f / std::sqrt(var + eps));
  }
  for (i = 0; i < width; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i), bv = _mm256_loadu_ps(b + i);
    for (int g = 0; g < G; ++g) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + g * xs + i), vm[g]);
      _mm256_storeu_ps(y + g * ys + i, v8_act<A>(_mm256_fmadd_ps(_mm256_mul_ps(d, vr[g]), wv, bv)));
    }
  }
}

#pragma GCC pop_options
#endif  // PGF_X86

#if PGF_X86
// The whole section is compiled for AVX-512 (+BF16: only Store<uint16_t, true> uses VCVTNEPS2BF16, and it only runs
// where cpu_has_avx512bf16()); nothing here runs unless cpu_has_avx512() said so at run time.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")
#define PGF_INL(tgt) __attribute__((always_inline)) inline

// bf16 -> fp32: bf16 k goes to the high half of 32-bit lane k, the low half is zeroed: one VPERMW with a zeroing
// mask (instead of a zero-extension and a shift).
template <typename T>
PGF_INL(PGF_TGT) __m512 v_load(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0,
                                         3, 0, 2, 0, 1, 0, 0, 0);
    const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(static_cast<__mmask32>(0xAAAAAAAAu), idx, _mm512_castsi256_si512(h)));
  } else {
    return _mm512_maskz_loadu_ps(m, p);
  }
}

// fp32 -> bf16 in integer arithmetic, exactly c10::BFloat16's round_to_nearest_even (NaN -> 0x7FC0).
PGF_INL(PGF_TGT) __m256i v_bf16_int(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Output conversion + store. Native: VCVTNEPS2BF16 (AVX512-BF16) also rounds to nearest even, but flushes
// denormal inputs to zero, so a vector holding a denormal takes the integer path (bit-identical to torch for every
// finite value; NaN stays NaN, with the input's sign and payload instead of 0x7FC0).
template <typename T, bool NativeBf16>
struct Store;

template <bool NativeBf16>
struct Store<float, NativeBf16> {
  PGF_INL(PGF_TGT) static void run(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};

template <>
struct Store<uint16_t, false> {
  PGF_INL(PGF_TGT) static void run(uint16_t* p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, v_bf16_int(v));
  }
};

template <>
struct Store<uint16_t, true> {
  PGF_INL(PGF_TGT_BF16) static void run(uint16_t* p, __mmask16 m, __m512 v) {
    __m256i h;
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0))  // 0x20: denormal
      h = v_bf16_int(v);
    else
      h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    _mm256_mask_storeu_epi16(p, m, h);
  }
};

// expm1(t) for t in [kExpLo, 0] (the polynomial of expm1_nonpos, vectorised).
PGF_INL(PGF_TGT) __m512 v_expm1_nonpos(__m512 t) {
  // n = round(t / ln2) with the 1.5 * 2^23 trick; with 127 added, the low mantissa bits of nf hold the biased
  // exponent n + 127 in [0, 127], so (bits << 23) is 2^n as a float (0 for n = -127: fine, expm1 = -1 there).
  const __m512 magic = _mm512_set1_ps(12582912.0f + 127.0f);
  const __m512 nf = _mm512_fmadd_ps(t, _mm512_set1_ps(kLog2e), magic);
  const __m512 n = _mm512_sub_ps(nf, magic);
  // r = t - n ln2 in one FMA with ln2 rounded to fp32 (the Cephes hi/lo split needs two): the product is exact
  // inside the FMA, so r is off by n (ln2 - fl(ln2)) = n * 1.9e-9 at most, which moves 2^n e^r by a relative
  // 1.9e-9 |n| 2^n <= 1e-9 of the result's magnitude (n <= 0 here): far below an fp32 ulp.
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), t);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  const __m512 q = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);  // e^r - 1
  const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(nf), 23));  // 2^n
  return _mm512_fmadd_ps(q, s, _mm512_sub_ps(s, _mm512_set1_ps(1.0f)));  // 2^n (e^r - 1) + 2^n - 1
}

// ELU(v) = max(expm1(t), v) with t = -min(|v|, 88) (one VRANGEPS: min by magnitude, sign bit set): for v <= 0,
// t = max(v, -88) and expm1(v) >= v (so the max is expm1(v); where rounding put the polynomial a hair below v, v
// itself is the closer value); for v > 0, expm1(t) < 0 < v. A NaN v is returned as is (MAXPS returns its second
// operand when either is NaN).
PGF_INL(PGF_TGT) __m512 v_elu(__m512 v) {
  const __m512 t = _mm512_range_ps(v, _mm512_set1_ps(-kExpLo), 0x0E);  // imm: [1:0]=10 min-abs, [3:2]=11 sign set
  return _mm512_max_ps(v_expm1_nonpos(t), v);
}

template <Act A>
PGF_INL(PGF_TGT) __m512 v_act(__m512 v) {
  if constexpr (A == Act::Relu) return _mm512_max_ps(_mm512_setzero_ps(), v);  // NaN v: returns v
  else if constexpr (A == Act::Elu) return v_elu(v);
  else return v;
}

// G rows at once (x in TIn, y in TOut: fp32 or bf16), interleaved vector by vector, so the per-row dependency
// chains (horizontal sums, sqrt, divide) of neighbouring rows overlap. buf holds G scratch rows of `padded` floats
// (64-byte aligned). w and b are padded fp32 rows (ones / zeros when absent: v * 1 + 0 is v).
template <typename TIn, typename TOut, Act A, bool NativeBf16, int G>
PGF_INL(PGF_TGT) void avx512_group(const TIn* __restrict x, TOut* __restrict y, int64_t xs, int64_t ys,
                                   const float* __restrict w, const float* __restrict b, int64_t width,
                                   int64_t padded, float eps, float* __restrict buf) {
  const int64_t full = width & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (width - full)) - 1u);
  const float inv_w = 1.0f / static_cast<float>(width);
  __m512 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  // Pass 1: load (masked-off tail lanes are 0), keep in the scratch row, sum.
  int64_t i = 0;
  for (; i + 32 <= full; i += 32)
    for (int g = 0; g < G; ++g) {
      __m512 v0 = v_load(x + g * xs + i, 0xFFFF), v1 = v_load(x + g * xs + i + 16, 0xFFFF);
      _mm512_store_ps(buf + g * padded + i, v0);
      _mm512_store_ps(buf + g * padded + i + 16, v1);
      acc[g][0] = _mm512_add_ps(acc[g][0], v0);
      acc[g][1] = _mm512_add_ps(acc[g][1], v1);
    }
  for (; i < padded; i += 16) {
    const __mmask16 m = i < full ? static_cast<__mmask16>(0xFFFF) : tail;
    for (int g = 0; g < G; ++g) {
      __m512 v0 = v_load(x + g * xs + i, m);
      _mm512_store_ps(buf + g * padded + i, v0);
      acc[g][0] = _mm512_add_ps(acc[g][0], v0);
    }
  }
  __m512 vm[G];
  for (int g = 0; g < G; ++g) {
    vm[g] = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(acc[g][0], acc[g][1])) * inv_w);
    acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  }
  // Pass 2: d = x - mean, kept in the scratch row (tail lanes 0), and the sum of squares.
  i = 0;
  for (; i + 32 <= full; i += 32)
    for (int g = 0; g < G; ++g) {
      __m512 d0 = _mm512_sub_ps(_mm512_load_ps(buf + g * padded + i), vm[g]);
      __m512 d1 = _mm512_sub_ps(_mm512_load_ps(buf + g * padded + i + 16), vm[g]);
      _mm512_store_ps(buf + g * padded + i, d0);
      _mm512_store_ps(buf + g * padded + i + 16, d1);
      acc[g][0] = _mm512_fmadd_ps(d0, d0, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(d1, d1, acc[g][1]);
    }
  for (; i < padded; i += 16) {
    const __mmask16 m = i < full ? static_cast<__mmask16>(0xFFFF) : tail;
    for (int g = 0; g < G; ++g) {
      __m512 d0 = _mm512_maskz_sub_ps(m, _mm512_load_ps(buf + g * padded + i), vm[g]);
      _mm512_store_ps(buf + g * padded + i, d0);
      acc[g][0] = _mm512_fmadd_ps(d0, d0, acc[g][0]);
    }
  }
  __m512 vr[G];
  for (int g = 0; g < G; ++g) {
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(acc[g][0], acc[g][1])) * inv_w;
    vr[g] = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
  }
  // Pass 3: scale, affine, activation, store.
  for (i = 0; i < padded; i += 16) {
    const __mmask16 m = i < full ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 wv = _mm512_loadu_ps(w + i), bv = _mm512_loadu_ps(b + i);
    for (int g = 0; g < G; ++g) {
      __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(buf + g * padded + i), vr[g]), wv, bv);
      Store<TOut, NativeBf16>::run(y + g * ys + i, m, v_act<A>(v));
    }
  }
}

constexpr int kGroup = 4;

// Mask of the first min(remaining, 16) lanes.
PGF_INL(PGF_TGT) __mmask16 lanes(int64_t remaining) {
  return static_cast<__mmask16>(remaining >= 16 ? 0xFFFFu : (1u << remaining) - 1u);
}

// z = bf16(act(LN(h))) for `rows` (a multiple of kGroup) contiguous fp32 rows of `width` (a multiple of 16): the fused
// kernels' step from one GEMM's fp32 output to the next GEMM's bf16 operand.
template <Act A>
PGF_INL(PGF_TGT) void norm_act_rows(const float* h, uint16_t* z, int64_t rows, const float* w, const float* b,
                                    int64_t width, float eps, float* scratch) {
  for (int64_t r = 0; r < rows; r += kGroup)
    avx512_group<float, uint16_t, A, true, kGroup>(h + r * width, z + r * width, width, width, w, b, width, width,
                                                   eps, scratch);
}

#pragma GCC pop_options

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

bool cpu_has_avx512bf16() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") && !std::getenv("PGF_CPU_OPS_NO_AVX512BF16");
  }();
  return ok;
}

#endif  // PGF_X86

}  // namespace
}  // namespace pgf_ops
