// bfloat16 products for any number of rows on CPU, decoding and prompts alike, from one weight layout;
// built with int8_gemv.cpp and called by llmcli/bf16_kernel.py.
//
// Weights are stored in panels of 64 outputs: [N/64][K/2][64][2], the two inputs of a pair side by
// side, which is what AVX512-BF16's dot-product instruction reads (one 64-byte load = 16 outputs x 2
// inputs). A one-row product streams each panel in order (29-42 GB/s from memory on 2 cores, the
// machine's limit at the time, against 25-33 for oneDNN's prepacked product and 11-17 for F.linear).
// Many rows reuse each panel slice from L2 for 6 rows at a time (24 accumulators): 420-450 GFLOP/s,
// oneDNN prepacked 410-450 (benchmarks/bf16_gemm.py).
//
// CPUs with AVX2 and FMA but no AVX512-BF16 (AMD before Zen 4, Intel client CPUs) read the same panels:
// a bf16 value is the top half of a float, so each 32-bit lane of a pair gives its two floats with one
// shift and one mask. One row streams the panel so; many rows first widen a panel slice to floats in L2
// and run float32 FMA tiles of 6 rows x 16 outputs over it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
#define LLMCLI_BF16_AVX2 1
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

// out[0..63] = c + bias, unrounded (float32 outputs: a head's logits keep the sums' precision).
inline void store_row(const float* c, const c10::BFloat16* bias, float* out) {
  for (int64_t n = 0; n < kPanel; ++n) out[n] = c[n] + (bias ? static_cast<float>(bias[n]) : 0.f);
}

using TileFn = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, float*, bool);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

#if defined(LLMCLI_BF16_AVX2)
constexpr int64_t kWideDepth = 1024;  // inputs per pass when widened: a 256 KiB float slice stays in L2

// One row: c[0..63] (+)= x[0..depth) . panel slice, the bf16 pairs turned into floats as they stream in.
inline void row_avx2(const float* x, const c10::BFloat16* w, int64_t depth, float* c, bool accumulate) {
  __m256 acc[8];
  for (int g = 0; g < 8; ++g) acc[g] = accumulate ? _mm256_loadu_ps(c + g * 8) : _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t i = 0; i < depth / 2; ++i, w += kPanel * 2) {
    const __m256 even = _mm256_set1_ps(x[2 * i]), odd = _mm256_set1_ps(x[2 * i + 1]);
    for (int g = 0; g < 8; ++g) {  // 8 outputs x 2 inputs per 32 bytes
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
      acc[g] = _mm256_fmadd_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), acc[g]);
      acc[g] = _mm256_fmadd_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(v, high)), acc[g]);
    }
  }
  for (int g = 0; g < 8; ++g) _mm256_storeu_ps(c + g * 8, acc[g]);
}

// The panel slice as floats, wf[k][0..63] for k in [0, depth).
inline void widen(const c10::BFloat16* w, int64_t depth, float* wf) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t i = 0; i < depth / 2; ++i, w += kPanel * 2, wf += 2 * kPanel)
    for (int g = 0; g < 8; ++g) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
      _mm256_storeu_ps(wf + g * 8, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      _mm256_storeu_ps(wf + kPanel + g * 8, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
    }
}

// c[r][0..63] (+)= x[r] . wf for R rows (x row stride ldx), 16 outputs at a time: 2R accumulators.
template <int R>
inline void tile_avx2(const float* x, int64_t ldx, const float* wf, int64_t depth, float* c, bool accumulate) {
  for (int64_t j = 0; j < kPanel; j += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        acc[r][h] = accumulate ? _mm256_loadu_ps(c + r * kPanel + j + h * 8) : _mm256_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) {
      const __m256 w0 = _mm256_loadu_ps(wf + k * kPanel + j), w1 = _mm256_loadu_ps(wf + k * kPanel + j + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
        acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + r * kPanel + j + h * 8, acc[r][h]);
  }
}

using WideTileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr WideTileFn kWideTiles[kTileRows + 1] = {nullptr,         tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                                  tile_avx2<4>, tile_avx2<5>, tile_avx2<6>};

// bf16_linear's loop on AVX2: rows through the same matrix one after another share a widened slice.
template <typename Out>
void panels_avx2(const float* xf, const c10::BFloat16* wp, const int64_t* ids, int64_t M, int64_t K,
                 int64_t panels, const c10::BFloat16* bp, Out* op, int64_t N) {
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> c(M * kPanel), wf;
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k0 = 0; k0 < K; k0 += kWideDepth) {
        const int64_t depth = std::min(kWideDepth, K - k0);
        for (int64_t m = 0; m < M;) {
          const int64_t e = ids ? ids[m] : 0;
          int64_t run = 1;
          while (m + run < M && (ids ? ids[m + run] : 0) == e) ++run;
          const c10::BFloat16* panel = wp + ((e * panels + p) * K + k0) * kPanel;
          if (run == 1) {
            row_avx2(xf + m * K + k0, panel, depth, c.data() + m * kPanel, k0 > 0);
          } else {
            wf.resize(depth * kPanel);
            widen(panel, depth, wf.data());
            for (int64_t r = 0; r < run; r += kTileRows) {
              const int64_t rows = std::min(kTileRows, run - r);
              kWideTiles[rows](xf + (m + r) * K + k0, K, wf.data(), depth, c.data() + (m + r) * kPanel, k0 > 0);
            }
          }
          m += run;
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < kPanel; ++n)
          op[m * N + p * kPanel + n] = Out(c[m * kPanel + n] + (bp ? static_cast<float>(bp[p * kPanel + n]) : 0.f));
    }
  });
}
#endif

// The panel loop of bf16_linear (AVX512-BF16 or portable): x [M, K] bf16, out [M, N] bf16 or float.
template <typename Out>
void panels_bf16(const c10::BFloat16* xp, const c10::BFloat16* wp, const int64_t* ids, int64_t M, int64_t K,
                 int64_t panels, const c10::BFloat16* bp, Out* op, int64_t N) {
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
}

// x [M, K] bf16 or float32; w [E, N/64, K/2, 64, 2] bf16; bias: optional [N]; experts: optional [M] int64,
// the matrix each row goes through (MoE), else matrix 0. Returns [M, N] = x @ w[e].T + bias in x's dtype.
// Float32 rows are taken as bfloat16 (their values are, where they come from a bfloat16 model); what float32
// changes is the output: the float sums unrounded, e.g. a head's logits without bfloat16's ties.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& experts) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "bf16_linear: x must be 2-D, contiguous, bfloat16 or float32, CPU");
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
  const at::Tensor xb = x.to(at::kBFloat16);  // the same tensor when x is bfloat16
  const c10::BFloat16* wp = w.const_data_ptr<c10::BFloat16>();
  const bool wide = x.scalar_type() == at::kFloat;
#if defined(LLMCLI_BF16_AVX2)
  const at::Tensor xf = xb.to(at::kFloat);
  if (wide) panels_avx2(xf.const_data_ptr<float>(), wp, ids, M, K, panels, bp, out.data_ptr<float>(), N);
  else panels_avx2(xf.const_data_ptr<float>(), wp, ids, M, K, panels, bp, out.data_ptr<c10::BFloat16>(), N);
#else
  const c10::BFloat16* xp = xb.const_data_ptr<c10::BFloat16>();
  if (wide) panels_bf16(xp, wp, ids, M, K, panels, bp, out.data_ptr<float>(), N);
  else panels_bf16(xp, wp, ids, M, K, panels, bp, out.data_ptr<c10::BFloat16>(), N);
#endif
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

// The instructions bf16_linear runs on: "avx512_bf16", "avx2" (AVX2 + FMA), or "portable" (plain loops).
std::string bf16_isa() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(LLMCLI_BF16_AVX2)
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
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, Tensor? experts) -> Tensor");
  m.def("built_with_avx512_bf16() -> bool", &built_with_avx512_bf16);
  m.def("bf16_isa() -> str", &bf16_isa);
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
