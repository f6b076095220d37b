// Native core of the trajectory buffer; see trajectory_buffer.hpp and polygrad_fast/reference/buffer.py (the spec).
//
// Floating-point note: every statistic is computed with the same IEEE operations in the same order as the numpy
// reference. The build uses -ffp-contract=off (no FMA fusion) and never -ffast-math, so results are bit-identical.
#include "trajectory_buffer.hpp"

#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <stdexcept>
#include <string>


namespace pgf {
namespace {

// Moments (n, mean, M2) helpers over D columns; operation order mirrors _chan_add / _chan_sub in the reference.
void chan_add(int64_t na, const double* ma, const double* qa, int64_t nb, const double* mb, const double* qb,
              int64_t D, int64_t* n_out, double* m_out, double* q_out) {
  if (na == 0) {
    std::copy(mb, mb + D, m_out);
    std::copy(qb, qb + D, q_out);
    *n_out = nb;
    return;
  }
  if (nb == 0) {
    std::copy(ma, ma + D, m_out);
    std::copy(qa, qa + D, q_out);
    *n_out = na;
    return;
  }
  const int64_t n = na + nb;
  const double f = static_cast<double>(nb) / static_cast<double>(n);
  const double w = static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(n);
  for (int64_t j = 0; j < D; ++j) {
    const double delta = mb[j] - ma[j];
    const double mean = ma[j] + delta * f;
    const double m2 = qa[j] + qb[j] + delta * delta * w;
    m_out[j] = mean;
    q_out[j] = m2;
  }
  *n_out = n;
}

// Removes subset b from the total in place; returns true when cancellation makes the result ill-conditioned.
bool chan_sub(int64_t* n_io, double* m, double* q, int64_t nb, const double* mb, const double* qb, int64_t D) {
  const int64_t n = *n_io;
  const int64_t na = n - nb;
  *n_io = na;
  if (na == 0) {
    std::fill(m, m + D, 0.0);
    std::fill(q, q + D, 0.0);
    return false;
  }
  bool ill = na * 16 < n;
  const double w = static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(n);
  for (int64_t j = 0; j < D; ++j) {
    const double mean = (m[j] * static_cast<double>(n) - mb[j] * static_cast<double>(nb)) / static_cast<double>(na);
    const double delta = mb[j] - mean;
    double m2 = q[j] - qb[j] - delta * delta * w;
    m2 = std::max(m2, 0.0);
    if (m2 * 16.0 < q[j]) ill = true;
    m[j] = mean;
    q[j] = m2;
  }
  return ill;
}

void set_terminal_moments(double* mean, double* m2, int64_t D, int64_t L, bool terminated) {
  const double k = terminated ? 1.0 : 0.0;
  mean[D - 1] = k / static_cast<double>(L);
  m2[D - 1] = k * (static_cast<double>(L) - k) / static_cast<double>(L);
}

// The ring is big (1M Hopper steps = 528 MB) and windows start at random places in it, so with 4 KB pages nearly
// every window costs TLB misses (expensive page walks under a hypervisor). Ask for transparent huge pages: 2 MB
// aligned allocation + madvise. Memory is left unzeroed: only written records are ever read.
// Callers pass bytes <= INT64_MAX (checked_mul), so rounding up to 2 MB cannot wrap.
double* alloc_ring(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  void* p = nullptr;
  if (bytes >= kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    p = std::aligned_alloc(kHuge, rounded);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, rounded, MADV_HUGEPAGE);  // a hint; failure just means 4 KB pages
#endif
  } else {
    p = std::malloc(bytes > 0 ? bytes : 1);
  }
  return static_cast<double*>(p);  // nullptr when the allocation failed
}

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw std::length_error("BufferCore: " + what + " overflows int64");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw std::length_error("BufferCore: " + what + " overflows int64");
  return r;
}

}  // namespace

int64_t record_bytes(int64_t obs_dim, int64_t act_dim, int64_t sim_dim) {
  if (obs_dim < 1 || act_dim < 1 || sim_dim < 0)
    throw std::invalid_argument("BufferCore: expected obs_dim, act_dim >= 1 and sim_state_dim >= 0, got " +
                                std::to_string(obs_dim) + ", " + std::to_string(act_dim) + ", " +
                                std::to_string(sim_dim));
  // floats (obs, act, reward) rounded up to whole doubles, then the sim state's doubles
  const int64_t floats = checked_add(checked_add(obs_dim, act_dim, "obs_dim + act_dim"), 2, "record size");
  return checked_mul(checked_add(floats / 2, sim_dim, "record size"), 8, "record size");
}

TrajectoryBufferCore::TrajectoryBufferCore(int64_t obs_dim, int64_t act_dim, int64_t sim_dim, int64_t capacity)
    : O_(obs_dim), A_(act_dim), S_(sim_dim), C_(capacity) {
  const int64_t rec = record_bytes(O_, A_, S_);  // validates the dimensions, overflow-checked
  if (C_ < 1) throw std::invalid_argument("BufferCore: expected capacity >= 1, got " + std::to_string(C_));
  D_ = O_ + A_ + 2;  // no overflow: record_bytes checked it
  sim_off_ = (O_ + A_ + 1 + 1) / 2;  // floats rounded up to whole doubles
  row_ = sim_off_ + S_;
  const std::string what = "capacity " + std::to_string(C_) + " transitions of obs " + std::to_string(O_) +
                           ", act " + std::to_string(A_) + ", sim " + std::to_string(S_);
  const int64_t bytes = checked_mul(C_, rec, what + " (ring bytes)");
  // 2 MB of headroom for alloc_ring's rounding up to whole huge pages
  checked_add(bytes, int64_t(2) << 20, what + " (ring bytes)");
  ring_.reset(alloc_ring(static_cast<size_t>(bytes)));
  if (!ring_) {
    char gb[32];
    std::snprintf(gb, sizeof(gb), "%.1f", static_cast<double>(bytes) / 1e9);
    throw AllocationError("BufferCore: " + what + " would need " + gb + " GB (" + std::to_string(bytes) +
                          " bytes): allocation failed");
  }
  agg_mean_.assign(D_, 0.0);
  agg_m2_.assign(D_, 0.0);
}

int64_t TrajectoryBufferCore::push_row() {
  // Compact the FIFO when the evicted prefix dominates; amortised O(1) per row.
  if (e0_ > 64 && e0_ * 2 > static_cast<int64_t>(ep_id_.size())) {
    auto drop = [this](auto& v, int64_t per) { v.erase(v.begin(), v.begin() + e0_ * per); };
    drop(ep_id_, 1);
    drop(ep_start_, 1);
    drop(ep_len_, 1);
    drop(ep_term_, 1);
    drop(ep_trunc_, 1);
    drop(ep_mean_, D_);
    drop(ep_m2_, D_);
    e0_ = 0;
  }
  ep_id_.push_back(0);
  ep_start_.push_back(0);
  ep_len_.push_back(0);
  ep_term_.push_back(0);
  ep_trunc_.push_back(0);
  ep_mean_.resize(ep_mean_.size() + D_, 0.0);
  ep_m2_.resize(ep_m2_.size() + D_, 0.0);
  ++E_;
  return e0_ + E_ - 1;
}

void TrajectoryBufferCore::recompute_agg() {
  int64_t n = 0;
  std::vector<double> mean(D_, 0.0), m2(D_, 0.0), tm(D_), tq(D_);
  const int64_t closed = E_ - (open_ ? 1 : 0);
  for (int64_t r = e0_; r < e0_ + closed; ++r) {
    int64_t nn;
    chan_add(n, mean.data(), m2.data(), ep_len_[r], &ep_mean_[r * D_], &ep_m2_[r * D_], D_, &nn, tm.data(),
             tq.data());
    n = nn;
    mean.swap(tm);
    m2.swap(tq);
  }
  agg_n_ = n;
  agg_mean_ = mean;
  agg_m2_ = m2;
  removals_ = 0;
}

void TrajectoryBufferCore::evict_oldest() {
  const int64_t r = e0_;
  const int64_t L = ep_len_[r];
  const bool ill = chan_sub(&agg_n_, agg_mean_.data(), agg_m2_.data(), L, &ep_mean_[r * D_], &ep_m2_[r * D_], D_);
  ++e0_;
  --E_;
  tail_ = (tail_ + L) % C_;
  n_ -= L;
  ++removals_;
  const int64_t closed = E_ - (open_ ? 1 : 0);
  if (ill || removals_ >= std::max<int64_t>(64, closed)) recompute_agg();
}

void TrajectoryBufferCore::make_room(int64_t steps) {
  while (n_ + steps > C_) {
    if (E_ - (open_ ? 1 : 0) <= 0) throw std::invalid_argument("BufferCore: episode longer than capacity");
    evict_oldest();
  }
}

void TrajectoryBufferCore::write_steps(int64_t pos, const float* obs, const float* act, const float* rew,
                                       const double* sim, int64_t L) {
  for (int64_t i = 0; i < L; ++i) {
    const int64_t p = (pos + i) % C_;  // wraps around the end of the ring
    float* f = frow(p);
    std::memcpy(f, obs + i * O_, sizeof(float) * O_);
    std::memcpy(f + O_, act + i * A_, sizeof(float) * A_);
    f[O_ + A_] = rew[i];
    if (S_ > 0) std::memcpy(srow(p), sim + i * S_, sizeof(double) * S_);
  }
}

void TrajectoryBufferCore::add_episode(const float* obs, const float* act, const float* rew, const double* sim,
                                       int64_t L, bool terminated, bool truncated) {
  std::lock_guard<std::mutex> lock(mu_);
  if (open_) throw std::invalid_argument("BufferCore: an episode is open");
  if (L < 1 || L > C_) throw std::invalid_argument("BufferCore: bad episode length");
  // Two-pass moments in float64, columns [obs | act | reward | terminal]; sums run over i in order (as numpy's
  // axis-0 reduction of a C array does).
  std::vector<double> mean(D_, 0.0), m2(D_, 0.0);
  auto column = [&](int64_t i, int64_t j) -> double {
    if (j < O_) return static_cast<double>(obs[i * O_ + j]);
    if (j < O_ + A_) return static_cast<double>(act[i * A_ + (j - O_)]);
    if (j == O_ + A_) return static_cast<double>(rew[i]);
    return 0.0;
  };
  for (int64_t j = 0; j < D_; ++j) mean[j] = column(0, j);
  for (int64_t i = 1; i < L; ++i)
    for (int64_t j = 0; j < D_; ++j) mean[j] += column(i, j);
  for (int64_t j = 0; j < D_; ++j) mean[j] = mean[j] / static_cast<double>(L);
  for (int64_t j = 0; j < D_; ++j) {
    const double d = column(0, j) - mean[j];
    m2[j] = d * d;
  }
  for (int64_t i = 1; i < L; ++i)
    for (int64_t j = 0; j < D_; ++j) {
      const double d = column(i, j) - mean[j];
      m2[j] += d * d;
    }
  set_terminal_moments(mean.data(), m2.data(), D_, L, terminated);

  make_room(L);
  const int64_t pos = (tail_ + n_) % C_;
  write_steps(pos, obs, act, rew, sim, L);
  n_ += L;
  const int64_t r = push_row();
  ep_id_[r] = next_id_++;
  ep_start_[r] = pos;
  ep_len_[r] = L;
  ep_term_[r] = terminated;
  ep_trunc_[r] = truncated;
  std::copy(mean.begin(), mean.end(), &ep_mean_[r * D_]);
  std::copy(m2.begin(), m2.end(), &ep_m2_[r * D_]);
  int64_t nn;
  std::vector<double> tm(D_), tq(D_);
  chan_add(agg_n_, agg_mean_.data(), agg_m2_.data(), L, mean.data(), m2.data(), D_, &nn, tm.data(), tq.data());
  agg_n_ = nn;
  agg_mean_.swap(tm);
  agg_m2_.swap(tq);
  ++version_;
}

void TrajectoryBufferCore::add_step(const float* obs, const float* act, float rew, const double* sim) {
  std::lock_guard<std::mutex> lock(mu_);
  if (open_ && ep_len_[e0_ + E_ - 1] + 1 > C_) throw std::invalid_argument("BufferCore: episode exceeds capacity");
  make_room(1);
  const int64_t pos = (tail_ + n_) % C_;
  write_steps(pos, obs, act, &rew, sim, 1);
  n_ += 1;
  if (!open_) {
    const int64_t r = push_row();
    ep_id_[r] = next_id_++;
    ep_start_[r] = pos;
    open_ = true;
  }
  const int64_t r = e0_ + E_ - 1;
  ep_len_[r] += 1;
  // Welford update, same operation order as the reference.
  const double cnt = static_cast<double>(ep_len_[r]);
  double* mean = &ep_mean_[r * D_];
  double* m2 = &ep_m2_[r * D_];
  for (int64_t j = 0; j < D_; ++j) {
    double x;
    if (j < O_) x = obs[j];
    else if (j < O_ + A_) x = act[j - O_];
    else if (j == O_ + A_) x = rew;
    else x = 0.0;
    const double delta = x - mean[j];
    mean[j] = mean[j] + delta / cnt;
    m2[j] = m2[j] + delta * (x - mean[j]);
  }
  ++version_;
}

void TrajectoryBufferCore::end_episode(bool terminated, bool truncated) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!open_) throw std::invalid_argument("BufferCore: no open episode");
  const int64_t r = e0_ + E_ - 1;
  ep_term_[r] = terminated;
  ep_trunc_[r] = truncated;
  set_terminal_moments(&ep_mean_[r * D_], &ep_m2_[r * D_], D_, ep_len_[r], terminated);
  int64_t nn;
  std::vector<double> tm(D_), tq(D_);
  chan_add(agg_n_, agg_mean_.data(), agg_m2_.data(), ep_len_[r], &ep_mean_[r * D_], &ep_m2_[r * D_], D_, &nn,
           tm.data(), tq.data());
  agg_n_ = nn;
  agg_mean_.swap(tm);
  agg_m2_.swap(tq);
  open_ = false;
  ++version_;
}

int64_t TrajectoryBufferCore::open_length() const {
  std::lock_guard<std::mutex> lock(mu_);
  return open_ ? ep_len_[e0_ + E_ - 1] : 0;
}

int64_t TrajectoryBufferCore::max_episode_length() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t m = 0;
  for (int64_t r = e0_; r < e0_ + E_; ++r) m = std::max(m, ep_len_[r]);
  return m;
}

std::vector<int64_t> TrajectoryBufferCore::episode_lengths() const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<int64_t>(ep_len_.begin() + e0_, ep_len_.begin() + e0_ + E_);
}

int64_t TrajectoryBufferCore::nbytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  auto b = [](const auto& v) { return static_cast<int64_t>(v.capacity() * sizeof(v[0])); };
  return C_ * row_ * static_cast<int64_t>(sizeof(double)) + b(ep_id_) + b(ep_start_) + b(ep_len_) + b(ep_term_) +
         b(ep_trunc_) + b(ep_mean_) + b(ep_m2_) + b(agg_mean_) + b(agg_m2_) + b(prefix_);
}

void TrajectoryBufferCore::moments_unlocked(int64_t* n, double* mean, double* m2) const {
  if (open_) {
    const int64_t r = e0_ + E_ - 1;
    chan_add(agg_n_, agg_mean_.data(), agg_m2_.data(), ep_len_[r], &ep_mean_[r * D_], &ep_m2_[r * D_], D_, n, mean,
             m2);
  } else {
    *n = agg_n_;
    std::copy(agg_mean_.begin(), agg_mean_.end(), mean);
    std::copy(agg_m2_.begin(), agg_m2_.end(), m2);
  }
}

void TrajectoryBufferCore::moments(int64_t* n, double* mean, double* m2) const {
  std::lock_guard<std::mutex> lock(mu_);
  moments_unlocked(n, mean, m2);
}

const std::vector<int64_t>& TrajectoryBufferCore::prefix(int64_t horizon) {
  if (prefix_h_ == horizon && prefix_version_ == version_) return prefix_;
  prefix_.resize(static_cast<size_t>(E_ + 1));
  prefix_[0] = 0;
  for (int64_t k = 0; k < E_; ++k) {
    const int64_t r = e0_ + k;
    const int64_t L = ep_len_[r];
    // Terminated: starts 0..L-1 (padding after the end). Truncated/open: 0..L-H, windows end inside the episode.
    const int64_t c = ep_term_[r] ? L : std::max<int64_t>(L - horizon + 1, 0);
    prefix_[k + 1] = prefix_[k] + c;
  }
  prefix_h_ = horizon;
  prefix_version_ = version_;
  return prefix_;
}

void TrajectoryBufferCore::sample(int64_t B, int64_t H, uint64_t seed, bool normalize, const WindowOut& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (B < 1 || H < 1) throw std::invalid_argument("BufferCore: batch and horizon must be >= 1");
  const std::vector<int64_t>& P = prefix(H);
  const uint64_t N = static_cast<uint64_t>(P.back());
  if (N == 0) throw std::invalid_argument("BufferCore: no valid window");

  // Normaliser (mean, 1/(std+1e-6)); identity when not normalising, applied as ((double)x - mean) * inv.
  std::vector<double> mean(D_, 0.0), inv(D_, 1.0);
  if (normalize) {
    int64_t n;
    std::vector<double> m2(D_);
    moments_unlocked(&n, mean.data(), m2.data());
    for (int64_t j = 0; j < D_; ++j) {
      const double sd = n ? std::sqrt(m2[j] / static_cast<double>(n)) : 0.0;
      inv[j] = 1.0 / (sd + 1e-6);
    }
  }
  const double* mo = mean.data();
  const double* io = inv.data();
  const double* ma = mean.data() + O_;
  const double* ia = inv.data() + O_;
  const double mr = mean[O_ + A_], ir = inv[O_ + A_];
  const double mt = mean[O_ + A_ + 1], it = inv[O_ + A_ + 1];
  // Pad values after a terminated end: terminal 1, reward 0 (normalised like any other value).
  const float pad_rew = normalize ? static_cast<float>((0.0 - mr) * ir) : 0.0f;
  const float zero_term = normalize ? static_cast<float>((0.0 - mt) * it) : 0.0f;
  const float one_term = normalize ? static_cast<float>((1.0 - mt) * it) : 1.0f;

  const uint64_t key = seed_key(seed);
  const int64_t O = O_, A = A_, S = S_, C = C_;

  // Phase 1 (cheap, in cache): window -> (first record, length, terminated), and the id/start outputs.
  struct Win {
    int64_t st, s, L;
    bool term;
  };
  std::vector<Win> wins(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = static_cast<int64_t>(draw(key, static_cast<uint64_t>(b)) % N);
    // Episode k holds flat starts P[k] <= j < P[k+1].
    const int64_t k = (std::upper_bound(P.begin(), P.end(), j) - P.begin()) - 1;
    const int64_t r = e0_ + k;
    wins[b] = Win{ep_start_[r], j - P[k], ep_len_[r], ep_term_[r] != 0};
    out.episode_ids[b] = ep_id_[r];
    out.start_steps[b] = j - P[k];
  }

  // Phase 2: the gather, one contiguous run of records per window (modulo the wrap). Memory-bandwidth bound; large
  // batches are split into chunks of windows shared with helper threads (parallel.hpp).
  const bool with_sim = out.sim != nullptr;
  const int64_t window_bytes = H * (4 * (O + A + 2) + (with_sim ? 8 * S : 0));
  const int64_t float_bytes = sim_off_ * 8;  // the float part at the head of each record
  // Prefetch the records of the window two iterations ahead (measured ~5% on a 1M-step ring; the rest of the time
  // is DRAM bandwidth).
  constexpr int64_t kAhead = 2;
  const char* ring_end = reinterpret_cast<const char*>(ring_.get() + C * row_);
  auto gather = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + kAhead < b1) {
        const Win& w2 = wins[b + kAhead];
        const int64_t s2 = std::min(w2.s, w2.L - 1);
        int64_t p2 = w2.st + s2;
        if (p2 >= C) p2 -= C;
        const char* base = reinterpret_cast<const char*>(ring_.get() + p2 * row_);
        const int64_t n_rec = std::min(H, w2.L - s2);
        if (with_sim) {
          const int64_t nb = n_rec * row_ * 8;
          for (int64_t off = 0; off < nb && base + off < ring_end; off += 64) __builtin_prefetch(base + off, 0, 3);
        } else {  // only the cache lines of each record's float part
          for (int64_t r = 0; r < n_rec; ++r) {
            const char* rec = base + r * row_ * 8;
            for (int64_t off = 0; off < float_bytes && rec + off < ring_end; off += 64)
              __builtin_prefetch(rec + off, 0, 3);
          }
        }
      }
      const Win& w = wins[b];
      const int64_t L = w.L, s = w.s, st = w.st;
      for (int64_t t = 0; t < H; ++t) {
        const int64_t step = s + t;
        const bool inside = step < L;
        // Ring index (st + step) mod C; st < C and step < L <= C, so one conditional subtraction is the modulo
        // (an integer division per record was measurable here). Padding repeats the last stored step.
        int64_t p = st + (inside ? step : L - 1);
        if (p >= C) p -= C;
        const int64_t o = b * H + t;
        const float* f = frow(p);
        float* d = out.obs + o * O;
        float* da = out.act + o * A;
        if (normalize) {
          for (int64_t q = 0; q < O; ++q) d[q] = static_cast<float>((static_cast<double>(f[q]) - mo[q]) * io[q]);
          for (int64_t q = 0; q < A; ++q)
            da[q] = static_cast<float>((static_cast<double>(f[O + q]) - ma[q]) * ia[q]);
          out.rew[o] = inside ? static_cast<float>((static_cast<double>(f[O + A]) - mr) * ir) : pad_rew;
        } else {
          std::memcpy(d, f, sizeof(float) * O);
          std::memcpy(da, f + O, sizeof(float) * A);
          out.rew[o] = inside ? f[O + A] : 0.0f;
        }
        out.term[o] = (w.term && step >= L - 1) ? one_term : zero_term;
        if (with_sim && S > 0) std::memcpy(out.sim + o * S, srow(p), sizeof(double) * S);
      }
      std::memcpy(out.start_obs + b * O, out.obs + b * H * O, sizeof(float) * O);
    }
  };
  // ~64 KB of output per chunk; below ~256 KB in total threads do not pay for their wake-up.
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(window_bytes, 1));
  const int64_t n_chunks = (B + per_chunk - 1) / per_chunk;
  if (B * window_bytes < (int64_t(256) << 10) || n_chunks < 2) {
    gather(0, B);
  } else {
    run_chunks(n_chunks, [&](int64_t c) { gather(c * per_chunk, std::min(B, (c + 1) * per_chunk)); });
  }
}

TrajectoryBufferCore::State TrajectoryBufferCore::export_state() const {
  std::lock_guard<std::mutex> lock(mu_);
  State s;
  s.obs.resize(n_ * O_);
  s.act.resize(n_ * A_);
  s.rew.resize(n_);
  s.sim.resize(n_ * S_);
  for (int64_t i = 0; i < n_; ++i) {  // logical order, oldest first
    const int64_t p = (tail_ + i) % C_;
    const float* f = frow(p);
    std::memcpy(&s.obs[i * O_], f, sizeof(float) * O_);
    std::memcpy(&s.act[i * A_], f + O_, sizeof(float) * A_);
    s.rew[i] = f[O_ + A_];
    if (S_ > 0) std::memcpy(&s.sim[i * S_], srow(p), sizeof(double) * S_);
  }
  s.episode_ids.assign(ep_id_.begin() + e0_, ep_id_.begin() + e0_ + E_);
  s.episode_lengths.assign(ep_len_.begin() + e0_, ep_len_.begin() + e0_ + E_);
  s.terminated.assign(ep_term_.begin() + e0_, ep_term_.begin() + e0_ + E_);
  s.truncated.assign(ep_trunc_.begin() + e0_, ep_trunc_.begin() + e0_ + E_);
  s.episode_mean.assign(ep_mean_.begin() + e0_ * D_, ep_mean_.begin() + (e0_ + E_) * D_);
  s.episode_m2.assign(ep_m2_.begin() + e0_ * D_, ep_m2_.begin() + (e0_ + E_) * D_);
  s.open_episode = open_;
  s.next_episode_id = next_id_;
  s.agg_n = agg_n_;
  s.agg_mean = agg_mean_;
  s.agg_m2 = agg_m2_;
  s.removals = removals_;
  return s;
}

void TrajectoryBufferCore::import_state(const State& s) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t n = static_cast<int64_t>(s.rew.size());
  const int64_t E = static_cast<int64_t>(s.episode_lengths.size());
  int64_t total = 0;
  for (int64_t L : s.episode_lengths) {
    if (L < 1) throw std::invalid_argument("BufferCore.import_state: bad episode length");
    total += L;
  }
  if (n_ != 0 || E_ != 0 || n > C_ || total != n || static_cast<int64_t>(s.obs.size()) != n * O_ ||
      static_cast<int64_t>(s.act.size()) != n * A_ || static_cast<int64_t>(s.sim.size()) != n * S_ ||
      static_cast<int64_t>(s.episode_ids.size()) != E || static_cast<int64_t>(s.terminated.size()) != E ||
      static_cast<int64_t>(s.truncated.size()) != E || static_cast<int64_t>(s.episode_mean.size()) != E * D_ ||
      static_cast<int64_t>(s.episode_m2.size()) != E * D_ || static_cast<int64_t>(s.agg_mean.size()) != D_ ||
      static_cast<int64_t>(s.agg_m2.size()) != D_ || (s.open_episode && E == 0))
    throw std::invalid_argument("BufferCore.import_state: inconsistent state");
  write_steps(0, s.obs.data(), s.act.data(), s.rew.data(), s.sim.data(), n);
  tail_ = 0;
  n_ = n;
  ep_id_ = s.episode_ids;
  ep_len_ = s.episode_lengths;
  ep_term_ = s.terminated;
  ep_trunc_ = s.truncated;
  ep_mean_ = s.episode_mean;
  ep_m2_ = s.episode_m2;
  ep_start_.resize(E);
  int64_t pos = 0;
  for (int64_t k = 0; k < E; ++k) {
    ep_start_[k] = pos;
    pos += ep_len_[k];
  }
  e0_ = 0;
  E_ = E;
  open_ = s.open_episode;
  next_id_ = s.next_episode_id;
  agg_n_ = s.agg_n;
  agg_mean_ = s.agg_mean;
  agg_m2_ = s.agg_m2;
  removals_ = s.removals;
  ++version_;
}

}  // namespace pgf
