// One decode step of a Llama-family model, the same ATen calls in the same order as the Python model
// file (models/llama.py, quant.py, kv_cache.py, models/attention.py) for one new token per row at one
// shared position, issued from C++. The Python path spends ~40% of a batch-1 step of the default
// model dispatching ~25 small ops per layer; here each costs a C++ call, and the results are the
// same bits (tests/engine/test_native.py compares them with torch.equal).
//
// A linear layer is three tensors and a kind:
//   0 fp32 nn.Linear       (weight, unused, bias?)
//   1 bf16                 (weight bf16, unused, bias?)
//   2 int8 weight-only     (qweight int8 (N, K), scale bf16 (N,), bias?)
//   3 int4 weight-only     (packed int4pack, scales_zeros bf16 (K/32, N, 2), bias?)
#include <torch/extension.h>

#include <vector>

namespace {

constexpr int64_t kGroup = 32;

torch::Tensor linear(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const c10::optional<torch::Tensor>& bias,
                     const torch::Tensor& x) {
  if (kind == 0) {
    return at::linear(x, a, bias);
  }
  torch::Tensor y;
  auto shape = x.sizes().vec();
  if (kind == 1) {
    y = at::linear(x.to(at::kBFloat16), a).to(x.scalar_type());
  } else {
    auto rows = x.reshape({-1, x.size(-1)}).to(at::kBFloat16);
    if (kind == 2) {
      y = at::_weight_int8pack_mm(rows, a, b);
      shape.back() = a.size(0);
    } else {
      y = at::_weight_int4pack_mm_for_cpu(rows, a, kGroup, b);
      shape.back() = b.size(1);
    }
    y = y.reshape(shape).to(x.scalar_type());
  }
  return bias.has_value() ? y + *bias : y;
}

}  // namespace

// x: (B, 1, C) embeddings; cos, sin: rope rows broadcastable to (B, 1, heads, D); kc, vc: (L, B, Hkv, S, D)
// caches. positions: each row's position; per_row: rows at their own positions, each attending over
// exactly its own keys (the batched engine), else one shared position (positions[0]) for all rows,
// attending over n_keys keys. norms: 2 per layer (attention, MLP) then the final one. kinds/tensors:
// 4 linears per layer (wqkv, wo, w13, w2) then the head, 3 tensors each (None where unused).
// Returns the logits (B, V) in fp32.
torch::Tensor decode_step(torch::Tensor x, const std::vector<int64_t>& positions, bool per_row, int64_t n_keys,
                          const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                          const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
                          const std::vector<c10::optional<torch::Tensor>>& tensors, int64_t n_heads, int64_t n_kv,
                          int64_t head_dim, double eps) {
  torch::NoGradGuard no_grad;
  const int64_t L = kc.size(0), B = x.size(0), C = x.size(-1), H = n_heads;
  const bool gqa = n_kv != n_heads;
  static const torch::Tensor none;
  auto lin = [&](int64_t i, const torch::Tensor& in) {
    const auto& b = tensors[3 * i + 1];
    return linear(kinds[i], *tensors[3 * i], b.has_value() ? *b : none, tensors[3 * i + 2], in);
  };
  for (int64_t layer = 0; layer < L; ++layer) {
    auto h = at::rms_norm(x, {C}, norms[2 * layer], eps);
    auto qkv = lin(4 * layer, h).view({B, 1, H + 2 * n_kv, head_dim});
    auto qk_in = qkv.slice(2, 0, H + n_kv);
    auto qk = qk_in * cos + at::roll(qk_in, {head_dim / 2}, {-1}) * sin;
    auto q = qk.slice(2, 0, H).transpose(1, 2);
    auto k = qk.slice(2, H).transpose(1, 2);
    auto v = qkv.slice(2, H + n_kv).transpose(1, 2);
    const auto& k_layer = kc[layer];
    const auto& v_layer = vc[layer];
    torch::Tensor y;
    if (per_row) {
      std::vector<torch::Tensor> rows;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t p = positions[b];
        k_layer[b].slice(1, p, p + 1).copy_(k[b]);
        v_layer[b].slice(1, p, p + 1).copy_(v[b]);
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t e = positions[b] + 1;
        rows.push_back(at::scaled_dot_product_attention(
            q.slice(0, b, b + 1), k_layer.slice(0, b, b + 1).slice(2, 0, e), v_layer.slice(0, b, b + 1).slice(2, 0, e),
            c10::nullopt, 0.0, false, c10::nullopt, gqa));
      }
      y = at::cat(rows);
    } else {
      const int64_t p = positions[0];
      k_layer.slice(2, p, p + 1).copy_(k);
      v_layer.slice(2, p, p + 1).copy_(v);
      y = at::scaled_dot_product_attention(q, k_layer.slice(2, 0, n_keys), v_layer.slice(2, 0, n_keys), c10::nullopt, 0.0,
                                           false, c10::nullopt, gqa);
    }
    y = y.transpose(1, 2).reshape({B, 1, H * head_dim});
    x = x + lin(4 * layer + 1, y);
    h = at::rms_norm(x, {C}, norms[2 * layer + 1], eps);
    auto gate_up = lin(4 * layer + 2, h).chunk(2, -1);
    x = x + lin(4 * layer + 3, at::silu(gate_up[0]) * gate_up[1]);
  }
  auto h = at::rms_norm(x, {C}, norms[2 * L], eps);
  return lin(4 * L, h.select(1, -1)).to(at::kFloat);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "One Llama decode step (see native_step.cpp)");
}
