// Operator schema, input validation and the device-independent part of the batched Barlow Twins loss.
#include <Python.h>

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/core/DeviceGuard.h>
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

// The kernels of one device run only its tensors; the guard makes z1's device current (CUDA streams).
c10::OptionalDeviceGuard device_guard(const Kernels& kernels, const at::Tensor& z1) {
  TORCH_CHECK(z1.device().type() == kernels.device,
              "bt_xcorr_loss: all tensor arguments must be on the same device, got z1 on ", z1.device(),
              " and another argument on ", kernels.device);
  return z1.is_cpu() ? c10::OptionalDeviceGuard() : c10::OptionalDeviceGuard(z1.device());
}

// The batched products x @ y: operands cast to `operand`, the dtype the standardisation wrote a and b in
// (on CUDA fp16/bf16 for such inputs, multiplied on tensor cores, accumulated in fp32 and returned in fp32
// through at::bmm's out_dtype overload), results in the compute dtype `out`. fp32 operands follow torch's
// matmul precision (TF32 when torch.backends.cuda.matmul allows it), as the reference's matmul does; the
// fused kernels are always fp32, and the loss never subtracts a fused-kernel diagonal from a TF32 one in
// the D x D form (layer_loss's xcorr_form).
struct Products {
  at::ScalarType operand;
  at::ScalarType out;
  int64_t n;

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& y) const {
    const auto xo = x.to(operand), yo = y.to(operand);
    return operand == out ? at::bmm(xo, yo) : at::bmm(xo, yo, out);
  }

  // A product with a Gram matrix or N C (entries up to D and N) as operand x (left) or y: as an fp16
  // operand it is divided by N first (|C_ij| <= 1, within fp16's range) and the product multiplied back.
  at::Tensor with_matrix(const at::Tensor& x, const at::Tensor& y, bool matrix_is_x) const {
    if (operand != at::kHalf) return (*this)(x, y);
    const double inv = 1.0 / static_cast<double>(n);
    return (*this)(matrix_is_x ? at::mul(x, inv) : x, matrix_is_x ? y : at::mul(y, inv)).mul_(static_cast<double>(n));
  }
};

void check_xcorr(const at::Tensor& xcorr, const at::Tensor& z1) {
  const int64_t L = z1.size(0), d = z1.size(2);
  TORCH_CHECK(xcorr.dim() == 3 && xcorr.size(0) == L && xcorr.size(1) == d && xcorr.size(2) == d,
              "bt_xcorr_loss_backward: xcorr must be the forward's [L, D, D] = [", L, ", ", d, ", ", d,
              "] output or empty, got shape ", xcorr.sizes());
  TORCH_CHECK(xcorr.scalar_type() == compute_dtype(z1) && xcorr.device() == z1.device(),
              "bt_xcorr_loss_backward: xcorr must be ", compute_dtype(z1), " on ", z1.device(), ", got ",
              xcorr.scalar_type(), " on ", xcorr.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> xcorr_forward(const Kernels& kernels, const at::Tensor& z1,
                                                 const at::Tensor& z2, const at::Tensor& on_weight,
                                                 const at::Tensor& off_weight, double eps) {
  check_inputs(z1, z2, on_weight, off_weight, eps);
  const auto guard = device_guard(kernels, z1);
  const auto dtype = compute_dtype(z1);
  const auto on = on_weight.to(dtype).contiguous();
  const auto off = off_weight.to(dtype).contiguous();
  const int64_t L = z1.size(0), n = z1.size(1), d = z1.size(2);
  const double scale = 1.0 / (static_cast<double>(n) * static_cast<double>(n));
  const Standardized st = kernels.standardize(z1, z2, eps);
  const Products product{st.a.scalar_type(), dtype, n};
  if (use_gram(n, d)) {
    const auto g1 = product(st.a, st.a.transpose(1, 2));
    const auto g2 = product(st.b, st.b.transpose(1, 2));
    auto loss = kernels.layer_loss(g1, g2, scale, st.diag, on, off, /*xcorr_form=*/false);
    return {loss, at::empty({L, 0, 0}, st.diag.options())};
  }
  auto c = product(st.a.transpose(1, 2), st.b);  // N C
  auto loss = kernels.layer_loss(c, c, scale, st.diag, on, off, /*xcorr_form=*/true);
  return {loss, c};
}

std::tuple<at::Tensor, at::Tensor> xcorr_backward(const Kernels& kernels, const at::Tensor& grad_loss,
                                                  const at::Tensor& z1, const at::Tensor& z2,
                                                  const std::optional<at::Tensor>& xcorr,
                                                  const at::Tensor& on_weight, const at::Tensor& off_weight,
                                                  double eps) {
  check_inputs(z1, z2, on_weight, off_weight, eps);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == z1.size(0),
              "bt_xcorr_loss_backward: grad_loss must have shape [L] = [", z1.size(0), "], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == z1.device(), "bt_xcorr_loss_backward: grad_loss must be on ", z1.device(),
              ", got ", grad_loss.device());
  const bool saved = xcorr.has_value() && xcorr->numel() > 0;
  if (saved) check_xcorr(*xcorr, z1);
  const auto guard = device_guard(kernels, z1);
  const auto dtype = compute_dtype(z1);
  const int64_t n = z1.size(1), d = z1.size(2);
  Standardized st = kernels.standardize(z1, z2, eps);
  const Products product{st.a.scalar_type(), dtype, n};
  // The products need the standardised a, b; the fused backward recomputes them from z, so a and b are
  // released as soon as the products no longer need them.
  at::Tensor pa, pb;  // G_b a, G_a b
  if (!saved && use_gram(n, d)) {
    const auto ga = product(st.a, st.a.transpose(1, 2));
    pa = product.with_matrix(product(st.b, st.b.transpose(1, 2)), st.a, true);
    st.a.reset();
    pb = product.with_matrix(ga, st.b, true);
  } else {  // N C = a^T b: G_b a = b (N C)^T, G_a b = a (N C); recomputed if the caller did not save it
    const auto c = saved ? *xcorr : product(st.a.transpose(1, 2), st.b);
    pb = product.with_matrix(st.a, c, false);
    st.a.reset();
    pa = product.with_matrix(st.b, c.transpose(1, 2), false);
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
  m.def(
      "bt_xcorr_loss(Tensor z1, Tensor z2, Tensor on_weight, Tensor off_weight, float eps) "
      "-> (Tensor loss, Tensor xcorr)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "bt_xcorr_loss_backward(Tensor grad_loss, Tensor z1, Tensor z2, Tensor? xcorr, Tensor on_weight, "
      "Tensor off_weight, float eps) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace ilm_dist
