// One decoder block for one new token per sequence, in a single call: the work of a decoding
// step between two states of the residual stream.
//
// Decoding a token runs ~30 small operations per block on a handful of rows. Each does a few
// microseconds of arithmetic but costs ~15 µs of Python and dispatch: eager decoding of a
// 12-layer model 96 wide, whose products cost nothing, took 6–9 ms a token, and GPT-2 small
// spent as much outside its matrix products as its int8 products took. Here the block is plain
// loops around the products of small_matmul.h:
//
//   h = norm1(x); q, k, v = h Wqkv (+ rotary on q, k); cache[length] = k, v
//   x = x + attention(q, cache[0..length]) Wproj
//   [encoder-decoder: x = x + attention(norm_c(x) Wq, encoder keys and values) Wproj_c]
//   x = x + act(norm2(x) Wup) Wdown
//
// That is pre-norm; post-norm (BART, Marian, the original Transformer) normalises after each
// residual sum instead: x = norm(x + sublayer(x)). The encoder's keys and values are computed
// once per source by the module path (the first step) and read here; the beams of a source
// share them (rows b·S/B .. of S sources). Parameters come as one list (model/fused_decode.py
// fixes the order); missing biases, scales and norm shifts are None. Attention runs one (row,
// head) pair per task; the rest is serial, as it touches only a few thousand floats.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "small_matmul.h"

namespace {

using lmforge_kernels::dot;
using lmforge_kernels::matmul_rows;
using Params = c10::List<std::optional<at::Tensor>>;

enum Norm { kLayerNorm = 0, kRMSNorm = 1 };
enum Activation { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSwiglu = 3 };
// Positions of the parameters in the list.
enum Slot { kNorm1W, kNorm1B, kQkvW, kQkvS, kQkvB, kProjW, kProjS, kProjB, kNorm2W, kNorm2B, kUpW, kUpS, kUpB,
            kDownW, kDownS, kDownB, kSlots,
            // a block with cross-attention: 8 more
            kCrossNormW = kSlots, kCrossNormB, kCrossQW, kCrossQS, kCrossQB, kCrossProjW, kCrossProjS, kCrossProjB,
            kCrossSlots };

const float* optional_data(const Params& p, Slot slot) {
  const std::optional<at::Tensor> t = p.get(slot);
  return t ? t->data_ptr<float>() : nullptr;
}

// y (M, N) = x (M, K) W^T * scales + bias, W at `slot` followed by its scales and bias.
int64_t product(const Params& p, Slot slot, const float* x, float* y, int64_t M) {
  const at::Tensor w = *p.get(slot);
  const float *scales = optional_data(p, Slot(slot + 1)), *bias = optional_data(p, Slot(slot + 2));
  if (w.scalar_type() == at::kChar) {
    matmul_rows(x, w.data_ptr<int8_t>(), scales, bias, y, M, w.size(0), w.size(1));
  } else {
    matmul_rows(x, w.data_ptr<float>(), scales, bias, y, M, w.size(0), w.size(1));
  }
  return w.size(0);
}

void normalize(const float* x, float* y, const float* weight, const float* shift, int64_t M, int64_t C, Norm kind,
               double eps) {
  for (int64_t m = 0; m < M; ++m, x += C, y += C) {
    double mean = 0.0, square = 0.0;
    if (kind == kLayerNorm) {
      for (int64_t c = 0; c < C; ++c) mean += x[c];
      mean /= C;
    }
    for (int64_t c = 0; c < C; ++c) square += (x[c] - mean) * (x[c] - mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(square / C + eps)), centre = static_cast<float>(mean);
    for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - centre) * inv * weight[c] + (shift ? shift[c] : 0.0f);
  }
}

// "Rotate half" RoPE of one head in place: pairs (i, i + d/2); sin's first half is negated.
void rotate(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// scores[t] = exp(scores[t] - top), exactly 0 where the mask is false; returns their sum.
float exponentiate(float* scores, int64_t T, float top, const bool* allowed) {
  const __m256 shift = _mm256_set1_ps(top);
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    _mm256_storeu_ps(scores + t, lmforge_vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift)));
  }
  for (; t < T; ++t) scores[t] = std::exp(scores[t] - top);
  float total = 0.0f;
  for (t = 0; t < T; ++t) {
    if (allowed && !allowed[t]) scores[t] = 0.0f;  // exp8 clamps -inf to e^-87, not 0
    total += scores[t];
  }
  return total;
}

// One row and head: softmax(q kᵀ · scale) v over T keys (`scores` has room for T), for head
// widths of NV × 8: the output's NV vectors stay in registers while the weighted values are
// summed, and the softmax's division is left to the end.
template <int NV>
void attend_head(const float* qh, const float* k, const float* v, const bool* allowed, float* out, int64_t T,
                 float scale, float* scores) {
  constexpr int64_t d = NV * 8;
  __m256 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * i), _mm256_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    if (allowed && !allowed[t]) {
      scores[t] = -INFINITY;
      continue;
    }
    __m256 a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k + t * d));
    for (int i = 1; i < NV; ++i) a = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k + t * d + 8 * i), a);
    scores[t] = lmforge_vec::horizontal_add(a);
    top = std::max(top, scores[t]);
  }
  const float total = exponentiate(scores, T, top, allowed);
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    if (scores[t] == 0.0f) continue;
    const __m256 p = _mm256_set1_ps(scores[t]);
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + t * d + 8 * i), acc[i]);
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inverse));
}

// Any other head width.
void attend_head_any(const float* qh, const float* k, const float* v, const bool* allowed, float* out, int64_t T,
                     int64_t d, float scale, float* scores) {
  float top = -INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    scores[t] = (allowed && !allowed[t]) ? -INFINITY : dot(qh, k + t * d, d) * scale;
    top = std::max(top, scores[t]);
  }
  const float total = exponentiate(scores, T, top, allowed);
  std::fill(out, out + d, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float p = scores[t] / total;
    if (p == 0.0f) continue;
    for (int64_t i = 0; i < d; ++i) out[i] += p * v[t * d + i];
  }
}

// y (B, H·d) = softmax(q kᵀ · scale) v for each row and head, over keys 0..T-1 of the cache
// (S, G, capacity, d), skipping keys whose mask (S, T) is false. Row b reads source b / (B / S):
// S = B for a row's own cache, fewer when beams share their source's encoder keys.
void attend(const float* q, const float* keys, const float* values, const bool* mask, float* y, int64_t B, int64_t S,
            int64_t H, int64_t G, int64_t capacity, int64_t T, int64_t d, float scale) {
  const int64_t beams = B / S;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, g = h / (H / G), source = b / beams;
      const float* qh = q + task * d;
      const float* k = keys + (source * G + g) * capacity * d;
      const float* v = values + (source * G + g) * capacity * d;
      const bool* allowed = mask ? mask + source * T : nullptr;
      float* out = y + task * d;
      switch (d) {
        case 32: attend_head<4>(qh, k, v, allowed, out, T, scale, scores.data()); break;
        case 64: attend_head<8>(qh, k, v, allowed, out, T, scale, scores.data()); break;
        case 128: attend_head<16>(qh, k, v, allowed, out, T, scale, scores.data()); break;
        default: attend_head_any(qh, k, v, allowed, out, T, d, scale, scores.data());
      }
    }
  });
}

// In place on u (M, width); SwiGLU reads u as (M, 2·width) [gate | value] and writes (M, width).
void activate(float* u, int64_t M, int64_t width, Activation kind) {
  if (kind == kSwiglu) {
    for (int64_t m = 0; m < M; ++m) {
      const float *gate = u + m * 2 * width, *value = gate + width;
      float* out = u + m * width;  // behind the reads: row m's output ends where its gate began
      for (int64_t i = 0; i < width; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * value[i];
    }
    return;
  }
  const int64_t n = M * width;
  if (kind == kRelu) {
    for (int64_t i = 0; i < n; ++i) u[i] = std::max(u[i], 0.0f);
  } else if (kind == kGeluTanh) {
    for (int64_t i = 0; i < n; ++i) {
      const float x = u[i];
      u[i] = 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    }
  } else {
    lmforge_vec::gelu_range(u, u, nullptr, n);
  }
}

// The encoder-decoder part of a block: its encoder keys and values (S, G, Ts, d), each source's
// key mask (S, Ts) or none, and the attention scale.
struct Cross {
  at::Tensor keys, values, mask;
  float scale;
};

Cross check_cross(const Params& params, const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& values,
                  const std::optional<at::Tensor>& key_mask, int64_t B, int64_t C, int64_t H, int64_t G, int64_t d,
                  at::ArrayRef<double> numbers) {
  TORCH_CHECK(keys && values && numbers.size() == 3,
              "decode_block: a block with cross-attention needs the encoder's keys, values and their scale");
  TORCH_CHECK(keys->dim() == 4 && keys->scalar_type() == at::kFloat && keys->is_contiguous() &&
                  values->sizes() == keys->sizes() && values->scalar_type() == at::kFloat && values->is_contiguous(),
              "decode_block: the encoder's keys and values must be contiguous float32 (S, kv heads, T, head dim)");
  const int64_t S = keys->size(0), Ts = keys->size(2);
  TORCH_CHECK(S > 0 && B % S == 0 && keys->size(1) == G && keys->size(3) == d,
              "decode_block: the encoder's keys do not match the block, or the rows are not S sources' beams");
  const at::Tensor mask = key_mask ? key_mask->to(at::kBool).contiguous() : at::Tensor();
  TORCH_CHECK(!key_mask || (mask.dim() == 2 && mask.size(0) == S && mask.size(1) == Ts),
              "decode_block: cross_mask must be (S, encoder length)");
  for (Slot slot : {kCrossQW, kCrossProjW}) {
    TORCH_CHECK(params.get(slot).has_value() && params.get(slot)->dim() == 2 && params.get(slot)->is_contiguous(),
                "decode_block: a cross-attention weight is missing");
  }
  TORCH_CHECK(params.get(kCrossQW)->size(0) == H * d && params.get(kCrossQW)->size(1) == C &&
                  params.get(kCrossProjW)->size(0) == C && params.get(kCrossProjW)->size(1) == H * d,
              "decode_block: cross-attention weight shapes do not match the block");
  return {*keys, *values, mask, static_cast<float>(numbers[2])};
}

// x (B, C): the block's input, one token per row. keys/values (B, G, capacity, d): the layer's
// cache, `length` positions filled; this token's key and value go to position `length`.
// key_mask (B, length + 1) bool, or None; cos/sin (B, d) rotary tables of each row's position, or
// None. dims = [heads, kv heads, head dim, norm kind, activation(, post-norm)]; numbers = [norm
// eps, scale(, cross-attention scale)]. With cross-attention, params has kCrossSlots entries and
// cross_keys/cross_values/cross_mask are Cross's.
at::Tensor decode_block(const at::Tensor& input, const Params& params, const at::Tensor& keys, const at::Tensor& values,
                        int64_t length, const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, at::IntArrayRef dims, at::ArrayRef<double> numbers,
                        const std::optional<at::Tensor>& cross_keys, const std::optional<at::Tensor>& cross_values,
                        const std::optional<at::Tensor>& cross_mask) {
  const bool has_cross = params.size() == kCrossSlots;
  TORCH_CHECK((params.size() == kSlots || has_cross) && (dims.size() == 5 || dims.size() == 6) &&
                  numbers.size() == (has_cross ? 3u : 2u),
              "decode_block: wrong argument count");
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat, "decode_block: x must be (B, C) float32");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == at::kFloat,
              "decode_block: the cache must be contiguous float32");
  const int64_t H = dims[0], G = dims[1], d = dims[2], B = input.size(0), C = input.size(1);
  const int64_t capacity = keys.size(2), T = length + 1;
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == B && keys.size(1) == G && keys.size(3) == d && length >= 0 &&
                  T <= capacity && H % G == 0,
              "decode_block: cache shape does not match");
  TORCH_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat,
              "decode_block: keys and values must have the same shape");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_block: give both rotary tables or neither");
  for (const auto& table : {cos, sin}) {
    TORCH_CHECK(!table || (table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                           table->size(0) == B && table->size(1) == d),
                "decode_block: rotary tables must be contiguous float32 (B, head_dim)");
  }
  TORCH_CHECK(dims[3] == kLayerNorm || dims[3] == kRMSNorm, "decode_block: unknown norm code");
  TORCH_CHECK(dims[4] >= kGelu && dims[4] <= kSwiglu, "decode_block: unknown activation code");
  const Norm norm = Norm(dims[3]);
  const Activation act = Activation(dims[4]);
  const bool post_norm = dims.size() == 6 && dims[5] != 0;
  const double eps = numbers[0];
  const float scale = static_cast<float>(numbers[1]);

  for (Slot slot : {kQkvW, kProjW, kUpW, kDownW}) {
    TORCH_CHECK(params.get(slot).has_value() && params.get(slot)->dim() == 2, "decode_block: a weight is missing");
  }
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty({B, C}, x.options());
  const int64_t qkv_width = (H + 2 * G) * d, up_width = (*params.get(kUpW)).size(0);
  const int64_t ffn_width = act == kSwiglu ? up_width / 2 : up_width;
  auto shaped = [&](Slot slot, int64_t rows, int64_t cols) {
    const at::Tensor w = *params.get(slot);
    return w.size(0) == rows && w.size(1) == cols && w.is_contiguous();
  };
  TORCH_CHECK(shaped(kQkvW, qkv_width, C) && shaped(kProjW, C, H * d) && shaped(kUpW, up_width, C) &&
                  shaped(kDownW, C, ffn_width),
              "decode_block: weight shapes do not match the block");
  auto vector_fits = [&](Slot slot, int64_t n, bool required) {
    const std::optional<at::Tensor> t = params.get(slot);
    if (!t) return !required;
    return t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n;
  };
  TORCH_CHECK(vector_fits(kNorm1W, C, true) && vector_fits(kNorm2W, C, true) && vector_fits(kNorm1B, C, false) &&
                  vector_fits(kNorm2B, C, false) && vector_fits(kQkvS, qkv_width, false) &&
                  vector_fits(kQkvB, qkv_width, false) && vector_fits(kProjS, C, false) &&
                  vector_fits(kProjB, C, false) && vector_fits(kUpS, up_width, false) &&
                  vector_fits(kUpB, up_width, false) && vector_fits(kDownS, C, false) && vector_fits(kDownB, C, false),
              "decode_block: norm weights, biases and scales must be contiguous float32 vectors of the block's widths");
  std::optional<Cross> cross;
  if (has_cross) {
    TORCH_CHECK(vector_fits(kCrossNormW, C, true) && vector_fits(kCrossNormB, C, false) &&
                    vector_fits(kCrossQS, H * d, false) && vector_fits(kCrossQB, H * d, false) &&
                    vector_fits(kCrossProjS, C, false) && vector_fits(kCrossProjB, C, false),
                "decode_block: norm weights, biases and scales must be contiguous float32 vectors of the block's widths");
    cross = check_cross(params, cross_keys, cross_values, cross_mask, B, C, H, G, d, numbers);
  } else {
    TORCH_CHECK(!cross_keys && !cross_values && !cross_mask, "decode_block: encoder keys given to a block without "
                "cross-attention");
  }
  const at::Tensor mask = key_mask ? key_mask->to(at::kBool).contiguous() : at::Tensor();
  TORCH_CHECK(!key_mask || (mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T),
              "decode_block: key_mask must be (B, length + 1)");
  std::vector<float> h(B * C), qkv(B * qkv_width), q(B * H * d), y(B * H * d), u(B * up_width), delta(B * C);

  // A sublayer reads norm(x) (pre-norm) or x itself (post-norm); its output joins the residual
  // stream, which post-norm then normalises.
  float* result = out.data_ptr<float>();
  std::copy(x.data_ptr<float>(), x.data_ptr<float>() + B * C, result);
  auto sublayer_input = [&](Slot norm_weight) -> const float* {
    if (post_norm) return result;
    normalize(result, h.data(), optional_data(params, norm_weight), optional_data(params, Slot(norm_weight + 1)), B,
              C, norm, eps);
    return h.data();
  };
  auto add_residual = [&](Slot norm_weight) {
    for (int64_t i = 0; i < B * C; ++i) result[i] += delta[i];
    if (post_norm) {
      normalize(result, result, optional_data(params, norm_weight), optional_data(params, Slot(norm_weight + 1)), B,
                C, norm, eps);  // row by row, each read whole before it is written
    }
  };

  product(params, kQkvW, sublayer_input(kNorm1W), qkv.data(), B);
  float *key_data = keys.data_ptr<float>(), *value_data = values.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv.data() + b * qkv_width;
    if (cos) {  // queries and keys, head by head
      for (int64_t head = 0; head < H + G; ++head) {
        rotate(row + head * d, cos->data_ptr<float>() + b * d, sin->data_ptr<float>() + b * d, d);
      }
    }
    std::copy(row, row + H * d, q.data() + b * H * d);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t at = ((b * G + g) * capacity + length) * d;
      std::copy(row + (H + g) * d, row + (H + g + 1) * d, key_data + at);
      std::copy(row + (H + G + g) * d, row + (H + G + g + 1) * d, value_data + at);
    }
  }
  attend(q.data(), key_data, value_data, key_mask ? mask.data_ptr<bool>() : nullptr, y.data(), B, B, H, G, capacity, T,
         d, scale);
  product(params, kProjW, y.data(), delta.data(), B);
  add_residual(kNorm1W);

  if (cross) {
    product(params, kCrossQW, sublayer_input(kCrossNormW), q.data(), B);
    const int64_t S = cross->keys.size(0), Ts = cross->keys.size(2);
    attend(q.data(), cross->keys.data_ptr<float>(), cross->values.data_ptr<float>(),
           cross->mask.defined() ? cross->mask.data_ptr<bool>() : nullptr, y.data(), B, S, H, G, Ts, Ts, d,
           cross->scale);
    product(params, kCrossProjW, y.data(), delta.data(), B);
    add_residual(kCrossNormW);
  }

  product(params, kUpW, sublayer_input(kNorm2W), u.data(), B);
  activate(u.data(), B, ffn_width, act);
  product(params, kDownW, u.data(), delta.data(), B);
  add_residual(kNorm2W);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("decode_block(Tensor x, Tensor?[] params, Tensor(a!) keys, Tensor(b!) values, SymInt length, Tensor? key_mask, "
        "Tensor? cos, Tensor? sin, int[] dims, float[] numbers, Tensor? cross_keys=None, Tensor? cross_values=None, "
        "Tensor? cross_mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("decode_block", &decode_block); }
