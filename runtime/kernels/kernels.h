// What the kernel sources share: SIMD math, the CPU check, and the entry points the bindings expose.
#pragma once

#include <torch/extension.h>

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastcpu {

inline bool cpu_supports_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

#if defined(__x86_64__) || defined(__i386__)
// exp(x) for x <= 0 (softmax after subtracting the row max; erf): 2^n * e^r with r = x - n ln 2 in
// [-ln2/2, ln2/2] (ln 2 split into two constants so r stays exact) and a degree-6 Taylor polynomial of e^r
// (relative error ~1e-7). Arguments below -87 give e^-87 (~1.6e-38), not 0: mask them where 0 matters.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(e, n);
}

// The same on 8 floats for CPUs without AVX-512: 2^n is built in the exponent bits instead of scalef (x >= -87
// gives n >= -126, so 2^n is a normal float).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(two_n));
}
#endif

// softmax(q k^T * scale, masked keys excluded) v per (batch, head); see attention.cpp.
at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_mask,
                           double scale, bool vectorized);

}  // namespace fastcpu
