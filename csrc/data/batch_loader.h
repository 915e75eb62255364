// A prefetching loader of padded, length-bucketed batches over token-id sequences.
//
// Input: the rows' token ids as one flat int64 array plus offsets (row i is ids[off[i], off[i+1])),
// tokenized once on the Python side, and optionally one class label per row.
//
// Epoch plan (a pure function of (seed, epoch), so training can resume at any batch exactly):
//   1. permute the rows (Fisher-Yates on the counter-based stream of (seed, epoch));
//   2. cut the permutation into mega-batches of batch_size·bucket_multiplier rows and sort each
//      by length (longest first, ties by permutation order), so a batch holds rows of similar
//      length and padding is small;
//   3. cut those into batches and shuffle the batch order (same stream);
//   4. shard: rank r of world_size takes batches r, r + w, r + 2w, ...; every rank gets
//      floor(batches / world_size) of them so ranks stay in step (at most w - 1 batches an epoch
//      are skipped, different ones each epoch).
// Batches: input_ids [B, L] (pad_id beyond each row), attention_mask [B, L] (1 on tokens),
// labels [B] (class labels) or [B, L] (the input ids with -100 on padding, for language models),
// index [B] (row ids). L = longest row in the batch rounded up to pad_to_multiple_of, but never past
// max_length (when set).
// num_workers threads build the next `prefetch` batches while the caller trains on the current one.
// fork() waits for batches being built, and a loader used in a fork()ed child starts workers of its
// own there, at the same position.
#pragma once

#include <ATen/ATen.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace tsq::data {

struct LoaderConfig {
  int64_t batch_size = 32;
  int64_t pad_id = 0;
  int64_t max_length = 0;           // > 0: truncate rows to this many tokens
  int64_t pad_to_multiple_of = 1;
  int64_t bucket_multiplier = 50;   // <= 1: no length bucketing
  bool shuffle = true;
  bool drop_last = false;
  uint64_t seed = 0;
  int64_t rank = 0;
  int64_t world_size = 1;
  int num_workers = 2;
  int64_t prefetch = 4;
};

struct Batch {
  at::Tensor input_ids, attention_mask, labels, index;
};

class BatchLoader {
 public:
  BatchLoader(std::vector<int64_t> ids, std::vector<int64_t> offsets, std::vector<int64_t> labels,
              LoaderConfig cfg);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Batches per epoch for this rank.
  int64_t num_batches() const { return num_batches_; }
  int64_t epoch() const { return epoch_; }
  int64_t position() const { return position_; }
  // Moves to batch `position` of `epoch` and restarts prefetching there.
  void seek(int64_t epoch, int64_t position);
  // The batch at the current position (then advances), or nullopt at the end of the epoch.
  std::optional<Batch> next();
  // The row ids of every batch of `epoch` for this rank, in order (for tests and inspection).
  std::vector<std::vector<int64_t>> plan(int64_t epoch) const;

 private:
  Batch build(const std::vector<int64_t>& rows) const;
  void worker_loop();
  void stop_workers();
  void start_workers();
  void leave_parent_workers();
  static void before_fork();
  static void after_fork();

  std::vector<int64_t> ids_, offsets_, labels_;
  LoaderConfig cfg_;
  int64_t num_rows_ = 0, num_batches_ = 0;

  int64_t epoch_ = 0, position_ = 0;
  std::vector<std::vector<int64_t>> plan_;  // this rank's batches in the current epoch

  // What the workers share with the caller, apart so that a fork()ed child can start afresh.
  struct Shared {
    std::mutex mu;
    std::condition_variable work_cv, ready_cv;
    std::map<int64_t, Batch> ready;
    std::exception_ptr error;
    int64_t next_to_build = 0;
    int64_t building = 0;  // workers inside build()
    bool stop = false;
  };
  std::unique_ptr<Shared> sh_ = std::make_unique<Shared>();
  std::vector<std::thread> workers_;
  pid_t owner_ = getpid();  // the process workers_ run in
};

}  // namespace tsq::data
