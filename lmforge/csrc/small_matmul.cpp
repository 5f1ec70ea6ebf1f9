// The small_matmul operator: x @ w^T * scales + bias for the few rows of decoding (the kernel
// itself is in small_matmul.h).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "small_matmul.h"

namespace {

using lmforge_kernels::matmul_rows;

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "small_matmul: x must be a 2-D float32 tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(),
              "small_matmul: w must be a contiguous (N, K) matrix with K = x.size(1)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar, "small_matmul: w must be float32 or int8");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  for (const auto& v : {scales, bias}) {
    TORCH_CHECK(!v || (v->scalar_type() == at::kFloat && v->is_contiguous() && v->numel() == N),
                "small_matmul: scales and bias must be contiguous float32 vectors of length N");
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* s = scales ? scales->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  if (w.scalar_type() == at::kChar) {
    matmul_rows(xc.data_ptr<float>(), w.data_ptr<int8_t>(), s, b, y.data_ptr<float>(), M, N, K);
  } else {
    matmul_rows(xc.data_ptr<float>(), w.data_ptr<float>(), s, b, y.data_ptr<float>(), M, N, K);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) { m.def("small_matmul(Tensor x, Tensor w, Tensor? scales, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("small_matmul", &small_matmul); }
