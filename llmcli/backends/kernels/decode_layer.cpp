// A whole decoder layer for one new token, its products on the integer kernels or in bfloat16 panels: the Qwen
// families' (dense or MoE) and DeepSeek's (latent attention, then MoE or a dense MLP). Compiled as part of
// int_dot.cpp (included after decode_ops.cpp, whose ops it calls) and called by llmcli/backends/decode_ops.py.
//
// With every product and the small steps already single ops, an eager decode step of the Qwen2.5-0.5B shape still
// spent about 2 ms of 15 in Python between them: module calls, the checks of which op applies, one dispatch per op.
// Here the layer's ops run back to back from C++: the same functions and torch ops, in the same order, with the same
// rounding (the residual adds are torch's), so the logits are those of the op-by-op path bit for bit.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>

namespace {

// The product of one linear on the integer kernels: int4 blocks (uint8) or int8 blocks, with an optional bias.
at::Tensor integer_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                           const std::optional<at::Tensor>& bias) {
  return w.scalar_type() == at::kByte ? int4_dot(x, w, s, std::nullopt, bias) : int8_dot(x, w, s, std::nullopt, bias);
}

#define LLMCLI_QUOTE2(name) #name
#define LLMCLI_QUOTE(name) LLMCLI_QUOTE2(name)

// x [..., in] through bfloat16 panels (one matrix, or a stack with each row's expert), as BlockedLinear and the
// stacked experts call bf16_linear (which another translation unit defines: called through the dispatcher), the
// outputs padded to whole panels cut back to `outputs`.
at::Tensor panels_product(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& experts, int64_t outputs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(LLMCLI_QUOTE(LLMCLI_OPS_NAMESPACE) "::bf16_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&)>();
  const at::Tensor out = op.call(x.reshape({-1, x.size(-1)}).contiguous(), panels.dim() == 4 ? panels.unsqueeze(0) : panels,
                                 bias, experts);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(-1);
  const at::Tensor shaped = out.view(shape);
  return shaped.size(-1) > outputs ? shaped.narrow(-1, 0, outputs) : shaped;
}

// One linear's product: bfloat16 panels (no scales) or the integer kernels' blocks (with their scales).
at::Tensor product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& s,
                   const std::optional<at::Tensor>& bias, int64_t outputs) {
  return s.has_value() ? integer_product(x, w, *s, bias) : panels_product(x, w, bias, std::nullopt, outputs);
}

// A SwiGLU MLP (gate and up fused): the integer kernels' op, or with bfloat16 panels as the model computes it:
// gate, up = gate_up(x).chunk(2); down(silu(gate) * up).
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_s,
                  int64_t gate_up_outputs, const at::Tensor& down, const std::optional<at::Tensor>& down_s,
                  int64_t down_outputs) {
  if (gate_up_s.has_value())
    return int_swiglu(x, gate_up, *gate_up_s, down, *down_s, std::nullopt, std::nullopt);
  const auto halves = panels_product(x, gate_up, std::nullopt, std::nullopt, gate_up_outputs).chunk(2, -1);
  return panels_product(at::mul(at::silu(halves[0]), halves[1]), down, std::nullopt, std::nullopt, down_outputs);
}

// Each row of flat [N, hidden] through its k experts [N, k] of the stacks, mixed by weights [N, k] in float32: the
// integer kernels' op, or with bfloat16 panels as StackedExperts computes it.
at::Tensor routed_experts(const at::Tensor& flat, const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_s,
                          int64_t gate_up_outputs, const at::Tensor& down, const std::optional<at::Tensor>& down_s,
                          int64_t down_outputs, const at::Tensor& experts, const at::Tensor& weights) {
  if (gate_up_s.has_value()) return int_swiglu(flat, gate_up, *gate_up_s, down, *down_s, experts, weights);
  const at::Tensor ids = experts.reshape({-1});
  const at::Tensor rows = flat.unsqueeze(1).expand({flat.size(0), experts.size(1), flat.size(1)});
  const auto halves = panels_product(rows, gate_up, std::nullopt, ids, gate_up_outputs).chunk(2, -1);
  const at::Tensor outs = panels_product(at::mul(at::silu(halves[0]), halves[1]), down, std::nullopt, ids,
                                         down_outputs);
  return at::mul(outs.to(at::kFloat), weights.unsqueeze(-1)).sum(1).to(flat.scalar_type());
}

// Qwen3's q and k heads normalised together, then each norm's weight (qk_weight [H + KV, D]), with v after them:
// the torch ops of the attention module, in its order, so the same bits.
at::Tensor qk_normed(const at::Tensor& heads_qkv, int64_t qk_heads, const at::Tensor& qk_weight, double eps) {
  const at::Tensor qk = heads_qkv.narrow(1, 0, qk_heads);
  const at::Tensor h = qk.to(at::kFloat);
  const at::Tensor factor = h.pow(2).mean(-1, true).add_(eps).rsqrt_();
  const at::Tensor normed = at::mul(qk_weight, at::mul(h, factor).to(qk.scalar_type()));
  return at::cat({normed, heads_qkv.narrow(1, qk_heads, heads_qkv.size(1) - qk_heads)}, 1);
}

// A Qwen MoE block for a few rows h [B, 1, hidden], as the model computes it: router logits in the model's dtype,
// softmax in float32, top-k (renormalised with `normalise`), the weights cast back; the routed experts through
// their stacks; then, where there is one, the shared expert times sigmoid(shared_gate . h). The router: its weight,
// or a PanelRouter's panels (padded to whole panels, cut back to `experts_count`). `outputs`: the widths of the
// shared expert's gate_up and down, then the experts'.
at::Tensor qwen_moe(const at::Tensor& h, const at::Tensor& router, int64_t experts_count, int64_t top_k,
                    bool normalise, const at::Tensor& experts_gate_up,
                    const std::optional<at::Tensor>& experts_gate_up_s,
                    const at::Tensor& experts_down, const std::optional<at::Tensor>& experts_down_s,
                    const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& gate_up_w,
                    const std::optional<at::Tensor>& gate_up_s, const std::optional<at::Tensor>& down_w,
                    const std::optional<at::Tensor>& down_s, at::IntArrayRef outputs) {
  const at::Tensor flat = h.reshape({-1, h.size(-1)});
  const at::Tensor logits = router.dim() == 4 ? panels_product(flat, router, std::nullopt, std::nullopt, experts_count)
                                              : at::linear(flat, router);
  const at::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [weights, experts] = at::topk(probs, top_k, -1);
  if (normalise) weights = at::div(weights, weights.sum(-1, true));
  const at::Tensor routed = routed_experts(flat, experts_gate_up, experts_gate_up_s, outputs[2], experts_down,
                                           experts_down_s, outputs[3], experts,
                                           weights.to(logits.scalar_type()).to(at::kFloat)).view(h.sizes());
  if (!shared_gate.has_value()) return routed;
  const at::Tensor shared = swiglu(h, *gate_up_w, gate_up_s, outputs[0], *down_w, down_s, outputs[1]);
  return at::add(routed, at::mul(at::sigmoid(at::linear(h, *shared_gate)), shared));
}

// x [B, 1, hidden] -> the layer's output: x + attention(norm1(x)) = mid, then mid + mlp(norm2(mid)). qkv and o are
// the attention's fused q/k/v and output products (the integer kernels' blocks with their scales, or bfloat16
// panels without); Qwen3's q/k norms with qk_norm; the attention as decode_attention computes it (RoPE, the cache
// write at `position`, softmax). The MLP: with a router, the MoE block (moe: [top_k, normalise, experts];
// gate_up/down then the shared expert's, if any), else the dense MLP's gate_up and down. `outputs`: the widths of
// qkv, o, gate_up, down, the experts' gate_up and down (bfloat16 panels pad them).
at::Tensor qwen_decode_layer(const at::Tensor& x, const at::Tensor& norm1, double eps1, const at::Tensor& qkv_w,
                             const std::optional<at::Tensor>& qkv_s, const std::optional<at::Tensor>& qkv_bias,
                             const std::optional<at::Tensor>& qk_norm, double qk_eps, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, int64_t position,
                             int64_t heads, int64_t head_dim, int64_t window, double scale, const at::Tensor& o_w,
                             const std::optional<at::Tensor>& o_s, const std::optional<at::Tensor>& o_bias,
                             const at::Tensor& norm2, double eps2, const std::optional<at::Tensor>& gate_up_w,
                             const std::optional<at::Tensor>& gate_up_s, const std::optional<at::Tensor>& down_w,
                             const std::optional<at::Tensor>& down_s, const std::optional<at::Tensor>& router,
                             at::IntArrayRef moe, const std::optional<at::Tensor>& experts_gate_up,
                             const std::optional<at::Tensor>& experts_gate_up_s,
                             const std::optional<at::Tensor>& experts_down,
                             const std::optional<at::Tensor>& experts_down_s,
                             const std::optional<at::Tensor>& shared_gate, at::IntArrayRef outputs) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && head_dim > 0, "qwen_decode_layer: x must be [B, 1, hidden]");
  TORCH_CHECK(outputs.size() == 6, "qwen_decode_layer: outputs must give the six products' widths");
  const bool dense = !router.has_value(), shared = shared_gate.has_value();
  TORCH_CHECK((dense || shared) == (gate_up_w.has_value() && down_w.has_value()),
              "qwen_decode_layer: a dense MLP or a shared expert needs gate_up and down");
  TORCH_CHECK(dense || (moe.size() == 3 && experts_gate_up.has_value() && experts_down.has_value()),
              "qwen_decode_layer: a router needs [top_k, normalise, experts] and the experts' stacks");
  const int64_t B = x.size(0);
  const at::Tensor qkv = product(rms_norm(x.contiguous(), norm1, eps1), qkv_w, qkv_s, qkv_bias, outputs[0]);
  at::Tensor heads_qkv = qkv.contiguous().view({B, -1, head_dim});
  if (qk_norm.has_value()) heads_qkv = qk_normed(heads_qkv, qk_norm->size(0), *qk_norm, qk_eps);
  const at::Tensor heads_out = decode_attention(heads_qkv.contiguous(), cos, sin, k_cache, v_cache, position, heads,
                                                window, scale);
  const at::Tensor mid = at::add(x, product(heads_out.view({B, 1, -1}), o_w, o_s, o_bias, outputs[1]));
  const at::Tensor h = rms_norm(mid, norm2, eps2);
  const at::Tensor mlp = dense ? swiglu(h, *gate_up_w, gate_up_s, outputs[2], *down_w, down_s, outputs[3])
                               : qwen_moe(h, *router, moe[2], moe[0], moe[1] != 0, *experts_gate_up, experts_gate_up_s,
                                          *experts_down, experts_down_s, shared_gate, gate_up_w, gate_up_s, down_w,
                                          down_s, outputs.slice(2));
  return at::add(mid, mlp);
}

// x [B, 1, hidden] -> DeepSeek's layer with q_lora and q_a/kv_a fused (in_w: q_a's `q_rank` outputs, then kv_a's):
// the latent attention as mla_decode computes it, then, with a router, the routed experts (stacks, each row's k
// chosen by `route` with routing = [top_k, method, n_group, topk_group, sigmoid, normalise]) plus the shared
// experts (mlp_*), else the dense MLP (mlp_*). Products in bfloat16 panels have no scales; `outputs` holds each
// product's width (in, q_b, o, mlp gate_up, mlp down, experts' gate_up, experts' down) to cut the panels' padding.
at::Tensor deepseek_decode_layer(
    const at::Tensor& x, const at::Tensor& norm1, double eps1, const at::Tensor& in_w,
    const std::optional<at::Tensor>& in_s, int64_t q_rank, const at::Tensor& q_norm, double q_eps,
    const at::Tensor& q_b_w, const std::optional<at::Tensor>& q_b_s, int64_t heads, const at::Tensor& kv_norm,
    double kv_eps, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache, int64_t position,
    const at::Tensor& wkv_b, int64_t v_dim, double scale, bool interleaved, const at::Tensor& o_w,
    const std::optional<at::Tensor>& o_s, const at::Tensor& norm2, double eps2, const std::optional<at::Tensor>& router,
    const std::optional<at::Tensor>& router_bias, at::IntArrayRef routing, double scaling,
    const std::optional<at::Tensor>& experts_gate_up, const std::optional<at::Tensor>& experts_gate_up_s,
    const std::optional<at::Tensor>& experts_down, const std::optional<at::Tensor>& experts_down_s,
    const at::Tensor& mlp_gate_up, const std::optional<at::Tensor>& mlp_gate_up_s, const at::Tensor& mlp_down,
    const std::optional<at::Tensor>& mlp_down_s, at::IntArrayRef outputs) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "deepseek_decode_layer: x must be [B, 1, hidden]");
  TORCH_CHECK(outputs.size() == 7, "deepseek_decode_layer: outputs must give the seven products' widths");
  TORCH_CHECK(!router.has_value() || (routing.size() == 6 && experts_gate_up.has_value() && experts_down.has_value()),
              "deepseek_decode_layer: a router needs its six routing numbers and the experts' stacks");
  const int64_t B = x.size(0);
  const at::Tensor both = product(rms_norm(x.contiguous(), norm1, eps1), in_w, in_s, std::nullopt, outputs[0]);
  const at::Tensor q_a = both.narrow(-1, 0, q_rank).contiguous();
  const at::Tensor kv = both.narrow(-1, q_rank, both.size(-1) - q_rank).contiguous();
  const at::Tensor q = product(rms_norm(q_a, q_norm, q_eps), q_b_w, q_b_s, std::nullopt, outputs[1]);
  const at::Tensor attn = mla_decode(q.contiguous().view({B, heads, -1}), kv, kv_norm, kv_eps, cos, sin, cache,
                                     position, wkv_b, v_dim, scale, interleaved);
  const at::Tensor mid = at::add(x, product(attn.view({B, 1, -1}), o_w, o_s, std::nullopt, outputs[2]));
  const at::Tensor h = rms_norm(mid, norm2, eps2);
  at::Tensor mlp = swiglu(h, mlp_gate_up, mlp_gate_up_s, outputs[3], mlp_down, mlp_down_s, outputs[4]);
  if (router.has_value()) {
    const at::Tensor flat = h.reshape({-1, h.size(-1)});
    const auto [experts, weights, scores, groups] = route(flat, *router, router_bias, routing[0], routing[1],
                                                         routing[2], routing[3], routing[4] != 0, routing[5] != 0,
                                                         scaling);
    const at::Tensor routed = routed_experts(flat, *experts_gate_up, experts_gate_up_s, outputs[5], *experts_down,
                                             experts_down_s, outputs[6], experts, weights.to(at::kFloat));
    mlp = at::add(routed.view(x.sizes()), mlp);  // routed + shared, as the model adds them
  }
  return at::add(mid, mlp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLMCLI_OPS_NAMESPACE, m) {
  m.def("qwen_decode_layer(Tensor x, Tensor norm1, float eps1, Tensor qkv_w, Tensor? qkv_s, Tensor? qkv_bias, "
        "Tensor? qk_norm, float qk_eps, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int position, "
        "int heads, int head_dim, int window, float scale, Tensor o_w, Tensor? o_s, Tensor? o_bias, Tensor norm2, "
        "float eps2, Tensor? gate_up_w, Tensor? gate_up_s, Tensor? down_w, Tensor? down_s, Tensor? router, int[] moe, "
        "Tensor? experts_gate_up, Tensor? experts_gate_up_s, Tensor? experts_down, Tensor? experts_down_s, "
        "Tensor? shared_gate, int[] outputs) -> Tensor");
  m.def("deepseek_decode_layer(Tensor x, Tensor norm1, float eps1, Tensor in_w, Tensor? in_s, int q_rank, "
        "Tensor q_norm, float q_eps, Tensor q_b_w, Tensor? q_b_s, int heads, Tensor kv_norm, float kv_eps, Tensor cos, "
        "Tensor sin, Tensor(a!) cache, int position, Tensor wkv_b, int v_dim, float scale, bool interleaved, "
        "Tensor o_w, Tensor? o_s, Tensor norm2, float eps2, Tensor? router, Tensor? router_bias, int[] routing, "
        "float scaling, Tensor? experts_gate_up, Tensor? experts_gate_up_s, Tensor? experts_down, "
        "Tensor? experts_down_s, Tensor mlp_gate_up, Tensor? mlp_gate_up_s, Tensor mlp_down, Tensor? mlp_down_s, "
        "int[] outputs) -> Tensor");
}
TORCH_LIBRARY_IMPL(LLMCLI_OPS_NAMESPACE, CPU, m) {
  m.impl("qwen_decode_layer", &qwen_decode_layer);
  m.impl("deepseek_decode_layer", &deepseek_decode_layer);
}
