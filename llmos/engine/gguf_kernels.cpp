// Matrix products over GGUF's own quantized blocks: y (M, N) fp32 = x (M, K) fp32 @ W^T, where W (N, K)
// is given as the file's bytes (N rows of K / block_size blocks, exactly as memory-mapped), for Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K. Built by gguf_kernels.py.
//
// No second rounding: each weight is rebuilt in fp32 with the operations gguf-py's
// `gguf.quants.dequantize` performs, in its order (scale products first, then d * q, then the offset;
// compiled with -ffp-contract=off so no multiply-add is fused), so the kernel multiplies exactly the
// weights the reference dequantization gives. Products with the fp32 activations are summed with
// fused multiply-adds into 16 fp32 lanes per output (lane j takes inputs k with k % 16 == j, in input
// order), then added across lanes in a fixed order: the result differs from an fp32 matmul of the
// dequantized weights only by summation order. Every (row, output) pair sees the same sequence of
// operations whatever the batch size, the tiling or the thread count, so a row computed in a batch
// gets the bits it gets alone.
//
// The weights are read once per tile of up to 8 rows (twice for 16 rows) and never stored dequantized:
// a matrix-vector product reads only the file's bytes. `dequantize` writes the same fp32 values (or
// those rounded once to bf16, for the dense prefill path) into a caller's buffer.
#include <torch/extension.h>

#include <cstring>
#include <utility>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LLMOS_GGUF_AVX512 1
#endif

namespace {

// f(std::integral_constant<int, i>) for i = 0 .. N-1, unrolled: indices into register arrays must be
// compile-time constants, or GCC keeps the accumulators on the stack (6x slower here).
template <typename F, int... I>
inline __attribute__((always_inline)) void unroll_seq(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline __attribute__((always_inline)) void unroll(F&& f) {
  unroll_seq(f, std::make_integer_sequence<int, N>{});
}

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q4_K / Q5_K: 8 six-bit scales and mins packed into 12 bytes (llama.cpp's get_scale_min_k4).
inline void k_scale_min(const uint8_t* q, int j, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// ---------------------------------------------------------------------------------------------------
// Per type: the block's size in elements and bytes, and `chunks(block, f)` calling f(c, w) for each run
// of 16 weights (elements 16c .. 16c + 15) in order; w holds them in fp32 as gguf-py computes them.
// The scalar twin `values(block, out)` writes the block's weights (the portable path and `dequantize`).

struct Q4_0 {
  static constexpr int BS = 32, BB = 18;
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b);
    for (int j = 0; j < 16; ++j) {
      o[j] = d * static_cast<float>((b[2 + j] & 15) - 8);
      o[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
    }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(h2f(b));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
    const __m512i eight = _mm512_set1_epi32(8), lo = _mm512_set1_epi32(15);
    f(std::integral_constant<int, 0>{}, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(q, lo), eight))));
    f(std::integral_constant<int, 1>{}, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight))));
  }
#endif
};

struct Q4_1 {
  static constexpr int BS = 32, BB = 20;
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b), m = h2f(b + 2);
    for (int j = 0; j < 16; ++j) {
      o[j] = d * static_cast<float>(b[4 + j] & 15) + m;
      o[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
    }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(h2f(b)), m = _mm512_set1_ps(h2f(b + 2));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
    f(std::integral_constant<int, 0>{}, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)))), m));
    f(std::integral_constant<int, 1>{}, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4))), m));
  }
#endif
};

struct Q5_0 {
  static constexpr int BS = 32, BB = 22;
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b);
    const uint32_t qh = u32(b + 2);
    for (int j = 0; j < 16; ++j) {
      // int, not the unsigned type of qh: the codes go below zero.
      o[j] = d * static_cast<float>(static_cast<int>((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
      o[j + 16] = d * static_cast<float>(static_cast<int>((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(h2f(b));
    const uint32_t qh = u32(b + 2);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6)));
    const __m512i sixteen = _mm512_set1_epi32(16);
    // q - 16 where the fifth bit is set is the nibble itself; where clear, the nibble - 16.
    const __m512i n0 = _mm512_and_si512(q, _mm512_set1_epi32(15)), n1 = _mm512_srli_epi32(q, 4);
    f(std::integral_constant<int, 0>{}, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_mask_sub_epi32(n0, static_cast<__mmask16>(~qh), n0, sixteen))));
    f(std::integral_constant<int, 1>{}, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_mask_sub_epi32(n1, static_cast<__mmask16>(~(qh >> 16)), n1, sixteen))));
  }
#endif
};

struct Q5_1 {
  static constexpr int BS = 32, BB = 24;
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint32_t qh = u32(b + 4);
    for (int j = 0; j < 16; ++j) {
      o[j] = d * static_cast<float>((b[8 + j] & 15) | (((qh >> j) & 1) << 4)) + m;
      o[j + 16] = d * static_cast<float>((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
    }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(h2f(b)), m = _mm512_set1_ps(h2f(b + 2));
    const uint32_t qh = u32(b + 4);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8)));
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i n0 = _mm512_and_si512(q, _mm512_set1_epi32(15)), n1 = _mm512_srli_epi32(q, 4);
    const __m512i q0 = _mm512_mask_or_epi32(n0, static_cast<__mmask16>(qh), n0, sixteen);
    const __m512i q1 = _mm512_mask_or_epi32(n1, static_cast<__mmask16>(qh >> 16), n1, sixteen);
    f(std::integral_constant<int, 0>{}, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q0)), m));
    f(std::integral_constant<int, 1>{}, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q1)), m));
  }
#endif
};

struct Q8_0 {
  static constexpr int BS = 32, BB = 34;
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b);
    for (int j = 0; j < 32; ++j) o[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(h2f(b));
    unroll<2>([&](auto c) __attribute__((always_inline)) {
      f(c, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * c)))), d));
    });
  }
#endif
};

// Q4_K and Q5_K: sub-block s (32 elements) has D = d * scale_s and M = dmin * min_s; w = D * q - M.
template <bool FIVE>
struct QK45 {
  static constexpr int BS = 256, BB = FIVE ? 176 : 144;
  static constexpr int QS = FIVE ? 48 : 16;  // where the nibbles start
  static void factors(const uint8_t* b, float* D, float* Mn) {
    const float d = h2f(b), dmin = h2f(b + 2);
    for (int s = 0; s < 8; ++s) {
      int sc, m;
      k_scale_min(b + 4, s, sc, m);
      D[s] = d * static_cast<float>(sc);
      Mn[s] = dmin * static_cast<float>(m);
    }
  }
  static void values(const uint8_t* b, float* o) {
    float D[8], Mn[8];
    factors(b, D, Mn);
    for (int s = 0; s < 8; ++s)
      for (int i = 0; i < 32; ++i) {
        int q = (b[QS + 32 * (s / 2) + i] >> (4 * (s % 2))) & 15;
        if (FIVE) q |= ((b[16 + i] >> s) & 1) << 4;
        o[32 * s + i] = D[s] * static_cast<float>(q) - Mn[s];
      }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    alignas(16) float D[8], Mn[8];
    factors(b, D, Mn);
    const __m512i lo = _mm512_set1_epi32(15);
    unroll<16>([&](auto cc) __attribute__((always_inline)) {
      constexpr int c = cc, s = c / 2, i0 = (c % 2) * 16;
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + QS + 32 * (s / 2) + i0)));
      __m512i q = (s % 2) ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, lo);
      if constexpr (FIVE) {
        const __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 + i0)));
        const __mmask16 bit = _mm512_test_epi32_mask(h, _mm512_set1_epi32(1 << s));
        q = _mm512_mask_or_epi32(q, bit, q, _mm512_set1_epi32(16));
      }
      f(cc, _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(D[s]), _mm512_cvtepi32_ps(q)), _mm512_set1_ps(Mn[s])));
    });
  }
#endif
};
using Q4_K = QK45<false>;
using Q5_K = QK45<true>;

// Q6_K: 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d f16; w = (d * scale_16) * (q - 32).
struct Q6_K {
  static constexpr int BS = 256, BB = 210;
  static inline int code(const uint8_t* b, int e) {
    const int h = e / 128, j = e % 128, l = j % 32, t = j / 32;
    const int low = j < 64 ? (b[64 * h + j] & 15) : (b[64 * h + j - 64] >> 4);
    return (low | (((b[128 + 32 * h + l] >> (2 * t)) & 3) << 4)) - 32;
  }
  static void values(const uint8_t* b, float* o) {
    const float d = h2f(b + 208);
    for (int g = 0; g < 16; ++g) {
      const float D = d * static_cast<float>(static_cast<int8_t>(b[192 + g]));
      for (int i = 0; i < 16; ++i) o[16 * g + i] = D * static_cast<float>(code(b, 16 * g + i));
    }
  }
#ifdef LLMOS_GGUF_AVX512
  template <typename F>
  static inline void chunks(const uint8_t* b, F&& f) {
    const float d = h2f(b + 208);
    const __m512i lo = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    unroll<16>([&](auto cc) __attribute__((always_inline)) {
      constexpr int c = cc, h = c / 8, j0 = (c % 8) * 16, t = j0 / 32, l0 = j0 % 32;
      const __m512i ql = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 * h + (j0 & 63))));
      const __m512i qh = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 128 + 32 * h + l0)));
      const __m512i low = j0 < 64 ? _mm512_and_si512(ql, lo) : _mm512_srli_epi32(ql, 4);
      const __m512i high = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh, 2 * t), three), 4);
      const __m512i q = _mm512_sub_epi32(_mm512_or_si512(low, high), bias);
      const float D = d * static_cast<float>(static_cast<int8_t>(b[192 + c]));
      f(cc, _mm512_mul_ps(_mm512_set1_ps(D), _mm512_cvtepi32_ps(q)));
    });
  }
#endif
};

// ---------------------------------------------------------------------------------------------------

#ifdef LLMOS_GGUF_AVX512
// NT outputs (rows of W from `w`, `row_bytes` apart) x MT rows of x (from `x`, K apart): each pair's 16
// lanes accumulate w * x with one fused multiply-add per 16 weights, in input order.
template <typename T, int NT, int MT>
inline void tile(const uint8_t* w, int64_t row_bytes, const float* x, int64_t K, float* y, int64_t N) {
  __m512 acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm512_setzero_ps();
  const int64_t nb = K / T::BS;
  for (int64_t j = 0; j < nb; ++j) {
    unroll<NT>([&](auto n) __attribute__((always_inline)) {
      const uint8_t* blk = w + n * row_bytes + j * T::BB;
      __builtin_prefetch(blk + 512);  // each output row is its own stream
      T::chunks(blk, [&](auto c, __m512 wv) __attribute__((always_inline)) {
        unroll<MT>([&](auto m) __attribute__((always_inline)) {
          acc[n][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + j * T::BS + 16 * c), acc[n][m]);
        });
      });
    });
  }
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[n][m]);
}

template <typename T, int NT>
inline void tiles(const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile<T, NT, 8>(w, row_bytes, x + m * K, K, y + m * N, N);
  switch (M - m) {
    case 7: tile<T, NT, 7>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 6: tile<T, NT, 6>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 5: tile<T, NT, 5>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 4: tile<T, NT, 4>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 3: tile<T, NT, 3>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 2: tile<T, NT, 2>(w, row_bytes, x + m * K, K, y + m * N, N); break;
    case 1: tile<T, NT, 1>(w, row_bytes, x + m * K, K, y + m * N, N); break;
  }
}
#endif

template <typename T>
void matmul_type(const uint8_t* w, const float* x, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t row_bytes = K / T::BS * T::BB;
#ifdef LLMOS_GGUF_AVX512
  // Two outputs at a time for several rows (16 accumulators), four for one to three rows: independent
  // chains of multiply-adds while the next block is being unpacked.
  const int64_t NT = M > 3 ? 2 : 4;
  at::parallel_for(0, (N + NT - 1) / NT, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * NT;
      const uint8_t* wn = w + n * row_bytes;
      if (n + NT > N) {
        for (int64_t r = n; r < N; ++r) tiles<T, 1>(w + r * row_bytes, row_bytes, x, M, K, y + r, N);
      } else if (NT == 4) {
        tiles<T, 4>(wn, row_bytes, x, M, K, y + n, N);
      } else {
        tiles<T, 2>(wn, row_bytes, x, M, K, y + n, N);
      }
    }
  });
#else
  // Portable path: the same weights, summed in 16 lanes as above.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> v(T::BS);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        float lanes[16] = {0};
        for (int64_t j = 0; j < K / T::BS; ++j) {
          T::values(w + n * row_bytes + j * T::BB, v.data());
          for (int e = 0; e < T::BS; ++e) lanes[e % 16] += v[e] * x[m * K + j * T::BS + e];
        }
        float s = 0.0f;
        for (int l = 0; l < 16; ++l) s += lanes[l];
        y[m * N + n] = s;
      }
  });
#endif
}

template <typename T, typename Out>
void dequantize_type(const uint8_t* w, Out* out, int64_t N, int64_t K) {
  const int64_t nb = K / T::BS, total = N * nb;
  at::parallel_for(0, total, 256, [&](int64_t b0, int64_t b1) {
    float v[T::BS];
    for (int64_t b = b0; b < b1; ++b) {
      T::values(w + b * T::BB, v);
      Out* o = out + b * T::BS;
      for (int e = 0; e < T::BS; ++e) o[e] = static_cast<Out>(v[e]);
    }
  });
}

// GGML type ids (ggml.h).
template <typename Fn>
void dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case 2: fn(Q4_0{}); break;
    case 3: fn(Q4_1{}); break;
    case 6: fn(Q5_0{}); break;
    case 7: fn(Q5_1{}); break;
    case 8: fn(Q8_0{}); break;
    case 12: fn(Q4_K{}); break;
    case 13: fn(Q5_K{}); break;
    case 14: fn(Q6_K{}); break;
    default: TORCH_CHECK(false, "gguf_kernels: unsupported GGML type ", qtype);
  }
}

template <typename T>
void check_raw(const torch::Tensor& raw, int64_t N, int64_t K) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous(), "gguf_kernels: raw must be contiguous uint8");
  TORCH_CHECK(K % T::BS == 0, "gguf_kernels: K must be a multiple of the block size ", T::BS);
  TORCH_CHECK(raw.numel() == N * (K / T::BS) * T::BB, "gguf_kernels: raw has ", raw.numel(), " bytes, need ", N * (K / T::BS) * T::BB);
}

}  // namespace

// y (M, N) fp32 = x (M, K) fp32 @ W^T, W (N, K) given as `raw` (GGML type `qtype`).
torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor& raw, int64_t qtype, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gguf_kernels.matmul: x must be (M, K) float32");
  const auto a = x.contiguous();
  const int64_t M = a.size(0), K = a.size(1);
  auto out = torch::empty({M, N}, a.options());
  dispatch(qtype, [&](auto t) {
    using T = decltype(t);
    check_raw<T>(raw, N, K);
    if (M > 0 && N > 0) matmul_type<T>(raw.data_ptr<uint8_t>(), a.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  });
  return out;
}

// The weights (N, K) into `out` (fp32: gguf-py's values; bf16: those rounded once, to nearest even).
void dequantize(const torch::Tensor& raw, int64_t qtype, torch::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "gguf_kernels.dequantize: out must be a contiguous (N, K) tensor");
  const int64_t N = out.size(0), K = out.size(1);
  dispatch(qtype, [&](auto t) {
    using T = decltype(t);
    check_raw<T>(raw, N, K);
    if (out.scalar_type() == at::kFloat)
      dequantize_type<T>(raw.data_ptr<uint8_t>(), out.data_ptr<float>(), N, K);
    else if (out.scalar_type() == at::kBFloat16)
      dequantize_type<T>(raw.data_ptr<uint8_t>(), out.data_ptr<c10::BFloat16>(), N, K);
    else
      TORCH_CHECK(false, "gguf_kernels.dequantize: out must be float32 or bfloat16");
  });
}

bool vectorized() {
#ifdef LLMOS_GGUF_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "y = x @ W^T over GGUF blocks");
  m.def("dequantize", &dequantize, "GGUF blocks -> fp32 / bf16 weights");
  m.def("vectorized", &vectorized, "whether the AVX-512 kernels were compiled");
}
