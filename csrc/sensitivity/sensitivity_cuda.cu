// CUDA backend of the sensitivity ops.
//
// sensitivity_update — the fused importance update over ALL adapted layers (math: see
// sensitivity_cpu.cpp and reference.sensitivity_update). Per call, on the current stream, with no
// host sync:
//   1. one H2D copy (pinned, non-blocking) of a small table: per-layer pointers/shapes and the work
//      items;
//   2. one memset of a workspace: acc [n_comp] partial scores | flag | done [L] counters;
//   3. nonfinite_check_kernel: one launch over all layers; reads only the gradients of active
//      components and raises `flag` if one is NaN/inf. The update must not start before the
//      whole step is known to be finite (a half-applied step cannot be undone), so this is a
//      separate launch: the kernel boundary is the grid-wide barrier. Not launched when the
//      caller already knows the gradients finite (check_finite=false): `flag` stays 0;
//   4. sensitivity_update_kernel: one launch over all layers. With `flag` raised every block exits
//      and counters[1] += 1. Otherwise each block runs one work item:
//        - kind A: row k of A (one component, contiguous, coalesced) plus E_k; a block reduction
//          gives s(E_k) + mean_j s(A_kj), atomically added to acc[k];
//        - kind B: a tile of consecutive rows of B [out, r] (contiguous). Threads stride by a
//          multiple of r, so each thread always meets the same column: one register partial per
//          thread, folded in shared memory, then one atomicAdd per column into acc.
//      Inactive components are skipped without reading their data. The last block to finish a
//      layer (per-layer done counter, threadfence reduction) copies that layer's active acc into
//      scores, so inactive scores keep their last value and no per-element score tensor exists.
//   Traffic per active element: read p, grad, Ibar, Ubar, write Ibar, Ubar, plus the grad again in
//   the check (7 accesses for 6 useful ones).
//
// layer_sensitivity — S = sum |W ⊙ (δᵀX)|: δᵀX is formed per tile of W's rows by cuBLAS (at::mm)
//   into a tile buffer of at most kTileElems elements and reduced against W by
//   abs_product_sum_kernel into a float64 accumulator (atomicAdd of block sums); nothing is copied
//   to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>

#include "sensitivity/sensitivity_checks.h"

namespace tsq::sensitivity {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBTileElems = 4096;     // elements of B per work item
constexpr int64_t kTileElems = 1 << 24;   // elements of one δᵀX tile (64 MiB in float32)

struct LayerMeta {
  const void* A;   // [r, in]
  const void* E;   // [r]
  const void* B;   // [out, r]
  const void* gA;  // grads, same shapes
  const void* gE;
  const void* gB;
  float* ipt;      // [r*in + r + out*r]: A, E, B elements
  float* unc;      // same layout
  int64_t in, out, r, comp_offset;
  int64_t n_items;  // work items of this layer, to find the last one to finish
};

struct WorkItem {
  int64_t layer;
  int64_t kind;  // 0: A row `row_begin` and E[row_begin]; 1: rows [row_begin, row_end) of B
  int64_t row_begin, row_end;
};

// A bit test on the value as the update reads it, in float (as the CPU backend does): a float64
// gradient beyond float's range would make I = inf there, so it counts as non-finite too.
// Half/bfloat16 convert to float exactly.
__device__ __forceinline__ bool finite_value(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
template <typename T>
__device__ __forceinline__ bool finite_value(T v) {
  return finite_value(static_cast<float>(v));
}

template <typename T>
__device__ __forceinline__ float update_element(T p, T g, float* ipt, float* unc, float b1,
                                                float b2) {
  const float I = fabsf(static_cast<float>(p) * static_cast<float>(g));
  const float ib = b1 * *ipt + (1.f - b1) * I;
  const float ub = b2 * *unc + (1.f - b2) * fabsf(I - ib);
  *ipt = ib;
  *unc = ub;
  return ib * ub;
}

// Sum over the block; the result is valid in thread 0.
template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* warp_sums /* [kThreads / 32] shared */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Threads of a B tile stride by `stride` (a multiple of r when r <= blockDim) over the flat
// elements; `step` = stride mod r advances the column without a 64-bit modulo.
struct BStride {
  int64_t stride, step;
};
__device__ __forceinline__ BStride b_stride(int64_t r) {
  const int64_t stride = r <= blockDim.x ? (blockDim.x / r) * r : blockDim.x;
  return {stride, stride % r};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nonfinite_check_kernel(
    const LayerMeta* __restrict__ layers,  // [L]
    const WorkItem* __restrict__ items,    // [gridDim.x]
    const bool* __restrict__ active,       // [n_comp]
    unsigned* __restrict__ flag) {         // [1], raised on a NaN/inf gradient
  const WorkItem it = items[blockIdx.x];
  const LayerMeta m = layers[it.layer];
  const bool* act = active + m.comp_offset;
  bool ok = true;
  if (it.kind == 0) {
    const int64_t k = it.row_begin;
    if (!act[k]) return;
    const T* ga = static_cast<const T*>(m.gA) + k * m.in;
    for (int64_t j = threadIdx.x; j < m.in; j += blockDim.x) ok &= finite_value(ga[j]);
    if (threadIdx.x == 0) ok &= finite_value(static_cast<const T*>(m.gE)[k]);
  } else {
    const T* gb = static_cast<const T*>(m.gB);
    const BStride s = b_stride(m.r);
    if (threadIdx.x < s.stride) {
      int64_t c = threadIdx.x % m.r;
      for (int64_t x = it.row_begin * m.r + threadIdx.x; x < it.row_end * m.r; x += s.stride) {
        ok &= !act[c] || finite_value(gb[x]);
        c += s.step;
        if (c >= m.r) c -= m.r;
      }
    }
  }
  if (!ok) *flag = 1u;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sensitivity_update_kernel(
    const LayerMeta* __restrict__ layers,  // [L]
    const WorkItem* __restrict__ items,    // [gridDim.x]
    const bool* __restrict__ active,       // [n_comp]
    float b1, float b2,
    float* __restrict__ acc,               // [n_comp], zeroed: partial scores
    const unsigned* __restrict__ flag,     // [1], set by nonfinite_check_kernel
    unsigned* __restrict__ done,           // [L], zeroed: finished items per layer
    float* __restrict__ scores,            // [n_comp]
    int64_t* __restrict__ counters) {      // [2]: updates applied, steps skipped
  if (*flag) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counters[1] += 1;
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) counters[0] += 1;
  extern __shared__ float col_sum[];  // [r] of this item's layer
  __shared__ float warp_sums[kThreads / 32];
  __shared__ bool is_last;
  const WorkItem it = items[blockIdx.x];
  const LayerMeta m = layers[it.layer];
  const bool* act = active + m.comp_offset;
  if (it.kind == 0) {
    const int64_t k = it.row_begin;
    if (act[k]) {  // uniform over the block, so block_sum's barriers are safe
      const T* a = static_cast<const T*>(m.A) + k * m.in;
      const T* ga = static_cast<const T*>(m.gA) + k * m.in;
      float* ia = m.ipt + k * m.in;
      float* ua = m.unc + k * m.in;
      float sum = 0.f;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < m.in; j += blockDim.x)
        sum += update_element(a[j], ga[j], ia + j, ua + j, b1, b2);
      sum = block_sum(sum, warp_sums);
      if (threadIdx.x == 0) {
        const int64_t e = m.r * m.in + k;
        const float se = update_element(static_cast<const T*>(m.E)[k],
                                         static_cast<const T*>(m.gE)[k], m.ipt + e, m.unc + e,
                                         b1, b2);
        atomicAdd(acc + m.comp_offset + k, se + sum / static_cast<float>(m.in));
      }
    }
  } else {
    for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x) col_sum[c] = 0.f;
    __syncthreads();
    const T* b = static_cast<const T*>(m.B);
    const T* gb = static_cast<const T*>(m.gB);
    const int64_t base = m.r * m.in + m.r;  // B follows A and E in the state buffers
    const BStride s = b_stride(m.r);
    if (threadIdx.x < s.stride) {
      int64_t c = threadIdx.x % m.r;
      float part = 0.f;
      for (int64_t x = it.row_begin * m.r + threadIdx.x; x < it.row_end * m.r; x += s.stride) {
        if (act[c]) part += update_element(b[x], gb[x], m.ipt + base + x, m.unc + base + x, b1, b2);
        if (s.step != 0) {  // only when r > blockDim: the column moves, flush the partial
          atomicAdd(col_sum + c, part);
          part = 0.f;
          c += s.step;
          if (c >= m.r) c -= m.r;
        }
      }
      atomicAdd(col_sum + c, part);
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x)
      if (act[c]) atomicAdd(acc + m.comp_offset + c, col_sum[c] / static_cast<float>(m.out));
  }
  // The last block to finish this layer publishes its scores (threadfence reduction).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    is_last = atomicAdd(done + it.layer, 1u) == static_cast<unsigned>(m.n_items - 1);
  __syncthreads();
  if (is_last) {
    __threadfence();
    for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x)
      if (act[c]) scores[m.comp_offset + c] = __ldcg(acc + m.comp_offset + c);
  }
}

void sensitivity_update_cuda(at::TensorList A, at::TensorList E, at::TensorList B,
                             at::TensorList gA, at::TensorList gE, at::TensorList gB,
                             at::TensorList ipt, at::TensorList unc,
                             const at::Tensor& active_mask, const at::Tensor& scores,
                             const at::Tensor& counters, double beta1, double beta2,
                             bool check_finite) {
  const LayerShapes s = check_update_inputs(A, E, B, gA, gE, gB, ipt, unc, active_mask, scores,
                                            counters, beta1, beta2);
  const c10::cuda::CUDAGuard guard(A[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t L = static_cast<int64_t>(s.r.size());
  const int64_t max_r = *std::max_element(s.r.begin(), s.r.end());
  TORCH_CHECK(max_r * static_cast<int64_t>(sizeof(float)) <= 32 * 1024,
              "sensitivity_update: r = ", max_r, " exceeds the CUDA limit of 8192 components");

  std::vector<LayerMeta> metas(L);
  std::vector<WorkItem> items;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = s.r[l], out = s.out[l];
    const size_t first = items.size();
    for (int64_t k = 0; k < r; ++k) items.push_back({l, 0, k, k + 1});
    const int64_t rows = std::max<int64_t>(1, kBTileElems / r);
    for (int64_t j = 0; j < out; j += rows) items.push_back({l, 1, j, std::min(j + rows, out)});
    metas[l] = {A[l].const_data_ptr(), E[l].const_data_ptr(), B[l].const_data_ptr(),
                gA[l].const_data_ptr(), gE[l].const_data_ptr(), gB[l].const_data_ptr(),
                ipt[l].data_ptr<float>(), unc[l].data_ptr<float>(),
                s.in[l], out, r, s.comp_offset[l], static_cast<int64_t>(items.size() - first)};
  }
  const size_t meta_bytes = metas.size() * sizeof(LayerMeta);
  const size_t item_bytes = items.size() * sizeof(WorkItem);
  at::Tensor table = at::empty({static_cast<int64_t>(meta_bytes + item_bytes)},
                               at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(table.data_ptr<uint8_t>(), metas.data(), meta_bytes);
  std::memcpy(table.data_ptr<uint8_t>() + meta_bytes, items.data(), item_bytes);
  // Pinned + non_blocking: an async copy; the caching host allocator keeps the buffer alive
  // until the copy has run.
  const at::Tensor dev_table = table.to(A[0].device(), /*non_blocking=*/true);
  const auto* d_layers = reinterpret_cast<const LayerMeta*>(dev_table.const_data_ptr<uint8_t>());
  const auto* d_items =
      reinterpret_cast<const WorkItem*>(dev_table.const_data_ptr<uint8_t>() + meta_bytes);

  // acc [n_comp] | flag | done [L]; zero bits are 0.f and 0u alike.
  at::Tensor work = at::zeros({s.n_components + 1 + L}, scores.options());
  float* acc = work.data_ptr<float>();
  auto* flag = reinterpret_cast<unsigned*>(acc + s.n_components);
  unsigned* done = flag + 1;
  const auto n_blocks = static_cast<unsigned>(items.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A[0].scalar_type(),
                                  "sensitivity_update_cuda", [&] {
    if (check_finite) {
      nonfinite_check_kernel<scalar_t><<<n_blocks, kThreads, 0, stream>>>(
          d_layers, d_items, active_mask.const_data_ptr<bool>(), flag);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sensitivity_update_kernel<scalar_t><<<n_blocks, kThreads, max_r * sizeof(float), stream>>>(
        d_layers, d_items, active_mask.const_data_ptr<bool>(), static_cast<float>(beta1),
        static_cast<float>(beta2), acc, flag, done, scores.data_ptr<float>(),
        counters.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) abs_product_sum_kernel(
    const T* __restrict__ w,     // [n] rows of W of this tile
    const T* __restrict__ g,     // [n] the same rows of δᵀX
    int64_t n,
    double* __restrict__ total) {  // [1] accumulator
  __shared__ double warp_sums[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc += fabs(static_cast<double>(w[i]) * static_cast<double>(g[i]));
  acc = block_sum(acc, warp_sums);
  if (threadIdx.x == 0) atomicAdd(total, acc);
}

at::Tensor layer_sensitivity_cuda(const at::Tensor& weight, const at::Tensor& x,
                                  const at::Tensor& grad_out) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [w, x2, d] = check_layer_sensitivity_inputs(weight, x, grad_out);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / in);
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  at::Tensor total = at::zeros({}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "layer_sensitivity_cuda", [&] {
    for (int64_t r0 = 0; r0 < out; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, out - r0);
      const at::Tensor g = at::mm(d.narrow(1, r0, rows).t(), x2);  // [rows, in], contiguous
      const int64_t n = rows * in;
      const auto blocks = static_cast<unsigned>(
          std::min<int64_t>(max_blocks, (n + kThreads - 1) / kThreads));
      abs_product_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>() + r0 * in, g.const_data_ptr<scalar_t>(), n,
          total.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return total.to(w.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CUDA, m) {
  m.impl("sensitivity_update", &sensitivity_update_cuda);
  m.impl("layer_sensitivity", &layer_sensitivity_cuda);
}

}  // namespace tsq::sensitivity
