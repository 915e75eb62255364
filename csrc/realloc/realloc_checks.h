// Input validation shared by the CPU and CUDA backends of topk_realloc.
//
// topk_realloc(scores [n], bounds [3, L], budget) -> keep: bool [n]
//   bounds is a CPU int64 table with rows sizes, r_min, r_max (ops.realloc_bounds builds it).
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

inline Bounds check_realloc_inputs(const at::Tensor& scores, const at::Tensor& bounds,
                                   int64_t budget) {
  TORCH_CHECK(scores.dim() == 1, "topk_realloc: scores must be 1-D [n], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "topk_realloc: scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK(bounds.device().is_cpu() && bounds.scalar_type() == at::kLong && bounds.dim() == 2 &&
                  bounds.size(0) == 3,
              "topk_realloc: bounds must be a CPU int64 tensor [3, L] with rows sizes, r_min, "
              "r_max (ops.realloc_bounds builds it), got ", bounds.scalar_type(), " ",
              bounds.sizes(), " on ", bounds.device());
  const int64_t L = bounds.size(1);
  TORCH_CHECK(L >= 1, "topk_realloc: bounds must name at least one layer");
  const at::Tensor table = bounds.contiguous();
  const int64_t* sizes = table.const_data_ptr<int64_t>();
  const int64_t* r_min = sizes + L;
  const int64_t* r_max = sizes + 2 * L;
  Bounds b;
  b.offset.reserve(L), b.lo.reserve(L), b.hi.reserve(L);
  int64_t n = 0, sum_lo = 0, sum_hi = 0;
  for (int64_t l = 0; l < L; ++l) {
    // Against what is left of scores, so that the running sums cannot overflow int64.
    TORCH_CHECK(0 <= sizes[l] && sizes[l] <= scores.numel() - n, "topk_realloc: sizes[", l, "] = ",
                sizes[l], " is negative or runs past the ", scores.numel(), " scores");
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
