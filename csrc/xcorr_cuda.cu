// CUDA kernels of the batched Barlow Twins loss, launched on the current stream.
//
// Column kernels run a (kCols x kRows) block per (32 features, slice of rows, layer): threads along x read
// consecutive features (coalesced), threads along y stride over the slice's rows, and per-feature sums are
// reduced in shared memory. The batch axis is cut into slices of about kRowsPerPart rows (RowParts), so a
// large batch (global-batch Barlow Twins) launches ceil(D / 32) * slices * L blocks instead of
// ceil(D / 32) * L blocks that each loop over all N rows; a second pass combines the per-slice sums in a
// fixed order (deterministic; the slicing depends on the shape only). Accumulation is in fp32 for
// fp32/fp16/bf16 inputs and fp64 for fp64 inputs. a and b are written in the input dtype, so fp16/bf16
// products run on tensor cores (xcorr.cpp), and diag(C) is computed from exactly those stored values.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "xcorr.h"

namespace ilm_dist {
namespace {

constexpr int kCols = 32;
constexpr int kRows = 8;
constexpr int kThreads = 256;          // 1-D reduction kernels
constexpr int64_t kRowsPerPart = 64;   // rows per column block: 8 per thread
constexpr int64_t kMaxRowParts = 256;  // slices of the batch axis
constexpr int64_t kMaxParts = 512;     // blocks per layer in the first stage of the loss reduction
constexpr int64_t kMaxGrid = 65535;    // gridDim.y and gridDim.z

__device__ __forceinline__ float inv_sqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double inv_sqrt(double x) { return rsqrt(x); }

// The batch axis cut into `count` slices of `size` rows (the last one may be shorter).
struct RowParts {
  int64_t n;
  int64_t size;
  int64_t count;
  __host__ __device__ int64_t begin(int64_t p) const { return p * size; }
  __host__ __device__ int64_t end(int64_t p) const { return (p + 1) * size < n ? (p + 1) * size : n; }
};

RowParts row_parts(int64_t n) {
  const int64_t count = std::clamp<int64_t>(ceil_div(n, kRowsPerPart), 1, kMaxRowParts);
  const int64_t size = ceil_div(n, count);
  return {n, size, ceil_div(n, size)};
}

// Grid (ceil(D / kCols), slices, L) of the column kernels.
dim3 column_grid(int64_t L, int64_t d, const RowParts& rows) {
  TORCH_CHECK(L <= kMaxGrid, "bt_xcorr_loss: at most ", kMaxGrid, " layers are supported on CUDA, got ", L);
  return dim3(static_cast<unsigned int>(ceil_div(d, kCols)), static_cast<unsigned int>(rows.count),
              static_cast<unsigned int>(L));
}

// Sum of v over threadIdx.y for each threadIdx.x; the result is returned to every thread.
template <typename T>
__device__ T column_sum(T v, T (*buf)[kCols + 1]) {
  buf[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0) {
    T s = 0;
    for (int r = 0; r < kRows; ++r) s += buf[r][threadIdx.x];
    buf[0][threadIdx.x] = s;
  }
  __syncthreads();
  const T total = buf[0][threadIdx.x];
  __syncthreads();
  return total;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block of kThreads threads; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v, T* warp_buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_buf[warp] = v;
  __syncthreads();
  T total = 0;
  if (warp == 0) total = warp_sum(lane < kThreads / 32 ? warp_buf[lane] : T(0));
  __syncthreads();
  return total;
}

// Where a column block of the grid works: its feature, slice of rows and layer, and the [L, D] / [L, P, D]
// offsets of that feature.
struct ColumnTask {
  int64_t col;
  bool valid;        // col < d
  int64_t begin;     // first row of the slice
  int64_t end;       // one past its last row
  int64_t x;         // offset of (layer, row 0, col) in [L, N, D]
  int64_t stat;      // offset of (layer, col) in [L, D]
  int64_t part;      // offset of (layer, slice 0, col) in [L, P, D]; slice p is at part + p * d
  int64_t slice;     // this slice's offset in [L, P, D]
};

__device__ ColumnTask column_task(const RowParts& rows, int64_t n, int64_t d) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t layer = blockIdx.z, p = blockIdx.y;
  const bool valid = col < d;
  const int64_t c = valid ? col : 0;
  const int64_t part = layer * rows.count * d + c;
  return {col, valid, rows.begin(p), rows.end(p), layer * n * d + c, layer * d + c, part, part + p * d};
}

// Per-slice mean and sum of squared deviations of this thread's column of z over rows [begin, end).
template <typename scalar_t, typename acc_t>
__device__ void slice_moments(const scalar_t* __restrict__ z, const ColumnTask& t, int64_t ld,
                              acc_t (*buf)[kCols + 1], acc_t* __restrict__ mean_out, acc_t* __restrict__ m2_out) {
  acc_t s = 0;
  if (t.valid) {
    for (int64_t i = t.begin + threadIdx.y; i < t.end; i += kRows) s += static_cast<acc_t>(z[i * ld]);
  }
  const acc_t mean = column_sum(s, buf) / static_cast<acc_t>(t.end - t.begin);
  acc_t q = 0;
  if (t.valid) {
    for (int64_t i = t.begin + threadIdx.y; i < t.end; i += kRows) {
      const acc_t c = static_cast<acc_t>(z[i * ld]) - mean;
      q += c * c;
    }
  }
  q = column_sum(q, buf);
  if (t.valid && threadIdx.y == 0) {
    mean_out[t.slice] = mean;
    m2_out[t.slice] = q;
  }
}

// Per-slice moments of both inputs, [L, P, D] each.
template <typename acc_t>
struct Moments {
  acc_t* mean1;
  acc_t* m2_1;
  acc_t* mean2;
  acc_t* m2_2;
};

// Pass 1 of the standardisation: per-slice moments of z1 and z2.
template <typename scalar_t, typename acc_t>
__global__ void moments_kernel(const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                               Moments<acc_t> out, RowParts rows, int64_t d) {
  __shared__ acc_t buf[kRows][kCols + 1];
  const ColumnTask t = column_task(rows, rows.n, d);
  slice_moments(z1 + t.x, t, d, buf, out.mean1, out.m2_1);
  slice_moments(z2 + t.x, t, d, buf, out.mean2, out.m2_2);
}

template <typename acc_t>
struct Stats {
  acc_t mean;
  acc_t rstd;
};

// Mean and 1 / sqrt(var + eps) of all rows from the per-slice moments (Chan, Golub and LeVeque's pairwise
// update, slices in order), at [L, P, D] offset `part` with slice stride d.
template <typename acc_t>
__device__ Stats<acc_t> combine_moments(const acc_t* __restrict__ mean, const acc_t* __restrict__ m2,
                                        const RowParts& rows, int64_t part, int64_t d, acc_t eps) {
  acc_t count = 0, mu = 0, sq = 0;
  for (int64_t p = 0; p < rows.count; ++p) {
    const acc_t n_p = static_cast<acc_t>(rows.end(p) - rows.begin(p));
    const acc_t delta = mean[part + p * d] - mu;
    const acc_t total = count + n_p;
    mu += delta * n_p / total;
    sq += m2[part + p * d] + delta * delta * count * n_p / total;
    count = total;
  }
  return {mu, inv_sqrt(sq / count + eps)};
}

// Outputs of the standardisation: a, b [L, N, D] in the input dtype; statistics [L, D]; per-slice
// diagonal partial sums [L, P, D].
template <typename scalar_t, typename acc_t>
struct StandardizeOut {
  scalar_t* a;
  scalar_t* b;
  acc_t* mean1;
  acc_t* rstd1;
  acc_t* mean2;
  acc_t* rstd2;
  acc_t* part_dot;
};

// Pass 2: statistics from the moments, a = (z1 - mean1) * rstd1 and b likewise for this slice, and the
// slice's sum of a * b over the stored (rounded) values.
template <typename scalar_t, typename acc_t>
__global__ void standardize_kernel(const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                                   Moments<acc_t> moments, StandardizeOut<scalar_t, acc_t> out, RowParts rows,
                                   int64_t d, acc_t eps) {
  __shared__ acc_t buf[kRows][kCols + 1];
  __shared__ Stats<acc_t> stats[2][kCols];
  const ColumnTask t = column_task(rows, rows.n, d);
  if (t.valid && threadIdx.y == 0) {
    stats[0][threadIdx.x] = combine_moments(moments.mean1, moments.m2_1, rows, t.part, d, eps);
    stats[1][threadIdx.x] = combine_moments(moments.mean2, moments.m2_2, rows, t.part, d, eps);
    if (blockIdx.y == 0) {
      out.mean1[t.stat] = stats[0][threadIdx.x].mean;
      out.rstd1[t.stat] = stats[0][threadIdx.x].rstd;
      out.mean2[t.stat] = stats[1][threadIdx.x].mean;
      out.rstd2[t.stat] = stats[1][threadIdx.x].rstd;
    }
  }
  __syncthreads();
  acc_t dot = 0;
  if (t.valid) {
    const Stats<acc_t> s1 = stats[0][threadIdx.x], s2 = stats[1][threadIdx.x];
    for (int64_t i = t.begin + threadIdx.y; i < t.end; i += kRows) {
      const int64_t k = t.x + i * d;
      const scalar_t x = static_cast<scalar_t>((static_cast<acc_t>(z1[k]) - s1.mean) * s1.rstd);
      const scalar_t y = static_cast<scalar_t>((static_cast<acc_t>(z2[k]) - s2.mean) * s2.rstd);
      out.a[k] = x;
      out.b[k] = y;
      dot += static_cast<acc_t>(x) * static_cast<acc_t>(y);
    }
  }
  dot = column_sum(dot, buf);
  if (t.valid && threadIdx.y == 0) out.part_dot[t.slice] = dot;
}

// 1-D over L * D: diag = sum of the per-slice partial sums (in order) / N.
template <typename acc_t>
__global__ void diag_kernel(const acc_t* __restrict__ part_dot, acc_t* __restrict__ diag, RowParts rows,
                            int64_t L, int64_t d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= L * d) return;
  const int64_t part = (i / d) * rows.count * d + i % d;
  acc_t s = 0;
  for (int64_t p = 0; p < rows.count; ++p) s += part_dot[part + p * d];
  diag[i] = s / static_cast<acc_t>(rows.n);
}

unsigned int blocks_1d(int64_t count) { return static_cast<unsigned int>(ceil_div(count, kThreads)); }

template <typename scalar_t>
Standardized standardize_typed(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = z1.size(0), n = z1.size(1), d = z1.size(2);
  const RowParts rows = row_parts(n);
  const auto stat_opts = z1.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Standardized st{at::empty_like(z1),           at::empty_like(z2),           at::empty({L, d}, stat_opts),
                  at::empty({L, d}, stat_opts), at::empty({L, d}, stat_opts), at::empty({L, d}, stat_opts),
                  at::empty({L, d}, stat_opts)};
  at::Tensor parts = at::empty({5, L, rows.count, d}, stat_opts);  // 4 moments + diagonal partial sums
  acc_t* pp = parts.mutable_data_ptr<acc_t>();
  const int64_t stride = L * rows.count * d;
  const Moments<acc_t> moments{pp, pp + stride, pp + 2 * stride, pp + 3 * stride};
  const StandardizeOut<scalar_t, acc_t> out{st.a.mutable_data_ptr<scalar_t>(),  st.b.mutable_data_ptr<scalar_t>(),
                                            st.mean1.mutable_data_ptr<acc_t>(), st.rstd1.mutable_data_ptr<acc_t>(),
                                            st.mean2.mutable_data_ptr<acc_t>(), st.rstd2.mutable_data_ptr<acc_t>(),
                                            pp + 4 * stride};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = column_grid(L, d, rows), block(kCols, kRows);
  const scalar_t* z1p = z1.const_data_ptr<scalar_t>();
  const scalar_t* z2p = z2.const_data_ptr<scalar_t>();
  moments_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(z1p, z2p, moments, rows, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  standardize_kernel<scalar_t, acc_t>
      <<<grid, block, 0, stream>>>(z1p, z2p, moments, out, rows, d, static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  diag_kernel<acc_t><<<blocks_1d(L * d), kThreads, 0, stream>>>(out.part_dot, st.diag.mutable_data_ptr<acc_t>(),
                                                                rows, L, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return st;
}

Standardized standardize_cuda(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "bt_xcorr_standardize",
                                         [&] { return standardize_typed<scalar_t>(z1, z2, eps); });
}

// Grid (parts, L): partial[l, part] = sum of x_l * y_l over a grid-stride slice of the layer.
template <typename acc_t>
__global__ void sum_products_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ y,
                                    acc_t* __restrict__ partial, int64_t m) {
  __shared__ acc_t warp_buf[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  acc_t s = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < m; i += stride) {
    s += x[base + i] * y[base + i];
  }
  s = block_sum(s, warp_buf);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

// Per-layer weights, [L] each.
template <typename acc_t>
struct LossInputs {
  const acc_t* x;  // the products, [L, m]
  const acc_t* y;
  const acc_t* diag;  // [L, D]
  const acc_t* on;
  const acc_t* off;
};

// Grid (L): loss_l = on_l * sum (d - 1)^2 + off_l * (scale * sum(partial_l) - diagonal), where the
// diagonal is sum d^2 (Gram form) or, in the D x D form, the products' own scale * x_ii * y_ii.
template <typename acc_t>
__global__ void finalize_loss_kernel(const acc_t* __restrict__ partial, int64_t parts, LossInputs<acc_t> in,
                                     int64_t m, int64_t d, acc_t scale, bool xcorr_form, acc_t* __restrict__ loss) {
  __shared__ acc_t warp_buf[kThreads / 32];
  const int64_t layer = blockIdx.x;
  acc_t frob = 0, on_sum = 0, diag_sq = 0;
  for (int64_t i = threadIdx.x; i < parts; i += kThreads) frob += partial[layer * parts + i];
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const acc_t c = in.diag[layer * d + i];
    on_sum += (c - 1) * (c - 1);
    const int64_t k = layer * m + i * (d + 1);
    diag_sq += xcorr_form ? scale * in.x[k] * in.y[k] : c * c;
  }
  frob = block_sum(frob, warp_buf);
  on_sum = block_sum(on_sum, warp_buf);
  diag_sq = block_sum(diag_sq, warp_buf);
  if (threadIdx.x == 0) loss[layer] = in.on[layer] * on_sum + in.off[layer] * (scale * frob - diag_sq);
}

template <typename acc_t>
at::Tensor layer_loss_typed(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                            const at::Tensor& on_weight, const at::Tensor& off_weight, bool xcorr_form) {
  const int64_t L = x.size(0), m = x.numel() / L, d = diag.size(1);
  TORCH_CHECK(L <= kMaxGrid, "bt_xcorr_loss: at most ", kMaxGrid, " layers are supported on CUDA, got ", L);
  const int64_t parts = std::clamp<int64_t>(ceil_div(m, kThreads * 16), 1, kMaxParts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({L, parts}, diag.options());
  auto loss = at::empty({L}, diag.options());
  const LossInputs<acc_t> in{x.const_data_ptr<acc_t>(), y.const_data_ptr<acc_t>(), diag.const_data_ptr<acc_t>(),
                             on_weight.const_data_ptr<acc_t>(), off_weight.const_data_ptr<acc_t>()};
  const dim3 grid(static_cast<unsigned int>(parts), static_cast<unsigned int>(L));
  sum_products_kernel<acc_t><<<grid, kThreads, 0, stream>>>(in.x, in.y, partial.mutable_data_ptr<acc_t>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_loss_kernel<acc_t><<<grid.y, kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(), parts, in, m, d,
                                                               static_cast<acc_t>(scale), xcorr_form,
                                                               loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor layer_loss_cuda(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                           const at::Tensor& on_weight, const at::Tensor& off_weight, bool xcorr_form) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bt_xcorr_layer_loss", [&] {
    return layer_loss_typed<scalar_t>(x, y, scale, diag, on_weight, off_weight, xcorr_form);
  });
}

// One input (z and its per-feature statistics) as the backward kernels read it.
template <typename scalar_t, typename acc_t>
struct InputView {
  const scalar_t* z;
  const acc_t* mean;
  const acc_t* rstd;
};

// What the backward kernels read: self and partner, p = G_t s, diag(C) and the per-layer coefficients.
template <typename scalar_t, typename acc_t>
struct BackwardInputs {
  InputView<scalar_t, acc_t> self;
  InputView<scalar_t, acc_t> partner;
  const acc_t* p;
  const acc_t* diag;
  const acc_t* grad;  // [L]
  const acc_t* on;
  const acc_t* off;
};

// ga = cp * p + cd * t (dL/ds before the standardisation backward) and s, for one column.
template <typename scalar_t, typename acc_t>
struct ColumnGradient {
  const BackwardInputs<scalar_t, acc_t>& in;
  acc_t cp, cd, s_mean, s_rstd, t_mean, t_rstd;

  __device__ ColumnGradient(const BackwardInputs<scalar_t, acc_t>& inputs, const ColumnTask& t, int64_t n)
      : in(inputs) {
    const int64_t layer = blockIdx.z;
    const acc_t g = in.grad[layer], on = in.on[layer], off = in.off[layer], nn = static_cast<acc_t>(n);
    const acc_t c = in.diag[t.stat];
    cp = g * 2 * off / (nn * nn);
    cd = g * 2 * (on * (c - 1) - off * c) / nn;
    s_mean = in.self.mean[t.stat];
    s_rstd = in.self.rstd[t.stat];
    t_mean = in.partner.mean[t.stat];
    t_rstd = in.partner.rstd[t.stat];
  }
  __device__ acc_t s(int64_t k) const { return (static_cast<acc_t>(in.self.z[k]) - s_mean) * s_rstd; }
  __device__ acc_t ga(int64_t k) const {
    return cp * in.p[k] + cd * (static_cast<acc_t>(in.partner.z[k]) - t_mean) * t_rstd;
  }
};

// Pass 1 of the standardisation backward: per-slice sums of ga and ga * s, [L, P, D] each.
template <typename scalar_t, typename acc_t>
__global__ void backward_sums_kernel(BackwardInputs<scalar_t, acc_t> in, acc_t* __restrict__ part_g,
                                     acc_t* __restrict__ part_gs, RowParts rows, int64_t d) {
  __shared__ acc_t buf[kRows][kCols + 1];
  const ColumnTask t = column_task(rows, rows.n, d);
  acc_t sum_g = 0, sum_gs = 0;
  if (t.valid) {
    const ColumnGradient<scalar_t, acc_t> col(in, t, rows.n);
    for (int64_t i = t.begin + threadIdx.y; i < t.end; i += kRows) {
      const int64_t k = t.x + i * d;
      const acc_t gk = col.ga(k);
      sum_g += gk;
      sum_gs += gk * col.s(k);
    }
  }
  sum_g = column_sum(sum_g, buf);
  sum_gs = column_sum(sum_gs, buf);
  if (t.valid && threadIdx.y == 0) {
    part_g[t.slice] = sum_g;
    part_gs[t.slice] = sum_gs;
  }
}

// Pass 2: dz = rstd * (ga - mean_N ga - s * mean_N(ga * s)) for this slice's rows.
template <typename scalar_t, typename acc_t>
__global__ void backward_apply_kernel(BackwardInputs<scalar_t, acc_t> in, const acc_t* __restrict__ part_g,
                                      const acc_t* __restrict__ part_gs, scalar_t* __restrict__ out, RowParts rows,
                                      int64_t d) {
  __shared__ acc_t means[2][kCols];
  const ColumnTask t = column_task(rows, rows.n, d);
  if (t.valid && threadIdx.y == 0) {
    acc_t g = 0, gs = 0;
    for (int64_t p = 0; p < rows.count; ++p) {
      g += part_g[t.part + p * d];
      gs += part_gs[t.part + p * d];
    }
    means[0][threadIdx.x] = g / static_cast<acc_t>(rows.n);
    means[1][threadIdx.x] = gs / static_cast<acc_t>(rows.n);
  }
  __syncthreads();
  if (!t.valid) return;
  const ColumnGradient<scalar_t, acc_t> col(in, t, rows.n);
  const acc_t mean_g = means[0][threadIdx.x], mean_gs = means[1][threadIdx.x];
  for (int64_t i = t.begin + threadIdx.y; i < t.end; i += kRows) {
    const int64_t k = t.x + i * d;
    out[k] = static_cast<scalar_t>(col.s_rstd * (col.ga(k) - mean_g - col.s(k) * mean_gs));
  }
}

template <typename scalar_t>
InputView<scalar_t, at::opmath_type<scalar_t>> input_view(const Side& side) {
  using acc_t = at::opmath_type<scalar_t>;
  return {side.z.const_data_ptr<scalar_t>(), side.mean.const_data_ptr<acc_t>(), side.rstd.const_data_ptr<acc_t>()};
}

template <typename scalar_t>
at::Tensor standardize_backward_typed(const SideInputs& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = in.self.z.size(0), n = in.self.z.size(1), d = in.self.z.size(2);
  const RowParts rows = row_parts(n);
  at::Tensor dz = at::empty_like(in.self.z);
  at::Tensor sums = at::empty({2, L, rows.count, d}, in.diag.options());
  acc_t* sp = sums.mutable_data_ptr<acc_t>();
  acc_t* part_gs = sp + L * rows.count * d;
  const BackwardInputs<scalar_t, acc_t> inputs{input_view<scalar_t>(in.self),
                                               input_view<scalar_t>(in.partner),
                                               in.p.const_data_ptr<acc_t>(),
                                               in.diag.const_data_ptr<acc_t>(),
                                               in.grad_loss.const_data_ptr<acc_t>(),
                                               in.on_weight.const_data_ptr<acc_t>(),
                                               in.off_weight.const_data_ptr<acc_t>()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = column_grid(L, d, rows), block(kCols, kRows);
  backward_sums_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(inputs, sp, part_gs, rows, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  backward_apply_kernel<scalar_t, acc_t>
      <<<grid, block, 0, stream>>>(inputs, sp, part_gs, dz.mutable_data_ptr<scalar_t>(), rows, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

at::Tensor standardize_backward_cuda(const SideInputs& in) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.self.z.scalar_type(), "bt_xcorr_backward",
                                         [&] { return standardize_backward_typed<scalar_t>(in); });
}

const Kernels kCudaKernels{c10::DeviceType::CUDA, &standardize_cuda, &layer_loss_cuda, &standardize_backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(ilm_dist, CUDA, m) { register_kernels<kCudaKernels>(m); }

}  // namespace ilm_dist
