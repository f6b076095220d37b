// Native core of polygrad_fast's trajectory buffer (plain C++17, no Python or torch headers).
//
// The executable specification is polygrad_fast/reference/buffer.py (NumpyBufferCore): same ring layout, same RNG,
// same episode selection and the same floating-point operations in the same order for the statistics, so both
// produce bit-identical windows and statistics. Inputs are validated in Python (polygrad_fast/buffer.py); the checks
// here only guard memory safety and throw std::invalid_argument / std::length_error (ValueError in Python) or
// AllocationError (MemoryError).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace pgf {

// splitmix64 finaliser; window i of a call with seed s uses draw(seed_key(s), i) only, so the result does not depend
// on thread scheduling. Mirrors window_draws() in reference/buffer.py.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
inline uint64_t seed_key(uint64_t seed) { return mix64(seed + kGolden); }
inline uint64_t draw(uint64_t key, uint64_t i) { return mix64(key + (i + 1) * kGolden); }

// The ring could not be allocated (the message names the capacity and the bytes it needed).
struct AllocationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Bytes of one ring record (see the layout below) for these dimensions; throws std::length_error on overflow.
int64_t record_bytes(int64_t obs_dim, int64_t act_dim, int64_t sim_dim);

// Output pointers of one sample() call (all C-contiguous, preallocated by the caller).
struct WindowOut {
  float* obs;        // [B,H,O]
  float* act;        // [B,H,A]
  float* rew;        // [B,H]
  float* term;       // [B,H]
  float* start_obs;  // [B,O]
  double* sim;       // [B,H,S], or nullptr: the sim states are not gathered (nor prefetched)
  int64_t* episode_ids;  // [B]
  int64_t* start_steps;  // [B]
};

class TrajectoryBufferCore {
 public:
  TrajectoryBufferCore(int64_t obs_dim, int64_t act_dim, int64_t sim_dim, int64_t capacity);

  // Whole episode of L steps: obs [L,O], act [L,A], rew [L], sim [L,S].
  void add_episode(const float* obs, const float* act, const float* rew, const double* sim, int64_t L,
                   bool terminated, bool truncated);
  void add_step(const float* obs, const float* act, float rew, const double* sim);
  void end_episode(bool terminated, bool truncated);

  // Fills `out` for B windows; thread-safe against concurrent mutation (internal mutex), GIL-free.
  void sample(int64_t batch, int64_t horizon, uint64_t seed, bool normalize, const WindowOut& out);

  // (n, mean[D], M2[D]) over all stored steps; D = O + A + 2 (obs | act | reward | terminal).
  void moments(int64_t* n, double* mean, double* m2) const;

  int64_t num_transitions() const { return n_; }
  int64_t num_episodes() const { return E_; }
  bool has_open_episode() const { return open_; }
  int64_t open_length() const;
  int64_t max_episode_length() const;
  std::vector<int64_t> episode_lengths() const;
  int64_t nbytes() const;

  int64_t obs_dim() const { return O_; }
  int64_t act_dim() const { return A_; }
  int64_t sim_dim() const { return S_; }
  int64_t capacity() const { return C_; }
  int64_t stat_dim() const { return D_; }

  // State export/import in logical order (oldest step first); see NumpyBufferCore.export_state.
  struct State {
    std::vector<float> obs, act, rew;
    std::vector<double> sim;
    std::vector<int64_t> episode_ids, episode_lengths;
    std::vector<uint8_t> terminated, truncated;
    std::vector<double> episode_mean, episode_m2;  // [E*D]
    bool open_episode = false;
    int64_t next_episode_id = 0, agg_n = 0, removals = 0;
    std::vector<double> agg_mean, agg_m2;  // [D]
  };
  State export_state() const;
  void import_state(const State& s);  // on a fresh core only

 private:
  int64_t push_row();
  void recompute_agg();
  void evict_oldest();
  void make_room(int64_t steps);
  void write_steps(int64_t pos, const float* obs, const float* act, const float* rew, const double* sim, int64_t L);
  const std::vector<int64_t>& prefix(int64_t horizon);
  void moments_unlocked(int64_t* n, double* mean, double* m2) const;
  void check_open_row() const;

  int64_t O_, A_, S_, C_, D_;
  // Ring of C transitions, one interleaved record per step (array of structs):
  //   [obs f32 x O | act f32 x A | rew f32 | pad to 8 bytes | sim f64 x S]
  // so a window of H steps is ONE contiguous byte range: one memory stream per window instead of four. On a
  // 1M-step Hopper ring the gather runs at the single-core memory bandwidth (~9 GB/s here, measured).
  struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<double[], FreeDeleter> ring_;  // calloc: untouched pages cost nothing until written
  int64_t row_ = 0;     // record stride in doubles
  int64_t sim_off_ = 0;  // offset of the sim state inside a record, in doubles
  float* frow(int64_t p) const { return reinterpret_cast<float*>(ring_.get() + p * row_); }
  double* srow(int64_t p) const { return ring_.get() + p * row_ + sim_off_; }
  int64_t tail_ = 0, n_ = 0;
  // Episode table: FIFO over rows e0_..e0_+E_-1 (oldest first); compacted when the dead prefix dominates.
  std::vector<int64_t> ep_id_, ep_start_, ep_len_;
  std::vector<uint8_t> ep_term_, ep_trunc_;
  std::vector<double> ep_mean_, ep_m2_;  // row-major [rows, D]
  int64_t e0_ = 0, E_ = 0;
  bool open_ = false;
  int64_t next_id_ = 0;
  // Moments of the closed episodes (the open episode's live in its row).
  int64_t agg_n_ = 0;
  std::vector<double> agg_mean_, agg_m2_;
  int64_t removals_ = 0;
  // Prefix sums of valid starts per episode, cached per (horizon, version).
  std::vector<int64_t> prefix_;
  int64_t prefix_h_ = -1;
  uint64_t version_ = 0, prefix_version_ = ~0ULL;
  mutable std::mutex mu_;
};

}  // namespace pgf
