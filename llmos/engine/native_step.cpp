// One decode step of a Llama-family, Gemma 2 or Gemma 3 model (one new token per row), computing what the
// Python model file computes (models/llama.py, gemma2.py or gemma3.py, quant.py, kv_cache.py, models/attention.py): ATen's
// kernels for the fp32 and bf16 matmuls, AVX512-BF16 kernels of its own for the int4 and int8 layers and
// the int8 vocabulary head (int4_mm, int8_linear_mm, int8_mm: exact products summed in fp32, where ATen's
// kernels round to bf16; ATen's int8 kernel without AVX512-BF16),
// vectorized loops with the scalar code's IEEE operations for the element-wise work, RMSNorm's mean
// of squares summed in double, and an AVX-512 attention kernel in place of per-row SDPA calls (~3e-7
// from SDPA). Every row is computed on its own in a fixed order: results do not depend on the thread
// count or on the other rows of a batch. The Python path spends ~40% of a batch-1 step of the
// default model dispatching ~25 small ops per layer.
// Also: int4 weight unpacking for the quantized layers' dense prefill path (int4_unpack), and causal
// attention for prompts (causal_attention, models/attention.py).
//
// A linear layer is three tensors and a kind:
//   0 fp32 nn.Linear       (weight, unused, bias?)
//   1 bf16                 (weight bf16, unused, bias?)
//   2 int8 weight-only     (qweight int8 (N, K), scale bf16 (N,), bias?): int8_linear_mm, as quant.Int8Linear
//                          runs it (ATen's kernel without LLMOS_BF16_KERNELS)
//   3 int4 weight-only     (packed int4pack, scales_zeros bf16 (K/32, N, 2), bias?)
//   4 int8 weight-only     (int8_pack's layout, scale bf16 (N,), bias?): the vocabulary head, repacked
//                          by the stepper for int8_mm (only built with LLMOS_BF16_KERNELS)
//   5 GGUF blocks          (unused, unused, bias?): gguf_linear.GGUFLinear, whose kernels live in another
//                          extension (gguf_kernels.cpp): its parts (raw blocks and GGML types) are called
//                          here through that extension's `matmul_into`, each writing its columns of the
//                          layer's fp32 output, bias added after as GGUFLinear adds it; where that entry
//                          is not given, the layer's Python `forward` is called instead (fp32 rows in and
//                          out, bias added), the same call the Python model makes
#include <torch/extension.h>

#include <cmath>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

// Ask for `bytes` from p to be brought into the cache ahead of use (a hint: never faults).
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(static_cast<const char*>(p) + l);
}

#if defined(__AVX512F__)
// 16 bf16 values (as 16-bit lanes) widened exactly to fp32.
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
// 16 values of a KV cache row (fp32 or fp16; fp16 widens exactly).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LLMOS_BF16_KERNELS 1
// The inner loops of the quantized matmuls (int4_mm, int8_mm): for one block of 64 outputs and NP pairs
// of inputs from pair p0 (a compile-time count: the loop unrolls), weights already spread into bf16
// pairs w[pair][4 x 16 outputs], each row's dot products in fp32 (AVX512-BF16 pair dots, 4 x 16 outputs
// a row), handed to `epi(row, c, dots, facc of that row's outputs 16c..16c+15)`. MT rows at a time
// share each weight register.
template <int MT, int NP, typename Epi>
__attribute__((always_inline)) inline void pair_tile(const uint32_t* a, int64_t K2, int64_t m0, int64_t p0, const __m512i* w, float* facc, const Epi& epi) {
  __m512 d[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < 4; ++c) d[m][c] = _mm512_setzero_ps();
  const uint32_t* ap = a + m0 * K2 + p0;
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MT; ++m) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(ap[m * K2 + p]);  // activations k, k + 1 of row m
      for (int c = 0; c < 4; ++c) d[m][c] = _mm512_dpbf16_ps(d[m][c], (__m512bh)w[p * 4 + c], b);
    }
  // Unrolled so that d stays in registers (a loop indexing d would keep it on the stack).
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) epi(m0 + m, c, d[m][c], facc + (m0 + m) * 64 + c * 16);
}

// pair_tile over all M rows (a: the rows as bf16 pairs, K2 pairs a row), up to 6 at a time.
template <int NP, typename Epi>
__attribute__((always_inline)) inline void pair_tiles(int64_t M, const uint32_t* a, int64_t K2, int64_t p0, const __m512i* w, float* facc, const Epi& epi) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) pair_tile<6, NP>(a, K2, m, p0, w, facc, epi);
  switch (M - m) {
    case 5: pair_tile<5, NP>(a, K2, m, p0, w, facc, epi); break;
    case 4: pair_tile<4, NP>(a, K2, m, p0, w, facc, epi); break;
    case 3: pair_tile<3, NP>(a, K2, m, p0, w, facc, epi); break;
    case 2: pair_tile<2, NP>(a, K2, m, p0, w, facc, epi); break;
    case 1: pair_tile<1, NP>(a, K2, m, p0, w, facc, epi); break;
  }
}

// y (M, N) fp32 = x (M, K) bf16 @ W^T for an int4 layer kept in PyTorch's CPU int4pack layout (see
// int4_unpack), reading the packed bytes as they are. For each block of 64 outputs and group of 32
// inputs the nibbles q (0..15, exact in bf16) are spread into bf16 pairs (q[k], q[k+1]) per output
// (one byte permute and one 16-bit table lookup per 32 weights), reused by every row; a group adds
// scale * sum(q * x) + (zero - 8 * scale) * sum(x). Every row is computed alone in a fixed order
// (threads split the output blocks), in fp32 with exact products: ~1e-6 from the exact result, where
// ATen's kernel rounds its output to bf16. 1.5-1.7x faster than ATen's kernel at 16 rows, as fast at one.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be (M, K) bfloat16");
  const auto a = x.contiguous();
  const int64_t M = a.size(0), K = a.size(1), G = K / kGroup, N = scales_zeros.size(1), blocks = N / 64;
  TORCH_CHECK(K % kGroup == 0 && G == scales_zeros.size(0) && N % 64 == 0, "int4_mm: shapes do not match");
  auto out = torch::empty({M, N}, a.options().dtype(at::kFloat));
  std::vector<float> sums(M * G);  // each row's sum of activations per group
  const c10::BFloat16* ap = a.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.0f;
      for (int64_t k = 0; k < kGroup; ++k) t += static_cast<float>(ap[m * K + g * kGroup + k]);
      sums[m * G + g] = t;
    }
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint32_t* sz = reinterpret_cast<const uint32_t*>(scales_zeros.data_ptr<c10::BFloat16>());  // (scale, zero) pairs
  const uint32_t* a32 = reinterpret_cast<const uint32_t*>(ap);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) __m512i w[kGroup * 2];  // a group's 64 x 32 weights as bf16 pairs: [k pair][4 x 16 outputs]
    std::vector<float> facc(M * 64);
    // Byte 4j <- byte j of input k, byte 4j + 2 <- byte j of input k + 1 (j and j + 16), odd bytes 0:
    // 16-bit lanes holding the byte of outputs j (low nibble) and j + 32 (high nibble).
    alignas(64) uint8_t i0[64], i1[64];
    for (int j = 0; j < 16; ++j) {
      i0[4 * j] = j; i0[4 * j + 2] = 32 + j; i0[4 * j + 1] = i0[4 * j + 3] = 0;
      i1[4 * j] = 16 + j; i1[4 * j + 2] = 48 + j; i1[4 * j + 1] = i1[4 * j + 3] = 0;
    }
    const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
    const __mmask64 even = 0x5555555555555555ULL;
    alignas(64) uint16_t tb[32];  // bf16 of (i & 15): the lookup reads an index's low 5 bits
    for (int i = 0; i < 32; ++i) tb[i] = c10::BFloat16(static_cast<float>(i & 15)).x;
    const __m512i table = _mm512_load_si512(tb), high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t nb = b0; nb < b1; ++nb) {
      std::fill(facc.begin(), facc.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* src = p + (nb * G + g) * kGroup * 32;
        // Prefetch the bytes and scales 8 groups ahead (8 KB; the next block's once this one ends):
        // without it a step streaming its weights from memory runs 40% slower than from cache.
        if (const int64_t next = nb * G + g + 8; next < blocks * G) {
          prefetch(p + next * kGroup * 32, kGroup * 32);
          prefetch(sz + (next % G) * N + (next / G) * 64, 256);
        }
        for (int pr = 0; pr < kGroup / 2; ++pr) {
          const __m512i v = _mm512_loadu_si512(src + pr * 64);
          const __m512i t0 = _mm512_maskz_permutexvar_epi8(even, idx0, v), t1 = _mm512_maskz_permutexvar_epi8(even, idx1, v);
          w[pr * 4 + 0] = _mm512_permutexvar_epi16(t0, table);
          w[pr * 4 + 1] = _mm512_permutexvar_epi16(t1, table);
          w[pr * 4 + 2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(t0, 4), table);
          w[pr * 4 + 3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(t1, 4), table);
        }
        __m512 sc[4], bs[4];
        for (int c = 0; c < 4; ++c) {
          const __m512i raw = _mm512_loadu_si512(sz + g * N + nb * 64 + c * 16);
          sc[c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
          bs[c] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc[c], _mm512_castsi512_ps(_mm512_and_si512(raw, high)));
        }
        pair_tiles<kGroup / 2>(M, a32, K / 2, g * (kGroup / 2), w, facc.data(), [&](int64_t r, int c, __m512 dots, float* f) __attribute__((always_inline)) {
          const __m512 sum = _mm512_set1_ps(sums[r * G + g]);
          _mm512_storeu_ps(f, _mm512_fmadd_ps(bs[c], sum, _mm512_fmadd_ps(sc[c], dots, _mm512_loadu_ps(f))));
        });
      }
      for (int64_t r = 0; r < M; ++r) std::copy(facc.data() + r * 64, facc.data() + r * 64 + 64, o + r * N + nb * 64);
    }
  });
  return out;
}

// The layout int8_mm reads: qweight (N, K) as (N/64, K/2, 64, 2), the 64 outputs of a block side by side
// for each pair of inputs, so a block's weights are one sequential stream.
torch::Tensor int8_pack(const torch::Tensor& qweight) {
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && N % 64 == 0 && K % 2 == 0, "int8_pack: (N, K) int8 with N % 64 == 0 and even K");
  return qweight.view({N / 64, 64, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// y (M, N) fp32 = x (M, K) bf16 @ (q * scale)^T for an int8 layer (int8_pack's layout; scale bf16 (N,)):
// 32 inputs at a time the int8 weights become bf16 (exact) pairs, reused by every row; each row's
// dot products are summed in fp32 (exact products) per 32 inputs, then scaled. Rows independent as in
// int4_mm. For the vocabulary head: 2.7x ATen's int8 kernel at 16 rows, 1.4x at one.
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_mm: x must be (M, K) bfloat16");
  const auto a = x.contiguous();
  const int64_t M = a.size(0), K = a.size(1), K2 = K / 2, blocks = packed.size(0), N = blocks * 64;
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == K2 && K % 32 == 0 && scale.numel() == N, "int8_mm: shapes do not match");
  auto out = torch::empty({M, N}, a.options().dtype(at::kFloat));
  const int8_t* p = packed.data_ptr<int8_t>();
  const c10::BFloat16* sp = scale.data_ptr<c10::BFloat16>();
  const uint32_t* a32 = reinterpret_cast<const uint32_t*>(a.data_ptr<c10::BFloat16>());
  float* o = out.data_ptr<float>();
  constexpr int kChunk = 16;  // pairs of inputs per pass (4 KB of bf16 weights)
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) __m512i w[kChunk * 4];
    std::vector<float> facc(M * 64);
    for (int64_t nb = b0; nb < b1; ++nb) {
      std::fill(facc.begin(), facc.end(), 0.0f);
      for (int64_t p0 = 0; p0 < K2; p0 += kChunk) {
        const int8_t* src = p + (nb * K2 + p0) * 128;
        prefetch(src + 8192, kChunk * 128);  // 8 KB ahead: the next chunks or block (a sequential stream)
        for (int pr = 0; pr < kChunk; ++pr)
          for (int c = 0; c < 4; ++c) {  // 16 outputs x (k, k + 1): 32 bytes -> 32 bf16
            const int8_t* b = src + pr * 128 + c * 32;
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16))));
            w[pr * 4 + c] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
          }
        pair_tiles<kChunk>(M, a32, K2, p0, w, facc.data(), [](int64_t, int, __m512 dots, float* f) __attribute__((always_inline)) {
          _mm512_storeu_ps(f, _mm512_add_ps(_mm512_loadu_ps(f), dots));
        });
      }
      for (int c = 0; c < 4; ++c) {
        const __m512 s = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + nb * 64 + c * 16)));
        for (int64_t r = 0; r < M; ++r)
          _mm512_storeu_ps(o + r * N + nb * 64 + c * 16, _mm512_mul_ps(_mm512_loadu_ps(facc.data() + r * 64 + c * 16), s));
      }
    }
  });
  return out;
}

// int8_linear_mm's inner tile: MT rows (x as bf16, K apart) against 4 outputs whose int8 weights are rows of
// q (N, K) from n0, 32 inputs at a time widened exactly to bf16 and shared by the MT rows; each (row, output)
// keeps 16 fp32 lanes of pair dot products, summed across the lanes at the end in a fixed order.
template <int MT>
inline void int8_rows_tile(const c10::BFloat16* x, const int8_t* q, const c10::BFloat16* scale, int64_t K, int64_t N,
                           int64_t m0, int64_t n0, float* out) {
  __m512 acc[4][MT];
  for (int o = 0; o < 4; ++o)
    for (int m = 0; m < MT; ++m) acc[o][m] = _mm512_setzero_ps();
  const int8_t* rows = q + n0 * K;
  for (int64_t k = 0; k < K; k += 32) {
    prefetch(rows + 4 * K + k, 32);  // the next 4 outputs' weights, one stream each (sequential in memory)
    prefetch(rows + 5 * K + k, 32);
    prefetch(rows + 6 * K + k, 32);
    prefetch(rows + 7 * K + k, 32);
    __m512i w[4];
    for (int o = 0; o < 4; ++o) {
      const int8_t* b = rows + o * K + k;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16))));
      w[o] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // inputs k..k+31 in order, as x's bf16 lanes
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + k);
      for (int o = 0; o < 4; ++o) acc[o][m] = _mm512_dpbf16_ps(acc[o][m], (__m512bh)w[o], xv);
    }
  }
  for (int o = 0; o < 4; ++o) {
    const float s = static_cast<float>(scale[n0 + o]);
    for (int m = 0; m < MT; ++m) out[(m0 + m) * N + n0 + o] = _mm512_reduce_add_ps(acc[o][m]) * s;
  }
}

// y (M, N) fp32 = x (M, K) bf16 @ (q * scale)^T for an int8 layer as quant.Int8Linear keeps it: q (N, K) int8
// row-major, scale bf16 (N,), read as they are (no repacked copy). Products exact, summed in fp32 per output
// in a fixed order; threads split the outputs, so a row's result does not depend on the thread count or on
// the other rows. Streams the weights at the memory's speed where ATen's `_weight_int8pack_mm` (bf16
// output) ran ~1.4x slower in Gemma 3's decode step.
torch::Tensor int8_linear_mm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear_mm: x must be (M, K) bfloat16");
  const auto a = x.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.size(1) == K && K % 32 == 0 && N % 4 == 0
              && scale.numel() == N && scale.scalar_type() == at::kBFloat16, "int8_linear_mm: shapes do not match");
  auto out = torch::empty({M, N}, a.options().dtype(at::kFloat));
  const c10::BFloat16* ap = a.data_ptr<c10::BFloat16>();
  const int8_t* q = qweight.data_ptr<int8_t>();
  const c10::BFloat16* sp = scale.data_ptr<c10::BFloat16>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N / 4, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int8_rows_tile<4>(ap, q, sp, K, N, m, 4 * g, o);
      switch (M - m) {
        case 3: int8_rows_tile<3>(ap, q, sp, K, N, m, 4 * g, o); break;
        case 2: int8_rows_tile<2>(ap, q, sp, K, N, m, 4 * g, o); break;
        case 1: int8_rows_tile<1>(ap, q, sp, K, N, m, 4 * g, o); break;
      }
    }
  });
  return out;
}
#endif

// A linear layer's raw output (B, N): fp32 (nn.Linear with its bias; int4_mm and int8_mm without) or
// bf16 (ATen's bf16 and int8 kernels); the quantized layers' bias is added after the cast to fp32, as
// the Python layers do. `at` reads element (b, j) as the Python layer returns it: float(y) + bias, one
// IEEE operation each, so the loops below give the bits the Python ops give.
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

// Element-wise helpers over n values, vectorized where AVX-512 is there: each lane does the scalar
// code's IEEE operations in the same order, so the bits do not depend on the path.
#if defined(__AVX512F__)
inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }
// 16 values of o's row r from column j (masked), as `Out::at` reads them.
inline __m512 out16(const Out& o, int64_t r, int64_t j, __mmask16 m) {
  __m512 v = o.bf16 ? widen_bf16(_mm256_maskz_loadu_epi16(m, static_cast<const c10::BFloat16*>(o.p) + r * o.n + j))
                    : _mm512_maskz_loadu_ps(m, static_cast<const float*>(o.p) + r * o.n + j);
  return o.bias ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, o.bias + j)) : v;
}
// fp32 -> bf16 rounding to nearest even, as c10::BFloat16 (NaN aside).
inline void store_bf16(c10::BFloat16* dst, __m512 v, __mmask16 m) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(b));
}
#endif

// n values into a cache row (elements `step` apart), rounded to nearest even when the cache is fp16.
inline void store_cache(void* dst, bool half, int64_t step, const float* src, int64_t n) {
  if (!half) {
    float* d = static_cast<float*>(dst);
    if (step == 1) std::copy(src, src + n, d);
    else for (int64_t j = 0; j < n; ++j) d[j * step] = src[j];
    return;
  }
  c10::Half* d = static_cast<c10::Half*>(dst);
#if defined(__AVX512F__)
  if (step == 1 && n % 16 == 0) {
    for (int64_t j = 0; j < n; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) d[j * step] = c10::Half(src[j]);
}

// dst[j] = o(r, off + j)
inline void copy_out(const Out& o, int64_t r, int64_t off, int64_t n, float* dst) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n; j += 16) _mm512_mask_storeu_ps(dst + j, lanes(n - j), out16(o, r, off + j, lanes(n - j)));
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = o.at(r, off + j);
#endif
}

// x[j] = x[j] + o(r, j)
inline void add_out(float* x, const Out& o, int64_t r, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    _mm512_mask_storeu_ps(x + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + j), out16(o, r, j, m)));
  }
#else
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] + o.at(r, j);
#endif
}

// dst[j] = a[j] * o(r, off + j), in fp32 or rounded to bf16
template <typename T>
inline void mul_out(const float* a, const Out& o, int64_t r, int64_t off, int64_t n, T* dst) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + j), out16(o, r, off + j, m));
    if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(dst + j, m, v);
    else store_bf16(dst + j, v, m);
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = T(a[j] * o.at(r, off + j));
#endif
}

// dst[j] = (x[j] * r) * w[j], in fp32 or rounded to bf16
template <typename T>
inline void scale_into(const float* x, float r, const float* w, int64_t n, T* dst) {
#if defined(__AVX512F__)
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), rv), _mm512_maskz_loadu_ps(m, w + j));
    if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(dst + j, m, v);
    else store_bf16(dst + j, v, m);
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = T((x[j] * r) * w[j]);
#endif
}

// sum of x[j]^2 in double, in a fixed order (8 lanes, then the lanes in order)
inline double sum_squares(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512d acc = _mm512_setzero_pd();
  for (int64_t j = 0; j < n; j += 8) {
    const __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps((__mmask8)lanes(n - j), x + j));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(v, v));
  }
  alignas(64) double part[8];
  _mm512_store_pd(part, acc);
  double total = 0.0;
  for (double v : part) total += v;
  return total;
#else
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) total += static_cast<double>(x[j]) * x[j];
  return total;
#endif
}

// Rotary embedding of one head: dst[d] = x[d] * c[d] + x[(d + D/2) % D] * s[d]
inline void rope_into(const float* x, const float* c, const float* s, int64_t D, float* dst) {
  const int64_t half = D / 2;
#if defined(__AVX512F__)
  for (int64_t part = 0; part < 2; ++part) {  // d in [0, half): partner d + half; [half, D): d - half
    const int64_t from = part * half, partner = part ? -half : half;
    for (int64_t j = 0; j < half; j += 16) {
      const __mmask16 m = lanes(half - j);
      const int64_t d = from + j;
      const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + d), _mm512_maskz_loadu_ps(m, c + d));
      const __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + d + partner), _mm512_maskz_loadu_ps(m, s + d));
      _mm512_mask_storeu_ps(dst + d, m, _mm512_add_ps(a, b));
    }
  }
#else
  for (int64_t d = 0; d < D; ++d) dst[d] = x[d] * c[d] + x[(d + half) % D] * s[d];
#endif
}

// RMSNorm of n values in place: x * rsqrt(mean(x * x) + eps) * w, the mean of squares summed in double
// (see decode_step's norm_into).
inline void rms_norm_inplace(float* x, const float* w, int64_t n, double eps) {
  const float r = 1.0f / std::sqrt(static_cast<float>(sum_squares(x, n) / n) + static_cast<float>(eps));
  scale_into(x, r, w, n, x);
}

// Whether a layer of this kind takes its rows in bf16 (the quantized and bf16 layers) or fp32.
inline bool bf16_input(int64_t kind) { return kind >= 1 && kind <= 4; }

// The raw output of linear `i` for input rows x (B, K) already in the layer's input dtype.
torch::Tensor raw_linear(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const c10::optional<torch::Tensor>& bias,
                         const torch::Tensor& x) {
  TORCH_CHECK(kind != 5, "raw_linear: a kind-5 layer is called through Python");
  if (kind == 0) return at::linear(x, a, bias);
  if (kind == 1) return at::linear(x, a);
#ifdef LLMOS_BF16_KERNELS
  if (kind == 2 && a.size(0) % 4 == 0 && a.size(1) % 32 == 0) return int8_linear_mm(x, a, b);  // as quant.Int8Linear
  if (kind == 4) return int8_mm(x, a, b);
  if (kind == 3 && b.size(1) % 64 == 0) return int4_mm(x, a, b);
#endif
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

// Softmax in place over p[0..n), the row's scores: p[s] = exp(p[s] - max) for s < n and 0 for n <= s
// < end (end rounded up to 16: later keys of a block of queries); returns 1 / the sum.
inline float softmax_row(float* p, int64_t n, int64_t end) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < n; s += 16) mx = _mm512_mask_max_ps(mx, lanes(n - s), mx, _mm512_loadu_ps(p + s));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < end; s += 16) {
    const __m512 ex = _mm512_maskz_mov_ps(s < n ? lanes(n - s) : 0, exp512(_mm512_sub_ps(_mm512_loadu_ps(p + s), m)));
    _mm512_storeu_ps(p + s, ex);
    sum = _mm512_add_ps(sum, ex);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// out[i] (rows out_stride apart, 16 * Z columns) = inv[i] * sum over keys s < e of p[i][s] * v[s] for
// the first `nrows` of ROWS rows of weights (stride apart); v's rows vstride apart. Every row shares
// each value row loaded, and ROWS x Z independent accumulators keep the multiply-adds busy; each sum
// runs over s in order, so any ROWS gives the same bits.
template <int ROWS, int Z, typename T>
inline void weighted_rows(const float* p, int64_t stride, const T* v, int64_t vstride, int64_t e, const float* inv, int nrows,
                          float* out, int64_t out_stride) {
  __m512 o[ROWS][Z];
  for (int i = 0; i < ROWS; ++i)
    for (int z = 0; z < Z; ++z) o[i][z] = _mm512_setzero_ps();
  for (int64_t s = 0; s < e; ++s) {
    __m512 vv[Z];
    for (int z = 0; z < Z; ++z) vv[z] = load16(v + s * vstride + 16 * z);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m512 w = _mm512_set1_ps(p[i * stride + s]);
      for (int z = 0; z < Z; ++z) o[i][z] = _mm512_fmadd_ps(w, vv[z], o[i][z]);
    }
  }
  for (int i = 0; i < nrows; ++i)
    for (int z = 0; z < Z; ++z) _mm512_storeu_ps(out + i * out_stride + 16 * z, _mm512_mul_ps(o[i][z], _mm512_set1_ps(inv[i])));
}

// weighted_rows over D columns in passes of 32 (or 16): for shapes without a register-sized variant.
template <int ROWS, typename T>
inline void weighted_columns(const float* p, int64_t stride, const T* v, int64_t vstride, int64_t e, const float* inv, int nrows,
                             float* out, int64_t D) {
  for (int64_t dc = 0; dc < D; dc += 32) {
    if (dc + 32 <= D) weighted_rows<ROWS, 2>(p, stride, v + dc, vstride, e, inv, nrows, out + dc, D);
    else weighted_rows<ROWS, 1>(p, stride, v + dc, vstride, e, inv, nrows, out + dc, D);
  }
}

// weighted_rows for all R = rep query heads of a kv head (up to 4), in passes of 64 columns: the heads share
// each value row loaded (Gemma 3 270M: 4 heads of 256 over one kv head).
template <typename T>
inline void weighted_heads(int64_t rep, const float* p, int64_t stride, const T* v, int64_t vstride, int64_t e, const float* inv,
                           float* out, int64_t D) {
  for (int64_t dc = 0; dc < D; dc += 64) {
    switch (rep) {
      case 1: weighted_rows<1, 4>(p, stride, v + dc, vstride, e, inv, 1, out + dc, D); break;
      case 2: weighted_rows<2, 4>(p, stride, v + dc, vstride, e, inv, 2, out + dc, D); break;
      case 3: weighted_rows<3, 4>(p, stride, v + dc, vstride, e, inv, 3, out + dc, D); break;
      default: weighted_rows<4, 4>(p, stride, v + dc, vstride, e, inv, 4, out + dc, D); break;
    }
  }
}

// Decode attention: one query per (row, head) over that row's cached keys first[row]..keys[row]-1 (a
// sliding window starts past 0). q (B, H, D)
// contiguous; k, v a layer's cache (B, Hkv, S, D) by strides (rows, heads, positions; D contiguous);
// out (B, H, D). Scores are q . k * scale, soft-capped when cap > 0. One thread computes a (row, kv head) pair in a fixed order, so a row's result does not
// depend on the thread count or on the other rows of the step: decoded in a batch it gets the bits it
// gets alone. Replaces per-row SDPA calls (~20 us each with their setup; 16 rows x 30 layers were 35%
// of a 16-row step); differs from SDPA by ~3e-7.
template <typename T>
void decode_attention(const float* q, const T* k, const T* v, const int64_t* ks, const int64_t* vs, const std::vector<int64_t>& first,
                      const std::vector<int64_t>& keys, int64_t B, int64_t H, int64_t n_kv, int64_t D, float scale, float cap,
                      float* out) {
  const int64_t rep = H / n_kv, dv = D / 16;
  at::parallel_for(0, B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / n_kv, g = t % n_kv, e = keys[r] - first[r];  // keys counted from the first one read
      const T* kr = k + r * ks[0] + g * ks[1] + first[r] * ks[2];
      const T* vr = v + r * vs[0] + g * vs[1] + first[r] * vs[2];
      if (t + 1 < t1) {  // the next pair's keys and values while this one computes (short streams stall on memory)
        const int64_t rn = (t + 1) / n_kv, gn = (t + 1) % n_kv;
        for (int64_t s = first[rn]; s < keys[rn]; ++s) {
          prefetch(k + rn * ks[0] + gn * ks[1] + s * ks[2], D * sizeof(T));
          prefetch(v + rn * vs[0] + gn * vs[1] + s * vs[2], D * sizeof(T));
        }
      }
      const int64_t stride = (e + 15) / 16 * 16;
      p.assign(rep * stride, 0.0f);
      __m512 qv[8][16];  // up to 8 query heads per kv head, D up to 256
      for (int64_t h = 0; h < rep; ++h)
        for (int64_t j = 0; j < dv; ++j) qv[h][j] = _mm512_mul_ps(_mm512_loadu_ps(q + ((r * H + g * rep + h) * D) + 16 * j), _mm512_set1_ps(scale));
      for (int64_t s = 0; s < e; ++s) {
        const T* ksr = kr + s * ks[2];
        __m512 kv[16];
        for (int64_t j = 0; j < dv; ++j) kv[j] = load16(ksr + 16 * j);
        for (int64_t h = 0; h < rep; ++h) {
          __m512 acc = _mm512_mul_ps(qv[h][0], kv[0]);
          for (int64_t j = 1; j < dv; ++j) acc = _mm512_fmadd_ps(qv[h][j], kv[j], acc);
          p[h * stride + s] = _mm512_reduce_add_ps(acc);
        }
      }
      if (cap > 0.0f)  // Gemma 2's soft-capped scores: cap * tanh(score / cap)
        for (int64_t h = 0; h < rep; ++h)
          for (int64_t s = 0; s < e; ++s) p[h * stride + s] = std::tanh(p[h * stride + s] / cap) * cap;
      float inv[8];
      for (int64_t h = 0; h < rep; ++h) inv[h] = softmax_row(p.data() + h * stride, e, e);
      float* oh = out + (r * H + g * rep) * D;
      const int R = static_cast<int>(rep);
      if (rep == 3 && dv == 4) weighted_rows<3, 4>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep == 1 && dv == 4) weighted_rows<1, 4>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep == 2 && dv == 4) weighted_rows<2, 4>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep == 4 && dv == 4) weighted_rows<4, 4>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep == 1 && dv == 8) weighted_rows<1, 8>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep == 2 && dv == 8) weighted_rows<2, 8>(p.data(), stride, vr, vs[2], e, inv, R, oh, D);
      else if (rep <= 4 && dv % 4 == 0) weighted_heads<T>(rep, p.data(), stride, vr, vs[2], e, inv, oh, D);  // Gemma's 256
      else
        for (int64_t h = 0; h < rep; ++h) weighted_columns<1>(p.data() + h * stride, stride, vr, vs[2], e, inv + h, 1, oh + h * D, D);
    }
  });
}

#endif

#if defined(__AVX512F__)
// Rows r0..r0+NR-1 (NR <= 8; a head's queries q, D apart) against keys 0..e-1 of kt (D x stride, keys
// transposed): scores * scale into p (8 x stride), 32 keys at a time (the last block reads the
// zero padding of kt).
inline void causal_scores(const float* q, const float* kt, int64_t stride, int64_t D, int64_t e, int NR, float scale, float* p) {
  const float* rows[8];
  for (int i = 0; i < 8; ++i) rows[i] = q + std::min(i, NR - 1) * D;  // spare lanes repeat the last row
  for (int64_t j = 0; j < e; j += 32) {
    __m512 acc[8][2];
    for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 k0 = _mm512_loadu_ps(kt + d * stride + j), k1 = _mm512_loadu_ps(kt + d * stride + j + 16);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512 qi = _mm512_set1_ps(rows[i][d]);
        acc[i][0] = _mm512_fmadd_ps(qi, k0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(qi, k1, acc[i][1]);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(p + i * stride + j, _mm512_mul_ps(acc[i][0], sc));
      _mm512_storeu_ps(p + i * stride + j + 16, _mm512_mul_ps(acc[i][1], sc));
    }
  }
}

#endif

}  // namespace

// x: (B, C) embeddings (Gemma's already scaled); kc, vc: (L, B, Hkv, S, D) caches (views allowed).
// positions: each row's position; per_row: rows at their own positions, each attending over exactly its
// own keys (the batched engine), else one shared position (positions[0]) for all rows, attending over
// n_keys keys. cos, sin: rope tables, (B or 1, D) rows each; layer i rotates by table rope_of[i] and, where
// windows[i] > 0, attends only to the last windows[i] positions up to its own (a sliding window).
// norms: per layer the attention and MLP norms, then (post_norms) the norms of the attention and MLP
// outputs, then (qk_norm) the per-head q and k norms; the final norm last; norm_plus_one: each norm scales
// by (1 + w) (Gemma 2 keeps w), else by w. kinds/tensors: 4 linears per layer (wqkv, wo, w13, w2) then the
// head, 3 tensors each (None where unused). act: the MLP's gate, "silu" (SwiGLU), "gelu_tanh" or "gelu"
// (GeGLU); q_scale multiplies the rotated queries (Gemma 3's query_pre_attn_scalar; 1: not applied);
// attention scores are q . k * attn_scale, soft-capped by attn_cap when it is > 0 (Gemma 2). Returns
// logits (B, V) fp32 (before Gemma 2's final soft-cap, which the caller applies as the model does).
//
// That covers models/llama.py (Llama, Mistral's window, Qwen3's q/k norms), models/gemma3.py (four
// norms a block, q/k norms, GeGLU, per-layer windows and RoPE bases) and models/gemma2.py (the same
// norms as (1 + w), soft-capped scores, alternating windows). Per layer this issues four matmuls
// to ATen or the kernels above; the norms, the rotary embedding with the cache writes, attention, the
// residual adds and the gated product run here (no fused multiply-add outside the attention kernel:
// built with -ffp-contract=off).
torch::Tensor decode_step(torch::Tensor x, const std::vector<int64_t>& positions, bool per_row, int64_t n_keys,
                          const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                          const std::vector<int64_t>& rope_of, const std::vector<int64_t>& windows,
                          const torch::Tensor& kc, const torch::Tensor& vc,
                          const std::vector<torch::Tensor>& norms, const std::vector<int64_t>& kinds,
                          const std::vector<c10::optional<torch::Tensor>>& tensors, int64_t n_heads, int64_t n_kv,
                          int64_t head_dim, double eps, bool post_norms, bool qk_norm, bool norm_plus_one, const std::string& act,
                          double q_scale, double attn_scale, double attn_cap, const std::vector<py::object>& calls,
                          const std::vector<torch::Tensor>& gguf_raws, const std::vector<int64_t>& gguf_qtypes,
                          const std::vector<int64_t>& gguf_first, const py::object& gguf_matmul) {
  torch::NoGradGuard no_grad;
  const int64_t L = kc.size(0), B = x.size(0), C = x.size(-1), H = n_heads, D = head_dim;
  const int64_t per_layer = 2 + (post_norms ? 2 : 0) + (qk_norm ? 2 : 0);  // norms a layer
  TORCH_CHECK(D % 16 == 0 && D <= 256 && static_cast<int64_t>(norms.size()) == per_layer * L + 1
              && static_cast<int64_t>(rope_of.size()) == L && static_cast<int64_t>(windows.size()) == L,
              "decode_step: arguments do not match the model");
  TORCH_CHECK(act == "silu" || act == "gelu_tanh" || act == "gelu", "decode_step: unknown activation ", act);
  static const torch::Tensor none;
  // A norm's multiplier: its weight, or (norm_plus_one) 1 + weight computed in fp32 as gemma2.py does.
  std::vector<float> plus_one[2];
  auto weight_of = [&](const torch::Tensor& w, int which) -> const float* {
    const float* wp = w.data_ptr<float>();
    if (!norm_plus_one) return wp;
    auto& buf = plus_one[which];
    buf.resize(w.numel());
    for (int64_t j = 0; j < w.numel(); ++j) buf[j] = 1.0f + wp[j];
    return buf.data();
  };
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
    for (int64_t b = 0; b < B; ++b)
      rp[b] = 1.0f / std::sqrt(static_cast<float>(sum_squares(xp + b * C, C) / C) + static_cast<float>(eps));
    const float* wp = weight_of(w, 0);
    if (bf16_input(kinds[i])) {
      for (int64_t b = 0; b < B; ++b) scale_into(xp + b * C, rp[b], wp, C, normed_bf16.data_ptr<c10::BFloat16>() + b * C);
      return normed_bf16;
    }
    for (int64_t b = 0; b < B; ++b) scale_into(xp + b * C, rp[b], wp, C, normed_f32.data_ptr<float>() + b * C);
    return normed_f32;
  };
  // gguf_kernels' matmul_into (see kind 5 above), or null: the GGUF layers' Python forward.
  using GGUFMatmul = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);
  GGUFMatmul gguf_mm = nullptr;
  if (!gguf_matmul.is_none()) {
    gguf_mm = reinterpret_cast<GGUFMatmul>(PyCapsule_GetPointer(gguf_matmul.ptr(), "llmos_gguf_matmul_into"));
    if (!gguf_mm) PyErr_Clear();
    TORCH_CHECK(gguf_mm, "decode_step: gguf_matmul must be gguf_kernels.matmul_capsule()");
  }
  TORCH_CHECK(!gguf_mm || static_cast<int64_t>(gguf_first.size()) == static_cast<int64_t>(kinds.size()) + 1,
              "decode_step: gguf_first must hold one offset per linear, and the end");
  auto lin = [&](int64_t i, const torch::Tensor& in) {
    if (kinds[i] == 5 && gguf_mm) {
      // The parts' columns side by side in one (B, N) output, as GGUFLinear concatenates them.
      TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous(), "decode_step: GGUF layers take contiguous fp32 rows");
      int64_t n = 0;
      for (int64_t p = gguf_first[i]; p < gguf_first[i + 1]; ++p) n += gguf_raws[p].size(0);
      auto y = torch::empty({B, n}, x.options());
      int64_t col = 0;
      for (int64_t p = gguf_first[i]; p < gguf_first[i + 1]; ++p) {
        const auto& raw = gguf_raws[p];
        gguf_mm(raw.data_ptr<uint8_t>(), gguf_qtypes[p], in.data_ptr<float>(), B, in.size(1), y.data_ptr<float>() + col, raw.size(0), n);
        col += raw.size(0);
      }
      return Out(y, tensors[3 * i + 2], 5);
    }
    if (kinds[i] == 5) return Out(calls[i](in).cast<torch::Tensor>(), c10::nullopt, 5);
    const auto& b = tensors[3 * i + 1];
    return Out(raw_linear(kinds[i], *tensors[3 * i], b.has_value() ? *b : none, tensors[3 * i + 2], in), tensors[3 * i + 2], kinds[i]);
  };
  // x += o, or (post_norms) x += RMSNorm(o) with norm weight w
  std::vector<float> post(post_norms ? C : 0);
  auto residual = [&](const Out& o, const torch::Tensor& w) {
    for (int64_t r = 0; r < B; ++r) {
      if (!post_norms) {
        add_out(xp + r * C, o, r, C);
        continue;
      }
      copy_out(o, r, 0, C, post.data());
      rms_norm_inplace(post.data(), weight_of(w, 0), C, eps);
      for (int64_t j = 0; j < C; ++j) xp[r * C + j] = xp[r * C + j] + post[j];
    }
  };
  std::vector<torch::Tensor> cos_c, sin_c;
  for (size_t t = 0; t < cos.size(); ++t) {
    cos_c.push_back(cos[t].contiguous());
    sin_c.push_back(sin[t].contiguous());
  }
  auto q = torch::empty({B, H, 1, D}, x.options());
  auto y = torch::empty({B, H, D}, x.options());
  auto attn_bf16 = torch::empty({B, H * D}, x.options().dtype(at::kBFloat16));
  torch::Tensor gate, gated, prod_bf16, prod_f32;  // (B, F), allocated at the first MLP
  float* qp = q.data_ptr<float>();
  const auto ks = kc.strides(), vs = vc.strides();
  const bool half_cache = kc.scalar_type() == at::kHalf;
  TORCH_CHECK(half_cache || kc.scalar_type() == at::kFloat, "decode_step: the KV cache must be fp32 or fp16");
  char* kbase = static_cast<char*>(kc.data_ptr());
  char* vbase = static_cast<char*>(vc.data_ptr());
  const int64_t es = kc.element_size();
  alignas(64) float head_in[256], kv_row[256];  // a head of the qkv output; a rotated key before it is stored
  std::vector<int64_t> first(B), keys(B);
  for (int64_t layer = 0; layer < L; ++layer) {
    const torch::Tensor* w = &norms[per_layer * layer];  // this layer's norms
    const float* q_w = qk_norm ? weight_of(w[per_layer - 2], 0) : nullptr;
    const float* k_w = qk_norm ? weight_of(w[per_layer - 1], 1) : nullptr;
    Out qkv = lin(4 * layer, norm_into(4 * layer, w[0]));
    // Per head: (q/k norm,) rotary embedding of q and k (x * cos + roll(x, D/2) * sin), k and v written
    // into the cache.
    const float* cp = cos_c[rope_of[layer]].data_ptr<float>();
    const float* sp = sin_c[rope_of[layer]].data_ptr<float>();
    const int64_t rope_stride = cos_c[rope_of[layer]].size(0) == 1 ? 0 : D;
    for (int64_t r = 0; r < B; ++r) {
      const int64_t pos = per_row ? positions[r] : positions[0];
      const float* c = cp + r * rope_stride;
      const float* s = sp + r * rope_stride;
      for (int64_t head = 0; head < H + 2 * n_kv; ++head) {
        const bool is_q = head < H, is_v = head >= H + n_kv;
        copy_out(qkv, r, head * D, D, head_in);
        if (qk_norm && !is_v) rms_norm_inplace(head_in, is_q ? q_w : k_w, D, eps);
        if (is_q) {
          float* dst = qp + (r * H + head) * D;
          rope_into(head_in, c, s, D, dst);
          if (q_scale != 1.0)
            for (int64_t d = 0; d < D; ++d) dst[d] = dst[d] * static_cast<float>(q_scale);
          continue;
        }
        const int64_t g = is_v ? head - H - n_kv : head - H;
        const auto& st = is_v ? vs : ks;
        if (!is_v) rope_into(head_in, c, s, D, kv_row);
        store_cache((is_v ? vbase : kbase) + (layer * st[0] + r * st[1] + g * st[2] + pos * st[3]) * es, half_cache, st[4],
                    is_v ? head_in : kv_row, D);
      }
    }
    {
      // Which keys each row reads: its own up to its position (per row) or all n_keys, a window's last ones.
      for (int64_t r = 0; r < B; ++r) {
        const int64_t pos = per_row ? positions[r] : positions[0];
        keys[r] = per_row ? pos + 1 : n_keys;
        first[r] = 0;
        if (windows[layer] > 0) {
          keys[r] = std::min(keys[r], pos + 1);
          first[r] = std::max<int64_t>(0, pos + 1 - windows[layer]);
        }
      }
      const int64_t kst[3] = {ks[1], ks[2], ks[3]}, vst[3] = {vs[1], vs[2], vs[3]};
#if defined(__AVX512F__)
      if (half_cache)
        decode_attention(qp, reinterpret_cast<const c10::Half*>(kbase) + layer * ks[0], reinterpret_cast<const c10::Half*>(vbase) + layer * vs[0],
                         kst, vst, first, keys, B, H, n_kv, D, static_cast<float>(attn_scale), static_cast<float>(attn_cap), y.data_ptr<float>());
      else
        decode_attention(qp, reinterpret_cast<const float*>(kbase) + layer * ks[0], reinterpret_cast<const float*>(vbase) + layer * vs[0],
                         kst, vst, first, keys, B, H, n_kv, D, static_cast<float>(attn_scale), static_cast<float>(attn_cap), y.data_ptr<float>());
#else
      // Without AVX-512: SDPA per row over its own keys (no soft-cap: native.py keeps Gemma 2 in Python there).
      for (int64_t r = 0; r < B; ++r)
        y[r].copy_(at::scaled_dot_product_attention(q.slice(0, r, r + 1), kc[layer].slice(0, r, r + 1).slice(2, first[r], keys[r]).to(at::kFloat),
                                                    vc[layer].slice(0, r, r + 1).slice(2, first[r], keys[r]).to(at::kFloat), c10::nullopt, 0.0,
                                                    false, attn_scale, n_kv != n_heads)[0].squeeze(1));
#endif
    }
    // (B, H, D) -> (B, H * D) in wo's input dtype, cast as the Python layer casts it.
    const auto attn = y.view({B, H * D});
    residual(lin(4 * layer + 1, bf16_input(kinds[4 * layer + 1]) ? attn_bf16.copy_(attn) : attn), post_norms ? w[2] : none);
    Out gate_up = lin(4 * layer + 2, norm_into(4 * layer + 2, w[1]));
    const int64_t F = gate_up.n / 2;
    // SwiGLU or GeGLU: act(gate) * up, rounded to the down projection's input dtype.
    if (!gate.defined()) {
      gate = torch::empty({B, F}, x.options());
      gated = torch::empty({B, F}, x.options());
      prod_bf16 = torch::empty({B, F}, x.options().dtype(at::kBFloat16));
      prod_f32 = torch::empty({B, F}, x.options());
    }
    float* gp = gate.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) copy_out(gate_up, r, 0, F, gp + r * F);
    if (act == "silu") at::silu_out(gated, gate);
    else at::gelu_out(gated, gate, act == "gelu_tanh" ? "tanh" : "none");
    const float* ap = gated.data_ptr<float>();
    const bool down_bf16 = bf16_input(kinds[4 * layer + 3]);
    auto& prod = down_bf16 ? prod_bf16 : prod_f32;
    for (int64_t r = 0; r < B; ++r) {
      if (down_bf16) mul_out(ap + r * F, gate_up, r, F, F, prod_bf16.data_ptr<c10::BFloat16>() + r * F);
      else mul_out(ap + r * F, gate_up, r, F, F, prod_f32.data_ptr<float>() + r * F);
    }
    residual(lin(4 * layer + 3, prod), post_norms ? w[3] : none);
  }
  // The head (no bias in these families; a GGUF head's, if any, added as GGUFLinear adds it).
  const Out head = lin(4 * L, norm_into(4 * L, norms[per_layer * L]));
  const auto logits = head.y.to(at::kFloat);
  return kinds[4 * L] == 5 && head.bias ? logits + *tensors[3 * 4 * L + 2] : logits;
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

#if defined(__AVX512F__)
// Causal attention of a run of consecutive query positions p0..p0+T-1 (a prompt, or a chunk of one
// after p0 cached positions): q (B, H, T, D), k and v (B, Hkv, S >= p0 + T, D) with D contiguous;
// returns (B, H, T, D). Query t sees keys 0..p0+t. Blocks of 8 queries: their scores against the keys
// up to the block's last query (so the masked triangle is skipped but for the block's own corner),
// softmax in place, then the weighted sum of values, all in fp32 with fused multiply-adds (~1e-6 from
// SDPA). A query's result depends only on its own row and keys, in a fixed order: prefilling a prompt
// whole or in chunks, with any thread count, gives the same bits. 2-3x faster than PyTorch's CPU
// flash attention on 512-token prompts (which computes the whole masked triangle per block of keys).
torch::Tensor causal_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v, int64_t p0) {
  const bool half = k.scalar_type() == at::kHalf;
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q_in.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type()
              && (half || k.scalar_type() == at::kFloat) && k.stride(3) == 1 && v.stride(3) == 1,
              "causal_attention: q fp32 (B, H, T, D), k and v fp32 or fp16 (B, Hkv, S, D)");
  const auto q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), rep = H / Hkv;
  const int64_t E = p0 + T, stride = (E + 31) / 32 * 32;
  TORCH_CHECK(D % 16 == 0 && H % Hkv == 0 && k.size(2) >= E && v.size(2) >= E, "causal_attention: shapes do not match");
  auto out = torch::empty({B, H, T, D}, q.options());
  // Keys transposed per (row, kv head): (D, stride), zero-padded past E.
  auto kt = torch::zeros({B, Hkv, D, stride}, q.options());
  float* ktp = kt.data_ptr<float>();
  auto transpose = [&](const auto* kp) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto* src = kp + (t / Hkv) * k.stride(0) + (t % Hkv) * k.stride(1);
        float* dst = ktp + t * D * stride;
        for (int64_t s = 0; s < E; ++s)
          for (int64_t d = 0; d < D; ++d) dst[d * stride + s] = static_cast<float>(src[s * k.stride(2) + d]);
      }
    });
  };
  if (half) transpose(k.data_ptr<c10::Half>());
  else transpose(k.data_ptr<float>());
  const int64_t blocks = (T + 7) / 8;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  const void* vp = v.data_ptr();
  float* op = out.data_ptr<float>();
  // Tasks (row, head, block), blocks ordered 0, n-1, 1, n-2, ... so that both threads' halves hold
  // as many long blocks as short ones.
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> pbuf(8 * stride);
    float* p = pbuf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, i = t % blocks, b = bh / H, h = bh % H, g = h / rep;
      const int64_t blk = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
      const int64_t r0 = blk * 8;
      const int NR = static_cast<int>(std::min<int64_t>(8, T - r0));
      const int64_t e = p0 + r0 + NR;  // keys the block's last query sees
      const float* qrow = qp + (bh * T + r0) * D;
      causal_scores(qrow, ktp + (b * Hkv + g) * D * stride, stride, D, e, NR, scale, p);
      float inv[8];
      for (int r = 0; r < 8; ++r) inv[r] = softmax_row(p + r * stride, std::min<int64_t>(p0 + r0 + r + 1, e), e);  // its keys
      float* orow = op + (bh * T + r0) * D;
      const int64_t voff = b * v.stride(0) + g * v.stride(1);
      if (half) weighted_columns<8>(p, stride, static_cast<const c10::Half*>(vp) + voff, v.stride(2), e, inv, NR, orow, D);
      else weighted_columns<8>(p, stride, static_cast<const float*>(vp) + voff, v.stride(2), e, inv, NR, orow, D);
    }
  });
  return out;
}
#endif

// ---------------------------------------------------------------------------------------------------
// A BERT encoder's forward over packed texts (models/bert.py `forward_packed`), the same ATen calls in
// the same order, so the same bits, as one call that releases the GIL: a query embedding then runs
// beside Python work on another thread (Index.search's keyword side) instead of taking turns with it
// at every op. `threads` > 0 runs it on that many OpenMP threads (this thread's setting only, put
// back after); 0 keeps the thread's own. Weights per layer, in order: wqkv (w, b), wo (w, b),
// attn_norm (w, b), fc (w, b), proj (w, b), mlp_norm (w, b).
torch::Tensor bert_forward(const torch::Tensor& tokens, const torch::Tensor& positions, const torch::Tensor& types,
                           const std::vector<int64_t>& lengths, const std::vector<torch::Tensor>& embeddings,
                           const std::vector<torch::Tensor>& layers, int64_t n_heads, double eps, bool gelu_tanh,
                           int64_t threads) {
  TORCH_CHECK(embeddings.size() == 5 && layers.size() % 12 == 0, "bert_forward: 5 embedding and 12 tensors a layer");
  py::gil_scoped_release no_gil;
  c10::InferenceMode inference;
  at::internal::lazy_init_num_threads();  // this thread's OpenMP setting made before it is changed
  struct Threads {  // put back however the forward ends
    int previous = omp_get_max_threads();
    explicit Threads(int64_t n) { if (n > 0) omp_set_num_threads(static_cast<int>(n)); }
    ~Threads() { omp_set_num_threads(previous); }
  } scoped(threads);
  const int64_t C = embeddings[0].size(1);
  const std::vector<int64_t> shape{C};
  torch::Tensor x = at::embedding(embeddings[0], tokens) + at::embedding(embeddings[1], positions);
  x = at::layer_norm(x + at::embedding(embeddings[2], types), shape, embeddings[3], embeddings[4], eps);
  const char* approximate = gelu_tanh ? "tanh" : "none";
  for (size_t l = 0; l < layers.size(); l += 12) {
    const torch::Tensor* w = layers.data() + l;
    const torch::Tensor qkv = at::linear(x, w[0], w[1]);  // (N, 3*H*D)
    const int64_t H = n_heads, D = qkv.size(1) / (3 * n_heads);
    std::vector<torch::Tensor> out;
    int64_t start = 0;
    for (size_t b = 0; b < lengths.size();) {
      const int64_t L = lengths[b];
      size_t e = b + 1;
      while (e < lengths.size() && lengths[e] == L) ++e;
      const int64_t G = static_cast<int64_t>(e - b);
      const torch::Tensor q = qkv.slice(0, start, start + G * L).view({G, L, 3, H, D}).permute({2, 0, 3, 1, 4});  // (3, G, H, L, D)
      const torch::Tensor y = at::scaled_dot_product_attention(q[0], q[1], q[2]);  // (G, H, L, D)
      out.push_back(y.transpose(1, 2).reshape({G * L, H * D}));  // (G*L, H*D)
      start += G * L;
      b = e;
    }
    const torch::Tensor attended = out.size() == 1 ? out[0] : at::cat(out);
    x = at::layer_norm(x + at::linear(attended, w[2], w[3]), shape, w[4], w[5], eps);
    const torch::Tensor hidden = at::linear(at::gelu(at::linear(x, w[6], w[7]), approximate), w[8], w[9]);
    x = at::layer_norm(x + hidden, shape, w[10], w[11], eps);
  }
  return x;  // (N, C)
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LLMOS_BF16_KERNELS
  m.def("int4_mm", &int4_mm, "x (M, K) bf16 @ int4 weights^T -> (M, N) fp32 (see native_step.cpp)");
  m.def("int8_mm", &int8_mm, "x (M, K) bf16 @ int8 weights^T -> (M, N) fp32 (see native_step.cpp)");
  m.def("int8_linear_mm", &int8_linear_mm, "x (M, K) bf16 @ int8 (N, K) weights^T -> (M, N) fp32 (see native_step.cpp)");
  m.def("int8_pack", &int8_pack, "int8 (N, K) weights in int8_mm's layout (see native_step.cpp)");
#endif
#if defined(__AVX512F__)
  m.def("causal_attention", &causal_attention, "Causal attention of consecutive query positions (see native_step.cpp)");
#endif
  m.def("int4_unpack", &int4_unpack, "Int4 packed weights to bf16 W^T (see native_step.cpp)");
  m.def("bert_forward", &bert_forward, "A BERT encoder's forward over packed texts, without the GIL (see native_step.cpp)");
  m.def("decode_step", &decode_step, "One decode step of a Llama, Gemma 2 or Gemma 3 model (see native_step.cpp)");
}
