// The prefetching batch loader (see batch_loader.h).
#include "data/batch_loader.h"

#include <pthread.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>

#include "data/text_util.h"

namespace tsq::data {
namespace {

// Uniform integer in [0, bound) from the counter-based stream (Lemire's multiply-shift).
inline uint64_t draw_below(uint64_t stream, uint64_t counter, uint64_t bound) {
  uint64_t r = splitmix64(stream ^ splitmix64(counter));
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * bound) >> 64);
}

void shuffle(std::vector<int64_t>& v, uint64_t stream) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[draw_below(stream, i, i)]);
}

// Every live loader, for the fork handlers. Never destroyed: a loader may outlive static
// destruction at exit.
struct LiveLoaders {
  std::mutex mu;
  std::set<BatchLoader*> loaders;
};
LiveLoaders& live_loaders() {
  static auto* live = new LiveLoaders();
  return *live;
}

}  // namespace

BatchLoader::BatchLoader(std::vector<int64_t> ids, std::vector<int64_t> offsets, std::vector<int64_t> labels,
                         LoaderConfig cfg)
    : ids_(std::move(ids)), offsets_(std::move(offsets)), labels_(std::move(labels)), cfg_(cfg) {
  if (offsets_.empty() || offsets_.front() != 0 || offsets_.back() != static_cast<int64_t>(ids_.size()))
    throw std::invalid_argument("BatchLoader: offsets must start at 0 and end at len(ids)");
  for (size_t i = 1; i < offsets_.size(); ++i)
    if (offsets_[i] < offsets_[i - 1]) throw std::invalid_argument("BatchLoader: offsets must not decrease");
  num_rows_ = static_cast<int64_t>(offsets_.size()) - 1;
  if (num_rows_ == 0) throw std::invalid_argument("BatchLoader: no rows");
  if (!labels_.empty() && static_cast<int64_t>(labels_.size()) != num_rows_)
    throw std::invalid_argument("BatchLoader: labels must have one entry per row");
  if (cfg_.batch_size < 1) throw std::invalid_argument("BatchLoader: batch_size must be >= 1");
  if (cfg_.world_size < 1 || cfg_.rank < 0 || cfg_.rank >= cfg_.world_size)
    throw std::invalid_argument("BatchLoader: need 0 <= rank < world_size");
  if (cfg_.pad_to_multiple_of < 1) throw std::invalid_argument("BatchLoader: pad_to_multiple_of must be >= 1");
  cfg_.num_workers = std::max(1, cfg_.num_workers);
  cfg_.prefetch = std::max<int64_t>(1, cfg_.prefetch);
  int64_t total = cfg_.drop_last ? num_rows_ / cfg_.batch_size
                                 : (num_rows_ + cfg_.batch_size - 1) / cfg_.batch_size;
  num_batches_ = total / cfg_.world_size;
  if (num_batches_ == 0)
    throw std::invalid_argument("BatchLoader: " + std::to_string(num_rows_) + " rows make no batch of " +
                                std::to_string(cfg_.batch_size) + " per rank for world_size " +
                                std::to_string(cfg_.world_size));
  static std::once_flag hooked;
  std::call_once(hooked, [] { pthread_atfork(&before_fork, &after_fork, &after_fork); });
  {
    std::lock_guard<std::mutex> lock(live_loaders().mu);
    live_loaders().loaders.insert(this);
  }
  seek(0, 0);
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(live_loaders().mu);
    live_loaders().loaders.erase(this);
  }
  leave_parent_workers();
  stop_workers();
}

std::vector<std::vector<int64_t>> BatchLoader::plan(int64_t epoch) const {
  const uint64_t stream = splitmix64(cfg_.seed ^ splitmix64(0x10ade7ULL + static_cast<uint64_t>(epoch)));
  std::vector<int64_t> order(num_rows_);
  std::iota(order.begin(), order.end(), 0);
  if (cfg_.shuffle) shuffle(order, stream);

  auto length = [&](int64_t r) {
    int64_t len = offsets_[r + 1] - offsets_[r];
    return cfg_.max_length > 0 ? std::min(len, cfg_.max_length) : len;
  };
  if (cfg_.bucket_multiplier > 1) {
    const int64_t mega = cfg_.batch_size * cfg_.bucket_multiplier;
    for (int64_t a = 0; a < num_rows_; a += mega) {
      auto first = order.begin() + a, last = order.begin() + std::min(num_rows_, a + mega);
      std::stable_sort(first, last, [&](int64_t x, int64_t y) { return length(x) > length(y); });
    }
  }
  std::vector<std::vector<int64_t>> batches;
  for (int64_t a = 0; a < num_rows_; a += cfg_.batch_size) {
    int64_t b = std::min(num_rows_, a + cfg_.batch_size);
    if (b - a < cfg_.batch_size && cfg_.drop_last) break;
    batches.emplace_back(order.begin() + a, order.begin() + b);
  }
  if (cfg_.shuffle) {
    std::vector<int64_t> perm(batches.size());
    std::iota(perm.begin(), perm.end(), 0);
    shuffle(perm, splitmix64(stream ^ 0xba7c4e5ULL));
    std::vector<std::vector<int64_t>> shuffled;
    shuffled.reserve(batches.size());
    for (int64_t p : perm) shuffled.push_back(std::move(batches[p]));
    batches = std::move(shuffled);
  }
  std::vector<std::vector<int64_t>> mine;
  for (int64_t k = 0; k < num_batches_; ++k) mine.push_back(std::move(batches[cfg_.rank + k * cfg_.world_size]));
  return mine;
}

Batch BatchLoader::build(const std::vector<int64_t>& rows) const {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t L = 1;
  for (int64_t r : rows) {
    int64_t len = offsets_[r + 1] - offsets_[r];
    if (cfg_.max_length > 0) len = std::min(len, cfg_.max_length);
    L = std::max(L, len);
  }
  L = (L + cfg_.pad_to_multiple_of - 1) / cfg_.pad_to_multiple_of * cfg_.pad_to_multiple_of;
  // Never wider than max_length: a model's position table may hold exactly max_length entries.
  if (cfg_.max_length > 0) L = std::min(L, cfg_.max_length);
  Batch out;
  out.input_ids = at::full({B, L}, cfg_.pad_id, at::kLong);
  out.attention_mask = at::zeros({B, L}, at::kLong);
  out.index = at::empty({B}, at::kLong);
  int64_t* x = out.input_ids.data_ptr<int64_t>();
  int64_t* m = out.attention_mask.data_ptr<int64_t>();
  int64_t* idx = out.index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = rows[b];
    int64_t len = offsets_[r + 1] - offsets_[r];
    if (cfg_.max_length > 0) len = std::min(len, cfg_.max_length);
    std::copy_n(ids_.data() + offsets_[r], len, x + b * L);
    std::fill_n(m + b * L, len, 1);
    idx[b] = r;
  }
  if (!labels_.empty()) {
    out.labels = at::empty({B}, at::kLong);
    int64_t* y = out.labels.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) y[b] = labels_[rows[b]];
  } else {
    out.labels = out.input_ids.masked_fill(out.attention_mask.eq(0), -100);
  }
  return out;
}

void BatchLoader::worker_loop() {
  Shared& sh = *sh_;
  for (;;) {
    int64_t q;
    {
      std::unique_lock<std::mutex> lock(sh.mu);
      sh.work_cv.wait(lock, [&] {
        return sh.stop || (sh.next_to_build < num_batches_ && sh.next_to_build < position_ + cfg_.prefetch);
      });
      if (sh.stop) return;
      q = sh.next_to_build++;
      ++sh.building;
    }
    std::optional<Batch> b;
    std::exception_ptr error;
    try {
      b = build(plan_[q]);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(sh.mu);
      --sh.building;
      if (b) sh.ready.emplace(q, std::move(*b));
      else if (!sh.error) sh.error = error;
    }
    sh.ready_cv.notify_all();
  }
}

void BatchLoader::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(sh_->mu);
    sh_->stop = true;
  }
  sh_->work_cv.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

void BatchLoader::start_workers() {
  sh_->stop = false;
  for (int t = 0; t < cfg_.num_workers; ++t) workers_.emplace_back([this] { worker_loop(); });
}

// fork() copies no threads: a child holds the parent's workers_ and shared state with no thread
// behind them, and the condition variables still count the parent's waiters, so even destroying
// them would hang. Joining would wait forever and destroying a joinable std::thread terminates, so
// the child leaks both on purpose and starts from a fresh state; the plan is a pure function of
// (seed, epoch), so workers restarted at the same position build the same batches.
void BatchLoader::leave_parent_workers() {
  if (getpid() == owner_) return;
  new std::vector<std::thread>(std::move(workers_));
  sh_.release();
  sh_ = std::make_unique<Shared>();
  owner_ = getpid();
}

// fork() copies only the calling thread. A worker inside build() at that moment may hold a lock or
// a half-done one-time initialisation inside ATen (seen: a dispatch stub's static guard), which the
// child, in its own workers or its own torch calls, would then wait for forever. So before a fork
// every loader lets the builds under way finish and keeps its lock, so that no worker starts
// another, until the fork is done; the forking thread then unlocks it in parent and child alike.
void BatchLoader::before_fork() {
  live_loaders().mu.lock();
  for (BatchLoader* l : live_loaders().loaders) {
    std::unique_lock<std::mutex> lock(l->sh_->mu);
    l->sh_->ready_cv.wait(lock, [&] { return l->sh_->building == 0; });
    lock.release();
  }
}

void BatchLoader::after_fork() {
  for (BatchLoader* l : live_loaders().loaders) l->sh_->mu.unlock();
  live_loaders().mu.unlock();
}

void BatchLoader::seek(int64_t epoch, int64_t position) {
  if (epoch < 0 || position < 0 || position > num_batches_)
    throw std::invalid_argument("BatchLoader: position " + std::to_string(position) + " outside [0, " +
                                std::to_string(num_batches_) + "] or negative epoch");
  leave_parent_workers();
  stop_workers();
  epoch_ = epoch;
  position_ = position;
  plan_ = plan(epoch);
  sh_->ready.clear();
  sh_->error = nullptr;
  sh_->next_to_build = position;
  start_workers();
}

std::optional<Batch> BatchLoader::next() {
  if (getpid() != owner_) seek(epoch_, position_);
  Shared& sh = *sh_;
  std::unique_lock<std::mutex> lock(sh.mu);
  if (position_ >= num_batches_) return std::nullopt;
  sh.ready_cv.wait(lock, [&] { return sh.error || sh.ready.count(position_); });
  if (sh.error) std::rethrow_exception(sh.error);
  auto node = sh.ready.extract(position_);
  ++position_;
  lock.unlock();
  sh.work_cv.notify_all();
  return std::move(node.mapped());
}

}  // namespace tsq::data
