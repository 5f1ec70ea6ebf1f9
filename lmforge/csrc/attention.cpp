// Causal self-attention for training on the CPU, forward and backward, with its autograd in C++.
//
// PyTorch's CPU flash-attention kernel is built for long sequences; at the lengths small models
// train on (64 to 512) it ran at a third of the matrix-product rate, and the head split and merge
// around it cost copies and autograd nodes of their own. Here one (batch, head) is one task:
// its scores for a block of query rows fit in cache, the products go to MKL's sgemm (one thread
// per task), and the softmax runs in AVX2 between them. Queries, keys and values are read in
// place from the fused projection (any strides, last dimension contiguous) and the output is
// written straight in (B, T, heads, head_dim) order, so no transposes are needed on either side.
//
// Forward keeps, per query row, the log-sum-exp of its scores; backward recomputes the
// probabilities from it (as flash attention does) instead of storing T×T of them:
//   dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),  dQ = s dS K,  dK += s dSᵀ Q.
// Grouped-query attention: a task owns one key/value head and walks the query heads that share
// it, so its dK and dV need no locks.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "vec_math.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using namespace lmforge_vec;

constexpr int64_t kRowBlock = 32;  // query rows per block: their scores stay in L1/L2

// Row-major C (M×N) = alpha · op(A) · op(B) + beta · C, through column-major sgemm (Cᵀ = op(B)ᵀ op(A)ᵀ).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// p[0:n] = exp(p[0:n] - shift); returns their sum.
float exp_shifted(float* p, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), s));
    _mm256_storeu_ps(p + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < n) {
    const __m256i mask = tail_mask(n - j);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(p + j, mask), s)), _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(p + j, mask, e);
    sum = _mm256_add_ps(sum, e);
  }
  return horizontal_add(sum);
}

float row_max(const float* p, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + j));
  float best = horizontal_max(m);
  for (; j < n; ++j) best = std::max(best, p[j]);
  return best;
}

void scale_row(float* p, int64_t n, float factor) {
  const __m256 f = _mm256_set1_ps(factor);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), f));
  for (; j < n; ++j) p[j] *= factor;
}

void zero_row(float* p, int64_t n) { std::fill(p, p + n, 0.0f); }

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  float sum = horizontal_add(acc);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// A (B, T, heads, D) tensor seen as one head's (T × D) matrix with row stride `row`.
struct Heads {
  float* data;
  int64_t batch, row, head;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<float>()), batch(t.stride(0)), row(t.stride(1)), head(t.stride(2)) {}
  float* at(int64_t b, int64_t h) const { return data + b * batch + h * head; }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "causal_attention: q, k, v must be float32 CPU tensors (B, T, heads, head_dim), last dim contiguous");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "causal_attention: q (B, T, H, D), k and v (B, T, Hkv, D) must agree");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "causal_attention: query heads must be a multiple of key/value heads");
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  check_inputs(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), group = H / k.size(2);
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options());
  const Heads Q(q), K(k), V(v), O(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t blocks = (T + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kRowBlock * T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * blocks), h = task / blocks % H, r0 = task % blocks * kRowBlock;
      const int64_t r1 = std::min(T, r0 + kRowBlock), rows = r1 - r0;  // keys 0..r1-1 are visible
      const float *qh = Q.at(b, h) + r0 * Q.row, *kh = K.at(b, h / group), *vh = V.at(b, h / group);
      float* S = scores.data();
      gemm(false, true, rows, r1, D, static_cast<float>(scale), qh, Q.row, kh, K.row, 0.0f, S, r1);
      float* row_lse = lse_data + (b * H + h) * T + r0;
      for (int64_t i = 0; i < rows; ++i) {
        float* p = S + i * r1;
        const int64_t visible = r0 + i + 1;
        const float top = row_max(p, visible);
        const float sum = exp_shifted(p, visible, top);
        scale_row(p, visible, 1.0f / sum);
        zero_row(p + visible, r1 - visible);
        row_lse[i] = top + std::log(sum);
      }
      gemm(false, false, rows, D, r1, 1.0f, S, r1, vh, V.row, 0.0f, O.at(b, h) + r0 * O.row, O.row);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& out, const at::Tensor& lse,
                                                                   double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2), group = H / KH;
  const at::Tensor dout = grad_out.contiguous();
  at::Tensor dq = at::empty({B, T, H, D}, q.options());
  at::Tensor dk = at::zeros({B, T, KH, D}, q.options()), dv = at::zeros({B, T, KH, D}, q.options());
  const Heads Q(q), K(k), V(v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  const float* lse_data = lse.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(kRowBlock * T), grads(kRowBlock * T), delta(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, g = task % KH;
      const float *kh = K.at(b, g), *vh = V.at(b, g);
      float *dkh = dK.at(b, g), *dvh = dV.at(b, g);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const float *qh = Q.at(b, h), *oh = O.at(b, h), *doh = dO.at(b, h);
        const float* row_lse = lse_data + (b * H + h) * T;
        for (int64_t t = 0; t < T; ++t) delta[t] = dot(doh + t * dO.row, oh + t * O.row, D);
        for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
          const int64_t r1 = std::min(T, r0 + kRowBlock), rows = r1 - r0;
          float *P = probs.data(), *G = grads.data();
          gemm(false, true, rows, r1, D, s, qh + r0 * Q.row, Q.row, kh, K.row, 0.0f, P, r1);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t visible = r0 + i + 1;
            exp_shifted(P + i * r1, visible, row_lse[r0 + i]);
            zero_row(P + i * r1 + visible, r1 - visible);
          }
          gemm(true, false, r1, D, rows, 1.0f, P, r1, doh + r0 * dO.row, dO.row, 1.0f, dvh, dV.row);  // dV += Pᵀ dO
          gemm(false, true, rows, r1, D, 1.0f, doh + r0 * dO.row, dO.row, vh, V.row, 0.0f, G, r1);    // dP = dO Vᵀ
          for (int64_t i = 0; i < rows; ++i) {  // dS = P ∘ (dP − δ), over the visible keys
            float *p = P + i * r1, *d = G + i * r1;
            const __m256 shift = _mm256_set1_ps(delta[r0 + i]);
            const int64_t visible = r0 + i + 1;
            int64_t j = 0;
            for (; j + 8 <= visible; j += 8) {
              _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(p + j),
                                                    _mm256_sub_ps(_mm256_loadu_ps(d + j), shift)));
            }
            for (; j < visible; ++j) d[j] = p[j] * (d[j] - delta[r0 + i]);
            zero_row(d + visible, r1 - visible);
          }
          gemm(false, false, rows, D, r1, s, G, r1, kh, K.row, 0.0f, dQ.at(b, h) + r0 * dQ.row, dQ.row);  // dQ
          gemm(true, false, r1, D, rows, s, G, r1, qh + r0 * Q.row, Q.row, 1.0f, dkh, dK.row);            // dK +=
        }
      }
    }
  });
  return {dq, dk, dv};
}

// The autograd Function calls the forward and backward kernels through the dispatcher (as
// operators of their own, with shapes registered in kernels.py), so that torch.compile's
// tracing records them instead of running C++ on tensors that hold no data.
std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lmforge::causal_attention_forward", "")
                             .typed<decltype(attention_forward)>();
  return op.call(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lmforge::causal_attention_backward", "")
                             .typed<decltype(attention_backward)>();
  return op.call(grad, q, k, v, out, lse, scale);
}

class CausalAttention : public torch::autograd::Function<CausalAttention> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_forward(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "causal_attention: lmforge's attention kernel has no second derivative (backward with "
                "create_graph=True); set LMFORGE_KERNELS=0 to use torch's attention");
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = call_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                      ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor()};
  }
};

at::Tensor causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return std::get<0>(attention_forward(q, k, v, scale));
}

at::Tensor causal_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return CausalAttention::apply(q, k, v, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_forward", &attention_forward);
  m.impl("causal_attention_backward", &attention_backward);
}

TORCH_LIBRARY_IMPL(lmforge, Autograd, m) { m.impl("causal_attention", &causal_attention_autograd); }
