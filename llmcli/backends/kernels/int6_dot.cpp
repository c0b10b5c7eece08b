// 6-bit weights for the head of an int4 run, times activations quantised to int8 per group of 32; compiled as part
// of int_dot.cpp (included at its end: it shares that file's activation quantisation, QuantRow and run_rows) and
// called by llmcli/backends/int6.py.
//
// Where most layers are 4-bit, the head is the largest product of a decode step (the DeepSeek-V3-shaped MoE:
// 132 MB of 214 in int8); llama.cpp's Q4_0 files keep it in 6 bits (Q6_K). Here q is in 0..63 with
// w = q * scale + min, a float16 scale and min per group of 64 inputs: 6.5 bits a weight.
//
// Storage per block of 8 rows and 32 inputs: 192 bytes. The first 128 are the low nibbles exactly as int4 stores
// them (rows in kInt4Order; byte j of a row holds q[j] & 15 and (q[j + 16] & 15) << 4). The other 64 hold the high
// two bits in four units of 16 bytes, one per pair of stored rows (A = 2u, B = 2u + 1): byte b < 8 holds those of
// A's q[b], A's q[b + 16], B's q[b], B's q[b + 16] at bits 0, 2, 4, 6; byte 8 + b the same for q[b + 8] and
// q[b + 24]. One unit broadcast to both 128-bit lanes, shifted per 64-bit lane (A's bits up by 4, B's not) and
// masked, lines up with the nibbles of rows A and B as int4's register pairs hold them.
// Scales and mins are float16 [N/8][K/64][2][8]. maddubs pair sums are <= 2 * 63 * 127, so two add in int16 but
// not four: the rows' sums widen to int32 before the horizontal adds (VNNI sums in int32 throughout).

namespace {

constexpr int64_t kInt6Group = 64;  // inputs per scale and min (the layout: kInt6Bytes, int6_pair in low_bit_block.cpp)

// sums[m][r] for R rows of activations and the 8 rows of one int6 block (w [K/32][192], sm [K/64][2][8]); each row's
// arithmetic is the one-row order, so results do not depend on R.
template <int R>
inline void int6_block(const QuantRow* x, const uint8_t* w, const c10::Half* sm, int64_t K, float (*sums)[kRows]) {
#if defined(LLMCLI_INT_DOT_AVX2)
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R], scale = _mm256_setzero_ps(), low = _mm256_setzero_ps();
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g, w += kInt6Bytes) {
    prefetch_ahead(w, kPrefetchBytes, 3);
    if (g % 2 == 0) {  // a new group of 64 inputs: its scales and mins
      scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm)));
      low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + kRows)));
      sm += 2 * kRows;
      prefetch_ahead(sm, kPrefetchBytes / 6, 1);
    }
    __m256i q0[4], q1[4];
    for (int j = 0; j < 4; ++j) int6_pair(w, j, q0[j], q1[j]);  // stored rows 2j, 2j+1: block rows j, j+4
    for (int m = 0; m < R; ++m) {
      const int8_t* xq = x[m].q + g * kGroup;
      const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
      const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
      __m256i s[4];
      for (int j = 0; j < 4; ++j) {
#if defined(LLMCLI_INT_DOT_VNNI)
        s[j] = LLMCLI_DPBUSD(LLMCLI_DPBUSD(_mm256_setzero_si256(), q0[j], lo), q1[j], hi);
#else
        s[j] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(q0[j], lo), _mm256_maddubs_epi16(q1[j], hi)),
                                 ones);
#endif
      }
      const __m256 dots = _mm256_cvtepi32_ps(
          _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])));  // rows 0..7
      acc[m] = _mm256_fmadd_ps(dots, _mm256_mul_ps(scale, _mm256_set1_ps(x[m].d[g])), acc[m]);
      acc[m] = _mm256_fmadd_ps(low, _mm256_set1_ps(x[m].dsum[g]), acc[m]);
    }
  }
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(sums[m], acc[m]);
#else
  for (int m = 0; m < R; ++m) {
    for (int64_t r = 0; r < kRows; ++r) sums[m][r] = 0.f;
    for (int64_t g = 0; g < K / kGroup; ++g) {
      const uint8_t* wg = w + g * kInt6Bytes;
      const c10::Half* sg = sm + (g / 2) * 2 * kRows;
      const int8_t* xq = x[m].q + g * kGroup;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t r = kInt4Order[i];
        int q[kGroup];
        int6_codes(wg, i, q);
        int32_t s = 0;
        for (int64_t t = 0; t < kGroup; ++t) s += q[t] * int32_t(xq[t]);
        sums[m][r] += static_cast<float>(s) * (static_cast<float>(sg[r]) * x[m].d[g]) +
                      static_cast<float>(sg[kRows + r]) * x[m].dsum[g];
      }
    }
  }
#endif
}

void check_int6(const at::Tensor& w, const at::Tensor& sm, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() && w.size(2) == kInt6Bytes &&
                  w.size(1) % 2 == 0, name, ": w must be uint8 blocks [N/8, K/32, 192] with K a multiple of 64");
  TORCH_CHECK(sm.scalar_type() == at::kHalf && sm.dim() == 4 && sm.is_contiguous() && sm.size(0) == w.size(0) &&
                  sm.size(1) * 2 == w.size(1) && sm.size(2) == 2 && sm.size(3) == kRows,
              name, ": sm must be float16 [N/8, K/64, 2, 8]");
}

// x [..., K]; w [N/8, K/32, 192] uint8 (the layout above); sm [N/8, K/64, 2, 8] float16 scales and mins; bias:
// optional [N] in x's dtype. Returns [..., N] ≈ x @ (q * scale + min).T (+ bias), x quantised to int8 per 32.
at::Tensor int6_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sm,
                    const std::optional<at::Tensor>& bias) {
  check_int6(w, sm, "int6_dot");
  const int64_t blocks = w.size(0), G = w.size(1), K = G * kGroup;
  check_rows(x, K, bias, blocks * kRows, "int6_dot");
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const c10::Half* sp = sm.const_data_ptr<c10::Half>();
  auto block = [&](const QuantRow* rows, int64_t count, int64_t, int64_t b, float (*sums)[kRows]) {
    const uint8_t* wb = wp + b * G * kInt6Bytes;
    const c10::Half* sb = sp + b * (G / 2) * 2 * kRows;
    for (int64_t t = 0; t < count; t += 4) {  // fours (a tile may hold 8 rows)
      switch (std::min<int64_t>(count - t, 4)) {
        case 4: int6_block<4>(rows + t, wb, sb, K, sums + t); break;
        case 3: int6_block<3>(rows + t, wb, sb, K, sums + t); break;
        case 2: int6_block<2>(rows + t, wb, sb, K, sums + t); break;
        default: int6_block<1>(rows + t, wb, sb, K, sums + t);
      }
    }
  };
  return run_rows(x, blocks, block, [](int64_t, int64_t) { return 1.f; }, RowValues(bias), nullptr);
}

// The int6 weight as row-major [N, K] in `dtype` (q * scale + min, in float then rounded): for many-row products.
at::Tensor int6_unblock(const at::Tensor& w, const at::Tensor& sm, at::ScalarType dtype) {
  check_int6(w, sm, "int6_unblock");
  const int64_t blocks = w.size(0), G = w.size(1), K = G * kGroup;
  at::Tensor out = at::empty({blocks * kRows, K}, w.options().dtype(dtype));
  LLMCLI_DISPATCH_FLOATS(dtype, "int6_unblock", [&] {
    const uint8_t* wp = w.const_data_ptr<uint8_t>();
    const c10::Half* sp = sm.const_data_ptr<c10::Half>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* wg = wp + (b * G + g) * kInt6Bytes;
          const c10::Half* sg = sp + (b * (G / 2) + g / 2) * 2 * kRows;
          for (int64_t i = 0; i < kRows; ++i) {
            const int64_t r = kInt4Order[i];
            const float scale = sg[r], low = sg[kRows + r];
            scalar_t* dst = op + (b * kRows + r) * K + g * kGroup;
            int q[kGroup];
            int6_codes(wg, i, q);
            for (int64_t t = 0; t < kGroup; ++t) dst[t] = static_cast<scalar_t>(static_cast<float>(q[t]) * scale + low);
          }
        }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("int6_dot(Tensor x, Tensor w, Tensor sm, Tensor? bias=None) -> Tensor");
  m.def("int6_unblock(Tensor w, Tensor sm, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("int6_dot", &int6_dot);
  m.impl("int6_unblock", &int6_unblock);
}
