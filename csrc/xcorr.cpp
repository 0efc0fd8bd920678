// Operator schema, input validation and the device-independent part of the batched Barlow Twins loss.
#include <Python.h>

#include <ATen/ops/bmm.h>
#include <torch/library.h>

#include <cmath>

#include "xcorr.h"

extern "C" {
// Importing ilm_dist._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ilm_dist {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_weight(const at::Tensor& w, const char* name, const at::Tensor& z1) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == z1.size(0), "bt_xcorr_loss: ", name,
              " must be a 1-D tensor with one weight per layer (", z1.size(0), "), got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "bt_xcorr_loss: ", name,
              " must be a floating-point tensor, got ", w.scalar_type());
  TORCH_CHECK(w.device() == z1.device(), "bt_xcorr_loss: ", name, " must be on the same device as z1 (",
              z1.device(), "), got ", w.device());
}

void check_inputs(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& on_weight,
                  const at::Tensor& off_weight, double eps) {
  TORCH_CHECK(z1.dim() == 3, "bt_xcorr_loss: z1 must be a 3-D [L, N, D] tensor, got shape ", z1.sizes());
  TORCH_CHECK(z2.sizes() == z1.sizes(), "bt_xcorr_loss: z1 and z2 must have the same shape, got ", z1.sizes(),
              " and ", z2.sizes());
  TORCH_CHECK(z1.numel() > 0, "bt_xcorr_loss: z1 and z2 must be non-empty, got shape ", z1.sizes());
  TORCH_CHECK(is_supported_dtype(z1.scalar_type()),
              "bt_xcorr_loss: z1 must be float32, float64, float16 or bfloat16, got ", z1.scalar_type());
  TORCH_CHECK(z2.scalar_type() == z1.scalar_type(), "bt_xcorr_loss: z1 and z2 must have the same dtype, got ",
              z1.scalar_type(), " and ", z2.scalar_type());
  TORCH_CHECK(z2.device() == z1.device(), "bt_xcorr_loss: z1 and z2 must be on the same device, got ",
              z1.device(), " and ", z2.device());
  TORCH_CHECK(z1.is_contiguous() && z2.is_contiguous(),
              "bt_xcorr_loss: z1 and z2 must be contiguous (call .contiguous() first)");
  check_weight(on_weight, "on_weight", z1);
  check_weight(off_weight, "off_weight", z1);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "bt_xcorr_loss: eps must be finite and >= 0, got ", eps);
}

at::ScalarType compute_dtype(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Multiply-adds of the big products: forward 2 N^2 D (two Grams) vs N D^2 (C);
// backward 4 N^2 D (two Grams, two Gram x [N, D]) vs 3 N D^2 (C, b C^T, a C).
bool gram_forward(int64_t n, int64_t d) { return 2 * n < d; }
bool gram_backward(int64_t n, int64_t d) { return 4 * n < 3 * d; }

}  // namespace

at::Tensor xcorr_forward(const Kernels& kernels, const at::Tensor& z1, const at::Tensor& z2,
                         const at::Tensor& on_weight, const at::Tensor& off_weight, double eps) {
  check_inputs(z1, z2, on_weight, off_weight, eps);
  const auto dtype = compute_dtype(z1);
  const auto on = on_weight.to(dtype).contiguous();
  const auto off = off_weight.to(dtype).contiguous();
  const int64_t n = z1.size(1), d = z1.size(2);
  const double scale = 1.0 / (static_cast<double>(n) * static_cast<double>(n));
  const Standardized st = kernels.standardize(z1, z2, eps);
  if (gram_forward(n, d)) {
    const auto g1 = at::bmm(st.a, st.a.transpose(1, 2));
    const auto g2 = at::bmm(st.b, st.b.transpose(1, 2));
    return kernels.layer_loss(g1, g2, scale, st.diag, on, off);
  }
  const auto c = at::bmm(st.a.transpose(1, 2), st.b);  // N * C
  return kernels.layer_loss(c, c, scale, st.diag, on, off);
}

std::tuple<at::Tensor, at::Tensor> xcorr_backward(const Kernels& kernels, const at::Tensor& grad_loss,
                                                  const at::Tensor& z1, const at::Tensor& z2,
                                                  const at::Tensor& on_weight, const at::Tensor& off_weight,
                                                  double eps) {
  check_inputs(z1, z2, on_weight, off_weight, eps);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == z1.size(0),
              "bt_xcorr_loss_backward: grad_loss must have shape [L] = [", z1.size(0), "], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == z1.device(), "bt_xcorr_loss_backward: grad_loss must be on ", z1.device(),
              ", got ", grad_loss.device());
  const auto dtype = compute_dtype(z1);
  const int64_t n = z1.size(1), d = z1.size(2);
  Standardized st = kernels.standardize(z1, z2, eps);
  // The products need the standardised a, b; the fused backward recomputes them from z, so a and b are
  // released as soon as the products no longer need them.
  at::Tensor pa, pb;  // G_b a, G_a b
  if (gram_backward(n, d)) {
    const auto ga = at::bmm(st.a, st.a.transpose(1, 2));
    pa = at::bmm(at::bmm(st.b, st.b.transpose(1, 2)), st.a);
    st.a.reset();
    pb = at::bmm(ga, st.b);
  } else {
    const auto c = at::bmm(st.a.transpose(1, 2), st.b);  // a^T b = N C: G_b a = b c^T, G_a b = a c
    pb = at::bmm(st.a, c);
    st.a.reset();
    pa = at::bmm(st.b, c.transpose(1, 2));
  }
  st.b.reset();
  const auto grad = grad_loss.to(dtype).contiguous();
  const auto on = on_weight.to(dtype).contiguous();
  const auto off = off_weight.to(dtype).contiguous();
  const Side s1{z1, st.mean1, st.rstd1}, s2{z2, st.mean2, st.rstd2};
  auto dz1 = kernels.standardize_backward({s1, s2, std::move(pa), st.diag, grad, on, off});
  auto dz2 = kernels.standardize_backward({s2, s1, std::move(pb), st.diag, grad, on, off});
  return {dz1, dz2};
}

TORCH_LIBRARY(ilm_dist, m) {
  m.def("bt_xcorr_loss(Tensor z1, Tensor z2, Tensor on_weight, Tensor off_weight, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "bt_xcorr_loss_backward(Tensor grad_loss, Tensor z1, Tensor z2, Tensor on_weight, Tensor off_weight, "
      "float eps) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace ilm_dist
