// Integer-weight matrix products for decoding on CPUs: y (M, N) = x (M, K) @ W.T, where W is
// stored as int8 or packed int4 codes with fp32 scales (and zeros) per row or per group of inputs
// (lmforge/quant/integer.py describes the format; lmforge/quant/kernels.py builds and calls this),
// or as 16-bit floats (lmforge/quant/weight_only.py: fp16 or bf16, widened the same way).
//
// Decoding one token multiplies one activation row by every weight: the step is bound by the
// bytes it reads, so 1-byte or half-byte weights are read as they are and widened in registers:
//
//   for each output n, each group g of inputs:
//       acc = sum over k in g of (code[n, k] - zero[n, g]) * x[k]      (integers made fp32, FMA)
//       y[n] += scale[n, g] * acc
//
// The subtraction of the zero point happens in 32-bit integers, so every product equals the
// reference's (code - zero) * x exactly; only the order of the fp32 sums differs from
// dequantize-then-matmul. int4 codes share a byte, the even input in the low half: the kernel
// splits x into its even and odd inputs once per call, so the low halves of 8 bytes multiply 8
// even inputs and the high halves the 8 odd ones, with no shuffling of the weights.
//
// Up to 8 activation rows (int4: 4) are done in one pass over the weights (each widened weight
// vector serves every row). One body, written once over a small vector interface, is compiled
// three times: for AVX-512, for AVX2 + FMA and for the compiler's baseline, and the CPU picks
// at run time, so a build works on any x86-64 machine it runs on (and on other CPUs, scalar).
//
// Further down, kernels for one instruction set each, called only where the CPU has it: W8A8 / W4A8 over
// codes interleaved for AVX-512 VNNI (int_linear_a8_interleaved), and bf16 activations times bf16 weights
// in pairs for AVX-512 BF16 (bf16_linear: bf16 models' products, model/packed.py), fp32 activations times fp32
// weights in blocks of 16 rows for AVX-512 and AVX2 (f32_linear: fp32 models' products), and, on AVX-512, the
// attention of a decode step's few new tokens over their cached keys in bf16 or fp32 (grouped_attention).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LMF_X86 1
#endif

namespace {

// How the weights are stored: int8 codes (signed: symmetric; unsigned: with a zero point), int4
// codes two to a byte, or 16-bit floats (fp16, bf16: no scale or zero, the weight itself).
enum class Codes { s8, u8, u4, f16, bf16 };

// What one call needs: pointers, shapes, the code format. zero_fixed is the zero every group
// shares (int4 symmetric: the packing offset 8; int8 symmetric: 0); zeros, when present, are
// per group and added to it. 16-bit weights have one group and a scale of 1.
struct Problem {
  const float* x;        // (M, K), or for int4 (M, K) split: even inputs then odd inputs per row
  const uint8_t* codes;  // (N, K) bytes for int8, (N, K / 2) for int4, (N, 2K) for 16-bit weights
  const float* scale;    // (scale_rows, G)
  const float* zero;     // (scale_rows, G) or nullptr
  float* y;              // (M, N)
  int64_t M, N, K, G;
  int64_t scale_rows;    // N (per channel or group) or 1 (per tensor)
  Codes codes_kind;
  int zero_fixed;
};

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// One weight as fp32 minus the zero z (the loops' scalar tails).
template <Codes C>
inline float weight_at(const uint8_t* row, int64_t k, int z) {
  if constexpr (C == Codes::f16) return c10::detail::fp16_ieee_to_fp32_value(reinterpret_cast<const uint16_t*>(row)[k]);
  else if constexpr (C == Codes::bf16) return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
  else if constexpr (C == Codes::s8) return static_cast<float>(static_cast<int>(static_cast<int8_t>(row[k])) - z);
  else return static_cast<float>(static_cast<int>(row[k]) - z);
}

template <class P>  // Problem or ProblemA8
inline int group_zero(const P& p, int64_t row, int64_t g) {
  return p.zero_fixed + (p.zero ? static_cast<int>(p.zero[row * p.G + g]) : 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The body, once per instruction set. Each include defines namespace LMF_NS with the vector
// primitives (V: fp32 lanes; widen8/widen4 make integer codes fp32 minus the zero) and then
// `run(Problem)`.
// ---------------------------------------------------------------------------------------------

#ifdef LMF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace avx512 {
using V = __m512;
constexpr int W = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vscale(V a, float s, V acc) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), acc); }
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
// W int8 codes at p, minus z, as fp32 (signed codes are symmetric: z is 0).
inline V widen8(const uint8_t* p, bool is_signed, int z) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (is_signed) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));  // symmetric: no zero point
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(z)));
}
// W bytes at p hold 2W int4 codes: lo = the even inputs' codes, hi = the odd inputs', minus z.
inline void widen4(const uint8_t* p, int z, V& lo, V& hi) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m512i zv = _mm512_set1_epi32(z);
  lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)), zv));
  hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), zv));
}
// W 16-bit floats at p as fp32 (bf16: its bits are the top half of an fp32's).
inline V widen_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#include "int_linear_body.h"

// The end of a tile of the blocked products (bf16_linear, f32_linear): block j's bias (outputs n0 = (b + j) * 16
// onwards, those below N) added to each row's 16 sums acc[r][j], and `store(r, n0, live outputs, sums)` writes them.
template <int R, int BLK, class Store>
inline void finish_tile(const V (&acc)[R][BLK], const float* bias, int64_t N, int64_t b, Store store) {
  for (int j = 0; j < BLK; ++j) {
    const int64_t n0 = (b + j) * 16;
    const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - n0)) - 1);
    const V add = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) store(r, n0, live, _mm512_add_ps(acc[r][j], add));
  }
}
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using V = __m256;
constexpr int W = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vscale(V a, float s, V acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc); }
inline float vsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V widen8(const uint8_t* p, bool is_signed, int z) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (is_signed) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));  // symmetric: no zero point
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(z)));
}
inline void widen4(const uint8_t* p, int z, V& lo, V& hi) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m256i zv = _mm256_set1_epi32(z);
  lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)), zv));
  hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), zv));
}
inline V widen_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline V widen_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#include "int_linear_body.h"
}  // namespace avx2
#pragma GCC pop_options
#endif  // LMF_X86

// The baseline: one "lane", plain C++ (the compiler vectorizes what it can for its default target).
namespace scalar {
using V = float;
constexpr int W = 1;
inline V vzero() { return 0.0f; }
inline V vload(const float* p) { return *p; }
inline V vadd(V a, V b) { return a + b; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vscale(V a, float s, V acc) { return a * s + acc; }
inline float vsum(V a) { return a; }
inline V widen8(const uint8_t* p, bool is_signed, int z) {
  int code = is_signed ? static_cast<int>(static_cast<int8_t>(*p)) : static_cast<int>(*p);
  return static_cast<float>(code - z);
}
inline void widen4(const uint8_t* p, int z, V& lo, V& hi) {
  lo = static_cast<float>((*p & 0x0F) - z);
  hi = static_cast<float>((*p >> 4) - z);
}
inline V widen_f16(const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
inline V widen_bf16(const uint16_t* p) { return bf16_to_float(*p); }
#include "int_linear_body.h"
}  // namespace scalar

namespace {

std::string best_isa() {
#ifdef LMF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return "avx2";
#endif
  return "scalar";
}

// The instruction set calls run on: the best the CPU has, unless `set_isa` chose a lower one
// (tests compare the paths this way).
std::string& current_isa() {
  static std::string isa = best_isa();
  return isa;
}

void run_isa(const Problem& p) {
  const std::string& isa = current_isa();
#ifdef LMF_X86
  if (isa == "avx512") return avx512::run(p);
  if (isa == "avx2") return avx2::run(p);
#endif
  scalar::run(p);
}

// ---------------------------------------------------------------------------------------------
// Integer activations (W8A8, and W4A8 for int4 weights): each activation row is rounded onto
// [-127, 127], every 32 inputs by their own scale (their absmax / 127, as llama.cpp's q8_0 does),
// or all of a row's by one (its absmax / 127, or a calibrated scale). Each weight group's products
// are summed exactly in 32-bit integers, 32 inputs at a time, and the scales applied to those sums:
//   y[m, n] = sum over g of s[n, g] * sum over a of sa[m, a] * sum over k in g and a of (q[n, k] - z[n, g]) * xq[m, k]
// (a: the activation groups of 32 inputs). AVX2 multiplies 32 pairs of bytes per instruction
// (maddubs: unsigned times signed bytes, so |x| times w with x's sign moved onto w; 127 * 127 * 2
// fits its 16-bit sums). Weights must be signed bytes: symmetric int8 codes, or int4 codes minus
// their zero (within [-15, 15]).
// ---------------------------------------------------------------------------------------------

constexpr int64_t AG = 32;  // inputs an activation scale covers (one scale a row: every group has it)

struct ProblemA8 {
  const int8_t* xq;      // (M, K) rounded activations; int4: each row's even inputs, then its odd ones
  const float* sa;       // (M, KA) each activation group's scale, KA = ceil(K / 32)
  const float* xsum;     // (M, G) sum over each weight group of sa * xq (zero points; VNNI int8: the shift
                         // by 128), where groups are a multiple of 32 inputs, else nullptr
  const int32_t* xbias;  // (M, K / 8) int4 with VNNI: -zero_fixed times the sum of each 4 even inputs and
                         // the 4 odd inputs beside them (one VNNI lane's activations), or nullptr
  const int32_t* lane_group;  // (K / 8) int4 with VNNI: the group of each lane's inputs, or nullptr
  const uint8_t* codes;  // (N, K) int8, or (N, K / 2) packed int4
  const float* scale;    // (scale_rows, G)
  const float* zero;     // (scale_rows, G) or nullptr (int4 only)
  float* y;              // (M, N)
  int64_t M, N, K, G, KA, scale_rows;
  int bits, zero_fixed;
};

// Every output, one at a time: Row(p, n, m) for weight row n and activation row m.
template <float (*Row)(const ProblemA8&, int64_t, int64_t)>
void run_a8(const ProblemA8& p) {
  at::parallel_for(0, p.N, std::max<int64_t>(16, p.N / (8 * at::get_num_threads())), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + n] = Row(p, n, m);
  });
}

// One output: weight row n against activation row m, in plain C++ (any group size: an integer sum is
// closed, scaled and added wherever its weight group or its activation group ends).
inline float row_a8_scalar(const ProblemA8& p, int64_t n, int64_t m) {
  const int64_t gs = p.K / p.G, srow = p.scale_rows == 1 ? 0 : n;
  const int8_t* xq = p.xq + m * p.K;
  const float* sa = p.sa + m * p.KA;
  float total = 0.0f;
  for (int64_t g = 0; g < p.G; ++g) {
    float group = 0.0f;
    int32_t sum = 0;
    if (p.bits == 8) {
      const int8_t* w = reinterpret_cast<const int8_t*>(p.codes) + n * p.K;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        if (k > g * gs && k % AG == 0) group += sa[k / AG - 1] * static_cast<float>(sum), sum = 0;
        sum += static_cast<int32_t>(w[k]) * xq[k];
      }
      group += sa[((g + 1) * gs - 1) / AG] * static_cast<float>(sum);
    } else {  // byte j holds inputs 2j and 2j + 1: activation group 2j / 32
      const int z = group_zero(p, srow, g);
      const uint8_t* w = p.codes + n * (p.K / 2);
      for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {
        if (j > g * gs / 2 && j % (AG / 2) == 0) group += sa[j / (AG / 2) - 1] * static_cast<float>(sum), sum = 0;
        sum += ((w[j] & 0x0F) - z) * xq[j] + ((w[j] >> 4) - z) * xq[p.K / 2 + j];
      }
      group += sa[((g + 1) * gs / 2 - 1) / (AG / 2)] * static_cast<float>(sum);
    }
    total += p.scale[srow * p.G + g] * group;
  }
  return total;
}

#ifdef LMF_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// R weight rows (n0 ..) against activation row m, into out[0 .. R), groups a multiple of 32: each 32
// activations loaded (int4: paired even with odd; int8: split into magnitude and sign) once for the R rows.
// Each 32 inputs' integer sum is made fp32 and multiplied by their activation scale, each weight group's
// by its scale. The fp32 sums run in one order whatever R is (even and odd groups in two chains), so a
// row's bits do not depend on R. A decode step takes 4 rows at a time. Against the previous one-row code
// (a function a group, 2 threads, an AVX-512 machine told to use this path), one 576 x 3,072 product:
// int8 400-420 -> 33-44 us, int4 420-535 -> 60-142 us (one scale a row then).
template <int R>
inline void tile_a8_avx2(const ProblemA8& p, int64_t n0, int64_t m, float* out) {
  const int64_t gs = p.K / p.G, half = p.K / 2, width = p.bits == 8 ? p.K : half;  // a weight row's bytes
  int64_t srow[R];
  const uint8_t* w[R];
  __m256 total[R][2];  // even and odd groups: small groups do not wait on one FMA chain
  float shift[R];      // the zero points' share: sum over groups of s * z * xsum
  for (int r = 0; r < R; ++r) {
    srow[r] = p.scale_rows == 1 ? 0 : n0 + r;
    w[r] = p.codes + (n0 + r) * width;
    total[r][0] = total[r][1] = _mm256_setzero_ps();
    shift[r] = 0.0f;
  }
  const int8_t* xq = p.xq + m * p.K;
  const float* sa = p.sa + m * p.KA;
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < p.G; ++g) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    if (p.bits == 8) {  // |x| times w carrying x's sign: maddubs takes unsigned times signed bytes
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k)), size = _mm256_abs_epi8(x);
        const __m256 a = _mm256_set1_ps(sa[k / AG]);
        for (int r = 0; r < R; ++r) {
          const __m256i signed_w = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), x);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(size, signed_w), ones)),
                                   a, acc[r]);
        }
      }
    } else {
      for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; j += 16) {
        const __m256i x = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + half + j)),
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + j)));
        const __m256 a = _mm256_set1_ps(sa[j / (AG / 2)]);
        for (int r = 0; r < R; ++r) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + j));
          const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones)),
                                   a, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = p.scale[srow[r] * p.G + g];
      if (p.bits == 4)  // the zero point off once a group (int8 codes are symmetric)
        shift[r] += s * static_cast<float>(group_zero(p, srow[r], g)) * p.xsum[m * p.G + g];
      total[r][g % 2] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(s), total[r][g % 2]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = avx2::vsum(_mm256_add_ps(total[r][0], total[r][1])) - shift[r];
}

// One output: the tile at one weight row (groups not a multiple of 32: plain C++).
inline float row_a8_avx2(const ProblemA8& p, int64_t n, int64_t m) {
  if ((p.K / p.G) % 32) return row_a8_scalar(p, n, m);
  float out;
  tile_a8_avx2<1>(p, n, m, &out);
  return out;
}

// Four weight rows at a time, against each activation row in turn (the 4 rows' codes stay in L1 for them).
void run_a8_avx2(const ProblemA8& p) {
  if ((p.K / p.G) % 32) return run_a8<row_a8_avx2>(p);
  constexpr int B = 4;
  const int64_t blocks = p.N / B;
  at::parallel_for(0, blocks, std::max<int64_t>(4, blocks / (8 * at::get_num_threads())), [&](int64_t begin, int64_t end) {
    float out[B];
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m = 0; m < p.M; ++m) {
        tile_a8_avx2<B>(p, b * B, m, out);
        for (int r = 0; r < B; ++r) p.y[m * p.N + b * B + r] = out[r];
      }
  });
  for (int64_t n = blocks * B; n < p.N; ++n)
    for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + n] = row_a8_avx2(p, n, m);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")
// int8 weights times int8 activations with AVX-512 VNNI: one vpdpbusd multiplies 64 unsigned bytes by
// 64 signed bytes and adds each four products into an int32 lane, with no 16-bit step between (AVX2
// takes abs, sign, maddubs, madd and add for 32). Unsigned bytes: the weights are read shifted by 128
// (w ^ 0x80 = w + 128, 1 to 255), so a group's sum is sum((w + 128) * x) - 128 * sum(x), and sum(x) (each
// activation times its scale: xsum) is made once a call. A 64-byte step's lanes hold two activation
// groups, 8 lanes each: made fp32, each multiplied by its group's scale (the two spread over the lanes)
// and added up; the weight group's scale multiplies the total once.
// R weight rows (n0 ..) against T activation rows (m0 ..), into out[r * T + t]: each 64 bytes of activations
// loaded once for the R weight rows, each 64 bytes of codes loaded and shifted once for the T activation rows
// (a decode step: 4 weight rows at a time; a prompt's pass, a speculative check, the engine's rows: 4
// activation rows). Each output's sums run in the same order whatever R and T are.
template <int R, int T>
inline void tile_a8_vnni(const ProblemA8& p, int64_t n0, int64_t m0, float* out) {
  const int64_t gs = p.K / p.G;
  const float* s[R];
  const int8_t* w[R];
  for (int r = 0; r < R; ++r) {
    s[r] = p.scale + (p.scale_rows == 1 ? 0 : n0 + r) * p.G;
    w[r] = reinterpret_cast<const int8_t*>(p.codes) + (n0 + r) * p.K;
  }
  const int8_t* x[T];
  const float* sa[T];
  for (int t = 0; t < T; ++t) {
    x[t] = p.xq + (m0 + t) * p.K;
    sa[t] = p.sa + (m0 + t) * p.KA;
  }
  for (int i = 0; i < R * T; ++i) out[i] = 0.0f;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  const __m512i pattern = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const auto scales = [&](int t, int64_t k) {  // the activation scales of inputs k .. k + 63, one a lane
    return _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(
        _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sa[t] + k / AG)))));
  };
  // One 64-byte step at k into the chain acc: each row's codes shifted once, each activation row loaded once.
  const auto step = [&](int64_t k, __m512 (&acc)[R][T]) {
    __m512i xs[T];
    __m512 a[T];
    for (int t = 0; t < T; ++t) xs[t] = _mm512_loadu_si512(x[t] + k), a[t] = scales(t, k);
    for (int r = 0; r < R; ++r) {
      const __m512i wide = _mm512_xor_si512(_mm512_loadu_si512(w[r] + k), flip);
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wide, xs[t])), a[t], acc[r][t]);
    }
  };
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc0[R][T], acc1[R][T];  // two chains an output
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc0[r][t] = acc1[r][t] = _mm512_setzero_ps();
    int64_t k = g * gs;
    for (; k + 128 <= (g + 1) * gs; k += 128) step(k, acc0), step(k + 64, acc1);
    if (k + 64 <= (g + 1) * gs) step(k, acc0), k += 64;
    if (k < (g + 1) * gs) {  // 32 bytes left (1,376 inputs: 21.5 steps): one activation group in 8 lanes
      for (int r = 0; r < R; ++r) {
        const __m256i wide = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)),
                                              _mm512_castsi512_si256(flip));
        for (int t = 0; t < T; ++t) {
          const __m256i sum = _mm256_dpbusd_epi32(
              _mm256_setzero_si256(), wide, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + k)));
          acc1[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_zextsi256_si512(sum)), _mm512_set1_ps(sa[t][k / AG]),
                                       acc1[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        out[r * T + t] += s[r][g] * (_mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t])) -
                                     128.0f * p.xsum[(m0 + t) * p.G + g]);
  }
}

inline float row_a8_vnni(const ProblemA8& p, int64_t n, int64_t m) {
  if (p.bits != 8 || (p.K / p.G) % 32) return row_a8_avx2(p, n, m);
  float out;
  tile_a8_vnni<1, 1>(p, n, m, &out);
  return out;
}

// Every activation row against every weight row in tiles, Tile::run<R, T>(p, n0, m0, out) doing R weight
// rows against T activation rows into out[r * T + t]: one activation row (a decode step) four weight rows
// at a time, more activation rows four at a time against one weight row.
template <class Tile>
void run_tiles(const ProblemA8& p) {
  constexpr int B = 4;  // weight rows a block
  const int64_t blocks = (p.N + B - 1) / B;
  at::parallel_for(0, blocks, std::max<int64_t>(4, blocks / (8 * at::get_num_threads())), [&](int64_t begin, int64_t end) {
    float out[4];  // a tile's outputs: 4 weight rows x 1 activation row, or 1 x up to 4
    for (int64_t n0 = begin * B; n0 < std::min(end * B, p.N); n0 += B) {
      const int64_t rows = std::min<int64_t>(B, p.N - n0);
      if (p.M == 1 && rows == B) {
        Tile::template run<B, 1>(p, n0, 0, p.y + n0);
        continue;
      }
      for (int64_t n = n0; n < n0 + rows; ++n) {
        int64_t m = 0;
        const auto put = [&](int count) {
          for (int t = 0; t < count; ++t) p.y[(m + t) * p.N + n] = out[t];
          m += count;
        };
        while (m + 4 <= p.M) Tile::template run<1, 4>(p, n, m, out), put(4);
        switch (p.M - m) {
          case 3: Tile::template run<1, 3>(p, n, m, out), put(3); break;
          case 2: Tile::template run<1, 2>(p, n, m, out), put(2); break;
          case 1: Tile::template run<1, 1>(p, n, m, out), put(1); break;
          default: break;
        }
      }
    }
  });
}

struct A8Tile {
  template <int R, int T>
  static void run(const ProblemA8& p, int64_t n0, int64_t m0, float* out) { tile_a8_vnni<R, T>(p, n0, m0, out); }
};

void run_a8_vnni(const ProblemA8& p) {
  if ((p.K / p.G) % 32) return run_a8<row_a8_vnni>(p);
  run_tiles<A8Tile>(p);
}

// int4 codes times int8 activations with AVX-512 VNNI. The codes (0 to 15) are the unsigned operand
// just as they are, the activations the signed one, so nothing is shifted. 64 bytes of a row hold the
// codes of 64 even and 64 odd inputs: their low halves against the 64 even activations and their high
// halves against the 64 odd ones, two vpdpbusd, sum each lane's 8 products (4 even, 4 odd inputs, of one
// group: groups are whole multiples of 32 inputs) into 16 int32 lanes. The lanes start from the fixed
// zero point's share (xbias: -z times their activations' sum, made once a call), so what they hold is
// sum((code - z) * x) exactly. Then each lane is made fp32 and multiplied by its weight group's scale (up
// to 4 groups in one step at group size 32: the scales are picked by a lane-to-group table made once a
// call) times its activation group's (a step's 128 inputs are 4 activation groups, 4 lanes each) and
// added up. A row's last step loads only the bytes it has (masked). Per-group zero points (asymmetric
// codes) come off at the end: z times the group's scaled activation sum.

// R weight rows (n0 ..) against T activation rows (m0 ..), into out[r * T + t]: in each 64-byte step a
// row's codes are loaded and split into their halves once for the T activation rows, and an activation
// row's inputs loaded once for the R weight rows (a decode step: 4 weight rows, 1.5x fewer cycles a row
// than one at a time; a prompt's pass, a speculative check, the engine's rows: 4 activation rows). Each
// output's sums run in the same order whatever R and T are, so it does not depend on its neighbours.
// GS: the group size when it is 32 or 64 (a step's lanes then take 4 or 2 groups, always whole ones, in
// a fixed pattern), 0 for any other multiple of 32 (the lane-to-group table picks the scales).
template <int GS, int R, int T>
inline void tile_a4_vnni(const ProblemA8& p, int64_t n0, int64_t m0, float* out) {
  const int64_t half = p.K / 2;
  const uint8_t* w[R];
  int64_t srow[R];  // each weight row's row of scales (and zeros): its own, or the one shared by all
  const float* s[R];
  for (int r = 0; r < R; ++r) {
    w[r] = p.codes + (n0 + r) * half;
    srow[r] = p.scale_rows == 1 ? 0 : n0 + r;
    s[r] = p.scale + srow[r] * p.G;
  }
  const int8_t* xe[T];  // each activation row's even inputs; its odd ones from K / 2 on
  const int32_t* bias[T];
  const float* sa[T];
  for (int t = 0; t < T; ++t) {
    xe[t] = p.xq + (m0 + t) * p.K;
    bias[t] = p.xbias + (m0 + t) * (p.K / 8);
    sa[t] = p.sa + (m0 + t) * p.KA;
  }
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i fours = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  // One step from j, the first even (and odd) input: bytes and lanes say how much of it there is (a row's
  // last step may be short); scales(r, a4, a) gives each lane's scale in weight row r: its weight group's
  // times its activation group's (the step's 4 activation scales a4, or a, spread over the lanes).
  const auto step = [&](int64_t j, __mmask64 bytes, __mmask16 lanes, const auto& scales) {
    __m512i xa[T], xb[T], start[T];
    __m128 a4[T];  // the step's 4 activation scales: 16 bytes of even (and odd) inputs an activation group
    __m512 a[T];
    const __mmask8 groups = static_cast<__mmask8>((1U << ((__builtin_popcount(lanes) + 3) / 4)) - 1);
    for (int t = 0; t < T; ++t) {
      xa[t] = _mm512_maskz_loadu_epi8(bytes, xe[t] + j);
      xb[t] = _mm512_maskz_loadu_epi8(bytes, xe[t] + half + j);
      start[t] = _mm512_maskz_loadu_epi32(lanes, bias[t] + j / 4);
      a4[t] = _mm_maskz_loadu_ps(groups, sa[t] + j / 16);
      a[t] = _mm512_permutexvar_ps(fours, _mm512_castps128_ps512(a4[t]));
    }
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_maskz_loadu_epi8(bytes, w[r] + j);
      const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      for (int t = 0; t < T; ++t) {
        const __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start[t], lo, xa[t]), hi, xb[t]);
        total[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scales(r, a4[t], a[t]), total[r][t]);
      }
    }
  };
  int64_t j = 0;
  if constexpr (GS == 32 || GS == 64) {
    const __m512i pattern = GS == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                     : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const auto spread = [&](__m128 scales) { return _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(scales)); };
    // at group size 32 a lane's weight and activation groups line up: 4 products, then spread
    const auto both = [&](__m128 weights, __m128 a4, __m512 a) {
      return GS == 32 ? spread(_mm_mul_ps(weights, a4)) : _mm512_mul_ps(spread(weights), a);
    };
    for (; j + 64 <= half; j += 64)  // whole steps (constant masks: plain loads): 4 (2) groups, scales side by side
      step(j, ~0ULL, 0xFFFF, [&](int r, __m128 a4, __m512 a) {
        return both(GS == 32 ? _mm_loadu_ps(s[r] + j / 16)
                             : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s[r] + j / 32))), a4, a);
      });
    if (j < half) {  // a short last step (576 inputs: 4.5 steps), its missing lanes and scales zero
      const int64_t left = half - j;  // bytes: a multiple of 16 (of 32 at group size 64)
      const __mmask8 there = static_cast<__mmask8>((1U << (2 * left / GS)) - 1);
      step(j, (1ULL << left) - 1, static_cast<__mmask16>((1U << (left / 4)) - 1),
           [&](int r, __m128 a4, __m512 a) { return both(_mm_maskz_loadu_ps(there, s[r] + 2 * j / GS), a4, a); });
      j = half;
    }
  }
  for (; j < half; j += 64) {  // any other group size (a multiple of 32), the last step short or not
    const int64_t left = std::min<int64_t>(64, half - j);  // a multiple of 16
    const __mmask16 lanes = static_cast<__mmask16>((1U << (left / 4)) - 1);
    const int32_t first = p.lane_group[j / 4];  // the step's lanes take groups first, first + 1, ...
    const __m512i pick = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(lanes, p.lane_group + j / 4),
                                          _mm512_set1_epi32(first));
    const __mmask16 there = static_cast<__mmask16>((1U << std::min<int64_t>(16, p.G - first)) - 1);
    step(j, left == 64 ? ~0ULL : (1ULL << left) - 1, lanes,
         [&](int r, __m128, __m512 a) {
           return _mm512_mul_ps(_mm512_permutexvar_ps(pick, _mm512_maskz_loadu_ps(there, s[r] + first)), a);
         });
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float shift = 0.0f;  // zero points per group (asymmetric codes) on top of the fixed one
      for (int64_t h = 0; p.zero && h < p.G; ++h)
        shift += s[r][h] * p.zero[srow[r] * p.G + h] * p.xsum[(m0 + t) * p.G + h];
      out[r * T + t] = _mm512_reduce_add_ps(total[r][t]) - shift;
    }
}

template <int GS>
struct A4Tile {
  template <int R, int T>
  static void run(const ProblemA8& p, int64_t n0, int64_t m0, float* out) { tile_a4_vnni<GS, R, T>(p, n0, m0, out); }
};
#pragma GCC pop_options


// How a row's activations are scaled: every 32 inputs by their absmax / 127, the whole row by its
// absmax / 127, or by a fixed (calibrated) scale.
enum class ActScale { group, row, fixed };

// Each row of x (M, K) onto [-127, 127] (its scales into sa (M, KA)), 16 inputs at a time: the same division
// and rounding (half to even) as the plain loop in int_linear_a8, so the same integers. With `split` (int4
// weights) the even inputs go to the first half of the row and the odd ones to the second, as the packed
// codes meet them. K: a multiple of 32.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
void round_rows_avx512(const float* xs, int64_t M, int64_t K, ActScale mode, float fixed, bool split, int8_t* xq,
                       float* sa) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  const int64_t KA = K / AG;
  const auto step_of = [](float top) { return top > 0.0f ? top / 127.0f : 1.0f; };
  for (int64_t m = 0; m < M; ++m) {
    const float* x = xs + m * K;
    float* s = sa + m * KA;
    if (mode == ActScale::group) {
      for (int64_t a = 0; a < KA; ++a)
        s[a] = step_of(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + a * AG)),
                                                          _mm512_abs_ps(_mm512_loadu_ps(x + a * AG + 16)))));
    } else {
      float one = fixed;
      if (mode == ActScale::row) {
        __m512 largest = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
        one = step_of(_mm512_reduce_max_ps(largest));
      }
      std::fill(s, s + KA, one);
    }
    auto round16 = [&](__m512 v, __m512 step) {  // 16 inputs to 16 bytes
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, q))));
    };
    int8_t* out = xq + m * K;
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16), step = _mm512_set1_ps(s[k / AG]);
      if (split) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k / 2), round16(_mm512_permutex2var_ps(a, evens, b), step));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + K / 2 + k / 2),
                         round16(_mm512_permutex2var_ps(a, odds, b), step));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), round16(a, step));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k + 16), round16(b, step));
      }
    }
  }
}
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// Interleaved codes for AVX-512 VNNI (W8A8 and W4A8): the layout `lmforge.quant.kernels.interleave` makes
// once at load. The kernels above read a weight row at a time, so every 64 bytes of codes hold two
// activation groups in one register: each step makes its 16 integer sums fp32 and scales them (dpbusd,
// convert, multiply-add for 64 bytes), and every output ends in a horizontal sum. On Zen 4 that reads
// weights at about half of what memory gives. Here 16 weight rows are interleaved four bytes at a time:
//
//   int8  codes (N / 16, K / 4, 16, 4): bytes [b, c, r, i] = w[16 b + r, 4 c + i] + 128 (unsigned)
//   int4  codes (N / 16, K / 8, 16, 4): byte [b, c, r, i] = u[16 b + r, 8 c + i] | u[16 b + r, 8 c + 4 + i] << 4
//         (u: the stored codes, 0 .. 15, the weight u - offset - zero)
//   scale and zero (N / 16, G, 16): the 16 rows' values of each group side by side (N padded to 16 rows)
//
// so one vpdpbusd multiplies 4 inputs (the activations' 4 bytes broadcast to every lane) into 16 rows'
// sums at once, each lane a row. A 32-input activation group is 8 of them summed in integers, then one
// convert and one multiply-add by its scale for 16 rows; the outputs are the lanes, no horizontal sums.
// The unsigned codes' offset (128, or int4's shared zero) comes off in integers: each group's sum starts at
// -offset * (the sum of its 32 rounded activations); an int4 zero point per group off in fp32, as above:
//   y[n] = sum over g of s[n, g] * (sum over a in g of sa[a] * sum over k in a of (c[n, k] - o) * xq[k]
//                                  - z[n, g] * sum over a in g of sa[a] * sum over k in a of xq[k])
// A row's outputs take the same instructions whatever the number of rows and blocks beside it, so a
// row's bits do not depend on its batch (speculative checks stay exact).
// ---------------------------------------------------------------------------------------------

struct ProblemIL {
  const int8_t* xq;     // (M, K) rounded activations, in input order
  const float* sa;      // (M, KA) their scales
  const int32_t* xs;    // (M, KA) each activation group's sum of rounded activations, times the code offset
  const float* xsum;    // (M, G) sum over each weight group of sa * (sum of xq), or nullptr without zero points
  const uint8_t* codes; // interleaved, above
  const float* scale;   // (NB, G, 16)
  const float* zero;    // (NB, G, 16) or nullptr
  float* y;             // (M, N)
  int64_t M, N, K, G, KA, NB;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")
// Block b (16 weight rows) against activation rows m0 .. m0 + T - 1: each 64 bytes of codes loaded (int4: split
// into halves) once for the T rows. One block at a time: the codes are read as one sequential stream (4 blocks
// side by side, four streams 4.6 KB apart, read SmolLM2's W4A8 products 15-20% slower on Zen 4; W8A8 the same).
// Each row's lanes take the same instructions whatever T is, so a row's bits are its own.
template <int BITS, int T>
inline void tile_il(const ProblemIL& p, int64_t b, int64_t m0) {
  const int64_t gs = p.K / p.G, per_group = gs / AG;  // activation groups a weight group
  const uint8_t* w = p.codes + b * (BITS == 8 ? 16 : 8) * p.K;
  const int32_t* x4[T];  // 4 activations a lane
  for (int t = 0; t < T; ++t) x4[t] = reinterpret_cast<const int32_t*>(p.xq + (m0 + t) * p.K);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 out[T];
  for (int t = 0; t < T; ++t) out[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 sum[T];
    for (int t = 0; t < T; ++t) sum[t] = _mm512_setzero_ps();
    for (int64_t a = g * per_group; a < (g + 1) * per_group; ++a) {
      __m512i acc[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm512_set1_epi32(-p.xs[(m0 + t) * p.KA + a]);
      if constexpr (BITS == 8) {
        for (int j = 0; j < 8; ++j) {
          const __m512i v = _mm512_loadu_si512(w + (a * 8 + j) * 64);
          for (int t = 0; t < T; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], v, _mm512_set1_epi32(x4[t][a * 8 + j]));
        }
      } else {  // high halves in place, 16 times their codes, in their own sums: exact, shifted back at the end
        __m512i high[T];
        for (int t = 0; t < T; ++t) high[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(w + (a * 4 + c) * 64);
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_andnot_si512(low, v);
          for (int t = 0; t < T; ++t) {
            acc[t] = _mm512_dpbusd_epi32(acc[t], lo, _mm512_set1_epi32(x4[t][a * 8 + 2 * c]));
            high[t] = _mm512_dpbusd_epi32(high[t], hi, _mm512_set1_epi32(x4[t][a * 8 + 2 * c + 1]));
          }
        }
        for (int t = 0; t < T; ++t) acc[t] = _mm512_add_epi32(acc[t], _mm512_srai_epi32(high[t], 4));
      }
      for (int t = 0; t < T; ++t)
        sum[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(p.sa[(m0 + t) * p.KA + a]), sum[t]);
    }
    const int64_t at = (b * p.G + g) * 16;
    for (int t = 0; t < T; ++t) {
      if (p.zero)
        sum[t] = _mm512_fnmadd_ps(_mm512_loadu_ps(p.zero + at), _mm512_set1_ps(p.xsum[(m0 + t) * p.G + g]), sum[t]);
      out[t] = _mm512_fmadd_ps(sum[t], _mm512_loadu_ps(p.scale + at), out[t]);
    }
  }
  const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.N - b * 16)) - 1);
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(p.y + (m0 + t) * p.N + b * 16, live, out[t]);
}

template <int BITS>
void run_il(const ProblemIL& p) {
  at::parallel_for(0, p.NB, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {  // the rows of x 4 at a time against a block (its codes stay in L1)
      int64_t m = 0;
      for (; m + 4 <= p.M; m += 4) tile_il<BITS, 4>(p, b, m);
      switch (p.M - m) {
        case 3: tile_il<BITS, 3>(p, b, m); break;
        case 2: tile_il<BITS, 2>(p, b, m); break;
        case 1: tile_il<BITS, 1>(p, b, m); break;
        default: break;
      }
    }
  });
}
#pragma GCC pop_options

bool has_vnni() {
  static const bool vnni = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni") != 0);
  return vnni;
}

// Rows of x in tiles of RMAX rows (then the M % RMAX left, in one tile of their own) against a group of BLK blocks
// of 16 weight rows: Tile<R, BLK>::run takes R rows of x (elements X) against weights W and writes outputs Y. The
// bf16 and fp32 products share it (each tile's inner steps are its own).
template <int RMAX, int BLK, template <int, int> class Tile>
struct RowTiles {
  template <int R, class X, class W, class Y>
  static void rest(int64_t left, const X* x, int64_t K, const W* w, int64_t block, const float* bias, Y* y,
                   int64_t N, int64_t b) {
    if constexpr (R >= 1) {
      if (left == R) return Tile<R, BLK>::run(x, K, w, block, bias, y, N, b);
      rest<R - 1>(left, x, K, w, block, bias, y, N, b);
    }
  }
  template <class X, class W, class Y>
  static void run(const X* x, int64_t M, int64_t K, const W* w, int64_t block, const float* bias, Y* y, int64_t N,
                  int64_t b) {
    int64_t m = 0;
    for (; m + RMAX <= M; m += RMAX) Tile<RMAX, BLK>::run(x + m * K, K, w, block, bias, y + m * N, N, b);
    rest<RMAX - 1>(M - m, x + m * K, K, w, block, bias, y + m * N, N, b);
  }
};

// ---------------------------------------------------------------------------------------------
// bf16 products with AVX-512 BF16 dot products (bf16_linear): y (M, N) bf16 = x (M, K) bf16 @ W.T, fp32 sums.
// Weights in pairs (kernels.bf16_pairs): 16 weight rows side by side, the two inputs 2p and 2p + 1 of each row
// next to each other, so 64 bytes hold one pair for 16 rows: (N / 16, K / 2, 16) pairs. One `vdpbf16ps` takes
// them with a row's two activations broadcast and adds both products into 16 fp32 lanes, one output each:
//   acc[n] += x[2p] * w[n, 2p] + x[2p + 1] * w[n, 2p + 1]            (16 rows n of a block at once)
// One chain of sums per output, in input order, rounded to bf16 once (after the bias). Up to 8 activation rows
// against each block (its 18-49 KB stay in L1/L2 for the next 8).
// Why: oneDNN's bf16 product (weights reordered once, model/packed.py) read SmolLM2's weights at 14-21 GB/s at
// 1-8 rows on a 2-core Zen 4; this reads them at 26-30 (docs/BENCHMARKS.md), 1.1-1.2x oneDNN at 16-32 rows,
// level at hundreds. Every output's sum takes the same instructions in the same order whatever the rows and
// blocks beside it, so a row's bits are its own (a speculative check, a prompt alone or in a batch: the same).
// ---------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
// Blocks b .. b + BLK - 1 against activation rows 0 .. R - 1 of x: each pair of weights loaded once for the R rows,
// each row's broadcast activations once for the BLK blocks (R * BLK sums in registers). Every sum is one chain in
// input order, so a row's bits are the same in every tile shape.
template <int R, int BLK>
inline void tile_bf16(const uint16_t* x, int64_t K, const uint32_t* w, int64_t block, const float* bias, uint16_t* y,
                      int64_t N, int64_t b) {
  __m512 acc[R][BLK];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < BLK; ++j) acc[r][j] = _mm512_setzero_ps();
  auto step = [&](int64_t p, auto activations) {
    __m512bh wv[BLK];
    for (int j = 0; j < BLK; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * block + p * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(activations(r)));
      for (int j = 0; j < BLK; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
    }
  };
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p)
    step(p, [&](int r) {  // activations 2p and 2p + 1 of row r, in both halves of every lane
      uint32_t v;
      std::memcpy(&v, x + r * K + 2 * p, 4);
      return v;
    });
  if (K % 2)  // an odd last input: its pair's second weight is 0, and nothing beyond the row is read
    step(pairs, [&](int r) { return static_cast<uint32_t>(x[r * K + K - 1]); });
  avx512::finish_tile(acc, bias, N, b, [&](int r, int64_t n0, __mmask16 live, __m512 sums) {
    _mm256_mask_storeu_epi16(y + r * N + n0, live, (__m256i)_mm512_cvtneps_pbh(sums));  // rounded once
  });
}

template <int R, int BLK>
struct TileBf16 {
  static void run(const uint16_t* x, int64_t K, const uint32_t* w, int64_t block, const float* bias, uint16_t* y,
                  int64_t N, int64_t b) {
    tile_bf16<R, BLK>(x, K, w, block, bias, y, N, b);
  }
};

// Up to 3 rows the product is bound by reading the weights: one block at a time, one sequential stream. From 4
// rows on it is bound by instructions: three blocks a tile share each row's broadcasts (SmolLM2's products at
// 8-16 rows on a 2-core Zen 4: 1.3-1.4x faster than one block a tile).
void run_bf16(const uint16_t* x, int64_t M, int64_t K, const uint32_t* w, int64_t NB, const float* bias, uint16_t* y,
              int64_t N) {
  const int64_t block = (K + 1) / 2 * 16;  // pairs a block
  const int64_t width = M >= 4 ? 3 : 1, groups = (NB + width - 1) / width;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g * width;
      switch (std::min<int64_t>(width, NB - b)) {
        case 3: RowTiles<8, 3, TileBf16>::run(x, M, K, w + b * block, block, bias, y, N, b); break;
        case 2: RowTiles<8, 2, TileBf16>::run(x, M, K, w + b * block, block, bias, y, N, b); break;
        default: RowTiles<8, 1, TileBf16>::run(x, M, K, w + b * block, block, bias, y, N, b); break;
      }
    }
  });
}
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// fp32 products over weights in blocks (f32_linear): y (M, N) fp32 = x (M, K) fp32 @ W.T. Weights laid out by
// kernels.f32_blocks: 16 weight rows side by side, (N / 16, K, 16), so the 64 bytes at input k hold it for 16
// outputs; one FMA multiplies them by a row's broadcast x[k]:
//   acc[n] = fma(x[k], w[n, k], acc[n])            (k = 0, 1, ..., K - 1: one chain an output, then the bias)
// AVX-512 takes a block in one register, AVX2 in two halves: the same FMAs in the same order, so both give the
// same bits, and a row's bits do not depend on the rows beside it. Why: PyTorch's fp32 products (MKL) at 1-64
// rows ran SmolLM2's compiled 16-row decode step at about 45 GFLOP/s on a 2-core Zen 4 (docs/BENCHMARKS.md).
// ---------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
// Rows 0 .. R - 1 of x against blocks b .. b + BLK - 1 (R * BLK sums in registers).
template <int R, int BLK>
inline void tile_f32_avx512(const float* x, int64_t K, const float* w, int64_t block, const float* bias, float* y,
                            int64_t N, int64_t b) {
  __m512 acc[R][BLK];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < BLK; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[BLK];
    for (int j = 0; j < BLK; ++j) wv[j] = _mm512_loadu_ps(w + j * block + k * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < BLK; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  avx512::finish_tile(acc, bias, N, b, [&](int r, int64_t n0, __mmask16 live, __m512 sums) {
    _mm512_mask_storeu_ps(y + r * N + n0, live, sums);
  });
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The same over AVX2's 8 lanes: a block in two halves, so BLK blocks take 2 * BLK registers a row.
template <int R, int BLK>
inline void tile_f32_avx2(const float* x, int64_t K, const float* w, int64_t block, const float* bias, float* y,
                          int64_t N, int64_t b) {
  __m256 acc[R][2 * BLK];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * BLK; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[2 * BLK];
    for (int j = 0; j < 2 * BLK; ++j) wv[j] = _mm256_loadu_ps(w + (j / 2) * block + k * 16 + (j % 2) * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      for (int j = 0; j < 2 * BLK; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  alignas(32) float out[8];
  for (int j = 0; j < 2 * BLK; ++j) {
    const int64_t n0 = (b + j / 2) * 16 + (j % 2) * 8, n = std::min<int64_t>(8, N - n0);
    if (n <= 0) continue;
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(out, acc[r][j]);
      for (int64_t i = 0; i < n; ++i) y[r * N + n0 + i] = out[i] + (bias ? bias[n0 + i] : 0.0f);
    }
  }
}
#pragma GCC pop_options

template <int R, int BLK>
struct TileF32Avx512 {
  static void run(const float* x, int64_t K, const float* w, int64_t block, const float* bias, float* y, int64_t N,
                  int64_t b) {
    tile_f32_avx512<R, BLK>(x, K, w, block, bias, y, N, b);
  }
};
template <int R, int BLK>
struct TileF32Avx2 {
  static void run(const float* x, int64_t K, const float* w, int64_t block, const float* bias, float* y, int64_t N,
                  int64_t b) {
    tile_f32_avx2<R, BLK>(x, K, w, block, bias, y, N, b);
  }
};

// AVX-512: up to 3 rows one block a task (one stream of weights); from 4 rows three blocks share each row's
// broadcast (8 rows x 3 blocks: 24 sums in registers). AVX2 (16 registers): one block a task, 4 rows x 2 halves.
void run_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t NB, const float* bias, float* y,
             int64_t N, bool wide) {
  const int64_t block = K * 16;
  const int64_t width = wide && M >= 4 ? 3 : 1, groups = (NB + width - 1) / width;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g * width, n = std::min<int64_t>(width, NB - b);
      const float* wb = w + b * block;
      if (!wide) RowTiles<4, 1, TileF32Avx2>::run(x, M, K, wb, block, bias, y, N, b);
      else if (n == 3) RowTiles<8, 3, TileF32Avx512>::run(x, M, K, wb, block, bias, y, N, b);
      else if (n == 2) RowTiles<8, 2, TileF32Avx512>::run(x, M, K, wb, block, bias, y, N, b);
      else RowTiles<8, 1, TileF32Avx512>::run(x, M, K, wb, block, bias, y, N, b);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// A decoder's masked attention in bf16 or fp32 (grouped_attention: the batched engine's decode steps over their
// cached keys, speculative checks, prompts in padded batches, multiple-choice passes; model/attention.py
// sdpa_attention calls it). For each row of queries (a query head of a kv head's group, one new token):
//   s[j] = (q . k[j]) / sqrt(D)          bf16: `vdpbf16ps` (pairs, fp32 sums); fp32: FMAs; 16 keys at a time, where allowed
//   p[j] = exp(s[j] - max s) / sum       fp32 (a vector exp), masked keys exactly 0
//   out  = sum over allowed j of p[j] v[j]   fp32 sums in key order (bf16: rounded once at the end)
// A block of 16 keys that the row may not see at all (a prompt's future, a slot shorter than the longest) is
// not read. Why: PyTorch's fused CPU kernel gives each (row, kv head) a few tiny bf16 matrix products with their
// own set-up; on a 2-core Zen 4 a SmolLM2 decode step at 16 rows and 200 cached positions spent 0.46 ms a layer
// there (13.7 of 36 ms a step); this takes about a fifth of that (fp32: 0.52 ms a layer against 0.23, the same
// step). The probabilities stay fp32
// (the fused kernel rounds them to bf16 before the values' product). Each row takes the same instructions
// whatever the rows beside it (rows are split among threads one at a time or a few of a kv head's at once: the
// same bits), and a masked key adds exactly nothing, so a speculative step's first row equals the one-token step's.
// ---------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
// e^x for x <= 0 in 16 lanes: x = n ln2 + r (|r| <= ln2 / 2), e^r by its Taylor series to r^6 (relative error
// about 1e-7), times 2^n (scalef). Below -87 (and -inf) exactly 0.
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: n ln2 exact enough
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(e, n));
}

// The 16 sums of 16 vectors' lanes, in order: out[i] = sum of a[i]'s lanes. Each vector's lanes are added in the
// same tree whatever i (pairs within 128-bit lanes, then the four 128-bit lanes), and never mixed with another's.
inline __m512 sum_lanes16(__m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// What differs between bf16 and fp32 attention: how a query row is held, how it meets a key row (a key's partial
// sums in 16 lanes), how a value row is read, how an output row is written. bf16: pairs of inputs with vdpbf16ps,
// values widened, outputs rounded once; fp32: FMAs, as they are.
struct Bf16Rows {
  using T = uint16_t;
  template <int NV> struct Query { __m512bh v[NV / 2]; };
  template <int NV> static void load(Query<NV>& q, const T* row) {
    for (int z = 0; z < NV / 2; ++z) q.v[z] = (__m512bh)_mm512_loadu_si512(row + 32 * z);
  }
  template <int NV> static __m512 dot(const Query<NV>& q, const T* key) {
    __m512 a = _mm512_setzero_ps();
    for (int z = 0; z < NV / 2; ++z) a = _mm512_dpbf16_ps(a, q.v[z], (__m512bh)_mm512_loadu_si512(key + 32 * z));
    return a;
  }
  static __m512 value(const T* p) { return avx512::widen_bf16(p); }  // the products' widening
  static void store(T* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x)); }
};

struct F32Rows {
  using T = float;
  template <int NV> struct Query { __m512 v[NV]; };
  template <int NV> static void load(Query<NV>& q, const T* row) {
    for (int z = 0; z < NV; ++z) q.v[z] = _mm512_loadu_ps(row + 16 * z);
  }
  template <int NV> static __m512 dot(const Query<NV>& q, const T* key) {
    __m512 a = _mm512_setzero_ps();
    for (int z = 0; z < NV; ++z) a = _mm512_fmadd_ps(q.v[z], _mm512_loadu_ps(key + 16 * z), a);
    return a;
  }
  static __m512 value(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, __m512 x) { _mm512_storeu_ps(p, x); }
};

// Query rows r0 .. r0 + rows - 1 (at most 24 / NV) of one (slot, kv head): row r is head r / T of the group, new
// token r % T. q, out: (G * T, D) of the group; k, v: (Tk, D); mask: (T, Tk). scores: rows x (Tk rounded up to 16).
template <class E, int NV>  // E: Bf16Rows or F32Rows; NV = D / 16
void attend_rows(const typename E::T* q, const typename E::T* k, const typename E::T* v, const bool* mask, int64_t T,
                 int64_t Tk, int64_t r0, int rows, float scale, typename E::T* out, float* scores) {
  constexpr int D = NV * 16, RC = 24 / NV;  // RC rows' sums of values in registers at once
  const int64_t padded = (Tk + 15) / 16 * 16;
  float inverse[RC];
  for (int i = 0; i < rows; ++i) {  // scores 16 keys at a time, then the softmax's numerators in place
    const int64_t r = r0 + i;
    const bool* allowed = mask + (r % T) * Tk;
    typename E::template Query<NV> qv;
    E::load(qv, q + r * D);
    float* s = scores + i * padded;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < Tk; j0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, Tk - j0));
      const __mmask16 keys = static_cast<__mmask16>((1u << n) - 1);
      const __mmask16 seen = _mm_mask_cmpneq_epi8_mask(keys, _mm_maskz_loadu_epi8(keys, allowed + j0), _mm_setzero_si128());
      __m512 dots = _mm512_set1_ps(-INFINITY);
      if (seen) {  // a block no query of this row may see (the future of a prompt, a shorter slot) costs nothing
        __m512 a[16];
        for (int jj = 0; jj < 16; ++jj) a[jj] = jj < n ? E::dot(qv, k + (j0 + jj) * D) : _mm512_setzero_ps();
        dots = _mm512_mask_mul_ps(dots, seen, sum_lanes16(a), _mm512_set1_ps(scale));  // masked: -inf
      }
      _mm512_storeu_ps(s + j0, dots);
      top = _mm512_max_ps(top, dots);
    }
    const float most = _mm512_reduce_max_ps(top);
    const __m512 shift = _mm512_set1_ps(most == -INFINITY ? 0.0f : most);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    inverse[i] = total > 0 ? 1.0f / total : 0.0f;  // a row that may see no key comes out 0 (as the fused kernel's)
  }
  __m512 acc[RC][NV];  // the values: each key's row widened once for the chunk's query rows
  for (int i = 0; i < RC; ++i)
    for (int z = 0; z < NV; ++z) acc[i][z] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Tk; ++j) {
    __mmask16 live[RC];
    bool any = false;
    for (int i = 0; i < rows; ++i) {
      live[i] = mask[((r0 + i) % T) * Tk + j] ? 0xFFFF : 0;
      any |= live[i] != 0;
    }
    if (!any) continue;
    __m512 vv[NV];
    for (int z = 0; z < NV; ++z) vv[z] = E::value(v + j * D + 16 * z);
    for (int i = 0; i < rows; ++i) {
      const __m512 p = _mm512_set1_ps(scores[i * padded + j]);
      for (int z = 0; z < NV; ++z) acc[i][z] = _mm512_mask3_fmadd_ps(p, vv[z], acc[i][z], live[i]);
    }
  }
  for (int i = 0; i < rows; ++i) {
    const __m512 inv = _mm512_set1_ps(inverse[i]);
    for (int z = 0; z < NV; ++z) E::store(out + (r0 + i) * D + 16 * z, _mm512_mul_ps(acc[i][z], inv));
  }
}

// q (B, H, T, D) and out contiguous; k, v (B, Hkv, Tk, D) with rows of D in a row (strides kb, kh: slot, head);
// mask (B, T, Tk). One task a chunk of a (slot, kv head)'s query rows (24 / (D / 16) of them), or a single row when
// there are few (slot, kv head)s (batch 1: SmolLM2's 9 rows over 2 threads, not 3 kv heads).
template <class E>
void run_attention(const typename E::T* q, const typename E::T* k, const typename E::T* v, int64_t kb, int64_t kh,
                   const bool* mask, typename E::T* out, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t Tk,
                   int64_t D) {
  const int64_t G = H / Hkv, R = G * T, most = 24 / (D / 16);
  // Rows a task: as many of a kv head's rows as share one read of its keys (up to `most`) while the tasks still
  // number 4 a thread. A speculative check at batch 1 (5 tokens x 3 query heads a kv head) runs 9 tasks of 5 rows,
  // where one row a task read each head's keys 15 times: SmolLM2's 30 layers 1.24 -> 1.08 ms in bf16, 8 tokens
  // 1.23 -> 1.01 (fp32 1.76 -> 1.40); one token as before (docs/BENCHMARKS.md).
  int64_t chunk = 1;
  for (int64_t c = most; c > 1 && chunk == 1; --c)
    if (B * Hkv * ((R + c - 1) / c) >= 4 * at::get_num_threads()) chunk = c;
  const int64_t per = (R + chunk - 1) / chunk;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * Hkv * per, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(chunk * ((Tk + 15) / 16 * 16));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t item = task / per, b = item / Hkv, h = item % Hkv, r0 = task % per * chunk;
      const int rows = static_cast<int>(std::min(chunk, R - r0));
      const int64_t group = (b * H + h * G) * T * D;
      const typename E::T *kp = k + b * kb + h * kh, *vp = v + b * kb + h * kh;
      const bool* m = mask + b * T * Tk;
      switch (D) {
        case 32: attend_rows<E, 2>(q + group, kp, vp, m, T, Tk, r0, rows, scale, out + group, scores.data()); break;
        case 64: attend_rows<E, 4>(q + group, kp, vp, m, T, Tk, r0, rows, scale, out + group, scores.data()); break;
        case 96: attend_rows<E, 6>(q + group, kp, vp, m, T, Tk, r0, rows, scale, out + group, scores.data()); break;
        default: attend_rows<E, 8>(q + group, kp, vp, m, T, Tk, r0, rows, scale, out + group, scores.data()); break;
      }
    }
  });
}
#pragma GCC pop_options

bool has_bf16_dots() {
  static const bool bf16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16") != 0);
  return bf16;
}
#endif

at::Tensor int_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, int64_t bits, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int_linear runs on CPUs");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int_linear takes fp32 activations, got ", x.scalar_type());
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(qweight.dim() == 2 && scale.dim() == 2, "qweight and scale must be matrices");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "scales must be fp32");
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 8 ? qweight.size(1) : qweight.size(1) * 2;
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " inputs, the weight ", K);
  const int64_t G = scale.size(1);
  TORCH_CHECK(K % G == 0 && (bits == 8 || (K / G) % 2 == 0), "groups must split the inputs evenly");
  TORCH_CHECK(scale.size(0) == N || scale.size(0) == 1, "scale must have one row per output or one in all");
  if (zero) {
    TORCH_CHECK(zero->sizes() == scale.sizes() && zero->scalar_type() == at::kFloat, "zero must match scale");
  }
  const bool is_signed = qweight.scalar_type() == at::kChar;
  TORCH_CHECK(is_signed || qweight.scalar_type() == at::kByte, "codes must be int8 or uint8");
  TORCH_CHECK(bits == 8 || !is_signed, "int4 codes are packed into uint8");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (bits == 4) {  // even inputs, then odd inputs, per row
    at::Tensor split = at::empty({M, K}, x2.options());
    const float* from = x2.data_ptr<float>();
    float* to = split.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < K / 2; ++j) {
        to[m * K + j] = from[m * K + 2 * j];
        to[m * K + K / 2 + j] = from[m * K + 2 * j + 1];
      }
    x2 = split;
  }
  at::Tensor codes = qweight.contiguous(), s = scale.contiguous();
  at::Tensor z = zero ? zero->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());

  Problem p{x2.data_ptr<float>(), reinterpret_cast<const uint8_t*>(codes.data_ptr()), s.data_ptr<float>(),
            zero ? z.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, G, scale.size(0),
            bits == 4 ? Codes::u4 : is_signed ? Codes::s8 : Codes::u8, static_cast<int>(offset)};
  run_isa(p);
  return y.reshape(out_shape);
}

// fp32 activations times 16-bit weights (fp16 or bf16, (N, K)), each weight widened to fp32 in
// registers as it is loaded: a decode step reads half of fp32's bytes and computes in fp32.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "half_linear runs on CPUs");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "half_linear takes fp32 activations, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16),
              "half_linear takes an fp16 or bf16 weight matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " inputs, the weight ", K);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty({x2.size(0), N}, x.options());
  static const float one = 1.0f;
  Problem p{x2.data_ptr<float>(), reinterpret_cast<const uint8_t*>(w.data_ptr()), &one, nullptr, y.data_ptr<float>(),
            x2.size(0), N, K, 1, 1, weight.scalar_type() == at::kHalf ? Codes::f16 : Codes::bf16, 0};
  run_isa(p);
  return y.reshape(out_shape);
}

at::Tensor int_linear_a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& act_scale,
                         int64_t bits, int64_t offset, int64_t act_group) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int_linear_a8 runs on CPUs");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int_linear_a8 takes fp32 activations, got ", x.scalar_type());
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(bits == 4 || (qweight.scalar_type() == at::kChar && !zero),
              "int8 activations go with symmetric int8 weights (int8 codes, no zero point)");
  TORCH_CHECK(bits == 8 || qweight.scalar_type() == at::kByte, "int4 codes are packed into uint8");
  TORCH_CHECK(qweight.dim() == 2 && scale.dim() == 2 && scale.scalar_type() == at::kFloat,
              "qweight and fp32 scale must be matrices");
  const int64_t N = qweight.size(0), K = bits == 8 ? qweight.size(1) : 2 * qweight.size(1), G = scale.size(1);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " inputs, the weight ", K);
  TORCH_CHECK(K % G == 0 && (bits == 8 || (K / G) % 2 == 0), "groups must split the inputs evenly");
  TORCH_CHECK(scale.size(0) == N || scale.size(0) == 1, "scale must have one row per output or one in all");
  if (zero) TORCH_CHECK(zero->sizes() == scale.sizes() && zero->scalar_type() == at::kFloat, "zero must match scale");
  TORCH_CHECK(act_group == 0 || act_group == AG, "activation groups are of 32 inputs (or 0: one scale a row)");
  TORCH_CHECK(act_group == 0 || K % AG == 0, "activation groups of 32 need a multiple of 32 inputs, got ", K);
  TORCH_CHECK(act_group == 0 || !act_scale, "a calibrated activation scale is one for the layer, not per group");
  const ActScale mode = act_scale ? ActScale::fixed : act_group ? ActScale::group : ActScale::row;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), KA = (K + AG - 1) / AG;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sa(M * KA);
  const float* xs = x2.data_ptr<float>();
  const float fixed = act_scale ? act_scale->item<float>() : 0.0f;
#ifdef LMF_X86
  const bool vector_rounding = current_isa() == "avx512" && K % 32 == 0;
  if (vector_rounding) round_rows_avx512(xs, M, K, mode, fixed, bits == 4, xq.data(), sa.data());
#else
  const bool vector_rounding = false;
#endif
  for (int64_t m = 0; !vector_rounding && m < M; ++m) {  // each row onto [-127, 127] by its scales, half to even
    float* s = sa.data() + m * KA;
    if (mode == ActScale::fixed) {
      std::fill(s, s + KA, fixed);
    } else {  // the largest magnitude of each 32 inputs, or of the row
      for (int64_t a = 0; a < KA; ++a) {
        float largest = 0.0f;
        for (int64_t k = a * AG; k < std::min(K, (a + 1) * AG); ++k) largest = std::max(largest, std::abs(xs[m * K + k]));
        s[a] = largest;
      }
      if (mode == ActScale::row) std::fill(s, s + KA, *std::max_element(s, s + KA));
      for (int64_t a = 0; a < KA; ++a) s[a] = s[a] > 0.0f ? s[a] / 127.0f : 1.0f;
    }
    for (int64_t k = 0; k < K; ++k) {
      const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(xs[m * K + k] / s[k / AG])));
      // int4: even inputs first, then odd ones, to meet the packed codes' halves
      const int64_t at = bits == 8 ? k : (k % 2 ? K / 2 : 0) + k / 2;
      xq[m * K + at] = static_cast<int8_t>(q);
    }
  }
  // Each weight group's scaled activation sum, sum of sa * xq (for the zero points, and VNNI int8's shift by
  // 128), where weight groups hold whole activation groups (the vector paths; plain C++ needs none)
  const int64_t gs = K / G;
  std::vector<float> xsum(gs % AG == 0 ? M * G : 0);
  for (int64_t m = 0; !xsum.empty() && m < M; ++m)
    for (int64_t a = 0; a < K / AG; ++a) {
      int32_t sum = 0;
      const int8_t* q = xq.data() + m * K;
      if (bits == 8)
        for (int64_t k = a * AG; k < (a + 1) * AG; ++k) sum += q[k];
      else
        for (int64_t j = a * AG / 2; j < (a + 1) * AG / 2; ++j) sum += q[j] + q[K / 2 + j];
      xsum[m * G + a * AG / gs] += sa[m * KA + a] * static_cast<float>(sum);
    }
  at::Tensor codes = qweight.contiguous(), s = scale.contiguous();
  at::Tensor z = zero ? zero->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  ProblemA8 p{xq.data(), sa.data(), xsum.empty() ? nullptr : xsum.data(), nullptr, nullptr,
              reinterpret_cast<const uint8_t*>(codes.data_ptr()), s.data_ptr<float>(),
              zero ? z.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, G, KA, scale.size(0),
              static_cast<int>(bits), static_cast<int>(offset)};
#ifdef LMF_X86
  // int4 rows on VNNI take whole lanes of one group: groups a multiple of 32 inputs
  if (bits == 4 && current_isa() == "avx512" && has_vnni() && gs % 32 == 0) {
    std::vector<int32_t> xbias(M * K / 8), lane_group(K / 8);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t l = 0; l < K / 8; ++l) {
        const int8_t* e = xq.data() + m * K + 4 * l;  // 4 even inputs, and the 4 odd ones K / 2 further
        int32_t sum = 0;
        for (int i = 0; i < 4; ++i) sum += e[i] + e[K / 2 + i];
        xbias[m * (K / 8) + l] = -static_cast<int32_t>(offset) * sum;
      }
    for (int64_t l = 0; l < K / 8; ++l) lane_group[l] = static_cast<int32_t>(8 * l / gs);
    p.xbias = xbias.data();
    p.lane_group = lane_group.data();
    if (gs == 32) run_tiles<A4Tile<32>>(p);
    else if (gs == 64) run_tiles<A4Tile<64>>(p);
    else run_tiles<A4Tile<0>>(p);
    return y.reshape(out_shape);
  }
  if (bits == 8 && current_isa() == "avx512" && has_vnni()) {
    run_a8_vnni(p);
    return y.reshape(out_shape);
  }
  if (current_isa() != "scalar") {
    run_a8_avx2(p);
    return y.reshape(out_shape);
  }
#endif
  run_a8<row_a8_scalar>(p);
  return y.reshape(out_shape);
}

// The fp32 weight (N, K) that the codes stand for, (code - zero) * scale, in one parallel pass:
// what a long prompt multiplies by (PyTorch's unpack-subtract-multiply takes several passes).
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                      int64_t bits, int64_t offset) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && scale.dim() == 2 &&
              scale.scalar_type() == at::kFloat, "dequantize takes CPU codes and an fp32 scale matrix");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  const bool is_signed = qweight.scalar_type() == at::kChar;
  const int64_t N = qweight.size(0), K = bits == 8 ? qweight.size(1) : 2 * qweight.size(1), G = scale.size(1);
  TORCH_CHECK(K % G == 0, "groups must split the inputs evenly");
  at::Tensor codes = qweight.contiguous(), s = scale.contiguous();
  at::Tensor z = zero ? zero->contiguous() : at::Tensor();
  const uint8_t* c = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const float* sp = s.data_ptr<float>();
  const float* zp = zero ? z.data_ptr<float>() : nullptr;
  const int64_t rows = scale.size(0), gs = K / G;
  at::Tensor w = at::empty({N, K}, scale.options());
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t srow = rows == 1 ? 0 : n;
      for (int64_t g = 0; g < G; ++g) {  // one group at a time: its zero and scale are constants
        const float zero_point = zp ? zp[srow * G + g] : 0.0f, step = sp[srow * G + g];
        float* o = out + n * K + g * gs;
        if (bits == 8 && is_signed) {
          const int8_t* q = reinterpret_cast<const int8_t*>(c) + n * K + g * gs;
          for (int64_t k = 0; k < gs; ++k) o[k] = (static_cast<float>(q[k]) - zero_point) * step;
        } else if (bits == 8) {
          const uint8_t* q = c + n * K + g * gs;
          for (int64_t k = 0; k < gs; ++k) o[k] = (static_cast<float>(q[k]) - zero_point) * step;
        } else {
          const uint8_t* q = c + n * (K / 2) + g * gs / 2;
          const int off = static_cast<int>(offset);
          for (int64_t j = 0; j < gs / 2; ++j) {
            o[2 * j] = (static_cast<float>((q[j] & 0x0F) - off) - zero_point) * step;
            o[2 * j + 1] = (static_cast<float>((q[j] >> 4) - off) - zero_point) * step;
          }
        }
      }
    }
  });
  return w;
}

// W8A8 / W4A8 over interleaved codes (the layout above). N: the outputs (the codes may pad to 16 rows).
at::Tensor int_linear_a8_interleaved(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& act_scale,
                                     int64_t bits, int64_t offset, int64_t act_group, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "int_linear_a8_interleaved runs on CPUs");
#ifdef LMF_X86
  TORCH_CHECK(has_vnni() && current_isa() == "avx512", "interleaved codes need AVX-512 VNNI");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int_linear_a8_interleaved takes fp32 activations");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(2) == 16 && codes.size(3) == 4,
              "interleaved codes are uint8 (N / 16, K / 4 or K / 8, 16, 4)");
  const int64_t NB = codes.size(0), K = codes.size(1) * (bits == 8 ? 4 : 8);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " inputs, the weight ", K);
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == NB && scale.size(2) == 16 && scale.scalar_type() == at::kFloat,
              "interleaved scales are fp32 (N / 16, G, 16)");
  const int64_t G = scale.size(1);
  TORCH_CHECK(K % AG == 0 && K % G == 0 && (K / G) % AG == 0, "groups must hold whole 32-input activation groups");
  TORCH_CHECK(N > (NB - 1) * 16 && N <= NB * 16, "N does not match the codes' blocks");
  if (zero) TORCH_CHECK(zero->sizes() == scale.sizes() && zero->scalar_type() == at::kFloat, "zero must match scale");
  TORCH_CHECK(act_group == 0 || act_group == AG, "activation groups are of 32 inputs (or 0: one scale a row)");
  TORCH_CHECK(act_group == 0 || !act_scale, "a calibrated activation scale is one for the layer, not per group");
  const ActScale mode = act_scale ? ActScale::fixed : act_group ? ActScale::group : ActScale::row;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), KA = K / AG;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sa(M * KA);
  std::vector<int32_t> xs(M * KA);
  round_rows_avx512(x2.data_ptr<float>(), M, K, mode, act_scale ? act_scale->item<float>() : 0.0f, false, xq.data(),
                    sa.data());
  const int code_offset = bits == 8 ? 128 : static_cast<int>(offset);
  std::vector<float> xsum(zero ? M * G : 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t a = 0; a < KA; ++a) {
      int32_t sum = 0;
      for (int64_t k = a * AG; k < (a + 1) * AG; ++k) sum += xq[m * K + k];
      xs[m * KA + a] = code_offset * sum;
      if (zero) xsum[m * G + a * AG * G / K] += sa[m * KA + a] * static_cast<float>(sum);
    }
  at::Tensor c = codes.contiguous(), s = scale.contiguous(), z = zero ? zero->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  ProblemIL p{xq.data(), sa.data(), xs.data(), zero ? xsum.data() : nullptr, c.data_ptr<uint8_t>(), s.data_ptr<float>(),
              zero ? z.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, G, KA, NB};
  if (bits == 8) run_il<8>(p);
  else run_il<4>(p);
  return y.reshape(out_shape);
#else
  TORCH_CHECK(false, "interleaved codes need AVX-512 VNNI");
#endif
}

// What both blocked products share: N within the weights' NB blocks of 16, the bias (N values, made fp32), x as
// (M, K) rows, and y (M, N) of x's dtype, to be reshaped to x's leading dimensions and N.
struct BlockedProduct {
  at::Tensor x2, y, bias;
  std::vector<int64_t> out_shape;
};

BlockedProduct blocked_product(const at::Tensor& x, int64_t K, int64_t NB, const std::optional<at::Tensor>& bias,
                               int64_t N) {
  TORCH_CHECK(N > (NB - 1) * 16 && N <= NB * 16, "N does not match the weights' blocks");
  BlockedProduct p;
  if (bias) {
    TORCH_CHECK(bias->numel() == N, "the bias has ", bias->numel(), " values for ", N, " outputs");
    p.bias = bias->to(at::kFloat).contiguous();
  }
  p.out_shape.assign(x.sizes().begin(), x.sizes().end());
  p.out_shape.back() = N;
  p.x2 = x.reshape({-1, K}).contiguous();
  p.y = at::empty({p.x2.size(0), N}, x.options());
  return p;
}

// bf16 x (..., K) times bf16 weights in pairs (the layout above), optional fp32 bias (N); bf16 out (..., N).
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& pairs, const std::optional<at::Tensor>& bias,
                       int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && pairs.device().is_cpu(), "bf16_linear runs on CPUs");
#ifdef LMF_X86
  TORCH_CHECK(has_bf16_dots() && current_isa() == "avx512", "bf16_linear needs AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "bf16_linear takes bf16 activations, got ", x.scalar_type());
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 3 && pairs.size(2) == 16,
              "weights in pairs are int32 (N / 16, K / 2, 16)");
  const int64_t NB = pairs.size(0), K = x.size(-1);
  TORCH_CHECK(pairs.size(1) == (K + 1) / 2, "x has ", K, " inputs, the weights ", 2 * pairs.size(1));
  BlockedProduct p = blocked_product(x, K, NB, bias, N);
  at::Tensor w = pairs.contiguous();
  run_bf16(reinterpret_cast<const uint16_t*>(p.x2.data_ptr()), p.x2.size(0), K,
           reinterpret_cast<const uint32_t*>(w.data_ptr()), NB, bias ? p.bias.data_ptr<float>() : nullptr,
           reinterpret_cast<uint16_t*>(p.y.data_ptr()), N);
  return p.y.reshape(p.out_shape);
#else
  TORCH_CHECK(false, "bf16_linear needs AVX-512 BF16");
#endif
}

// fp32 x (..., K) times fp32 weights in blocks of 16 rows (the layout above), optional bias (N); fp32 out (..., N).
// AVX-512 or AVX2, whichever the calls run on (set_isa).
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& blocks, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "f32_linear runs on CPUs");
#ifdef LMF_X86
  const std::string& isa = current_isa();
  TORCH_CHECK(isa == "avx512" || isa == "avx2", "f32_linear needs AVX-512 or AVX2, the calls run on ", isa);
  TORCH_CHECK(x.scalar_type() == at::kFloat && blocks.scalar_type() == at::kFloat, "f32_linear takes fp32, got ",
              x.scalar_type(), " and ", blocks.scalar_type());
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 16, "weights in blocks are (N / 16, K, 16)");
  const int64_t NB = blocks.size(0), K = x.size(-1);
  TORCH_CHECK(blocks.size(1) == K, "x has ", K, " inputs, the weights ", blocks.size(1));
  BlockedProduct p = blocked_product(x, K, NB, bias, N);
  at::Tensor w = blocks.contiguous();
  run_f32(p.x2.data_ptr<float>(), p.x2.size(0), K, w.data_ptr<float>(), NB, bias ? p.bias.data_ptr<float>() : nullptr,
          p.y.data_ptr<float>(), N, isa == "avx512");
  return p.y.reshape(p.out_shape);
#else
  TORCH_CHECK(false, "f32_linear needs AVX-512 or AVX2");
#endif
}

// softmax(q k^T / sqrt(D) + mask) v for q (B, H, T, D) over k, v (B, Hkv, Tk, D), all bf16 (AVX-512 BF16) or all
// fp32 (AVX-512), H a multiple of Hkv (each kv head serves H / Hkv query heads), mask (B, 1, T, Tk) bool (True: may
// look); D 32, 64, 96 or 128.
at::Tensor grouped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "grouped_attention runs on CPUs");
#ifdef LMF_X86
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || q.scalar_type() == at::kFloat) && k.scalar_type() == q.scalar_type() &&
              v.scalar_type() == q.scalar_type(), "grouped_attention takes bf16 or fp32 queries, keys and values, "
              "all alike");
  TORCH_CHECK(current_isa() == "avx512" && (!bf16 || has_bf16_dots()),
              bf16 ? "grouped_attention in bf16 needs AVX-512 BF16" : "grouped_attention needs AVX-512");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(), "q is (B, H, T, D); k and v (B, Hkv, Tk, D)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0, "q ", q.sizes(), " does not fit k ",
              k.sizes());
  TORCH_CHECK(D == 32 || D == 64 || D == 96 || D == 128, "head size ", D, " is not 32, 64, 96 or 128");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4, "the mask is boolean (B, 1, T, Tk)");
  at::Tensor keys = k, values = v;
  if (k.stride(3) != 1 || k.stride(2) != D || v.strides() != k.strides()) {  // the kernel walks rows of D in a row
    keys = k.contiguous();
    values = v.contiguous();
  }
  at::Tensor qc = q.contiguous(), m = mask.expand({B, 1, T, Tk}).contiguous();
  at::Tensor out = at::empty({B, H, T, D}, q.options());
  if (bf16) {
    using U = uint16_t;
    run_attention<Bf16Rows>(reinterpret_cast<const U*>(qc.data_ptr()), reinterpret_cast<const U*>(keys.data_ptr()),
                            reinterpret_cast<const U*>(values.data_ptr()), keys.stride(0), keys.stride(1),
                            m.data_ptr<bool>(), reinterpret_cast<U*>(out.data_ptr()), B, H, Hkv, T, Tk, D);
  } else {
    run_attention<F32Rows>(qc.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), keys.stride(0),
                           keys.stride(1), m.data_ptr<bool>(), out.data_ptr<float>(), B, H, Hkv, T, Tk, D);
  }
  return out;
#else
  TORCH_CHECK(false, "grouped_attention needs AVX-512");
#endif
}

bool bf16_dots() {
#ifdef LMF_X86
  return has_bf16_dots();
#else
  return false;
#endif
}

bool vnni() {
#ifdef LMF_X86
  return has_vnni();
#else
  return false;
#endif
}

std::string isa() { return current_isa(); }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar" || name == "best",
              "unknown instruction set ", name);
  current_isa() = name == "best" ? best_isa() : name;
}

std::string best() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("int_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int bits, int offset) -> Tensor");
  m.impl("int_linear", c10::DispatchKey::CPU, TORCH_FN(int_linear));
  m.def("int_linear_a8(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor? act_scale, int bits, "
        "int offset, int act_group) -> Tensor");
  m.impl("int_linear_a8", c10::DispatchKey::CPU, TORCH_FN(int_linear_a8));
  m.def("half_linear(Tensor x, Tensor weight) -> Tensor");
  m.impl("half_linear", c10::DispatchKey::CPU, TORCH_FN(half_linear));
  m.def("dequantize(Tensor qweight, Tensor scale, Tensor? zero, int bits, int offset) -> Tensor");
  m.impl("dequantize", c10::DispatchKey::CPU, TORCH_FN(dequantize));
  m.def("int_linear_a8_interleaved(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? act_scale, int bits, "
        "int offset, int act_group, int N) -> Tensor");
  m.impl("int_linear_a8_interleaved", c10::DispatchKey::CPU, TORCH_FN(int_linear_a8_interleaved));
  m.def("bf16_linear(Tensor x, Tensor pairs, Tensor? bias, int N) -> Tensor");
  m.impl("bf16_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_linear));
  m.def("f32_linear(Tensor x, Tensor blocks, Tensor? bias, int N) -> Tensor");
  m.impl("f32_linear", c10::DispatchKey::CPU, TORCH_FN(f32_linear));
  m.def("grouped_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.impl("grouped_attention", c10::DispatchKey::CPU, TORCH_FN(grouped_attention));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("isa", &isa, "the instruction set int_linear runs on");
  module.def("vnni", &vnni, "whether the CPU has AVX-512 VNNI (interleaved codes)");
  module.def("bf16_dots", &bf16_dots, "whether the CPU has AVX-512 BF16 (bf16_linear)");
  module.def("best_isa", &best, "the best instruction set this CPU has");
  module.def("set_isa", &set_isa, "run on a given instruction set (avx512, avx2, scalar) or the best one");
}
