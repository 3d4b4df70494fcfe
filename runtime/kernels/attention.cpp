// Fused attention for CPU encoders: out[b, s, h, :] = softmax(q[b, h, s, :] . k[b, h, :, :]^T * scale) v[b, h]
// with masked keys excluded, one work item per (batch, head). The scores of one query row live in a buffer of the
// work item (never a [B, H, S, S] tensor in memory), and the key padding mask is a [B, S] row, not [B, H, S, S].
//
//   q, k, v   float32 [B, H, S, D], any strides with D contiguous (views of the query/key/value GEMM's output)
//   key_mask  bool [B, S], True = attend; or an empty tensor (attend to every key)
//   out       float32 [B, S, H, D] contiguous: the [B, S, H * D] rows the output projection reads
//
// Keys after the last attended one (a padded tail) are never read. Two code paths: avx512 (D a multiple of 16, at
// most 128) with K^T of the head staged in a buffer so 16 keys' scores are one FMA per head dimension, and a scalar
// reference for the rest.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"

namespace {

#if defined(__x86_64__) || defined(__i386__)
using fastcpu::exp_nonpositive;
#endif

constexpr int64_t kLanes = 16;     // floats per zmm register
constexpr int64_t kKeyBlock = 8;   // 16-key chunks whose scores one pass keeps in registers (128 keys)
constexpr int64_t kMaxDChunks = 8; // D <= 128 on the vector path

struct Heads {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  const bool* mask;  // [B, S] or nullptr
  int64_t batch, heads, seq, dim;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, token strides in elements
  float scale;

  const float* row(const float* base, const int64_t* stride, int64_t b, int64_t h, int64_t s) const {
    return base + b * stride[0] + h * stride[1] + s * stride[2];
  }
  float* out_row(int64_t b, int64_t s, int64_t h) const { return out + ((b * seq + s) * heads + h) * dim; }
  bool attends(int64_t b, int64_t j) const { return mask == nullptr || mask[b * seq + j]; }

  // Keys up to the last attended one: a padded tail costs nothing.
  int64_t key_count(int64_t b) const {
    int64_t n = seq;
    while (n > 0 && !attends(b, n - 1)) --n;
    return n;
  }
};

using HeadFn = void (*)(const Heads&, int64_t, int64_t, std::vector<uint8_t>&);

void head_scalar(const Heads& a, int64_t b, int64_t h, std::vector<uint8_t>& work) {
  const int64_t n = a.key_count(b);
  work.resize(n * sizeof(float));
  float* p = reinterpret_cast<float*>(work.data());
  for (int64_t i = 0; i < a.seq; ++i) {
    float* o = a.out_row(b, i, h);
    std::fill(o, o + a.dim, 0.0f);
    if (n == 0) continue;  // no key to attend: zeros, not NaN
    const float* q = a.row(a.q, a.q_stride, b, h, i);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float* k = a.row(a.k, a.k_stride, b, h, j);
      float dot = 0.0f;
      for (int64_t t = 0; t < a.dim; ++t) dot += q[t] * k[t];
      p[j] = a.attends(b, j) ? dot * a.scale : -std::numeric_limits<float>::infinity();
      top = std::max(top, p[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += p[j] = a.attends(b, j) ? std::exp(p[j] - top) : 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float* v = a.row(a.v, a.v_stride, b, h, j);
      const float w = p[j] / sum;
      for (int64_t t = 0; t < a.dim; ++t) o[t] += w * v[t];
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)

// float32 -> bfloat16, rounding to nearest even (the inputs are finite).
inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

constexpr int kMaxRows = 4;  // query rows one pass over V serves

// One head staged for vdpbf16ps, which multiplies bf16 pairs: K^T as pairs (k[j][2t], k[j][2t+1]) * scale in
// [D/2][ld] (one load = 16 keys x 2 dimensions), V as pairs (v[2j][d], v[2j+1][d]) in [ld/2][D], contiguous (the
// QKV GEMM's rows are 3 H D floats apart: a TLB miss per key); ld = keys rounded up to whole registers, the extra
// keys and values zero. Plus the keys' additive mask (0 or -inf) and buffers for kMaxRows query rows.
struct Staged {
  const uint32_t* kt;
  const uint32_t* v;
  const float* bias;
  float* scores;     // [kMaxRows][ld] float32
  uint16_t* probs;   // [kMaxRows][ld] bf16
  uint16_t* queries; // [kMaxRows][D] bf16
  int64_t keys, ld;
};

// Carve 64-byte aligned pieces out of one buffer.
struct Carver {
  uint8_t* next;
  template <typename T>
  T* take(int64_t count) {
    T* piece = reinterpret_cast<T*>(next);
    next += (count * int64_t(sizeof(T)) + 63) / 64 * 64;
    return piece;
  }
};

// The rows of one head are 3 H D floats apart, too far for the hardware prefetcher: ask for the key, value and
// query rows kAhead tokens ahead (each D floats, at most 512 bytes).
constexpr int64_t kAhead = 8;

inline void prefetch_row(const Heads& a, int64_t b, int64_t h, int64_t j) {
  for (const auto& [base, stride] : {std::pair{a.k, a.k_stride}, {a.v, a.v_stride}, {a.q, a.q_stride}}) {
    const char* row = reinterpret_cast<const char*>(a.row(base, stride, b, h, j));
    for (int64_t byte = 0; byte < a.dim * 4; byte += 64) __builtin_prefetch(row + byte);
  }
}

Staged stage_head(const Heads& a, int64_t b, int64_t h, std::vector<uint8_t>& work) {
  const int64_t n = a.key_count(b), dim = a.dim;
  const int64_t ld = (n + kLanes - 1) / kLanes * kLanes;
  work.resize(4 * (dim * ld + ld + 2 * kMaxRows * ld + kMaxRows * dim) + 8 * 64);
  Carver carve{reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(work.data()) + 63) & ~uintptr_t(63))};
  uint16_t* kt = carve.take<uint16_t>(dim * ld);
  uint16_t* v = carve.take<uint16_t>(ld * dim);
  float* bias = carve.take<float>(ld);
  float* scores = carve.take<float>(kMaxRows * ld);
  uint16_t* probs = carve.take<uint16_t>(kMaxRows * ld);
  uint16_t* queries = carve.take<uint16_t>(kMaxRows * dim);
  for (int64_t j = 0; j < ld; ++j) {
    if (j + kAhead < n) prefetch_row(a, b, h, j + kAhead);
    const bool live = j < n && a.attends(b, j);
    bias[j] = live ? 0.0f : -std::numeric_limits<float>::infinity();
    const float* key = j < n ? a.row(a.k, a.k_stride, b, h, j) : nullptr;
    const float* value = j < n ? a.row(a.v, a.v_stride, b, h, j) : nullptr;
    for (int64_t t = 0; t < dim; ++t) {
      kt[((t / 2) * ld + j) * 2 + t % 2] = live ? to_bf16(key[t] * a.scale) : 0;
      v[((j / 2) * dim + t) * 2 + j % 2] = j < n ? to_bf16(value[t]) : 0;
    }
  }
  return {reinterpret_cast<uint32_t*>(kt), reinterpret_cast<uint32_t*>(v), bias, scores, probs, queries, n, ld};
}

// scores[r][j0 + 16c ..] = bias + q[r] . K^T for Rows queries and Chunks x 16 keys, two dimensions per
// instruction; each K^T load serves every row.
template <int Rows, int Chunks>
__attribute__((target("avx512f,avx512bf16"))) inline void score_block(const uint32_t* const* q, const Staged& s,
                                                                      int64_t dim, int64_t j0, float* scores) {
  __m512 acc[Rows][Chunks];
  for (int c = 0; c < Chunks; ++c) {
    const __m512 bias = _mm512_load_ps(s.bias + j0 + kLanes * c);
    for (int r = 0; r < Rows; ++r) acc[r][c] = bias;
  }
  for (int64_t t = 0; t < dim / 2; ++t) {
    __m512bh qt[Rows];
    for (int r = 0; r < Rows; ++r) qt[r] = (__m512bh)_mm512_set1_epi32(int(q[r][t]));
    for (int c = 0; c < Chunks; ++c) {
      const __m512bh k = (__m512bh)_mm512_load_si512(s.kt + t * s.ld + j0 + kLanes * c);
      for (int r = 0; r < Rows; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qt[r], k);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Chunks; ++c) _mm512_store_ps(scores + r * s.ld + j0 + kLanes * c, acc[r][c]);
}

template <int Rows>
__attribute__((target("avx512f,avx512bf16"))) inline void score_rows(const uint32_t* const* q, const Staged& s,
                                                                     int64_t dim, float* scores) {
  int64_t j = 0;
  for (; j + kKeyBlock * kLanes <= s.ld; j += kKeyBlock * kLanes) score_block<Rows, kKeyBlock>(q, s, dim, j, scores);
  for (; j < s.ld; j += kLanes) score_block<Rows, 1>(q, s, dim, j, scores);
}

// probs = bf16(exp(p - max(p))) over ld scores (masked ones exactly 0); returns 1 / the sum of the float32 values.
__attribute__((target("avx512f,avx512bf16"))) inline float softmax_numerators(const float* p, int64_t ld,
                                                                             uint16_t* probs) {
  const __m512 masked = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = masked;
  for (int64_t j = 0; j < ld; j += kLanes) top = _mm512_max_ps(top, _mm512_load_ps(p + j));
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < ld; j += kLanes) {
    const __m512 x = _mm512_load_ps(p + j);
    const __mmask16 live = _mm512_cmp_ps_mask(x, masked, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(x, row_max)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// o[r] = probs[r] . V * inv_sum[r] for Rows queries, D = DChunks x 16, two keys per instruction; each V load serves
// every row.
template <int Rows, int DChunks>
__attribute__((target("avx512f,avx512bf16"))) inline void weighted_values(const Staged& s, float* const* o,
                                                                          const float* inv_sum, int64_t dim) {
  __m512 acc[Rows][DChunks];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < DChunks; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint32_t* probs = reinterpret_cast<const uint32_t*>(s.probs);
  for (int64_t j = 0; j < (s.keys + 1) / 2; ++j) {
    __m512bh v[DChunks];
    for (int c = 0; c < DChunks; ++c) v[c] = (__m512bh)_mm512_load_si512(s.v + j * dim + kLanes * c);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(int(probs[r * s.ld / 2 + j]));
      for (int c = 0; c < DChunks; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, v[c]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m512 scale = _mm512_set1_ps(inv_sum[r]);
    for (int c = 0; c < DChunks; ++c) _mm512_storeu_ps(o[r] + kLanes * c, _mm512_mul_ps(acc[r][c], scale));
  }
}

// Query rows i0 .. i0 + Rows of one head: bf16 queries, scores two rows per pass over K^T, one pass over V.
template <int Rows, int DChunks>
__attribute__((target("avx512f,avx512bf16"))) void query_rows(const Heads& a, int64_t b, int64_t h, int64_t i0,
                                                              const Staged& s) {
  const uint32_t* q[Rows];
  float* o[Rows];
  float inv_sum[Rows];
  for (int r = 0; r < Rows; ++r) {
    const float* row = a.row(a.q, a.q_stride, b, h, i0 + r);
    uint16_t* bf16 = s.queries + r * a.dim;
    for (int c = 0; c < DChunks; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bf16 + kLanes * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + kLanes * c)));
    q[r] = reinterpret_cast<const uint32_t*>(bf16);
    o[r] = a.out_row(b, i0 + r, h);
  }
  constexpr int kPair = Rows == 1 ? 1 : 2;
  for (int r = 0; r < Rows; r += kPair) score_rows<kPair>(q + r, s, a.dim, s.scores + r * s.ld);
  for (int r = 0; r < Rows; ++r) inv_sum[r] = softmax_numerators(s.scores + r * s.ld, s.ld, s.probs + r * s.ld);
  weighted_values<Rows, DChunks>(s, o, inv_sum, a.dim);
}

template <int DChunks>
__attribute__((target("avx512f,avx512bf16"))) void head_bf16(const Heads& a, int64_t b, int64_t h,
                                                             std::vector<uint8_t>& work) {
  constexpr int kRows = DChunks <= 4 ? kMaxRows : 2;  // accumulators: kRows x DChunks of the 32 registers
  const Staged s = stage_head(a, b, h, work);
  if (s.keys == 0) {  // no key to attend: zeros, not NaN
    for (int64_t i = 0; i < a.seq; ++i) std::fill_n(a.out_row(b, i, h), a.dim, 0.0f);
    return;
  }
  int64_t i = 0;
  for (; i + kRows <= a.seq; i += kRows) query_rows<kRows, DChunks>(a, b, h, i, s);
  for (; i < a.seq; ++i) query_rows<1, DChunks>(a, b, h, i, s);
}

HeadFn bf16_head_for(int64_t dim) {
  switch (dim / kLanes) {
    case 1: return head_bf16<1>;
    case 2: return head_bf16<2>;
    case 3: return head_bf16<3>;
    case 4: return head_bf16<4>;
    case 5: return head_bf16<5>;
    case 6: return head_bf16<6>;
    case 7: return head_bf16<7>;
    default: return head_bf16<kMaxDChunks>;
  }
}

bool cpu_supports_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

#endif

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat, "fused_attention: q, k, v must be float32 [B, H, S, D]");
    TORCH_CHECK(t->sizes() == q.sizes(), "fused_attention: q, k, v shapes differ (", q.sizes(), " vs ", t->sizes(), ")");
  }
  if (key_mask.numel()) {
    TORCH_CHECK(key_mask.scalar_type() == at::kBool && key_mask.dim() == 2 && key_mask.size(0) == q.size(0) &&
                    key_mask.size(1) == q.size(2),
                "fused_attention: key_mask must be bool [B, S] = [", q.size(0), ", ", q.size(2), "], got ",
                key_mask.scalar_type(), " ", key_mask.sizes());
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

}  // namespace

namespace fastcpu {

at::Tensor fused_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const at::Tensor& key_mask_in, double scale, bool vectorized) {
  check_qkv(q_in, k_in, v_in, key_mask_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor key_mask = key_mask_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  at::Tensor out = at::empty({batch, seq, heads, dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  Heads a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
          key_mask.numel() ? key_mask.data_ptr<bool>() : nullptr, batch, heads, seq, dim,
          {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
          {v.stride(0), v.stride(1), v.stride(2)}, float(scale)};
  HeadFn head = head_scalar;
#if defined(__x86_64__) || defined(__i386__)
  if (vectorized && cpu_supports_avx512_bf16() && dim % kLanes == 0 && dim <= kMaxDChunks * kLanes)
    head = bf16_head_for(dim);
#endif
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> work;
    for (int64_t item = begin; item < end; ++item) head(a, item / heads, item % heads, work);
  });
  return out;
}

}  // namespace fastcpu
