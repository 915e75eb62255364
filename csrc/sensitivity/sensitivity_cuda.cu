// CUDA backend of the sensitivity ops.
//
// sensitivity_update — the fused importance update over ALL adapted layers (math: see
// sensitivity_cpu.cpp and reference.sensitivity_update). Per call, on the current stream, with no
// host sync:
//   1. one H2D copy (pinned, non-blocking) of a small table: per-layer pointers/shapes and the work
//      items;
//   2. one memset of a workspace: acc [n_comp] row parts | flag | done [L] counters | part [slots]
//      per-B-item column sums;
//   3. nonfinite_check_kernel: one launch over all layers; reads only the gradients of active
//      components and raises `flag` if one is NaN/inf. The update must not start before the
//      whole step is known to be finite (a half-applied step cannot be undone), so this is a
//      separate launch: the kernel boundary is the grid-wide barrier. Not launched when the
//      caller already knows the gradients finite (check_finite=false): `flag` stays 0;
//   4. sensitivity_update_kernel: one launch over all layers. With `flag` raised every block exits
//      and counters[1] += 1. Otherwise each block runs one work item:
//        - kind A: row k of A (one component, contiguous, coalesced) plus E_k; a block reduction
//          gives s(E_k) + mean_j s(A_kj), stored to acc[k] (its only writer);
//        - kind B: a tile of consecutive rows of B [out, r] (contiguous). With r <= blockDim,
//          threads stride by a multiple of r, so each thread always meets the same column: one
//          register partial per thread, and the partials of a column are added in thread order;
//          with r > blockDim each thread owns whole columns and walks the tile's rows. Either way
//          the item stores its r column sums to its own slot of `part`.
//      Inactive components are skipped without reading their data. The last block to finish a
//      layer (per-layer done counter, threadfence reduction) computes that layer's active scores,
//      acc[k] + (the layer's B slots summed in item order) / out, so inactive scores keep their
//      last value and no per-element score tensor exists. No float atomics: every sum has a fixed
//      order, so a step's scores are the same bits on every run (reallocation ties included).
//   Traffic per active element: read p, grad, Ibar, Ubar, write Ibar, Ubar, plus the grad again in
//   the check (7 accesses for 6 useful ones).
//
// layer_sensitivity — S = sum |W ⊙ (δᵀX)|: δᵀX is formed per tile of W's rows by cuBLAS (at::mm)
//   into a tile buffer of at most kTileElems elements and reduced against W by
//   abs_product_sum_kernel into per-block float64 sums, added by at::sum (a fixed order, so the
//   result does not change from run to run); nothing is copied to the host.
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
  int64_t n_items;    // work items of this layer (r A items, then B items): the last to finish
  int64_t b_slot;     // `part` offset of its first B item; the i-th one's r sums start at + i·r
};

struct WorkItem {
  int64_t layer;
  int64_t kind;  // 0: A row `row_begin` and E[row_begin]; 1: rows [row_begin, row_end) of B
  int64_t row_begin, row_end;
  int64_t slot;  // B items: where its r column sums go in `part`
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

// Elements whose loads one thread issues before the first of their stores (see update_strided).
constexpr int kBatch = 4;

// The EMA update of the elements x = first, first + stride, ... < end (in that order), returning
// the sum of their s = Ī·Ū (added in that order, so the result does not depend on kBatch).
// The loads of kBatch elements are issued before any of their stores: the state pointers come
// from the layer table, not __restrict__ arguments, so the compiler must assume a store to
// ipt[x] may alias the next element's loads, and an element-at-a-time loop would keep only one
// element's four loads in flight per thread, too few to cover the memory latency.
template <typename T>
__device__ __forceinline__ float update_strided(const T* p, const T* g, float* ipt, float* unc,
                                                int64_t first, int64_t end, int64_t stride,
                                                EmaWeights ew) {
  float sum = 0.f;
  for (int64_t x = first; x < end; x += kBatch * stride) {
    float pv[kBatch], gv[kBatch], iv[kBatch], uv[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t y = x + u * stride;
      if (y < end) {
        pv[u] = static_cast<float>(p[y]);
        gv[u] = static_cast<float>(g[y]);
        iv[u] = ipt[y];
        uv[u] = unc[y];
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t y = x + u * stride;
      if (y < end) {
        // Explicitly rounded products and sums: nvcc would otherwise contract b·x + c·y into
        // an FMA (one rounding fewer), and the EMAs would differ from the reference's (and the
        // CPU backend's) separately rounded bits in the last place.
        const float I = fabsf(__fmul_rn(pv[u], gv[u]));
        const float ib = __fadd_rn(__fmul_rn(ew.b1, iv[u]), __fmul_rn(ew.c1, I));
        const float ub = __fadd_rn(__fmul_rn(ew.b2, uv[u]), __fmul_rn(ew.c2, fabsf(I - ib)));
        ipt[y] = ib;
        unc[y] = ub;
        sum = __fadd_rn(sum, __fmul_rn(ib, ub));
      }
    }
  }
  return sum;
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

template <typename T>
__global__ void __launch_bounds__(kThreads) nonfinite_check_kernel(
    const LayerMeta* __restrict__ layers,  // [L]
    const WorkItem* __restrict__ items,    // [gridDim.x]
    const uint8_t* __restrict__ active,    // [n_comp], nonzero = active
    unsigned* __restrict__ flag) {         // [1], raised on a NaN/inf gradient
  const WorkItem it = items[blockIdx.x];
  const LayerMeta m = layers[it.layer];
  const uint8_t* act = active + m.comp_offset;
  bool ok = true;
  if (it.kind == 0) {
    const int64_t k = it.row_begin;
    if (!act[k]) return;
    const T* ga = static_cast<const T*>(m.gA) + k * m.in;
#pragma unroll 4  // the loads are independent: several in flight per thread
    for (int64_t j = threadIdx.x; j < m.in; j += blockDim.x) ok &= finite_value(ga[j]);
    if (threadIdx.x == 0) ok &= finite_value(static_cast<const T*>(m.gE)[k]);
  } else {
    // The update kernel's walk of a B tile (see there); only active columns are read.
    const T* gb = static_cast<const T*>(m.gB);
    if (m.r <= blockDim.x) {
      const int64_t stride = (blockDim.x / m.r) * m.r;
      if (threadIdx.x < stride && act[threadIdx.x % m.r])
#pragma unroll 4
        for (int64_t x = it.row_begin * m.r + threadIdx.x; x < it.row_end * m.r; x += stride)
          ok &= finite_value(gb[x]);
    } else {
      for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x)
        if (act[c])
          for (int64_t j = it.row_begin; j < it.row_end; ++j) ok &= finite_value(gb[j * m.r + c]);
    }
  }
  if (!ok) *flag = 1u;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sensitivity_update_kernel(
    const LayerMeta* __restrict__ layers,  // [L]
    const WorkItem* __restrict__ items,    // [gridDim.x]
    const uint8_t* __restrict__ active,    // [n_comp], nonzero = active
    EmaWeights ew,
    float* __restrict__ acc,               // [n_comp]: s(E_k) + mean_j s(A_kj)
    float* __restrict__ part,              // [slots]: column sums of s(B) per B item
    const unsigned* __restrict__ flag,     // [1], set by nonfinite_check_kernel
    unsigned* __restrict__ done,           // [L], zeroed: finished items per layer
    float* __restrict__ scores,            // [n_comp]
    int64_t* __restrict__ counters) {      // [2]: updates applied, steps skipped
  if (*flag) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counters[1] += 1;
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) counters[0] += 1;
  __shared__ float thread_part[kThreads];
  __shared__ float warp_sums[kThreads / 32];
  __shared__ bool is_last;
  const WorkItem it = items[blockIdx.x];
  const LayerMeta m = layers[it.layer];
  const uint8_t* act = active + m.comp_offset;
  if (it.kind == 0) {
    const int64_t k = it.row_begin;
    if (act[k]) {  // uniform over the block, so block_sum's barriers are safe
      const T* a = static_cast<const T*>(m.A) + k * m.in;
      const T* ga = static_cast<const T*>(m.gA) + k * m.in;
      float* ia = m.ipt + k * m.in;
      float* ua = m.unc + k * m.in;
      float sum = update_strided(a, ga, ia, ua, threadIdx.x, m.in, blockDim.x, ew);
      sum = block_sum(sum, warp_sums);
      if (threadIdx.x == 0) {
        // E's states follow A's in the state buffers.
        const float se = update_strided(static_cast<const T*>(m.E), static_cast<const T*>(m.gE),
                                        m.ipt + m.r * m.in, m.unc + m.r * m.in, k, k + 1, 1, ew);
        acc[m.comp_offset + k] = se + sum / static_cast<float>(m.in);
      }
    }
  } else {
    const T* b = static_cast<const T*>(m.B);
    const T* gb = static_cast<const T*>(m.gB);
    float* ib = m.ipt + m.r * m.in + m.r;  // B follows A and E in the state buffers
    float* ub = m.unc + m.r * m.in + m.r;
    float* sums = part + it.slot;
    if (m.r <= blockDim.x) {  // uniform over the block, so the barrier below is safe
      // Thread t < groups·r owns column t mod r and every groups-th row from row t / r.
      const int64_t groups = blockDim.x / m.r, stride = groups * m.r;
      float own = 0.f;
      if (threadIdx.x < stride && act[threadIdx.x % m.r])
        own = update_strided(b, gb, ib, ub, it.row_begin * m.r + threadIdx.x, it.row_end * m.r,
                             stride, ew);
      thread_part[threadIdx.x] = own;
      __syncthreads();
      if (threadIdx.x < m.r) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) sum += thread_part[g * m.r + threadIdx.x];
        sums[threadIdx.x] = sum;
      }
    } else {
      for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x)
        sums[c] = act[c] ? update_strided(b, gb, ib, ub, it.row_begin * m.r + c,
                                          it.row_end * m.r, m.r, ew)
                         : 0.f;
    }
  }
  // The last block to finish this layer publishes its scores (threadfence reduction).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    is_last = atomicAdd(done + it.layer, 1u) == static_cast<unsigned>(m.n_items - 1);
  __syncthreads();
  if (is_last) {
    __threadfence();
    for (int64_t c = threadIdx.x; c < m.r; c += blockDim.x) {
      if (!act[c]) continue;
      float col = 0.f;
      for (int64_t i = 0; i < m.n_items - m.r; ++i) col += __ldcg(part + m.b_slot + i * m.r + c);
      scores[m.comp_offset + c] = __ldcg(acc + m.comp_offset + c) + col / static_cast<float>(m.out);
    }
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

  std::vector<LayerMeta> metas(L);
  std::vector<WorkItem> items;
  int64_t slots = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = s.r[l], out = s.out[l];
    const size_t first = items.size();
    for (int64_t k = 0; k < r; ++k) items.push_back({l, 0, k, k + 1, -1});
    const int64_t rows = std::max<int64_t>(1, kBTileElems / r);
    const int64_t b_slot = slots;
    for (int64_t j = 0; j < out; j += rows, slots += r)
      items.push_back({l, 1, j, std::min(j + rows, out), slots});
    metas[l] = {A[l].const_data_ptr(), E[l].const_data_ptr(), B[l].const_data_ptr(),
                gA[l].const_data_ptr(), gE[l].const_data_ptr(), gB[l].const_data_ptr(),
                ipt[l].data_ptr<float>(), unc[l].data_ptr<float>(),
                s.in[l], out, r, s.comp_offset[l], static_cast<int64_t>(items.size() - first),
                b_slot};
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

  // acc [n_comp] | flag | done [L] | part [slots]; zero bits are 0.f and 0u alike.
  at::Tensor work = at::zeros({s.n_components + 1 + L + slots}, scores.options());
  float* acc = work.data_ptr<float>();
  auto* flag = reinterpret_cast<unsigned*>(acc + s.n_components);
  unsigned* done = flag + 1;
  float* part = reinterpret_cast<float*>(done + L);
  const auto n_blocks = static_cast<unsigned>(items.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A[0].scalar_type(),
                                  "sensitivity_update_cuda", [&] {
    if (check_finite) {
      nonfinite_check_kernel<scalar_t><<<n_blocks, kThreads, 0, stream>>>(
          d_layers, d_items, mask_bytes(active_mask), flag);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sensitivity_update_kernel<scalar_t><<<n_blocks, kThreads, 0, stream>>>(
        d_layers, d_items, mask_bytes(active_mask), ema_weights(beta1, beta2), acc, part, flag,
        done, scores.data_ptr<float>(), counters.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) abs_product_sum_kernel(
    const T* __restrict__ w,     // [n] rows of W of this tile
    const T* __restrict__ g,     // [n] the same rows of δᵀX
    int64_t n,
    double* __restrict__ block_sums) {  // [gridDim.x] this tile's slice
  __shared__ double warp_sums[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc += fabs(static_cast<double>(w[i]) * static_cast<double>(g[i]));
  acc = block_sum(acc, warp_sums);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = acc;
}

at::Tensor layer_sensitivity_cuda(const at::Tensor& weight, const at::Tensor& x,
                                  const at::Tensor& grad_out) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [w, x2, d] = check_layer_sensitivity_inputs(weight, x, grad_out);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t tile_rows = std::max<int64_t>(1, kTileElems / in);
  const int64_t n_tiles = (out + tile_rows - 1) / tile_rows;
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  // Row t holds tile t's block sums (a tile with fewer blocks leaves zeros).
  at::Tensor block_sums = at::zeros({n_tiles, max_blocks}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "layer_sensitivity_cuda", [&] {
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, out - r0);
      const at::Tensor g = at::mm(d.narrow(1, r0, rows).t(), x2);  // [rows, in], contiguous
      const int64_t n = rows * in;
      const auto blocks = static_cast<unsigned>(
          std::min<int64_t>(max_blocks, (n + kThreads - 1) / kThreads));
      abs_product_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>() + r0 * in, g.const_data_ptr<scalar_t>(), n,
          block_sums.data_ptr<double>() + t * max_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return block_sums.sum().to(w.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tsqlora_ext, CUDA, m) {
  m.impl("sensitivity_update", &sensitivity_update_cuda);
  m.impl("layer_sensitivity", &layer_sensitivity_cuda);
}

}  // namespace tsq::sensitivity
