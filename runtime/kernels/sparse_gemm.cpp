// Block-sparse (4x1) int8 GEMM for CPU: Y[n, out] = X[n, in] (uint8) . W[out, in]^T (int8), int32 accumulators.
//
// Packed weight format (built by pack_4x1 in Python, tensors only):
//   row_ptr  int32 [R + 1]      R = out / 4 block-rows; groups of block-row r are row_ptr[r] .. row_ptr[r+1]
//   col_idx  int32 [G, 4]       the 4 input columns k1..k4 of each group (padding slots repeat a real column)
//   values   int8  [G, 4, 4]    values[g][i][b] = W[4r + i, col_idx[g][b]] (0 for padding slots)
//
// Each group is one VNNI step: its 4x4 tile row i is a 32-bit word (w[k1..k4]) that vpdpbusd multiplies with a
// lane holding the 4 activations x[n][k1..k4] of one token. The activations are therefore transposed per tile of
// 64 tokens (XT[k][token]) so that 4 rows k1..k4 can be byte-interleaved with two unpack stages.
//
// Three code paths, chosen at run time (one binary, per-function target attributes):
//   avx512_vnni : 64 tokens x 4 rows per register tile, vpdpbusd (u8 x s8, exact in int32)
//   avx2 (+fma) : vpmovzxbw + vpmaddwd (int16 products summed in int32, never saturates; unlike vpmaddubsw)
//   scalar      : portable reference loops
//
// The fused epilogue turns the accumulators into the Linear's float32 output; for an FFN's first Linear it can go
// on to GELU and requantize to the uint8 the next sparse Linear reads, so that [n, ffn] never exists in float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define FASTCPU_X86 1
#include <immintrin.h>
#endif

#include "kernels.h"

namespace {

using fastcpu::cpu_supports_avx512;
#ifdef FASTCPU_X86
using fastcpu::exp_nonpositive;
#endif

constexpr int64_t kTile = 64;  // tokens per activation tile (one 64-byte cache line per XT row)

enum class Path { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// What sparse_linear adds after the integer GEMM: y = (acc - zp * rowsum[o]) * (x_scale * w_scale[o]) + bias[o].
struct Epilogue {
  bool fused = false;           // false: write raw int32 accumulators
  int32_t zero_point = 0;
  const int32_t* row_sums = nullptr;   // [out]
  const float* scale = nullptr;        // [out], x_scale * weight_scale (precomputed)
  const float* bias = nullptr;         // [out] (zeros when the Linear has no bias)
  // GELU, then uint8 = clamp(round(gelu * out_inv_scale) + out_zero_point): y is uint8 [n, out]
  bool gelu_u8 = false;
  float out_inv_scale = 1.0f;
  float out_zero_point = 0.0f;
};

struct Problem {
  const uint8_t* x;       // [n, in] row-major
  int64_t n, in, out;
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const int8_t* values;
  void* y;                // [n, out] int32, float32 or uint8
  Epilogue ep;
};

// GELU (erf form, as nn.GELU()) and the requantization, one element: the reference for the vector code.
inline uint8_t gelu_quantize(const Epilogue& ep, float v) {
  const float g = 0.5f * v * (1.0f + std::erf(v * float(M_SQRT1_2)));
  const float q = std::nearbyint(g * ep.out_inv_scale) + ep.out_zero_point;
  return uint8_t(std::min(255.0f, std::max(0.0f, q)));
}

// The value stored for output o: the raw accumulator, or the fused epilogue's float32 (as its bit pattern, so
// both outputs go through the same int32 buffers).
inline int32_t finish(const Problem& p, int64_t o, int32_t acc) {
  if (!p.ep.fused) return acc;
  const float v = float(acc - p.ep.zero_point * p.ep.row_sums[o]) * p.ep.scale[o] + p.ep.bias[o];
  int32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

// ---------------------------------------------------------------------------------------------------------
// Scalar path: works on the row-major activations directly, parallel over tokens.
void gemm_scalar(const Problem& p) {
  const int64_t R = p.out / 4;
  at::parallel_for(0, p.n, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t t = n0; t < n1; ++t) {
      const uint8_t* xr = p.x + t * p.in;
      for (int64_t r = 0; r < R; ++r) {
        int32_t acc[4] = {0, 0, 0, 0};
        for (int32_t g = p.row_ptr[r]; g < p.row_ptr[r + 1]; ++g) {
          const int32_t* kk = p.col_idx + 4 * int64_t(g);
          const int8_t* w = p.values + 16 * int64_t(g);
          for (int b = 0; b < 4; ++b) {
            const int32_t xv = xr[kk[b]];
            for (int i = 0; i < 4; ++i) acc[i] += xv * int32_t(w[4 * i + b]);
          }
        }
        for (int i = 0; i < 4; ++i) {
          const int64_t o = 4 * r + i;
          const int32_t bits = finish(p, o, acc[i]);
          if (p.ep.gelu_u8) {
            float v;
            std::memcpy(&v, &bits, 4);
            static_cast<uint8_t*>(p.y)[t * p.out + o] = gelu_quantize(p.ep, v);
          } else {
            static_cast<int32_t*>(p.y)[t * p.out + o] = bits;
          }
        }
      }
    }
  });
}

#ifdef FASTCPU_X86
// ---------------------------------------------------------------------------------------------------------
// Activation transpose: tile j of XT holds XT[k][t] = x[64 j + t][k] (zero for tokens past n), 64 bytes per k.

// 16 tokens x 32 columns at once: the two 128-bit lanes of each ymm are two 16x16 byte blocks, transposed by the
// classic 4-stage unpack network; output d[c] lane h is column k0 + 16 h + c.
__attribute__((target("avx2"))) void transpose_16x32(const uint8_t* src, int64_t ld, uint8_t* dst) {
  __m256i r[16], a[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ld));
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm256_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int m = 0; m < 4; ++m) {
    r[4 * m + 0] = _mm256_unpacklo_epi16(a[4 * m], a[4 * m + 2]);
    r[4 * m + 1] = _mm256_unpackhi_epi16(a[4 * m], a[4 * m + 2]);
    r[4 * m + 2] = _mm256_unpacklo_epi16(a[4 * m + 1], a[4 * m + 3]);
    r[4 * m + 3] = _mm256_unpackhi_epi16(a[4 * m + 1], a[4 * m + 3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 4; ++j) {
      a[8 * h + 2 * j] = _mm256_unpacklo_epi32(r[8 * h + j], r[8 * h + 4 + j]);
      a[8 * h + 2 * j + 1] = _mm256_unpackhi_epi32(r[8 * h + j], r[8 * h + 4 + j]);
    }
  }
  for (int q = 0; q < 8; ++q) {
    r[2 * q] = _mm256_unpacklo_epi64(a[q], a[8 + q]);
    r[2 * q + 1] = _mm256_unpackhi_epi64(a[q], a[8 + q]);
  }
  for (int c = 0; c < 16; ++c) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * kTile), _mm256_castsi256_si128(r[c]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (16 + c) * kTile), _mm256_extracti128_si256(r[c], 1));
  }
}

// Transpose tokens [t0, t0 + 64) of x into xt (in x 64 bytes). Full 16-token x 32-column blocks are vectorized,
// the ragged edges (last columns, last tokens) go through a scalar loop.
__attribute__((target("avx2"))) void transpose_tile(const Problem& p, int64_t t0, uint8_t* xt) {
  const int64_t valid = std::min<int64_t>(kTile, p.n - t0);
  const int64_t full_sub = valid / 16;      // complete 16-token sub-blocks
  const int64_t k_vec = p.in / 32 * 32;     // columns covered by the vector blocks
  for (int64_t s = 0; s < full_sub; ++s) {
    for (int64_t k = 0; k < k_vec; k += 32) {
      transpose_16x32(p.x + (t0 + 16 * s) * p.in + k, p.in, xt + k * kTile + 16 * s);
    }
    for (int64_t k = k_vec; k < p.in; ++k) {
      for (int64_t t = 16 * s; t < 16 * s + 16; ++t) xt[k * kTile + t] = p.x[(t0 + t) * p.in + k];
    }
  }
  for (int64_t k = 0; k < p.in; ++k) {
    uint8_t* row = xt + k * kTile;
    for (int64_t t = 16 * full_sub; t < kTile; ++t) row[t] = t < valid ? p.x[(t0 + t) * p.in + k] : 0;
  }
}

// Block-rows per output chunk: a work item fills a 64-token x 64-output int32 buffer (16 KiB, L1-resident) and
// then copies it out row by row. Writing 16-byte pieces straight into Y[n, out] instead strides by 4 * out bytes,
// a multiple of 4 KiB for out = 1024, 3072, ..., so all 64 tokens of a tile fight over one L1 set (5x slower).
constexpr int64_t kChunkRows = 16;
constexpr int64_t kBufLd = 4 * kChunkRows;  // int32 elements per buffer row (one row per token)

// ---------------------------------------------------------------------------------------------------------
// AVX-512 VNNI path.


// Store a 4-row x 16-token accumulator quad (a[i] = output row 4r+i; lane 4L+j = token 16L + 4q + j of the tile,
// see the interleave in block_vnni) into buf at column 4 * rb. A 4x4 transpose per 128-bit lane gives u[j] lane
// L = the 4 outputs of one token, so each token's 4 outputs are one 16-byte store.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void store_quad_vnni(
    const Problem& p, int64_t r, int64_t rb, int64_t q, const __m512i a[4], int32_t* buf) {
  const __m512i e0 = _mm512_unpacklo_epi32(a[0], a[1]), e1 = _mm512_unpackhi_epi32(a[0], a[1]);
  const __m512i e2 = _mm512_unpacklo_epi32(a[2], a[3]), e3 = _mm512_unpackhi_epi32(a[2], a[3]);
  __m512i u[4] = {_mm512_unpacklo_epi64(e0, e2), _mm512_unpackhi_epi64(e0, e2), _mm512_unpacklo_epi64(e1, e3),
                  _mm512_unpackhi_epi64(e1, e3)};
  if (p.ep.fused) {
    const int64_t o = 4 * r;
    const __m512i zs = _mm512_mullo_epi32(
        _mm512_set1_epi32(p.ep.zero_point),
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.ep.row_sums + o))));
    const __m512 sc = _mm512_broadcast_f32x4(_mm_loadu_ps(p.ep.scale + o));
    const __m512 bi = _mm512_broadcast_f32x4(_mm_loadu_ps(p.ep.bias + o));
    for (int j = 0; j < 4; ++j) {
      u[j] = _mm512_castps_si512(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(u[j], zs)), sc, bi));
    }
  }
  // fused output is float32, raw output int32: both 4 bytes per element, so the stores are the same.
  int32_t* col = buf + 4 * rb;
  for (int j = 0; j < 4; ++j) {
    const int64_t t = 4 * q + j;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + t * kBufLd), _mm512_castsi512_si128(u[j]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + (t + 16) * kBufLd), _mm512_extracti32x4_epi32(u[j], 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + (t + 32) * kBufLd), _mm512_extracti32x4_epi32(u[j], 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + (t + 48) * kBufLd), _mm512_extracti32x4_epi32(u[j], 3));
  }
}

// One block-row r over one 64-token tile. Per group: load XT rows k1..k4 (64 tokens each), byte-interleave them
// into v[q] (lane = token, 4 bytes = x[k1..k4]), then one vpdpbusd per output row with that row's 4 weights.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void block_vnni(const Problem& p, const uint8_t* xt,
                                                                        int64_t r, int64_t rb, int32_t* buf) {
  // 16 named accumulators (a<row><quad>) rather than an array: GCC 12 keeps an __m512i[4][4] partly in memory and
  // shuffles copies around inside the loop, which halved the throughput.
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
          a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  const int32_t g0 = p.row_ptr[r], g1 = p.row_ptr[r + 1];
  const int32_t* kk = p.col_idx + 4 * int64_t(g0);
  const int32_t* w = reinterpret_cast<const int32_t*>(p.values) + 4 * int64_t(g0);
  for (int32_t g = g0; g < g1; ++g, kk += 4, w += 4) {
    const __m512i r0 = _mm512_loadu_si512(xt + int64_t(kk[0]) * kTile);
    const __m512i r1 = _mm512_loadu_si512(xt + int64_t(kk[1]) * kTile);
    const __m512i r2 = _mm512_loadu_si512(xt + int64_t(kk[2]) * kTile);
    const __m512i r3 = _mm512_loadu_si512(xt + int64_t(kk[3]) * kTile);
    const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
    const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
    const __m512i v0 = _mm512_unpacklo_epi16(t0, t2), v1 = _mm512_unpackhi_epi16(t0, t2);
    const __m512i v2 = _mm512_unpacklo_epi16(t1, t3), v3 = _mm512_unpackhi_epi16(t1, t3);
#define FASTCPU_ROW(i)                                \
  {                                                   \
    const __m512i wi = _mm512_set1_epi32(w[i]);       \
    a##i##0 = _mm512_dpbusd_epi32(a##i##0, v0, wi);   \
    a##i##1 = _mm512_dpbusd_epi32(a##i##1, v1, wi);   \
    a##i##2 = _mm512_dpbusd_epi32(a##i##2, v2, wi);   \
    a##i##3 = _mm512_dpbusd_epi32(a##i##3, v3, wi);   \
  }
    FASTCPU_ROW(0) FASTCPU_ROW(1) FASTCPU_ROW(2) FASTCPU_ROW(3)
#undef FASTCPU_ROW
  }
  const __m512i q0[4] = {a00, a10, a20, a30}, q1[4] = {a01, a11, a21, a31};
  const __m512i q2[4] = {a02, a12, a22, a32}, q3[4] = {a03, a13, a23, a33};
  store_quad_vnni(p, r, rb, 0, q0, buf);
  store_quad_vnni(p, r, rb, 1, q1, buf);
  store_quad_vnni(p, r, rb, 2, q2, buf);
  store_quad_vnni(p, r, rb, 3, q3, buf);
}

// ---------------------------------------------------------------------------------------------------------
// AVX2 path.

// Store 4 output rows x 8 tokens (a[i] = row 4r+i; element e = token t0 + 8 (e / 4) + e % 4, see block_avx2) into
// buf at column 4 rb: the fused epilogue per row, with that row's constants broadcast, then a 4x4 transpose per
// 128-bit lane, so each token's 4 outputs are one 16-byte store.
__attribute__((target("avx2,fma"))) inline void store_half_avx2(const Problem& p, int64_t r, int64_t rb, int64_t t0,
                                                                 __m256i a[4], int32_t* buf) {
  if (p.ep.fused) {
    for (int i = 0; i < 4; ++i) {
      const int64_t o = 4 * r + i;
      const __m256i centred = _mm256_sub_epi32(a[i], _mm256_set1_epi32(p.ep.zero_point * p.ep.row_sums[o]));
      a[i] = _mm256_castps_si256(
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_set1_ps(p.ep.scale[o]), _mm256_set1_ps(p.ep.bias[o])));
    }
  }
  const __m256i e0 = _mm256_unpacklo_epi32(a[0], a[1]), e1 = _mm256_unpackhi_epi32(a[0], a[1]);
  const __m256i e2 = _mm256_unpacklo_epi32(a[2], a[3]), e3 = _mm256_unpackhi_epi32(a[2], a[3]);
  const __m256i u[4] = {_mm256_unpacklo_epi64(e0, e2), _mm256_unpackhi_epi64(e0, e2), _mm256_unpacklo_epi64(e1, e3),
                        _mm256_unpackhi_epi64(e1, e3)};
  int32_t* col = buf + 4 * rb;
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + (t0 + j) * kBufLd), _mm256_castsi256_si128(u[j]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(col + (t0 + 8 + j) * kBufLd), _mm256_extracti128_si256(u[j], 1));
  }
}

// 16 tokens per step. Activations are widened to int16 and pairs (k1,k2), (k3,k4) interleaved; vpmaddwd
// multiplies them with the matching int16 weight pairs and adds the two products into int32 (255 * 128 * 2 fits
// easily), so nothing saturates, unlike vpmaddubsw.
__attribute__((target("avx2,fma"))) void block_avx2(const Problem& p, const uint8_t* xt, int64_t r, int64_t rb,
                                                int32_t* buf) {
  const int32_t g0 = p.row_ptr[r], g1 = p.row_ptr[r + 1];
  for (int64_t s = 0; s < kTile; s += 16) {
    __m256i acc[4][2];
    for (auto& row : acc) row[0] = row[1] = _mm256_setzero_si256();
    for (int32_t g = g0; g < g1; ++g) {
      const int32_t* kk = p.col_idx + 4 * int64_t(g);
      // the 4x4 tile as int16: ymm element 4i+b = w[i][b], i.e. 32-bit word 2i = (w[i][0], w[i][1]) and 2i+1 =
      // (w[i][2], w[i][3]); spill it so each pair can be broadcast from memory (converting every group once per
      // call instead measured no faster).
      alignas(32) int32_t wp[8];
      const __m128i w8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.values + 16 * int64_t(g)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(wp), _mm256_cvtepi8_epi16(w8));
      __m256i x[4];
      for (int b = 0; b < 4; ++b) {
        const uint8_t* row = xt + int64_t(kk[b]) * kTile + s;
        x[b] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      }
      // 128-bit lane h: tokens 8h + 0..3 (lo) and 8h + 4..7 (hi)
      const __m256i lo01 = _mm256_unpacklo_epi16(x[0], x[1]), hi01 = _mm256_unpackhi_epi16(x[0], x[1]);
      const __m256i lo23 = _mm256_unpacklo_epi16(x[2], x[3]), hi23 = _mm256_unpackhi_epi16(x[2], x[3]);
      for (int i = 0; i < 4; ++i) {
        const __m256i w01 = _mm256_set1_epi32(wp[2 * i]), w23 = _mm256_set1_epi32(wp[2 * i + 1]);
        const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(lo01, w01), _mm256_madd_epi16(lo23, w23));
        const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(hi01, w01), _mm256_madd_epi16(hi23, w23));
        acc[i][0] = _mm256_add_epi32(acc[i][0], lo);
        acc[i][1] = _mm256_add_epi32(acc[i][1], hi);
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256i rows[4] = {acc[0][h], acc[1][h], acc[2][h], acc[3][h]};
      store_half_avx2(p, r, rb, s + 4 * h, rows, buf);
    }
  }
}

// Copy the valid tokens' rows of a chunk buffer to Y (int32 or float32, both 4 bytes).
__attribute__((target("avx512f"))) void copy_out_stream(const Problem& p, const int32_t* buf, int64_t valid,
                                                        int32_t* y, int64_t lines) {
  for (int64_t t = 0; t < valid; ++t)
    for (int64_t l = 0; l < lines; ++l)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(y + t * p.out) + l, _mm512_load_si512(buf + t * kBufLd + 16 * l));
}

// GELU(v) = v/2 (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, far
// under one uint8 step), then the same rounding (half to even) and clamp as gelu_quantize.
__attribute__((target("avx512f"))) inline __m128i gelu_quantize16(const Epilogue& ep, __m512 v) {
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(v, _mm512_set1_ps(float(M_SQRT1_2))));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
  poly = _mm512_mul_ps(poly, t);
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)),
                                          _mm512_set1_ps(1.0f));
  // 1 + erf(v/sqrt2): 1 + erf_abs for v >= 0, 1 - erf_abs below
  const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus_erf = _mm512_mask_sub_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), erf_abs), negative,
                                                 _mm512_set1_ps(1.0f), erf_abs);
  const __m512 g = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), one_plus_erf);
  __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(g, _mm512_set1_ps(ep.out_inv_scale)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, _mm512_set1_ps(ep.out_zero_point));
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
}

// GELU + requantize the valid tokens' rows of a chunk buffer (float32, width outputs each) into uint8 Y.
__attribute__((target("avx512f"))) void copy_out_gelu_u8_avx512(const Problem& p, const int32_t* buf,
                                                                         int64_t valid, uint8_t* y, int64_t width) {
  for (int64_t t = 0; t < valid; ++t) {
    const float* row = reinterpret_cast<const float*>(buf + t * kBufLd);
    int64_t c = 0;
    for (; c + 16 <= width; c += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + t * p.out + c), gelu_quantize16(p.ep, _mm512_loadu_ps(row + c)));
    if (c < width) {  // the chunk's last 4, 8 or 12 outputs
      alignas(16) uint8_t tail[16];
      const __mmask16 m = __mmask16((1u << (width - c)) - 1);
      _mm_store_si128(reinterpret_cast<__m128i*>(tail), gelu_quantize16(p.ep, _mm512_maskz_loadu_ps(m, row + c)));
      std::memcpy(y + t * p.out + c, tail, width - c);
    }
  }
}

// gelu_quantize16 on 8 floats, for CPUs without AVX-512; the 8 bytes are the low half of the result.
__attribute__((target("avx2,fma"))) inline __m128i gelu_quantize8(const Epilogue& ep, __m256 v) {
  const __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_mul_ps(v, _mm256_set1_ps(float(M_SQRT1_2))));
  const __m256 t =
      _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
  __m256 poly = _mm256_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f})
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(c));
  poly = _mm256_mul_ps(poly, t);
  const __m256 minus_z_squared = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z);
  const __m256 erf_abs = _mm256_fnmadd_ps(poly, exp_nonpositive(minus_z_squared), _mm256_set1_ps(1.0f));
  const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 signed_erf = _mm256_blendv_ps(erf_abs, _mm256_sub_ps(_mm256_setzero_ps(), erf_abs), negative);
  const __m256 half_v = _mm256_mul_ps(_mm256_set1_ps(0.5f), v);
  const __m256 g = _mm256_mul_ps(half_v, _mm256_add_ps(_mm256_set1_ps(1.0f), signed_erf));
  __m256 q = _mm256_round_ps(_mm256_mul_ps(g, _mm256_set1_ps(ep.out_inv_scale)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_add_ps(q, _mm256_set1_ps(ep.out_zero_point));
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(255.0f));
  const __m256i i32 = _mm256_cvtps_epi32(q);
  const __m128i u16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  return _mm_packus_epi16(u16, u16);
}

__attribute__((target("avx2,fma"))) void copy_out_gelu_u8_avx2(const Problem& p, const int32_t* buf, int64_t valid,
                                                                uint8_t* y, int64_t width) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t t = 0; t < valid; ++t) {
    const float* row = reinterpret_cast<const float*>(buf + t * kBufLd);
    int64_t c = 0;
    for (; c + 8 <= width; c += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(y + t * p.out + c),
                       gelu_quantize8(p.ep, _mm256_loadu_ps(row + c)));
    if (c < width) {  // the chunk's last 4 outputs
      alignas(16) uint8_t tail[16];
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(width - c)), lanes);
      _mm_store_si128(reinterpret_cast<__m128i*>(tail), gelu_quantize8(p.ep, _mm256_maskload_ps(row + c, m)));
      std::memcpy(y + t * p.out + c, tail, width - c);
    }
  }
}

// Only the SIMD paths get here (the scalar path has its own loop), so the CPU has at least AVX2 and FMA.
void copy_out_gelu_u8(const Problem& p, const int32_t* buf, int64_t valid, uint8_t* y, int64_t width) {
  if (cpu_supports_avx512()) return copy_out_gelu_u8_avx512(p, buf, valid, y, width);
  copy_out_gelu_u8_avx2(p, buf, valid, y, width);
}

void copy_out(const Problem& p, const int32_t* buf, int64_t token0, int64_t r0, int64_t r1, bool stream) {
  const int64_t valid = std::min<int64_t>(kTile, p.n - token0);
  if (p.ep.gelu_u8)
    return copy_out_gelu_u8(p, buf, valid, static_cast<uint8_t*>(p.y) + token0 * p.out + 4 * r0, 4 * (r1 - r0));
  int32_t* y = static_cast<int32_t*>(p.y) + token0 * p.out + 4 * r0;
  if (stream && (r1 - r0) % 4 == 0) return copy_out_stream(p, buf, valid, y, (r1 - r0) / 4);
  for (int64_t t = 0; t < valid; ++t) std::memcpy(y + t * p.out, buf + t * kBufLd, 16 * (r1 - r0));
}

// ---------------------------------------------------------------------------------------------------------
// Driver shared by the SIMD paths. Work items are (64-token tile, chunk of 16 block-rows), split statically over
// the threads, so a thread's items mostly share a tile: it transposes the tile into its own reusable buffer when
// the tile changes (no per-call allocation: a fresh multi-MiB buffer costs ~0.2 ms of page faults per call).
template <typename Block>
void gemm_tiled(const Problem& p, const Block& block) {
  const int64_t tiles = (p.n + kTile - 1) / kTile;
  const int64_t R = p.out / 4, chunks = (R + kChunkRows - 1) / kChunkRows;
  // An output much larger than L2 is written with streaming stores: it is not re-read soon, and skipping the
  // read-for-ownership of every line saves a third of the memory traffic.
  const bool stream = !p.ep.gelu_u8 && p.n * p.out * 4 > (int64_t(4) << 20) && p.out % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.y) % 64 == 0 && cpu_supports_avx512();
  at::parallel_for(0, tiles * chunks, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<uint8_t> xt_storage;
    xt_storage.resize(std::max<size_t>(xt_storage.size(), size_t(p.in * kTile + 64)));  // +64: safe vector loads
    uint8_t* xt = xt_storage.data();
    alignas(64) int32_t buf[kTile * kBufLd];
    int64_t have = -1;  // tile currently in xt
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i / chunks, r0 = i % chunks * kChunkRows, r1 = std::min(R, r0 + kChunkRows);
      if (j != have) {
        transpose_tile(p, j * kTile, xt);
        have = j;
      }
      for (int64_t r = r0; r < r1; ++r) block(p, xt, r, r - r0, buf);
      copy_out(p, buf, j * kTile, r0, r1, stream);
    }
    if (stream) _mm_sfence();  // make the streaming stores visible before the caller reads Y
  });
}
#endif  // FASTCPU_X86

// ---------------------------------------------------------------------------------------------------------
// Dispatch.

bool cpu_has(Path path) {
#ifdef FASTCPU_X86
  __builtin_cpu_init();
  switch (path) {
    case Path::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case Path::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return path == Path::kScalar;
#endif
}

const char* path_name(Path path) {
  switch (path) {
    case Path::kAvx512Vnni:
      return "avx512_vnni";
    case Path::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::vector<std::string> available_paths() {
  std::vector<std::string> names;
  for (Path path : {Path::kAvx512Vnni, Path::kAvx2, Path::kScalar})
    if (cpu_has(path)) names.emplace_back(path_name(path));
  return names;
}

Path resolve_path(const std::string& name) {
  if (name.empty()) {
    for (Path path : {Path::kAvx512Vnni, Path::kAvx2})
      if (cpu_has(path)) return path;
    return Path::kScalar;
  }
  for (Path path : {Path::kAvx512Vnni, Path::kAvx2, Path::kScalar}) {
    if (name == path_name(path)) {
      TORCH_CHECK(cpu_has(path), "sparse_gemm: path '", name, "' is not supported by this CPU");
      return path;
    }
  }
  TORCH_CHECK(false, "sparse_gemm: unknown path '", name, "' (expected avx512_vnni, avx2 or scalar)");
}

void check_inputs(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                  const at::Tensor& values, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kByte, "sparse_gemm: x must be a 2-D uint8 tensor, got ",
              x.scalar_type(), " with ", x.dim(), " dims");
  TORCH_CHECK(out % 4 == 0 && out >= 0, "sparse_gemm: out_features must be a multiple of 4, got ", out);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.numel() == out / 4 + 1,
              "sparse_gemm: row_ptr must be int32 [out/4 + 1]");
  TORCH_CHECK(col_idx.scalar_type() == at::kInt && col_idx.dim() == 2 && col_idx.size(1) == 4,
              "sparse_gemm: col_idx must be int32 [G, 4]");
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 3 && values.size(0) == col_idx.size(0) &&
                  values.size(1) == 4 && values.size(2) == 4,
              "sparse_gemm: values must be int8 [G, 4, 4]");
  for (const at::Tensor* t : {&x, &row_ptr, &col_idx, &values})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "sparse_gemm: tensors must be contiguous CPU tensors");
}

void run(Problem& p, Path path) {
  if (p.n == 0 || p.out == 0) return;
#ifdef FASTCPU_X86
  if (path == Path::kAvx512Vnni && p.in > 0) return gemm_tiled(p, block_vnni);
  if (path == Path::kAvx2 && p.in > 0) return gemm_tiled(p, block_avx2);
#endif
  gemm_scalar(p);
}

Problem make_problem(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& values, int64_t out) {
  Problem p{};
  p.x = x.data_ptr<uint8_t>();
  p.n = x.size(0);
  p.in = x.size(1);
  p.out = out;
  p.row_ptr = row_ptr.data_ptr<int32_t>();
  p.col_idx = col_idx.data_ptr<int32_t>();
  p.values = values.data_ptr<int8_t>();
  return p;
}

at::Tensor sparse_int8_gemm(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            const at::Tensor& values, int64_t out, const std::string& path) {
  check_inputs(x, row_ptr, col_idx, values, out);
  const Path chosen = resolve_path(path);
  at::Tensor y = at::empty({x.size(0), out}, at::kInt);  // every element is written
  Problem p = make_problem(x, row_ptr, col_idx, values, out);
  p.y = y.data_ptr<int32_t>();
  run(p, chosen);
  return y;
}

at::Tensor sparse_linear(const at::Tensor& x, double x_scale, int64_t x_zero_point, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, const at::Tensor& values, const at::Tensor& row_sums,
                         const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias, int64_t out,
                         const std::string& path, double gelu_out_scale, int64_t gelu_out_zero_point) {
  check_inputs(x, row_ptr, col_idx, values, out);
  TORCH_CHECK(row_sums.scalar_type() == at::kInt && row_sums.numel() == out && row_sums.is_contiguous(),
              "sparse_linear: row_sums must be int32 [out]");
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.numel() == out,
              "sparse_linear: weight_scale must be float32 [out]");
  const Path chosen = resolve_path(path);
  const at::Tensor scale = (weight_scale.contiguous() * x_scale).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "sparse_linear: bias must have out_features elements");
    b = bias->to(at::kFloat).contiguous();
  } else {
    b = at::zeros({out}, at::kFloat);
  }
  const bool gelu_u8 = gelu_out_scale > 0;
  at::Tensor y = at::empty({x.size(0), out}, gelu_u8 ? at::kByte : at::kFloat);
  Problem p = make_problem(x, row_ptr, col_idx, values, out);
  p.y = y.data_ptr();
  p.ep.fused = true;
  p.ep.gelu_u8 = gelu_u8;
  p.ep.out_inv_scale = 1.0f / float(gelu_out_scale);
  p.ep.out_zero_point = float(gelu_out_zero_point);
  p.ep.zero_point = int32_t(x_zero_point);
  p.ep.row_sums = row_sums.data_ptr<int32_t>();
  p.ep.scale = scale.data_ptr<float>();
  p.ep.bias = b.data_ptr<float>();
  run(p, chosen);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_int8_gemm", &sparse_int8_gemm, "4x1 block-sparse int8 GEMM, int32 accumulators");
  m.def("sparse_linear", &sparse_linear,
        "4x1 block-sparse int8 Linear with zero-point, scales and bias; float32 out, or GELU requantized to "
        "uint8 when gelu_out_scale > 0",
        py::arg("x"), py::arg("x_scale"), py::arg("x_zero_point"), py::arg("row_ptr"), py::arg("col_idx"),
        py::arg("values"), py::arg("row_sums"), py::arg("weight_scale"), py::arg("bias"), py::arg("out"),
        py::arg("path"), py::arg("gelu_out_scale") = 0.0, py::arg("gelu_out_zero_point") = 0);
  m.def("fused_attention", &fastcpu::fused_attention,
        "softmax(q k^T * scale) v per (batch, head) with a [B, S] key mask; float32 [B, S, H, D] out",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"), py::arg("scale"), py::arg("vectorized"));
  m.def("available_paths", &available_paths, "code paths this CPU can run, fastest first");
}
