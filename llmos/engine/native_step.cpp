// One decode step of a Llama-family model (one new token per row), computing what the Python model file
// computes (models/llama.py, quant.py, kv_cache.py, models/attention.py): the same ATen kernels for the
// matmuls, plain loops with the same IEEE arithmetic for the element-wise work, RMSNorm's mean of
// squares summed in double, and an AVX-512 attention kernel in place of per-row SDPA calls (~3e-7
// from SDPA). Every row is computed on its own in a fixed order: results do not depend on the thread
// count or on the other rows of a batch. The Python path spends ~40% of a batch-1 step of the default model
// dispatching ~25 small ops per layer; this runs in ~60% of its time (tests/engine/test_native.py).
// Also: int4 weight unpacking for the quantized layers' dense prefill path (int4_unpack).
//
// A linear layer is three tensors and a kind:
//   0 fp32 nn.Linear       (weight, unused, bias?)
//   1 bf16                 (weight bf16, unused, bias?)
//   2 int8 weight-only     (qweight int8 (N, K), scale bf16 (N,), bias?)
//   3 int4 weight-only     (packed int4pack, scales_zeros bf16 (K/32, N, 2), bias?)
#include <torch/extension.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
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

#if defined(__AVX512F__)
// e^x for x <= 0 (softmax after subtracting the maximum), 16 lanes: Cody-Waite reduction and the Cephes
// polynomial (~1 ulp).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))), _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// Decode attention: one query per (row, head) over that row's first keys[row] cached keys. q (B, H, D)
// contiguous; k, v a layer's cache (B, Hkv, S, D) by strides (rows, heads, positions; D contiguous);
// out (B, H, D). One thread computes a (row, kv head) pair in a fixed order, so a row's result does not
// depend on the thread count or on the other rows of the step: decoded in a batch it gets the bits it
// gets alone. Replaces per-row SDPA calls (~20 us each with their setup; 16 rows x 30 layers were 35%
// of a 16-row step); differs from SDPA by ~3e-7.
void decode_attention(const float* q, const float* k, const float* v, const int64_t* ks, const int64_t* vs, const std::vector<int64_t>& keys,
            int64_t B, int64_t H, int64_t n_kv, int64_t D, float* out) {
  const int64_t rep = H / n_kv, dv = D / 16;
  const float scale = 1.0f / std::sqrt((float)D);
  at::parallel_for(0, B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / n_kv, g = t % n_kv, e = keys[r];
      const float* kr = k + r * ks[0] + g * ks[1];
      const float* vr = v + r * vs[0] + g * vs[1];
      p.assign(rep * ((e + 15) / 16 * 16), 0.0f);
      const int64_t stride = (e + 15) / 16 * 16;
      __m512 qv[8][8];  // up to 8 query heads per kv head, D up to 128
      for (int64_t h = 0; h < rep; ++h)
        for (int64_t j = 0; j < dv; ++j) qv[h][j] = _mm512_mul_ps(_mm512_loadu_ps(q + ((r * H + g * rep + h) * D) + 16 * j), _mm512_set1_ps(scale));
      for (int64_t s = 0; s < e; ++s) {
        const float* ksr = kr + s * ks[2];
        __m512 kv[8];
        for (int64_t j = 0; j < dv; ++j) kv[j] = _mm512_loadu_ps(ksr + 16 * j);
        for (int64_t h = 0; h < rep; ++h) {
          __m512 acc = _mm512_mul_ps(qv[h][0], kv[0]);
          for (int64_t j = 1; j < dv; ++j) acc = _mm512_fmadd_ps(qv[h][j], kv[j], acc);
          p[h * stride + s] = _mm512_reduce_add_ps(acc);
        }
      }
      for (int64_t h = 0; h < rep; ++h) {
        float* ph = p.data() + h * stride;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        const __mmask16 tail = (__mmask16)((1u << (e % 16)) - 1);
        int64_t s = 0;
        for (; s + 16 <= e; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(ph + s));
        if (s < e) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_loadu_ps(ph + s));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (s = 0; s + 16 <= e; s += 16) { __m512 ex = exp512(_mm512_sub_ps(_mm512_loadu_ps(ph + s), m)); _mm512_storeu_ps(ph + s, ex); sum = _mm512_add_ps(sum, ex); }
        if (s < e) { __m512 ex = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_loadu_ps(ph + s), m))); _mm512_storeu_ps(ph + s, ex); sum = _mm512_add_ps(sum, ex); }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        __m512 o[8];
        for (int64_t j = 0; j < dv; ++j) o[j] = _mm512_setzero_ps();
        for (s = 0; s < e; ++s) {
          const __m512 w = _mm512_set1_ps(ph[s]);
          const float* vsr = vr + s * vs[2];
          for (int64_t j = 0; j < dv; ++j) o[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vsr + 16 * j), o[j]);
        }
        float* oh = out + (r * H + g * rep + h) * D;
        for (int64_t j = 0; j < dv; ++j) _mm512_storeu_ps(oh + 16 * j, _mm512_mul_ps(o[j], _mm512_set1_ps(inv)));
      }
    }
  });
}

#endif

}  // namespace

// x: (B, C) embeddings; cos, sin: (B or 1, D) rope rows; kc, vc: (L, B, Hkv, S, D) caches (views allowed).
// positions: each row's position; per_row: rows at their own positions, each attending over exactly its
// own keys (the batched engine), else one shared position (positions[0]) for all rows, attending over
// n_keys keys. norms: 2 per layer (attention, MLP) then the final one. kinds/tensors: 4 linears per
// layer (wqkv, wo, w13, w2) then the head, 3 tensors each (None where unused). Returns logits (B, V) fp32.
//
// Per layer this issues four matmuls to ATen; the norms, the rotary embedding with the cache writes,
// attention, the residual adds and the SwiGLU product run here (no fused multiply-add outside the
// attention kernel: built with -ffp-contract=off).
torch::Tensor decode_step(torch::Tensor x, const std::vector<int64_t>& positions, bool per_row, int64_t n_keys,
                          const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                          const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
                          const std::vector<c10::optional<torch::Tensor>>& tensors, int64_t n_heads, int64_t n_kv,
                          int64_t head_dim, double eps) {
  torch::NoGradGuard no_grad;
  const int64_t L = kc.size(0), B = x.size(0), C = x.size(-1), H = n_heads, D = head_dim, half = D / 2;
  static const torch::Tensor none;
  x = x.reshape({B, C}).contiguous();
  float* xp = x.data_ptr<float>();
  // RMSNorm of x into linear i's input dtype: x * rsqrt(mean(x * x) + eps) * w, in F.rms_norm's order.
  auto rstd = torch::empty({B, 1}, x.options());
  auto normed_bf16 = torch::empty({B, C}, x.options().dtype(at::kBFloat16));
  auto normed_f32 = torch::empty({B, C}, x.options());
  auto norm_into = [&](int64_t i, const torch::Tensor& w) {
    // The mean of squares summed in double: a row's value does not depend on the row's neighbours
    // or the thread count, and is at least as accurate as ATen's float reduction (~1e-7 apart).
    float* rp = rstd.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      double total = 0.0;
      for (int64_t c = 0; c < C; ++c) total += static_cast<double>(xp[b * C + c]) * xp[b * C + c];
      rp[b] = 1.0f / std::sqrt(static_cast<float>(total / C) + static_cast<float>(eps));
    }
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
  auto y = torch::empty({B, H, D}, x.options());
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
    {
      std::vector<int64_t> keys(B);
      for (int64_t r = 0; r < B; ++r) keys[r] = per_row ? positions[r] + 1 : n_keys;
      const int64_t kst[3] = {ks[1], ks[2], ks[3]}, vst[3] = {vs[1], vs[2], vs[3]};
#if defined(__AVX512F__)
      decode_attention(qp, kbase + layer * ks[0], vbase + layer * vs[0], kst, vst, keys, B, H, n_kv, D, y.data_ptr<float>());
#else
      // Without AVX-512: SDPA per row over its own keys.
      for (int64_t r = 0; r < B; ++r)
        y[r].copy_(at::scaled_dot_product_attention(q.slice(0, r, r + 1), kc[layer].slice(0, r, r + 1).slice(2, 0, keys[r]),
                                                    vc[layer].slice(0, r, r + 1).slice(2, 0, keys[r]), c10::nullopt, 0.0,
                                                    false, c10::nullopt, n_kv != n_heads)[0].squeeze(1));
#endif
    }
    // (B, H, 1, D) -> (B, H * D) in wo's input dtype.
    const bool wo_bf16 = kinds[4 * layer + 1] != 0;
    auto& attn_in = wo_bf16 ? attn_bf16 : attn_f32;
    const float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r)
      for (int64_t head = 0; head < H; ++head)
        for (int64_t d = 0; d < D; ++d) {
          const float v = yp[(r * H + head) * D + d];
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
