// Exact (erf) GELU for training on the CPU: the forward pass also writes the derivative.
//
// Φ(x) and φ(x) share one exp(-x²/2), so GELU'(x) = Φ(x) + x·φ(x) costs the forward pass two
// more operations, and the backward pass becomes a single multiply instead of recomputing erf
// and exp (torch's gelu_backward took twice as long as its forward here). The derivative takes
// the place of the input in memory: autograd keeps one tensor either way.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "vec_math.h"

namespace {

using namespace lmforge_vec;

// GELU(x), and GELU'(x) too when `with_slope`.
std::tuple<at::Tensor, at::Tensor> gelu_forward(const at::Tensor& input, bool with_slope) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(), "gelu: x must be a float32 CPU tensor");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x), slope = with_slope ? at::empty_like(x) : at::Tensor();
  const float* in = x.data_ptr<float>();
  float *out = y.data_ptr<float>(), *d = with_slope ? slope.data_ptr<float>() : nullptr;
  at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
    gelu_range(in + begin, out + begin, d ? d + begin : nullptr, end - begin);
  });
  return {y, slope};
}

at::Tensor gelu_cpu(const at::Tensor& x) { return std::get<0>(gelu_forward(x, false)); }

std::tuple<at::Tensor, at::Tensor> gelu_with_slope_cpu(const at::Tensor& x) { return gelu_forward(x, true); }

// Both paths below autograd go through the dispatcher, so that torch.compile's tracing records
// the operators (their shapes are registered in kernels.py) instead of running them.
class Gelu : public torch::autograd::Function<Gelu> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lmforge::gelu_with_slope", "")
                               .typed<decltype(gelu_with_slope_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, slope] = op.call(x);
    ctx->save_for_backward({slope});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "gelu: lmforge's GELU kernel has no second derivative (backward with create_graph=True); "
                "set LMFORGE_KERNELS=0 to use torch's GELU");
    return {grads[0] * ctx->get_saved_variables()[0]};
  }
};

at::Tensor gelu_autograd(const at::Tensor& x) {
  if (at::GradMode::is_enabled() && x.requires_grad()) return Gelu::apply(x);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lmforge::gelu", "").typed<decltype(gelu_cpu)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("gelu(Tensor x) -> Tensor");
  m.def("gelu_with_slope(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("gelu", &gelu_cpu);
  m.impl("gelu_with_slope", &gelu_with_slope_cpu);
}

TORCH_LIBRARY_IMPL(lmforge, Autograd, m) { m.impl("gelu", &gelu_autograd); }
