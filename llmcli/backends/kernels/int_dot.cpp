// Integer dot products for int8 weights (a scale per row) and the low-bit layouts (low_bit_block.cpp), a few rows
// at a time (decoding), on CPUs with AVX2; built with llmcli's other kernels and called by llmcli/backends/int_dot.py.
//
// Without AVX-512, converting each int8 weight to float and multiplying in float32 is compute-bound at
// about half the memory's bandwidth (2 cores, Zen 3). As llama.cpp does for Q8_0 and Q4_0, the activation
// row is quantised to int8 once per call, a scale per block of 32 inputs (d = max|x| / 127), and the
// products are integer: _mm256_maddubs_epi16 multiplies unsigned by signed bytes and adds pairs into int16,
// _mm256_madd_epi16 adds those pairs into int32, and each block's int32 sum is scaled in float.
//
// int8 weights (a scale per output row) keep the int8 kernel's blocks [N/8][K/16][8][16]. maddubs wants
// one unsigned operand: it gets |x| and the weight takes x's sign (_mm256_sign_epi8), so each product is
// x * w exactly (|x|, |w| <= 127: a pair sum fits int16).
//
// int4 weights (q in 0..15, w = q * scale + min per group of 32 inputs, GGUF's Q4_1) are stored
// [N/8][K/32][8][16] bytes, rows in lanes (low_bit_block.cpp): the 32 bytes at 32j hold inputs 4j..4j+3 of
// the block's rows 0..7 in their low nibbles (4 bytes a row) and inputs 16 + 4j.. in their high nibbles, so a
// product with 4 inputs broadcast leaves each row's sum in its own int32 lane. Scales and mins are float16
// [N/8][K/32][S][8]: S = 2 holds scales, then mins; S = 1 (GGUF's Q4_0, w = (q - 8) * scale) holds scales
// alone, min = -8 * scale, so a Q4_0 file is read at its own 4.5 bits a weight instead of 5. A group's sum is
//   d_x * (scale * sum_j q_j x_j + min * sum_j x_j),
// and q is unsigned already: maddubs(q, x) needs no sign trick (pair sums <= 2 * 15 * 127).
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMCLI_INT_DOT_AVX2 1
// VNNI (AVX512-VNNI's 256-bit form, or AVX-VNNI) adds four u8 x s8 products into each int32 lane in one
// instruction, where AVX2 takes maddubs (pairs into int16), madd (into int32) and an add: the same exact sums.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMCLI_INT_DOT_VNNI 1
#define LLMCLI_DPBUSD _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define LLMCLI_INT_DOT_VNNI 1
#define LLMCLI_DPBUSD _mm256_dpbusd_avx_epi32
#endif
#endif

namespace {

constexpr int64_t kRows = 8;    // output rows per block
constexpr int64_t kChunk = 16;  // int8 weights: inputs per chunk of a block
constexpr int64_t kGroup = 32;  // inputs per activation scale, and per int4 weight scale
constexpr int kInt4Order[kRows] = {0, 4, 1, 5, 2, 6, 3, 7};  // stored row r is block row kInt4Order[r]
// How far ahead of the group being multiplied its weights are requested from memory. The hardware
// prefetcher alone left a one-row product at 13 GB/s of 22 on a 2-core EPYC (memory waits and arithmetic
// taking turns); 2 KiB ahead (about 16 int4 groups) brought it to 17-19 GB/s there.
constexpr int64_t kPrefetchBytes = 2048;

// One row of activations, quantised: q (|q| <= 127), |q|, d per group, d * sum(q) per group, and d * sum(q) over
// each group's first 16 (the 6-bit weights' scales are per 16 inputs).
struct QuantRow {
  const int8_t* q;
  const uint8_t* abs;
  const float* d;
  const float* dsum;
  const float* dhalf;
};

#if defined(LLMCLI_INT_DOT_AVX2)
// 8 values of x as float32.
template <typename scalar_t>
inline __m256 load8(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(x);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
}

// One group of 32 as quantize_group does it, 8 lanes at a time: the same operations on the same floats (the
// operand order of max and min makes a NaN behave as std::max and std::min make it), so the same bits.
template <typename scalar_t>
inline void quantize_group_avx2(const scalar_t* x, int8_t* q, uint8_t* qabs, float* d, float* dsum, float* dhalf) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float dg = _mm_cvtss_f32(m) / 127.f;
  const __m256 inv = _mm256_set1_ps(dg > 0.f ? 1.f / dg : 0.f);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i n[4], total = _mm256_setzero_si256(), half = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    n[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    total = _mm256_add_epi32(total, n[i]);
    if (i == 1) half = total;
  }
  // int32 -> int8 with saturating packs (the values fit), which interleave 128-bit lanes: put them back in order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qabs), _mm256_abs_epi8(ordered));
  const auto hsum = [](__m256i a) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  };
  *d = dg;
  *dsum = dg * static_cast<float>(hsum(total));
  *dhalf = dg * static_cast<float>(hsum(half));
}
#endif

// One group of 32: q = round(x / d), d = max|x| / 127 (0 for a zero group), |q|, d * sum(q), and d * sum(q) over
// the first 16.
template <typename scalar_t>
inline void quantize_group(const scalar_t* x, int8_t* q, uint8_t* qabs, float* d, float* dsum, float* dhalf) {
  float amax = 0.f;
  for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::abs(static_cast<float>(x[j])));
  const float dg = amax / 127.f;
  const float inv = dg > 0.f ? 1.f / dg : 0.f;
  int32_t sum = 0, half = 0;
  for (int64_t j = 0; j < kGroup; ++j) {
    const float v = std::nearbyint(static_cast<float>(x[j]) * inv);  // ties to even, as torch.round
    const int8_t qj = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    q[j] = qj;
    qabs[j] = static_cast<uint8_t>(qj < 0 ? -qj : qj);
    sum += qj;
    if (j == 15) half = sum;
  }
  *d = dg;
  *dsum = dg * static_cast<float>(sum);
  *dhalf = dg * static_cast<float>(half);
}

// x [M, K] (any of the dispatched float types) -> int8 per group of 32 (quantize_group), on all threads.
template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t M, int64_t K, int8_t* q, uint8_t* qabs, float* d, float* dsum,
                   float* dhalf) {
  at::parallel_for(0, M * (K / kGroup), 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
#if defined(LLMCLI_INT_DOT_AVX2)
      quantize_group_avx2(x + g * kGroup, q + g * kGroup, qabs + g * kGroup, d + g, dsum + g, dhalf + g);
#else
      quantize_group(x + g * kGroup, q + g * kGroup, qabs + g * kGroup, d + g, dsum + g, dhalf + g);
#endif
    }
  });
}

#if defined(LLMCLI_INT_DOT_AVX2)
// Requests `lines` cache lines from `bytes` ahead of p into L1 (a hint: addresses past the end do not fault).
inline void prefetch_ahead(const void* p, int64_t bytes, int lines) {
  const char* at = static_cast<const char*>(p) + bytes;
  for (int i = 0; i < lines; ++i) _mm_prefetch(at + 64 * i, _MM_HINT_T0);
}

// [a0..a7] (4 lanes of row 2j, then 4 of row 2j+1, for j = 0..3) -> the 8 row sums, in the order
// rows (0, 2, 4, 6, 1, 3, 5, 7) for registers holding rows (2j, 2j+1).
inline __m256 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  return _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
}
#endif

// sums[r] = sum_k x[k] * w[r][k] for the 8 rows of one int8 block [K/16][8][16].
inline void int8_block(const QuantRow& x, const int8_t* w, int64_t K, float* sums) {
#if defined(LLMCLI_INT_DOT_AVX2)
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // AVX2 only: VNNI widens in its dot product
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < K / kGroup; ++g) {
    prefetch_ahead(w, kPrefetchBytes, 4);  // the group's 256 bytes
    __m256i s[4];
    for (int h = 0; h < 2; ++h, w += kRows * kChunk) {  // the group's two chunks of 16 inputs
      const int64_t k = g * kGroup + h * kChunk;
      const __m256i xs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x.q + k)));
      const __m256i xa = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x.abs + k)));
      for (int j = 0; j < 4; ++j) {  // rows 2j and 2j+1
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 2 * kChunk));
#if defined(LLMCLI_INT_DOT_VNNI)
        s[j] = LLMCLI_DPBUSD(h ? s[j] : _mm256_setzero_si256(), xa, _mm256_sign_epi8(wv, xs));
#else
        const __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xs)), ones);
        s[j] = h ? _mm256_add_epi32(s[j], pairs) : pairs;
#endif
      }
    }
    const __m256 d = _mm256_set1_ps(x.d[g]);
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[j]), d, acc[j]);
  }
  alignas(32) float t[kRows];
  _mm256_store_ps(t, hsum4(acc[0], acc[1], acc[2], acc[3]));
  for (int i = 0; i < 4; ++i) sums[2 * i] = t[i], sums[2 * i + 1] = t[4 + i];
#else  // the same quantised math in plain C++
  for (int64_t r = 0; r < kRows; ++r) sums[r] = 0.f;
  for (int64_t g = 0; g < K / kGroup; ++g) {
    int32_t s[kRows] = {};
    for (int h = 0; h < 2; ++h, w += kRows * kChunk)
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = 0; j < kChunk; ++j) s[r] += int32_t(x.q[g * kGroup + h * kChunk + j]) * w[r * kChunk + j];
    for (int64_t r = 0; r < kRows; ++r) sums[r] += static_cast<float>(s[r]) * x.d[g];
  }
#endif
}

// The low-bit layouts (int4, int5, int8 per 32, Q6_K's 6 bits) and their block kernel, low_bit_block.
#include "low_bit_block.cpp"

// Rows of activations per call of a block function. The low-bit blocks keep R accumulators and the group's 8
// unpacked registers live: 8 rows fit AVX-512VL's 32 vector registers, 4 AVX2's 16.
#if defined(__AVX512VL__)
constexpr int64_t kTile = 8;
#else
constexpr int64_t kTile = 4;
#endif

// A per-output-row float factor (the int8 weights' scales) or addend (a bias), stored in any float type.
struct RowValues {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;
  RowValues() = default;
  explicit RowValues(const at::Tensor& t) : data(t.const_data_ptr()), type(t.scalar_type()) {}
  explicit RowValues(const std::optional<at::Tensor>& t) : RowValues(t.has_value() ? RowValues(*t) : RowValues()) {}
  float operator[](int64_t i) const {
    switch (type) {
      case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
};

// Quantises x [..., K] and runs `block(rows, count, m, b, sums)` over tiles of up to kTile rows (m: the first row's
// index) and all blocks, on all threads (split over blocks of output rows), writing out [..., N] = sums * scale(m, n)
// in x's dtype, then + bias[n] (rounded to x's dtype before and after the add, as a separate torch add rounds).
// With `ids` (each row its own expert's matrix), rows are taken sorted by expert, and each expert's rows (a prompt's
// tokens routed to it) share tiles over its blocks, streamed in order: a few long streams through memory instead of
// k short ones interleaved (6 experts of a DeepSeek-V3-shaped step: 6.4 GB/s), in one call for a whole prompt.
template <typename Block, typename Scale>
at::Tensor run_rows(const at::Tensor& input, int64_t blocks, Block block, Scale scale, const RowValues& bias,
                    const int64_t* ids) {
  const at::Tensor x = input.contiguous().view({-1, input.size(-1)});
  const int64_t M = x.size(0), K = x.size(1), N = blocks * kRows;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor qabs = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor d = at::empty({3, M * (K / kGroup)}, x.options().dtype(at::kFloat));  // d, d * sum(q), over 16
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  std::vector<int64_t> order, runs;  // with ids: rows by expert, and where each expert's rows start in `order`
  if (ids != nullptr) {
    order.resize(M);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    runs.push_back(0);
    for (int64_t i = 1; i < M; ++i)
      if (ids[order[i]] != ids[order[i - 1]]) runs.push_back(i);
    runs.push_back(M);
  }
  LLMCLI_DISPATCH_FLOATS(x.scalar_type(), "int_dot", [&] {
    const int64_t G = K / kGroup;
    int8_t* qp = q.data_ptr<int8_t>();
    uint8_t* ap = qabs.data_ptr<uint8_t>();
    float* dp = d.data_ptr<float>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    quantize_rows(xs, M, K, qp, ap, dp, dp + M * G, dp + 2 * M * G);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      float sums[kTile][kRows];
      QuantRow rows[kTile];
      auto tile = [&](const int64_t* index, int64_t count, int64_t b) {
        for (int64_t t = 0; t < count; ++t) {
          const int64_t m = index[t];
          rows[t] = QuantRow{qp + m * K, ap + m * K, dp + m * G, dp + (M + m) * G, dp + (2 * M + m) * G};
        }
        block(rows, count, index[0], b, sums);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t r = 0; r < kRows; ++r) {
            const int64_t n = b * kRows + r;
            scalar_t v = static_cast<scalar_t>(sums[t][r] * scale(index[t], n));
            if (bias.data != nullptr) v = static_cast<scalar_t>(static_cast<float>(v) + bias[n]);
            op[index[t] * N + n] = v;
          }
      };
      if (ids != nullptr) {  // each expert's rows stream its matrix's blocks in order
        for (size_t run = 0; run + 1 < runs.size(); ++run)
          for (int64_t b = begin; b < end; ++b)
            for (int64_t m0 = runs[run]; m0 < runs[run + 1]; m0 += kTile)
              tile(order.data() + m0, std::min(kTile, runs[run + 1] - m0), b);
        return;
      }
      int64_t in_order[kTile];
      for (int64_t b = begin; b < end; ++b)  // the block stays in L1 over the tiles
        for (int64_t m0 = 0; m0 < M; m0 += kTile) {
          const int64_t count = std::min(kTile, M - m0);
          for (int64_t t = 0; t < count; ++t) in_order[t] = m0 + t;
          tile(in_order, count, b);
        }
    });
  });
  return out;
}

void check_rows(const at::Tensor& x, int64_t K, const std::optional<at::Tensor>& bias, int64_t N,
                const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_floating_point(), name,
              ": x must be floating point, on the CPU");
  TORCH_CHECK(x.size(-1) == K, name, ": x has ", x.size(-1), " inputs, the weight ", K);
  TORCH_CHECK(K % kGroup == 0, name, ": inputs must be a multiple of ", kGroup, ", got ", K);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                                    bias->size(0) == N && bias->is_contiguous()),
              name, ": bias must be [", N, "] in x's dtype");
}

// Each of the M rows' matrix in a stack of E (experts [M] int64, checked), or nullptr for one matrix.
const int64_t* expert_ids(const std::optional<at::Tensor>& experts, int64_t M, bool stacked, int64_t E,
                          const char* name) {
  if (!experts.has_value()) {
    TORCH_CHECK(E == 1, name, ": a stack of weights needs experts");
    return nullptr;
  }
  TORCH_CHECK(stacked && experts->scalar_type() == at::kLong && experts->numel() == M && experts->is_contiguous(),
              name, ": experts must be [M] int64, with a stack of weights");
  const int64_t* ids = experts->const_data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(ids[m] >= 0 && ids[m] < E, name, ": expert out of range");
  return ids;
}

// x [..., K]; w [N/8, K/16, 8, 16] int8 with scales [N], or a stack [E, N/8, K/16, 8, 16] with scales [E, N] and
// experts [M] int64 naming each row's matrix (M = x's rows); scales in any float type; bias: optional [N] in x's
// dtype. Returns [..., N] ≈ (x @ w[e].T) * scales[e] (+ bias) with x quantised to int8 per group of 32.
at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                    const std::optional<at::Tensor>& experts, const std::optional<at::Tensor>& bias) {
  const bool stacked = w.dim() == 5;
  TORCH_CHECK(w.scalar_type() == at::kChar && (w.dim() == 4 || stacked) && w.is_contiguous() &&
                  w.size(-2) == kRows && w.size(-1) == kChunk, "int8_dot: w must be int8 blocks [(E,) N/8, K/16, 8, 16]");
  const int64_t E = stacked ? w.size(0) : 1, blocks = w.size(-4), K = w.size(-3) * kChunk, N = blocks * kRows;
  check_rows(x, K, bias, N, "int8_dot");
  TORCH_CHECK(scales.dim() == w.dim() - 3 && (!stacked || scales.size(0) == E) && scales.size(-1) == N &&
                  scales.is_contiguous() && scales.is_floating_point(), "int8_dot: scales must be [(E,) N], float");
  const int64_t* ids = expert_ids(experts, x.numel() / K, stacked, E, "int8_dot");
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const RowValues sp(scales);
  auto block = [&](const QuantRow* rows, int64_t count, int64_t m, int64_t b, float (*sums)[kRows]) {
    for (int64_t t = 0; t < count; ++t)  // a tile's rows share their expert
      int8_block(rows[t], wp + ((ids ? ids[m] : 0) * blocks + b) * kRows * K, K, sums[t]);
  };
  auto scale = [&](int64_t m, int64_t n) { return sp[(ids ? ids[m] : 0) * N + n]; };
  return run_rows(x, blocks, block, scale, RowValues(bias), ids);
}

// An int4 weight's blocks w [(E,) N/8, K/32, 8, 16], an int5 weight's [(E,) N/8, K/32, 160], a Q6_K one's
// [(E,) N/8, K/32, 208] or an int8-per-32 one's [(E,) N/8, K/32, 256] (uint8), with its scales sm
// [(E,) N/8, K/32, S, 8] float16: S = 2 (scales and mins) or 1 (scales; Q4_0, Q5_0 and Q8_0); Q6_K's
// [(E,) N/8, K/256, 1, 8], its d.
struct LowBitBlocks {
  int bits;
  bool stacked;
  int64_t E, blocks, G, S;
  int64_t block_scales;  // sm's values per block
};

int64_t low_bit_group_bytes(int bits) {
  return bits == 4 ? kGroupBytes<4> : bits == 5 ? kGroupBytes<5> : bits == 6 ? kGroupBytes<6> : kGroupBytes<8>;
}

LowBitBlocks low_bit_blocks(const at::Tensor& w, const at::Tensor& sm, const char* name) {
  const bool four = (w.dim() == 4 || w.dim() == 5) && w.size(-2) == kRows && w.size(-1) == 16;
  const int64_t bytes = w.dim() > 0 ? w.size(-1) : 0;
  const bool wide =
      (w.dim() == 3 || w.dim() == 4) && (bytes == kInt5Bytes || bytes == kQ6KBytes || bytes == kInt8Bytes);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && (four || wide), name,
              ": w must be uint8 blocks [(E,) N/8, K/32, 8, 16] (int4), [(E,) N/8, K/32, 160] (int5), "
              "[(E,) N/8, K/32, 208] (Q6_K) or [(E,) N/8, K/32, 256] (int8 per 32)");
  const bool stacked = w.dim() == (four ? 5 : 4);
  const int64_t blocks = w.size(stacked ? 1 : 0), G = w.size(stacked ? 2 : 1);
  const int bits = four ? 4 : bytes == kInt5Bytes ? 5 : bytes == kQ6KBytes ? 6 : 8;
  const int64_t scale_groups = bits == 6 ? G / kQ6KGroups : G;  // Q6_K: a d per 8 groups
  TORCH_CHECK(bits != 6 || G % kQ6KGroups == 0, name, ": Q6_K blocks take inputs a multiple of 256");
  TORCH_CHECK(sm.scalar_type() == at::kHalf && sm.dim() == (stacked ? 5 : 4) && sm.is_contiguous() &&
                  (!stacked || sm.size(0) == w.size(0)) && sm.size(-4) == blocks && sm.size(-3) == scale_groups &&
                  (sm.size(-2) == 1 || (sm.size(-2) == 2 && bits != 6)) && sm.size(-1) == kRows,
              name, ": sm must be float16 [(E,) N/8, K/32, S, 8], S = 2 (scales, mins) or 1 (scales); Q6_K's ",
              "[(E,) N/8, K/256, 1, 8]");
  return {bits, stacked, stacked ? w.size(0) : 1, blocks, G, sm.size(-2), scale_groups * sm.size(-2) * kRows};
}

// R rows of activations (up to kTile) through one block with S terms per group and B bits a weight.
template <int S, int B>
inline void low_bit_rows(int64_t count, const QuantRow* rows, const uint8_t* w, const c10::Half* sm, int64_t K,
                         float (*sums)[kRows]) {
  if (count > 4) {  // eights where registers allow: 4-12% faster than fours at 16-128 rows on a Zen 4
    if constexpr (kTile == 8)
      if (count == 8) return low_bit_block<8, S, B>(rows, w, sm, K, sums);
    low_bit_block<4, S, B>(rows, w, sm, K, sums);
    return low_bit_rows<S, B>(count - 4, rows + 4, w, sm, K, sums + 4);
  }
  switch (count) {
    case 4: low_bit_block<4, S, B>(rows, w, sm, K, sums); break;
    case 3: low_bit_block<3, S, B>(rows, w, sm, K, sums); break;
    case 2: low_bit_block<2, S, B>(rows, w, sm, K, sums); break;
    default: low_bit_block<1, S, B>(rows, w, sm, K, sums);
  }
}

// x [..., K]; w one low-bit weight's blocks (LowBitBlocks), or a stack [E, ...] with experts [M] int64 naming each
// row's matrix; sm its scales and mins (S = 2) or scales alone (S = 1, min = -8, -16 or -128 * scale); bias:
// optional [N] in x's dtype. Returns [..., N] ≈ x @ w.T (+ bias) with x quantised to int8 per group of 32.
at::Tensor int4_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sm,
                    const std::optional<at::Tensor>& experts, const std::optional<at::Tensor>& bias) {
  const LowBitBlocks l = low_bit_blocks(w, sm, "int4_dot");
  const int64_t K = l.G * kGroup, block_bytes = l.G * low_bit_group_bytes(l.bits);
  check_rows(x, K, bias, l.blocks * kRows, "int4_dot");
  const int64_t* ids = expert_ids(experts, x.numel() / K, l.stacked, l.E, "int4_dot");
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const c10::Half* sp = sm.const_data_ptr<c10::Half>();
  const auto run = l.bits == 4   ? (l.S == 2 ? low_bit_rows<2, 4> : low_bit_rows<1, 4>)
                   : l.bits == 5 ? (l.S == 2 ? low_bit_rows<2, 5> : low_bit_rows<1, 5>)
                   : l.bits == 6 ? low_bit_rows<1, 6>
                                 : (l.S == 2 ? low_bit_rows<2, 8> : low_bit_rows<1, 8>);
  auto block = [&](const QuantRow* rows, int64_t count, int64_t m, int64_t b, float (*sums)[kRows]) {
    const int64_t at = (ids ? ids[m] : 0) * l.blocks + b;  // a tile's rows share their expert
    run(count, rows, wp + at * block_bytes, sp + at * l.block_scales, K, sums);
  };
  return run_rows(x, l.blocks, block, [](int64_t, int64_t) { return 1.f; }, RowValues(bias), ids);
}

#if defined(LLMCLI_INT_DOT_AVX2)
// 8 floats stored as scalar_t, rounded as c10's conversions round them (bfloat16: to nearest even, NaN made quiet).
template <typename scalar_t>
inline void store8(scalar_t* dst, __m256 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_storeu_ps(dst, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), halves);
  }
}
#endif

// One low-bit weight as row-major [N, K] in `dtype` (q * scale + min in float, then rounded), for long prompts.
// AVX2 unpacks each group as the kernel does and widens 8 codes a step: a 4864 x 896 int4 weight to bfloat16 in
// 1.1 ms, about 3x the plain loop's rate (which took longer than a 128-row bfloat16 GEMM on it, 2-core Zen 4).
template <int S, int B, typename scalar_t>
void low_bit_unblock(const uint8_t* wp, const c10::Half* sp, int64_t blocks, int64_t G, int64_t block_scales,
                     scalar_t* op) {
  constexpr int64_t group_bytes = kGroupBytes<B>;
  const int64_t K = G * kGroup;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wg = wp + (b * G + g) * group_bytes;
        const c10::Half* sg = group_scales<S, B>(sp + b * block_scales, g);
#if defined(LLMCLI_INT_DOT_AVX2)
        __m256i codes[8];
        unpack_group<B>(wg, codes);
        alignas(32) uint8_t lanes[8][32];  // register k's 32 bytes: row r's inputs 4k..4k+3 at 4r
        for (int k = 0; k < 8; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[k]), codes[k]);
        for (int64_t r = 0; r < kRows; ++r) {
          scalar_t* dst = op + (b * kRows + r) * K + g * kGroup;
          for (int h = 0; h < 4; ++h) {  // inputs 8h..8h+7: registers 2h and 2h + 1
            uint32_t first, second;
            std::memcpy(&first, lanes[2 * h] + 4 * r, 4);
            std::memcpy(&second, lanes[2 * h + 1] + 4 * r, 4);
            const __m128i eight = _mm_cvtsi64_si128(static_cast<int64_t>(first | (uint64_t{second} << 32)));
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
            const RowTerms terms = row_terms<S, B>(wg, sg, r, h / 2);
            store8(dst + 8 * h, _mm256_fmadd_ps(q, _mm256_set1_ps(terms.scale), _mm256_set1_ps(terms.min)));
          }
        }
#else
        for (int64_t r = 0; r < kRows; ++r) {
          scalar_t* dst = op + (b * kRows + r) * K + g * kGroup;
          int q[kGroup];
          low_bit_codes<B>(wg, r, q);
          for (int64_t t = 0; t < kGroup; ++t) {
            const RowTerms terms = row_terms<S, B>(wg, sg, r, static_cast<int>(t / 16));
            dst[t] = static_cast<scalar_t>(std::fma(static_cast<float>(q[t]), terms.scale, terms.min));
          }
        }
#endif
      }
  });
}

at::Tensor int4_unblock(const at::Tensor& w, const at::Tensor& sm, at::ScalarType dtype) {
  const LowBitBlocks l = low_bit_blocks(w, sm, "int4_unblock");
  TORCH_CHECK(!l.stacked, "int4_unblock: one matrix, not a stack");
  at::Tensor out = at::empty({l.blocks * kRows, l.G * kGroup}, w.options().dtype(dtype));
  LLMCLI_DISPATCH_FLOATS(dtype, "int4_unblock", [&] {
    const uint8_t* wp = w.const_data_ptr<uint8_t>();
    const c10::Half* sp = sm.const_data_ptr<c10::Half>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto unblock = l.bits == 4   ? (l.S == 2 ? low_bit_unblock<2, 4, scalar_t> : low_bit_unblock<1, 4, scalar_t>)
                         : l.bits == 5 ? (l.S == 2 ? low_bit_unblock<2, 5, scalar_t> : low_bit_unblock<1, 5, scalar_t>)
                         : l.bits == 6 ? low_bit_unblock<1, 6, scalar_t>
                                       : (l.S == 2 ? low_bit_unblock<2, 8, scalar_t> : low_bit_unblock<1, 8, scalar_t>);
    unblock(wp, sp, l.blocks, l.G, l.block_scales, op);
  });
  return out;
}

std::string int_dot_isa() {
#if defined(LLMCLI_INT_DOT_VNNI)
  return "avx2_vnni";
#elif defined(LLMCLI_INT_DOT_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

#ifndef LLMCLI_OPS_NAMESPACE
#define LLMCLI_OPS_NAMESPACE llmcli
#endif

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("int8_dot(Tensor x, Tensor w, Tensor scales, Tensor? experts=None, Tensor? bias=None) -> Tensor");
  m.def("int4_dot(Tensor x, Tensor w, Tensor sm, Tensor? experts=None, Tensor? bias=None) -> Tensor");
  m.def("int4_unblock(Tensor w, Tensor sm, ScalarType dtype) -> Tensor");
  m.def("int_dot_isa() -> str", &int_dot_isa);
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("int8_dot", &int8_dot);
  m.impl("int4_dot", &int4_dot);
  m.impl("int4_unblock", &int4_unblock);
}

// The 6-bit head's product, the eager decode ops and the decoder layer op, in this translation unit (torch's
// headers cost ~10 s per unit to compile).
#include "int6_dot.cpp"
#include "decode_ops.cpp"
#include "decode_layer.cpp"
#include "deltanet_step.cpp"
