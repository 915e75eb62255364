// A fixed-size pool of worker threads for the data pipeline (reading, gating, selection).
//
// parallel_for(n, grain, fn) splits [0, n) into chunks of `grain` indices that the workers and
// the calling thread claim from one atomic counter, so uneven documents balance themselves.
// Every index is processed exactly once and each task writes only its own output slots, which is
// why every result of the data pipeline is identical for any thread count. The first exception
// thrown by a task is rethrown in the caller once all claimed chunks have finished.
//
// A job can be cancelled from another thread (the Python bindings do when the user presses
// Ctrl-C): no chunk starts once cancel_requested() is set, and parallel_for throws Interrupted.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace tsq::data {

// Set to stop the data pipeline's running job; the one who sets it clears it when the job is over.
inline std::atomic<bool>& cancel_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}

struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

inline void throw_if_cancelled() {
  if (cancel_requested().load(std::memory_order_relaxed)) throw Interrupted();
}

// All hardware threads (at least 1): the default thread count everywhere.
inline int default_num_threads() {
  return std::max(1u, std::thread::hardware_concurrency());
}

// `requested` <= 0 means "all cores".
inline int resolve_num_threads(int requested) {
  return requested > 0 ? requested : default_num_threads();
}

class ThreadPool {
 public:
  // `num_threads` counts the caller: a pool of 1 runs everything on the calling thread.
  explicit ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)), owner_(getpid()) {
    try {
      for (int t = 1; t < num_threads_; ++t) workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error& e) {
      // The workers started must be joined before this object is unwound: destroying a joinable
      // thread aborts, and the condition variables they wait on must outlive them (a hang).
      const size_t started = workers_.size();
      stop();
      throw std::runtime_error("cannot start " + std::to_string(num_threads_ - 1) +
                               " worker threads (" + std::to_string(started) + " started: " +
                               e.what() + "); ask for fewer threads");
    }
  }

  ~ThreadPool() { stop(); }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  // Whether this process is a fork()ed child of the one that started the workers.
  bool forked() const { return getpid() != owner_; }

  // fn(begin, end) over chunks of [0, n). Jobs from different callers run one after another.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    if (num_threads_ == 1 || n <= grain) {
      for (int64_t begin = 0; begin < n; begin += grain) {
        throw_if_cancelled();
        fn(begin, std::min(n, begin + grain));
      }
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      grain_ = grain;
      next_.store(0);
      error_ = nullptr;
      busy_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    run_chunks();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void run_chunks() {
    for (;;) {
      int64_t begin = next_.fetch_add(grain_);
      if (begin >= n_) return;
      try {
        throw_if_cancelled();
        (*fn_)(begin, std::min(n_, begin + grain_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);  // stop handing out work
      }
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_chunks();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--busy_ == 0) done_.notify_one();
      }
    }
  }

  const int num_threads_;
  const pid_t owner_;
  std::vector<std::thread> workers_;
  std::mutex job_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int busy_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// The process-wide pool, rebuilt when a call asks for another thread count.
//
// fork() copies no threads: a child's copy of the pool has no workers behind it, and its
// condition variables still count the parent's waiters, so neither a job nor the destructor could
// ever finish there. A child therefore leaves that copy alone (leaked on purpose) and builds a
// pool of its own; and the pool is never destroyed at exit, where a child that ran no job would
// otherwise hang (the parent's workers simply end with the process).
inline std::shared_ptr<ThreadPool> shared_pool(int requested) {
  static std::mutex mu;
  static auto* pool = new std::shared_ptr<ThreadPool>();
  int n = resolve_num_threads(requested);
  std::lock_guard<std::mutex> lock(mu);
  if (*pool && (*pool)->forked()) pool = new std::shared_ptr<ThreadPool>();
  if (!*pool || (*pool)->num_threads() != n) *pool = std::make_shared<ThreadPool>(n);
  return *pool;
}

}  // namespace tsq::data
