// One decode step of a Llama-family model (one new token per row), computing exactly what the Python
// model file computes (models/llama.py, quant.py, kv_cache.py, models/attention.py): the same ATen
// kernels for the matmuls, attention and the norms' reductions, and plain loops with the same IEEE
// arithmetic for the element-wise work. The Python path spends ~40% of a batch-1 step of the default
// model dispatching ~25 small ops per layer; here the results are the same bits in ~60% of the time
// (tests/engine/test_native.py compares them with torch.equal). Also: int4 weight unpacking for the
// quantized layers' dense prefill path (int4_unpack).
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

// A linear layer's raw output (B, N): fp32 (nn.Linear, bias already in) or bf16 (the bf16/int8/int4
// kernels, whose bias the Python layers add after casting to fp32). `at` reads element (b, j) as the
// Python layer returns it: float(y) + bias, one IEEE operation each, so the loops below give the
// bits the Python ops give.
struct Out {
  torch::Tensor y;
  const float* bias = nullptr;
  int64_t n = 0;
  bool bf16 = false;
  const void* p = nullptr;
  Out(torch::Tensor t, const c10::optional<torch::Tensor>& b, int64_t kind) : y(t.contiguous()) {
    n = y.size(-1);
    bf16 = y.scalar_type() == at::kBFloat16;
    p = y.data_ptr();
    if (kind != 0 && b.has_value()) bias = b->data_ptr<float>();
  }
  inline float at(int64_t row, int64_t j) const {
    float v = bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(p)[row * n + j]) : static_cast<const float*>(p)[row * n + j];
    return bias ? v + bias[j] : v;
  }
};

// The raw output of linear `i` for input rows x (B, K) already in the layer's input dtype.
torch::Tensor raw_linear(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const c10::optional<torch::Tensor>& bias,
                         const torch::Tensor& x) {
  if (kind == 0) return at::linear(x, a, bias);
  if (kind == 1) return at::linear(x, a);
  if (kind == 2) return at::_weight_int8pack_mm(x, a, b);
  return at::_weight_int4pack_mm_for_cpu(x, a, kGroup, b);
}

}  // namespace

// x: (B, C) embeddings; cos, sin: (B or 1, D) rope rows; kc, vc: (L, B, Hkv, S, D) caches (views allowed).
// positions: each row's position; per_row: rows at their own positions, each attending over exactly its
// own keys (the batched engine), else one shared position (positions[0]) for all rows, attending over
// n_keys keys. norms: 2 per layer (attention, MLP) then the final one. kinds/tensors: 4 linears per
// layer (wqkv, wo, w13, w2) then the head, 3 tensors each (None where unused). Returns logits (B, V) fp32.
//
// Per layer this issues four matmuls, attention and the norms' mean and rsqrt to ATen; the norms'
// products and casts, the rotary embedding with the cache writes, the residual adds and the SwiGLU
// product are plain loops with the same arithmetic as the Python ops (no fused multiply-add: built
// with -ffp-contract=off).
torch::Tensor decode_step(torch::Tensor x, const std::vector<int64_t>& positions, bool per_row, int64_t n_keys,
                          const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                          const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
                          const std::vector<c10::optional<torch::Tensor>>& tensors, int64_t n_heads, int64_t n_kv,
                          int64_t head_dim, double eps) {
  torch::NoGradGuard no_grad;
  const int64_t L = kc.size(0), B = x.size(0), C = x.size(-1), H = n_heads, D = head_dim, half = D / 2;
  const bool gqa = n_kv != n_heads;
  static const torch::Tensor none;
  x = x.reshape({B, C}).contiguous();
  float* xp = x.data_ptr<float>();
  // RMSNorm of x into linear i's input dtype: x * rsqrt(mean(x * x) + eps) * w, the decomposition
  // F.rms_norm computes (same bits), with ATen doing the mean and rsqrt and loops the products.
  auto sq = torch::empty({B, C}, x.options());
  auto rstd = torch::empty({B, 1}, x.options());
  auto normed_bf16 = torch::empty({B, C}, x.options().dtype(at::kBFloat16));
  auto normed_f32 = torch::empty({B, C}, x.options());
  auto norm_into = [&](int64_t i, const torch::Tensor& w) {
    float* q = sq.data_ptr<float>();
    for (int64_t j = 0; j < B * C; ++j) q[j] = xp[j] * xp[j];
    at::mean_out(rstd, sq, {-1}, true).add_(eps).rsqrt_();
    const float* rp = rstd.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    if (kinds[i] != 0) {
      auto* o = normed_bf16.data_ptr<c10::BFloat16>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) o[b * C + c] = c10::BFloat16((xp[b * C + c] * rp[b]) * wp[c]);
      return normed_bf16;
    }
    auto* o = normed_f32.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) o[b * C + c] = (xp[b * C + c] * rp[b]) * wp[c];
    return normed_f32;
  };
  auto lin = [&](int64_t i, const torch::Tensor& in) {
    const auto& b = tensors[3 * i + 1];
    return Out(raw_linear(kinds[i], *tensors[3 * i], b.has_value() ? *b : none, tensors[3 * i + 2], in), tensors[3 * i + 2], kinds[i]);
  };
  auto residual = [&](const Out& o) {
    for (int64_t r = 0; r < B; ++r)
      for (int64_t c = 0; c < C; ++c) xp[r * C + c] = xp[r * C + c] + o.at(r, c);
  };
  const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const float* cp = cos_c.data_ptr<float>();
  const float* sp = sin_c.data_ptr<float>();
  const int64_t rope_stride = cos_c.size(0) == 1 ? 0 : D;
  auto q = torch::empty({B, H, 1, D}, x.options());
  auto attn_bf16 = torch::empty({B, H * D}, x.options().dtype(at::kBFloat16));
  auto attn_f32 = torch::empty({B, H * D}, x.options());
  torch::Tensor gate, act, prod_bf16, prod_f32;  // (B, F), allocated at the first MLP
  float* qp = q.data_ptr<float>();
  const auto ks = kc.strides(), vs = vc.strides();
  float* kbase = kc.data_ptr<float>();
  float* vbase = vc.data_ptr<float>();
  for (int64_t layer = 0; layer < L; ++layer) {
    Out qkv = lin(4 * layer, norm_into(4 * layer, norms[2 * layer]));
    // Rotary embedding of q and k (x * cos + roll(x, D/2) * sin), k and v written into the cache.
    for (int64_t r = 0; r < B; ++r) {
      const int64_t pos = per_row ? positions[r] : positions[0];
      const float* c = cp + r * rope_stride;
      const float* s = sp + r * rope_stride;
      for (int64_t head = 0; head < H + 2 * n_kv; ++head) {
        const int64_t base = head * D;
        float* dst;
        int64_t step = 1;
        if (head < H) {
          dst = qp + (r * H + head) * D;
        } else {
          const bool is_v = head >= H + n_kv;
          const int64_t g = is_v ? head - H - n_kv : head - H;
          const auto& st = is_v ? vs : ks;
          dst = (is_v ? vbase : kbase) + layer * st[0] + r * st[1] + g * st[2] + pos * st[3];
          step = st[4];
          if (is_v) {
            for (int64_t d = 0; d < D; ++d) dst[d * step] = qkv.at(r, base + d);
            continue;
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          const float a = qkv.at(r, base + d) * c[d];
          const float b = qkv.at(r, base + (d + half) % D) * s[d];
          dst[d * step] = a + b;
        }
      }
    }
    const auto& k_layer = kc[layer];
    const auto& v_layer = vc[layer];
    torch::Tensor y;
    if (per_row) {
      std::vector<torch::Tensor> rows;
      for (int64_t r = 0; r < B; ++r) {
        const int64_t e = positions[r] + 1;
        rows.push_back(at::scaled_dot_product_attention(
            q.slice(0, r, r + 1), k_layer.slice(0, r, r + 1).slice(2, 0, e), v_layer.slice(0, r, r + 1).slice(2, 0, e),
            c10::nullopt, 0.0, false, c10::nullopt, gqa));
      }
      y = at::cat(rows);
    } else {
      y = at::scaled_dot_product_attention(q, k_layer.slice(2, 0, n_keys), v_layer.slice(2, 0, n_keys), c10::nullopt, 0.0,
                                           false, c10::nullopt, gqa);
    }
    // (B, H, 1, D) -> (B, H * D) in wo's input dtype.
    const bool wo_bf16 = kinds[4 * layer + 1] != 0;
    auto& attn_in = wo_bf16 ? attn_bf16 : attn_f32;
    const float* yp = y.data_ptr<float>();
    const int64_t y0 = y.stride(0), y1 = y.stride(1), y3 = y.stride(3);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t head = 0; head < H; ++head)
        for (int64_t d = 0; d < D; ++d) {
          const float v = yp[r * y0 + head * y1 + d * y3];
          if (wo_bf16) attn_in.data_ptr<c10::BFloat16>()[(r * H + head) * D + d] = c10::BFloat16(v);
          else attn_in.data_ptr<float>()[(r * H + head) * D + d] = v;
        }
    residual(lin(4 * layer + 1, attn_in));
    Out gate_up = lin(4 * layer + 2, norm_into(4 * layer + 2, norms[2 * layer + 1]));
    const int64_t F = gate_up.n / 2;
    // SwiGLU: silu(gate) * up, rounded to the down projection's input dtype.
    if (!gate.defined()) {
      gate = torch::empty({B, F}, x.options());
      act = torch::empty({B, F}, x.options());
      prod_bf16 = torch::empty({B, F}, x.options().dtype(at::kBFloat16));
      prod_f32 = torch::empty({B, F}, x.options());
    }
    float* gp = gate.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r)
      for (int64_t j = 0; j < F; ++j) gp[r * F + j] = gate_up.at(r, j);
    at::silu_out(act, gate);
    const float* ap = act.data_ptr<float>();
    const bool down_bf16 = kinds[4 * layer + 3] != 0;
    auto& prod = down_bf16 ? prod_bf16 : prod_f32;
    if (down_bf16) {
      auto* pp = prod.data_ptr<c10::BFloat16>();
      for (int64_t r = 0; r < B; ++r)
        for (int64_t j = 0; j < F; ++j) pp[r * F + j] = c10::BFloat16(ap[r * F + j] * gate_up.at(r, F + j));
    } else {
      auto* pp = prod.data_ptr<float>();
      for (int64_t r = 0; r < B; ++r)
        for (int64_t j = 0; j < F; ++j) pp[r * F + j] = ap[r * F + j] * gate_up.at(r, F + j);
    }
    residual(lin(4 * layer + 3, prod));
  }
  auto h = norm_into(4 * L, norms[2 * L]);
  return raw_linear(kinds[4 * L], *tensors[4 * L * 3], tensors[4 * L * 3 + 1].has_value() ? *tensors[4 * L * 3 + 1] : none,
                    tensors[4 * L * 3 + 2], h).to(at::kFloat);
}

// An int4 layer's weights as bf16 for a dense matmul (quant.Int4Linear's prefill path): packed is PyTorch's
// CPU int4pack layout (N/64, K/32, 32, 32) [block][group][k in group][row r: low nibble r, high r + 32],
// scales_zeros (K/32, N, 2) bf16; out (K * N) bf16 receives W^T row-major, w = q * s + (z - 8 s) in fp32
// rounded once, as Int4Linear.dequantized computes it. One pass over the packed bytes.
void int4_unpack(const torch::Tensor& packed, const torch::Tensor& scales_zeros, torch::Tensor& out) {
  const int64_t groups = scales_zeros.size(0), N = scales_zeros.size(1), blocks = N / 64;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sz = scales_zeros.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> scale(N), base(N);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t n = 0; n < N; ++n) {
        const float s = static_cast<float>(sz[(g * N + n) * 2]);
        const float z = static_cast<float>(sz[(g * N + n) * 2 + 1]);
        scale[n] = s;
        base[n] = z - 8.0f * s;
      }
      for (int64_t kk = 0; kk < kGroup; ++kk) {
        c10::BFloat16* row = o + (g * kGroup + kk) * N;
        for (int64_t nb = 0; nb < blocks; ++nb) {
          const uint8_t* bytes = p + ((nb * groups + g) * kGroup + kk) * 32;
          const int64_t n0 = nb * 64;
          for (int64_t r = 0; r < 32; ++r) {
            const float lo = static_cast<float>(bytes[r] & 15), hi = static_cast<float>(bytes[r] >> 4);
            row[n0 + r] = c10::BFloat16(base[n0 + r] + lo * scale[n0 + r]);
            row[n0 + 32 + r] = c10::BFloat16(base[n0 + 32 + r] + hi * scale[n0 + 32 + r]);
          }
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_unpack", &int4_unpack, "Int4 packed weights to bf16 W^T (see native_step.cpp)");
  m.def("decode_step", &decode_step, "One Llama decode step (see native_step.cpp)");
}
