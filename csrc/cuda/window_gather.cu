// Optional CUDA variant of the window gather: dst[i, :] = src[idx[i], :] for rows of `row_bytes` bytes.
//
// Built only when a CUDA toolkit and a CUDA-enabled torch are present (see setup.py, POLYGRAD_FAST_CUDA). The
// development machines have no GPU and a CPU-only torch, so this file has only been compiled (nvcc -c), NEVER run
// or tested; the CPU core in csrc/trajectory_buffer.cpp is the tested implementation. The caller computes the
// physical row indices of a window batch (e.g. from the CPU core's episode table) and passes device pointers.
#include <cuda_runtime.h>

#include <cstdint>

#include "window_gather.h"

namespace {

// One block per output row; threads copy the row in 4-byte words when aligned, else byte by byte.
__global__ void gather_rows_kernel(const unsigned char* __restrict__ src, const int64_t* __restrict__ idx,
                                   unsigned char* __restrict__ dst, int64_t row_bytes, bool words) {
  const int64_t row = blockIdx.x;
  const unsigned char* s = src + idx[row] * row_bytes;
  unsigned char* d = dst + row * row_bytes;
  if (words) {
    const int64_t n = row_bytes / 4;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
      reinterpret_cast<uint32_t*>(d)[k] = reinterpret_cast<const uint32_t*>(s)[k];
  } else {
    for (int64_t k = threadIdx.x; k < row_bytes; k += blockDim.x) d[k] = s[k];
  }
}

}  // namespace

namespace pgf_cuda {

int gather_rows(const void* src, const int64_t* idx, void* dst, int64_t n_rows, int64_t row_bytes,
                cudaStream_t stream) {
  if (n_rows <= 0 || row_bytes <= 0) return 0;
  const bool words = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(dst) % 4 == 0;
  gather_rows_kernel<<<static_cast<unsigned>(n_rows), 128, 0, stream>>>(
      static_cast<const unsigned char*>(src), idx, static_cast<unsigned char*>(dst), row_bytes, words);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace pgf_cuda
