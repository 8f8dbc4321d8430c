// The kernels' persistent thread pool (see pool.h for why it exists and how tasks are claimed).
#include "pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>

namespace mlxtune {
namespace {

// Workers spin this long for the next job before sleeping: within a decode step the matmuls come
// a few to a few tens of microseconds apart, and a futex wake-up costs about as much as a small
// matmul. Not longer: between steps (sampling, Python) a spinning worker only takes the core
// from the thread that has work, which on a 2-core machine shared with other jobs is costly.
constexpr auto SPIN = std::chrono::microseconds(50);
// While spinning, a worker yields its core every this many pauses (~1-2 us): generation builds
// the next step's graph in Python while this one evaluates, and a worker that only pauses held
// the core that thread needed (serve, one stream, ABBA rounds vs llama-server: 0.80x/0.82x ->
// 0.87x/0.92x; BatchGenerator's step -3 to -6%, 9 of 10 interleaved runs). With nothing else to
// run, sched_yield returns at once.
constexpr int YIELD_EVERY = 64;
// Past this many threads the kernels are bound by memory bandwidth, not by cores.
constexpr int MAX_THREADS = 8;

// A forked child has none of the parent's workers: it runs every job on its own thread.
std::atomic<bool> forked{false};

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// MLXTUNE_CPU_THREADS caps the threads (the caller's included), e.g. beside other work.
int usable_cores() {
  if (const char* cap = std::getenv("MLXTUNE_CPU_THREADS"); cap != nullptr && std::atoi(cap) > 0) {
    return std::atoi(cap);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

Pool& Pool::instance() {
  // Never destroyed: a forked child must not join threads it does not have, and the workers
  // end with the process.
  static Pool* pool = [] {
    pthread_atfork(nullptr, nullptr, [] { forked = true; });
    return new Pool(std::min(usable_cores(), MAX_THREADS) - 1);
  }();
  return *pool;
}

Pool::Pool(int workers) {
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void Pool::run(int64_t tasks, Task fn, void* ctx) {
  if (tasks <= 0) return;
  if (workers_.empty() || tasks == 1 || forked) {
    for (int64_t t = 0; t < tasks; ++t) fn(ctx, t);
    return;
  }
  const uint64_t epoch = (next_.load() >> 32) + 1;
  Job& job = jobs_[epoch & 1];
  job.fn.store(fn, std::memory_order_relaxed);
  job.ctx.store(ctx, std::memory_order_relaxed);
  job.tasks.store(tasks, std::memory_order_relaxed);
  job.done.store(0, std::memory_order_relaxed);
  next_.store(epoch << 32);  // publishes the fields above (seq_cst)
  if (sleeping_.load() > 0) {
    // Taking the mutex orders this wake-up after a worker's last look at `next_` before it sleeps.
    { std::lock_guard<std::mutex> lock(mutex_); }
    wake_.notify_all();
  }
  work(epoch);
  while (job.done.load(std::memory_order_acquire) < tasks) relax();
}

void Pool::work(uint64_t epoch) {
  Job& job = jobs_[epoch & 1];
  const Task fn = job.fn.load(std::memory_order_relaxed);
  void* ctx = job.ctx.load(std::memory_order_relaxed);
  const int64_t tasks = job.tasks.load(std::memory_order_relaxed);
  uint64_t cur = next_.load();
  // A claim succeeds only while `next_` still carries this epoch, so the fields read above were
  // this job's (a newer job would have moved the epoch first).
  while ((cur >> 32) == epoch && static_cast<int64_t>(cur & 0xffffffffu) < tasks) {
    if (next_.compare_exchange_weak(cur, cur + 1)) {
      fn(ctx, static_cast<int64_t>(cur & 0xffffffffu));
      job.done.fetch_add(1, std::memory_order_release);
      cur = next_.load();
    }
  }
}

void Pool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    auto epoch = [&] { return next_.load() >> 32; };
    const auto until = std::chrono::steady_clock::now() + SPIN;
    int spins = 0;
    while (epoch() == seen) {
      relax();
      if (++spins % YIELD_EVERY == 0) {
        if (std::chrono::steady_clock::now() > until) break;
        std::this_thread::yield();
      }
    }
    if (epoch() == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_.fetch_add(1);
      wake_.wait(lock, [&] { return epoch() != seen; });
      sleeping_.fetch_sub(1);
    }
    seen = epoch();
    work(seen);
  }
}

}  // namespace mlxtune
