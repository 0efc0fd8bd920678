// Batched Barlow Twins cross-correlation loss over stacked layers: shared declarations.
//
// For every layer l of z1, z2: [L, N, D] (a = standardise(z1), b = standardise(z2) over N):
//   C      = a^T b / N                                      (D x D)
//   loss_l = on_l * sum_i (C_ii - 1)^2 + off_l * sum_{i != j} C_ij^2
// Two formulations of the same loss, chosen per call by the multiply-add count (use_gram):
//   Gram form (2N <= D): ||C||_F^2 = sum(G_a * G_b) / N^2 with G_a = a a^T, G_b = b b^T (N x N), so C is
//     never formed; forward 2 N^2 D, backward 4 N^2 D multiply-adds, nothing saved for the backward.
//   D x D form (otherwise): N C = a^T b, returned as the op's second output `xcorr` and saved for the
//     backward; forward N D^2, backward 2 N D^2 (the reference's 3 N D^2 in all).
// Backward (g = dLoss/dloss_l, h_i = 2 (on_l (C_ii - 1) - off_l C_ii)):
//   dL/da = g * (2 off_l / N^2 * G_b a + b * h / N),   dL/db = g * (2 off_l / N^2 * G_a b + a * h / N)
//   with G_b a = b (N C)^T and G_a b = a (N C) in the D x D form,
// followed by the batch-standardisation backward dz = rstd * (da - mean_N da - a * mean_N(da * a)).
// The backward recomputes the standardisation from z1, z2 (O(N D)); its fused kernels recompute a, b from
// z and the statistics so that a, b are freed as soon as the products are formed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ilm_dist {

// Batch-standardised inputs and per-feature statistics. Statistics are in the compute dtype (fp64 for fp64
// inputs, else fp32); a and b are in the products' operand dtype (Kernels::standardize).
struct Standardized {
  at::Tensor a;      // (z1 - mean1) * rstd1, [L, N, D]
  at::Tensor b;      // (z2 - mean2) * rstd2, [L, N, D]
  at::Tensor mean1;  // [L, D]
  at::Tensor rstd1;  // 1 / sqrt(var + eps), [L, D]
  at::Tensor mean2;  // [L, D]
  at::Tensor rstd2;  // [L, D]
  at::Tensor diag;   // C_ii = sum_n a_ni b_ni / N of the stored (operand-dtype) a, b, [L, D]
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
  at::Tensor p;           // G_t s, [L, N, D], compute dtype
  at::Tensor diag;        // C_ii, [L, D]
  at::Tensor grad_loss;   // [L]
  at::Tensor on_weight;   // [L]
  at::Tensor off_weight;  // [L]
};

// The device-specific fused kernels; everything else (checks, products, formulation) is shared (xcorr.cpp).
struct Kernels {
  c10::DeviceType device;
  // Standardises z1 and z2 over the batch axis and computes diag(C). a and b are written in the dtype the
  // products take as operands: the compute dtype, or on CUDA the input dtype for fp16/bf16 (tensor cores).
  Standardized (*standardize)(const at::Tensor& z1, const at::Tensor& z2, double eps);
  // loss_l = on_l * sum_i (d_i - 1)^2 + off_l * off_l', where off_l' = scale * sum(x_l * y_l) - sum_i d_i^2
  // (Gram form) or, with xcorr_form (x = y = N C, [L, D, D]), the same with the product's own diagonal
  // scale * x_ii * y_ii in place of d_i^2, so that the diagonal it subtracts is the one the sum contains.
  at::Tensor (*layer_loss)(const at::Tensor& x, const at::Tensor& y, double scale, const at::Tensor& diag,
                           const at::Tensor& on_weight, const at::Tensor& off_weight, bool xcorr_form);
  // dL/dz of the input "self", in its dtype.
  at::Tensor (*standardize_backward)(const SideInputs& in);
};

// Whether the N x N Gram form costs at most the multiply-adds of the D x D form over forward + backward:
// 6 N^2 D against 3 N D^2 (and 2 N^2 D against N D^2 for the forward alone: the same rule). At the tie
// 2N = D the Gram form wins: its products have the smaller outputs and nothing is saved for the backward
// (CPU, N = 1024, D = 2048: 1.42 s against 1.52 s of GEMMs).
inline bool use_gram(int64_t n, int64_t d) { return 2 * n <= d; }

// (loss [L], xcorr): xcorr = N C [L, D, D] in the D x D form, an empty [L, 0, 0] tensor in the Gram form.
std::tuple<at::Tensor, at::Tensor> xcorr_forward(const Kernels& kernels, const at::Tensor& z1,
                                                 const at::Tensor& z2, const at::Tensor& on_weight,
                                                 const at::Tensor& off_weight, double eps);

std::tuple<at::Tensor, at::Tensor> xcorr_backward(const Kernels& kernels, const at::Tensor& grad_loss,
                                                  const at::Tensor& z1, const at::Tensor& z2,
                                                  const std::optional<at::Tensor>& xcorr,
                                                  const at::Tensor& on_weight, const at::Tensor& off_weight,
                                                  double eps);

// Registers the forward and backward of `kernels` for one dispatch key (TORCH_LIBRARY_IMPL body).
template <const Kernels& kernels>
void register_kernels(torch::Library& m) {
  m.impl("bt_xcorr_loss", [](const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& on_weight,
                             const at::Tensor& off_weight, double eps) {
    return xcorr_forward(kernels, z1, z2, on_weight, off_weight, eps);
  });
  m.impl("bt_xcorr_loss_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& z1, const at::Tensor& z2,
            const std::optional<at::Tensor>& xcorr, const at::Tensor& on_weight, const at::Tensor& off_weight,
            double eps) { return xcorr_backward(kernels, grad_loss, z1, z2, xcorr, on_weight, off_weight, eps); });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ilm_dist
