// CPU backend of the sensitivity ops.
//
// sensitivity_update — the fused AdaLoRA-style importance update over ALL adapted layers.
//   Per element p of A, E, B (active components only):
//     I = |p * dp|,  Ibar <- b1 Ibar + (1-b1) I,  Ubar <- b2 Ubar + (1-b2) |I - Ibar_new|,
//     s = Ibar * Ubar
//   and per component k:  S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk).
//   Inactive components are not read and keep their EMAs and last score, so they can compete
//   (and grow back) at the next reallocation. A step whose consumed gradients hold NaN/inf leaves
//   every EMA and score untouched and counts itself in counters[1]; counters[0] counts applied
//   updates.
//   Work is cut into items of ~kGrain elements that never straddle a layer or a row: an A item is
//   a range of A's rows (each row is one component, so its mean completes inside the item and is
//   written straight to `row_part`), a B item is a range of B's rows [out, r] (contiguous, memory
//   order), whose per-column partial sums go to a small per-item slot of `col_part`. The element
//   data is read once in memory order; a final per-layer loop adds the parts into the scores.
//   The finite check is a first read of the active gradients only (a NaN must not half-apply).
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

#include <atomic>
#include <cmath>

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

template <typename T>
inline bool finite(T v) {
  return std::isfinite(static_cast<float>(v));
}

// One element's EMA update; returns its score s = Ibar * Ubar.
template <typename T>
inline float update_element(T p, T g, float& ipt, float& unc, float b1, float b2) {
  const float I = std::fabs(static_cast<float>(p) * static_cast<float>(g));
  const float ib = b1 * ipt + (1.f - b1) * I;
  const float ub = b2 * unc + (1.f - b2) * std::fabs(I - ib);
  ipt = ib;
  unc = ub;
  return ib * ub;
}

template <typename T>
void update_cpu(at::TensorList A, at::TensorList E, at::TensorList B, at::TensorList gA,
                at::TensorList gE, at::TensorList gB, at::TensorList ipt, at::TensorList unc,
                const bool* active, float* scores, int64_t* counters, float b1, float b2,
                const LayerShapes& s) {
  const Plan plan = make_plan(s);
  const int64_t n_items = (int64_t)plan.items.size();

  // Pass 1: is every gradient the update would consume finite?
  std::atomic<bool> bad{false};
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end && !bad.load(std::memory_order_relaxed); ++i) {
      const Item& it = plan.items[i];
      const int64_t l = it.layer, r = s.r[l], in = s.in[l];
      const bool* act = active + s.comp_offset[l];
      bool ok = true;
      if (it.kind == Kind::A) {
        const T* ga = gA[l].const_data_ptr<T>();
        const T* ge = gE[l].const_data_ptr<T>();
        for (int64_t k = it.row_begin; k < it.row_end; ++k) {
          if (!act[k]) continue;
          ok &= finite(ge[k]);
          for (int64_t j = 0; j < in; ++j) ok &= finite(ga[k * in + j]);
        }
      } else {
        const T* gb = gB[l].const_data_ptr<T>();
        for (int64_t j = it.row_begin; j < it.row_end; ++j)
          for (int64_t k = 0; k < r; ++k) ok &= !act[k] || finite(gb[j * r + k]);
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
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
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = plan.items[i];
      const int64_t l = it.layer, r = s.r[l], in = s.in[l];
      const bool* act = active + s.comp_offset[l];
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
          float sum = 0.f;
          for (int64_t j = 0; j < in; ++j) {
            const int64_t x = k * in + j;
            sum += update_element(a[x], ga[x], ipt_l[x], unc_l[x], b1, b2);
          }
          const float se =
              update_element(e[k], ge[k], ipt_l[e_base + k], unc_l[e_base + k], b1, b2);
          row_part[s.comp_offset[l] + k] = se + sum / static_cast<float>(in);
        }
      } else {
        const T* b = B[l].const_data_ptr<T>();
        const T* gb = gB[l].const_data_ptr<T>();
        const int64_t b_base = r * in + r;  // B's elements follow A's and E's
        float* part = col_part.data() + it.col_part_offset;
        for (int64_t j = it.row_begin; j < it.row_end; ++j) {
          for (int64_t k = 0; k < r; ++k) {
            if (!act[k]) continue;
            const int64_t x = j * r + k;
            part[k] += update_element(b[x], gb[x], ipt_l[b_base + x], unc_l[b_base + x], b1, b2);
          }
        }
      }
    }
  });

  // Combine: S_k = row_part + (sum over B items of the column sums) / out, active only.
  std::vector<int64_t> first_b_item(s.r.size(), -1);
  for (int64_t i = 0; i < n_items; ++i) {
    const Item& it = plan.items[i];
    if (it.kind == Kind::B && first_b_item[it.layer] < 0) first_b_item[it.layer] = i;
  }
  at::parallel_for(0, (int64_t)s.r.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const int64_t r = s.r[l], off = s.comp_offset[l];
      for (int64_t k = 0; k < r; ++k) {
        if (!active[off + k]) continue;
        float col = 0.f;
        for (int64_t i = first_b_item[l]; i < n_items && plan.items[i].layer == l; ++i)
          if (plan.items[i].kind == Kind::B) col += col_part[plan.items[i].col_part_offset + k];
        scores[off + k] = row_part[off + k] + col / static_cast<float>(s.out[l]);
      }
    }
  });
  counters[0] += 1;
}

void sensitivity_update_cpu(at::TensorList A, at::TensorList E, at::TensorList B,
                            at::TensorList gA, at::TensorList gE, at::TensorList gB,
                            at::TensorList ipt, at::TensorList unc, const at::Tensor& active_mask,
                            const at::Tensor& scores, const at::Tensor& counters, double beta1,
                            double beta2) {
  const LayerShapes s = check_update_inputs(A, E, B, gA, gE, gB, ipt, unc, active_mask, scores,
                                            counters, beta1, beta2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A[0].scalar_type(),
                                  "sensitivity_update_cpu", [&] {
    update_cpu<scalar_t>(A, E, B, gA, gE, gB, ipt, unc, active_mask.const_data_ptr<bool>(),
                         scores.data_ptr<float>(), counters.data_ptr<int64_t>(),
                         static_cast<float>(beta1), static_cast<float>(beta2), s);
  });
}

at::Tensor layer_sensitivity_cpu(const at::Tensor& weight, const at::Tensor& x,
                                 const at::Tensor& grad_out) {
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
  return at::scalar_tensor(total, w.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CPU, m) {
  m.impl("sensitivity_update", &sensitivity_update_cpu);
  m.impl("layer_sensitivity", &layer_sensitivity_cpu);
}

}  // namespace tsq::sensitivity
