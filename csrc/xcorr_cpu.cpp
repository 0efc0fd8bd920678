// CPU kernels of the batched Barlow Twins loss: one task per (layer, block of kBlock features), the
// inner loops run over contiguous features so they vectorise; reductions are deterministic.
//
// The block kernels are compiled twice (GCC target_clones, picked at load time by the CPU's features):
// for x86-64-v3 (AVX2, FMA) and for the baseline x86-64 a portable build targets, which has only SSE2.
// Each column's sums run over the rows in the same order in both (vectorised across columns, and ISO C++
// forbids contracting a * b + c into an FMA), so both give the same bits.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "xcorr.h"

namespace ilm_dist {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ILM_DIST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ILM_DIST_CPU_CLONES
#endif

constexpr int64_t kBlock = 512;  // features per task: whole rows up to 512 features stream best
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

// a = standardise(z1), b = standardise(z2), their statistics, and diag[j] = sum_i a[i, j] b[i, j] / n
// (statistics and sums in acc_t, the element-wise standardisation in opmath_t).
template <typename scalar_t, typename opmath_t, typename acc_t>
ILM_DIST_CPU_CLONES void standardize_block(const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                                           StandardizedBlock<opmath_t> out, Block blk, double eps) {
  const ColumnStats<scalar_t, acc_t> s1(z1, blk, eps), s2(z2, blk, eps);
  std::array<opmath_t, kBlock> mean1{}, rstd1{}, mean2{}, rstd2{};
  for (int64_t j = 0; j < blk.w; ++j) {
    out.mean1[j] = mean1[j] = static_cast<opmath_t>(s1.mean[j]);
    out.rstd1[j] = rstd1[j] = static_cast<opmath_t>(s1.rstd[j]);
    out.mean2[j] = mean2[j] = static_cast<opmath_t>(s2.mean[j]);
    out.rstd2[j] = rstd2[j] = static_cast<opmath_t>(s2.rstd[j]);
  }
  std::array<acc_t, kBlock> dot{};
  for (int64_t i = 0; i < blk.n; ++i) {
    const scalar_t* __restrict__ x1 = z1 + i * blk.ld;
    const scalar_t* __restrict__ x2 = z2 + i * blk.ld;
    opmath_t* __restrict__ a = out.a + i * blk.ld;
    opmath_t* __restrict__ b = out.b + i * blk.ld;
    for (int64_t j = 0; j < blk.w; ++j) {
      a[j] = (static_cast<opmath_t>(x1[j]) - mean1[j]) * rstd1[j];
      b[j] = (static_cast<opmath_t>(x2[j]) - mean2[j]) * rstd2[j];
      dot[j] += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
    }
  }
  for (int64_t j = 0; j < blk.w; ++j) out.diag[j] = static_cast<opmath_t>(dot[j] / blk.n);
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
                            const at::Tensor& on_weight, const at::Tensor& off_weight, bool xcorr_form) {
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
      // the D x D form subtracts the product's own diagonal, the Gram form the fused kernel's diag
      const int64_t k = l * m + i * (d + 1);
      diag_sq += xcorr_form ? scale * static_cast<acc_t>(xp[k]) * static_cast<acc_t>(yp[k]) : v * v;
    }
    lp[l] = static_cast<opmath_t>(onp[l] * on_sum + offp[l] * (scale * frob - diag_sq));
  }
  return loss;
}

at::Tensor layer_loss_cpu(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                          const at::Tensor& on_weight, const at::Tensor& off_weight, bool xcorr_form) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bt_xcorr_layer_loss", [&] {
    return layer_loss_typed<scalar_t>(x, y, scale, diag, on_weight, off_weight, xcorr_form);
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
// Element-wise terms in opmath_t, the sums over rows in acc_t (double for fp32 inputs); the per-column
// constants are copied into local arrays so that the row loops vectorise.
template <typename scalar_t, typename opmath_t, typename acc_t>
ILM_DIST_CPU_CLONES void backward_block(InputBlock<scalar_t, opmath_t> self, InputBlock<scalar_t, opmath_t> partner,
                                        const opmath_t* __restrict__ p, const opmath_t* __restrict__ diag,
                                        GradCoef<acc_t> coef, scalar_t* __restrict__ out, Block blk) {
  std::array<opmath_t, kBlock> cd{}, s_mean{}, s_rstd{}, t_mean{}, t_rstd{}, mean_g{}, mean_gs{};
  std::array<acc_t, kBlock> sum_g{}, sum_gs{};
  for (int64_t j = 0; j < blk.w; ++j) {
    cd[j] = static_cast<opmath_t>(coef.diag_coef(diag[j]));
    s_mean[j] = self.mean[j];
    s_rstd[j] = self.rstd[j];
    t_mean[j] = partner.mean[j];
    t_rstd[j] = partner.rstd[j];
  }
  const opmath_t pc = static_cast<opmath_t>(coef.p_coef);
  const auto ga = [&](const scalar_t* zt, const opmath_t* pr, int64_t j) {
    return pc * pr[j] + cd[j] * ((static_cast<opmath_t>(zt[j]) - t_mean[j]) * t_rstd[j]);
  };
  const auto standardized = [&](const scalar_t* zs, int64_t j) {
    return (static_cast<opmath_t>(zs[j]) - s_mean[j]) * s_rstd[j];
  };
  for (int64_t i = 0; i < blk.n; ++i) {
    const scalar_t* __restrict__ zs = self.z + i * blk.ld;
    const scalar_t* __restrict__ zt = partner.z + i * blk.ld;
    const opmath_t* __restrict__ pr = p + i * blk.ld;
    for (int64_t j = 0; j < blk.w; ++j) {
      const opmath_t g = ga(zt, pr, j);
      sum_g[j] += g;
      sum_gs[j] += g * standardized(zs, j);
    }
  }
  for (int64_t j = 0; j < blk.w; ++j) {
    mean_g[j] = static_cast<opmath_t>(sum_g[j] / blk.n);
    mean_gs[j] = static_cast<opmath_t>(sum_gs[j] / blk.n);
  }
  for (int64_t i = 0; i < blk.n; ++i) {
    const scalar_t* __restrict__ zs = self.z + i * blk.ld;
    const scalar_t* __restrict__ zt = partner.z + i * blk.ld;
    const opmath_t* __restrict__ pr = p + i * blk.ld;
    scalar_t* __restrict__ o = out + i * blk.ld;
    for (int64_t j = 0; j < blk.w; ++j) {
      o[j] = static_cast<scalar_t>(s_rstd[j] * (ga(zt, pr, j) - mean_g[j] - standardized(zs, j) * mean_gs[j]));
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

const Kernels kCpuKernels{c10::DeviceType::CPU, &standardize_cpu, &layer_loss_cpu, &standardize_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(ilm_dist, CPU, m) { register_kernels<kCpuKernels>(m); }

}  // namespace ilm_dist
