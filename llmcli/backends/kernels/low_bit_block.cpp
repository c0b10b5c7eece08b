// The low-bit weight layouts of llmcli's integer dot products and their block kernel: int4 (GGUF's Q4 codes), int5
// (Q5 codes, --quantize int5), int8 with a scale per 32 (Q8_0) and Q6_K's 6 bits with a scale per 16, each times
// activations quantised to int8 per 32. Included by int_dot.cpp inside its namespace (it uses that file's QuantRow,
// kRows, kGroup and prefetch_ahead; int4_dot there dispatches on the layout).
//
// Every layout holds its codes rows in lanes: unpacked, a group's 8 registers k = 0..7 hold inputs 4k..4k+3 of the
// block's rows 0..7, 4 bytes a row in row order. A product with those 4 inputs broadcast (vpdpbusd, or maddubs and
// madd) adds each row's 4 products into its own int32 lane, and the lanes are the 8 rows' sums: no horizontal adds.
// Pairs of rows per register (before) cost 3 horizontal adds per row and group, 6 for Q6_K's two scales; with rows
// in lanes 16-128-row products take 0.66-0.92x the time for int4, int5 and Q8_0 and 0.61-0.66x for Q6_K (Zen 4,
// VNNI), the same bits.
// The nibble layouts (int4, int5, 6 bits) keep the bytes of their earlier pairs of stored rows (A = 2j, B = 2j + 1,
// 16 bytes each): register j unpacks from the 32 bytes at 32j, low nibbles, and register j + 4 from their high
// nibbles, with their high bits where the comments below say. The packers (int_dot.py, _in_lanes) place the codes so
// that those positions hold rows in lanes (lane_place); the 6-bit head (int6_dot.cpp) keeps pairs of rows and reads
// them with int6_codes.

// int5 weights (q in 0..31; GGUF's Q5_0, Q5_1 and Q5_K codes as stored, or --quantize int5) keep int4's nibbles
// and scales and add the high bits: 160 bytes per block of 8 rows and group of 32 inputs, the 128 of int4's nibbles
// then four units of 8 bytes, one per pair of stored rows (A = 2u, B = 2u + 1). Unit byte b holds the high bits of
// the codes at A's bytes b and b + 8, then B's, in the low nibbles at bits 0-3 and in the high nibbles at bits 4-7.
// Broadcast to the four 64-bit lanes of a register and shifted left by 4, 3, 2, 1 (bits 4-7: shifted right by 4
// first), bit 4 of each byte is then the high bit of the nibble int4's registers hold there: OR 0x10 in, one shift
// and two logic steps per register. 6 bits a weight with a float16 scale and min per 32, against int8's 8.5.
constexpr int64_t kInt5Bytes = 160;

// int8 weights with a scale per 32 inputs (GGUF's Q8_0 codes as stored: w = q * d, q in -128..127) are kept as
// u = q + 128 (0..255), w = u * scale + min with min = -128 * scale, so they share the low-bit blocks' scales and
// arithmetic: 256 bytes per block of 8 rows and group of 32 inputs, register k's 32 bytes at 32k (byte 4r + i: row
// r's input 4k + i). VNNI multiplies u by x in int32 as they are. maddubs's int16 pair sums would overflow
// (2 * 255 * 127), so AVX2 without VNNI multiplies u's two nibbles separately and joins them in int32, exactly.
constexpr int64_t kInt8Bytes = 256;

// 6-bit weights (int6_dot.cpp's bytes: 192 per block and group of 32 inputs, 128 of nibbles, then the high two bits
// in a unit of 16 bytes per pair of stored rows; int6_pair unpacks a pair's 32 byte positions into two registers).
constexpr int64_t kInt6Bytes = 192;

// In the int4 op, 6-bit weights are GGUF's Q6_K as stored: w = (q - 32) * d * sub, an int8 sub-scale per 16 inputs
// and a float16 d per 256, as the file keeps them: per block and group of 32 the 192 bytes of codes, then 16 of
// sub-scales (rows 0..7 for inputs 0-15, then for 16-31); sm [K/256][1][8] holds d. 6.5625 bits a weight, and the
// file's matrix exactly (d x sub is exact in float32). With a float16 scale per 16 instead (d x sub rounded: 2^-11)
// it was 7 bits.
constexpr int64_t kQ6KBytes = kInt6Bytes + 16;
constexpr int64_t kQ6KGroups = 8;  // groups of 32 per d (Q6_K's blocks of 256)

// The two high bits of input t (0..31) of stored row i, from a block's 64 bytes of them.
inline int int6_high(const uint8_t* highs, int64_t i, int64_t t) {
  const int shift = (t >= 16 ? 2 : 0) + 4 * static_cast<int>(i % 2);
  return (highs[(i / 2) * 16 + t % 16] >> shift) & 3;
}

#if defined(LLMCLI_INT_DOT_AVX2)
// Stored rows 2j and 2j + 1 of a 6-bit group (w: its 192 bytes) as int4's register pair holds them, the high bits
// in: inputs 0-15 (lo) and 16-31 (hi). One unit broadcast to both 128-bit lanes, shifted per 64-bit lane (row A's,
// in lane 0, sit 4 below row B's) and masked. The 6-bit head (int6_dot.cpp) unpacks the same way.
inline void int6_pair(const uint8_t* w, int j, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  const __m256i lift = _mm256_setr_epi64x(4, 4, 0, 0);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 32));
  const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 128 + j * 16)));
  lo = _mm256_or_si256(_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_sllv_epi64(h, lift), top));
  hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                       _mm256_and_si256(_mm256_sllv_epi64(_mm256_srli_epi64(h, 2), lift), top));
}
#endif

// Bytes per block of 8 rows and group of 32 inputs for B bits a weight.
template <int B>
constexpr int64_t kGroupBytes = B == 4 ? kRows * 16 : B == 5 ? kInt5Bytes : B == 6 ? kQ6KBytes : kInt8Bytes;

// The offset a stored minimum stands for when sm holds scales alone (S = 1): Q4_0's w = (q - 8) * scale, Q5_0's
// (q - 16) * scale, Q6_K's (q - 32) * scale, Q8_0's (u - 128) * scale.
template <int B>
constexpr float kSymmetricOffset = B == 4 ? 8.f : B == 5 ? 16.f : B == 6 ? 32.f : 128.f;

// Where group g's scales start in a block's sm: S terms of 8 rows per group, or Q6_K's d per 8 groups.
template <int S, int B>
inline const c10::Half* group_scales(const c10::Half* sm, int64_t g) {
  return B == 6 ? sm + (g / kQ6KGroups) * kRows : sm + g * S * kRows;
}

// w = q * scale + min for row r of a group (wg: its bytes, sg: group_scales) and its inputs 0-15 (half 0) or 16-31
// (half 1): the scale from sm (Q6_K: d x the half's sub-scale, exact in float32), the minimum stored (S = 2) or
// -offset * scale (S = 1).
struct RowTerms {
  float scale, min;
};
template <int S, int B>
inline RowTerms row_terms(const uint8_t* wg, const c10::Half* sg, int64_t r, int half) {
  const float scale = B == 6 ? static_cast<float>(sg[r]) * static_cast<int8_t>(wg[kInt6Bytes + 8 * half + r])
                             : static_cast<float>(sg[r]);
  return {scale, S == 2 ? static_cast<float>(sg[kRows + r]) : -kSymmetricOffset<B> * scale};
}

// Stored row i's 32 codes of one 6-bit group in the 6-bit head's order (int6_dot.cpp): its byte j holds inputs j and
// j + 16.
inline void int6_codes(const uint8_t* wg, int64_t i, int* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = (wg[i * 16 + j] & 0x0F) | (int6_high(wg + 128, i, j) << 4);
    q[j + 16] = (wg[i * 16 + j] >> 4) | (int6_high(wg + 128, i, j + 16) << 4);
  }
}

// Where block row r's inputs t and 16 + t (t < 16) sit in every layout but int8's: the byte of stored row s
// (pair s / 2's register, 16 bytes a row) that unpacks to register position 4r + t % 4 of pair t / 4 (rows in lanes).
struct LanePlace {
  int64_t s, b;  // stored row, and its byte
};
inline LanePlace lane_place(int64_t r, int t) {
  const int64_t at = 4 * r + t % 4;
  return {2 * (t / 4) + at / 16, at % 16};
}

// Block row r's 32 codes of one group (wg: the group's bytes, B bits) in plain C++: the portable kernel and the
// unblocking read them.
template <int B>
inline void low_bit_codes(const uint8_t* wg, int64_t r, int* q) {
  if constexpr (B == 8) {  // register k, inputs 4k..4k+3: byte 32k + 4r + input % 4
    for (int t = 0; t < kGroup; ++t) q[t] = wg[32 * (t / 4) + 4 * r + t % 4];
    return;
  }
  for (int t = 0; t < 16; ++t) {
    const LanePlace at = lane_place(r, t);
    const uint8_t nibbles = wg[at.s * 16 + at.b];
    q[t] = nibbles & 0x0F;
    q[t + 16] = nibbles >> 4;
    if constexpr (B == 6) {
      q[t] |= int6_high(wg + 128, at.s, at.b) << 4;
      q[t + 16] |= int6_high(wg + 128, at.s, at.b + 16) << 4;
    }
    if constexpr (B == 5) {  // unit byte b % 8 of the pair, row B's bits 2 above row A's: inputs b, 16 + b at bits
      const int bits = wg[128 + (at.s / 2) * 8 + at.b % 8] >> (2 * (at.s % 2));  // b / 8 and 4 + b / 8
      q[t] |= ((bits >> (at.b / 8)) & 1) << 4;
      q[t + 16] |= ((bits >> (4 + at.b / 8)) & 1) << 4;
    }
  }
}

#if defined(LLMCLI_INT_DOT_AVX2)
// One group's codes (w: its bytes, B bits) unpacked: codes[k] holds inputs 4k..4k+3 of block rows 0..7, 4 bytes a row.
template <int B>
inline void unpack_group(const uint8_t* w, __m256i* codes) {
  if constexpr (B == 8) {
    for (int k = 0; k < 8; ++k) codes[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32));
  } else if constexpr (B == 6) {
    for (int j = 0; j < 4; ++j) int6_pair(w, j, codes[j], codes[j + 4]);
  } else {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    [[maybe_unused]] const __m256i lift = _mm256_setr_epi64x(4, 3, 2, 1), bit4 = _mm256_set1_epi8(0x10);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 32));
      codes[j] = _mm256_and_si256(v, nibble);
      codes[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      if constexpr (B == 5) {
        const __m256i h = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 128 + j * 8)));
        codes[j] = _mm256_or_si256(codes[j], _mm256_and_si256(_mm256_sllv_epi64(h, lift), bit4));
        codes[j + 4] =
            _mm256_or_si256(codes[j + 4], _mm256_and_si256(_mm256_sllv_epi64(_mm256_srli_epi64(h, 4), lift), bit4));
      }
    }
  }
}

// Inputs xq[at..at+3] in every int32 lane.
inline __m256i four_inputs(const int8_t* xq, int at) {
  int32_t four;
  std::memcpy(&four, xq + at, 4);
  return _mm256_set1_epi32(four);
}

// Rows in lanes: each int32 lane one block row's sum over codes[k] x inputs 4k..4k+3, k in [first, first + count).
template <int B>
inline __m256i lane_dots(const __m256i* codes, const int8_t* xq, int first, int count) {
#if defined(LLMCLI_INT_DOT_VNNI)  // two chains, so that the products' latency overlaps
  __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
  for (int k = first; k < first + count; k += 2) {
    even = LLMCLI_DPBUSD(even, codes[k], four_inputs(xq, 4 * k));
    odd = LLMCLI_DPBUSD(odd, codes[k + 1], four_inputs(xq, 4 * k + 4));
  }
  return _mm256_add_epi32(even, odd);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (B == 8) {  // u = its low nibble + 16 * its high one: maddubs's pair sums of u would overflow int16
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i low = _mm256_setzero_si256(), high = _mm256_setzero_si256();  // <= 8 * 2 * 15 * 127: int16
    for (int k = first; k < first + count; ++k) {
      const __m256i xs = four_inputs(xq, 4 * k);
      low = _mm256_add_epi16(low, _mm256_maddubs_epi16(_mm256_and_si256(codes[k], nibble), xs));
      high = _mm256_add_epi16(high, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(codes[k], 4), nibble), xs));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(high, _mm256_set1_epi16(16)));
  }
  // maddubs's pair sums added in int16 while they fit (2 * 15 * 127 each for int4: 8 fit; int5: 4; 6 bits: 2)
  constexpr int in_int16 = B == 4 ? 8 : B == 5 ? 4 : 2;
  __m256i sums = _mm256_setzero_si256();
  for (int k0 = first; k0 < first + count; k0 += in_int16) {
    __m256i pairs = _mm256_setzero_si256();
    for (int k = k0; k < std::min(k0 + in_int16, first + count); ++k)
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(codes[k], four_inputs(xq, 4 * k)));
    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, ones));
  }
  return sums;
#endif
}
#endif

// sums[m][r] = sum_k x_m[k] * w[r][k] for R rows of activations and the 8 rows of one block: int4 (w [K/32][8][16]
// bytes), int5 ([K/32][160]), Q6_K ([K/32][208], S = 1, sm [K/256][1][8]: d) or int8 per 32 ([K/32][256]), sm
// [K/32][S][8]. The codes sit rows in lanes, so a group's products need no horizontal sums. The
// rows share each group's unpacked weights and scales (prompts: R = 4 or 8, about twice the rate of one row at a
// time); each row's arithmetic is the one-row order, so results do not depend on R.
template <int R, int S, int B>
inline void low_bit_block(const QuantRow* x, const uint8_t* w, const c10::Half* sm, int64_t K, float (*sums)[kRows]) {
  constexpr int64_t group_bytes = kGroupBytes<B>;
#if defined(LLMCLI_INT_DOT_AVX2)
  __m256 acc[R];
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g, w += group_bytes) {
    const c10::Half* sg = group_scales<S, B>(sm, g);
    prefetch_ahead(w, kPrefetchBytes, (group_bytes + 63) / 64);  // the group's weights, and its scales (16 * S bytes)
    prefetch_ahead(sg, kPrefetchBytes * S * 16 / group_bytes, 1);
    __m256i codes[8];
    unpack_group<B>(w, codes);
    __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
    [[maybe_unused]] __m256 low =
        S == 2 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + kRows))) : scale;
    if constexpr (B == 6) {  // d x the sub-scales of inputs 0-15 (scale) and 16-31 (low), exact in float32
      const __m128i subs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kInt6Bytes));
      low = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(subs, 8))));
      scale = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(subs)));
    }
    for (int m = 0; m < R; ++m) {
      const int8_t* xq = x[m].q + g * kGroup;
      const __m256 dx = _mm256_set1_ps(x[m].d[g]);
      if constexpr (B == 6) {  // inputs 0-15 and 16-31 apart (their scales differ): (q - 32) * scale per half
        const __m256 first = _mm256_cvtepi32_ps(lane_dots<B>(codes, xq, 0, 4));
        const __m256 second = _mm256_cvtepi32_ps(lane_dots<B>(codes, xq, 4, 4));
        const float half = x[m].dhalf[g], rest = x[m].dsum[g] - half;
        acc[m] = _mm256_fmadd_ps(_mm256_fmadd_ps(first, dx, _mm256_set1_ps(-kSymmetricOffset<B> * half)), scale,
                                 acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_fmadd_ps(second, dx, _mm256_set1_ps(-kSymmetricOffset<B> * rest)), low,
                                 acc[m]);
        continue;
      }
      const __m256 dots = _mm256_cvtepi32_ps(lane_dots<B>(codes, xq, 0, 8));
      if constexpr (S == 2) {
        acc[m] = _mm256_fmadd_ps(dots, _mm256_mul_ps(scale, dx), acc[m]);
        acc[m] = _mm256_fmadd_ps(low, _mm256_set1_ps(x[m].dsum[g]), acc[m]);
      } else {  // scale * (d_x * dots - offset * dsum): one step fewer than with a stored min
        const __m256 shifted = _mm256_fmadd_ps(dots, dx, _mm256_set1_ps(-kSymmetricOffset<B> * x[m].dsum[g]));
        acc[m] = _mm256_fmadd_ps(shifted, scale, acc[m]);
      }
    }
  }
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(sums[m], acc[m]);
#else
  for (int m = 0; m < R; ++m) {
    const uint8_t* wg = w;
    for (int64_t r = 0; r < kRows; ++r) sums[m][r] = 0.f;
    for (int64_t g = 0; g < K / kGroup; ++g, wg += group_bytes)
      for (int64_t r = 0; r < kRows; ++r) {
        const c10::Half* sg = group_scales<S, B>(sm, g);
        const int8_t* xq = x[m].q + g * kGroup;
        int q[kGroup];
        low_bit_codes<B>(wg, r, q);
        if constexpr (B == 6) {  // a scale per 16 inputs: d x the sub-scale of 0-15, then of 16-31
          int32_t first = 0, second = 0;
          for (int64_t t = 0; t < 16; ++t) first += q[t] * int32_t(xq[t]), second += q[t + 16] * int32_t(xq[t + 16]);
          const float half = x[m].dhalf[g], rest = x[m].dsum[g] - half;
          const float offset = kSymmetricOffset<B>, d = x[m].d[g];
          sums[m][r] += (static_cast<float>(first) * d - offset * half) * row_terms<S, B>(wg, sg, r, 0).scale +
                        (static_cast<float>(second) * d - offset * rest) * row_terms<S, B>(wg, sg, r, 1).scale;
          continue;
        }
        int32_t s = 0;
        for (int64_t t = 0; t < kGroup; ++t) s += q[t] * int32_t(xq[t]);
        const RowTerms terms = row_terms<S, B>(wg, sg, r, 0);
        sums[m][r] += static_cast<float>(s) * (terms.scale * x[m].d[g]) + terms.min * x[m].dsum[g];
      }
  }
#endif
}
