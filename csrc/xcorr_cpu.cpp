// CPU kernels of the batched Barlow Twins loss: one task per (layer, block of kBlock features), the
// inner loops run over contiguous features so they vectorise; reductions are deterministic.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "xcorr.h"

namespace ilm_dist {
namespace {

constexpr int64_t kBlock = 64;          // features per task
constexpr int64_t kChunk = int64_t{1} << 14;  // elements per partial sum in layer_loss

// Column block [n, w] of a row-major [n, ld] matrix.
struct Block {
  int64_t n;
  int64_t ld;
  int64_t w;
};

// Per-column mean and 1 / sqrt(var + eps) of the block (two passes, biased variance).
template <typename scalar_t, typename acc_t>
struct ColumnStats {
  std::array<acc_t, kBlock> mean{};
  std::array<acc_t, kBlock> rstd{};

  ColumnStats(const scalar_t* __restrict__ z, Block blk, double eps) {
    for (int64_t i = 0; i < blk.n; ++i) {
      for (int64_t j = 0; j < blk.w; ++j) mean[j] += static_cast<acc_t>(z[i * blk.ld + j]);
    }
    for (int64_t j = 0; j < blk.w; ++j) mean[j] /= blk.n;
    for (int64_t i = 0; i < blk.n; ++i) {
      for (int64_t j = 0; j < blk.w; ++j) {
        const acc_t c = static_cast<acc_t>(z[i * blk.ld + j]) - mean[j];
        rstd[j] += c * c;
      }
    }
    for (int64_t j = 0; j < blk.w; ++j) rstd[j] = acc_t{1} / std::sqrt(rstd[j] / blk.n + static_cast<acc_t>(eps));
  }
};

// Outputs of standardize_block, offset to the block.
template <typename opmath_t>
struct StandardizedBlock {
  opmath_t* a;
  opmath_t* b;
  opmath_t* mean1;
  opmath_t* rstd1;
  opmath_t* mean2;
  opmath_t* rstd2;
  opmath_t* diag;
};

// a = standardise(z1), b = standardise(z2), their statistics, and diag[j] = sum_i a[i, j] b[i, j] / n.
template <typename scalar_t, typename opmath_t, typename acc_t>
void standardize_block(const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                       StandardizedBlock<opmath_t> out, Block blk, double eps) {
  const ColumnStats<scalar_t, acc_t> s1(z1, blk, eps), s2(z2, blk, eps);
  std::array<acc_t, kBlock> dot{};
  for (int64_t i = 0; i < blk.n; ++i) {
    for (int64_t j = 0; j < blk.w; ++j) {
      const int64_t k = i * blk.ld + j;
      const opmath_t x = static_cast<opmath_t>((static_cast<acc_t>(z1[k]) - s1.mean[j]) * s1.rstd[j]);
      const opmath_t y = static_cast<opmath_t>((static_cast<acc_t>(z2[k]) - s2.mean[j]) * s2.rstd[j]);
      out.a[k] = x;
      out.b[k] = y;
      dot[j] += static_cast<acc_t>(x) * static_cast<acc_t>(y);
    }
  }
  for (int64_t j = 0; j < blk.w; ++j) {
    out.mean1[j] = static_cast<opmath_t>(s1.mean[j]);
    out.rstd1[j] = static_cast<opmath_t>(s1.rstd[j]);
    out.mean2[j] = static_cast<opmath_t>(s2.mean[j]);
    out.rstd2[j] = static_cast<opmath_t>(s2.rstd[j]);
    out.diag[j] = static_cast<opmath_t>(dot[j] / blk.n);
  }
}

template <typename scalar_t>
Standardized standardize_typed(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t L = z1.size(0), n = z1.size(1), d = z1.size(2);
  const auto opts = z1.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
  Standardized st{at::empty({L, n, d}, opts), at::empty({L, n, d}, opts), at::empty({L, d}, opts),
                  at::empty({L, d}, opts),    at::empty({L, d}, opts),    at::empty({L, d}, opts),
                  at::empty({L, d}, opts)};
  const scalar_t* z1p = z1.const_data_ptr<scalar_t>();
  const scalar_t* z2p = z2.const_data_ptr<scalar_t>();
  const StandardizedBlock<opmath_t> base{st.a.mutable_data_ptr<opmath_t>(),     st.b.mutable_data_ptr<opmath_t>(),
                                         st.mean1.mutable_data_ptr<opmath_t>(), st.rstd1.mutable_data_ptr<opmath_t>(),
                                         st.mean2.mutable_data_ptr<opmath_t>(), st.rstd2.mutable_data_ptr<opmath_t>(),
                                         st.diag.mutable_data_ptr<opmath_t>()};
  const int64_t blocks = ceil_div(d, kBlock);
  at::parallel_for(0, L * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / blocks, col = (task % blocks) * kBlock;
      const int64_t x = l * n * d + col, stat = l * d + col;
      const StandardizedBlock<opmath_t> out{base.a + x,        base.b + x,        base.mean1 + stat,
                                            base.rstd1 + stat, base.mean2 + stat, base.rstd2 + stat,
                                            base.diag + stat};
      standardize_block<scalar_t, opmath_t, acc_t>(z1p + x, z2p + x, out, Block{n, d, std::min(kBlock, d - col)},
                                                   eps);
    }
  });
  return st;
}

Standardized standardize_cpu(const at::Tensor& z1, const at::Tensor& z2, double eps) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "bt_xcorr_standardize",
                                         [&] { return standardize_typed<scalar_t>(z1, z2, eps); });
}

template <typename opmath_t>
at::Tensor layer_loss_typed(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                            const at::Tensor& on_weight, const at::Tensor& off_weight) {
  using acc_t = at::acc_type<opmath_t, false>;
  const int64_t L = x.size(0), m = x.numel() / L, d = diag.size(1);
  const int64_t chunks = ceil_div(m, kChunk);
  const opmath_t* xp = x.const_data_ptr<opmath_t>();
  const opmath_t* yp = y.const_data_ptr<opmath_t>();
  std::vector<acc_t> partial(L * chunks);
  at::parallel_for(0, L * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t start = (task / chunks) * m + (task % chunks) * kChunk;
      const int64_t stop = (task / chunks) * m + std::min(m, (task % chunks + 1) * kChunk);
      acc_t s = 0;
      for (int64_t i = start; i < stop; ++i) s += static_cast<acc_t>(xp[i]) * static_cast<acc_t>(yp[i]);
      partial[task] = s;
    }
  });
  const opmath_t* dp = diag.const_data_ptr<opmath_t>();
  const opmath_t* onp = on_weight.const_data_ptr<opmath_t>();
  const opmath_t* offp = off_weight.const_data_ptr<opmath_t>();
  auto loss = at::empty({L}, diag.options());
  opmath_t* lp = loss.mutable_data_ptr<opmath_t>();
  for (int64_t l = 0; l < L; ++l) {
    acc_t frob = 0, on_sum = 0, diag_sq = 0;
    for (int64_t c = 0; c < chunks; ++c) frob += partial[l * chunks + c];
    for (int64_t i = 0; i < d; ++i) {
      const acc_t v = dp[l * d + i];
      on_sum += (v - 1) * (v - 1);
      diag_sq += v * v;
    }
    lp[l] = static_cast<opmath_t>(onp[l] * on_sum + offp[l] * (scale * frob - diag_sq));
  }
  return loss;
}

at::Tensor layer_loss_cpu(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                          const at::Tensor& on_weight, const at::Tensor& off_weight) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bt_xcorr_layer_loss", [&] {
    return layer_loss_typed<scalar_t>(x, y, scale, diag, on_weight, off_weight);
  });
}

// Per-layer coefficients of dL/ds = p_coef * P + diag_coef(C_jj) * t (s: self, t: partner, standardised).
template <typename acc_t>
struct GradCoef {
  acc_t p_coef;  // g * 2 off / N^2
  acc_t g_n;     // g / N
  acc_t on;
  acc_t off;
  acc_t diag_coef(acc_t c) const { return g_n * 2 * (on * (c - 1) - off * c); }
};

// A block of one input with its per-column statistics, offset to the block.
template <typename scalar_t, typename opmath_t>
struct InputBlock {
  const scalar_t* z;
  const opmath_t* mean;
  const opmath_t* rstd;
};

// dz = rstd * (ga - mean(ga) - s * mean(ga * s)) for the w columns of the block, where
// ga = p_coef * P + diag_coef * t and s, t are the standardised self and partner (recomputed from z).
template <typename scalar_t, typename opmath_t, typename acc_t>
void backward_block(InputBlock<scalar_t, opmath_t> self, InputBlock<scalar_t, opmath_t> partner,
                    const opmath_t* __restrict__ p, const opmath_t* __restrict__ diag, GradCoef<acc_t> coef,
                    scalar_t* __restrict__ out, Block blk) {
  std::array<acc_t, kBlock> cd{}, sum_g{}, sum_gs{};
  for (int64_t j = 0; j < blk.w; ++j) cd[j] = coef.diag_coef(diag[j]);
  const auto s = [&](int64_t k, int64_t j) {
    return (static_cast<acc_t>(self.z[k]) - self.mean[j]) * static_cast<acc_t>(self.rstd[j]);
  };
  const auto ga = [&](int64_t k, int64_t j) {
    const acc_t t = (static_cast<acc_t>(partner.z[k]) - partner.mean[j]) * static_cast<acc_t>(partner.rstd[j]);
    return coef.p_coef * p[k] + cd[j] * t;
  };
  for (int64_t i = 0; i < blk.n; ++i) {
    for (int64_t j = 0; j < blk.w; ++j) {
      const int64_t k = i * blk.ld + j;
      const acc_t g = ga(k, j);
      sum_g[j] += g;
      sum_gs[j] += g * s(k, j);
    }
  }
  for (int64_t j = 0; j < blk.w; ++j) {
    sum_g[j] /= blk.n;
    sum_gs[j] /= blk.n;
  }
  for (int64_t i = 0; i < blk.n; ++i) {
    for (int64_t j = 0; j < blk.w; ++j) {
      const int64_t k = i * blk.ld + j;
      out[k] = static_cast<scalar_t>(self.rstd[j] * (ga(k, j) - sum_g[j] - s(k, j) * sum_gs[j]));
    }
  }
}

template <typename scalar_t>
at::Tensor standardize_backward_typed(const SideInputs& in) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t L = in.self.z.size(0), n = in.self.z.size(1), d = in.self.z.size(2);
  auto dz = at::empty_like(in.self.z);
  const InputBlock<scalar_t, opmath_t> self{in.self.z.const_data_ptr<scalar_t>(),
                                            in.self.mean.const_data_ptr<opmath_t>(),
                                            in.self.rstd.const_data_ptr<opmath_t>()};
  const InputBlock<scalar_t, opmath_t> partner{in.partner.z.const_data_ptr<scalar_t>(),
                                               in.partner.mean.const_data_ptr<opmath_t>(),
                                               in.partner.rstd.const_data_ptr<opmath_t>()};
  const opmath_t* p = in.p.const_data_ptr<opmath_t>();
  const opmath_t* diag = in.diag.const_data_ptr<opmath_t>();
  const opmath_t* g = in.grad_loss.const_data_ptr<opmath_t>();
  const opmath_t* on = in.on_weight.const_data_ptr<opmath_t>();
  const opmath_t* off = in.off_weight.const_data_ptr<opmath_t>();
  scalar_t* out = dz.mutable_data_ptr<scalar_t>();
  const int64_t blocks = ceil_div(d, kBlock);
  const acc_t nn = static_cast<acc_t>(n);
  at::parallel_for(0, L * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / blocks, col = (task % blocks) * kBlock;
      const int64_t x = l * n * d + col, stat = l * d + col;
      const acc_t gl = g[l];
      const GradCoef<acc_t> coef{gl * 2 * off[l] / (nn * nn), gl / nn, on[l], off[l]};
      backward_block<scalar_t, opmath_t, acc_t>({self.z + x, self.mean + stat, self.rstd + stat},
                                                {partner.z + x, partner.mean + stat, partner.rstd + stat}, p + x,
                                                diag + stat, coef, out + x, Block{n, d, std::min(kBlock, d - col)});
    }
  });
  return dz;
}

at::Tensor standardize_backward_cpu(const SideInputs& in) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.self.z.scalar_type(), "bt_xcorr_backward",
                                         [&] { return standardize_backward_typed<scalar_t>(in); });
}

const Kernels kCpuKernels{&standardize_cpu, &layer_loss_cpu, &standardize_backward_cpu};

at::Tensor bt_xcorr_loss_cpu(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& on_weight,
                             const at::Tensor& off_weight, double eps) {
  return xcorr_forward(kCpuKernels, z1, z2, on_weight, off_weight, eps);
}

std::tuple<at::Tensor, at::Tensor> bt_xcorr_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& z1,
                                                              const at::Tensor& z2, const at::Tensor& on_weight,
                                                              const at::Tensor& off_weight, double eps) {
  return xcorr_backward(kCpuKernels, grad_loss, z1, z2, on_weight, off_weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(ilm_dist, CPU, m) {
  m.impl("bt_xcorr_loss", &bt_xcorr_loss_cpu);
  m.impl("bt_xcorr_loss_backward", &bt_xcorr_loss_backward_cpu);
}

}  // namespace ilm_dist
