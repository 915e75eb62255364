// CPU backend of topk_realloc: the global top-b selection of components under per-layer bounds.
//
// Order every layer's components by the key (score desc, flat index asc; NaN as -inf). Its first
// r_min are kept unconditionally ("forced"), positions r_min .. min(r_max, size)-1 are candidates,
// the rest are out. Of all candidates, the `extra` = min(b, sum hi) - sum r_min best by the same
// key are kept. Because both selections use one key, the candidates kept in a layer are a prefix
// of its order, so the result is the unique best set under the bounds, and raising one kept
// component's score can never drop it.
// Cost: per-layer std::sort (parallel over layers) + one nth_element over the candidates,
// O(n log n). Memory: one int64 permutation of n.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "realloc/realloc_checks.h"

namespace tsq::realloc {
namespace {

template <typename T>
at::Tensor topk_realloc_impl(const at::Tensor& scores_in, const Bounds& b) {
  const at::Tensor scores = scores_in.contiguous();
  const T* raw = scores.const_data_ptr<T>();
  const int64_t n = scores.numel();
  const int64_t L = (int64_t)b.offset.size();
  auto key = [raw](int64_t i) {
    const T v = raw[i];
    return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
  };
  // before(i, j): i ranks ahead of j. A strict weak order since NaN is mapped first.
  auto before = [&](int64_t i, int64_t j) {
    const T a = key(i), c = key(j);
    return a > c || (a == c && i < j);
  };

  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  at::Tensor keep = at::zeros({n}, scores.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  // ~32k components per parallel task: a small model sorts on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) * L / std::max<int64_t>(n, 1));
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const int64_t off = b.offset[l];
      const int64_t size = (l + 1 < L ? b.offset[l + 1] : n) - off;
      std::sort(order.begin() + off, order.begin() + off + size, before);
      for (int64_t p = 0; p < b.lo[l]; ++p) kp[order[off + p]] = true;
    }
  });
  if (b.extra > 0) {
    std::vector<int64_t> cand;
    for (int64_t l = 0; l < L; ++l)
      cand.insert(cand.end(), order.begin() + b.offset[l] + b.lo[l],
                  order.begin() + b.offset[l] + b.hi[l]);
    std::nth_element(cand.begin(), cand.begin() + (b.extra - 1), cand.end(), before);
    for (int64_t p = 0; p < b.extra; ++p) kp[cand[p]] = true;
  }
  return keep;
}

at::Tensor topk_realloc_cpu(const at::Tensor& scores, const at::Tensor& bounds, int64_t budget) {
  const Bounds b = check_realloc_inputs(scores, bounds, budget);
  return AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "topk_realloc_cpu",
                                    [&] { return topk_realloc_impl<scalar_t>(scores, b); });
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CPU, m) {
  m.impl("topk_realloc", &topk_realloc_cpu);
}

}  // namespace tsq::realloc
