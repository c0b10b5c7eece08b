// One decode step of a Gated DeltaNet layer (Qwen3-Next, Qwen3.5) between its input and output products, as one
// op: the causal conv's step (and its state's shift), SiLU, q/k L2 normalisation, the decay and beta, the gated
// delta rule's state update and read-out, and the gated RMSNorm; called by llmcli/backends/deltanet_op.py.
// Compiled as part of int_dot.cpp (included at its end).
//
// The torch version (models/deltanet.py) takes ~40 small ops a layer and passes over the float32 state
// [heads, dk, dv] five times (decay, prediction, update, read-out, copy back); here each head's state is read and
// written once in place. Values are rounded to the model dtype where the torch version rounds them (the conv's
// output, SiLU, beta, the rule's output, the norm), so results differ from it only in the order of float32 sums.
#include <ATen/ops/empty.h>

namespace {

// x rounded to scalar_t and back: where the torch version holds a value in the model dtype.
template <typename scalar_t>
inline float in_dtype(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// mixed [B, C] (the input product's q|k|v part), z [B, nv*dv], b and a [B, nv], all in the model dtype;
// conv_w [C, Kc] and conv_state [B, C, Kc-1] (updated) in the model dtype; state [B, nv, dk, dv] float32
// (updated); A_log, dt_bias [nv] and norm_w [dv] in any float type; eps the norm's, l2_eps the q/k normalisation's
// (models/deltanet.py's L2_EPS). Returns the normed, gated rule output
// [B, nv*dv] in the model dtype: what the output product reads.
at::Tensor deltanet_step(const at::Tensor& mixed, const at::Tensor& z, const at::Tensor& b, const at::Tensor& a,
                         const at::Tensor& conv_w, at::Tensor& conv_state, at::Tensor& state, const at::Tensor& A_log,
                         const at::Tensor& dt_bias, const at::Tensor& norm_w, double eps, double l2_eps, int64_t nk,
                         int64_t dk, int64_t dv) {
  const int64_t B = mixed.size(0), C = mixed.size(1), nv = state.size(1), width = conv_w.size(1);
  TORCH_CHECK(mixed.dim() == 2 && C == 2 * nk * dk + nv * dv && nv % nk == 0, "deltanet_step: mixed must be [B, ",
              2 * nk * dk + nv * dv, "]");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 4 && state.size(0) == B &&
                  state.size(2) == dk && state.size(3) == dv, "deltanet_step: state must be float32 [B, nv, dk, dv]");
  TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == mixed.scalar_type() &&
                  conv_state.sizes() == at::IntArrayRef({B, C, width - 1}) && conv_w.is_contiguous() &&
                  conv_w.scalar_type() == mixed.scalar_type() && conv_w.size(0) == C,
              "deltanet_step: conv weight [C, Kc] and state [B, C, Kc-1] in the model dtype");
  TORCH_CHECK(mixed.is_contiguous() && z.is_contiguous() && b.is_contiguous() && a.is_contiguous() &&
                  z.scalar_type() == mixed.scalar_type() && b.scalar_type() == mixed.scalar_type() &&
                  a.scalar_type() == mixed.scalar_type() && z.numel() == B * nv * dv && b.numel() == B * nv &&
                  a.numel() == B * nv && A_log.numel() == nv && dt_bias.numel() == nv && norm_w.numel() == dv,
              "deltanet_step: z [B, nv*dv], b and a [B, nv], A_log and dt_bias [nv], norm weight [dv]");
  at::Tensor out = at::empty({B, nv * dv}, mixed.options());
  const RowValues a_log(A_log.contiguous()), bias(dt_bias.contiguous()), weight(norm_w.contiguous());
  const int64_t per_key = nv / nk;
  LLMCLI_DISPATCH_FLOATS(mixed.scalar_type(), "deltanet_step", [&] {
    const scalar_t* wp = conv_w.const_data_ptr<scalar_t>();
    for (int64_t row = 0; row < B; ++row) {
      // the conv's step over [state columns | new input], summed in float32, rounded, SiLU (rounded), then the
      // state shifted by one column
      std::vector<float> conv(C);
      scalar_t* cs = conv_state.data_ptr<scalar_t>() + row * C * (width - 1);
      const scalar_t* xs = mixed.const_data_ptr<scalar_t>() + row * C;
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* col = cs + c * (width - 1);
        float sum = 0.f;
        for (int64_t j = 0; j < width - 1; ++j) sum += static_cast<float>(col[j]) * static_cast<float>(wp[c * width + j]);
        sum += static_cast<float>(xs[c]) * static_cast<float>(wp[c * width + width - 1]);
        conv[c] = in_dtype<scalar_t>(silu(in_dtype<scalar_t>(sum)));
        for (int64_t j = 0; j + 1 < width - 1; ++j) col[j] = col[j + 1];
        if (width > 1) col[width - 2] = xs[c];
      }
      // q and k L2-normalised per key head (q scaled by dk^-1/2), in float32
      std::vector<float> q(nk * dk), k(nk * dk);
      const float scale = 1.f / std::sqrt(static_cast<float>(dk));
      for (int64_t h = 0; h < nk; ++h)
        for (int part = 0; part < 2; ++part) {
          const float* src = conv.data() + part * nk * dk + h * dk;
          float ss = 0.f;
          for (int64_t i = 0; i < dk; ++i) ss += src[i] * src[i];
          const float inv = 1.f / std::sqrt(ss + static_cast<float>(l2_eps));
          float* dst = (part == 0 ? q.data() : k.data()) + h * dk;
          for (int64_t i = 0; i < dk; ++i) dst[i] = part == 0 ? src[i] * inv * scale : src[i] * inv;
        }
      const float* v = conv.data() + 2 * nk * dk;
      const scalar_t* zs = z.const_data_ptr<scalar_t>() + row * nv * dv;
      scalar_t* os = out.data_ptr<scalar_t>() + row * nv * dv;
      at::parallel_for(0, nv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> update(dv), read(dv);
        for (int64_t h = begin; h < end; ++h) {
          const float bh = static_cast<float>(b.const_data_ptr<scalar_t>()[row * nv + h]);
          const float beta = in_dtype<scalar_t>(1.f / (1.f + std::exp(-bh)));  // sigmoid in the model dtype
          const float x = static_cast<float>(a.const_data_ptr<scalar_t>()[row * nv + h]) + bias[h];
          const float softplus = x > 20.f ? x : std::log1p(std::exp(x));
          const float decay = std::exp(-std::exp(a_log[h]) * softplus);
          const float* kh = k.data() + (h / per_key) * dk;
          const float* qh = q.data() + (h / per_key) * dk;
          float* s = state.data_ptr<float>() + (row * nv + h) * dk * dv;
          // decay, and what the decayed state predicts for k: S^T k
          std::fill(update.begin(), update.end(), 0.f);
          for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) update[j] += (s[i * dv + j] *= decay) * kh[i];
          for (int64_t j = 0; j < dv; ++j) update[j] = (v[h * dv + j] - update[j]) * beta;
          // S += k (x) update, and the read-out S^T q of the new state
          std::fill(read.begin(), read.end(), 0.f);
          for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) read[j] += (s[i * dv + j] += kh[i] * update[j]) * qh[i];
          // the gated RMSNorm over the head: rounded as GatedRMSNorm rounds
          float ss = 0.f;
          for (int64_t j = 0; j < dv; ++j) ss += in_dtype<scalar_t>(read[j]) * in_dtype<scalar_t>(read[j]);
          const float inv = 1.f / std::sqrt(ss / static_cast<float>(dv) + static_cast<float>(eps));
          for (int64_t j = 0; j < dv; ++j) {
            const float normed = in_dtype<scalar_t>(weight[j] * in_dtype<scalar_t>(in_dtype<scalar_t>(read[j]) * inv));
            os[h * dv + j] = static_cast<scalar_t>(normed * silu(static_cast<float>(zs[h * dv + j])));
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("deltanet_step(Tensor mixed, Tensor z, Tensor b, Tensor a, Tensor conv_w, Tensor(a!) conv_state, "
        "Tensor(b!) state, Tensor A_log, Tensor dt_bias, Tensor norm_w, float eps, float l2_eps, int nk, int dk, int dv) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("deltanet_step", &deltanet_step);
}
