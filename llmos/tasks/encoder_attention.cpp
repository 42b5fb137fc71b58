// Bidirectional attention over packed sequences, for the BERT-family encoder (models/bert.py).
//
// qkv (N, 3*H*D) holds the real tokens of B texts back to back (text b is rows offsets[b] ..
// offsets[b+1]-1), q | k | v per row; the result (N, H*D) is each token's attention over the keys of
// its own text. No padding, no mask, no (B, H, T, D) copies: one task per (text, head) transposes its
// keys once (zero-padded to a multiple of 16), then four queries at a time get their scores from
// register-blocked 16-key tiles, and each its softmax and weighted sum of values, in fp32 over loops
// the compiler vectorizes (-O3 -march=native -mprefer-vector-width=512 -ffast-math: exp is libmvec's).
// fp32 or bf16 in and out (bf16 is widened on load and rounded once at the end).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

constexpr int64_t KB = 16;  // keys per score block: one 512-bit register of fp32
constexpr int64_t QB = 4;   // queries sharing each load of a key block

// Scores of QB queries (rows of q, D wide, already scaled) against keys kt (D, Lp), Lp a multiple of KB.
template <int64_t D>
static inline void scores(const float* q, const float* kt, int64_t Lp, float* s) {
  for (int64_t jb = 0; jb < Lp; jb += KB) {
    float acc[QB][KB] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* k = kt + d * Lp + jb;
      for (int64_t r = 0; r < QB; ++r) {
        const float qd = q[r * D + d];
        for (int64_t t = 0; t < KB; ++t) acc[r][t] += qd * k[t];
      }
    }
    for (int64_t r = 0; r < QB; ++r)
      for (int64_t t = 0; t < KB; ++t) s[r * Lp + jb + t] = acc[r][t];
  }
}

template <typename T, int64_t D>
static void attend(const T* qkv, T* out, const int64_t* offsets, int64_t B, int64_t H, int64_t max_len) {
  const int64_t C = H * D, row = 3 * C, Lmax = (max_len + KB - 1) / KB * KB;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * Lmax), v(Lmax * D), q(QB * D), p(QB * Lmax);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H;
      const int64_t s0 = offsets[b], L = offsets[b + 1] - s0, Lp = (L + KB - 1) / KB * KB;
      for (int64_t j = 0; j < Lp; ++j) {  // keys transposed (D, Lp), zero past L
        const T* kr = qkv + (s0 + j) * row + C + h * D;
        const T* vr = qkv + (s0 + j) * row + 2 * C + h * D;
        for (int64_t d = 0; d < D; ++d) {
          kt[d * Lp + j] = j < L ? static_cast<float>(kr[d]) : 0.0f;
          v[j * D + d] = j < L ? static_cast<float>(vr[d]) : 0.0f;
        }
      }
      for (int64_t i0 = 0; i0 < L; i0 += QB) {
        const int64_t nq = std::min(QB, L - i0);
        for (int64_t r = 0; r < QB; ++r) {  // rows past L repeat the last query; their results are dropped
          const T* qr = qkv + (s0 + std::min(i0 + r, L - 1)) * row + h * D;
          for (int64_t d = 0; d < D; ++d) q[r * D + d] = static_cast<float>(qr[d]) * scale;
        }
        scores<D>(q.data(), kt.data(), Lp, p.data());
        for (int64_t r = 0; r < nq; ++r) {
          float* pp = p.data() + r * Lp;
          float m = -INFINITY;
          for (int64_t j = 0; j < L; ++j) m = std::max(m, pp[j]);
          float sum = 0.0f;
          for (int64_t j = 0; j < L; ++j) {
            pp[j] = std::exp(pp[j] - m);
            sum += pp[j];
          }
          const float inv = 1.0f / sum;
          float acc[D] = {};
          for (int64_t j = 0; j < L; ++j) {
            const float pj = pp[j] * inv;
            const float* vr = v.data() + j * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += pj * vr[d];
          }
          T* o = out + (s0 + i0 + r) * C + h * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
        }
      }
    }
  });
}

template <typename T>
static void dispatch(const T* qkv, T* out, const int64_t* off, int64_t B, int64_t H, int64_t D, int64_t max_len) {
  switch (D) {  // the head size is a compile-time constant, so a query's accumulators live in registers
    case 32: return attend<T, 32>(qkv, out, off, B, H, max_len);
    case 64: return attend<T, 64>(qkv, out, off, B, H, max_len);
    case 16: return attend<T, 16>(qkv, out, off, B, H, max_len);
    case 128: return attend<T, 128>(qkv, out, off, B, H, max_len);
    default: TORCH_CHECK(false, "packed_attention takes head sizes 16, 32, 64 or 128, got ", D);
  }
}

torch::Tensor packed_attention(const torch::Tensor& qkv, const torch::Tensor& offsets, int64_t n_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) % (3 * n_heads) == 0, "qkv must be contiguous (N, 3*H*D)");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous() && offsets.dim() == 1, "offsets must be int64 (B+1,)");
  const int64_t B = offsets.size(0) - 1, D = qkv.size(1) / (3 * n_heads);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(B >= 0 && off[0] == 0 && off[B] == qkv.size(0), "offsets must run from 0 to N");
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b + 1] > off[b], "every text needs at least one token");
    max_len = std::max(max_len, off[b + 1] - off[b]);
  }
  auto out = torch::empty({qkv.size(0), n_heads * D}, qkv.options());
  if (qkv.scalar_type() == torch::kFloat32) {
    dispatch<float>(qkv.data_ptr<float>(), out.data_ptr<float>(), off, B, n_heads, D, max_len);
  } else if (qkv.scalar_type() == torch::kBFloat16) {
    dispatch<at::BFloat16>(qkv.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), off, B, n_heads, D, max_len);
  } else {
    TORCH_CHECK(false, "packed_attention takes fp32 or bf16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_attention", &packed_attention, "bidirectional attention over packed sequences");
}
