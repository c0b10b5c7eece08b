// bfloat16 products for any number of rows on CPU, decoding and prompts alike, from one weight layout;
// built with int8_gemv.cpp and called by llmcli/bf16_kernel.py.
//
// Weights are stored in panels of 64 outputs: [N/64][K/2][64][2], the two inputs of a pair side by
// side, which is what AVX512-BF16's dot-product instruction reads (one 64-byte load = 16 outputs x 2
// inputs). A one-row product streams each panel in order (29-42 GB/s from memory on 2 cores, the
// machine's limit at the time, against 25-33 for oneDNN's prepacked product and 11-17 for F.linear).
// Many rows reuse each panel slice from L2 for 6 rows at a time (24 accumulators): 420-450 GFLOP/s,
// oneDNN prepacked 410-450 (benchmarks/bf16_gemm.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 64;       // outputs per panel (4 registers of 16 floats)
constexpr int64_t kTileRows = 6;     // rows sharing each loaded weight vector: 6 x 4 accumulators
constexpr int64_t kDepth = 2048;     // inputs per pass: keeps a panel's slice (256 KiB) in L2

// c[m][0..63] (+)= sum over the inputs [k0, k0 + depth) of x[m][k] * w[k][n] for M rows of x (row stride
// ldx elements), reading the panel slice `w` (depth/2 pairs of 64 x 2 values).
template <int M>
inline void tile(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t depth, float* c,
                 bool accumulate) {
#if defined(__AVX512BF16__)
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = accumulate ? _mm512_loadu_ps(c + m * kPanel + j * 16) : _mm512_setzero_ps();
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(x);  // one (x[2i], x[2i+1]) pair per 32 bits
  const int64_t stride = ldx / 2;
  for (int64_t i = 0; i < depth / 2; ++i, w += kPanel * 2) {
    __m512bh b[4];
    for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(w + j * 32);
    for (int m = 0; m < M; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pairs[m * stride + i]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, b[j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + m * kPanel + j * 16, acc[m][j]);
#else  // correct everywhere, fast nowhere: llmcli only stores weights in panels where the above is built
  for (int m = 0; m < M; ++m) {
    float* cm = c + m * kPanel;
    if (!accumulate) std::fill(cm, cm + kPanel, 0.f);
    for (int64_t i = 0; i < depth / 2; ++i)
      for (int64_t n = 0; n < kPanel; ++n)
        for (int64_t t = 0; t < 2; ++t)
          cm[n] += static_cast<float>(x[m * ldx + 2 * i + t]) * static_cast<float>(w[(i * kPanel + n) * 2 + t]);
  }
#endif
}

// out[0..63] = bf16(c + bias), rounding to nearest even.
inline void store_row(const float* c, const c10::BFloat16* bias, c10::BFloat16* out) {
#if defined(__AVX512BF16__)
  for (int j = 0; j < 4; ++j) {
    __m512 v = _mm512_loadu_ps(c + j * 16);
    if (bias) {  // bf16 -> f32 is a 16-bit shift
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + j * 16));
      v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * 16), (__m256i)_mm512_cvtneps_pbh(v));
  }
#else
  for (int64_t n = 0; n < kPanel; ++n) out[n] = c10::BFloat16(c[n] + (bias ? static_cast<float>(bias[n]) : 0.f));
#endif
}

using TileFn = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, float*, bool);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// x [M, K] bf16; w [E, N/64, K/2, 64, 2] bf16; bias: optional [N]; experts: optional [M] int64, the
// matrix each row goes through (MoE), else matrix 0. Returns [M, N] = x @ w[e].T + bias, in bf16.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& experts) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bf16_linear: x must be 2-D, contiguous, bfloat16, CPU");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 5 && w.is_contiguous() && w.size(3) == kPanel &&
                  w.size(4) == 2, "bf16_linear: w must be bfloat16 panels [E, N/64, K/2, 64, 2]");
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), panels = w.size(1), N = panels * kPanel;
  TORCH_CHECK(w.size(2) * 2 == K, "bf16_linear: x has ", K, " inputs, w ", w.size(2) * 2);
  const c10::BFloat16* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous(),
                "bf16_linear: bias must be [N] bfloat16");
    bp = bias->const_data_ptr<c10::BFloat16>();
  }
  const int64_t* ids = nullptr;
  if (experts.has_value()) {
    TORCH_CHECK(experts->scalar_type() == at::kLong && experts->numel() == M && experts->is_contiguous(),
                "bf16_linear: experts must be [M] int64");
    ids = experts->const_data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) TORCH_CHECK(ids[m] >= 0 && ids[m] < E, "bf16_linear: expert out of range");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const c10::BFloat16* xp = x.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = w.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> c(M * kPanel);  // this panel's sums for every row, across passes over the inputs
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K - k0);
        for (int64_t m = 0; m < M;) {
          const int64_t e = ids ? ids[m] : 0;
          int64_t rows = 1;  // consecutive rows through the same matrix share one pass over its panel
          while (rows < kTileRows && m + rows < M && (ids ? ids[m + rows] : 0) == e) ++rows;
          const c10::BFloat16* panel = wp + ((e * panels + p) * K + k0) * kPanel;
          kTiles[rows](xp + m * K + k0, K, panel, depth, c.data() + m * kPanel, k0 > 0);
          m += rows;
        }
      }
      for (int64_t m = 0; m < M; ++m)
        store_row(c.data() + m * kPanel, bp ? bp + p * kPanel : nullptr, op + m * N + p * kPanel);
    }
  });
  return out;
}

// Whether the library was built with AVX512-BF16: else bf16_linear and int8_gemm run slow portable loops.
bool built_with_avx512_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

#ifndef LLMCLI_OPS_NAMESPACE
#define LLMCLI_OPS_NAMESPACE llmcli
#endif

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, Tensor? experts) -> Tensor");
  m.def("built_with_avx512_bf16() -> bool", &built_with_avx512_bf16);
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
