// Weight-only int8 products for a few rows (decoding) on CPU; built and called by llmcli/int8_kernel.py.
//
// A one-token step is bound by streaming the weights from memory. Stored row by row, the 8 rows a
// block works on are 8 short interleaved streams, which the hardware prefetcher follows badly
// (measured about 14 GB/s). Here each block of 8 rows is stored as [in/16][8][16]: the loop reads
// memory strictly in order, one 128-byte run per 16 inputs, at about 30 GB/s on 2 cores.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX512F__)
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_gemv", [&] {
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

}  // namespace

#ifndef LLMCLI_OPS_NAMESPACE
#define LLMCLI_OPS_NAMESPACE llmcli
#endif

TORCH_LIBRARY(LLMCLI_OPS_NAMESPACE, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales, Tensor? experts) -> Tensor");
  m.def("int8_unblock(Tensor w, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_unblock", &int8_unblock);
}
