// CUDA kernels of the batched Barlow Twins loss, launched on the current stream.
//
// Column kernels use a (kCols x kRows) block per (32 features, layer): threads along x read consecutive
// features (coalesced), threads along y stride over the batch, and per-feature sums are reduced in
// shared memory. Accumulation is in fp32 for fp32/fp16/bf16 inputs and fp64 for fp64 inputs.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "xcorr.h"

namespace ilm_dist {
namespace {

constexpr int kCols = 32;
constexpr int kRows = 8;
constexpr int kThreads = 256;      // 1-D reduction kernels
constexpr int64_t kMaxParts = 512;  // blocks per layer in the first reduction stage

__device__ __forceinline__ float inv_sqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double inv_sqrt(double x) { return rsqrt(x); }

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

template <typename acc_t>
struct Stats {
  acc_t mean;
  acc_t rstd;
};

// out = (z - mean) * rstd over the n rows (stride ld) of this thread's column; returns mean and rstd.
template <typename scalar_t, typename opmath_t, typename acc_t>
__device__ Stats<acc_t> standardize_column(const scalar_t* __restrict__ z, opmath_t* __restrict__ out, int64_t n,
                                           int64_t ld, bool valid, acc_t eps, acc_t (*buf)[kCols + 1]) {
  acc_t s = 0;
  if (valid) {
    for (int64_t i = threadIdx.y; i < n; i += kRows) s += static_cast<acc_t>(z[i * ld]);
  }
  const acc_t mean = column_sum(s, buf) / n;
  acc_t q = 0;
  if (valid) {
    for (int64_t i = threadIdx.y; i < n; i += kRows) {
      const acc_t c = static_cast<acc_t>(z[i * ld]) - mean;
      q += c * c;
    }
  }
  const acc_t rstd = inv_sqrt(column_sum(q, buf) / n + eps);
  if (valid) {
    for (int64_t i = threadIdx.y; i < n; i += kRows) {
      out[i * ld] = static_cast<opmath_t>((static_cast<acc_t>(z[i * ld]) - mean) * rstd);
    }
  }
  return {mean, rstd};
}

// Per-feature outputs of standardize_kernel, [L, D] each.
template <typename opmath_t>
struct StatsOut {
  opmath_t* mean1;
  opmath_t* rstd1;
  opmath_t* mean2;
  opmath_t* rstd2;
  opmath_t* diag;
};

// Grid (ceil(D / kCols), L): standardises z1 -> a, z2 -> b and computes diag(C) = sum_n a b / n.
template <typename scalar_t, typename opmath_t, typename acc_t>
__global__ void standardize_kernel(const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                                   opmath_t* __restrict__ a, opmath_t* __restrict__ b, StatsOut<opmath_t> stats,
                                   int64_t n, int64_t d, acc_t eps) {
  __shared__ acc_t buf[kRows][kCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t layer = blockIdx.y;
  const bool valid = col < d;
  const int64_t x = valid ? layer * n * d + col : 0, stat = valid ? layer * d + col : 0;
  const Stats<acc_t> s1 = standardize_column(z1 + x, a + x, n, d, valid, eps, buf);
  const Stats<acc_t> s2 = standardize_column(z2 + x, b + x, n, d, valid, eps, buf);
  acc_t dot = 0;
  if (valid) {  // each thread reads back exactly the elements it wrote
    for (int64_t i = threadIdx.y; i < n; i += kRows) {
      dot += static_cast<acc_t>(a[x + i * d]) * static_cast<acc_t>(b[x + i * d]);
    }
  }
  dot = column_sum(dot, buf);
  if (valid && threadIdx.y == 0) {
    stats.mean1[stat] = static_cast<opmath_t>(s1.mean);
    stats.rstd1[stat] = static_cast<opmath_t>(s1.rstd);
    stats.mean2[stat] = static_cast<opmath_t>(s2.mean);
    stats.rstd2[stat] = static_cast<opmath_t>(s2.rstd);
    stats.diag[stat] = static_cast<opmath_t>(dot / n);
  }
}

// Grid (parts, L): partial[l, part] = sum of x_l * y_l over a grid-stride slice of the layer.
template <typename opmath_t, typename acc_t>
__global__ void sum_products_kernel(const opmath_t* __restrict__ x, const opmath_t* __restrict__ y,
                                    acc_t* __restrict__ partial, int64_t m) {
  __shared__ acc_t warp_buf[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  acc_t s = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < m; i += stride) {
    s += static_cast<acc_t>(x[base + i]) * static_cast<acc_t>(y[base + i]);
  }
  s = block_sum(s, warp_buf);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

// Grid (L): loss_l = on_l * sum (d - 1)^2 + off_l * (scale * sum(partial_l) - sum d^2).
template <typename opmath_t, typename acc_t>
__global__ void finalize_loss_kernel(const acc_t* __restrict__ partial, int64_t parts,
                                     const opmath_t* __restrict__ diag, int64_t d,
                                     const opmath_t* __restrict__ on_weight,
                                     const opmath_t* __restrict__ off_weight, acc_t scale,
                                     opmath_t* __restrict__ loss) {
  __shared__ acc_t warp_buf[kThreads / 32];
  const int64_t layer = blockIdx.x;
  acc_t frob = 0, on_sum = 0, diag_sq = 0;
  for (int64_t i = threadIdx.x; i < parts; i += kThreads) frob += partial[layer * parts + i];
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const acc_t c = diag[layer * d + i];
    on_sum += (c - 1) * (c - 1);
    diag_sq += c * c;
  }
  frob = block_sum(frob, warp_buf);
  on_sum = block_sum(on_sum, warp_buf);
  diag_sq = block_sum(diag_sq, warp_buf);
  if (threadIdx.x == 0) {
    const acc_t on = on_weight[layer], off = off_weight[layer];
    loss[layer] = static_cast<opmath_t>(on * on_sum + off * (scale * frob - diag_sq));
  }
}

// One input (z and its per-feature statistics) as the backward kernel reads it.
template <typename scalar_t, typename opmath_t>
struct InputView {
  const scalar_t* z;
  const opmath_t* mean;
  const opmath_t* rstd;
};

// Per-layer weights and upstream gradient, [L] each.
template <typename opmath_t>
struct LayerCoefs {
  const opmath_t* grad;
  const opmath_t* on;
  const opmath_t* off;
};

// Grid (ceil(D / kCols), L): with s, t the standardised self and partner (recomputed from z) and
// ga = cp * p + cd * t, writes dz = rstd * (ga - mean_n ga - s * mean_n(ga * s)).
template <typename scalar_t, typename opmath_t, typename acc_t>
__global__ void standardize_backward_kernel(InputView<scalar_t, opmath_t> self, InputView<scalar_t, opmath_t> partner,
                                            const opmath_t* __restrict__ p, const opmath_t* __restrict__ diag,
                                            LayerCoefs<opmath_t> coefs, scalar_t* __restrict__ out, int64_t n,
                                            int64_t d) {
  __shared__ acc_t buf[kRows][kCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t layer = blockIdx.y;
  const bool valid = col < d;
  const int64_t x = valid ? layer * n * d + col : 0, stat = valid ? layer * d + col : 0;
  const acc_t g = coefs.grad[layer], on = coefs.on[layer], off = coefs.off[layer], nn = static_cast<acc_t>(n);
  const acc_t c = diag[stat];
  const acc_t cp = g * 2 * off / (nn * nn);
  const acc_t cd = g * 2 * (on * (c - 1) - off * c) / nn;
  const acc_t s_mean = self.mean[stat], s_rstd = self.rstd[stat];
  const acc_t t_mean = partner.mean[stat], t_rstd = partner.rstd[stat];
  const auto s = [&](int64_t k) { return (static_cast<acc_t>(self.z[k]) - s_mean) * s_rstd; };
  const auto ga = [&](int64_t k) {
    return cp * static_cast<acc_t>(p[k]) + cd * (static_cast<acc_t>(partner.z[k]) - t_mean) * t_rstd;
  };
  acc_t sum_g = 0, sum_gs = 0;
  if (valid) {
    for (int64_t i = threadIdx.y; i < n; i += kRows) {
      const int64_t k = x + i * d;
      const acc_t gk = ga(k);
      sum_g += gk;
      sum_gs += gk * s(k);
    }
  }
  const acc_t mean_g = column_sum(sum_g, buf) / nn;
  const acc_t mean_gs = column_sum(sum_gs, buf) / nn;
  if (valid) {
    for (int64_t i = threadIdx.y; i < n; i += kRows) {
      const int64_t k = x + i * d;
      out[k] = static_cast<scalar_t>(s_rstd * (ga(k) - mean_g - s(k) * mean_gs));
    }
  }
}

dim3 column_grid(int64_t L, int64_t d) {
  TORCH_CHECK(L <= 65535, "bt_xcorr_loss: at most 65535 layers are supported on CUDA, got ", L);
  return dim3(static_cast<unsigned int>(ceil_div(d, kCols)), static_cast<unsigned int>(L));
}

template <typename scalar_t>
Standardized standardize_typed(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t L = z1.size(0), n = z1.size(1), d = z1.size(2);
  const auto opts = z1.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
  Standardized st{at::empty({L, n, d}, opts), at::empty({L, n, d}, opts), at::empty({L, d}, opts),
                  at::empty({L, d}, opts),    at::empty({L, d}, opts),    at::empty({L, d}, opts),
                  at::empty({L, d}, opts)};
  const StatsOut<opmath_t> stats{st.mean1.mutable_data_ptr<opmath_t>(), st.rstd1.mutable_data_ptr<opmath_t>(),
                                 st.mean2.mutable_data_ptr<opmath_t>(), st.rstd2.mutable_data_ptr<opmath_t>(),
                                 st.diag.mutable_data_ptr<opmath_t>()};
  standardize_kernel<scalar_t, opmath_t, acc_t>
      <<<column_grid(L, d), dim3(kCols, kRows), 0, c10::cuda::getCurrentCUDAStream()>>>(
          z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), st.a.mutable_data_ptr<opmath_t>(),
          st.b.mutable_data_ptr<opmath_t>(), stats, n, d, static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return st;
}

Standardized standardize_cuda(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "bt_xcorr_standardize",
                                         [&] { return standardize_typed<scalar_t>(z1, z2, eps); });
}

template <typename opmath_t>
at::Tensor layer_loss_typed(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                            const at::Tensor& on_weight, const at::Tensor& off_weight) {
  using acc_t = at::acc_type<opmath_t, true>;
  const int64_t L = x.size(0), m = x.numel() / L, d = diag.size(1);
  TORCH_CHECK(L <= 65535, "bt_xcorr_loss: at most 65535 layers are supported on CUDA, got ", L);
  const int64_t parts = std::clamp<int64_t>(ceil_div(m, kThreads * 16), 1, kMaxParts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({L, parts}, diag.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto loss = at::empty({L}, diag.options());
  const dim3 grid(static_cast<unsigned int>(parts), static_cast<unsigned int>(L));
  sum_products_kernel<opmath_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<opmath_t>(), y.const_data_ptr<opmath_t>(), partial.mutable_data_ptr<acc_t>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_loss_kernel<opmath_t, acc_t><<<grid.y, kThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), parts, diag.const_data_ptr<opmath_t>(), d,
      on_weight.const_data_ptr<opmath_t>(), off_weight.const_data_ptr<opmath_t>(), static_cast<acc_t>(scale),
      loss.mutable_data_ptr<opmath_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor layer_loss_cuda(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                           const at::Tensor& on_weight, const at::Tensor& off_weight) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bt_xcorr_layer_loss", [&] {
    return layer_loss_typed<scalar_t>(x, y, scale, diag, on_weight, off_weight);
  });
}

template <typename scalar_t>
InputView<scalar_t, at::opmath_type<scalar_t>> input_view(const Side& side) {
  using opmath_t = at::opmath_type<scalar_t>;
  return {side.z.const_data_ptr<scalar_t>(), side.mean.const_data_ptr<opmath_t>(),
          side.rstd.const_data_ptr<opmath_t>()};
}

template <typename scalar_t>
at::Tensor standardize_backward_typed(const SideInputs& in) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t L = in.self.z.size(0), n = in.self.z.size(1), d = in.self.z.size(2);
  at::Tensor dz = at::empty_like(in.self.z);
  const LayerCoefs<opmath_t> coefs{in.grad_loss.const_data_ptr<opmath_t>(), in.on_weight.const_data_ptr<opmath_t>(),
                                   in.off_weight.const_data_ptr<opmath_t>()};
  standardize_backward_kernel<scalar_t, opmath_t, acc_t>
      <<<column_grid(L, d), dim3(kCols, kRows), 0, c10::cuda::getCurrentCUDAStream()>>>(
          input_view<scalar_t>(in.self), input_view<scalar_t>(in.partner), in.p.const_data_ptr<opmath_t>(),
          in.diag.const_data_ptr<opmath_t>(), coefs, dz.mutable_data_ptr<scalar_t>(), n, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

at::Tensor standardize_backward_cuda(const SideInputs& in) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.self.z.scalar_type(), "bt_xcorr_backward",
                                         [&] { return standardize_backward_typed<scalar_t>(in); });
}

// The CUDA kernel is picked when any argument is on CUDA; the device guard needs z1 there.
void check_on_cuda(const at::Tensor& z1) {
  TORCH_CHECK(z1.is_cuda(), "bt_xcorr_loss: all tensor arguments must be on the same device, got z1 on ",
              z1.device(), " and another argument on CUDA");
}

const Kernels kCudaKernels{&standardize_cuda, &layer_loss_cuda, &standardize_backward_cuda};

at::Tensor bt_xcorr_loss_cuda(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& on_weight,
                              const at::Tensor& off_weight, double eps) {
  check_on_cuda(z1);
  const c10::cuda::CUDAGuard guard(z1.device());
  return xcorr_forward(kCudaKernels, z1, z2, on_weight, off_weight, eps);
}

std::tuple<at::Tensor, at::Tensor> bt_xcorr_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& z1,
                                                               const at::Tensor& z2, const at::Tensor& on_weight,
                                                               const at::Tensor& off_weight, double eps) {
  check_on_cuda(z1);
  const c10::cuda::CUDAGuard guard(z1.device());
  return xcorr_backward(kCudaKernels, grad_loss, z1, z2, on_weight, off_weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(ilm_dist, CUDA, m) {
  m.impl("bt_xcorr_loss", &bt_xcorr_loss_cuda);
  m.impl("bt_xcorr_loss_backward", &bt_xcorr_loss_backward_cuda);
}

}  // namespace ilm_dist
