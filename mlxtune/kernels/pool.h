// A persistent pool of worker threads for the kernels' row splits.
//
// A decode step calls ~200 small matmuls of 20-200 us each: starting std::threads per call
// (~30 us each) would cost more than the work. These workers stay alive, spin briefly after each
// job (the next one usually follows within microseconds) and then sleep on a condition variable.
// Tasks are claimed one at a time from a counter tagged with the job's epoch, so a worker that is
// late (descheduled by another process on a shared machine) simply takes none: the calling
// thread runs whatever is left, and never waits for a worker that has not started.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace mlxtune {

class Pool {
 public:
  using Task = void (*)(void* ctx, int64_t task);

  // The process-wide pool: one worker less than the usable cores (the caller is the last one).
  static Pool& instance();

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // fn(ctx, t) for every t in [0, tasks), on the calling thread and any idle workers; returns
  // when all are done. Not reentrant: one caller at a time (MLX's CPU stream is one thread).
  void run(int64_t tasks, Task fn, void* ctx);

 private:
  explicit Pool(int workers);
  void work(uint64_t epoch);
  void worker_loop();

  struct Job {
    std::atomic<Task> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> tasks{0};
    std::atomic<int64_t> done{0};
  };
  // Two slots: a late worker reading the previous job's slot can never see this job's fields
  // half-written, and its claim fails because the epoch in `next_` has moved on.
  Job jobs_[2];
  std::atomic<uint64_t> next_{0};  // epoch << 32 | next task to claim
  std::atomic<int> sleeping_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
};

// body(a, b) for row ranges covering [0, rows), split over the pool when the work is big enough
// (`cost` is the work per row, in weight elements touched or similar).
template <typename F>
void parallel_rows(int64_t rows, int64_t cost, F&& body, int64_t min_work = 1 << 16) {
  Pool& pool = Pool::instance();
  // A few tasks per thread, so a core that another process holds costs little.
  const int64_t by_work = rows * cost / min_work;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(by_work, 4 * pool.threads()));
  if (tasks == 1 || pool.threads() == 1) {
    body(int64_t{0}, rows);
    return;
  }
  const int64_t step = (rows + tasks - 1) / tasks;
  struct Ctx {
    F* body;
    int64_t rows, step;
  } ctx{&body, rows, step};
  pool.run((rows + step - 1) / step, [](void* p, int64_t t) {
    auto* c = static_cast<Ctx*>(p);
    (*c->body)(t * c->step, std::min(c->rows, (t + 1) * c->step));
  }, &ctx);
}

}  // namespace mlxtune
