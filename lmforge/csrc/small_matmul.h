// y = x @ w^T * scales + bias for a few rows of x, as a C++ template: the matrix products of
// decoding, used by the small_matmul operator and by the fused decoder block (decode.cpp).
//
// Decoding one token per sequence multiplies M = batch rows (a few) by every weight matrix, so
// each weight is read from memory once and used only M times: speed is set by memory bandwidth.
// MKL runs these shapes on one thread at about half the machine's read bandwidth; this kernel
// splits the weight rows over torch's threads and streams them with AVX2 fused multiply-adds.
//
// Weights are (N, K) row-major, fp32 or int8 (converted to fp32 in registers, so the product
// is exact fp32 arithmetic on the int8 values); scales (N,) multiply each output column.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#include "vec_math.h"

namespace lmforge_kernels {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const int8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// int8 weights: ask for the bytes 2 KB ahead. The conversions keep the core busy enough that the
// hardware prefetcher falls behind: the 49 products of GPT-2 small streamed 3–23% faster
// (medians of 7, six runs). fp32 weights stream faster without it (21 against 17 GB/s).
inline void prefetch_ahead(const int8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0); }

// x . w over K: four independent accumulators keep several multiply-adds in flight. One row
// at a time, so each thread reads its share of the weights as one sequential stream, which the
// hardware prefetcher follows best (interleaving four rows measured 9 GB/s for int8, this 20).
template <typename W>
inline float dot(const float* x, const W* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if constexpr (sizeof(W) == 1) prefetch_ahead(w + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(w + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
  float sum = lmforge_vec::horizontal_add(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}

// The product of output column n, with its scale and bias.
inline float finish(float sum, const float* scales, const float* bias, int64_t n) {
  return sum * (scales ? scales[n] : 1.0f) + (bias ? bias[n] : 0.0f);
}

// R rows of x (R <= 4) times weight rows n and n + 1, into out[r][0..1]: each weight vector is
// loaded (and converted) once for R rows, and each x vector once for two weight rows, so the
// loop does 2R multiply-adds per 2 + R loads instead of one per two. For 8 rows this is 1.25×
// (fp32) to 1.6× (int8) faster than a dot per row; for 32, 1.35–1.7× (49 products of GPT-2
// small, one quiet run).
template <typename W, int R>
inline void tile(const float* x, const W* w0, int64_t K, float out[R][2]) {
  const W* w1 = w0 + K;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a = load8(w0 + k), b = load8(w1 + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xv, a, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, b, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 2; ++c) {
      const W* row = c ? w1 : w0;
      float sum = lmforge_vec::horizontal_add(acc[r][c]);
      for (int64_t j = k; j < K; ++j) sum += x[r * K + j] * static_cast<float>(row[j]);
      out[r][c] = sum;
    }
  }
}

// Rows m0 .. m0 + R - 1 of y for the weight-row pair (n, n + 1).
template <typename W, int R>
inline void pair_of_columns(const float* x, const W* w, const float* scales, const float* bias, float* y, int64_t m0,
                            int64_t n, int64_t N, int64_t K) {
  float out[R][2];
  tile<W, R>(x + m0 * K, w + n * K, K, out);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 2; ++c) {
      y[(m0 + r) * N + n + c] = finish(out[r][c], scales, bias, n + c);
    }
  }
}

// From this many rows of x on, the tiles win (int8 at 2 rows: 10.6 against 7.4 ms for a dot per row).
template <typename W>
constexpr int64_t kTiledFromRows = sizeof(W) == 1 ? 4 : 2;

template <typename W>
void matmul_rows(const float* x, const W* w, const float* scales, const float* bias, float* y, int64_t M,
                 int64_t N, int64_t K) {
  if (M >= kTiledFromRows<W>) {
    at::parallel_for(0, (N + 1) / 2, 32, [&](int64_t first, int64_t last) {  // pairs of weight rows
      for (int64_t pair = first; pair < last; ++pair) {
        const int64_t n = 2 * pair;
        if (n + 1 == N) {  // an odd last row
          for (int64_t m = 0; m < M; ++m) y[m * N + n] = finish(dot(x + m * K, w + n * K, K), scales, bias, n);
          continue;
        }
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) pair_of_columns<W, 4>(x, w, scales, bias, y, m, n, N, K);
        for (; m + 2 <= M; m += 2) pair_of_columns<W, 2>(x, w, scales, bias, y, m, n, N, K);
        if (m < M) pair_of_columns<W, 1>(x, w, scales, bias, y, m, n, N, K);
      }
    });
    return;
  }
  at::parallel_for(0, N, 64, [&](int64_t first, int64_t last) {  // each thread: one contiguous range of rows
    for (int64_t n = first; n < last; ++n) {
      for (int64_t m = 0; m < M; ++m) {  // the row stays in L1 for the other rows of x
        y[m * N + n] = finish(dot(x + m * K, w + n * K, K), scales, bias, n);
      }
    }
  });
}

}  // namespace lmforge_kernels
