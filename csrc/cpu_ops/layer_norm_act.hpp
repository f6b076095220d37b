// Fused LayerNorm (+ optional affine) + activation over the last dimension of a row-major matrix, CPU.
// No torch headers: callers pass raw pointers (see bindings.cpp and polygrad_fast/cpu_layer_norm.py).
#pragma once

#include <cstdint>

namespace pgf_ops {

enum class DType : int { F32 = 0, BF16 = 1 };
enum class Act : int { None = 0, Relu = 1, Elu = 2 };

// y[r, :] = act((x[r, :] - mean_r) * rstd_r * w + b), mean/biased variance over the row computed in fp32 (two passes
// over the row), rstd_r = 1 / sqrt(var_r + eps). x, y, w, b share the dtype `dt`; w and b may be null (no affine).
// Strides are in elements between consecutive rows; the last dimension is contiguous. Rows run in parallel with
// OpenMP on `threads` threads (serial below a small size or when threads <= 1); results do not depend on `threads`.
void layer_norm_act(const void* x, void* y, const void* w, const void* b, int64_t rows, int64_t width,
                    int64_t x_row_stride, int64_t y_row_stride, DType dt, float eps, Act act, int threads);

// Which implementation layer_norm_act dispatches to on this CPU ("avx512", "generic-avx2" or "generic").
const char* layer_norm_act_isa();

}  // namespace pgf_ops
