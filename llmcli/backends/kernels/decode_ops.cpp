// The small steps of an eager one-token decode step on CPU, each as one op; compiled as part of int_dot.cpp
// (included at its end) and called by llmcli/backends/decode_ops.py.
//
// Between its products, a decode step of the Qwen2.5-0.5B shape ran about 65 torch ops per layer, each
// 3-12 us of dispatch and allocation for a few thousand numbers: an RMSNorm of one row took 78 us, the
// attention of one query over 40 keys (RoPE, cache write, two products, softmax) 345 us. Here each is one
// call that keeps torch's rounding where it is observable: every elementwise step in the model's dtype is
// rounded as torch rounds it (to the dtype after each op), reductions are summed in float32 (torch's order of
// summation is not reproduced, so results may differ from the torch path in the last bit).
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

// torch rounds every elementwise op's result; a fused multiply-add would skip the rounding of a product
// (float32 RoPE: x * cos + roll(x) * sin would not match), so the compiler must not contract here.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

// Rounded to scalar_t, back in float: what a torch op in scalar_t stores.
template <typename scalar_t>
inline float rounded(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

// sum_i a[i] * b[i] in float32, in 8 interleaved partial sums (the compiler keeps them in one vector register).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) partial[l] += static_cast<float>(a[i + l]) * static_cast<float>(b[i + l]);
  float total = 0.f;
  for (; i < n; ++i) total += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  for (int l = 0; l < 8; ++l) total += partial[l];
  return total;
}

// Sums for the latent attention's products: sum_i a[i] * b[i] with float a, and y[i] += a * w[i]. With AVX2
// (this file is compiled inside int_dot.cpp's unit) 8 lanes at a time with fused multiply-adds: these are sums
// whose order already differs from torch's, so contraction changes nothing observable.
#if defined(LLMCLI_INT_DOT_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
template <typename T>
inline constexpr bool kVectorType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                                    std::is_same_v<T, c10::Half>;
#endif

template <typename B>
inline float dot_float(const float* a, const B* b, int64_t n) {
#if defined(LLMCLI_INT_DOT_AVX2)
  if constexpr (kVectorType<B>) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
    float total = 0.f;
    for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
    for (float lane : lanes) total += lane;
    return total;
  }
#endif
  return dot(a, b, n);
}

template <typename W>
inline void add_scaled(float a, const W* w, float* y, int64_t n) {
  int64_t i = 0;
#if defined(LLMCLI_INT_DOT_AVX2)
  if constexpr (kVectorType<W>) {
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(w + i), _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += a * static_cast<float>(w[i]);
}

// RMSNorm as llmcli's models compute it: y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x in float32; or, with
// `zero_centred` (the Qwen3.5/Qwen3-Next norms, weights stored around 0), to_dtype(x * rsqrt(...) * (1 + weight)),
// all in float32.
at::Tensor rms_norm_as(const at::Tensor& x, const at::Tensor& weight, double eps, bool zero_centred) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.is_floating_point(), "rms_norm: x must be contiguous CPU");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.scalar_type() == x.scalar_type() &&
                  weight.is_contiguous(), "rms_norm: weight must be [", D, "] in x's dtype");
  at::Tensor out = at::empty_like(x);
  LLMCLI_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * D;
        const float factor = 1.f / std::sqrt(dot(row, row, D) / static_cast<float>(D) + static_cast<float>(eps));
        for (int64_t i = 0; i < D; ++i) {
          const float normalised = static_cast<float>(row[i]) * factor;
          op[r * D + i] = zero_centred ? static_cast<scalar_t>(normalised * (1.f + static_cast<float>(wp[i])))
                                       : static_cast<scalar_t>(static_cast<float>(wp[i]) * rounded<scalar_t>(normalised));
        }
      }
    });
  });
  return out;
}

#include "attention_chunks.cpp"

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_as(x, weight, eps, false);
}

at::Tensor zero_centred_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_as(x, weight, eps, true);
}

// decode_attention's work: RoPE in cos_t (qkv's dtype, or float32), each product and the sum rounded to it.
template <typename scalar_t, typename cos_t>
void decode_attention_impl(const at::Tensor& qkv, const cos_t* cp, const cos_t* sp, at::Tensor& k_cache,
                           at::Tensor& v_cache, int64_t position, int64_t heads, int64_t first, int64_t keys,
                           double scale, at::Tensor& out) {
  const int64_t B = qkv.size(0), D = qkv.size(2), KV = (qkv.size(1) - heads) / 2;
  const int64_t group = heads / KV, half = D / 2;
  const scalar_t* in = qkv.const_data_ptr<scalar_t>();
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  auto rotate = [&](const scalar_t* x, int64_t i) {  // element i of the rotated row x, rounded like torch
    const float straight = rounded<cos_t>(static_cast<float>(x[i]) * static_cast<float>(cp[i]));
    const float swapped = rounded<cos_t>(static_cast<float>(x[(i + half) % D]) * static_cast<float>(sp[i]));
    return rounded<cos_t>(straight + swapped);  // and rounded to scalar_t by the caller
  };
  for (int64_t b = 0; b < B; ++b)  // the new key (rotated) and value into the caches
    for (int64_t h = 0; h < KV; ++h) {
      const scalar_t* k = in + (b * (heads + 2 * KV) + heads + h) * D;
      const scalar_t* v = in + (b * (heads + 2 * KV) + heads + KV + h) * D;
      scalar_t* kd = kc + ((position * B + b) * KV + h) * D;
      scalar_t* vd = vc + ((position * B + b) * KV + h) * D;
      for (int64_t i = 0; i < D; ++i) kd[i] = static_cast<scalar_t>(rotate(k, i)), vd[i] = v[i];
    }
  std::vector<float> queries(B * heads * D);  // rotated and rounded like the cache's keys, a group's heads in turn
  for (int64_t bh = 0; bh < B * heads; ++bh) {
    const scalar_t* x = in + ((bh / heads) * (heads + 2 * KV) + bh % heads) * D;
    for (int64_t i = 0; i < D; ++i) queries[bh * D + i] = rounded<scalar_t>(rotate(x, i));
  }
  const int64_t stride = B * KV * D;  // from one key's row of a sequence's kv head to the next key's
  auto chunk = [&](int64_t s, int64_t j0, int64_t j1, const ChunkSums& sums, float* scratch) {  // s: b * KV + kvh
    attend_chunk(queries.data() + s * group * D, group, D, kc + s * D, stride, vc + s * D, stride, D, j0, j1,
                 static_cast<float>(scale), sums, scratch);
  };
  auto store = [&](int64_t s, int64_t g, const float* values) {  // head kvh * group + g of sequence b
    scalar_t* o = op + (s * group + g) * D;
    for (int64_t i = 0; i < D; ++i) o[i] = static_cast<scalar_t>(values[i]);
  };
  attend_in_chunks(B * KV, group, D, D, first, keys, chunk, store);
}

// One new token's attention per sequence, from the fused q/k/v projection's output:
//   qkv [B, H + 2KV, D] (q heads, k heads, v heads); cos, sin [D] (sin with rotate_half's sign folded in);
//   k_cache, v_cache [L, B, KV, D], written at `position`; keys max(0, position - window + 1)..position seen
//   (window 0: all). q and k are rotated like x * cos + roll(x, D/2) * sin in cos's dtype (qkv's, or float32 as
//   original Qwen rotates, then rounded to qkv's); scores are
//   (q . k) * scale in float32, softmaxed, and the values' weighted sum is rounded to the dtype: [B, H * D]
//   (a bfloat16 cache on a CPU with AVX512-BF16: the softmax's weights are rounded to bfloat16 for that sum).
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t position, int64_t heads, int64_t window, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 3 && qkv.is_contiguous(), "decode_attention: qkv must be [B, H + 2KV, D]");
  const int64_t B = qkv.size(0), D = qkv.size(2), KV = (qkv.size(1) - heads) / 2, L = k_cache.size(0);
  TORCH_CHECK(KV > 0 && heads % KV == 0 && heads + 2 * KV == qkv.size(1) && D % 2 == 0,
              "decode_attention: qkv's heads do not split into ", heads, " q heads and equal k and v heads");
  for (const at::Tensor* cache : {&k_cache, &v_cache})
    TORCH_CHECK(cache->is_contiguous() && cache->dim() == 4 && cache->size(0) == L && cache->size(1) == B &&
                    cache->size(2) == KV && cache->size(3) == D && cache->scalar_type() == qkv.scalar_type(),
                "decode_attention: caches must be [L, B, KV, D] in qkv's dtype");
  const bool float_rope = cos.scalar_type() == at::kFloat;  // original Qwen rotates in float32 whatever its dtype
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->numel() == D &&
                    t->scalar_type() == (float_rope ? at::kFloat : qkv.scalar_type()),
                "decode_attention: cos and sin must be [D] in qkv's dtype or both in float32");
  TORCH_CHECK(position >= 0 && position < L, "decode_attention: position ", position, " outside the cache of ", L);
  const int64_t first = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0, keys = position + 1 - first;
  at::Tensor out = at::empty({B, heads * D}, qkv.options());
  LLMCLI_DISPATCH_FLOATS(qkv.scalar_type(), "decode_attention", [&] {
    if (float_rope)
      decode_attention_impl<scalar_t>(qkv, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), k_cache, v_cache,
                                      position, heads, first, keys, scale, out);
    else
      decode_attention_impl<scalar_t>(qkv, cos.const_data_ptr<scalar_t>(), sin.const_data_ptr<scalar_t>(), k_cache,
                                      v_cache, position, heads, first, keys, scale, out);
  });
  return out;
}

// The absorbed attention of B sequences' H heads after the cache write: each head's query in the latent space
// (q_nope W_UK rounded to the dtype: q_nope of head bh at q_nope + bh * q_stride; then its rotated q_pe, which
// `rope_part(bh, y)` puts in y [rope]), over its sequence's latent rows (row j of sequence b at
// cache + b * batch_stride + j * key_stride; `range(b)`: its first key and count, at most `most`), the mixed latent
// rounded to the dtype and through W_UV: op [B, H * v].
template <typename scalar_t, typename weight_t, typename Rope, typename Range>
void absorbed_attention(int64_t B, int64_t H, int64_t R, int64_t rope, int64_t nope, int64_t v_dim,
                        const scalar_t* q_nope, int64_t q_stride, Rope rope_part, const scalar_t* cache,
                        int64_t batch_stride, int64_t key_stride, int64_t most, Range range, const weight_t* wp,
                        double scale, scalar_t* op) {
  const int64_t row = R + rope;
  std::vector<float> queries(B * H * row), mixed(B * H * R);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>((nope + v_dim) * R, 1));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const scalar_t* qh = q_nope + bh * q_stride;
      const weight_t* w = wp + (bh % H) * (nope + v_dim) * R;  // W_UK [nope, rank], then W_UV [v, rank]
      float* query = queries.data() + bh * row;
      std::fill(query, query + R, 0.f);
      for (int64_t n = 0; n < nope; ++n) add_scaled(static_cast<float>(qh[n]), w + n * R, query, R);
      for (int64_t r = 0; r < R; ++r) query[r] = rounded<scalar_t>(query[r]);
      rope_part(bh, query + R);
    }
  });
  // Every head of a sequence over its cache rows at once (a row's first R values are the latent the values mix).
  auto chunk = [&](int64_t b, int64_t j0, int64_t j1, const ChunkSums& sums, float* scratch) {
    const scalar_t* rows = cache + b * batch_stride;
    attend_chunk(queries.data() + b * H * row, H, row, rows, key_stride, rows, key_stride, R, j0, j1,
                 static_cast<float>(scale), sums, scratch);
  };
  auto store = [&](int64_t b, int64_t h, const float* values) {
    float* m = mixed.data() + (b * H + h) * R;
    for (int64_t r = 0; r < R; ++r) m[r] = rounded<scalar_t>(values[r]);
  };
  attend_in_ranges(B, H, row, R, most, range, chunk, store);
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {  // the mixed latent through W_UV
    for (int64_t bh = begin; bh < end; ++bh) {
      const weight_t* w = wp + ((bh % H) * (nope + v_dim) + nope) * R;
      for (int64_t i = 0; i < v_dim; ++i)
        op[bh * v_dim + i] = static_cast<scalar_t>(dot_float(mixed.data() + bh * R, w + i * R, R));
    }
  });
}

// One new token's absorbed Multi-head Latent Attention (DeepSeek) per sequence, from the layer's projections:
//   q [B, H, nope + rope] (q_b_proj's output), kv [B, rank + rope] (kv_a's output: c_kv, then k_pe), both not yet
//   normalised or rotated; norm [rank] (kv_a_layernorm's weight, eps); cos, sin [rope / 2] (one per rotated
//   pair); cache [L, B, rank + rope], written at `position` with the normalised c_kv and rotated k_pe;
//   wkv_b [H, nope + v, rank] (kv_b_proj's weight: W_UK rows, then W_UV rows, per head), float32 or the dtype.
// As MLAttention's absorbed form computes it: pairs (x[2i], x[2i+1]) when interleaved, else (x[i], x[i + rope/2]),
// rotated into [x1 cos - x2 sin | x2 cos + x1 sin] in the dtype; q_latent = q_nope W_UK rounded to the dtype;
// scores = ([q_latent | q_pe] . cache row) * scale in float32 over rows 0..position, softmaxed; the mixed latent
// (rounded to the dtype) through W_UV, rounded: [B, H * v].
template <typename scalar_t, typename weight_t>
void mla_decode_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& norm, double eps,
                     const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache, int64_t position,
                     const at::Tensor& wkv_b, int64_t v_dim, double scale, bool interleaved, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), R = norm.size(0), row = cache.size(2), rope = row - R;
  const int64_t nope = q.size(2) - rope, half = rope / 2, keys = position + 1;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = kv.const_data_ptr<scalar_t>();
  const scalar_t* np = norm.const_data_ptr<scalar_t>();
  const scalar_t* cp = cos.const_data_ptr<scalar_t>();
  const scalar_t* sp = sin.const_data_ptr<scalar_t>();
  const weight_t* wp = wkv_b.const_data_ptr<weight_t>();
  scalar_t* cache_p = cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  // x [rope] -> rotated [rope], each product and sum rounded like torch's ops in the dtype.
  auto rotate = [&](const scalar_t* x, float* y) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(interleaved ? x[2 * i] : x[i]);
      const float x2 = static_cast<float>(interleaved ? x[2 * i + 1] : x[i + half]);
      const float c = static_cast<float>(cp[i]), s = static_cast<float>(sp[i]);
      y[i] = rounded<scalar_t>(rounded<scalar_t>(x1 * c) - rounded<scalar_t>(x2 * s));
      y[half + i] = rounded<scalar_t>(rounded<scalar_t>(x2 * c) + rounded<scalar_t>(x1 * s));
    }
  };
  std::vector<float> rotated(rope);
  for (int64_t b = 0; b < B; ++b) {  // the new row: normalised c_kv, rotated k_pe
    const scalar_t* c_kv = kp + b * (R + rope);
    scalar_t* dst = cache_p + (position * B + b) * row;
    const float factor = 1.f / std::sqrt(dot(c_kv, c_kv, R) / static_cast<float>(R) + static_cast<float>(eps));
    for (int64_t i = 0; i < R; ++i)
      dst[i] = static_cast<scalar_t>(static_cast<float>(np[i]) * rounded<scalar_t>(static_cast<float>(c_kv[i]) * factor));
    rotate(c_kv + R, rotated.data());
    for (int64_t i = 0; i < rope; ++i) dst[R + i] = static_cast<scalar_t>(rotated[i]);
  }
  auto rope_part = [&](int64_t bh, float* y) { rotate(qp + bh * (nope + rope) + nope, y); };
  auto range = [&](int64_t) { return std::pair<int64_t, int64_t>{0, keys}; };
  absorbed_attention<scalar_t, weight_t>(B, H, R, rope, nope, v_dim, qp, nope + rope, rope_part, cache_p, row, B * row,
                                         keys, range, wp, scale, op);
}

at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& norm, double eps,
                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache, int64_t position,
                      const at::Tensor& wkv_b, int64_t v_dim, double scale, bool interleaved) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous(), "mla_decode: q must be [B, H, nope + rope]");
  const int64_t B = q.size(0), H = q.size(1), R = norm.numel();
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 3 && cache.size(1) == B && cache.size(2) > R &&
                  cache.scalar_type() == q.scalar_type(), "mla_decode: cache must be [L, B, rank + rope] in q's dtype");
  const int64_t rope = cache.size(2) - R, nope = q.size(2) - rope;
  TORCH_CHECK(rope % 2 == 0 && nope > 0, "mla_decode: q's heads do not split into nope and rope parts");
  TORCH_CHECK(kv.is_contiguous() && kv.numel() == B * (R + rope) && kv.scalar_type() == q.scalar_type(),
              "mla_decode: kv must be [B, rank + rope] in q's dtype");
  TORCH_CHECK(norm.is_contiguous() && norm.dim() == 1 && norm.scalar_type() == q.scalar_type(),
              "mla_decode: norm must be [rank] in q's dtype");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->numel() == rope / 2 && t->scalar_type() == q.scalar_type(),
                "mla_decode: cos and sin must be [rope / 2] in q's dtype");
  TORCH_CHECK(wkv_b.is_contiguous() && wkv_b.numel() == H * (nope + v_dim) * R &&
                  (wkv_b.scalar_type() == at::kFloat || wkv_b.scalar_type() == q.scalar_type()),
              "mla_decode: wkv_b must be [H, nope + v, rank], float32 or q's dtype");
  TORCH_CHECK(position >= 0 && position < cache.size(0), "mla_decode: position ", position, " outside the cache");
  at::Tensor out = at::empty({B, H * v_dim}, q.options());
  LLMCLI_DISPATCH_FLOATS(q.scalar_type(), "mla_decode", [&] {
    if (wkv_b.scalar_type() == at::kFloat)
      mla_decode_impl<scalar_t, float>(q, kv, norm, eps, cos, sin, cache, position, wkv_b, v_dim, scale, interleaved, out);
    else
      mla_decode_impl<scalar_t, scalar_t>(q, kv, norm, eps, cos, sin, cache, position, wkv_b, v_dim, scale,
                                          interleaved, out);
  });
  return out;
}

// MLAttention's absorbed static step (a batch of sequences at their own positions, the model's code having written
// the cache): q_nope [B, H, 1, nope], q_pe [B, H, 1, rope] (rotated), latent [B, L, rank + rope] (a view of the cache:
// any strides but a last of 1), wkv_b as mla_decode's; sequence b attends to latent rows 0..positions[b] (one
// position per row, or one for all; int64). [B, H, v].
at::Tensor mla_attend(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& latent,
                      const at::Tensor& wkv_b, int64_t v_dim, double scale, const at::Tensor& positions) {
  TORCH_CHECK(q_nope.device().is_cpu() && q_nope.dim() == 4 && q_nope.size(2) == 1 && q_pe.dim() == 4 &&
                  q_pe.sizes().slice(0, 3) == q_nope.sizes().slice(0, 3) && q_pe.scalar_type() == q_nope.scalar_type(),
              "mla_attend: q_nope and q_pe must be [B, H, 1, nope] and [B, H, 1, rope] in one dtype");
  const int64_t B = q_nope.size(0), H = q_nope.size(1), nope = q_nope.size(3), rope = q_pe.size(3);
  TORCH_CHECK(latent.dim() == 3 && latent.size(0) == B && latent.size(2) > rope && latent.stride(2) == 1 &&
                  latent.scalar_type() == q_nope.scalar_type(),
              "mla_attend: latent must be [B, L, rank + rope] in q's dtype, its last dim contiguous");
  const int64_t R = latent.size(2) - rope, L = latent.size(1);
  TORCH_CHECK(wkv_b.is_contiguous() && wkv_b.numel() == H * (nope + v_dim) * R &&
                  (wkv_b.scalar_type() == at::kFloat || wkv_b.scalar_type() == q_nope.scalar_type()),
              "mla_attend: wkv_b must be [H, nope + v, rank], float32 or q's dtype");
  const std::vector<int64_t> last = row_ends(positions, B, L, "mla_attend");
  const at::Tensor qn = q_nope.contiguous(), qr = q_pe.contiguous();
  at::Tensor out = at::empty({B, H, 1, v_dim}, q_nope.options());
  LLMCLI_DISPATCH_FLOATS(q_nope.scalar_type(), "mla_attend", [&] {
    const scalar_t* pe = qr.const_data_ptr<scalar_t>();
    auto rope_part = [&](int64_t bh, float* y) { widen(pe + bh * rope, y, rope); };
    auto range = [&](int64_t b) { return std::pair<int64_t, int64_t>{0, last[b]}; };
    auto run = [&](const auto* wp) {
      absorbed_attention<scalar_t>(B, H, R, rope, nope, v_dim, qn.const_data_ptr<scalar_t>(), nope, rope_part,
                                   latent.const_data_ptr<scalar_t>(), latent.stride(0), latent.stride(1), L, range, wp,
                                   scale, out.data_ptr<scalar_t>());
    };
    if (wkv_b.scalar_type() == at::kFloat) run(wkv_b.const_data_ptr<float>());
    else run(wkv_b.const_data_ptr<scalar_t>());
  });
  return out;
}

// The k largest of values[0..n) (those not -inf-masked out by `allowed`, when given), largest first; ties go to
// the lower index.
inline void top(const float* values, int64_t n, int64_t k, const bool* allowed, int64_t* chosen) {
  for (int64_t c = 0; c < k; ++c) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (allowed != nullptr && !allowed[i]) continue;
      bool taken = false;
      for (int64_t p = 0; p < c; ++p) taken = taken || chosen[p] == i;
      if (!taken && (best < 0 || values[i] > values[best])) best = i;
    }
    chosen[c] = best;
  }
}

// A DeepSeek MoE router for a few tokens, as llmcli's Router computes it: x [N, hidden] -> logits in float32
// (weight [E, hidden] float32), scores = sigmoid or softmax; the choice adds `bias` (noaux_tc) for choosing only;
// method 1 (group_limited_greedy) or 2 (noaux_tc) keeps the topk_group best of n_group groups (by their best
// score, or the sum of their two best), then the top_k experts among the kept; their scores, normalised to sum
// 1 (with normalise and top_k > 1), times scaling, ordered by weight. Returns (experts [N, k] int64, weights
// [N, k] float32, scores [N, E] float32, groups [N, topk_group] int64: empty for greedy routing).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t top_k,
    int64_t method, int64_t n_group, int64_t topk_group, bool sigmoid, bool normalise, double scaling) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.scalar_type() == at::kFloat && x.size(1) == weight.size(1),
              "route: x must be [N, hidden] and the weight [E, hidden] float32");
  const int64_t N = x.size(0), E = weight.size(0);
  const bool grouped = method != 0;
  TORCH_CHECK(top_k > 0 && top_k <= E && (!grouped || (n_group > 0 && E % n_group == 0 && topk_group > 0 &&
                                                       topk_group <= n_group && top_k <= topk_group * (E / n_group))),
              "route: top_k, n_group and topk_group do not fit ", E, " experts");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == E && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "route: bias must be [E] float32");
  const at::Tensor logits = at::linear(x.to(at::kFloat), weight);
  const at::Tensor scores = (sigmoid ? at::sigmoid(logits) : at::softmax(logits, -1)).contiguous();
  at::Tensor experts = at::empty({N, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({N, top_k}, x.options().dtype(at::kFloat));
  at::Tensor groups = at::empty({N, grouped ? topk_group : 0}, x.options().dtype(at::kLong));
  const float* sp = scores.const_data_ptr<float>();
  const float* bp = bias.has_value() && method == 2 ? bias->const_data_ptr<float>() : nullptr;
  const int64_t per_group = grouped ? E / n_group : E;
  std::vector<float> choice(E), group_score(std::max<int64_t>(n_group, 1)), chosen_weight(top_k);
  std::vector<int64_t> chosen(top_k), kept_groups(std::max<int64_t>(topk_group, 1)), two(2), order(top_k);
  std::vector<char> allowed(E, 1);
  for (int64_t t = 0; t < N; ++t) {
    const float* row = sp + t * E;
    for (int64_t e = 0; e < E; ++e) choice[e] = bp ? row[e] + bp[e] : row[e];
    if (grouped) {
      for (int64_t g = 0; g < n_group; ++g) {
        const float* in_group = choice.data() + g * per_group;
        if (method == 2) {
          top(in_group, per_group, 2, nullptr, two.data());
          group_score[g] = in_group[two[0]] + in_group[two[1]];
        } else {
          group_score[g] = *std::max_element(in_group, in_group + per_group);
        }
      }
      top(group_score.data(), n_group, topk_group, nullptr, kept_groups.data());
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int64_t i = 0; i < topk_group; ++i) {
        groups.data_ptr<int64_t>()[t * topk_group + i] = kept_groups[i];
        std::fill(allowed.begin() + kept_groups[i] * per_group, allowed.begin() + (kept_groups[i] + 1) * per_group, 1);
      }
    }
    top(choice.data(), E, top_k, grouped ? reinterpret_cast<const bool*>(allowed.data()) : nullptr, chosen.data());
    float total = 0.f;
    for (int64_t i = 0; i < top_k; ++i) total += (chosen_weight[i] = row[chosen[i]]);
    for (int64_t i = 0; i < top_k; ++i) {
      if (normalise && top_k > 1) chosen_weight[i] = chosen_weight[i] / (total + 1e-20f);
      chosen_weight[i] = chosen_weight[i] * static_cast<float>(scaling);
    }
    top(chosen_weight.data(), top_k, top_k, nullptr, order.data());
    for (int64_t i = 0; i < top_k; ++i) {
      experts.data_ptr<int64_t>()[t * top_k + i] = chosen[order[i]];
      weights.data_ptr<float>()[t * top_k + i] = chosen_weight[order[i]];
    }
  }
  return {experts, weights, scores, groups};
}

// SwiGLU through the integer products (int_dot.cpp, this unit), as one op for a decode step: down(silu(gate) * up)
// with [gate | up] = gate_up(x). Weights are int8 blocks with scales or int4 blocks with scales and mins (by
// gate_up's dtype), one matrix each, or stacks [E, ...] with experts [N, k] and weights [N, k] float32: each token
// x [N, hidden] runs through its k experts, mixed as sum_k weight * output in float32, rounded to x's dtype.
// silu and the product are torch's own ops; the mix is rounded as torch's ops round it.
at::Tensor int_swiglu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& gate_up_scales,
                      const at::Tensor& down, const at::Tensor& down_scales, const std::optional<at::Tensor>& experts,
                      const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(down.scalar_type() == gate_up.scalar_type(), "int_swiglu: gate_up and down must share a format");
  auto product = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& s,
                     const std::optional<at::Tensor>& ids) {
    return w.scalar_type() == at::kByte ? int4_dot(in, w, s, ids, std::nullopt) : int8_dot(in, w, s, ids, std::nullopt);
  };
  at::Tensor rows = x;
  std::optional<at::Tensor> ids;
  int64_t k = 1;
  if (experts.has_value()) {
    TORCH_CHECK(weights.has_value() && x.dim() == 2 && experts->dim() == 2 && experts->size(0) == x.size(0) &&
                    weights->sizes() == experts->sizes() && weights->scalar_type() == at::kFloat &&
                    weights->is_contiguous(), "int_swiglu: x [N, hidden] needs experts [N, k] and float32 weights [N, k]");
    k = experts->size(1);
    rows = x.unsqueeze(1).expand({x.size(0), k, x.size(1)});
    ids = experts->reshape({-1}).contiguous();
  }
  const at::Tensor both = product(rows, gate_up, gate_up_scales, ids);
  // torch's own silu and product: the model code's bits (its vectorised exp), where a scalar exp per value took
  // 46 us for 4864 values on one Zen 1 core
  const int64_t I = both.size(-1) / 2;
  const at::Tensor hidden = at::mul(at::silu(both.narrow(-1, 0, I)), both.narrow(-1, I, I));
  const at::Tensor out = product(hidden, down, down_scales, ids);
  if (!experts.has_value()) return out;
  const int64_t N = x.size(0), D = out.size(-1);
  at::Tensor mixed = at::empty({N, D}, x.options());
  LLMCLI_DISPATCH_FLOATS(out.scalar_type(), "int_swiglu", [&] {
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const float* wp = weights->const_data_ptr<float>();
    scalar_t* mp = mixed.data_ptr<scalar_t>();
    std::vector<float> total(D);
    for (int64_t n = 0; n < N; ++n) {
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t e = 0; e < k; ++e)  // in the order of the experts, as torch sums over that axis
        for (int64_t d = 0; d < D; ++d) total[d] += static_cast<float>(op[(n * k + e) * D + d]) * wp[n * k + e];
      for (int64_t d = 0; d < D; ++d) mp[n * D + d] = static_cast<scalar_t>(total[d]);
    }
  });
  return mixed;
}

}  // namespace

#ifndef LLMCLI_OPS_NAMESPACE
#define LLMCLI_OPS_NAMESPACE llmcli
#endif

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("zero_centred_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int position, "
        "int heads, int window, float scale) -> Tensor");
  m.def("mla_decode(Tensor q, Tensor kv, Tensor norm, float eps, Tensor cos, Tensor sin, Tensor(a!) cache, "
        "int position, Tensor wkv_b, int v_dim, float scale, bool interleaved) -> Tensor");
  m.def("mla_attend(Tensor q_nope, Tensor q_pe, Tensor latent, Tensor wkv_b, int v_dim, float scale, "
        "Tensor positions) -> Tensor");
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? positions=None, int window=0) "
        "-> Tensor");
  m.def("int_swiglu(Tensor x, Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales, "
        "Tensor? experts=None, Tensor? weights=None) -> Tensor");
  m.def("route(Tensor x, Tensor weight, Tensor? bias, int top_k, int method, int n_group, int topk_group, "
        "bool sigmoid, bool normalise, float scaling) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("zero_centred_rms_norm", &zero_centred_rms_norm);
  m.impl("decode_attention", &decode_attention);
  m.impl("mla_decode", &mla_decode);
  m.impl("one_query_attention", &one_query_attention);
  m.impl("mla_attend", &mla_attend);
  m.impl("route", &route);
  m.impl("int_swiglu", &int_swiglu);
}
