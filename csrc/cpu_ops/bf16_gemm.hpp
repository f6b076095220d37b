// The bf16 GEMM shared by the fused CPU kernels (actor_mean.cpp, residual_mlp.cpp), out = init + a W^T on blocks of
// 32 rows, in two implementations with one contract: AMX tiles (amx_gemm, with the tile configuration and the OS
// permission check) and AVX-512 BF16 register tiles (avx512bf16_gemm, for CPUs without AMX: Zen 4 / Zen 5, Cooper
// Lake). Weights W [n, k] are bf16 bits in AMX's VNNI tile order, [n / 16][k / 2][16][2] with entry (nb, kp, j, i) =
// W[16 nb + j][2 kp + i] (zero-padded to k a multiple of 32 and n of 16): one 16-column panel's k-pair kp is 64
// bytes, exactly one zmm operand of VDPBF16PS, so both read the same buffers. The kernels are templates on
// AmxGemm / Avx512Bf16Gemm (begin() / end() around a thread's GEMMs, run() one GEMM). Everything sits in an anonymous
// namespace (each kernel file compiles its own copy).
#pragma once

#include "bf16_kernels.hpp"
#include "row_kernels.hpp"

#if PGF_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace pgf_ops {
namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,amx-tile,amx-bf16")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the 2 x 2 fp32 accumulators of a 32 x 32 output block; 4, 5: two 16 x 32 bf16 row tiles of the
// operand; 6, 7: two 32 x 16 bf16 column tiles of the weight (VNNI pairs). All are 16 rows of 64 bytes. Each thread
// configures its tiles before its first tile instruction and releases them after its last.
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// out [rows, n] fp32 (row stride n) = init + a [rows, k] bf16 (row stride k) x W^T, init the bias broadcast over the
// rows (bias [n] fp32), or out itself when accumulate (a residual add, no bias). rows % 32 == 0, k % 32 == 0,
// n % 16 == 0. Panel-outer: each 32-column weight panel is loaded from memory once and used for every 32-row block
// (256 x 1024 x 1024 on 2 threads: 221 us, oneDNN's prepacked GEMM 215 us; row-block-outer, streaming the whole
// weight once per 32 rows: 257 us). A last 16-column panel takes two accumulators.
inline void amx_gemm(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, float* out,
                     const float* bias, bool accumulate) {
  const int64_t a_stride = k * 2, out_stride = n * 4, panel = (k / 2) * 32;  // panel: one 16-column weight block
  for (int64_t n0 = 0; n0 < n; n0 += 32) {
    const bool pair = n0 + 32 <= n;
    const uint16_t* w0 = w + (n0 / 16) * panel;
    const uint16_t* w1 = w0 + panel;
    for (int64_t m0 = 0; m0 < rows; m0 += 32) {
      float* o0 = out + m0 * n + n0;
      float* o1 = o0 + 16 * n;
      if (accumulate) {
        _tile_loadd(0, o0, out_stride);
        _tile_loadd(2, o1, out_stride);
        if (pair) {
          _tile_loadd(1, o0 + 16, out_stride);
          _tile_loadd(3, o1 + 16, out_stride);
        }
      } else {  // stride 0: every row of the accumulator starts as the bias
        _tile_loadd(0, bias + n0, 0);
        _tile_loadd(2, bias + n0, 0);
        if (pair) {
          _tile_loadd(1, bias + n0 + 16, 0);
          _tile_loadd(3, bias + n0 + 16, 0);
        }
      }
      const uint16_t* a0 = a + m0 * k;
      const uint16_t* a1 = a0 + 16 * k;
      for (int64_t k0 = 0; k0 < k; k0 += 32) {
        _tile_loadd(4, a0 + k0, a_stride);
        _tile_loadd(5, a1 + k0, a_stride);
        _tile_loadd(6, w0 + (k0 / 2) * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (pair) {
          _tile_loadd(7, w1 + (k0 / 2) * 32, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o0, out_stride);
      _tile_stored(2, o1, out_stride);
      if (pair) {
        _tile_stored(1, o0 + 16, out_stride);
        _tile_stored(3, o1 + 16, out_stride);
      }
    }
  }
}

// out[r, 16 p + j] (+)= sum over the first `pairs` k-pairs of a[r, 2kp..2kp+1] . W-panel p[kp, j, 0..1] for r < MR,
// p < NP (a's row stride k): MR x NP zmm accumulators (VDPBF16PS: fp32 += bf16 pair products), each A pair broadcast
// as one 32-bit word. init: the bias (bias + 16 p), or out itself when accumulate, plus the bias where not null.
template <int MR, int NP>
PGF_INL(PGF_TGT) void dpbf16_tile(const uint16_t* a, int64_t k, int64_t pairs, const uint16_t* w, int64_t panel,
                                  float* out, int64_t n, const float* bias, bool accumulate) {
  __m512 c[MR][NP];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * p) : _mm512_setzero_ps();
      c[r][p] = accumulate ? _mm512_add_ps(_mm512_loadu_ps(out + r * n + 16 * p), b) : b;
    }
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh b[NP];
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) b[p] = (__m512bh)_mm512_loadu_si512(w + p * panel + kp * 32);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * k + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) c[r][p] = _mm512_dpbf16_ps(c[r][p], av, b[p]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + r * n + 16 * p, c[r][p]);
}

// amx_gemm's contract (rows % 32 == 0, k % 32 == 0, n % 16 == 0), and a bias with accumulate adds both (out +=
// bias + a W^T: the residual block's bias in the accumulators, no pass of its own), with VDPBF16PS: 8 rows x 2
// panels (32 columns) per register tile, panel-pair outer so the pair's weights stay in L2 for all the row tiles; a
// last single panel as 16 rows x 1. 256 x 1024 x 1024 on 2 threads of a 2-core Zen 4 (AVX512-BF16): 1.15 ms, 466
// GFLOP/s, oneDNN's bf16 GEMM 1.18-1.23 ms; 8 x 3, 4 x 4 and 16 x 1 tiles measured the same, 2 x 8 11% slower.
// k_used (even, <= k): only a's first k_used columns are nonzero (the rest zero padding), so the tiles stop there:
// the actor's 11 observations take 6 pairs, not 16 (the fused actor on 2,560 states, hidden 256, 2-core Zen 4:
// 1.24 -> 1.15 ms).
inline void avx512bf16_gemm(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, float* out,
                            const float* bias, bool accumulate, int64_t k_used) {
  const int64_t panel = (k / 2) * 32, panels = n / 16, pairs = k_used / 2;
  int64_t p = 0;
  for (; p + 2 <= panels; p += 2)
    for (int64_t m = 0; m < rows; m += 8)
      dpbf16_tile<8, 2>(a + m * k, k, pairs, w + p * panel, panel, out + m * n + 16 * p, n,
                        bias ? bias + 16 * p : nullptr, accumulate);
  if (p < panels)
    for (int64_t m = 0; m < rows; m += 16)
      dpbf16_tile<16, 1>(a + m * k, k, pairs, w + p * panel, panel, out + m * n + 16 * p, n,
                         bias ? bias + 16 * p : nullptr, accumulate);
}

// A thread's GEMMs between begin() and end() (its AMX tile configuration); run(): amx_gemm's contract, k_used as
// avx512bf16_gemm's (where a's columns from k_used on are zero; AMX runs whole 32-wide tiles regardless).
struct AmxGemm {
  static constexpr bool kBiasWithAccumulate = false;  // accumulate takes no bias: add it in a pass of its own
  static void begin() { configure_tiles(); }
  static void end() { _tile_release(); }
  static void run(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, float* out,
                  const float* bias, bool accumulate, int64_t k_used = -1) {
    (void)k_used;
    amx_gemm(a, rows, k, w, n, out, bias, accumulate);
  }
};

struct Avx512Bf16Gemm {
  static constexpr bool kBiasWithAccumulate = true;
  static void begin() {}
  static void end() {}
  static void run(const uint16_t* a, int64_t rows, int64_t k, const uint16_t* w, int64_t n, float* out,
                  const float* bias, bool accumulate, int64_t k_used = -1) {
    avx512bf16_gemm(a, rows, k, w, n, out, bias, accumulate, k_used < 0 ? k : k_used);
  }
};

// fn(gemm) with the GEMM type isa names (AmxGemm or Avx512Bf16Gemm), for kernels templated on it.
template <class Fn>
void with_bf16_gemm(Bf16Isa isa, Fn&& fn) {
  if (isa == Bf16Isa::Amx) fn(AmxGemm{});
  else fn(Avx512Bf16Gemm{});
}

#pragma GCC pop_options

// AMX-TILE + AMX-BF16 + AVX-512 BF16 on the CPU, tile data enabled by the OS (XCR0) and granted to this process
// (arch_prctl; per process, so OpenMP workers may use the tiles too), and PGF_CPU_OPS_NO_AMX unset.
inline bool amx_usable() {
  static const bool ok = [] {
    if (std::getenv("PGF_CPU_OPS_NO_AMX") || !cpu_has_avx512bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE: xgetbv is available
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x60000u) != 0x60000u) return false;  // XCR0 bits 17, 18: tile config and tile data enabled
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

}  // namespace
}  // namespace pgf_ops
#endif  // PGF_X86
