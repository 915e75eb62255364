// CUDA backend of topk_realloc (rule: see topk_realloc_cpu.cpp and reference.topk_realloc).
//
// Everything stays on the device; the only host->device traffic is the per-layer bounds table
// (3 x L int64, pinned, non-blocking), so nothing waits for the GPU:
//   order   = stable sort of the scores, descending (NaN as -inf)     -> global key order
//   layer_of_kernel: key[j] = layer of order[j] (binary search in the layer offsets)
//   (layer_sorted, inner) = stable sort of key;  perm = order[inner]  -> per-layer key order
//     (int32 layer keys: the radix sort then makes half the passes of an int64 one)
//     (stable sorts keep equal scores in flat-index order, which is the tie rule)
//   classify_kernel: position i - offset[l] in the layer's order -> forced / candidate / out
//   rank    = inclusive cumsum over `order` of "is a candidate"
//   select_kernel: keep = forced, or candidate with rank <= extra
// Cost: two device sorts of n plus O(n) elementwise kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "realloc/realloc_checks.h"

namespace tsq::realloc {
namespace {

constexpr int kThreads = 256;

// status codes per component
constexpr int8_t kOut = 0, kCandidate = 1, kForced = 2;

__device__ __forceinline__ int64_t layer_of(const int64_t* offset, int64_t L, int64_t c) {
  int64_t lo = 0, hi = L - 1;  // last layer whose offset <= c
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offset[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void layer_of_kernel(const int64_t* __restrict__ order,   // [n]
                                const int64_t* __restrict__ bounds,  // [3, L]: offset, lo, hi
                                int64_t L, int64_t n,
                                int32_t* __restrict__ key) {         // [n]
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j < n) key[j] = static_cast<int32_t>(layer_of(bounds, L, order[j]));
}

__global__ void classify_kernel(const int64_t* __restrict__ perm,          // [n] per-layer order
                                const int32_t* __restrict__ layer_sorted,  // [n] layer of perm[i]
                                const int64_t* __restrict__ bounds,        // [3, L]
                                int64_t L, int64_t n,
                                int8_t* __restrict__ status) {             // [n] by flat index
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t l = layer_sorted[i];
  const int64_t pos = i - bounds[l];
  status[perm[i]] = pos < bounds[L + l] ? kForced : (pos < bounds[2 * L + l] ? kCandidate : kOut);
}

__global__ void select_kernel(const int64_t* __restrict__ order,   // [n] global key order
                              const int8_t* __restrict__ status,   // [n] by flat index
                              const int64_t* __restrict__ rank,    // [n] candidates so far, along order
                              int64_t extra, int64_t n,
                              bool* __restrict__ keep) {           // [n] by flat index
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  const int64_t c = order[j];
  keep[c] = status[c] == kForced || (status[c] == kCandidate && rank[j] <= extra);
}

at::Tensor topk_realloc_cuda(const at::Tensor& scores, const at::Tensor& bounds, int64_t budget) {
  const Bounds b = check_realloc_inputs(scores, bounds, budget);
  const c10::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = scores.numel();
  const int64_t L = static_cast<int64_t>(b.offset.size());
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "topk_realloc: at most 2^31 - 1 layers");
  at::Tensor keep = at::empty({n}, scores.options().dtype(at::kBool));
  if (n == 0) return keep;

  at::Tensor host = at::empty({3 * L}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, b.offset.data(), L * sizeof(int64_t));
  std::memcpy(h + L, b.lo.data(), L * sizeof(int64_t));
  std::memcpy(h + 2 * L, b.hi.data(), L * sizeof(int64_t));
  const at::Tensor table = host.to(scores.device(), /*non_blocking=*/true);  // offset, lo, hi

  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor key = at::nan_to_num(scores, -inf, inf, -inf);
  const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, 0, /*descending=*/true));
  at::Tensor layer_key = at::empty({n}, order.options().dtype(at::kInt));
  const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  layer_of_kernel<<<blocks, kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(),
                                                   table.const_data_ptr<int64_t>(), L, n,
                                                   layer_key.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto [layer_sorted, inner] = at::sort(layer_key, /*stable=*/true, 0, /*descending=*/false);
  const at::Tensor perm = order.index_select(0, inner);
  at::Tensor status = at::empty({n}, scores.options().dtype(at::kChar));
  classify_kernel<<<blocks, kThreads, 0, stream>>>(
      perm.const_data_ptr<int64_t>(), layer_sorted.const_data_ptr<int32_t>(),
      table.const_data_ptr<int64_t>(), L, n, status.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor rank = at::cumsum(status.index_select(0, order).eq(kCandidate), 0, at::kLong);
  select_kernel<<<blocks, kThreads, 0, stream>>>(order.const_data_ptr<int64_t>(),
                                                 status.const_data_ptr<int8_t>(),
                                                 rank.const_data_ptr<int64_t>(), b.extra, n,
                                                 keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CUDA, m) {
  m.impl("topk_realloc", &topk_realloc_cuda);
}

}  // namespace tsq::realloc
