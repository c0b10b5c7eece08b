// A whole decoder layer of the Qwen families' dense models for one new token, on the integer kernels: compiled as
// part of int_dot.cpp (included after decode_ops.cpp, whose ops it calls) and called by llmcli/backends/decode_layer.py.
//
// With every product and the small steps already single ops, an eager decode step of the Qwen2.5-0.5B shape still
// spent about 2 ms of 15 in Python between them: module calls, the checks of which op applies, one dispatch per op.
// Here the layer's eight ops run back to back from C++: the same functions, in the same order, with the same
// rounding (the residual adds are torch's), so the logits are those of the op-by-op path bit for bit.
#include <ATen/ops/add.h>

namespace {

// The product of one linear on the integer kernels: int4 blocks (uint8) or int8 blocks, with an optional bias.
at::Tensor integer_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                           const std::optional<at::Tensor>& bias) {
  return w.scalar_type() == at::kByte ? int4_dot(x, w, s, std::nullopt, bias) : int8_dot(x, w, s, std::nullopt, bias);
}

// x [B, 1, hidden] -> the layer's output: x + attention(norm1(x)) = mid, then mid + mlp(norm2(mid)). qkv and o are
// the attention's fused q/k/v and output products, gate_up and down the MLP's (weights and scales as the integer
// ops take them); the attention as decode_attention computes it (RoPE, the cache write at `position`, softmax).
at::Tensor qwen_decode_layer(const at::Tensor& x, const at::Tensor& norm1, double eps1, const at::Tensor& qkv_w,
                             const at::Tensor& qkv_s, const std::optional<at::Tensor>& qkv_bias, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, int64_t position,
                             int64_t heads, int64_t head_dim, int64_t window, double scale, const at::Tensor& o_w,
                             const at::Tensor& o_s, const std::optional<at::Tensor>& o_bias, const at::Tensor& norm2,
                             double eps2, const at::Tensor& gate_up_w, const at::Tensor& gate_up_s,
                             const at::Tensor& down_w, const at::Tensor& down_s) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && head_dim > 0, "qwen_decode_layer: x must be [B, 1, hidden]");
  const int64_t B = x.size(0);
  const at::Tensor qkv = integer_product(rms_norm(x.contiguous(), norm1, eps1), qkv_w, qkv_s, qkv_bias);
  const at::Tensor heads_out = decode_attention(qkv.view({B, -1, head_dim}), cos, sin, k_cache, v_cache, position,
                                                heads, window, scale);
  const at::Tensor mid = at::add(x, integer_product(heads_out.view({B, 1, -1}), o_w, o_s, o_bias));
  const at::Tensor mlp = int_swiglu(rms_norm(mid, norm2, eps2), gate_up_w, gate_up_s, down_w, down_s, std::nullopt,
                                    std::nullopt);
  return at::add(mid, mlp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("qwen_decode_layer(Tensor x, Tensor norm1, float eps1, Tensor qkv_w, Tensor qkv_s, Tensor? qkv_bias, "
        "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int position, int heads, int head_dim, "
        "int window, float scale, Tensor o_w, Tensor o_s, Tensor? o_bias, Tensor norm2, float eps2, Tensor gate_up_w, "
        "Tensor gate_up_s, Tensor down_w, Tensor down_s) -> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("qwen_decode_layer", &qwen_decode_layer);
}
