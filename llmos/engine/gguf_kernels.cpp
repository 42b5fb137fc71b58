// Matrix products over GGUF's own quantized blocks: y (M, N) fp32 = x (M, K) fp32 @ W^T, where W (N, K)
// is given as the file's bytes (N rows of K / block_size blocks, exactly as memory-mapped), for Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K. Built by gguf_kernels.py.
//
// No second rounding: each weight is rebuilt in fp32 with the operations gguf-py's
// `gguf.quants.dequantize` performs, in its order (scale products first, then d * q, then the offset;
// compiled with -ffp-contract=off so no multiply-add is fused), so the kernel multiplies exactly the
// weights the reference dequantization gives. Products with the fp32 activations are summed with
// fused multiply-adds into 16 fp32 lanes per output, then added across lanes in a fixed order: the
// result differs from an fp32 matmul of the dequantized weights only by summation order. Each type
// unpacks a block as runs of 16 weights in a fixed order of its own (element order, or for the
// K-quants whatever the cheapest unpacking gives; `source` names each lane's element) and the
// activations are put in that order once per call; lane j of run c then takes element source(16c + j),
// in block order. Every (row, output) pair sees the same sequence of operations whatever the batch
// size, the tiling or the thread count, so a row computed in a batch gets the bits it gets alone.
//
// Up to 4 rows read the blocks once per tile of 4 outputs and never store the weights (each 16
// weights come from a per-block table of the block's 16 or 32 possible values by one permute, or, for
// Q6_K and Q8_0, by widening the codes and one multiply); more rows dequantize 4 outputs into an L1
// buffer once and run every 4-row tile over it. `dequantize` writes the same fp32 values (or those
// rounded once to bf16, for the dense prefill path) into a caller's buffer.
#include <torch/extension.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <type_traits>
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

#ifdef LLMOS_GGUF_AVX512
// v * *p, *p broadcast inside the multiply (a {1to16} memory operand). Written out because GCC
// otherwise broadcasts the value into a register first with vbroadcastss, which Zen 4 runs on its
// one 512-bit shuffle unit, the unit the permutes of the tables need.
inline __m512 mul_broadcast(__m512 v, const float* p) {
  __m512 r;
  asm("vmulps %2%{1to16%}, %1, %0" : "=v"(r) : "v"(v), "m"(*p));
  return r;
}
inline __m512 iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// 16 bytes widened to 16 x 32-bit lanes.
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// Codes 0-15 in q, the fifth bit of each in `high`: lo[q] or hi[q].
inline __m512 code5(__m512i q, __mmask16 high, __m512 lo, __m512 hi) {
  return _mm512_permutex2var_ps(lo, _mm512_mask_or_epi32(q, high, q, _mm512_set1_epi32(16)), hi);
}
// A Q5 block's two runs of 16: low nibbles with fifth bits 0-15 of qh, high nibbles with bits 16-31.
inline void runs5(__m512i q, uint32_t qh, __m512 lo, __m512 hi, __m512* w) {
  w[0] = code5(_mm512_and_si512(q, _mm512_set1_epi32(15)), static_cast<__mmask16>(qh), lo, hi);
  w[1] = code5(_mm512_srli_epi32(q, 4), static_cast<__mmask16>(qh >> 16), lo, hi);
}
#endif

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
  // A 16-entry table of the block's weights by code, then one permute per 16 weights (the permute
  // reads the low 4 bits of each index: the high nibble needs no mask).
  // d converted a block ahead and broadcast inside the multiply, as Q5_0.
  static constexpr int GROUPS = 1, GC = 2;
  static constexpr bool NATURAL = true;
  struct State {
    float d;
  };
  static inline State prepare(const uint8_t* b) { return {h2f(b)}; }
  template <int g>
  static inline void group(const uint8_t* b, const State& st, __m512* w) {
    const __m512 t = mul_broadcast(_mm512_sub_ps(iota(), _mm512_set1_ps(8.0f)), &st.d);
    const __m512i q = bytes16(b + 2);
    w[0] = _mm512_permutexvar_ps(q, t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
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
  static constexpr int GROUPS = 1, GC = 2;
  static constexpr bool NATURAL = true;
  struct State {};
  static inline State prepare(const uint8_t*) { return {}; }
  template <int g>
  static inline void group(const uint8_t* b, const State&, __m512* w) {
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(h2f(b)), iota()), _mm512_set1_ps(h2f(b + 2)));
    const __m512i q = bytes16(b + 4);
    w[0] = _mm512_permutexvar_ps(q, t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
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
  // One 16-entry table, d * i for the low four bits i (the weights of codes 16-31) by a one-source
  // permute, then 16 d subtracted where the fifth bit is 0: d * i - 16 d is d * (i - 16) exactly (fp16
  // d times integers below 32: no rounding) and, for d != +0, never zero, so even the signs of zeros
  // are gguf-py's. Cheaper than a two-table permute on the fifth bit (Zen 4: one shuffle unit, which
  // the permutes need; the subtraction runs beside). d = +0 (gguf-py: -0 for codes below 16, +0 above)
  // takes d = -0 and the subtraction where the fifth bit is 1 instead (-0 - -0 = +0). The weights of
  // an infinite or NaN d are not gguf-py's (they are no model's). d and the mask are made one block
  // ahead (State), d broadcast inside the multiplies: a vbroadcastss would take the shuffle unit.
  static constexpr int GROUPS = 1, GC = 2;
  static constexpr bool NATURAL = true;
  struct State {
    float d;
    uint32_t sub;  // bit j: subtract 16 d from element j (j < 16: the low nibbles' run; then the high)
  };
  static inline State prepare(const uint8_t* b) {
    const bool zero = b[0] == 0 && b[1] == 0;  // +0
    return {zero ? -0.0f : h2f(b), u32(b + 2) ^ (zero ? 0u : ~0u)};
  }
  template <int g>
  static inline void group(const uint8_t* b, const State& st, __m512* w) {
    const __m512 t = mul_broadcast(iota(), &st.d), d16 = mul_broadcast(_mm512_set1_ps(16.0f), &st.d);
    const __m512i q = bytes16(b + 6);
    // The permute reads the low 4 bits of each index: the high nibble needs no mask.
    w[0] = _mm512_permutexvar_ps(q, t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
    w[0] = _mm512_mask_sub_ps(w[0], static_cast<__mmask16>(st.sub), w[0], d16);
    w[1] = _mm512_mask_sub_ps(w[1], static_cast<__mmask16>(st.sub >> 16), w[1], d16);
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
  static constexpr int GROUPS = 1, GC = 2;
  static constexpr bool NATURAL = true;
  struct State {};
  static inline State prepare(const uint8_t*) { return {}; }
  template <int g>
  static inline void group(const uint8_t* b, const State&, __m512* w) {
    const __m512 d = _mm512_set1_ps(h2f(b)), m = _mm512_set1_ps(h2f(b + 2));
    const __m512 lo = _mm512_add_ps(_mm512_mul_ps(d, iota()), m);
    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(d, _mm512_add_ps(iota(), _mm512_set1_ps(16.0f))), m);
    runs5(bytes16(b + 8), u32(b + 4), lo, hi, w);
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
  // d broadcast in a register, not converted a block ahead (State) as Q4_0 and Q5_0: in Gemma 3's
  // 262,144 x 640 head, read one output at a time, that ran at 11.6 GB/s where this runs at 15.9 (1
  // thread, same run), though it was 10% faster over 2048-wide rows.
  static constexpr int GROUPS = 1, GC = 2;
  static constexpr bool NATURAL = true;
  struct State {};
  static inline State prepare(const uint8_t*) { return {}; }
  template <int g>
  static inline void group(const uint8_t* b, const State&, __m512* w) {
    const __m512 d = _mm512_set1_ps(h2f(b));
    unroll<2>([&](auto c) __attribute__((always_inline)) {
      w[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * c)))), d);
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
  // The 8 (D, M) pairs in vector registers (llama.cpp's unpacking of the 12 scale bytes), then per
  // sub-block a table of its 16 (or 32) weights by code and one permute per 16 weights.
  struct State {
    alignas(64) float f[16];  // D of sub-blocks 0-7, then M
  };
  static inline __attribute__((always_inline)) State prepare(const uint8_t* b) {
    // get_scale_min_k4 on 16-byte vectors: x holds the 12 scale bytes q[0..11] (and 4 bytes after).
    // Scales 0-3 are q[0..3] & 63, mins 0-3 q[4..7] & 63; scales 4-7 q[8..11] & 15 and mins 4-7
    // q[8..11] >> 4, each with the top two bits of q[0..3] (scales) or q[4..7] (mins) as bits 4-5.
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
    const __m128i low = _mm_or_si128(_mm_shuffle_epi8(x, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, -128, -128, -128, -128)),
                                     _mm_shuffle_epi8(_mm_srli_epi16(x, 4), _mm_setr_epi8(-128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, 8, 9, 10, 11)));
    const __m128i top = _mm_shuffle_epi8(_mm_srli_epi16(x, 2), _mm_setr_epi8(-128, -128, -128, -128, 0, 1, 2, 3, -128, -128, -128, -128, 4, 5, 6, 7));
    const __m128i keep = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
    const __m128i v = _mm_or_si128(_mm_and_si128(low, keep), _mm_and_si128(top, _mm_set1_epi8(0x30)));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));  // scales 0-7, mins 0-7
    const __m128 h = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(u32(b))));  // d, dmin
    const __m512 dd = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_castps128_ps512(h));
    State st;
    _mm512_store_ps(st.f, _mm512_mul_ps(dd, f));
    return st;
  }
  // Group p: the 32 bytes of sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles) widened as 16
  // words, lane j holding bytes 2j and 2j + 1: its nibbles 0 and 2 are elements 2j and 2j + 1 of
  // sub-block 2p, nibbles 1 and 3 those of sub-block 2p + 1. Runs 4p .. 4p + 3 are those nibbles
  // (0, 2, 1, 3), each a shift and a permute (which reads the low 4 bits of each lane); `source`
  // says which element each lane of each run is, for the activations.
  static constexpr int GROUPS = 4, GC = 4;
  static constexpr bool NATURAL = false;
  static constexpr int source(int i) {
    const int c = i / 16, lane = i % 16, p = c / 4, q = c % 4;
    return 32 * (2 * p + q / 2) + 2 * lane + q % 2;
  }
  template <int p>
  static inline void group(const uint8_t* b, const State& st, __m512* w) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + QS + 32 * p)));
    [[maybe_unused]] __m512i h;
    if constexpr (FIVE) h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
    unroll<2>([&](auto hc) __attribute__((always_inline)) {
      constexpr int half = hc, s = 2 * p + half;
      const __m512 m = _mm512_set1_ps(st.f[8 + s]);
      const __m512 lo = _mm512_sub_ps(mul_broadcast(iota(), st.f + s), m);
      const __m512i q0 = _mm512_srli_epi32(a, 4 * half), q1 = _mm512_srli_epi32(a, 8 + 4 * half);
      if constexpr (FIVE) {
        // The fifth bit of element 2j (+ 1) of sub-block s: bit s of qh byte 2j (+ 1), in lane j's word.
        const __m512 hi = _mm512_sub_ps(mul_broadcast(_mm512_add_ps(iota(), _mm512_set1_ps(16.0f)), st.f + s), m);
        const __m512i low4 = _mm512_set1_epi32(15);
        const __mmask16 h0 = _mm512_test_epi32_mask(h, _mm512_set1_epi32(1 << s));
        const __mmask16 h1 = _mm512_test_epi32_mask(h, _mm512_set1_epi32(1 << (8 + s)));
        w[2 * half] = code5(_mm512_and_si512(q0, low4), h0, lo, hi);
        w[2 * half + 1] = code5(_mm512_and_si512(q1, low4), h1, lo, hi);
      } else {
        w[2 * half] = _mm512_permutexvar_ps(q0, lo);
        w[2 * half + 1] = _mm512_permutexvar_ps(q1, lo);
      }
    });
  }
  // A group's runs in element order: each sub-block's even and odd elements interleaved.
  static inline void natural(__m512* w) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int s = 0; s < 4; s += 2) {
      const __m512 even = w[s], odd = w[s + 1];
      w[s] = _mm512_permutex2var_ps(even, first, odd);
      w[s + 1] = _mm512_permutex2var_ps(even, second, odd);
    }
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
  // The 256 codes - 32 as int8, unpacked 64 bytes at a time, and the 16 scales; per 16: widen, scale.
  struct State {
    alignas(64) int8_t codes[256];
    alignas(64) float D[16];
  };
  static inline __attribute__((always_inline)) State prepare(const uint8_t* b) {
    State st;
    const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30), bias = _mm512_set1_epi8(32);
    // 16-bit shift counts: the first 32 bytes (codes 0-31 of a quarter) by one, the next 32 by another.
    const __m512i up = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(4), _mm512_set1_epi16(2));
    const __m512i down = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(0), _mm512_set1_epi16(2));
    for (int h = 0; h < 2; ++h) {
      const __m512i l = _mm512_loadu_si512(b + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
      const __m512i hb01 = _mm512_and_si512(_mm512_sllv_epi16(qh, up), two);    // bits 0-1 / 2-3 -> 4-5
      const __m512i hb23 = _mm512_and_si512(_mm512_srlv_epi16(qh, down), two);  // bits 4-5 / 6-7 -> 4-5
      const __m512i q0 = _mm512_or_si512(_mm512_and_si512(l, low4), hb01);
      const __m512i q1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4), hb23);
      _mm512_store_si512(st.codes + 128 * h, _mm512_sub_epi8(q0, bias));
      _mm512_store_si512(st.codes + 128 * h + 64, _mm512_sub_epi8(q1, bias));
    }
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    _mm512_store_ps(st.D, _mm512_mul_ps(_mm512_set1_ps(h2f(b + 208)), sc));
    return st;
  }
  static constexpr int GROUPS = 8, GC = 2;
  static constexpr bool NATURAL = true;
  template <int g>
  static inline void group(const uint8_t*, const State& st, __m512* w) {
    unroll<GC>([&](auto cc) __attribute__((always_inline)) {
      constexpr int c = GC * g + cc;
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(st.codes + 16 * c))));
      w[cc] = mul_broadcast(q, st.D + c);
    });
  }
#endif
};

// ---------------------------------------------------------------------------------------------------

#ifdef LLMOS_GGUF_AVX512
// f(c, w) for each run of 16 weights of the block (c = 0 .. BS / 16 - 1), in the kernels' order or,
// with ELEMENTS, in element order (16c .. 16c + 15).
template <typename T, bool ELEMENTS = false, typename F>
inline __attribute__((always_inline)) void chunks(const uint8_t* b, F&& f) {
  const typename T::State st = T::prepare(b);
  unroll<T::GROUPS>([&](auto g) __attribute__((always_inline)) {
    __m512 w[T::GC];
    T::template group<g>(b, st, w);
    if constexpr (ELEMENTS && !T::NATURAL) T::natural(w);
    unroll<T::GC>([&](auto c) __attribute__((always_inline)) { f(std::integral_constant<int, T::GC * g + c>{}, w[c]); });
  });
}

// How far ahead to prefetch a tile's rows: whole tiles (the same block of a later tile's rows), at
// least 8 KB, which covers DRAM latency at the rate the kernels read.
inline int64_t prefetch_distance(int64_t tile_bytes) { return (8192 + tile_bytes - 1) / tile_bytes * tile_bytes; }

// NT outputs (rows of W from `w`, `row_bytes` apart) x MT rows of x (from `x`, K apart; y's rows `ldy` apart): each pair's 16
// lanes accumulate w * x with one fused multiply-add per 16 weights, in input order.
template <typename T, int NT, int MT>
inline void tile(const uint8_t* w, int64_t row_bytes, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[NT][MT];
  unroll<NT>([&](auto n) __attribute__((always_inline)) {
    unroll<MT>([&](auto m) __attribute__((always_inline)) { acc[n][m] = _mm512_setzero_ps(); });
  });
  const int64_t nb = K / T::BS, ahead = prefetch_distance(NT * row_bytes);
  // The NT outputs' blocks side by side, group by group: each accumulator's multiply-adds stay in
  // order, and the NT x MT chains run interleaved (one output's block alone is a chain of BS / 16
  // dependent multiply-adds, bound by their latency). Each block's State (its scales) is unpacked one
  // block ahead: read back at once from the stores that wrote it, it stalled the tables on them
  // (Q4_K: 40% of the time).
  typename T::State ahead_st[2][NT];
  const auto unpack = [&](int64_t j, typename T::State* st) __attribute__((always_inline)) {
    unroll<NT>([&](auto n) __attribute__((always_inline)) {
      const uint8_t* blk = w + n * row_bytes + j * T::BB;
      // This block of row n some tiles ahead (at least ~8 KB: DRAM latency at this rate). Without it
      // the heavier types (Q6_K, Q5_K) read memory at a quarter of the speed they reach from cache.
      for (int l = 0; l < T::BB; l += 64) __builtin_prefetch(blk + ahead + l);
      st[n] = T::prepare(blk);
    });
  };
  if (nb > 0) unpack(0, ahead_st[0]);
  for (int64_t j = 0; j < nb; ++j) {
    if (j + 1 < nb) unpack(j + 1, ahead_st[(j + 1) & 1]);
    const typename T::State* st = ahead_st[j & 1];
    unroll<T::GROUPS>([&](auto g) __attribute__((always_inline)) {
      __m512 wv[NT][T::GC];
      unroll<NT>([&](auto n) __attribute__((always_inline)) { T::template group<g>(w + n * row_bytes + j * T::BB, st[n], wv[n]); });
      unroll<T::GC>([&](auto c) __attribute__((always_inline)) {
        const int64_t e = j * T::BS + 16 * (T::GC * g + c);
        unroll<MT>([&](auto m) __attribute__((always_inline)) {
          __m512 xv = _mm512_loadu_ps(x + m * K + e);
          asm("" : "+v"(xv));  // loaded once for the NT outputs: GCC would fold a load into each multiply-add
          unroll<NT>([&](auto n) __attribute__((always_inline)) { acc[n][m] = _mm512_fmadd_ps(wv[n][c], xv, acc[n][m]); });
        });
      });
    });
  }
  // Unrolled: an indexed loop here makes GCC keep acc in memory, stored back every iteration above.
  unroll<NT>([&](auto n) __attribute__((always_inline)) {
    unroll<MT>([&](auto m) __attribute__((always_inline)) { y[m * ldy + n] = _mm512_reduce_add_ps(acc[n][m]); });
  });
}

// Several rows: NT outputs' weights dequantized once into `buf` (NT x K fp32, in L1/L2), then every
// tile of up to 4 rows runs over them, each x vector loaded once for NT multiply-adds. The operations
// per (row, output) are those of `tile`: the same lanes, the same order, fused multiply-adds from zero.
template <int NT, int MT>
inline void dense_tile(const float* buf, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[NT][MT];
  unroll<NT>([&](auto n) __attribute__((always_inline)) {
    unroll<MT>([&](auto m) __attribute__((always_inline)) { acc[n][m] = _mm512_setzero_ps(); });
  });
  for (int64_t e = 0; e < K; e += 16) {
    __m512 wv[NT];
    unroll<NT>([&](auto n) __attribute__((always_inline)) { wv[n] = _mm512_load_ps(buf + n * K + e); });
    unroll<MT>([&](auto m) __attribute__((always_inline)) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + e);
      unroll<NT>([&](auto n) __attribute__((always_inline)) { acc[n][m] = _mm512_fmadd_ps(wv[n], xv, acc[n][m]); });
    });
  }
  // Unrolled: an indexed loop here makes GCC keep acc in memory, stored back every iteration above.
  unroll<NT>([&](auto n) __attribute__((always_inline)) {
    unroll<MT>([&](auto m) __attribute__((always_inline)) { y[m * ldy + n] = _mm512_reduce_add_ps(acc[n][m]); });
  });
}

template <typename T, int NT>
inline void buffered(const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y, int64_t ldy, float* buf) {
  const int64_t ahead = prefetch_distance(NT * row_bytes);
  for (int64_t j = 0; j < K / T::BS; ++j)
    unroll<NT>([&](auto n) __attribute__((always_inline)) {
      const uint8_t* blk = w + n * row_bytes + j * T::BB;
      for (int l = 0; l < T::BB; l += 64) __builtin_prefetch(blk + ahead + l);
      float* o = buf + n * K + j * T::BS;
      chunks<T>(blk, [&](auto c, __m512 wv) __attribute__((always_inline)) { _mm512_store_ps(o + 16 * c, wv); });
    });
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dense_tile<NT, 4>(buf, x + m * K, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: dense_tile<NT, 3>(buf, x + m * K, K, y + m * ldy, ldy); break;
    case 2: dense_tile<NT, 2>(buf, x + m * K, K, y + m * ldy, ldy); break;
    case 1: dense_tile<NT, 1>(buf, x + m * K, K, y + m * ldy, ldy); break;
  }
}

// One to four rows: straight from the blocks, nothing stored.
template <typename T, int NT>
inline void direct(const uint8_t* w, int64_t row_bytes, const float* x, int64_t M, int64_t K, float* y, int64_t ldy) {
  switch (M) {
    case 4: tile<T, NT, 4>(w, row_bytes, x, K, y, ldy); break;
    case 3: tile<T, NT, 3>(w, row_bytes, x, K, y, ldy); break;
    case 2: tile<T, NT, 2>(w, row_bytes, x, K, y, ldy); break;
    case 1: tile<T, NT, 1>(w, row_bytes, x, K, y, ldy); break;
  }
}

// The activations (M, K) in the order the kernels unpack each block's weights (T::source), for the
// types that do not unpack them in element order: once per call, shared by every output.
template <typename T>
std::unique_ptr<float, decltype(&std::free)> kernel_order(const float* x, int64_t M, int64_t K) {
  static constexpr auto src = [] {
    std::array<int16_t, T::BS> a{};
    for (int i = 0; i < T::BS; ++i) a[i] = static_cast<int16_t>(T::source(i));
    return a;
  }();
  float* xp = static_cast<float*>(std::aligned_alloc(64, M * K * sizeof(float)));  // K: whole blocks of 256
  TORCH_CHECK(xp, "gguf_kernels: out of memory");
  for (int64_t r = 0; r < M * K; r += T::BS)
    for (int i = 0; i < T::BS; ++i) xp[r + i] = x[r + src[i]];
  return {xp, &std::free};
}
#endif

// y's rows are `ldy` apart (N for a whole product; the full width when a part of a layer writes its
// columns into the layer's output).
template <typename T>
void matmul_type(const uint8_t* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t ldy) {
  const int64_t row_bytes = K / T::BS * T::BB;
#ifdef LLMOS_GGUF_AVX512
  std::unique_ptr<float, decltype(&std::free)> reordered(nullptr, &std::free);
  if constexpr (!T::NATURAL) {
    reordered = kernel_order<T>(x, M, K);
    x = reordered.get();
  }
  // Four outputs at a time: independent chains of multiply-adds while the next blocks are unpacked.
  constexpr int64_t NT = 4;
  at::parallel_for(0, (N + NT - 1) / NT, 16, [&](int64_t t0, int64_t t1) {
    float* buf = M > 4 ? static_cast<float*>(std::aligned_alloc(64, NT * K * sizeof(float))) : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * NT;
      if (n + NT > N) {
        for (int64_t r = n; r < N; ++r) {
          if (buf) buffered<T, 1>(w + r * row_bytes, row_bytes, x, M, K, y + r, ldy, buf);
          else direct<T, 1>(w + r * row_bytes, row_bytes, x, M, K, y + r, ldy);
        }
      } else if (buf) {
        buffered<T, NT>(w + n * row_bytes, row_bytes, x, M, K, y + n, ldy, buf);
      } else if (std::is_same_v<T, Q8_0> && K <= 1024) {
        // Q8_0 in short rows (Gemma 3's 262,144 x 640 head) one output at a time: Q8_0 is bound by
        // reading (the cheapest unpacking per byte), and one sequential stream read it from memory
        // at 12 GB/s where the tile of 4 got 5.7 (1 thread, same run). The 4-bit types there are
        // bound by arithmetic and lose from the shorter chains (Q4_0 4.9 vs 6.9), as every type
        // does with 2048-wide rows.
        for (int64_t r = n; r < n + NT; ++r) direct<T, 1>(w + r * row_bytes, row_bytes, x, M, K, y + r, ldy);
      } else {
        direct<T, NT>(w + n * row_bytes, row_bytes, x, M, K, y + n, ldy);
      }
    }
    std::free(buf);
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
        y[m * ldy + n] = s;
      }
  });
#endif
}

#ifdef LLMOS_GGUF_AVX512
inline void store16(float* o, __m512 w) { _mm512_storeu_ps(o, w); }
#if defined(__AVX512BF16__)
inline void store16(c10::BFloat16* o, __m512 w) {  // rounded to nearest even, as c10::BFloat16(float)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), (__m256i)_mm512_cvtneps_pbh(w));
}
#else
inline void store16(c10::BFloat16* o, __m512 w) {
  alignas(64) float v[16];
  _mm512_store_ps(v, w);
  for (int i = 0; i < 16; ++i) o[i] = static_cast<c10::BFloat16>(v[i]);
}
#endif
#endif

template <typename T, typename Out>
void dequantize_type(const uint8_t* w, Out* out, int64_t N, int64_t K) {
  const int64_t nb = K / T::BS, total = N * nb;
  at::parallel_for(0, total, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Out* o = out + b * T::BS;
#ifdef LLMOS_GGUF_AVX512
      chunks<T, true>(w + b * T::BB, [&](auto c, __m512 v) __attribute__((always_inline)) { store16(o + 16 * c, v); });
#else
      float v[T::BS];
      T::values(w + b * T::BB, v);
      for (int e = 0; e < T::BS; ++e) o[e] = static_cast<Out>(v[e]);
#endif
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
    if (M > 0 && N > 0) matmul_type<T>(raw.data_ptr<uint8_t>(), a.data_ptr<float>(), out.data_ptr<float>(), M, N, K, N);
  });
  return out;
}

// The decode step's entry (native_step.cpp calls it through `matmul_capsule`, with no Python between):
// y (M rows `ldy` apart, columns 0..N-1) = x (M, K) contiguous fp32 @ W^T, W (N, K) the blocks at `w` of
// GGML type `qtype`, which the caller has checked (GGUFLinear: a supported type, whole blocks, contiguous).
void matmul_into(const uint8_t* w, int64_t qtype, const float* x, int64_t M, int64_t K, float* y, int64_t N, int64_t ldy) {
  dispatch(qtype, [&](auto t) {
    using T = decltype(t);
    if (M > 0 && N > 0) matmul_type<T>(w, x, y, M, N, K, ldy);
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "y = x @ W^T over GGUF blocks");
  m.def("dequantize", &dequantize, "GGUF blocks -> fp32 / bf16 weights");
  m.def("matmul_capsule", [] { return py::capsule(reinterpret_cast<void*>(&matmul_into), "llmos_gguf_matmul_into"); },
        "matmul_into's address, for the decode step (native_step.cpp)");
}
