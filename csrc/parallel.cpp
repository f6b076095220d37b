// See parallel.hpp.
#include "parallel.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pgf {
namespace {

struct Job {
  std::function<void(int64_t)> fn;
  int64_t n = 0;
  int helpers_allowed = 0;
  std::atomic<int> helpers_joined{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Job& j) {
  for (;;) {
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.n) return;  // a late helper lands here and never touches fn (whose captures may be gone)
    j.fn(c);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  Pool() : pid_(getpid()) {}

  void run(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->n = n;
    job->helpers_allowed = helpers;
    if (getpid() == pid_) {
      std::lock_guard<std::mutex> lock(mu_);
      for (; started_ < helpers; ++started_) std::thread([this] { loop(); }).detach();  // live until exit
    }
    if (getpid() == pid_) {  // after fork() the helpers do not exist in the child: just run serially
      {
        std::lock_guard<std::mutex> lock(mu_);
        job_ = job;
        ++generation_;
      }
      cv_.notify_all();
    }
    work(*job);
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();  // chunks claimed by helpers
    if (getpid() == pid_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (job_ == job) job_.reset();
    }
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;  // keeps the Job alive even if the caller already returned
      }
      if (job && job->helpers_joined.fetch_add(1) < job->helpers_allowed) work(*job);
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  int started_ = 0;
};

std::atomic<int> g_threads{0};  // 0 = not decided yet

}  // namespace

int gather_threads() {
  int n = g_threads.load();
  if (n > 0) return n;
  n = [] {
    if (const char* env = std::getenv("POLYGRAD_FAST_BUFFER_THREADS")) {
      const int v = std::atoi(env);
      if (v >= 1) return std::min(v, 64);
    }
    const unsigned hc = std::thread::hardware_concurrency();
    return static_cast<int>(std::clamp<unsigned>(hc == 0 ? 1 : hc, 1, 8));
  }();
  int expected = 0;
  g_threads.compare_exchange_strong(expected, n);
  return g_threads.load();
}

void set_gather_threads(int n) { g_threads.store(std::clamp(n, 1, 64)); }

void run_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  if (n_chunks <= 0) return;
  const int threads = gather_threads();
  if (threads <= 1 || n_chunks == 1) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
    return;
  }
  static Pool* pool = new Pool();  // never destroyed: detached helpers outlive statics
  pool->run(n_chunks, threads - 1, fn);
}

}  // namespace pgf
