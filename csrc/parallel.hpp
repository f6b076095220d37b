// A tiny helper-thread pool for the window gather.
//
// Why not OpenMP: an OpenMP parallel region ends in a barrier, so a call waits for every worker to wake up. On a
// busy 2-core host (the development machines) a descheduled worker turned a 0.5 ms gather into ~10 ms. Here the
// caller and any helpers that wake up in time claim chunks through an atomic counter; the caller only waits for
// chunks a helper actually claimed, never for a helper that has not started. With no helpers (or after fork(),
// where the helper threads do not exist) the caller simply does all the chunks itself.
#pragma once

#include <cstdint>
#include <functional>

namespace pgf {

// Number of threads used for large gathers (caller included): set_gather_threads(n) if called, else
// POLYGRAD_FAST_BUFFER_THREADS if set, else the hardware concurrency, capped at 8.
int gather_threads();
void set_gather_threads(int n);  // n >= 1; 1 = serial

// Runs fn(0..n_chunks-1), each exactly once, on the calling thread plus available helpers; returns when all ran.
void run_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn);

}  // namespace pgf
