// AVX2 exp, erf and exact GELU for the kernels, eight floats at a time.
//
// exp: Cephes' method (2^n times a degree-6 polynomial on [-ln2/2, ln2/2]), ~1 ulp.
// erf: Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), the formula ATen's own vectorised
// erf uses, so the fused GELU matches torch's to float rounding.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace lmforge_vec {

inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// Standard normal CDF Φ(x) and density φ(x) together: both need exp(-x²/2).
inline void normal_cdf_pdf8(__m256 x, __m256* cdf, __m256* pdf) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));  // erf's argument x/√2
  const __m256 az = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az,
                                                                      _mm256_set1_ps(1.0f)));
  __m256 r = _mm256_set1_ps(1.061405429f);
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));  // exp(-x²/2)
  __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, _mm256_set1_ps(1.0f));
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, z));
  *cdf = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
  *pdf = _mm256_mul_ps(e, _mm256_set1_ps(0.39894228040143268f));  // 1/√(2π)
}

// Loads and stores of the first n (< 8) floats, for the tails of rows.
inline __m256i tail_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline float horizontal_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Exact GELU x·Φ(x) over n floats (y may be x); with `slope`, GELU'(x) = Φ(x) + x·φ(x) too.
inline void gelu_range(const float* x, float* y, float* slope, int64_t n) {
  auto one = [&](int64_t i, __m256i mask, bool full) {
    const __m256 v = full ? _mm256_loadu_ps(x + i) : _mm256_maskload_ps(x + i, mask);
    __m256 cdf, pdf;
    normal_cdf_pdf8(v, &cdf, &pdf);
    const __m256 out = _mm256_mul_ps(v, cdf);
    full ? _mm256_storeu_ps(y + i, out) : _mm256_maskstore_ps(y + i, mask, out);
    if (slope != nullptr) {
      const __m256 d = _mm256_fmadd_ps(v, pdf, cdf);
      full ? _mm256_storeu_ps(slope + i, d) : _mm256_maskstore_ps(slope + i, mask, d);
    }
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) one(i, __m256i{}, true);
  if (i < n) one(i, tail_mask(n - i), false);
}

}  // namespace lmforge_vec
