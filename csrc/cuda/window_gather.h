// Host entry point of the optional CUDA window gather (see window_gather.cu; never run on the dev machines).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pgf_cuda {
// dst[i] = src[idx[i]] for n_rows rows of row_bytes bytes; all pointers are device pointers. Returns a cudaError_t.
int gather_rows(const void* src, const int64_t* idx, void* dst, int64_t n_rows, int64_t row_bytes,
                cudaStream_t stream);
}  // namespace pgf_cuda
