// Weight-only int8 products for a few rows (decoding) on CPU; built and called by llmcli/int8_kernel.py.
//
// A one-token step is bound by streaming the weights from memory. Stored row by row, the 8 rows a
// block works on are 8 short interleaved streams, which the hardware prefetcher follows badly
// (measured about 14 GB/s). Here each block of 8 rows is stored as [in/16][8][16]: the loop reads
// memory strictly in order, one 128-byte run per 16 inputs, at about 30 GB/s on 2 cores.
#include "dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 8;    // output rows per block
constexpr int64_t kChunk = 16;  // inputs per chunk (one AVX-512 register of floats)

// sums[p][r] = sum_k x[p][k] * w[r][k] for the kRows rows of one block and P input rows (x[p] is
// x + p * K): each weight vector is converted once for all P of them (beyond one row the loop is
// compute-bound). P <= 3 keeps the 8P accumulators in the 32 AVX-512 registers.
template <int P>
inline void block_dot(const float* x, const int8_t* w, int64_t K, float (*sums)[kRows]) {
#if defined(__AVX512F__)
  __m512 acc[P][kRows];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kChunk, w += kRows * kChunk) {
    __m512 xv[P];
    for (int p = 0; p < P; ++p) xv[p] = _mm512_loadu_ps(x + p * K + k);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * kChunk));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
      for (int p = 0; p < P; ++p) acc[p][r] = _mm512_fmadd_ps(xv[p], wv, acc[p][r]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int64_t r = 0; r < kRows; ++r) sums[p][r] = _mm512_reduce_add_ps(acc[p][r]);
#else  // the compiler vectorises this form on other CPUs (16 independent lanes per row)
  float acc[P][kRows][kChunk] = {};
  for (int64_t k = 0; k < K; k += kChunk, w += kRows * kChunk)
    for (int64_t r = 0; r < kRows; ++r)
      for (int p = 0; p < P; ++p)
        for (int64_t j = 0; j < kChunk; ++j) acc[p][r][j] += x[p * K + k + j] * static_cast<float>(w[r * kChunk + j]);
  for (int p = 0; p < P; ++p)
    for (int64_t r = 0; r < kRows; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < kChunk; ++j) s += acc[p][r][j];
      sums[p][r] = s;
    }
#endif
}

// x [M, K]; w [E, N/8, K/16, 8, 16] int8; scales [E, N]; experts: optional [M] int64, the matrix each
// row of x goes through (MoE), else matrix 0. Returns [M, N] = (x @ w[e].T) * scales[e], in x's dtype.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& experts) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "int8_gemv: x must be 2-D, contiguous, CPU");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 5 && w.is_contiguous() && w.size(3) == kRows &&
                  w.size(4) == kChunk, "int8_gemv: w must be int8 blocks [E, N/8, K/16, 8, 16]");
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), blocks = w.size(1), N = blocks * kRows;
  TORCH_CHECK(w.size(2) * kChunk == K, "int8_gemv: x has ", K, " inputs, w ", w.size(2) * kChunk);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == E && scales.size(1) == N && scales.is_contiguous() &&
                  scales.scalar_type() == x.scalar_type(), "int8_gemv: scales must be [E, N] in x's dtype");
  const int64_t* ids = nullptr;
  if (experts.has_value()) {
    TORCH_CHECK(experts->scalar_type() == at::kLong && experts->numel() == M && experts->is_contiguous(),
                "int8_gemv: experts must be [M] int64");
    ids = experts->const_data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) TORCH_CHECK(ids[m] >= 0 && ids[m] < E, "int8_gemv: expert out of range");
  }
  at::Tensor xf = at::empty({M, K}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, N}, x.options());
  LLMCLI_DISPATCH_FLOATS(x.scalar_type(), "int8_gemv", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    float* xfp = xf.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) xfp[i] = static_cast<float>(xs[i]);
    const scalar_t* sp = scales.const_data_ptr<scalar_t>();
    const int8_t* wp = w.const_data_ptr<int8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      float sums[3][kRows];
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t m = 0; m < M;) {
          const int64_t e = ids ? ids[m] : 0;
          // consecutive rows through the same matrix share one pass over its block
          int64_t P = 1;
          while (P < 3 && m + P < M && (ids ? ids[m + P] : 0) == e) ++P;
          const float* xm = xfp + m * K;
          const int8_t* block = wp + (e * blocks + b) * kRows * K;
          if (P == 3) block_dot<3>(xm, block, K, sums);
          else if (P == 2) block_dot<2>(xm, block, K, sums);
          else block_dot<1>(xm, block, K, sums);
          for (int64_t p = 0; p < P; ++p)
            for (int64_t r = 0; r < kRows; ++r) {
              const int64_t n = b * kRows + r;
              op[(m + p) * N + n] = static_cast<scalar_t>(sums[p][r] * static_cast<float>(sp[e * N + n]));
            }
          m += P;
        }
      }
    });
  });
  return out;
}

// The weight back as row-major [N, K] in `dtype` (for products over many rows: a prompt), in one pass.
at::Tensor int8_unblock(const at::Tensor& w, at::ScalarType dtype) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.is_contiguous() && w.size(2) == kRows &&
                  w.size(3) == kChunk, "int8_unblock: w must be int8 blocks [N/8, K/16, 8, 16]");
  const int64_t blocks = w.size(0), chunks = w.size(1), K = chunks * kChunk;
  at::Tensor out = at::empty({blocks * kRows, K}, w.options().dtype(dtype));
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "int8_unblock", [&] {
    const int8_t* wp = w.const_data_ptr<int8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {  // read in stored order, write 8 rows side by side
        const int8_t* src = wp + b * kRows * K;
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t r = 0; r < kRows; ++r, src += kChunk) {
            scalar_t* dst = op + (b * kRows + r) * K + c * kChunk;
            for (int64_t j = 0; j < kChunk; ++j) dst[j] = static_cast<scalar_t>(src[j]);
          }
      }
    });
  });
  return out;
}

// Prompts: x [M, K] bfloat16 (M large) through an int8 weight in blocks. Per block of 8 rows, the weight
// is converted once to bfloat16 in its stored order (exact: |q| <= 127), in a buffer that stays in L1,
// then every 6 rows of x reuse it: with AVX512-BF16 each dot-product instruction multiplies 16 inputs of
// one x row (8 pairs, the same 16 for both halves of the register) by 2 weight rows, and the 8 pair sums
// per weight row are added at the end. The conversion is paid once per block, not once per row.
#if defined(__AVX512BF16__)
template <int M>
inline void block_gemm_bf16(const c10::BFloat16* x, int64_t K, const c10::BFloat16* wb, float (*sums)[kRows]) {
  __m512 acc[M][4];  // acc[m][j]: lanes 0-7 pair sums of weight row 2j, lanes 8-15 of row 2j+1
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kChunk, wb += kRows * kChunk) {
    __m512bh b[4];
    for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(wb + j * 2 * kChunk);
    for (int m = 0; m < M; ++m) {
      const __m512bh a = (__m512bh)_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k)));
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, b[j]);
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  auto pair_sums = [&](__m512 a, __m512 b) {  // lane i: a[2i] + a[2i+1] (i < 8), then the same for b
    return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
  };
  for (int m = 0; m < M; ++m) {
    const __m512 rows0123 = pair_sums(acc[m][0], acc[m][1]);  // 4 partial sums per row, rows 0-3
    const __m512 rows4567 = pair_sums(acc[m][2], acc[m][3]);
    const __m512 halves = pair_sums(rows0123, rows4567);  // 2 per row, rows 0-7
    _mm256_storeu_ps(sums[m], _mm512_castps512_ps256(pair_sums(halves, halves)));
  }
}
#endif

// out [M, N] = (x @ w.T) * scales (+ bias), x bfloat16; w [N/8, K/16, 8, 16] int8; scales, bias [N].
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "int8_gemm: x must be 2-D, contiguous, bfloat16, CPU");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.is_contiguous() && w.size(2) == kRows &&
                  w.size(3) == kChunk, "int8_gemm: w must be int8 blocks [N/8, K/16, 8, 16]");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * kRows;
  TORCH_CHECK(w.size(1) * kChunk == K, "int8_gemm: x has ", K, " inputs, w ", w.size(1) * kChunk);
  TORCH_CHECK(scales.numel() == N && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16,
              "int8_gemm: scales must be [N] bfloat16");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->is_contiguous() &&
                                    bias->scalar_type() == at::kBFloat16), "int8_gemm: bias must be [N] bfloat16");
  const c10::BFloat16* bp = bias.has_value() ? bias->const_data_ptr<c10::BFloat16>() : nullptr;
  const c10::BFloat16* xp = x.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* sp = scales.const_data_ptr<c10::BFloat16>();
  const int8_t* wp = w.const_data_ptr<int8_t>();
  at::Tensor out = at::empty({M, N}, x.options());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> wb(kRows * K);  // one block, converted
    float sums[6][kRows];
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* q = wp + b * kRows * K;
#if defined(__AVX512BF16__)
      for (int64_t i = 0; i < kRows * K; i += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb.data() + i), (__m256i)_mm512_cvtneps_pbh(v));
      }
#else
      for (int64_t i = 0; i < kRows * K; ++i) wb[i] = c10::BFloat16(static_cast<float>(q[i]));
#endif
      for (int64_t m = 0; m < M; m += 6) {
        const int64_t rows = std::min<int64_t>(6, M - m);
#if defined(__AVX512BF16__)
        switch (rows) {
          case 6: block_gemm_bf16<6>(xp + m * K, K, wb.data(), sums); break;
          case 5: block_gemm_bf16<5>(xp + m * K, K, wb.data(), sums); break;
          case 4: block_gemm_bf16<4>(xp + m * K, K, wb.data(), sums); break;
          case 3: block_gemm_bf16<3>(xp + m * K, K, wb.data(), sums); break;
          case 2: block_gemm_bf16<2>(xp + m * K, K, wb.data(), sums); break;
          default: block_gemm_bf16<1>(xp + m * K, K, wb.data(), sums); break;
        }
#else
        for (int64_t p = 0; p < rows; ++p)
          for (int64_t r = 0; r < kRows; ++r) {
            float s = 0.f;
            for (int64_t c = 0; c < K / kChunk; ++c)
              for (int64_t j = 0; j < kChunk; ++j)
                s += static_cast<float>(xp[(m + p) * K + c * kChunk + j]) *
                     static_cast<float>(wb[(c * kRows + r) * kChunk + j]);
            sums[p][r] = s;
          }
#endif
#if defined(__AVX512BF16__)
        auto widen = [](const c10::BFloat16* v) {  // 8 bf16 -> 8 floats (a 16-bit shift)
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
          return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        };
        const __m256 scale = widen(sp + b * kRows);
        const __m256 shift = bp ? widen(bp + b * kRows) : _mm256_setzero_ps();
        for (int64_t p = 0; p < rows; ++p) {
          const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(sums[p]), scale, shift);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(op + (m + p) * N + b * kRows), (__m128i)_mm256_cvtneps_pbh(v));
        }
#else
        for (int64_t p = 0; p < rows; ++p)
          for (int64_t r = 0; r < kRows; ++r) {
            const int64_t n = b * kRows + r;
            const float v = sums[p][r] * static_cast<float>(sp[n]) + (bp ? static_cast<float>(bp[n]) : 0.f);
            op[(m + p) * N + n] = c10::BFloat16(v);
          }
#endif
      }
    }
  });
  return out;
}

}  // namespace

#ifndef LLMCLI_OPS_NAMESPACE
#define LLMCLI_OPS_NAMESPACE llmcli
#endif

TORCH_LIBRARY(LLMCLI_OPS_NAMESPACE, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales, Tensor? experts) -> Tensor");
  m.def("int8_unblock(Tensor w, ScalarType dtype) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_unblock", &int8_unblock);
  m.impl("int8_gemm", &int8_gemm);
}
