// One new token's attention over a long cache, for decode_attention (the query heads of a GQA group share their key
// and value rows) and mla_decode (every head shares the latent row). Included by decode_ops.cpp (it uses that file's
// dot_float and add_scaled).
//
// Head by head, a step read each cached row once per query head that uses it, converted it to float each time, and
// ran on one thread per head: at 4,001 keys the Qwen2.5-0.5B shape's attention took 654 us a layer (16 ms of a
// step), and the real DeepSeek-V3's latent attention 21 ms a layer. Here the heads that share a row go through it
// together (the row widened to float once, or read as bfloat16 pairs by AVX512-BF16), and the keys are split into
// chunks so that every thread works at batch 1 (flash-decoding): each chunk keeps, per head, its largest score, the
// sum of exp(score - largest) and the values' sums weighted by those exps, and the chunks are merged per head at the
// end. The softmax is the same; the order of the float32 sums changes, and with AVX512-BF16 a bfloat16 cache's
// values are summed with weights rounded to bfloat16 (values_in_pairs).

// A chunk's state per query head: the largest score, the sum of exps, and the unnormalised weighted values (Dv).
struct ChunkSums {
  float* largest;
  float* total;
  float* values;
};

// Row x (n values) widened to float32.
template <typename T>
inline void widen(const T* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(LLMCLI_INT_DOT_AVX2)
  if constexpr (kVectorType<T>)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load8(x + i));
#endif
  for (; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

#if defined(LLMCLI_INT_DOT_AVX2)
// Lane i of the result: the sum of a[i]'s 8 lanes (8 dot products finished in 9 steps, not 8 x 4 with their stores).
inline __m256 lane_sums8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) in 8 lanes, for x <= 0 (scores minus their largest): 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2,
// e^r by Cephes's degree-6 polynomial (within 2 ulp of expf); below -87 the result is about 1e-38 instead of 0,
// nothing beside the largest score's 1. glibc's scalar expf was a fifth of this file's time at 4,001 keys.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // a NaN score stays NaN (max takes its second operand then)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact to float
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), exponent));
}

// q (D floats) . each of 8 float rows [8, D] (D a multiple of 8), as one register.
inline __m256 dots8(const float* q, const float* rows, int64_t D) {
  __m256 acc[8];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + r * D + i), acc[r]);
  }
  return lane_sums8(acc);
}

// 8 keys' dot products times `scale` into scores[0, count) (the block's last keys may be past the chunk).
inline void put_scores(__m256 dots, float scale, int64_t count, float* scores) {
  alignas(32) float eight[8];
  _mm256_store_ps(eight, _mm256_mul_ps(dots, _mm256_set1_ps(scale)));
  std::copy(eight, eight + count, scores);
}

// How many keys ahead of the 8 it reads a chunk asks for rows (`ahead`, where the chunk has them). In a decode step
// the cache comes from memory (the layer's weights have pushed it out of the caches), and reading 8 rows side by
// side, a stride apart, left the hardware prefetcher behind: the op went through a cold bfloat16 cache at a third
// of the rate of a plain sum. The requests sit in the loops that read rows: gcc deletes a loop of prefetches alone.
constexpr int64_t kAheadKeys = 8;

// kAheadKeys where rows j + kAheadKeys .. + 8 of the chunk's n exist, else 0 (no requests).
inline int64_t ahead_of(int64_t j, int64_t n) { return j + kAheadKeys + 8 <= n ? kAheadKeys : 0; }

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define LLMCLI_ATTENTION_BF16_PAIRS 1
// q (D bfloat16 values) . each of 8 bfloat16 key rows (row r at k + r * stride, rows past `count` not read; D a
// multiple of 32) as one register: AVX512-BF16 multiplies pairs of bfloat16 values exactly and adds them in float32,
// 16 lanes at a time, reading the rows as they are cached (no widening; half the instructions of float FMAs).
// `ahead` > 0: the rows that far ahead are requested, line by line.
inline __m256 dots8_bf16(const c10::BFloat16* q, const c10::BFloat16* k, int64_t stride, int64_t count, int64_t D,
                         int64_t ahead) {
  const c10::BFloat16* row[8];
  for (int r = 0; r < 8; ++r) row[r] = k + std::min<int64_t>(r, count - 1) * stride;  // repeats: sums unused
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i);
    for (int r = 0; r < 8; ++r) {
      acc[r] = _mm512_dpbf16_ps(acc[r], qv, (__m512bh)_mm512_loadu_si512(row[r] + i));
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(row[r] + ahead * stride + i), _MM_HINT_T0);
    }
  }
  __m256 halves[8];
  for (int r = 0; r < 8; ++r)
    halves[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r]),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1)));
  return lane_sums8(halves);
}
#endif

#if defined(LLMCLI_ATTENTION_BF16_PAIRS)
// values [G, Dv] = sum_j e[g][j] * v_j over n bfloat16 value rows (row j at v + j * stride; Dv a multiple of 32),
// weights e = scores [G, n]: with AVX512-BF16's pair products, two keys a step, the weights rounded to bfloat16 (as
// transformers' eager attention rounds a bfloat16 model's probabilities before that product). Each 8 keys' rows are
// interleaved by pairs of keys once (`pairs`: 16 * Dv bytes), for every head; the sums are kept in the interleave's
// order of dims and put back in order at the end.
inline void values_in_pairs(const float* scores, int64_t G, int64_t n, const c10::BFloat16* v, int64_t stride,
                            int64_t Dv, float* values, void* pairs) {
  const std::vector<c10::BFloat16> zeros(Dv);
  __m512i* interleaved = static_cast<__m512i*>(pairs);  // [Dv / 32][4 pairs][lo, hi]
  std::fill(values, values + G * Dv, 0.f);
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t count = std::min<int64_t>(8, n - j);
    const c10::BFloat16* row[8];
    for (int64_t r = 0; r < 8; ++r) row[r] = r < count ? v + (j + r) * stride : zeros.data();
    const int64_t ahead = ahead_of(j, n) * stride;
    for (int64_t b = 0; b < Dv / 32; ++b)
      for (int p = 0; p < 4; ++p) {
        const __m512i first = _mm512_loadu_si512(row[2 * p] + 32 * b);
        const __m512i second = _mm512_loadu_si512(row[2 * p + 1] + 32 * b);
        if (ahead) {
          _mm_prefetch(reinterpret_cast<const char*>(row[2 * p] + ahead + 32 * b), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row[2 * p + 1] + ahead + 32 * b), _MM_HINT_T0);
        }
        _mm512_storeu_si512(interleaved + (b * 4 + p) * 2, _mm512_unpacklo_epi16(first, second));
        _mm512_storeu_si512(interleaved + (b * 4 + p) * 2 + 1, _mm512_unpackhi_epi16(first, second));
      }
    for (int64_t g = 0; g < G; ++g) {
      __m512bh weight[4];
      for (int p = 0; p < 4; ++p) {
        const int64_t a = j + 2 * p, c = a + 1;
        const uint32_t low = a < j + count ? c10::BFloat16(scores[g * n + a]).x : 0;
        const uint32_t high = c < j + count ? c10::BFloat16(scores[g * n + c]).x : 0;
        weight[p] = (__m512bh)_mm512_set1_epi32(static_cast<int>(low | (high << 16)));
      }
      float* y = values + g * Dv;
      for (int64_t b = 0; b < Dv / 32; ++b) {
        __m512 lo = _mm512_loadu_ps(y + 32 * b), hi = _mm512_loadu_ps(y + 32 * b + 16);
        for (int p = 0; p < 4; ++p) {
          lo = _mm512_dpbf16_ps(lo, weight[p], (__m512bh)_mm512_loadu_si512(interleaved + (b * 4 + p) * 2));
          hi = _mm512_dpbf16_ps(hi, weight[p], (__m512bh)_mm512_loadu_si512(interleaved + (b * 4 + p) * 2 + 1));
        }
        _mm512_storeu_ps(y + 32 * b, lo);
        _mm512_storeu_ps(y + 32 * b + 16, hi);
      }
    }
  }
  float block[32];
  for (int64_t g = 0; g < G; ++g)  // element 4k + i of `lo` is dim 8k + i of the 32, of `hi` dim 8k + 4 + i
    for (int64_t b = 0; b < Dv / 32; ++b) {
      float* y = values + g * Dv + 32 * b;
      for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 4; ++i) block[8 * k + i] = y[4 * k + i], block[8 * k + 4 + i] = y[16 + 4 * k + i];
      std::copy(block, block + 32, y);
    }
}
#endif

// y [D] += sum_r p[r] * rows[r] over 8 float rows [8, D] (D a multiple of 8).
inline void add_rows8(const float* p, const float* rows, int64_t D, float* y) {
  __m256 weight[8];
  for (int r = 0; r < 8; ++r) weight[r] = _mm256_set1_ps(p[r]);
  for (int64_t i = 0; i < D; i += 8) {
    __m256 acc = _mm256_loadu_ps(y + i);
    for (int r = 0; r < 8; ++r) acc = _mm256_fmadd_ps(weight[r], _mm256_loadu_ps(rows + r * D + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
}
#endif

// Keys [j, j + 8) of a chunk widened into rows [8, D] (rows past `count` zero): each read once for all G queries.
template <typename T>
inline void widen_rows(const T* x, int64_t stride, int64_t count, int64_t D, float* rows, int64_t ahead) {
  constexpr int64_t kLine = 64 / sizeof(T);  // values a cache line holds (D is a multiple of 8 here)
  for (int64_t r = 0; r < 8; ++r) {
    if (r >= count) {
      std::fill(rows + r * D, rows + (r + 1) * D, 0.f);
      continue;
    }
    const T* row = x + r * stride;
    for (int64_t i = 0; i < D; i += 8) {  // as `widen`, asking for the row `ahead` rows on
      if (ahead && i % kLine == 0) _mm_prefetch(reinterpret_cast<const char*>(row + ahead * stride + i), _MM_HINT_T0);
      _mm256_storeu_ps(rows + r * D + i, load8(row + i));
    }
  }
}

// The G float queries q [G, Dk] over keys [j0, j1): key j's row at k + j * k_stride (Dk values), its value at
// v + j * v_stride (Dv values). Scores are (q . key) * scale. `scratch`: G * (j1 - j0) + 8 * max(Dk, Dv) floats.
// q's values must be T's (the callers round them so): a bfloat16 cache's scores then take AVX512-BF16's pairs.
template <typename T>
void attend_chunk(const float* q, int64_t G, int64_t Dk, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                  int64_t Dv, int64_t j0, int64_t j1, float scale, const ChunkSums& out, float* scratch) {
  const int64_t n = j1 - j0;
  float* scores = scratch;  // [G, n]
  float* rows = scratch + G * n;
#if defined(LLMCLI_INT_DOT_AVX2)
  const bool blocked = Dk % 8 == 0 && Dv % 8 == 0;
#else
  const bool blocked = false;
#endif
  bool scored = false;
#if defined(LLMCLI_ATTENTION_BF16_PAIRS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (Dk % 32 == 0) {
      const std::vector<c10::BFloat16> pairs(q, q + G * Dk);  // exact: q holds bfloat16 values
      for (int64_t j = 0; j < n; j += 8) {
        const int64_t count = std::min<int64_t>(8, n - j);
        for (int64_t g = 0; g < G; ++g)  // the first head's pass asks for the rows ahead
          put_scores(dots8_bf16(pairs.data() + g * Dk, k + (j0 + j) * k_stride, k_stride, count, Dk,
                                g == 0 ? ahead_of(j, n) : 0),
                     scale, count, scores + g * n + j);
      }
      scored = true;
    }
  }
#endif
  for (int64_t j = 0; j < n && !scored; j += blocked ? 8 : 1) {
    if (!blocked) {
      widen(k + (j0 + j) * k_stride, rows, Dk);
      for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot_float(q + g * Dk, rows, Dk) * scale;
      continue;
    }
#if defined(LLMCLI_INT_DOT_AVX2)
    const int64_t count = std::min<int64_t>(8, n - j);
    widen_rows(k + (j0 + j) * k_stride, k_stride, count, Dk, rows, ahead_of(j, n));
    for (int64_t g = 0; g < G; ++g) put_scores(dots8(q + g * Dk, rows, Dk), scale, count, scores + g * n + j);
#endif
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * n;
    const float largest = *std::max_element(s, s + n);
    float total = 0.f;
    int64_t j = 0;
#if defined(LLMCLI_INT_DOT_AVX2)
    __m256 sums = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(largest)));
      _mm256_storeu_ps(s + j, e);
      sums = _mm256_add_ps(sums, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sums);
    for (const float lane : lanes) total += lane;
#endif
    for (; j < n; ++j) total += (s[j] = std::exp(s[j] - largest));
    out.largest[g] = largest;
    out.total[g] = total;
  }
#if defined(LLMCLI_ATTENTION_BF16_PAIRS)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (Dv % 32 == 0) {  // `rows` holds 32 * max(Dk, Dv) bytes: twice what the interleaved pairs take
      values_in_pairs(scores, G, n, v + j0 * v_stride, v_stride, Dv, out.values, rows);
      return;
    }
  }
#endif
  std::fill(out.values, out.values + G * Dv, 0.f);
  for (int64_t j = 0; j < n; j += blocked ? 8 : 1) {
    if (!blocked) {
      widen(v + (j0 + j) * v_stride, rows, Dv);
      for (int64_t g = 0; g < G; ++g) add_scaled(scores[g * n + j], rows, out.values + g * Dv, Dv);
      continue;
    }
#if defined(LLMCLI_INT_DOT_AVX2)
    const int64_t count = std::min<int64_t>(8, n - j);
    widen_rows(v + (j0 + j) * v_stride, v_stride, count, Dv, rows, ahead_of(j, n));
    float weights[8] = {};
    for (int64_t g = 0; g < G; ++g) {
      std::copy(scores + g * n + j, scores + g * n + j + count, weights);
      add_rows8(weights, rows, Dv, out.values + g * Dv);
    }
#endif
  }
}

// How to split `keys` keys for `streams` independent (sequence, head group) streams: (chunks, keys per chunk). Enough
// chunks that every thread has two to take, none under kMinChunkKeys keys; one chunk where the work is too small to
// share (a few thousand products).
constexpr int64_t kMinChunkKeys = 32;
inline std::pair<int64_t, int64_t> key_chunks(int64_t keys, int64_t streams, int64_t work_per_key) {
  int64_t chunks = 1;
  if (keys * work_per_key * streams >= 32768) {
    const int64_t wanted = (2 * at::get_num_threads() + streams - 1) / streams;
    chunks = std::max<int64_t>(1, std::min(wanted, keys / kMinChunkKeys));
  }
  const int64_t per_chunk = (keys + chunks - 1) / chunks;
  return {(keys + per_chunk - 1) / per_chunk, per_chunk};
}

// Every stream's chunks, in parallel, then merged: out(s, g) [Dv] = the softmax-weighted values of query g of stream
// s over its keys [first, first + keys) (`range(s)`: (first, keys), keys >= 1, at most `most` keys). `chunk(s, j0, j1,
// sums, scratch)` runs attend_chunk for stream s; `store(s, g, values)` takes the merged row. A stream with fewer keys
// than others leaves its last chunks empty.
template <typename Range, typename Chunk, typename Store>
void attend_in_ranges(int64_t streams, int64_t G, int64_t Dk, int64_t Dv, int64_t most, Range range, Chunk chunk,
                      Store store) {
  const auto [chunks, per_chunk] = key_chunks(most, streams, G * (Dk + Dv));
  const int64_t tasks = streams * chunks;
  std::vector<float> largest(tasks * G), total(tasks * G), values(tasks * G * Dv);  // zeros: an empty chunk's sums
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(G * per_chunk + 8 * std::max(Dk, Dv));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / chunks;
      const auto [first, keys] = range(s);
      const int64_t j0 = first + (t % chunks) * per_chunk, j1 = std::min(first + keys, j0 + per_chunk);
      if (j0 >= j1) {
        std::fill(largest.begin() + t * G, largest.begin() + (t + 1) * G, -std::numeric_limits<float>::infinity());
        continue;
      }
      const ChunkSums sums{largest.data() + t * G, total.data() + t * G, values.data() + t * G * Dv};
      chunk(s, j0, j1, sums, scratch.data());
    }
  });
  std::vector<float> merged(Dv);
  for (int64_t s = 0; s < streams; ++s)
    for (int64_t g = 0; g < G; ++g) {
      float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, largest[(s * chunks + c) * G + g]);
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t at = (s * chunks + c) * G + g;
        const float weight = std::exp(largest[at] - top);
        sum += total[at] * weight;
        add_scaled(weight, values.data() + at * Dv, merged.data(), Dv);
      }
      for (float& x : merged) x /= sum;
      store(s, g, merged.data());
    }
}

// A static step's positions (int64: one per row of B, or one for all) as the keys each row sees, position + 1,
// each within 1..n (`op` names the caller in errors).
inline std::vector<int64_t> row_ends(const at::Tensor& positions, int64_t B, int64_t n, const char* op) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && (positions.numel() == B || positions.numel() == 1), op,
              ": positions must be int64, one per row or one for all");
  const at::Tensor p = positions.reshape({-1}).contiguous();
  const int64_t* at = p.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(B);
  for (int64_t b = 0; b < B; ++b) {
    ends[b] = at[p.numel() == 1 ? 0 : b] + 1;
    TORCH_CHECK(ends[b] >= 1 && ends[b] <= n, op, ": a row's position ", ends[b] - 1, " is outside 0..", n - 1);
  }
  return ends;
}

// attend_in_ranges where every stream sees keys [first, first + keys).
template <typename Chunk, typename Store>
void attend_in_chunks(int64_t streams, int64_t G, int64_t Dk, int64_t Dv, int64_t first, int64_t keys, Chunk chunk,
                      Store store) {
  attend_in_ranges(streams, G, Dk, Dv, keys, [&](int64_t) { return std::pair<int64_t, int64_t>{first, keys}; }, chunk,
                   store);
}

// One new token's attention where the model's own code has already rotated the query and written the cache (the
// models' `one_query_attention_eager`: partial RoPE, the hybrids' gated attention; and the server's static steps):
// q [B, H, 1, Dk]; k [B, KV, n, Dk] and v [B, KV, n, Dv], views of a cache with any strides but a last of 1 (query
// head h uses kv head h / (H / KV)); row b sees keys [max(0, e - window), e) (window 0: from 0) with e = n, or with
// `positions` (a static step: the rows at their own positions, see row_ends) e = positions[b] + 1. Scores
// (q . k) * scale in float32, softmaxed, the values' weighted sum rounded to the dtype: [B, H, 1, Dv] (a bfloat16
// cache with AVX512-BF16: the weights rounded to bfloat16 for that sum, as in decode_attention). The eager path's
// float32 products took 17 ms a layer of Qwen-7B's heads at 4,001 keys, widening the whole cache to float32 first.
at::Tensor one_query_attention(const at::Tensor& query, const at::Tensor& k, const at::Tensor& v, double scale,
                               const std::optional<at::Tensor>& positions, int64_t window) {
  TORCH_CHECK(query.device().is_cpu() && query.dim() == 4 && query.size(2) == 1,
              "one_query_attention: q must be [B, H, 1, D]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == query.size(0) && v.size(0) == query.size(0) &&
                  k.size(1) > 0 && v.size(1) == k.size(1) && query.size(1) % k.size(1) == 0 &&
                  v.size(2) == k.size(2) && k.size(2) > 0 && k.size(3) == query.size(3),
              "one_query_attention: k and v must be [B, KV, n, D] with n > 0 and KV dividing q's heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == query.scalar_type() &&
                  v.scalar_type() == query.scalar_type(),
              "one_query_attention: k and v must be in q's dtype with their last dim contiguous");
  const at::Tensor q = query.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(3), KV = k.size(1), n = k.size(2), Dv = v.size(3);
  const int64_t G = H / KV;
  // row b sees keys [max(0, last[b] - window), last[b])
  const std::vector<int64_t> last =
      positions.has_value() ? row_ends(*positions, B, n, "one_query_attention") : std::vector<int64_t>(B, n);
  TORCH_CHECK(window >= 0, "one_query_attention: window must be >= 0 (0: none)");
  at::Tensor out = at::empty({B, H, 1, Dv}, q.options());
  LLMCLI_DISPATCH_FLOATS(q.scalar_type(), "one_query_attention", [&] {
    std::vector<float> queries(B * H * Dk);  // exact: the dtype's values widened
    widen(q.const_data_ptr<scalar_t>(), queries.data(), B * H * Dk);
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto chunk = [&](int64_t s, int64_t j0, int64_t j1, const ChunkSums& sums, float* scratch) {  // s: b * KV + kvh
      const int64_t b = s / KV, h = s % KV;
      attend_chunk(queries.data() + s * G * Dk, G, Dk, kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                   vp + b * v.stride(0) + h * v.stride(1), v.stride(2), Dv, j0, j1, static_cast<float>(scale), sums,
                   scratch);
    };
    auto store = [&](int64_t s, int64_t g, const float* values) {
      scalar_t* o = op + (s * G + g) * Dv;
      for (int64_t i = 0; i < Dv; ++i) o[i] = static_cast<scalar_t>(values[i]);
    };
    auto range = [&](int64_t s) {  // stream s: kv head s % KV of row s / KV
      const int64_t end = last[s / KV], first = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      return std::pair<int64_t, int64_t>{first, end - first};
    };
    attend_in_ranges(B * KV, G, Dk, Dv, n, range, chunk, store);
  });
  return out;
}
