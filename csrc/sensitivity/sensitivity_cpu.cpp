// CPU backend of the sensitivity ops.
//
// sensitivity_update — the fused AdaLoRA-style importance update over ALL adapted layers.
//   Per element p of A, E, B (active components only):
//     I = |p * dp|,  Ibar <- b1 Ibar + (1-b1) I,  Ubar <- b2 Ubar + (1-b2) |I - Ibar_new|,
//     s = Ibar * Ubar
//   and per component k:  S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk).
//   Inactive components keep their EMAs and last score (their values never enter), so they compete
//   (and grow back) at the next reallocation. A step whose consumed gradients hold NaN/inf leaves
//   every EMA and score untouched and counts itself in counters[1]; counters[0] counts applied
//   updates.
//   Work is cut into items of ~kGrain elements that never straddle a layer or a row: an A item is
//   a range of A's rows (each row is one component, so its mean completes inside the item and is
//   written straight to `row_part`), a B item is a range of B's rows [out, r] (contiguous, memory
//   order), whose per-column partial sums go to a small per-item slot of `col_part`. The element
//   data is read once in memory order; a final per-layer loop adds the parts into the scores.
//   The finite check is a first read of the active gradients only (a NaN must not half-apply);
//   a caller that already knows them finite (check_finite=false) saves that read.
//   The inner loops are branch-free elementwise spans (vectorized for float) that sum the scores as
//   they go; a layer with inactive components blends its B rows (inactive columns keep their EMAs
//   and add 0). Parallel tasks get ~kTaskElems elements each, so a small adapter set runs serially.
//
// layer_sensitivity — S = sum |W ⊙ (δᵀX)| with W [out, in], X [N, in], δ [N, out]. Output rows are
//   cut into tiles of ~kTileElems elements; each tile's δ_tileᵀX is one small GEMM into a
//   tile-sized buffer that stays in cache and is reduced against W at once, so the full [out, in]
//   gradient never exists. parallel_for runs over tiles (BLAS inside runs single-threaded there,
//   which is what we want: the parallelism is across tiles); per-tile partial sums are added in
//   tile order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>

#include "sensitivity/sensitivity_checks.h"

namespace tsq::sensitivity {
namespace {

constexpr int64_t kGrain = 1 << 14;      // elements per update work item
constexpr int64_t kTileElems = 1 << 15;  // elements of one δᵀX tile (128 KiB in float32)

enum class Kind { A, B };

struct Item {
  int64_t layer;
  Kind kind;
  int64_t row_begin, row_end;
  int64_t col_part_offset;  // B items: where this item's r partial sums live in col_part
};

struct Plan {
  std::vector<Item> items;
  int64_t col_part_size = 0;
};

Plan make_plan(const LayerShapes& s) {
  Plan plan;
  for (int64_t l = 0; l < (int64_t)s.r.size(); ++l) {
    const int64_t a_rows = std::max<int64_t>(1, kGrain / s.in[l]);
    for (int64_t k = 0; k < s.r[l]; k += a_rows)
      plan.items.push_back({l, Kind::A, k, std::min(k + a_rows, s.r[l]), -1});
    const int64_t b_rows = std::max<int64_t>(1, kGrain / s.r[l]);
    for (int64_t j = 0; j < s.out[l]; j += b_rows) {
      plan.items.push_back({l, Kind::B, j, std::min(j + b_rows, s.out[l]), plan.col_part_size});
      plan.col_part_size += s.r[l];
    }
  }
  return plan;
}

// Elementwise kernels, written branch-free over __restrict__ spans so the compiler vectorizes
// them for float (the common case); half/bfloat16 convert per element.
inline bool nonfinite_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}

// Any non-finite g[i] among those with m[i] != 0 (m == nullptr: all).
template <typename T>
bool any_nonfinite(const T* __restrict__ g, const uint8_t* __restrict__ m, int64_t n) {
  uint32_t bad = 0;
  if (m == nullptr) {
    for (int64_t i = 0; i < n; ++i) bad |= nonfinite_bits(static_cast<float>(g[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) bad |= m[i] & nonfinite_bits(static_cast<float>(g[i]));
  }
  return bad != 0;
}

// a where mask is all ones, b where it is 0, bit for bit. Integer ops, because GCC does not
// vectorize the same choice written as a ? : over floats (a branch per element: the masked
// update ran at half the speed of the unmasked one).
inline float select_bits(float a, float b, uint32_t mask) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint32_t u = (ua & mask) | (ub & ~mask);
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// The EMA update of n elements in place (n a multiple of w), adding each element's score
// Ibar * Ubar to acc[t % w]. The scores are summed as the data streams by rather than stored and
// read back in a second loop: at r = 12 that second loop over B's [rows, r] scores (a short
// column-sum chain per row) cost ~40% of B's update, which is otherwise bound by memory bandwidth.
// w lanes of independent sums keep the adds off one serial chain. With Masked, an element whose
// keep[t % w] is 0 (not ~0) keeps its EMAs and adds 0.
template <typename T, bool Masked>
void update_sum(const T* __restrict__ p, const T* __restrict__ g, float* __restrict__ ipt,
                float* __restrict__ unc, float* __restrict__ acc, const uint32_t* __restrict__ keep,
                int64_t n, int64_t w, EmaWeights ew) {
  for (int64_t t = 0; t < n; t += w) {
    const T* pt = p + t;
    const T* gt = g + t;
    float* it = ipt + t;
    float* ut = unc + t;
    for (int64_t q = 0; q < w; ++q) {
      const float I = std::fabs(static_cast<float>(pt[q]) * static_cast<float>(gt[q]));
      const float ib = ew.b1 * it[q] + ew.c1 * I;
      const float ub = ew.b2 * ut[q] + ew.c2 * std::fabs(I - ib);
      if constexpr (Masked) {
        it[q] = select_bits(ib, it[q], keep[q]);
        ut[q] = select_bits(ub, ut[q], keep[q]);
        acc[q] += select_bits(ib * ub, 0.f, keep[q]);
      } else {
        it[q] = ib;
        ut[q] = ub;
        acc[q] += ib * ub;
      }
    }
  }
}

// update_sum over any n: whole blocks of w lanes, then the remainder (n % w elements, a multiple
// of the period of keep) as one block of its own.
template <typename T, bool Masked>
void update_sum_any(const T* p, const T* g, float* ipt, float* unc, float* acc, const uint32_t* keep,
                    int64_t n, int64_t w, EmaWeights ew) {
  const int64_t whole = n / w * w;
  update_sum<T, Masked>(p, g, ipt, unc, acc, keep, whole, w, ew);
  if (n > whole)
    update_sum<T, Masked>(p + whole, g + whole, ipt + whole, unc + whole, acc, keep, n - whole,
                          n - whole, ew);
}

// Lanes for summing a B item's [rows, r] scores by column: a multiple of r (so lane q always
// holds column q % r) and of 8 floats where possible, at least 64 wide.
int64_t column_lanes(int64_t r) {
  int64_t w = r * (8 / std::gcd<int64_t>(r, 8));
  while (w < 64) w *= 2;
  return w;
}
constexpr int64_t kRowLanes = 64;  // lanes for summing an A row

// Grain (in items) giving each parallel task ~kTaskElems elements, so small adapter sets run on
// one thread instead of paying for a parallel region.
constexpr int64_t kTaskElems = 1 << 20;
int64_t item_grain(int64_t n_items, int64_t total_elems) {
  const int64_t tasks = std::max<int64_t>(1, total_elems / kTaskElems);
  return std::max<int64_t>(1, (n_items + tasks - 1) / tasks);
}

template <typename T>
void update_cpu(at::TensorList A, at::TensorList E, at::TensorList B, at::TensorList gA,
                at::TensorList gE, at::TensorList gB, at::TensorList ipt, at::TensorList unc,
                const uint8_t* active, float* scores, int64_t* counters, EmaWeights ew,
                bool check_finite, const LayerShapes& s) {
  const Plan plan = make_plan(s);
  const int64_t n_items = (int64_t)plan.items.size();
  int64_t total_elems = 0;
  std::vector<bool> all_active(s.r.size());
  for (size_t l = 0; l < s.r.size(); ++l) {
    total_elems += s.r[l] * (s.in[l] + 1 + s.out[l]);
    all_active[l] = std::all_of(active + s.comp_offset[l], active + s.comp_offset[l] + s.r[l],
                                [](uint8_t a) { return a != 0; });
  }
  const int64_t grain = item_grain(n_items, total_elems);
  // mask pattern of a B item: pattern[j * r + k] = active[k] for the item's rows
  auto b_pattern = [&](const Item& it, std::vector<uint8_t>& pat) {
    const int64_t r = s.r[it.layer];
    const uint8_t* act = active + s.comp_offset[it.layer];
    pat.resize((it.row_end - it.row_begin) * r);
    for (size_t t = 0; t < pat.size(); ++t) pat[t] = act[t % r] ? 1 : 0;
  };

  // Pass 1: is every gradient the update would consume finite?
  std::atomic<bool> bad{false};
  if (check_finite) at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> pat;
    for (int64_t i = begin; i < end && !bad.load(std::memory_order_relaxed); ++i) {
      const Item& it = plan.items[i];
      const int64_t l = it.layer, r = s.r[l], in = s.in[l];
      const uint8_t* act = active + s.comp_offset[l];
      bool found = false;
      if (it.kind == Kind::A) {
        const T* ga = gA[l].const_data_ptr<T>();
        const T* ge = gE[l].const_data_ptr<T>();
        for (int64_t k = it.row_begin; k < it.row_end; ++k)
          if (act[k]) found |= any_nonfinite(ga + k * in, nullptr, in) || any_nonfinite(ge + k, nullptr, 1);
      } else {
        const T* gb = gB[l].const_data_ptr<T>() + it.row_begin * r;
        const int64_t len = (it.row_end - it.row_begin) * r;
        if (all_active[l]) {
          found = any_nonfinite(gb, nullptr, len);
        } else {
          b_pattern(it, pat);
          found = any_nonfinite(gb, pat.data(), len);
        }
      }
      if (found) bad.store(true, std::memory_order_relaxed);
    }
  });
  if (bad.load()) {
    counters[1] += 1;
    return;
  }

  // Pass 2: the update. row_part[c]: s(E_k) + mean_j s(A_kj) of component c; col_part: per-B-item
  // column sums of s(B_jk).
  std::vector<float> row_part(s.n_components, 0.f);
  std::vector<float> col_part(plan.col_part_size, 0.f);
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    std::vector<uint32_t> keep;
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = plan.items[i];
      const int64_t l = it.layer, r = s.r[l], in = s.in[l];
      const uint8_t* act = active + s.comp_offset[l];
      float* ipt_l = ipt[l].data_ptr<float>();
      float* unc_l = unc[l].data_ptr<float>();
      if (it.kind == Kind::A) {
        const T* a = A[l].const_data_ptr<T>();
        const T* ga = gA[l].const_data_ptr<T>();
        const T* e = E[l].const_data_ptr<T>();
        const T* ge = gE[l].const_data_ptr<T>();
        const int64_t e_base = r * in;  // E's elements follow A's in the state buffers
        for (int64_t k = it.row_begin; k < it.row_end; ++k) {
          if (!act[k]) continue;
          const int64_t x = k * in;
          acc.assign(std::min(kRowLanes, in), 0.f);  // (no wider than the row: less to add up)
          update_sum_any<T, false>(a + x, ga + x, ipt_l + x, unc_l + x, acc.data(), nullptr, in,
                                   (int64_t)acc.size(), ew);
          float se = 0.f;
          update_sum<T, false>(e + k, ge + k, ipt_l + e_base + k, unc_l + e_base + k, &se, nullptr,
                               1, 1, ew);
          float row = 0.f;
          for (float v : acc) row += v;
          row_part[s.comp_offset[l] + k] = se + row / static_cast<float>(in);
        }
      } else {
        const int64_t x0 = it.row_begin * r, len = (it.row_end - it.row_begin) * r;
        const T* b = B[l].const_data_ptr<T>() + x0;
        const T* gb = gB[l].const_data_ptr<T>() + x0;
        float* ib = ipt_l + r * in + r + x0;  // B's elements follow A's and E's
        float* ub = unc_l + r * in + r + x0;
        const int64_t w = std::min(column_lanes(r), len);  // (both multiples of r)
        acc.assign(w, 0.f);
        if (all_active[l]) {
          update_sum_any<T, false>(b, gb, ib, ub, acc.data(), nullptr, len, w, ew);
        } else {
          keep.resize(w);
          for (int64_t q = 0; q < w; ++q) keep[q] = act[q % r] ? ~0u : 0u;
          update_sum_any<T, true>(b, gb, ib, ub, acc.data(), keep.data(), len, w, ew);
        }
        float* part = col_part.data() + it.col_part_offset;
        for (int64_t q = 0; q < w; ++q) part[q % r] += acc[q];
      }
    }
  });

  // Combine: S_k = row_part + (sum over B items of the column sums) / out, active only.
  std::vector<int64_t> first_b_item(s.r.size(), -1);
  for (int64_t i = 0; i < n_items; ++i) {
    const Item& it = plan.items[i];
    if (it.kind == Kind::B && first_b_item[it.layer] < 0) first_b_item[it.layer] = i;
  }
  // (O(n_components x B items per layer): tiny, so serial.)
  for (int64_t l = 0; l < (int64_t)s.r.size(); ++l) {
    const int64_t r = s.r[l], off = s.comp_offset[l];
    for (int64_t k = 0; k < r; ++k) {
      if (!active[off + k]) continue;
      float col = 0.f;
      for (int64_t i = first_b_item[l]; i < n_items && plan.items[i].layer == l; ++i)
        if (plan.items[i].kind == Kind::B) col += col_part[plan.items[i].col_part_offset + k];
      scores[off + k] = row_part[off + k] + col / static_cast<float>(s.out[l]);
    }
  }
  counters[0] += 1;
}

void sensitivity_update_cpu(at::TensorList A, at::TensorList E, at::TensorList B,
                            at::TensorList gA, at::TensorList gE, at::TensorList gB,
                            at::TensorList ipt, at::TensorList unc, const at::Tensor& active_mask,
                            const at::Tensor& scores, const at::Tensor& counters, double beta1,
                            double beta2, bool check_finite) {
  const LayerShapes s = check_update_inputs(A, E, B, gA, gE, gB, ipt, unc, active_mask, scores,
                                            counters, beta1, beta2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A[0].scalar_type(),
                                  "sensitivity_update_cpu", [&] {
    update_cpu<scalar_t>(A, E, B, gA, gE, gB, ipt, unc, mask_bytes(active_mask),
                         scores.data_ptr<float>(), counters.data_ptr<int64_t>(),
                         ema_weights(beta1, beta2), check_finite, s);
  });
}

at::Tensor layer_sensitivity_cpu(const at::Tensor& weight, const at::Tensor& x,
                                 const at::Tensor& grad_out) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [w, x2, d] = check_layer_sensitivity_inputs(weight, x, grad_out);
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / in);
  const int64_t n_tiles = (out + tile_rows - 1) / tile_rows;
  std::vector<double> partial(n_tiles, 0.0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "layer_sensitivity_cpu", [&] {
    at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, out - r0);
        // [rows, N] @ [N, in]: the gradient of this tile of W's rows only.
        const at::Tensor g = at::mm(d.narrow(1, r0, rows).t(), x2).contiguous();
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const scalar_t* wp = w.const_data_ptr<scalar_t>() + r0 * in;
        double acc = 0.0;
        for (int64_t i = 0; i < rows * in; ++i) acc += std::fabs(wp[i] * gp[i]);
        partial[t] = acc;
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  // Through a float64 tensor: a sum past the float32 range becomes inf, as the reference's,
  // where scalar_tensor's checked conversion would throw.
  return at::scalar_tensor(total, w.options().dtype(at::kDouble)).to(w.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CPU, m) {
  m.impl("sensitivity_update", &sensitivity_update_cpu);
  m.impl("layer_sensitivity", &layer_sensitivity_cpu);
}

}  // namespace tsq::sensitivity
