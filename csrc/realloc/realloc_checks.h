// Input validation shared by the CPU and CUDA backends of topk_realloc.
//
// topk_realloc(scores [n], sizes [L], r_min [L], r_max [L], budget) -> keep: bool [n]
//   Layer l owns the components [offset_l, offset_l + sizes[l]) of the flat score vector. The
//   kept set holds exactly min(budget, sum min(r_max, size)) components, at least r_min[l] and at
//   most r_max[l] of layer l, chosen by score (highest first; equal scores: lower flat index
//   first; NaN ranks as -inf).
#pragma once

#include <ATen/ATen.h>

namespace tsq::realloc {

struct Bounds {
  std::vector<int64_t> offset, lo, hi;  // hi = min(r_max, size)
  int64_t extra = 0;                    // components kept beyond the sum of r_min
};

inline Bounds check_realloc_inputs(const at::Tensor& scores, at::IntArrayRef sizes,
                                   at::IntArrayRef r_min, at::IntArrayRef r_max, int64_t budget) {
  TORCH_CHECK(scores.dim() == 1, "topk_realloc: scores must be 1-D [n], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "topk_realloc: scores must be float32 or float64, got ", scores.scalar_type());
  const size_t L = sizes.size();
  TORCH_CHECK(L >= 1, "topk_realloc: sizes must name at least one layer");
  TORCH_CHECK(r_min.size() == L && r_max.size() == L, "topk_realloc: sizes, r_min and r_max must "
              "have one entry per layer, got ", L, ", ", r_min.size(), ", ", r_max.size());
  Bounds b;
  int64_t n = 0, sum_lo = 0, sum_hi = 0;
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(sizes[l] >= 0, "topk_realloc: sizes[", l, "] = ", sizes[l], " is negative");
    TORCH_CHECK(0 <= r_min[l] && r_min[l] <= r_max[l] && r_min[l] <= sizes[l],
                "topk_realloc: layer ", l, " needs 0 <= r_min <= r_max and r_min <= size, got "
                "r_min=", r_min[l], ", r_max=", r_max[l], ", size=", sizes[l]);
    b.offset.push_back(n);
    b.lo.push_back(r_min[l]);
    b.hi.push_back(std::min(r_max[l], sizes[l]));
    n += sizes[l];
    sum_lo += r_min[l];
    sum_hi += b.hi.back();
  }
  TORCH_CHECK(n == scores.numel(), "topk_realloc: sizes add up to ", n, " but scores holds ",
              scores.numel(), " components");
  TORCH_CHECK_VALUE(budget >= sum_lo, "topk_realloc: budget ", budget, " is below the sum of r_min (",
              sum_lo, "); no allocation can respect both");
  b.extra = std::min(budget, sum_hi) - sum_lo;
  return b;
}

}  // namespace tsq::realloc
