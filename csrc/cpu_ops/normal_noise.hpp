// Counter-based standard normal noise on CPU: Philox4x32-10 + Box-Muller, vectorised and threaded.
//
// Element j of a stream (seed, offset) depends only on (seed, offset + j / 4, j % 4): any thread count, any
// chunking and any split of one fill into several give the same bits. See normal_noise.cpp.
#pragma once

#include <cstdint>

namespace pgf_ops {

// out[j] ~ N(0, 1) for j < n: group g = offset + j / 4 is the Philox counter (key = seed), its four 32-bit words
// make two Box-Muller pairs. threads: OpenMP threads (serial below a size where waking workers costs more).
void normal_fill(float* out, int64_t n, uint64_t seed, uint64_t offset, int threads);

// The four raw Philox4x32-10 words of counter `group` under key `seed` (for the reference twin's tests).
void philox4x32_10(uint64_t seed, uint64_t group, uint32_t out[4]);

}  // namespace pgf_ops
