// The low-bit weight layouts of llmcli's integer dot products and their block kernel: int4 (GGUF's Q4 codes), int5
// (Q5 codes, --quantize int5), int8 with a scale per 32 (Q8_0) and 6 bits with a scale per 16 (Q6_K), each times
// activations quantised to int8 per 32. Included by int_dot.cpp inside its namespace (it uses that file's QuantRow,
// kRows, kGroup, kInt4Order and prefetch_ahead; int4_dot there dispatches on the layout).

// int5 weights (q in 0..31; GGUF's Q5_0, Q5_1 and Q5_K codes as stored, or --quantize int5) keep int4's nibbles
// and scales and add the high bits: 160 bytes per block of 8 rows and group of 32 inputs, the 128 of int4's nibbles
// then four units of 8 bytes, one per pair of stored rows (A = 2u, B = 2u + 1). Unit byte b holds the high bits of
// A's q[b], A's q[b + 8], B's q[b], B's q[b + 8] at bits 0-3 and of the same four plus 16 at bits 4-7. Broadcast to
// the four 64-bit lanes of a register and shifted left by 4, 3, 2, 1 (bits 4-7: shifted right by 4 first), bit 4
// of each byte is then the high bit of the nibble int4's register pair holds there: OR 0x10 in, one shift and two
// logic steps per register. 6 bits a weight with a float16 scale and min per 32, against int8's 8.5.
constexpr int64_t kInt5Bytes = 160;

// int8 weights with a scale per 32 inputs (GGUF's Q8_0 codes as stored: w = q * d, q in -128..127) are kept as
// u = q + 128 (0..255), w = u * scale + min with min = -128 * scale, so they share the low-bit blocks' scales and
// arithmetic: 256 bytes per block of 8 rows and group of 32 inputs, per pair of stored rows (A = 2u, B = 2u + 1)
// 64 bytes: A's inputs 0-15, B's 0-15, A's 16-31, B's 16-31, which load as the two registers int4's unpacking makes.
// VNNI multiplies u by x in int32 as they are. maddubs's int16 pair sums would overflow (2 * 255 * 127), so AVX2
// without VNNI multiplies u's two nibbles separately and joins them in int32, exactly.
constexpr int64_t kInt8Bytes = 256;

// 6-bit weights (int6_dot.cpp's layout: 192 bytes per block and group of 32 inputs, the nibbles as int4 stores them,
// then the high two bits in a unit of 16 bytes per pair of stored rows). In the int4 op they are GGUF's Q6_K codes as
// stored: w = (q - 32) * scale with a float16 scale per 16 inputs (Q6_K's d x its 8-bit sub-scale), sm [K/32][2][8]
// holding the scales of inputs 0-15, then of 16-31: 7 bits a weight, exactly the file's matrix but for the float16
// rounding of d x sub-scale (2^-11, as Q4_K's).
constexpr int64_t kInt6Bytes = 192;

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
constexpr int64_t kGroupBytes = B == 4 ? kRows * 16 : B == 5 ? kInt5Bytes : B == 6 ? kInt6Bytes : kInt8Bytes;

// The offset a stored minimum stands for when sm holds scales alone (S = 1): Q4_0's w = (q - 8) * scale, Q5_0's
// (q - 16) * scale, Q8_0's (u - 128) * scale.
template <int B>
constexpr float kSymmetricOffset = B == 4 ? 8.f : B == 5 ? 16.f : B == 6 ? 32.f : 128.f;

// The minimum of a group's row r, from sm: stored (S = 2) or -offset * scale (S = 1).
template <int S, int B>
inline float low_bit_min(const c10::Half* sm, int64_t r) {
  return S == 2 ? static_cast<float>(sm[kRows + r]) : -kSymmetricOffset<B> * static_cast<float>(sm[r]);
}

// Stored row i's 32 codes of one group (wg: the group's bytes, B bits) in plain C++: the portable kernel and the
// unblocking read them. For int5, bit t of the row's 32 high bits is input t's, gathered from its pair's unit.
template <int B>
inline void low_bit_codes(const uint8_t* wg, int64_t i, int* q) {
  if constexpr (B == 8) {
    const uint8_t* row = wg + (i / 2) * 64 + (i % 2) * 16;
    for (int j = 0; j < 16; ++j) q[j] = row[j], q[j + 16] = row[32 + j];
    return;
  }
  if constexpr (B == 6) {
    for (int j = 0; j < 16; ++j) {
      q[j] = (wg[i * 16 + j] & 0x0F) | (int6_high(wg + 128, i, j) << 4);
      q[j + 16] = (wg[i * 16 + j] >> 4) | (int6_high(wg + 128, i, j + 16) << 4);
    }
    return;
  }
  uint32_t high = 0;
  if constexpr (B == 5) {
    const uint8_t* unit = wg + 128 + (i / 2) * 8;
    const int shift = 2 * static_cast<int>(i % 2);  // row B's bits sit 2 above row A's
    for (int byte = 0; byte < 8; ++byte) {
      const uint32_t bits = unit[byte] >> shift;  // bits 0, 1, 4, 5: inputs byte, byte + 8, byte + 16, byte + 24
      high |= ((bits & 1) << byte) | (((bits >> 1) & 1) << (byte + 8)) | (((bits >> 4) & 1) << (byte + 16)) |
              (((bits >> 5) & 1) << (byte + 24));
    }
  }
  const uint8_t* nibbles = wg + i * 16;
  for (int j = 0; j < 16; ++j) {
    q[j] = (nibbles[j] & 0x0F) | static_cast<int>(((high >> j) & 1) << 4);
    q[j + 16] = (nibbles[j] >> 4) | static_cast<int>(((high >> (j + 16)) & 1) << 4);
  }
}

// sums[m][r] = sum_k x_m[k] * w[r][k] for R rows of activations and the 8 rows of one block: int4 (w [K/32][8][16]
// bytes), int5 ([K/32][160]), 6 bits ([K/32][192], S = 2: the scales of inputs 0-15 and 16-31) or int8 per 32
// ([K/32][256]), sm [K/32][S][8]. The rows share each group's unpacked weights and scales (prompts: R = 4, about
// twice the rate of one row at a time); each row's arithmetic is the one-row order, so results do not depend on R.
template <int R, int S, int B>
inline void low_bit_block(const QuantRow* x, const uint8_t* w, const c10::Half* sm, int64_t K, float (*sums)[kRows]) {
  constexpr int64_t group_bytes = kGroupBytes<B>;
#if defined(LLMCLI_INT_DOT_AVX2)
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // AVX2 only: VNNI widens in its dot product
  [[maybe_unused]] const __m256i lift = _mm256_setr_epi64x(4, 3, 2, 1), bit4 = _mm256_set1_epi8(0x10);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g, w += group_bytes, sm += S * kRows) {
    prefetch_ahead(w, kPrefetchBytes, (group_bytes + 63) / 64);  // the group's weights, and its scales (16 * S bytes)
    prefetch_ahead(sm, kPrefetchBytes * S * 16 / group_bytes, 1);
    __m256i q0[4], q1[4];
    for (int j = 0; j < 4 && B == 8; ++j) {  // stored rows 2j, 2j+1: inputs 0-15, then 16-31
      q0[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64));
      q1[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32));
    }
    for (int j = 0; j < 4 && B == 6; ++j) int6_pair(w, j, q0[j], q1[j]);
    for (int j = 0; j < 4 && (B == 4 || B == 5); ++j) {  // stored rows 2j, 2j+1: block rows j, j+4
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 32));
      q0[j] = _mm256_and_si256(v, nibble);
      q1[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      if constexpr (B == 5) {
        const __m256i h = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 128 + j * 8)));
        q0[j] = _mm256_or_si256(q0[j], _mm256_and_si256(_mm256_sllv_epi64(h, lift), bit4));
        q1[j] = _mm256_or_si256(q1[j], _mm256_and_si256(_mm256_sllv_epi64(_mm256_srli_epi64(h, 4), lift), bit4));
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm)));
    [[maybe_unused]] const __m256 low =
        S == 2 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + kRows))) : scale;
    for (int m = 0; m < R; ++m) {
      const int8_t* xq = x[m].q + g * kGroup;
      const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
      const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
      __m256i s[4];
      if constexpr (B == 6) {  // inputs 0-15 and 16-31 apart (their scales differ): (q - 32) * scale per half
        __m256i t[4];
        for (int j = 0; j < 4; ++j) {
#if defined(LLMCLI_INT_DOT_VNNI)
          s[j] = LLMCLI_DPBUSD(_mm256_setzero_si256(), q0[j], lo);
          t[j] = LLMCLI_DPBUSD(_mm256_setzero_si256(), q1[j], hi);
#else  // pair sums <= 2 * 63 * 127 fit int16
          s[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(q0[j], lo), ones);
          t[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(q1[j], hi), ones);
#endif
        }
        const __m256 first = _mm256_cvtepi32_ps(
            _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])));
        const __m256 second = _mm256_cvtepi32_ps(
            _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3])));
        const __m256 dx = _mm256_set1_ps(x[m].d[g]);
        const float half = x[m].dhalf[g], rest = x[m].dsum[g] - half;
        acc[m] = _mm256_fmadd_ps(_mm256_fmadd_ps(first, dx, _mm256_set1_ps(-32.f * half)), scale, acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_fmadd_ps(second, dx, _mm256_set1_ps(-32.f * rest)), low, acc[m]);
        continue;
      }
      __m256 dots;
#if defined(LLMCLI_INT_DOT_VNNI)  // int32 lanes of 4 products each, then two horizontal adds
      for (int j = 0; j < 4; ++j) s[j] = LLMCLI_DPBUSD(LLMCLI_DPBUSD(_mm256_setzero_si256(), q0[j], lo), q1[j], hi);
      dots = _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])));
#else
      if constexpr (B == 8) {  // u = its low nibble + 16 * its high one, each times x in int16 pairs, then int32
        const auto dot = [&](__m256i u, __m256i xs) {
          const __m256i by_low = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, nibble), xs), ones);
          const __m256i by_high = _mm256_madd_epi16(
              _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), nibble), xs), ones);
          return _mm256_add_epi32(by_low, _mm256_slli_epi32(by_high, 4));
        };
        for (int j = 0; j < 4; ++j) s[j] = _mm256_add_epi32(dot(q0[j], lo), dot(q1[j], hi));
        dots = _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])));
      } else {
        for (int j = 0; j < 4; ++j)
          s[j] = _mm256_add_epi16(_mm256_maddubs_epi16(q0[j], lo), _mm256_maddubs_epi16(q1[j], hi));
        if constexpr (B == 4) {
          // Each int16 lane holds 4 products, |sum| <= 4 * 15 * 127; the two horizontal adds make it 16 products,
          // <= 30480, still int16, so one madd (not four) widens the row sums to int32, exactly.
          const __m256i pairs = _mm256_hadd_epi16(_mm256_hadd_epi16(s[0], s[1]), _mm256_hadd_epi16(s[2], s[3]));
          dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        } else {  // 4 products of up to 31 * 127 fit int16, 16 would not: widen first
          for (int j = 0; j < 4; ++j) s[j] = _mm256_madd_epi16(s[j], ones);
          dots = _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])));
        }
      }
#endif
      // dots: rows 0..7
      if constexpr (S == 2) {
        acc[m] = _mm256_fmadd_ps(dots, _mm256_mul_ps(scale, _mm256_set1_ps(x[m].d[g])), acc[m]);
        acc[m] = _mm256_fmadd_ps(low, _mm256_set1_ps(x[m].dsum[g]), acc[m]);
      } else {  // scale * (d_x * dots - offset * dsum): one step fewer than with a stored min
        const __m256 shifted = _mm256_fmadd_ps(dots, _mm256_set1_ps(x[m].d[g]),
                                               _mm256_set1_ps(-kSymmetricOffset<B> * x[m].dsum[g]));
        acc[m] = _mm256_fmadd_ps(shifted, scale, acc[m]);
      }
    }
  }
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(sums[m], acc[m]);
#else
  for (int m = 0; m < R; ++m) {
    const uint8_t* wg = w;
    const c10::Half* sg = sm;
    for (int64_t r = 0; r < kRows; ++r) sums[m][r] = 0.f;
    for (int64_t g = 0; g < K / kGroup; ++g, wg += group_bytes, sg += S * kRows)
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t r = kInt4Order[i];
        const int8_t* xq = x[m].q + g * kGroup;
        int q[kGroup];
        low_bit_codes<B>(wg, i, q);
        if constexpr (B == 6) {  // a scale per 16 inputs: sg[r] for 0-15, sg[kRows + r] for 16-31
          int32_t first = 0, second = 0;
          for (int64_t t = 0; t < 16; ++t) first += q[t] * int32_t(xq[t]), second += q[t + 16] * int32_t(xq[t + 16]);
          const float half = x[m].dhalf[g], rest = x[m].dsum[g] - half;
          sums[m][r] += (static_cast<float>(first) * x[m].d[g] - 32.f * half) * static_cast<float>(sg[r]) +
                        (static_cast<float>(second) * x[m].d[g] - 32.f * rest) * static_cast<float>(sg[kRows + r]);
          continue;
        }
        int32_t s = 0;
        for (int64_t t = 0; t < kGroup; ++t) s += q[t] * int32_t(xq[t]);
        sums[m][r] += static_cast<float>(s) * (static_cast<float>(sg[r]) * x[m].d[g]) +
                      low_bit_min<S, B>(sg, r) * x[m].dsum[g];
      }
  }
#endif
}
