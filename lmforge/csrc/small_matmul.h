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

// Ask for one cache line of the next weight rows every 64 bytes of the current ones.
template <typename W>
constexpr int64_t kLineElements = 64 / sizeof(W);

// R rows of x (R <= 4) times C consecutive weight rows (C <= 3) from w0, into out[r][c]: each
// weight vector is loaded (and converted) once for R rows, and each x vector once for C weight
// rows, so the loop does R·C multiply-adds per R + C loads (4 × 3: twelve accumulators, three
// weights and one x vector fill the sixteen registers). Meanwhile the columns p0 .. p1 - 1 of the
// C weight rows at `next` (null: none) are prefetched, so that reading later weights from memory
// overlaps this tile's arithmetic instead of following it.
template <typename W, int R, int C>
inline void tile(const float* x, const W* w0, int64_t K, float out[R][C], const W* next, int64_t p0, int64_t p1) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (next && k >= p0 && k < p1 && k % kLineElements<W> == 0) {
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(next + c * K + k), _MM_HINT_T0);
    }
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load8(w0 + c * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const W* row = w0 + c * K;
      float sum = lmforge_vec::horizontal_add(acc[r][c]);
      for (int64_t j = k; j < K; ++j) sum += x[r * K + j] * static_cast<float>(row[j]);
      out[r][c] = sum;
    }
  }
}

// Rows m0 .. m0 + R - 1 of y for the weight rows n .. n + C - 1.
template <typename W, int R, int C>
inline void tile_into(const float* x, const W* w, const float* scales, const float* bias, float* y, int64_t m0,
                      int64_t n, int64_t N, int64_t K, const W* next, int64_t p0, int64_t p1) {
  float out[R][C];
  tile<W, R, C>(x + m0 * K, w + n * K, K, out, next, p0, p1);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) y[(m0 + r) * N + n + c] = finish(out[r][c], scales, bias, n + c);
  }
}

// Every row of y for the weight rows n .. n + C - 1: tiles of four rows of x, then two, then
// one. Each tile prefetches its equal share of `next` (a later group's weights, or null): one
// prefetch every few loads keeps the loads of the arithmetic flowing, where the whole group at
// once in the last tile stalled it.
template <typename W, int C>
inline void weight_group(const float* x, const W* w, const float* scales, const float* bias, float* y, int64_t M,
                         int64_t n, int64_t N, int64_t K, const W* next) {
  const int64_t tiles = M / 4 + (M % 4) / 2 + M % 2;
  int64_t m = 0, t = 0;
  auto share = [&](int64_t i) { return K * i / tiles; };
  for (; m + 4 <= M; m += 4, ++t) tile_into<W, 4, C>(x, w, scales, bias, y, m, n, N, K, next, share(t), share(t + 1));
  for (; m + 2 <= M; m += 2, ++t) tile_into<W, 2, C>(x, w, scales, bias, y, m, n, N, K, next, share(t), share(t + 1));
  if (m < M) tile_into<W, 1, C>(x, w, scales, bias, y, m, n, N, K, next, share(t), share(t + 1));
}

// From 2 rows of x on, the tiles win; one row reads its weights fastest as plain dots (the 32
// products of an 8 × 512 model, minimum of 40, three A/B runs: fp32 5.9 against 6.5 ms for a
// 1-row tile, int8 1.8 against 1.9; at 2 rows int8 tiles take 1.9 against 2.5 ms for dots).
constexpr int64_t kTiledFromRows = 2;

// Weight rows per tile. Three against the earlier two, with the next group prefetched: the 33
// products of an 8 × 512 model and its 4096-token head at 16 rows took 10.8–11.4 against 17.9 ms
// (the minimum of 30, a standalone copy of the loop, three runs; docs/notes.md).
constexpr int64_t kGroup = 3;

// How many groups ahead the weights are prefetched: one group's arithmetic at 16 rows is too short
// to hide a read from memory. The 32 products of an 8 × 512 model at 16 rows, a standalone copy,
// medians of 300 interleaved passes: see docs/notes.md (twelfth session).
constexpr int64_t kPrefetchGroups = 2;

template <typename W>
void matmul_rows(const float* x, const W* w, const float* scales, const float* bias, float* y, int64_t M,
                 int64_t N, int64_t K) {
  if (M >= kTiledFromRows) {
    const int64_t groups = N / kGroup;
    at::parallel_for(0, groups, 16, [&](int64_t first, int64_t last) {  // each thread: one contiguous range
      for (int64_t g = first; g < last; ++g) {
        const W* next = g + kPrefetchGroups < last ? w + (g + kPrefetchGroups) * kGroup * K : nullptr;
        weight_group<W, kGroup>(x, w, scales, bias, y, M, g * kGroup, N, K, next);
      }
    });
    const int64_t n = groups * kGroup;  // the last one or two weight rows
    if (N - n == 2) weight_group<W, 2>(x, w, scales, bias, y, M, n, N, K, nullptr);
    if (N - n == 1) weight_group<W, 1>(x, w, scales, bias, y, M, n, N, K, nullptr);
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
