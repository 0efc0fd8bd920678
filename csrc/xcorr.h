// Batched Barlow Twins cross-correlation loss over stacked layers: shared declarations.
//
// For every layer l of z1, z2: [L, N, D] (a = standardise(z1), b = standardise(z2) over N):
//   C      = a^T b / N                                      (D x D, never formed when N << D)
//   loss_l = on_l * sum_i (C_ii - 1)^2 + off_l * (||C||_F^2 - sum_i C_ii^2)
//   ||C||_F^2 = sum(G_a * G_b) / N^2  with  G_a = a a^T, G_b = b b^T  (N x N Gram matrices)
// Backward (g = dLoss/dloss_l, h_i = 2 (on_l (C_ii - 1) - off_l C_ii)):
//   dL/da = g * (2 off_l / N^2 * G_b a + b * h / N),   dL/db = g * (2 off_l / N^2 * G_a b + a * h / N)
//   G_b a = b (a^T b)^T and G_a b = a (a^T b) give the D x D form of the same products,
// followed by the batch-standardisation backward dz = rstd * (da - mean_N da - a * mean_N(da * a)).
// Which form is used is chosen per pass by the multiply-add count (xcorr.cpp). The backward saves nothing
// from the forward: it recomputes the standardisation and the products from z1, z2, and its fused kernels
// recompute a, b from z and the statistics so that a, b are freed as soon as the products are formed.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ilm_dist {

// Batch-standardised inputs and per-feature statistics; compute dtype: fp64 for fp64 inputs, else fp32.
struct Standardized {
  at::Tensor a;      // (z1 - mean1) * rstd1, [L, N, D]
  at::Tensor b;      // (z2 - mean2) * rstd2, [L, N, D]
  at::Tensor mean1;  // [L, D]
  at::Tensor rstd1;  // 1 / sqrt(var + eps), [L, D]
  at::Tensor mean2;  // [L, D]
  at::Tensor rstd2;  // [L, D]
  at::Tensor diag;   // C_ii = sum_n a_ni b_ni / N, [L, D]
};

// One input of the op with its statistics; the backward recomputes its standardised values from these.
struct Side {
  at::Tensor z;     // [L, N, D], input dtype
  at::Tensor mean;  // [L, D]
  at::Tensor rstd;  // [L, D]
};

// Inputs of the fused backward for the input "self" (the other one is "partner"); with s, t their
// standardised values, dL/ds = g * (2 off / N^2 * p + t * h / N), then through the standardisation.
struct SideInputs {
  Side self;
  Side partner;
  at::Tensor p;           // G_t s, [L, N, D]
  at::Tensor diag;        // C_ii, [L, D]
  at::Tensor grad_loss;   // [L]
  at::Tensor on_weight;   // [L]
  at::Tensor off_weight;  // [L]
};

// The device-specific fused kernels; everything else (checks, bmm products) is shared.
struct Kernels {
  // Standardises z1 and z2 over the batch axis and computes diag(C).
  Standardized (*standardize)(const at::Tensor& z1, const at::Tensor& z2, double eps);
  // loss_l = on_l * sum_i (d_i - 1)^2 + off_l * (scale * sum(x_l * y_l) - sum_i d_i^2).
  at::Tensor (*layer_loss)(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                           const at::Tensor& on_weight, const at::Tensor& off_weight);
  // dL/dz of the input "self", in its dtype.
  at::Tensor (*standardize_backward)(const SideInputs& in);
};

at::Tensor xcorr_forward(const Kernels& kernels, const at::Tensor& z1, const at::Tensor& z2,
                         const at::Tensor& on_weight, const at::Tensor& off_weight, double eps);

std::tuple<at::Tensor, at::Tensor> xcorr_backward(const Kernels& kernels, const at::Tensor& grad_loss,
                                                  const at::Tensor& z1, const at::Tensor& z2,
                                                  const at::Tensor& on_weight, const at::Tensor& off_weight,
                                                  double eps);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ilm_dist
