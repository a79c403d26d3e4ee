// Matmul against group-quantized weights, y [M, N] = x [M, K] W^T + b, dequantizing in registers:
// decoding reads every weight once per step, so 4- and 8-bit codes (a quarter and a half of
// bfloat16's bytes, plus the groups' scales) make a step that much less memory to stream.
//
// The weight (`QuantizedMatrix`): per output column n and group g of `group_size` consecutive
// input dimensions, W[n][k] = scale[n][g] * value(code[n][k]) + offset[n][g] (no offset:
// symmetric codes). Codes (`CodeFormat`) are
//
// - 4-bit integers (0..15): [N][K / 2] bytes, each 32 dimensions as 16 bytes, the low nibbles
//   holding the first 16 and the high nibbles the next 16 (GGUF's Q4 block layout, which unpacks
//   with one mask and one shift);
// - 4-bit indexes into 16 levels (bitsandbytes' NF4 and FP4), packed the same way;
// - 8-bit integers (-128..127): [N][K] bytes;
// - FP8 e4m3 (OCP's "fn" variant): [N][K] bytes. Its exponent and mantissa bits, moved into a
//   half's, make a half worth the value / 2^8 (subnormals included), which F16C widens in one
//   instruction; the 2^8 joins the scale.
//
// Scales and offsets are float32 [N][K / group_size]; group_size is a multiple of 32, or 16.
//
// Two paths, each summing a row in the same order whatever rows and columns it is computed with,
// so that a request's output does not depend on its batch; the path depends on the weight only
// (the integer path's two loops on CPUs with AMX compute the same bits).
// Threads split the columns. x is widened to float32 and y written in x's dtype here, rather
// than by separate PyTorch conversions around the call (which took a sixth of a one-request
// decode step). sum_k W x = sum_g scale * sum(value * x) + sum_g offset * sum(x): the offsets
// join through x's sums per group.
//
// - The integer path (4-bit integers with groups of whole blocks, 8-bit integers; see "The
//   integer path" below): x rounded to 12-bit integers per 32 dimensions (4-bit codes) or 16-bit
//   per 16 (8-bit codes), codes unpacked with shifts and masks and multiplied as integers
//   (vpmaddwd). Widening 4-bit codes to float32 instead made one row slower than bfloat16's,
//   though it reads about a third of the bytes. Where the CPU has AMX, integer codes take AMX on
//   many rows and AVX512-VNNI on a few instead, in the same arithmetic (see "Integer codes where
//   the CPU has AMX"). On AVX512-BF16 CPUs without AMX, a bfloat16 model's 4-bit integer codes
//   instead multiply its bfloat16 rows as they are, by dot products (see "4-bit integer codes
//   times bfloat16 rows").
// - The float32 path (FP8, NF4 and FP4 levels, 4-bit integers with groups of 16): each block's 32
//   codes widened to float32 and scaled once, multiplied by up to 4 rows of x (a column's codes
//   unpacked once per 4 rows), with fewer rows up to 4 columns at once so that independent sums
//   hide the FMAs' latency; the portable build scales a block into a buffer and takes dot
//   products.
//
// Rows that are a prompt's tokens (`prompt_rows`) take a third path where x is bfloat16 and the
// build has linear.cpp's matmul: see "Prompt rows" below.
//
// Rounding x to 8-bit integers instead, as llama.cpp does, raised the default model's perplexity
// by 3.5 % (docs/quantization.md). On the default model's own activations, rounding to 12 bits
// per 32 dimensions moves a projection's output by 0.4x what rounding x to bfloat16 does, 16 bits
// per 16 by 0.02x, 8 bits per 32 by 6x (benchmark/activation_rounding.py).

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include "amx_bf16.h"
#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

constexpr int64_t kCodeBlock = 32;
// Columns whose 4-byte words of codes make one 64-byte line in tile order (tile_order_codes).
constexpr int64_t kWordColumns = 16;
// The one group size that is not whole blocks: half a block (GGUF's Q6_K scales per 16).
constexpr int64_t kHalfBlock = kCodeBlock / 2;
constexpr int64_t kRowsPerPass = 4;
// Columns per thread at least: a decode step's smallest projections still split across threads.
constexpr int64_t kColumnGrain = 16;
// Tiles of columns ahead whose codes, scales and offsets the loops prefetch while they multiply
// one row. Each call starts with the hardware prefetcher cold (a decode step's other work runs
// between calls); one row of 8-bit and FP8 codes ran 1.4-1.5x as fast for the codes' prefetch,
// and 8-bit integers 1.65x as fast again for the scales' and offsets' (docs/quantization.md).
// The integer path also prefetches in the first pass of several rows over a block of columns,
// whose multiply-adds did not hide the loads: 4 rows ran 1.2-1.8x as fast with it, 32 rows up to
// 1.1x. Fetching 8 tiles ahead measured no better than 2.
constexpr int64_t kTilesAhead = 2;

// How a weight's codes are stored; the values match the Python side's CodeFormat.
enum class CodeFormat : int64_t { kUnsigned4 = 0, kSigned8 = 1, kFloat8 = 2, kLevels4 = 3 };

constexpr int64_t kLevelCount = 16;
// What an FP8 code's value is, times the half its bits make.
constexpr float kFloat8HalfScale = 256.f;

struct QuantizedMatrix {
  const uint8_t* codes;
  const float* scales;
  const float* offsets;  // Null: symmetric codes.
  const float* levels;   // kLevels4's 16 values; null for the other formats.
  CodeFormat format;
  int64_t group_size;
  int64_t in_features;
  // in_features / group_size, kept rather than divided for: a tile of columns asks for it
  // several times, and those divisions took about a fifth of one row's time.
  int64_t group_count;
  // Codes in tile order (tile_order_codes) rather than a column after another, and the
  // scales and offsets in groups of 16 columns, [N / 16][groups][16].
  bool tile_order = false;

  int64_t bits() const {
    return format == CodeFormat::kUnsigned4 || format == CodeFormat::kLevels4 ? 4 : 8;
  }
  // The factor between a code's unpacked value and its value: folded into each group's scale.
  float code_scale() const { return format == CodeFormat::kFloat8 ? kFloat8HalfScale : 1.f; }
  int64_t groups() const { return group_count; }
  int64_t blocks() const { return in_features / kCodeBlock; }
  int64_t block_bytes() const { return kCodeBlock * bits() / 8; }
  int64_t code_bytes_per_column() const { return in_features * bits() / 8; }
  // Column n's codes; in tile order, where its group of 16 columns' codes start (n a multiple
  // of 16), which are as many bytes.
  const uint8_t* column_codes(int64_t n) const { return codes + n * code_bytes_per_column(); }
  const float* column_scales(int64_t n) const { return scales + n * groups(); }
  // Where column n's scale (or offset) of group g lies.
  int64_t group_index(int64_t n, int64_t g) const {
    constexpr int64_t kGroupColumns = 16;
    if (!tile_order) return n * groups() + g;
    return (n - n % kGroupColumns) * groups() + g * kGroupColumns + n % kGroupColumns;
  }
  // Null without offsets.
  const float* column_offsets(int64_t n) const {
    return offsets != nullptr ? offsets + n * groups() : nullptr;
  }
};

// What the columns [n, n + columns) read (their codes, scales and offsets are each contiguous),
// loaded into cache a line at a time ahead of the loop that multiplies them: each step a line
// of codes (steps `step_bytes` apart), and in the first steps a line of scales and of offsets.
class TilePrefetch {
 public:
  TilePrefetch(const QuantizedMatrix& w, int64_t n, int64_t columns)
      : codes_(reinterpret_cast<const char*>(w.column_codes(n))),
        scales_(reinterpret_cast<const char*>(w.column_scales(n))),
        offsets_(reinterpret_cast<const char*>(w.column_offsets(n))),
        scale_bytes_(columns * w.groups() * static_cast<int64_t>(sizeof(float))) {}

  void step(int64_t index, int64_t step_bytes) const {
    constexpr int64_t kLineBytes = 64;
    __builtin_prefetch(codes_ + index * step_bytes);
    const int64_t scale_byte = index * kLineBytes;
    if (scale_byte >= scale_bytes_) return;
    __builtin_prefetch(scales_ + scale_byte);
    if (offsets_ != nullptr) __builtin_prefetch(offsets_ + scale_byte);
  }

 private:
  const char* codes_;
  const char* scales_;
  const char* offsets_;  // Null without offsets.
  int64_t scale_bytes_;
};

// The blocks of 32 codes in order, each with the group of its first half (a counter rather than a
// division per block): body(block index, group index). One call site, so that the body is
// inlined and its sums stay in registers.
template <typename Body>
inline void for_each_block(const QuantizedMatrix& w, Body&& body) {
  const bool half_groups = w.group_size == kHalfBlock;
  const int64_t blocks_per_group = half_groups ? 1 : w.group_size / kCodeBlock;
  const int64_t groups_per_step = half_groups ? 2 : 1;
  for (int64_t b = 0, g = 0, left = blocks_per_group; b < w.blocks(); ++b, --left) {
    if (left == 0) left = blocks_per_group, g += groups_per_step;
    body(b, g);
  }
}

// A block's two halves' scales (times the format's code_scale): its group's twice, or with
// groups of 16 (GGUF's Q6_K) each half's own.
struct HalfScales {
  float first, second;
};

inline HalfScales half_scales(const QuantizedMatrix& w, const float* column_scales, int64_t g) {
  const int64_t second = w.group_size == kHalfBlock ? g + 1 : g;
  return {column_scales[g] * w.code_scale(), column_scales[second] * w.code_scale()};
}

// Rows of x as float32 with their per-group sums, and y in x's dtype.
template <typename Out>
struct RowBlock {
  const float* x;
  const float* group_sums;  // [rows][groups]; null without offsets.
  Out* y;
  int64_t in_features;
  int64_t groups;
  int64_t out_features;
};

// Columns computed together for a pass of kRows rows: enough independent sums to keep the FMA
// units busy when there are few rows, without running out of registers when there are more.
template <int64_t kRows>
constexpr int64_t columns_per_pass() {
  return kRows == 1 ? 4 : kRows == 2 ? 2 : 1;
}

// An FP8 e4m3 code's sign, exponent and mantissa as a half's bits (its value / 2^8).
inline uint16_t float8_as_half(uint8_t code) {
  return static_cast<uint16_t>(((code & 0x7f) << 7) | ((code & 0x80) << 8));
}

// The portable path's unpacked values of one block of 32 codes (times the format's code_scale).
inline void unpack_block(const QuantizedMatrix& w, const uint8_t* codes, float* values) {
  switch (w.format) {
    case CodeFormat::kUnsigned4:
    case CodeFormat::kLevels4:
      for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
        const int low = codes[i] & 0x0f, high = codes[i] >> 4;
        const bool levels = w.format == CodeFormat::kLevels4;
        values[i] = levels ? w.levels[low] : static_cast<float>(low);
        values[i + kCodeBlock / 2] = levels ? w.levels[high] : static_cast<float>(high);
      }
      break;
    case CodeFormat::kSigned8:
      for (int64_t i = 0; i < kCodeBlock; ++i) {
        values[i] = static_cast<float>(static_cast<int8_t>(codes[i]));
      }
      break;
    case CodeFormat::kFloat8:
      for (int64_t i = 0; i < kCodeBlock; ++i) {
        values[i] = static_cast<float>(c10::Half(float8_as_half(codes[i]), c10::Half::from_bits()));
      }
      break;
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 32 codes as four vectors of 8 float32, in dimension order.
struct UnpackedBlock {
  __m256 values[4];
};

// kLevels4's table as two vectors of 8 levels.
struct LevelTable {
  __m256 low, high;
};

// Index bit 3 chooses the table's half: shifted to the sign bit, which blendv reads.
[[gnu::always_inline]] inline __m256 look_up(__m256i indexes, const LevelTable& table) {
  const __m256 low = _mm256_permutevar8x32_ps(table.low, indexes);
  const __m256 high = _mm256_permutevar8x32_ps(table.high, indexes);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(indexes, 28)));
}

[[gnu::always_inline]] inline UnpackedBlock unpack_nibbles_avx2(__m128i bytes,
                                                                const LevelTable* table) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_and_si128(bytes, mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i quarters[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
  UnpackedBlock block;
  for (int i = 0; i < 4; ++i) {
    const __m256i indexes = _mm256_cvtepu8_epi32(quarters[i]);
    block.values[i] = table ? look_up(indexes, *table) : _mm256_cvtepi32_ps(indexes);
  }
  return block;
}

[[gnu::always_inline]] inline UnpackedBlock unpack_float8_avx2(const uint8_t* codes) {
  UnpackedBlock block;
  for (int h = 0; h < 2; ++h) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * h));
    const __m256i wide = _mm256_cvtepu8_epi16(bytes);
    const __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x7f)), 7);
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x80)), 8);
    const __m256i halves = _mm256_or_si256(magnitude, sign);
    block.values[2 * h] = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
    block.values[2 * h + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  }
  return block;
}

// 32 8-bit integer codes, 16 in each half.
[[gnu::always_inline]] inline UnpackedBlock unpack_int8_avx2(__m128i first, __m128i second) {
  UnpackedBlock block;
  for (int i = 0; i < 4; ++i) {
    const __m128i half = i < 2 ? first : second;
    const __m128i bytes = i % 2 == 0 ? half : _mm_srli_si128(half, 8);
    block.values[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  return block;
}

[[gnu::always_inline]] inline UnpackedBlock unpack_block_avx2(const QuantizedMatrix& w,
                                                              const uint8_t* codes) {
  switch (w.format) {
    case CodeFormat::kUnsigned4:
      return unpack_nibbles_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)), nullptr);
    case CodeFormat::kLevels4: {
      const LevelTable table{_mm256_loadu_ps(w.levels), _mm256_loadu_ps(w.levels + 8)};
      return unpack_nibbles_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)), &table);
    }
    case CodeFormat::kFloat8:
      return unpack_float8_avx2(codes);
    case CodeFormat::kSigned8:
      break;
  }
  const auto* halves = reinterpret_cast<const __m128i*>(codes);
  return unpack_int8_avx2(_mm_loadu_si128(halves), _mm_loadu_si128(halves + 1));
}

// The block's values times their halves' scales (vectors 0-1 the first half, 2-3 the second).
[[gnu::always_inline]] inline void scale_block(const HalfScales& scale, UnpackedBlock& block) {
  const __m256 first = _mm256_set1_ps(scale.first), second = _mm256_set1_ps(scale.second);
  block.values[0] = _mm256_mul_ps(block.values[0], first);
  block.values[1] = _mm256_mul_ps(block.values[1], first);
  block.values[2] = _mm256_mul_ps(block.values[2], second);
  block.values[3] = _mm256_mul_ps(block.values[3], second);
}

inline float horizontal_sum(__m256 v) {
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// With AVX-512 a block's half (16 values) is one vector, each chain takes one FMA per block,
// table codes look their 16 levels up in one permute and FP8 codes widen 32 at a time.
// scaled_dots and panel_dots below sum in the same order as each other, which differs from the
// AVX2 loops' (as the integer path's order does), not in their values.
struct BlockHalves {
  __m512 values[2];
};

[[gnu::always_inline]] inline __m512 widen_codes(__m128i bytes, const QuantizedMatrix& w) {
  if (w.format == CodeFormat::kSigned8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  const __m512i indexes = _mm512_cvtepu8_epi32(bytes);
  if (w.format == CodeFormat::kLevels4) {
    return _mm512_permutexvar_ps(indexes, _mm512_loadu_ps(w.levels));
  }
  return _mm512_cvtepi32_ps(indexes);
}

// A block's 32 FP8 codes as float32: unpack_float8_avx2's halves, made 32 at a time.
[[gnu::always_inline]] inline void widen_float8(const uint8_t* codes, BlockHalves& block) {
  const __m512i wide =
      _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  const __m512i magnitude = _mm512_slli_epi16(_mm512_and_si512(wide, _mm512_set1_epi16(0x7f)), 7);
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(wide, _mm512_set1_epi16(0x80)), 8);
  const __m512i halves = _mm512_or_si512(magnitude, sign);
  block.values[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
  block.values[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
}

// A block's 32 codes as two vectors of 16 float32 in dimension order, times their halves'
// scales: the values unpack_block_avx2 and scale_block make.
[[gnu::always_inline]] inline BlockHalves scaled_block_avx512(const QuantizedMatrix& w,
                                                              const uint8_t* codes,
                                                              const HalfScales& scale) {
  BlockHalves block;
  if (w.format == CodeFormat::kFloat8) {
    widen_float8(codes, block);
  } else if (w.format == CodeFormat::kSigned8) {
    const auto* halves = reinterpret_cast<const __m128i*>(codes);
    block.values[0] = widen_codes(_mm_loadu_si128(halves), w);
    block.values[1] = widen_codes(_mm_loadu_si128(halves + 1), w);
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    block.values[0] = widen_codes(_mm_and_si128(bytes, mask), w);
    block.values[1] = widen_codes(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), w);
  }
  block.values[0] = _mm512_mul_ps(block.values[0], _mm512_set1_ps(scale.first));
  block.values[1] = _mm512_mul_ps(block.values[1], _mm512_set1_ps(scale.second));
  return block;
}

// The float32 path's vectors, per width: a block of 32 codes is kBlockVectors vectors of kLanes
// values, scaled (`scaled_vectors`), and each (row, column) sums into two chains, the block's
// first half and its second, whose sum `chains_sum` reduces. With AVX-512 a half is one vector.
using FloatVector = __m512;
using ScaledVectors = BlockHalves;
constexpr int kBlockVectors = 2;
constexpr int kBlockVectorOrder[kBlockVectors] = {0, 1};

[[gnu::always_inline]] inline FloatVector vector_zero() { return _mm512_setzero_ps(); }
[[gnu::always_inline]] inline FloatVector vector_load(const float* values) {
  return _mm512_loadu_ps(values);
}
[[gnu::always_inline]] inline FloatVector vector_fmadd(FloatVector a, FloatVector b,
                                                       FloatVector c) {
  return _mm512_fmadd_ps(a, b, c);
}
[[gnu::always_inline]] inline ScaledVectors scaled_vectors(const QuantizedMatrix& w,
                                                           const uint8_t* codes,
                                                           const HalfScales& scale) {
  return scaled_block_avx512(w, codes, scale);
}
inline float chains_sum(FloatVector first, FloatVector second) {
  return _mm512_reduce_add_ps(_mm512_add_ps(first, second));
}
#else
// With AVX2 a half is two vectors, multiplied in the order of kBlockVectorOrder: the two chains'
// first vectors, then their second, so that consecutive FMAs do not wait on each other. (Each
// chain's own order, and so the result, is the same in any order of the chains.)
using FloatVector = __m256;
using ScaledVectors = UnpackedBlock;
constexpr int kBlockVectors = 4;
constexpr int kBlockVectorOrder[kBlockVectors] = {0, 2, 1, 3};

[[gnu::always_inline]] inline FloatVector vector_zero() { return _mm256_setzero_ps(); }
[[gnu::always_inline]] inline FloatVector vector_load(const float* values) {
  return _mm256_loadu_ps(values);
}
[[gnu::always_inline]] inline FloatVector vector_fmadd(FloatVector a, FloatVector b,
                                                       FloatVector c) {
  return _mm256_fmadd_ps(a, b, c);
}
[[gnu::always_inline]] inline ScaledVectors scaled_vectors(const QuantizedMatrix& w,
                                                           const uint8_t* codes,
                                                           const HalfScales& scale) {
  UnpackedBlock block = unpack_block_avx2(w, codes);
  scale_block(scale, block);
  return block;
}
inline float chains_sum(FloatVector first, FloatVector second) {
  return horizontal_sum(_mm256_add_ps(first, second));
}
#endif
constexpr int64_t kLanes = kCodeBlock / kBlockVectors;
// The chain a block's vector i sums into.
constexpr int chain_of(int i) { return i / (kBlockVectors / 2); }

// kRows rows of x (from `x`) against kCols columns (from n): sum_g scale * sum(code * x), the
// codes scaled once per block of 32 and shared by the rows. Each (row, column) sums into its two
// chains in the same order whatever kRows and kCols are, so that a row's output does not depend
// on its batch; the kRows * kCols pairs' chains are independent, which hides the FMAs' latency.
// The order differs between the widths (as the integer path's does), not the values.
template <int64_t kRows, int64_t kCols>
[[gnu::always_inline]] inline void scaled_dots(const QuantizedMatrix& w, const float* x,
                                               int64_t in_features, int64_t n,
                                               float (&dots)[kRows][kCols]) {
  FloatVector totals[kRows][kCols][2];
  for (auto& row : totals) {
    for (auto& column : row) {
      for (auto& total : column) total = vector_zero();
    }
  }
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.column_scales(n);
  const TilePrefetch ahead(w, n + kTilesAhead * kCols, kCols);
  for_each_block(w, [&](int64_t b, int64_t g) {
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) {
      const uint8_t* block_codes = codes + c * w.code_bytes_per_column() + b * w.block_bytes();
      if constexpr (kRows == 1) ahead.step(kCols * b + c, w.block_bytes());
      const ScaledVectors weights =
          scaled_vectors(w, block_codes, half_scales(w, scales + c * w.groups(), g));
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const float* xr = x + r * in_features + b * kCodeBlock;
#pragma GCC unroll 4
        for (const int i : kBlockVectorOrder) {
          FloatVector& total = totals[r][c][chain_of(i)];
          total = vector_fmadd(weights.values[i], vector_load(xr + kLanes * i), total);
        }
      }
    }
  });
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) dots[r][c] = chains_sum(totals[r][c][0], totals[r][c][1]);
  }
}

// The panel path, for many rows of table codes (NF4, FP4), whose lookups cost the most to
// unpack, and with AVX-512 of FP8 codes: a few columns' codes unpacked and scaled once into a
// buffer (the panel, [columns][K] float32) that every row then reads, instead of once per pass
// of 4 rows. The panel holds the very vectors scaled_dots computes in registers, and panel_dots
// sums them in scaled_dots' order, so a row's output has the same bits on either path: choosing
// the path by the number of rows keeps a request's output independent of its batch. (For the
// other formats, whose codes unpack in a few instructions, the panel measured no faster with
// AVX2: reading it back from the caches costs about what unpacking does. With AVX-512's FMAs
// twice as wide, unpacking FP8 costs more: 32 rows took 46 ms through the panel against 77.)
constexpr int64_t kPanelColumns = 2;
constexpr int64_t kPanelRows = 3;
// Rows from which filling a panel costs less than unpacking table codes once per 4 rows.
constexpr int64_t kPanelMinRows = 8;

inline bool takes_panel_path(const QuantizedMatrix& w, int64_t row_count) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const bool panel_format = w.format == CodeFormat::kLevels4 || w.format == CodeFormat::kFloat8;
#else
  const bool panel_format = w.format == CodeFormat::kLevels4;
#endif
  return panel_format && row_count >= kPanelMinRows;
}

inline void fill_panel(const QuantizedMatrix& w, int64_t n, int64_t columns, float* panel) {
  for (int64_t c = 0; c < columns; ++c) {
    const uint8_t* codes = w.column_codes(n + c);
    const float* scales = w.column_scales(n + c);
    float* column = panel + c * w.in_features;
    for_each_block(w, [&](int64_t b, int64_t g) {
      UnpackedBlock weights = unpack_block_avx2(w, codes + b * w.block_bytes());
      scale_block(half_scales(w, scales, g), weights);
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(column + b * kCodeBlock + 8 * i, weights.values[i]);
      }
    });
  }
}

// kRows rows of x against the panel's kCols columns: scaled_dots' sums, read from the panel.
// Each weight vector loaded serves kRows rows and each x vector kCols columns.
template <int64_t kRows, int64_t kCols>
inline void panel_dots(const float* panel, const float* x, int64_t in_features,
                       float (&dots)[kRows][kCols]) {
  FloatVector totals[kRows][kCols][2];
  for (auto& row : totals) {
    for (auto& column : row) {
      for (auto& total : column) total = vector_zero();
    }
  }
  for (int64_t k = 0; k < in_features; k += kCodeBlock) {
#pragma GCC unroll 4
    for (const int i : kBlockVectorOrder) {
      FloatVector weights[kCols];
      for (int c = 0; c < kCols; ++c) {
        weights[c] = vector_load(panel + c * in_features + k + kLanes * i);
      }
      for (int r = 0; r < kRows; ++r) {
        const FloatVector xr = vector_load(x + r * in_features + k + kLanes * i);
        for (int c = 0; c < kCols; ++c) {
          FloatVector& total = totals[r][c][chain_of(i)];
          total = vector_fmadd(weights[c], xr, total);
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) dots[r][c] = chains_sum(totals[r][c][0], totals[r][c][1]);
  }
}
#else
template <int64_t kRows, int64_t kCols>
inline void scaled_dots(const QuantizedMatrix& w, const float* x, int64_t in_features, int64_t n,
                        float (&dots)[kRows][kCols]) {
  float values[kCodeBlock];
  for (int c = 0; c < kCols; ++c) {
    const uint8_t* codes = w.column_codes(n + c);
    const float* scales = w.column_scales(n + c);
    for (int r = 0; r < kRows; ++r) dots[r][c] = 0.f;
    for_each_block(w, [&](int64_t b, int64_t g) {
      unpack_block(w, codes + b * w.block_bytes(), values);
      const HalfScales scale = half_scales(w, scales, g);
      for (int64_t i = 0; i < kCodeBlock; ++i) {
        values[i] *= i < kHalfBlock ? scale.first : scale.second;
      }
      for (int r = 0; r < kRows; ++r) {
        dots[r][c] += dot(values, x + r * in_features + b * kCodeBlock, kCodeBlock);
      }
    });
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The dot product of a column's offsets and a row's group sums: a few dozen values, for which
// the generic loop's remainder and reduction cost more than its vector body.
inline float short_dot(const float* a, const float* b, int64_t count) {
  alignas(32) static constexpr int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                    0,  0,  0,  0,  0,  0,  0,  0};
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    sum = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), sum);
  }
  if (i < count) {
    const auto* tail = reinterpret_cast<const __m256i*>(kMask + 8 - (count - i));
    const __m256i mask = _mm256_loadu_si256(tail);
    sum = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, mask), _mm256_maskload_ps(b + i, mask), sum);
  }
  return horizontal_sum(sum);
}
#else
inline float short_dot(const float* a, const float* b, int64_t count) { return dot(a, b, count); }
#endif

// y[row .. row + kRows][n .. n + kCols] from the scaled dots: plus the offsets' and bias's terms.
template <int64_t kRows, int64_t kCols, typename Out>
inline void store_tile(const QuantizedMatrix& w, const RowBlock<Out>& block, const float* bias,
                       int64_t row, int64_t n, const float (&dots)[kRows][kCols]) {
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      float value = dots[r][c] + (bias ? bias[n + c] : 0.f);
      if (w.offsets != nullptr) {
        const float* offsets = w.column_offsets(n + c);
        value += short_dot(offsets, block.group_sums + (row + r) * block.groups, block.groups);
      }
      block.y[(row + r) * block.out_features + n + c] = from_float<Out>(value);
    }
  }
}

template <int64_t kRows, int64_t kCols, typename Out>
inline void quantized_tile(const QuantizedMatrix& w, const RowBlock<Out>& block,
                           const float* bias, int64_t row, int64_t n) {
  float dots[kRows][kCols];
  scaled_dots<kRows, kCols>(w, block.x + row * block.in_features, block.in_features, n, dots);
  store_tile<kRows, kCols>(w, block, bias, row, n, dots);
}

// y[row .. row + kRows] for columns [begin, end).
template <int64_t kRows, typename Out>
void quantized_columns(const QuantizedMatrix& w, const RowBlock<Out>& block, const float* bias,
                       int64_t row, int64_t begin, int64_t end) {
  constexpr int64_t kCols = columns_per_pass<kRows>();
  int64_t n = begin;
  for (; n + kCols <= end; n += kCols) quantized_tile<kRows, kCols>(w, block, bias, row, n);
  for (; n < end; ++n) quantized_tile<kRows, 1>(w, block, bias, row, n);
}

// x's rows as float32 (x itself where it is float32) and, for weights with offsets, each row's
// sums per group.
struct FloatRows {
  const float* data;
  std::vector<float> widened;
  std::vector<float> group_sums;
};

template <typename T>
void widen_rows(const T* x, int64_t rows, int64_t in_features, const QuantizedMatrix& w,
                FloatRows& out) {
  if constexpr (!std::is_same_v<T, float>) {
    out.widened.resize(rows * in_features);
    out.data = out.widened.data();
  } else {
    out.data = x;
  }
  if (w.offsets != nullptr) out.group_sums.resize(rows * w.groups());
  at::parallel_for(0, rows, grain_for(in_features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (!std::is_same_v<T, float>) {
        widen(x + r * in_features, out.widened.data() + r * in_features, in_features);
      }
      if (w.offsets == nullptr) continue;
      const float* row = out.data + r * in_features;
      for (int64_t g = 0; g < w.groups(); ++g) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < w.group_size; ++i) sum += row[g * w.group_size + i];
        out.group_sums[r * w.groups() + g] = sum;
      }
    }
  });
}

// ---- The integer path: integer codes (kUnsigned4, kSigned8) times x rounded to integers.
//
// A chunk of a column's codes (64 bytes with AVX-512, 32 otherwise) is read as lanes of 16 bits;
// each lane holds 4 codes (4-bit) or 2 (8-bit), and code v of every lane, isolated by shifts and
// masks (no shuffles), makes the chunk's vector v of integers. vpmaddwd (or AVX512-VNNI's
// vpdpwssd, which also adds) multiplies each vector by int16 activations and adds pairs into
// 32-bit sums, exactly. The activations are each row's x, rounded per run of 8 lanes (32
// dimensions for 4-bit codes, 16 for 8-bit) to integers at a scale of the run's largest
// magnitude / 32767 for 8-bit codes (16 bits), / 2047 for 4-bit codes (12 bits, which AMX
// multiplies in one instruction: see "Integer codes where the CPU has AMX"). 12 bits keep
// x within 2^-12 of that magnitude: coarser than bfloat16 for values more than 2^3 below it, yet
// a projection's output moves by 0.4x what bfloat16 activations move it (see the top).
// Each row is rounded in a layout matching the lanes (`ChunkLayout::dim`) once per call, and
// every column reads it. Threads work through blocks of columns whose codes fit L2, each block
// multiplied by 4 rows at a time (x in L1).
//
// Each run's lanes make 4 of the 32-bit sums, so each sum belongs to one run: it becomes float32
// and is scaled by its run's weight scale times its x scale, in the same order whatever rows and
// columns a pass computes. (4-bit codes with groups of 16, which would split a run, keep the
// float32 path.) With AVX-512 a chunk is twice as wide, so one instruction does twice the work;
// that changes the order of a row's float32 sums from the AVX2 build's, not their run lengths.

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SLUICE_INTEGER_AVX512 1
constexpr int64_t kChunkLanes = 32;
#else
constexpr int64_t kChunkLanes = 16;
#endif
constexpr int64_t kChunkBytes = 2 * kChunkLanes;
constexpr int64_t kRunLanes = 8;
constexpr int64_t kRunsPerChunk = kChunkLanes / kRunLanes;
// A run's 32-bit sums, and so the copies of its scales the vector code multiplies them by.
constexpr int64_t kSumsPerRun = 4;
constexpr int64_t kSumsPerChunk = kRunsPerChunk * kSumsPerRun;
constexpr float kInt16Max = 32767.f;
constexpr float kInt12Max = 2047.f;
// Columns a pass multiplies at once: independent sums, and a tile's setup and final sums shared
// by more columns. With a few hundred dimensions, one row ran 10-20 % faster with 4 than with 2
// (8 was slower), and 32 rows about 10 % faster with 4 than with 1.
constexpr int64_t kIntegerTileColumns = 4;
// Bytes of codes, scales and offsets a thread's block of columns holds: they stay in L2 while
// each pass of 4 rows, whose x stays in L1, reads them.
constexpr int64_t kIntegerBlockBytes = 256 * 1024;

inline bool takes_integer_path(const QuantizedMatrix& w) {
  return w.format == CodeFormat::kSigned8 ||
         (w.format == CodeFormat::kUnsigned4 && w.group_size % kCodeBlock == 0);
}

// Which dimension each code of a chunk multiplies.
struct ChunkLayout {
  int64_t vectors;  // Codes per 16-bit lane: 4 (4-bit codes) or 2.

  explicit ChunkLayout(const QuantizedMatrix& w) : vectors(w.bits() == 4 ? 4 : 2) {}
  // The largest integer x is rounded to.
  float largest() const { return vectors == 4 ? kInt12Max : kInt16Max; }
  int64_t dims() const { return vectors * kChunkLanes; }
  int64_t run_dims() const { return vectors * kRunLanes; }
  // The dimension, within the chunk, of lane j's code v. 4-bit: the chunk is blocks of 16 bytes
  // (lanes 0-7, 8-15, ...), each byte's low nibble the block's dimension i and high one i + 16,
  // so bits 0-3, 4-7, 8-11, 12-15 of the lane (bytes 2j, 2j + 1) hold i, i + 16, i + 1, i + 17.
  // 8-bit: the lane's low byte is dimension 2j, its high byte 2j + 1.
  int64_t dim(int64_t v, int64_t j) const {
    if (vectors == 2) return 2 * j + v;
    return kCodeBlock * (j / 8) + kHalfBlock * (v % 2) + 2 * (j % 8) + v / 2;
  }
};

// Each row of x rounded to int16 in the lanes' order, chunk by chunk, with each run's scale
// (kSumsPerRun times, as the vector code multiplies it).
struct IntegerRows {
  std::vector<int16_t> values;  // [rows][chunks][vectors][kChunkLanes]
  std::vector<float> scales;    // [rows][chunks][kSumsPerChunk]
  int64_t chunks;
  int64_t dims_per_row;  // chunks * the chunk's dimensions: x padded with zeros to whole chunks.
  // x's float32 sums per group, [rows][groups] (the RowBlock's), for the offsets' terms; null
  // without offsets.
  const float* group_sums = nullptr;
  int64_t groups = 0;

  const int16_t* row_values(int64_t r) const { return values.data() + r * dims_per_row; }
  const float* row_scales(int64_t r) const { return scales.data() + r * chunks * kSumsPerChunk; }
  const float* row_group_sums(int64_t r) const {
    return group_sums != nullptr ? group_sums + r * groups : nullptr;
  }
};

// Rounds one run of x (layout.run_dims() values from `x`) into its lanes of the chunk's vectors,
// `lanes` pointing at the run's first lane in vector 0, and returns the run's scale: its largest
// magnitude / 32767, or NaN if it holds a NaN or infinity, which then reaches the output as the
// float32 path's would.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// A run is one or two halves of 16 dimensions whose even and odd ones make the vectors' lanes
// (ChunkLayout::dim): with 4-bit codes vector v holds half v % 2's, with 8-bit codes the one
// half's, even ones for v < 2 and odd ones after. Written with intrinsics because the compiler
// made the strided loads, the reductions and the clamps scalar: rounding a row took as long as
// multiplying it by a few dozen columns.
inline float round_run(const ChunkLayout& layout, const float* x, int16_t* lanes) {
  const int64_t halves = layout.vectors / 2;
  __m256 parts[4];  // [vector]
  for (int64_t h = 0; h < halves; ++h) {
    const __m256 first = _mm256_loadu_ps(x + 16 * h), second = _mm256_loadu_ps(x + 16 * h + 8);
    // Per 128-bit lane the even (odd) ones of first, then of second; the 64-bit permute puts the
    // four pairs in order.
    const auto in_order = [](__m256 v) {
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
    };
    parts[h] = in_order(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0)));
    parts[h + halves] = in_order(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 infinity = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 largest = _mm256_setzero_ps(), not_finite = _mm256_setzero_ps();
  for (int64_t v = 0; v < layout.vectors; ++v) {
    const __m256 magnitude = _mm256_andnot_ps(sign, parts[v]);
    not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(magnitude, infinity, _CMP_NLT_UQ));
    largest = _mm256_max_ps(largest, magnitude);
  }
  __m128 half_max = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  half_max = _mm_max_ps(half_max, _mm_movehl_ps(half_max, half_max));
  half_max = _mm_max_ss(half_max, _mm_movehdup_ps(half_max));
  const float scale = _mm256_movemask_ps(not_finite) != 0
                          ? std::numeric_limits<float>::quiet_NaN()
                          : _mm_cvtss_f32(half_max) / layout.largest();
  const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  const __m256 limit = _mm256_set1_ps(layout.largest());
  for (int64_t v = 0; v < layout.vectors; ++v) {
    // Rounding in the current direction (to nearest) is nearbyint's.
    __m256 rounded = _mm256_round_ps(_mm256_mul_ps(parts[v], inverse),
                                     _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    rounded = _mm256_min_ps(_mm256_max_ps(rounded, _mm256_xor_ps(limit, sign)), limit);
    const __m256i words = _mm256_cvtps_epi32(rounded);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes + v * kChunkLanes),
                     _mm_packs_epi32(_mm256_castsi256_si128(words),
                                     _mm256_extracti128_si256(words, 1)));
  }
  return scale;
}
#else
// x times `inverse`, rounded to an integer (to nearest, saturating at +-largest).
inline int16_t round_to_int16(float x, float inverse, float largest) {
  const float rounded = std::nearbyint(x * inverse);
  return static_cast<int16_t>(std::min(std::max(rounded, -largest), largest));
}

inline float round_run(const ChunkLayout& layout, const float* x, int16_t* lanes) {
  float largest = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < layout.run_dims(); ++i) {
    largest = std::max(largest, std::fabs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  const float scale =
      finite ? largest / layout.largest() : std::numeric_limits<float>::quiet_NaN();
  const float inverse = scale > 0.f ? 1.f / scale : 0.f;
  for (int64_t v = 0; v < layout.vectors; ++v) {
    for (int64_t j = 0; j < kRunLanes; ++j) {
      lanes[v * kChunkLanes + j] = round_to_int16(x[layout.dim(v, j)], inverse, layout.largest());
    }
  }
  return scale;
}
#endif

IntegerRows round_rows(const QuantizedMatrix& w, const float* x, int64_t row_count) {
  const ChunkLayout layout(w);
  IntegerRows rows;
  rows.chunks = (w.in_features + layout.dims() - 1) / layout.dims();
  rows.dims_per_row = rows.chunks * layout.dims();
  rows.values.resize(row_count * rows.dims_per_row);
  rows.scales.resize(row_count * rows.chunks * kSumsPerChunk);
  at::parallel_for(0, row_count, grain_for(w.in_features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * w.in_features;
      for (int64_t c = 0; c < rows.chunks; ++c) {
        const int64_t first = c * layout.dims();
        float* scales = rows.scales.data() + (r * rows.chunks + c) * kSumsPerChunk;
        int16_t* lanes = rows.values.data() + r * rows.dims_per_row + first;
        for (int64_t run = 0; run < kRunsPerChunk; ++run) {
          // in_features is whole runs; those past it keep the zeros resize() wrote.
          const int64_t start = first + run * layout.run_dims();
          if (start >= w.in_features) break;
          const float scale = round_run(layout, row + start, lanes + run * kRunLanes);
          std::fill_n(scales + kSumsPerRun * run, kSumsPerRun, scale);
        }
      }
    }
  });
  return rows;
}

// Each chunk's runs' groups, as indexes into a column's scales: the first run's group, and per
// 32-bit sum its run's group less that one. (A run past in_features, whose codes are zeros, takes
// the last group.)
struct alignas(64) ChunkGroups {
  int32_t sum_groups[kSumsPerChunk];
  int64_t first;
  int64_t span;  // Groups from the first run's to the last's.

  int64_t run_group(int64_t run) const { return first + sum_groups[kSumsPerRun * run]; }
};

std::vector<ChunkGroups> chunk_groups(const QuantizedMatrix& w, const IntegerRows& x) {
  const ChunkLayout layout(w);
  std::vector<ChunkGroups> groups(x.chunks);
  for (int64_t c = 0; c < x.chunks; ++c) {
    ChunkGroups& chunk = groups[c];
    chunk.first = c * layout.dims() / w.group_size;
    for (int64_t run = 0; run < kRunsPerChunk; ++run) {
      const int64_t dim = std::min(c * layout.dims() + run * layout.run_dims(), w.in_features - 1);
      const int64_t group = dim / w.group_size;
      std::fill(chunk.sum_groups + kSumsPerRun * run, chunk.sum_groups + kSumsPerRun * (run + 1),
                static_cast<int32_t>(group - chunk.first));
      chunk.span = group - chunk.first + 1;
    }
  }
  return groups;
}

// Where a tile's columns' codes, scales and offsets, and its rows' rounded x, x scales and
// group sums, start.
template <int64_t kRows, int64_t kCols>
struct TileOperands {
  const uint8_t* codes[kCols];
  const float* scales[kCols];
  const float* offsets[kCols];  // Null without offsets.
  const int16_t* values[kRows];
  const float* x_scales[kRows];
  const float* group_sums[kRows];

  TileOperands(const QuantizedMatrix& w, const IntegerRows& x, int64_t row, int64_t n) {
    for (int64_t k = 0; k < kCols; ++k) {
      codes[k] = w.column_codes(n + k);
      scales[k] = w.column_scales(n + k);
      offsets[k] = w.column_offsets(n + k);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      values[r] = x.row_values(row + r);
      x_scales[r] = x.row_scales(row + r);
      group_sums[r] = x.row_group_sums(row + r);
    }
  }
};

#if defined(SLUICE_INTEGER_AVX512)
// A chunk's vectors of codes; bytes past `valid` (in the last chunk) read as zeros.
template <int kVectors>
[[gnu::always_inline]] inline void chunk_codes(const uint8_t* bytes, __mmask64 valid,
                                               __m512i (&codes)[kVectors]) {
  const __m512i lanes = _mm512_maskz_loadu_epi8(valid, bytes);
  if constexpr (kVectors == 4) {
    const __m512i nibble = _mm512_set1_epi16(0x0f);
    codes[0] = _mm512_and_si512(lanes, nibble);
    codes[1] = _mm512_and_si512(_mm512_srli_epi16(lanes, 4), nibble);
    codes[2] = _mm512_and_si512(_mm512_srli_epi16(lanes, 8), nibble);
    codes[3] = _mm512_srli_epi16(lanes, 12);
  } else {
    codes[0] = _mm512_srai_epi16(_mm512_slli_epi16(lanes, 8), 8);
    codes[1] = _mm512_srai_epi16(lanes, 8);
  }
}

// sums + the pairwise products of a and b, added in pairs: exact 32-bit integers either way.
[[gnu::always_inline]] inline __m512i add_products(__m512i sums, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(sums, a, b);
#else
  return _mm512_add_epi32(sums, _mm512_madd_epi16(a, b));
#endif
}

// The offsets' terms, sum_g offset[n][g] * x's sum over group g, are added to each (row, column)
// sum after its codes' terms: kLanes groups per FMA, in lanes the final sum adds up. Both
// operands are contiguous, each column's offsets read once for all the tile's rows, and the
// order is the same whatever rows and columns the tile holds.
template <int64_t kRows, int64_t kCols>
inline void add_offset_terms(int64_t groups, const TileOperands<kRows, kCols>& tile,
                             __m512 (&totals)[kRows][kCols]) {
  constexpr int64_t kLanes = 16;
  for (int64_t g = 0; g < groups; g += kLanes) {
    const __mmask16 valid = static_cast<__mmask16>(
        groups - g >= kLanes ? 0xffff : (1u << (groups - g)) - 1);
    __m512 offsets[kCols];
    for (int64_t k = 0; k < kCols; ++k) {
      offsets[k] = _mm512_maskz_loadu_ps(valid, tile.offsets[k] + g);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 sums = _mm512_maskz_loadu_ps(valid, tile.group_sums[r] + g);
      for (int64_t k = 0; k < kCols; ++k) {
        totals[r][k] = _mm512_fmadd_ps(offsets[k], sums, totals[r][k]);
      }
    }
  }
}

// kRows rows against kCols columns from n: sum over chunks and runs of the integer sums times
// the run's weight scale times its x scale, plus the offsets' terms.
template <int kVectors, int64_t kRows, int64_t kCols>
inline void integer_dots(const QuantizedMatrix& w, const IntegerRows& x,
                         const ChunkGroups* groups, int64_t row, int64_t n,
                         float (&dots)[kRows][kCols]) {
  const int64_t dims = ChunkLayout(w).dims();
  const TileOperands<kRows, kCols> tile(w, x, row, n);
  __m512 totals[kRows][kCols];
  for (auto& row_totals : totals) {
    for (auto& total : row_totals) total = _mm512_setzero_ps();
  }
  const int64_t last_bytes = w.code_bytes_per_column() - (x.chunks - 1) * kChunkBytes;
  const __mmask64 last_valid = last_bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << last_bytes) - 1;
  // Only on the first pass over a block, which reads its codes from memory: later ones find
  // them in L2.
  const bool fetch_ahead = row == 0;
  const TilePrefetch ahead(w, n + kTilesAhead * kCols, kCols);
  for (int64_t c = 0; c < x.chunks; ++c) {
    const __mmask64 valid = c + 1 < x.chunks ? ~__mmask64{0} : last_valid;
    const ChunkGroups& chunk = groups[c];
    const __m512i sum_groups = _mm512_load_si512(chunk.sum_groups);
    const __mmask16 span = static_cast<__mmask16>((1u << chunk.span) - 1);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kCols; ++k) {
      if (fetch_ahead) ahead.step(kCols * c + k, kChunkBytes);
      __m512i column_codes[kVectors];
      chunk_codes<kVectors>(tile.codes[k] + c * kChunkBytes, valid, column_codes);
      const __m512 weight_scales = _mm512_permutexvar_ps(
          sum_groups, _mm512_maskz_loadu_ps(span, tile.scales[k] + chunk.first));
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const auto* row_values = reinterpret_cast<const __m512i*>(tile.values[r] + c * dims);
        // Two chains of sums, which halves the wait on vpdpwssd's latency.
        __m512i chains[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int v = 0; v < kVectors; ++v) {
          chains[v % 2] =
              add_products(chains[v % 2], column_codes[v], _mm512_loadu_si512(row_values + v));
        }
        const __m512i sums = _mm512_add_epi32(chains[0], chains[1]);
        const __m512 x_scales = _mm512_loadu_ps(tile.x_scales[r] + kSumsPerChunk * c);
        const __m512 scale = _mm512_mul_ps(weight_scales, x_scales);
        totals[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, totals[r][k]);
      }
    }
  }
  if (w.offsets != nullptr) add_offset_terms(w.groups(), tile, totals);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kCols; ++k) dots[r][k] = _mm512_reduce_add_ps(totals[r][k]);
  }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// A chunk's vectors of codes (4-bit: the last chunk may be half, its second half then zeros).
template <int kVectors>
inline void chunk_codes(const uint8_t* bytes, bool half, __m256i (&codes)[kVectors]) {
  const __m256i lanes =
      half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)))
           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  if constexpr (kVectors == 4) {
    const __m256i nibble = _mm256_set1_epi16(0x0f);
    codes[0] = _mm256_and_si256(lanes, nibble);
    codes[1] = _mm256_and_si256(_mm256_srli_epi16(lanes, 4), nibble);
    codes[2] = _mm256_and_si256(_mm256_srli_epi16(lanes, 8), nibble);
    codes[3] = _mm256_srli_epi16(lanes, 12);
  } else {
    codes[0] = _mm256_srai_epi16(_mm256_slli_epi16(lanes, 8), 8);
    codes[1] = _mm256_srai_epi16(lanes, 8);
  }
}

// The chunk's 32-bit sums of code * x for one row: lanes 0-3 the first run's, 4-7 the second's.
template <int kVectors>
inline __m256i chunk_sums(const __m256i (&codes)[kVectors], const int16_t* x) {
  const auto product = [&](int v) {
    const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x) + v);
    return _mm256_madd_epi16(codes[v], values);
  };
  if constexpr (kVectors == 4) {
    return _mm256_add_epi32(_mm256_add_epi32(product(0), product(1)),
                            _mm256_add_epi32(product(2), product(3)));
  } else {
    return _mm256_add_epi32(product(0), product(1));
  }
}

// The offsets' terms (see the AVX-512 version above), 8 groups per FMA.
template <int64_t kRows, int64_t kCols>
inline void add_offset_terms(int64_t groups, const TileOperands<kRows, kCols>& tile,
                             __m256 (&totals)[kRows][kCols]) {
  constexpr int64_t kLanes = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < groups; g += kLanes) {
    const __m256i valid = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int32_t>(std::min(kLanes, groups - g))), lane);
    __m256 offsets[kCols];
    for (int64_t k = 0; k < kCols; ++k) {
      offsets[k] = _mm256_maskload_ps(tile.offsets[k] + g, valid);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const __m256 sums = _mm256_maskload_ps(tile.group_sums[r] + g, valid);
      for (int64_t k = 0; k < kCols; ++k) {
        totals[r][k] = _mm256_fmadd_ps(offsets[k], sums, totals[r][k]);
      }
    }
  }
}

// kRows rows against kCols columns from n: sum over chunks and runs of the integer sums times
// the run's weight scale times its x scale, plus the offsets' terms.
template <int kVectors, int64_t kRows, int64_t kCols>
inline void integer_dots(const QuantizedMatrix& w, const IntegerRows& x,
                         const ChunkGroups* groups, int64_t row, int64_t n,
                         float (&dots)[kRows][kCols]) {
  const int64_t dims = ChunkLayout(w).dims();
  const TileOperands<kRows, kCols> tile(w, x, row, n);
  __m256 totals[kRows][kCols];
  for (auto& row_totals : totals) {
    for (auto& total : row_totals) total = _mm256_setzero_ps();
  }
  const auto chunk = [&](int64_t c, bool half) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int64_t k = 0; k < kCols; ++k) {
      __m256i column_codes[kVectors];
      chunk_codes<kVectors>(tile.codes[k] + c * kChunkBytes, half, column_codes);
      const float* scales = tile.scales[k];
      const __m256 weight_scales = _mm256_set_m128(_mm_set1_ps(scales[groups[c].run_group(1)]),
                                                   _mm_set1_ps(scales[groups[c].run_group(0)]));
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const __m256i sums = chunk_sums<kVectors>(column_codes, tile.values[r] + c * dims);
        const __m256 x_scales = _mm256_loadu_ps(tile.x_scales[r] + kSumsPerChunk * c);
        const __m256 scale = _mm256_mul_ps(weight_scales, x_scales);
        totals[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, totals[r][k]);
      }
    }
  };
  const bool half_last = x.dims_per_row != w.in_features;
  const int64_t whole = half_last ? x.chunks - 1 : x.chunks;
  // Only on the first pass over a block, which reads its codes from memory: later ones find
  // them in L2.
  const bool fetch_ahead = row == 0;
  const TilePrefetch ahead(w, n + kTilesAhead * kCols, kCols);
  for (int64_t c = 0; c < whole; ++c) {
    for (int64_t k = 0; k < kCols && fetch_ahead; ++k) ahead.step(kCols * c + k, kChunkBytes);
    chunk(c, false);
  }
  if (half_last) chunk(whole, true);
  if (w.offsets != nullptr) add_offset_terms(w.groups(), tile, totals);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kCols; ++k) dots[r][k] = horizontal_sum(totals[r][k]);
  }
}
#else
// One run's products, summed exactly, from the lanes as the vector paths isolate them.
template <int kVectors>
inline int32_t run_sum(const uint8_t* bytes, const int16_t* x, int64_t run) {
  int32_t sum = 0;
  for (int64_t j = kRunLanes * run; j < kRunLanes * (run + 1); ++j) {
    const uint16_t lane = static_cast<uint16_t>(bytes[2 * j] | (bytes[2 * j + 1] << 8));
    for (int v = 0; v < kVectors; ++v) {
      const int32_t code = kVectors == 4 ? (lane >> (4 * v)) & 0x0f
                                         : static_cast<int8_t>(lane >> (8 * v));
      sum += code * x[v * kChunkLanes + j];
    }
  }
  return sum;
}

template <int kVectors, int64_t kRows, int64_t kCols>
inline void integer_dots(const QuantizedMatrix& w, const IntegerRows& x,
                         const ChunkGroups* groups, int64_t row, int64_t n,
                         float (&dots)[kRows][kCols]) {
  const ChunkLayout layout(w);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kCols; ++k) dots[r][k] = 0.f;
  }
  for (int64_t c = 0; c < x.chunks; ++c) {
    // Runs past in_features: their codes are not stored.
    const int64_t runs =
        std::min(kRunsPerChunk, (w.in_features - c * layout.dims()) / layout.run_dims());
    for (int64_t k = 0; k < kCols; ++k) {
      const uint8_t* bytes = w.column_codes(n + k) + c * kChunkBytes;
      const float* scales = w.column_scales(n + k);
      for (int64_t r = 0; r < kRows; ++r) {
        const int16_t* values = x.row_values(row + r) + c * layout.dims();
        const float* x_scales = x.row_scales(row + r) + kSumsPerChunk * c;
        for (int64_t run = 0; run < runs; ++run) {
          const int32_t sum = run_sum<kVectors>(bytes, values, run);
          const float scale = scales[groups[c].run_group(run)] * x_scales[kSumsPerRun * run];
          dots[r][k] += static_cast<float>(sum) * scale;
        }
      }
    }
  }
  if (w.offsets == nullptr) return;
  const TileOperands<kRows, kCols> tile(w, x, row, n);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t k = 0; k < kCols; ++k) {
      for (int64_t g = 0; g < w.groups(); ++g) {
        dots[r][k] = std::fma(tile.offsets[k][g], tile.group_sums[r][g], dots[r][k]);
      }
    }
  }
}
#endif

// What one integer-path call computes from: the weight, x rounded, the chunks' groups, and y.
template <typename Out>
struct IntegerCall {
  const QuantizedMatrix& w;
  const IntegerRows& x;
  const ChunkGroups* groups;
  const RowBlock<Out>& block;
  const float* bias;
};

// A thread's block of columns [first, first + columns) and the dots of the rows of the current
// pass, which are finished (bias, conversion to y's dtype) for all the block's columns at once.
struct ColumnBlock {
  int64_t first = 0, columns = 0;
  std::vector<float> dots;  // [kRowsPerPass][columns]

  ColumnBlock(int64_t first, int64_t columns)
      : first(first), columns(columns), dots(kRowsPerPass * columns) {}
};

// Rows [row, row + kRows) against columns [n, n + kCols): their dots, into the block's.
template <int kVectors, int64_t kRows, int64_t kCols, typename Out>
inline void integer_tile(const IntegerCall<Out>& call, ColumnBlock& block, int64_t row,
                         int64_t n) {
  float dots[kRows][kCols];
  integer_dots<kVectors, kRows, kCols>(call.w, call.x, call.groups, row, n, dots);
  for (int64_t r = 0; r < kRows; ++r) {
    float* block_dots = block.dots.data() + r * block.columns + (n - block.first);
    for (int64_t k = 0; k < kCols; ++k) block_dots[k] = dots[r][k];
  }
}

// y of rows [row, row + count) in the block: dot + bias.
template <typename Out>
void finish_rows(const IntegerCall<Out>& call, const ColumnBlock& block, int64_t row,
                 int64_t count) {
  const float* bias = call.bias != nullptr ? call.bias + block.first : nullptr;
  for (int64_t r = 0; r < count; ++r) {
    const float* dots = block.dots.data() + r * block.columns;
    Out* y = call.block.y + (row + r) * call.block.out_features + block.first;
#pragma omp simd
    for (int64_t c = 0; c < block.columns; ++c) {
      y[c] = from_float<Out>(dots[c] + (bias != nullptr ? bias[c] : 0.f));
    }
  }
}

// Rows [row, row + count) against the block's columns, kIntegerTileColumns at a time (the last
// few one at a time).
template <int kVectors, typename Out>
void integer_pass(const IntegerCall<Out>& call, ColumnBlock& block, int64_t row, int64_t count) {
  with_count<kRowsPerPass>(count, [&](auto row_count) {
    constexpr int64_t kRows = decltype(row_count)::value;
    const int64_t end = block.first + block.columns;
    int64_t n = block.first;
    for (; n + kIntegerTileColumns <= end; n += kIntegerTileColumns) {
      integer_tile<kVectors, kRows, kIntegerTileColumns>(call, block, row, n);
    }
    for (; n < end; ++n) integer_tile<kVectors, kRows, 1>(call, block, row, n);
  });
  finish_rows(call, block, row, count);
}

// Columns per thread block: as many as fit kIntegerBlockBytes.
inline int64_t integer_block_columns(const QuantizedMatrix& w) {
  const int64_t scale_bytes = w.groups() * sizeof(float) * (w.offsets != nullptr ? 2 : 1);
  return std::max<int64_t>(kColumnGrain,
                           kIntegerBlockBytes / (w.code_bytes_per_column() + scale_bytes));
}

template <typename Out>
void integer_multiply(const QuantizedMatrix& w, const float* x, int64_t row_count,
                      const RowBlock<Out>& block, const float* bias) {
  IntegerRows rows = round_rows(w, x, row_count);
  rows.group_sums = block.group_sums;
  rows.groups = block.groups;
  const std::vector<ChunkGroups> groups = chunk_groups(w, rows);
  const IntegerCall<Out> call{w, rows, groups.data(), block, bias};
  const auto multiply_all = [&](auto vectors) {
    constexpr int kVectors = decltype(vectors)::value;
    const int64_t block_columns = integer_block_columns(w);
    at::parallel_for(0, block.out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
      for (int64_t first = begin; first < end; first += block_columns) {
        ColumnBlock column_block(first, std::min(block_columns, end - first));
        for (int64_t row = 0; row < row_count; row += kRowsPerPass) {
          integer_pass<kVectors>(call, column_block, row, std::min(kRowsPerPass, row_count - row));
        }
      }
    });
  };
  if (w.bits() == 4) {
    multiply_all(std::integral_constant<int, 4>{});
  } else {
    multiply_all(std::integral_constant<int, 2>{});
  }
}

#if defined(SLUICE_AMX) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
#define SLUICE_INTEGER_AMX 1
// ---- Integer codes where the CPU has AMX: AMX on many rows, AVX512-VNNI on a few.
//
// On 32 rows the loops above run at about a quarter of AMX's bfloat16 matmul: two 16-bit
// multiply-adds per 32 products. AMX multiplies bytes, 16 rows by 16 columns by 64 bytes an
// instruction, so each rounded integer q of x (rounded as above) goes in as two bytes, a signed
// high and an unsigned low, in dimension order: per run, its highs then its lows.
//
// - 4-bit codes: q has 12 bits, 16 * high + low (low 0-15). A run of 32 dimensions is 64 bytes,
//   against the codes times 16 then the codes (at most 240: a byte), so one tile multiply sums a
//   run's 16 * high * code + low * code = q * code, exactly.
// - 8-bit codes: q has 16 bits, 256 * high + low. A run of 16 dimensions is 32 bytes; the highs
//   and the lows each multiply the codes as they lie (tile multiplies of 16 bytes), into two sums
//   joined as 256 * high + low.
// - Codes: a weight tile holds 16 columns' codes of a run, a row per 4 dimensions, so each
//   column's codes are transposed word by word (16 columns' 64-byte lines at once). A model's
//   weights lie that way from load (tile_order_codes, with the scales and offsets grouped per 16
//   columns alike); others are transposed on every call. Each block of 32 columns then lays its
//   words out as weight tiles (4-bit codes widened to bytes), once for all the rows.
// - Sums: a run's exact integer sums become float32 and are scaled by the column's group scale
//   times the row's run scale, added run by run in order; then the offsets' terms, group by
//   group, and the bias.
//
// A tile multiply and the store of its sums cost about the same for 1 row as for 16, so a few
// rows take AVX512-VNNI instead: the same transposed words times each row's broadcast bytes
// (vpdpbusd, which multiplies unsigned by signed bytes: 8-bit codes go in plus 128, and 128 times
// the run's highs is taken off), highs and lows summed apart and joined the same way, the same
// integers; then the same float32 instructions in the same order. A row's output is thus the same
// bits on either loop, and does not depend on its batch. A process takes these loops for every
// call of a weight where Linux grants the tiles, the loops above where it does not: their order
// of float32 sums differs.
constexpr int64_t kRunCodeBytes = 16;  // a run's codes: 32 of 4 bits or 16 of 8
constexpr int64_t kRunsPerLine = kTileRowBytes / kRunCodeBytes;
constexpr int64_t kWordsPerRun = kRunCodeBytes / 4;
constexpr int64_t kTileColumns = 16;
constexpr int64_t kAmxBlockColumns = 2 * kTileColumns;
constexpr int64_t kAmxTileRows = 16;
// Rows from which AMX is faster than AVX512-VNNI (benchmark/quantized_kernel.py, 4-bit codes: at
// 8 rows AMX took 1.2x VNNI's time, at 12 the same, at 16 0.85x, at 32 half).
constexpr int64_t kAmxMinRows = 12;
constexpr int64_t kVnniRowsPerPass = 4;

inline bool takes_amx_integer_path(const QuantizedMatrix& w) {
  return takes_integer_path(w) && w.group_size % ChunkLayout(w).run_dims() == 0 && amx_granted();
}

// x rounded to integers q per run (ChunkLayout's runs and largest integer): per row and run the
// highs then the lows ([rows, padded to whole tiles][runs][2 * run_dims] bytes), each run's
// scale ([rows][runs]), and for 8-bit codes each run's sum of highs.
struct ByteRows {
  int64_t run_dims = 0, runs = 0;
  int shift = 0;  // q = (high << shift) + low
  std::vector<int8_t> bytes;
  std::vector<float> scales;
  std::vector<int32_t> high_sums;

  int64_t row_stride() const { return runs * 2 * run_dims; }
  const int8_t* run_bytes(int64_t row, int64_t run) const {
    return bytes.data() + row * row_stride() + run * 2 * run_dims;
  }
  // The 4 bytes of x a 4-byte word of codes multiplies: highs (or lows) of dimensions d .. d + 3.
  int32_t word(int64_t row, int64_t run, int64_t dim, bool low) const {
    int32_t value;
    std::memcpy(&value, run_bytes(row, run) + dim + (low ? run_dims : 0), sizeof(value));
    return value;
  }
  float scale(int64_t row, int64_t run) const { return scales[row * runs + run]; }
  int32_t high_sum(int64_t row, int64_t run) const { return high_sums[row * runs + run]; }
};

// Rounds one run of x as round_run does (scale: its largest magnitude / `largest`, NaN if it
// holds a NaN or infinity) into its bytes, adds its highs into `high_sum` and returns the scale.
inline float round_run_to_bytes(const float* x, int64_t run_dims, float largest, int shift,
                                int8_t* bytes, int32_t& high_sum) {
  const int64_t parts = run_dims / 16;
  __m512 halves[2];
  const __m512 infinity = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __mmask16 not_finite = 0;
  __m512 magnitudes = _mm512_setzero_ps();
  for (int64_t h = 0; h < parts; ++h) {
    halves[h] = _mm512_loadu_ps(x + 16 * h);
    const __m512 magnitude = _mm512_abs_ps(halves[h]);
    not_finite |= _mm512_cmp_ps_mask(magnitude, infinity, _CMP_NLT_UQ);
    magnitudes = _mm512_max_ps(magnitudes, magnitude);
  }
  const float scale = not_finite != 0 ? std::numeric_limits<float>::quiet_NaN()
                                      : _mm512_reduce_max_ps(magnitudes) / largest;
  const __m512 inverse = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  const __m512 limit = _mm512_set1_ps(largest);
  const __m512i low_mask = _mm512_set1_epi32((1 << shift) - 1);
  for (int64_t h = 0; h < parts; ++h) {
    const __m512 scaled = _mm512_min_ps(
        _mm512_max_ps(_mm512_mul_ps(halves[h], inverse), _mm512_sub_ps(_mm512_setzero_ps(), limit)),
        limit);
    const __m512i q =
        _mm512_cvt_roundps_epi32(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i high = _mm512_srai_epi32(q, shift);
    high_sum += _mm512_reduce_add_epi32(high);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + 16 * h), _mm512_cvtepi32_epi8(high));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + run_dims + 16 * h),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(q, low_mask)));
  }
  return scale;
}

ByteRows round_rows_to_bytes(const QuantizedMatrix& w, const float* x, int64_t row_count) {
  const ChunkLayout layout(w);
  ByteRows rows;
  rows.run_dims = layout.run_dims();
  rows.runs = w.in_features / rows.run_dims;
  rows.shift = w.bits() == 4 ? 4 : 8;
  // Whole tiles of rows, the last padded with zeros (see integer_block_config).
  const int64_t padded = (row_count + kAmxTileRows - 1) / kAmxTileRows * kAmxTileRows;
  rows.bytes.resize(padded * rows.row_stride());
  rows.scales.resize(row_count * rows.runs);
  rows.high_sums.resize(row_count * rows.runs);
  at::parallel_for(0, row_count, grain_for(w.in_features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t run = 0; run < rows.runs; ++run) {
        const int64_t index = r * rows.runs + run;
        rows.scales[index] = round_run_to_bytes(
            x + r * w.in_features + run * rows.run_dims, rows.run_dims, layout.largest(),
            rows.shift, rows.bytes.data() + r * rows.row_stride() + run * 2 * rows.run_dims,
            rows.high_sums[index]);
      }
    }
  });
  return rows;
}

// Transposes 16 vectors of 16 32-bit words: word j of vector i to word i of vector j.
inline void transpose_words(__m512i (&rows)[16]) {
  __m512i pairs[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  // quads[4 * g + k]: per 128-bit lane L, word 4L + k of rows 4g .. 4g + 3.
  __m512i quads[16];
  for (int g = 0; g < 4; ++g) {
    const __m512i* p = pairs + 4 * g;
    quads[4 * g + 0] = _mm512_unpacklo_epi64(p[0], p[2]);
    quads[4 * g + 1] = _mm512_unpackhi_epi64(p[0], p[2]);
    quads[4 * g + 2] = _mm512_unpacklo_epi64(p[1], p[3]);
    quads[4 * g + 3] = _mm512_unpackhi_epi64(p[1], p[3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i low01 = _mm512_shuffle_i32x4(quads[k], quads[4 + k], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(quads[k], quads[4 + k], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(quads[8 + k], quads[12 + k], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(quads[8 + k], quads[12 + k], 0xee);
    rows[k] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    rows[4 + k] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
    rows[8 + k] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    rows[12 + k] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
  }
}

// 16 columns from n (those past `columns` read as zeros) at one 64-byte line of their codes, 4
// runs, transposed: word i holds every column's word i. A run is 16 bytes, the low nibbles its
// dimensions 0-15 and the high ones 16-31, so word 4r + q of run r holds dimensions 4q .. 4q + 3
// in its low nibbles and 16 + 4q .. 19 + 4q in its high ones. Each call fetches 16 lines of the
// columns `ahead` reads, from line `fetched` on.
inline void transposed_line(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t offset,
                            const TilePrefetch& ahead, int64_t fetched, __m512i (&words)[16]) {
  const int64_t bytes = std::min(kTileRowBytes, w.code_bytes_per_column() - offset);
  const __mmask64 valid = bytes == kTileRowBytes ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
  for (int64_t c = 0; c < 16; ++c) {
    ahead.step(fetched + c, kTileRowBytes);
    words[c] = c < columns ? _mm512_maskz_loadu_epi8(valid, w.column_codes(n + c) + offset)
                           : _mm512_setzero_si512();
  }
  transpose_words(words);
}

// The 16 words of a line as transposed_line makes them: in tile order, as they lie.
inline void line_words(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t offset,
                       const TilePrefetch& ahead, int64_t fetched, __m512i (&words)[16]) {
  if (!w.tile_order) return transposed_line(w, n, columns, offset, ahead, fetched, words);
  const int64_t count = std::min<int64_t>(16, (w.code_bytes_per_column() - offset) / 4);
  const uint8_t* line = w.column_codes(n) + offset * kTileColumns;
  for (int64_t i = 0; i < 16; ++i) {
    ahead.step(fetched + i, kTileRowBytes);
    words[i] = i < count ? _mm512_loadu_si512(line + i * kTileRowBytes) : _mm512_setzero_si512();
  }
}

// A transposed word of 4-bit codes as bytes: of its low nibbles' dimensions, and of its high
// ones'.
struct QuadCodes {
  __m512i low, high;
};

inline QuadCodes quad_codes(__m512i word) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  return {_mm512_and_si512(word, nibble), _mm512_and_si512(_mm512_srli_epi16(word, 4), nibble)};
}

// 16 columns' values from n of one group (scales or offsets); zeros past `columns`. In tile order
// they lie side by side; otherwise a gather.
inline __m512 group_values(const QuantizedMatrix& w, const float* values, int64_t n,
                           int64_t columns, int64_t g) {
  if (w.tile_order) return _mm512_loadu_ps(values + w.group_index(n, g));
  const __m512i index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(w.groups())));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), first_lanes(columns), index,
                                  values + w.group_index(n, g), sizeof(float));
}

// 16 columns' offsets from n, group by group ([groups][16]), gathered once for all the rows.
struct ColumnOffsets {
  std::vector<float> values;

  void gather(const QuantizedMatrix& w, int64_t n, int64_t columns) {
    if (w.offsets == nullptr) return;
    values.resize(w.groups() * kTileColumns);
    for (int64_t g = 0; g < w.groups(); ++g) {
      _mm512_storeu_ps(values.data() + g * kTileColumns, group_values(w, w.offsets, n, columns, g));
    }
  }
};

// The float32 steps both loops take, the same instructions in the same order.
// A run's exact sums for one row and 16 columns into its total, times the columns' group scales
// times the row's run scale.
inline __m512 add_run(__m512 total, __m512i sums, __m512 group_scales, float x_scale) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums),
                         _mm512_mul_ps(group_scales, _mm512_set1_ps(x_scale)), total);
}

// A run's sums of q * code from the highs' and the lows' sums.
inline __m512i joined_sums(__m512i high_sums, __m512i low_sums, int shift) {
  return _mm512_add_epi32(_mm512_slli_epi32(high_sums, shift), low_sums);
}

// Rows [row, row + rows) of 16 columns from n into y: their totals plus the offsets' terms, group
// by group, and the bias. The rows' sums are independent, so each group is added to every row
// before the next.
template <typename Out>
inline void finish_columns(const QuantizedMatrix& w, const RowBlock<Out>& out, const float* bias,
                           const ColumnOffsets& offsets, int64_t row, int64_t rows, int64_t n,
                           int64_t columns, __m512* totals) {
  if (w.offsets != nullptr) {
    for (int64_t g = 0; g < w.groups(); ++g) {
      const __m512 group_offsets = _mm512_loadu_ps(offsets.values.data() + g * kTileColumns);
      for (int64_t m = 0; m < rows; ++m) {
        const __m512 sum = _mm512_set1_ps(out.group_sums[(row + m) * out.groups + g]);
        totals[m] = _mm512_fmadd_ps(group_offsets, sum, totals[m]);
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    alignas(64) float values[kTileColumns];
    _mm512_store_ps(values, totals[m]);
    Out* y = out.y + (row + m) * out.out_features + n;
    for (int64_t c = 0; c < columns; ++c) {
      y[c] = from_float<Out>(values[c] + (bias != nullptr ? bias[n + c] : 0.f));
    }
  }
}

// ---- AVX512-VNNI: kRows rows against 16 columns from n.

// Each word's codes as vpdpbusd's unsigned operand, with the dimension of x's bytes it multiplies
// (within the run): 4-bit codes make two quads (their low and high nibbles), 8-bit codes one, plus
// 128.
struct WordQuads {
  __m512i codes[2];
  int64_t dims[2];
  int count;
};

template <bool kEightBit>
inline WordQuads word_quads(__m512i word, int64_t q) {
  if constexpr (kEightBit) {
    return {{_mm512_xor_si512(word, _mm512_set1_epi8(static_cast<char>(0x80)))}, {4 * q}, 1};
  } else {
    const QuadCodes codes = quad_codes(word);
    return {{codes.low, codes.high}, {4 * q, 4 * q + 16}, 2};
  }
}

template <bool kEightBit, int64_t kRows, typename Out>
void vnni_columns(const QuantizedMatrix& w, const ByteRows& x, const RowBlock<Out>& out,
                  const float* bias, const ColumnOffsets& offsets, int64_t row, int64_t n,
                  int64_t columns) {
  __m512 totals[kRows];
  for (auto& total : totals) total = _mm512_setzero_ps();
  // The thread's next block but one (memory's latency is more than one block's work).
  const TilePrefetch ahead(w, n + 2 * kTileColumns, kTileColumns);
  for (int64_t offset = 0; offset < w.code_bytes_per_column(); offset += kTileRowBytes) {
    __m512i words[16];
    line_words(w, n, columns, offset, ahead, offset / kTileRowBytes * 16, words);
    const int64_t first_run = offset / kRunCodeBytes;
    for (int64_t r = 0; r < kRunsPerLine && first_run + r < x.runs; ++r) {
      const int64_t run = first_run + r;
      __m512i high[kRows], low[kRows];
      for (int64_t m = 0; m < kRows; ++m) high[m] = low[m] = _mm512_setzero_si512();
      for (int64_t q = 0; q < kWordsPerRun; ++q) {
        const WordQuads quads = word_quads<kEightBit>(words[kWordsPerRun * r + q], q);
        for (int i = 0; i < quads.count; ++i) {
          for (int64_t m = 0; m < kRows; ++m) {
            const auto x_word = [&](bool low_bytes) {
              return _mm512_set1_epi32(x.word(row + m, run, quads.dims[i], low_bytes));
            };
            // The highs are signed. The lows are unsigned: 0-15 with 4-bit codes, which pass as
            // signed; with 8-bit codes, the signed operand is the codes as they are.
            high[m] = _mm512_dpbusd_epi32(high[m], quads.codes[i], x_word(false));
            low[m] = kEightBit ? _mm512_dpbusd_epi32(low[m], x_word(true),
                                                     words[kWordsPerRun * r + q])
                               : _mm512_dpbusd_epi32(low[m], quads.codes[i], x_word(true));
          }
        }
      }
      const __m512 group_scales =
          group_values(w, w.scales, n, columns, run * x.run_dims / w.group_size);
      for (int64_t m = 0; m < kRows; ++m) {
        if constexpr (kEightBit) {
          // The codes went in plus 128.
          high[m] = _mm512_sub_epi32(high[m], _mm512_set1_epi32(128 * x.high_sum(row + m, run)));
        }
        totals[m] = add_run(totals[m], joined_sums(high[m], low[m], x.shift), group_scales,
                            x.scale(row + m, run));
      }
    }
  }
  finish_columns(w, out, bias, offsets, row, kRows, n, columns, totals);
}

template <bool kEightBit, typename Out>
void vnni_multiply(const QuantizedMatrix& w, const ByteRows& x, int64_t row_count,
                   const RowBlock<Out>& out, const float* bias) {
  const int64_t blocks = (out.out_features + kTileColumns - 1) / kTileColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    ColumnOffsets offsets;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kTileColumns;
      const int64_t columns = std::min(kTileColumns, out.out_features - n);
      offsets.gather(w, n, columns);
      for (int64_t row = 0; row < row_count; row += kVnniRowsPerPass) {
        with_count<kVnniRowsPerPass>(std::min(kVnniRowsPerPass, row_count - row), [&](auto rows) {
          vnni_columns<kEightBit, decltype(rows)::value>(w, x, out, bias, offsets, row, n,
                                                          columns);
        });
      }
    }
  });
}

// ---- AMX: a thread's blocks of 32 columns, each laid out as weight tiles once and multiplied by
// every row, a half of 16 columns by 16 rows at a time.

// The block's weight tiles, [runs][2 halves of 16 columns][rows of 64 bytes]. 4-bit codes: 16
// rows, 0-7 the codes times 16 of dimensions 4i .. 4i + 3, which x's highs multiply, and 8-15
// the codes, which its lows multiply. 8-bit codes: 4 rows, the words as they are.
struct WeightTiles {
  struct alignas(kTileRowBytes) Row {
    uint8_t bytes[kTileRowBytes];
  };
  int64_t rows_per_tile;
  std::vector<Row> rows;

  explicit WeightTiles(const QuantizedMatrix& w)
      : rows_per_tile(w.bits() == 4 ? 4 * kWordsPerRun : kWordsPerRun),
        rows(w.in_features / ChunkLayout(w).run_dims() * 2 * rows_per_tile) {}
  Row* tile(int64_t run, int64_t half) { return rows.data() + (2 * run + half) * rows_per_tile; }
  const Row* tile(int64_t run, int64_t half) const {
    return rows.data() + (2 * run + half) * rows_per_tile;
  }

  // Columns [n, n + columns).
  void fill(const QuantizedMatrix& w, int64_t n, int64_t columns) {
    const TilePrefetch ahead(w, n + kAmxBlockColumns, kAmxBlockColumns);
    const int64_t line_count = (w.code_bytes_per_column() + kTileRowBytes - 1) / kTileRowBytes;
    const int64_t runs = w.in_features / ChunkLayout(w).run_dims();
    const __m512i high_nibble = _mm512_set1_epi8(static_cast<char>(0xf0));
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t half_columns =
          std::clamp<int64_t>(columns - kTileColumns * half, 0, kTileColumns);
      for (int64_t offset = 0; offset < w.code_bytes_per_column(); offset += kTileRowBytes) {
        __m512i words[16];
        const int64_t fetched = (half * line_count + offset / kTileRowBytes) * 16;
        line_words(w, n + kTileColumns * half, half_columns, offset, ahead, fetched, words);
        const int64_t first_run = offset / kRunCodeBytes;
        for (int64_t r = 0; r < kRunsPerLine && first_run + r < runs; ++r) {
          auto* tile = reinterpret_cast<__m512i*>(this->tile(first_run + r, half));
          for (int64_t q = 0; q < kWordsPerRun; ++q) {
            const __m512i word = words[kWordsPerRun * r + q];
            if (w.bits() == 8) {
              _mm512_store_si512(tile + q, word);
              continue;
            }
            // Rows q and q + 4: the low and high nibbles' codes times 16; then the codes.
            const QuadCodes codes = quad_codes(word);
            const __m512i low_times_16 = _mm512_and_si512(_mm512_slli_epi16(word, 4), high_nibble);
            _mm512_store_si512(tile + q, low_times_16);
            _mm512_store_si512(tile + q + kWordsPerRun, _mm512_and_si512(word, high_nibble));
            _mm512_store_si512(tile + q + 2 * kWordsPerRun, codes.low);
            _mm512_store_si512(tile + q + 3 * kWordsPerRun, codes.high);
          }
        }
      }
    }
  }
};

// 4-bit codes: tiles 0-1 x (16 rows, a run's 64 bytes), 2-3 weight tiles, 4-5 the sums. 8-bit
// codes: tiles 0-1 x's highs and lows (16 rows, a run's 16 bytes each), 2 the weight tile, 4-5
// and 6-7 the sums of the highs and the lows. Consecutive runs take alternate registers where
// there are pairs, so that one run's loads and multiplies wait less for the last run's. Rows past
// the call's are zeros in x (ByteRows pads them): a tile multiply costs the same whatever its
// rows, and one configuration then serves every block.
TileConfig integer_block_config(const ByteRows& x, bool eight_bit) {
  TileConfig config;
  const int64_t x_bytes = eight_bit ? x.run_dims : 2 * x.run_dims;
  config.set(0, kAmxTileRows, x_bytes);
  config.set(1, kAmxTileRows, x_bytes);
  config.set(2, eight_bit ? kWordsPerRun : 4 * kWordsPerRun);
  if (!eight_bit) config.set(3, 4 * kWordsPerRun);
  for (int t = 4; t < (eight_bit ? 8 : 6); ++t) config.set(t, kAmxTileRows);
  return config;
}

// A run's sums of a tile of rows and 16 columns: [highs, lows (8-bit codes)][row][column].
using RunSums = int32_t[2][kAmxTileRows][kTileColumns];

// Run `run`'s sums of the rows from `row` and one half of the block into `sums`.
template <bool kEightBit>
inline void multiply_run(const ByteRows& x, int64_t row, int64_t run, const WeightTiles& tiles,
                         int64_t half, RunSums& sums) {
  constexpr int64_t kSumsBytes = kTileColumns * sizeof(int32_t);
  const int8_t* bytes = x.run_bytes(row, run);
  if constexpr (kEightBit) {
    _tile_loadd(0, bytes, x.row_stride());
    _tile_loadd(1, bytes + x.run_dims, x.row_stride());
    _tile_loadd(2, tiles.tile(run, half), kTileRowBytes);
    if (run % 2 == 0) {
      _tile_zero(4);
      _tile_zero(5);
      _tile_dpbssd(4, 0, 2);
      _tile_dpbusd(5, 1, 2);
      _tile_stored(4, sums[0], kSumsBytes);
      _tile_stored(5, sums[1], kSumsBytes);
    } else {
      _tile_zero(6);
      _tile_zero(7);
      _tile_dpbssd(6, 0, 2);
      _tile_dpbusd(7, 1, 2);
      _tile_stored(6, sums[0], kSumsBytes);
      _tile_stored(7, sums[1], kSumsBytes);
    }
  } else if (run % 2 == 0) {
    _tile_loadd(0, bytes, x.row_stride());
    _tile_loadd(2, tiles.tile(run, half), kTileRowBytes);
    _tile_zero(4);
    _tile_dpbsud(4, 0, 2);
    _tile_stored(4, sums[0], kSumsBytes);
  } else {
    _tile_loadd(1, bytes, x.row_stride());
    _tile_loadd(3, tiles.tile(run, half), kTileRowBytes);
    _tile_zero(5);
    _tile_dpbsud(5, 1, 3);
    _tile_stored(5, sums[0], kSumsBytes);
  }
}

// Up to 16 rows from `row` against one half of the block (16 columns from n) into y. The rows'
// totals stay in registers from run to run; each run's float32 work overlaps the next run's
// tile multiply, issued before it.
template <bool kEightBit, int64_t kRows, typename Out>
void amx_rows(const QuantizedMatrix& w, const ByteRows& x, const RowBlock<Out>& out,
              const float* bias, const WeightTiles& tiles, const ColumnOffsets& offsets,
              int64_t half, int64_t n, int64_t columns, int64_t row) {
  alignas(64) RunSums sums[2];
  __m512 totals[kRows];
  for (auto& total : totals) total = _mm512_setzero_ps();
  multiply_run<kEightBit>(x, row, 0, tiles, half, sums[0]);
  for (int64_t run = 0; run < x.runs; ++run) {
    if (run + 1 < x.runs) {
      multiply_run<kEightBit>(x, row, run + 1, tiles, half, sums[(run + 1) % 2]);
    }
    const __m512 group_scales =
        group_values(w, w.scales, n, columns, run * x.run_dims / w.group_size);
    const RunSums& run_sums = sums[run % 2];
    for (int64_t m = 0; m < kRows; ++m) {
      // 4-bit codes' tile multiply summed the highs and lows as q * code already.
      const __m512i sums_of_row =
          kEightBit ? joined_sums(_mm512_load_si512(run_sums[0][m]),
                                  _mm512_load_si512(run_sums[1][m]), x.shift)
                    : _mm512_load_si512(run_sums[0][m]);
      totals[m] = add_run(totals[m], sums_of_row, group_scales, x.scale(row + m, run));
    }
  }
  finish_columns(w, out, bias, offsets, row, kRows, n, columns, totals);
}

template <bool kEightBit, typename Out>
void amx_multiply(const QuantizedMatrix& w, const ByteRows& x, int64_t row_count,
                  const RowBlock<Out>& out, const float* bias) {
  const int64_t blocks = (out.out_features + kAmxBlockColumns - 1) / kAmxBlockColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    WeightTiles tiles(w);
    ColumnOffsets offsets;
    integer_block_config(x, kEightBit).load();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kAmxBlockColumns;
      tiles.fill(w, first, std::min(kAmxBlockColumns, out.out_features - first));
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t n = first + kTileColumns * half;
        const int64_t columns = std::min(kTileColumns, out.out_features - n);
        if (columns <= 0) break;
        offsets.gather(w, n, columns);
        for (int64_t row = 0; row < row_count; row += kAmxTileRows) {
          with_count<kAmxTileRows>(std::min(kAmxTileRows, row_count - row), [&](auto rows) {
            amx_rows<kEightBit, decltype(rows)::value>(w, x, out, bias, tiles, offsets, half, n,
                                                        columns, row);
          });
        }
      }
    }
    _tile_release();
  });
}

template <typename Out>
void tile_integer_multiply(const QuantizedMatrix& w, const float* x, int64_t row_count,
                           const RowBlock<Out>& out, const float* bias) {
  const ByteRows rows = round_rows_to_bytes(w, x, row_count);
  const auto multiply = [&](auto eight_bit) {
    constexpr bool kEightBit = decltype(eight_bit)::value;
    if (row_count >= kAmxMinRows) return amx_multiply<kEightBit>(w, rows, row_count, out, bias);
    vnni_multiply<kEightBit>(w, rows, row_count, out, bias);
  };
  if (w.bits() == 8) return multiply(std::true_type{});
  multiply(std::false_type{});
}
#endif

// ---- 4-bit codes times bfloat16 rows by AVX512-BF16 dot products.
//
// The integer path above spends per row and column, for every 32 codes, four multiply-adds, a
// conversion and two float32 multiplies on top of the unpacking; at 32 rows a step's
// projections took 2.1 to 2.5 times bfloat16's time. Here, where the model's activations are
// bfloat16, a layer's codes lie in tile order (the words of 16 columns side by side, as for AMX)
// and each 64-byte line of them becomes four vectors of 16 columns' pairs of codes' values, which
// one vdpbf16ps each multiplies by a row's pair of x:
//
// - 4-bit integers (builds without AMX, whose byte multiplies take them): a shift and one
//   ternary-logic instruction; a code c in a lane with 0x4300's bits is the bfloat16 128 + c,
//   exactly. A group's dot products are summed apart and 128 times x's sum over the group taken
//   off: sum_k (s c_k + o) x_k = s (sum_k (128 + c_k) x_k - 128 sum_k x_k) + o sum_k x_k. The
//   products are exact in float32 and the sums lose about 4 bits of float32's 24 to the 128, far
//   below x's own bfloat16 rounding.
// - Indexes into 16 levels (NF4, FP4): a shift and a vpermw from the levels rounded to
//   bfloat16, as bitsandbytes' own bfloat16 dequantization rounds every weight. They ran 1.8x as
//   fast at one row, and 1.4x at 32, as on the float32 path they took before. Where the CPU
//   grants AMX's tiles, the same vectors go to the tiles instead (below).
//
// A word q of a run's codes holds dimensions 4q..4q+3 in its bytes' low nibbles and 4q+16..4q+19
// in their high nibbles (GGUF's block layout), so the four vectors pair the dimensions
// (4q, 4q+2), (4q+16, 4q+18), (4q+1, 4q+3), (4q+17, 4q+19): x's pairs are gathered in that
// order once per call. Every row takes the same instructions in the same order whatever rows
// share the call, so a row's output does not depend on its batch; up to kPairRows rows share
// each line's unpacking (4 measured faster than 2, 3 or 6). The default model's 4-bit integer
// projections ran 1.2x as fast as on the integer path at one row, 1.9x at 8 and 2x at 32, where
// bfloat16's took 0.7x their time (benchmark/quantized_kernel.py --column-order).
#if defined(__AVX512BF16__)
#define SLUICE_PAIR_DOTS 1
constexpr int64_t kPairRows = 4;
constexpr int64_t kLineBytes = 64;
constexpr int64_t kWordsPerRunOf4Bit = 4;
constexpr int64_t kPairsPerRun = kCodeBlock / 2;
// bfloat16 128: its 7 mantissa bits take a code as they are.
constexpr int16_t kCodeBias = 0x4300;
constexpr float kCodeBiasValue = 128.f;

inline bool takes_pair_dots(const QuantizedMatrix& w) {
  if (w.group_size % kCodeBlock != 0) return false;
#if defined(SLUICE_INTEGER_AMX)
  return w.format == CodeFormat::kLevels4;
#else
  return w.format == CodeFormat::kUnsigned4 || w.format == CodeFormat::kLevels4;
#endif
}

// Each row's x as the 32-bit pairs of bfloat16 the code vectors multiply (per run and word,
// the four pairs above), and its sums per group.
struct PairRows {
  std::vector<uint32_t> pairs;
  std::vector<float> group_sums;
  int64_t pairs_per_row;
  int64_t groups;
};

// Which of a run's 32 dimensions each of its 32 paired values is: per word q, the pairs
// (4q, 4q + 2), (4q + 16, 4q + 18), (4q + 1, 4q + 3), (4q + 17, 4q + 19).
__m512i run_pair_order() {
  constexpr int16_t kPairDims[4][2] = {{0, 2}, {16, 18}, {1, 3}, {17, 19}};
  alignas(64) int16_t order[kCodeBlock];
  for (int q = 0; q < kWordsPerRunOf4Bit; ++q) {
    for (int v = 0; v < 4; ++v) {
      for (int j = 0; j < 2; ++j) order[8 * q + 2 * v + j] = 4 * q + kPairDims[v][j];
    }
  }
  return _mm512_load_si512(order);
}

PairRows pair_rows(const at::BFloat16* x, int64_t row_count, const QuantizedMatrix& w) {
  const int64_t in_features = w.in_features;
  const int64_t runs_per_group = w.group_size / kCodeBlock;
  PairRows rows{std::vector<uint32_t>(row_count * in_features / 2),
                std::vector<float>(row_count * w.groups()), in_features / 2, w.groups()};
  const __m512i order = run_pair_order();
  at::parallel_for(0, row_count, grain_for(in_features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* row = x + r * in_features;
      uint32_t* pairs = rows.pairs.data() + r * rows.pairs_per_row;
      for (int64_t g = 0; g < w.groups(); ++g) {
        __m512 sums = _mm512_setzero_ps();
        for (int64_t run = g * runs_per_group; run < (g + 1) * runs_per_group; ++run) {
          const at::BFloat16* values = row + run * kCodeBlock;
          _mm512_storeu_si512(pairs + run * kPairsPerRun,
                              _mm512_permutexvar_epi16(order, _mm512_loadu_si512(values)));
          sums = _mm512_add_ps(sums, _mm512_add_ps(load_bf16x16(values),
                                                   load_bf16x16(values + kLanes)));
        }
        rows.group_sums[r * w.groups() + g] = _mm512_reduce_add_ps(sums);
      }
    }
  });
  return rows;
}

// The four vectors of 16 columns' pairs of codes' values in a line of words: bfloat16 128 + code
// for integers, the levels for indexes (`levels`: the 16 levels in bfloat16, twice over).
template <bool kLevels>
inline void line_pairs(__m512i line, __m512i levels, __m512bh (&vectors)[4]) {
  if constexpr (kLevels) {
    // vpermw reads a lane's low 5 bits: the next nibble's low bit in bit 4 picks the same level.
    vectors[0] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(line, levels));
    vectors[1] = reinterpret_cast<__m512bh>(
        _mm512_permutexvar_epi16(_mm512_srli_epi16(line, 4), levels));
    vectors[2] = reinterpret_cast<__m512bh>(
        _mm512_permutexvar_epi16(_mm512_srli_epi16(line, 8), levels));
    vectors[3] = reinterpret_cast<__m512bh>(
        _mm512_permutexvar_epi16(_mm512_srli_epi16(line, 12), levels));
  } else {
    const __m512i nibble = _mm512_set1_epi16(0x0f);
    const __m512i bias = _mm512_set1_epi16(kCodeBias);
    constexpr int kAndOr = 0xea;  // (a & b) | c
    vectors[0] =
        reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(line, nibble, bias, kAndOr));
    vectors[1] = reinterpret_cast<__m512bh>(
        _mm512_ternarylogic_epi32(_mm512_srli_epi16(line, 4), nibble, bias, kAndOr));
    vectors[2] = reinterpret_cast<__m512bh>(
        _mm512_ternarylogic_epi32(_mm512_srli_epi16(line, 8), nibble, bias, kAndOr));
    vectors[3] = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_srli_epi16(line, 12), bias));
  }
}

// kLevels4's 16 levels rounded to bfloat16, twice over (line_pairs).
inline __m512i bfloat16_levels(const float* levels) {
  const __m512 values = _mm512_loadu_ps(levels);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(values, values));
}

// What one call multiplies: the weight, x's pairs, and where y goes.
struct PairCall {
  const QuantizedMatrix& w;
  const PairRows& x;
  __m512i levels;  // kLevels4's levels in bfloat16, twice over (line_pairs)
  const float* bias;
  at::BFloat16* y;
  int64_t out_features;
};

// Where a tile's operands lie: its groups of 16 columns from column group `first`, and the rows
// [row, row + kRows) of x and y.
struct PairTile {
  int64_t first;
  int64_t row;
  // Prefetch the next tile's codes, scales and offsets (the first pass of rows over this one).
  bool fetch_next;
};

// kHalves (1 or 2) groups of 16 columns: compile-time counts keep the sums in registers.
template <bool kLevels, int64_t kRows, int64_t kHalves>
void pair_dot_tile(const PairCall& call, const PairTile& tile) {
  const QuantizedMatrix& w = call.w;
  const int64_t group_bytes = kWordColumns * w.code_bytes_per_column();
  const int64_t runs_per_group = w.group_size / kCodeBlock;
  const uint8_t* codes = w.codes + tile.first * group_bytes;
  const int64_t next_tile = 2 * group_bytes;
  // The next tile's scales (and offsets): 2 * groups lines, one fetched per line of codes read.
  const int64_t next_group_values = (tile.first + 2) * kWordColumns * w.groups();
  const int64_t value_lines = 2 * w.groups();
  int64_t line_index = 0;
  __m512 totals[kRows][kHalves];
  for (auto& row_totals : totals) {
    for (auto& total : row_totals) total = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m512 sums[kRows][kHalves];
    for (auto& row_sums : sums) {
      for (auto& half : row_sums) half = _mm512_setzero_ps();
    }
    for (int64_t run = g * runs_per_group; run < (g + 1) * runs_per_group; ++run) {
      for (int64_t q = 0; q < kWordsPerRunOf4Bit; ++q) {
        const int64_t offset = (run * kWordsPerRunOf4Bit + q) * kLineBytes;
#pragma GCC unroll 2
        for (int64_t h = 0; h < kHalves; ++h) {
          const uint8_t* line = codes + h * group_bytes + offset;
          if (tile.fetch_next) {
            _mm_prefetch(reinterpret_cast<const char*>(line + next_tile), _MM_HINT_T0);
            if (line_index < value_lines) {
              const int64_t at = next_group_values + line_index * kWordColumns;
              _mm_prefetch(reinterpret_cast<const char*>(w.scales + at), _MM_HINT_T0);
              if (w.offsets != nullptr) {
                _mm_prefetch(reinterpret_cast<const char*>(w.offsets + at), _MM_HINT_T0);
              }
            }
            ++line_index;
          }
          __m512bh vectors[4];
          line_pairs<kLevels>(_mm512_loadu_si512(line), call.levels, vectors);
          for (int64_t r = 0; r < kRows; ++r) {
            const uint32_t* pairs = call.x.pairs.data() + (tile.row + r) * call.x.pairs_per_row +
                                    run * kPairsPerRun + 4 * q;
            for (int v = 0; v < 4; ++v) {
              const auto pair = reinterpret_cast<__m512bh>(
                  _mm512_set1_epi32(static_cast<int>(pairs[v])));
              sums[r][h] = _mm512_dpbf16_ps(sums[r][h], pair, vectors[v]);
            }
          }
        }
      }
    }
    for (int64_t h = 0; h < kHalves; ++h) {
      const int64_t at = (tile.first + h) * kWordColumns * w.groups() + g * kWordColumns;
      const __m512 scales = _mm512_loadu_ps(w.scales + at);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512 group_sum =
            _mm512_set1_ps(call.x.group_sums[(tile.row + r) * call.x.groups + g]);
        const __m512 dots =
            kLevels ? sums[r][h]
                    : _mm512_fnmadd_ps(_mm512_set1_ps(kCodeBiasValue), group_sum, sums[r][h]);
        totals[r][h] = _mm512_fmadd_ps(scales, dots, totals[r][h]);
        if (w.offsets != nullptr) {
          totals[r][h] = _mm512_fmadd_ps(_mm512_loadu_ps(w.offsets + at), group_sum, totals[r][h]);
        }
      }
    }
  }
  for (int64_t h = 0; h < kHalves; ++h) {
    const int64_t column = (tile.first + h) * kWordColumns;
    const __m512 biases =
        call.bias != nullptr ? _mm512_loadu_ps(call.bias + column) : _mm512_setzero_ps();
    for (int64_t r = 0; r < kRows; ++r) {
      store_bf16x16(call.y + (tile.row + r) * call.out_features + column,
                    _mm512_add_ps(totals[r][h], biases));
    }
  }
}

template <bool kLevels>
void pair_dot_tiles(const PairCall& call, int64_t row_count) {
  const int64_t column_groups = call.out_features / kWordColumns;
  const int64_t tiles = (column_groups + 1) / 2;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t halves = std::min<int64_t>(2, column_groups - 2 * t);
      for (int64_t row = 0; row < row_count; row += kPairRows) {
        const PairTile tile{2 * t, row, row == 0 && t + 1 < end};
        with_count<kPairRows>(std::min(kPairRows, row_count - row), [&](auto count) {
          constexpr int64_t kRows = decltype(count)::value;
          if (halves == 2) return pair_dot_tile<kLevels, kRows, 2>(call, tile);
          pair_dot_tile<kLevels, kRows, 1>(call, tile);
        });
      }
    }
  });
}

// y [rows, N] for bfloat16 x and 4-bit codes in tile order (N a multiple of 16).
void pair_dot_multiply(const QuantizedMatrix& w, const at::BFloat16* x, int64_t row_count,
                       const float* bias, int64_t out_features, at::BFloat16* y) {
  const PairRows rows = pair_rows(x, row_count, w);
  if (w.format == CodeFormat::kLevels4) {
    return pair_dot_tiles<true>({w, rows, bfloat16_levels(w.levels), bias, y, out_features},
                                row_count);
  }
  pair_dot_tiles<false>({w, rows, _mm512_setzero_si512(), bias, y, out_features}, row_count);
}
#endif

// ---- FP8 codes times bfloat16 rows by AVX512-BF16 dot products.
//
// Every e4m3 number is a bfloat16 number too, so where the model's activations are bfloat16 its
// FP8 codes become bfloat16 in registers and multiply the rows as they are: a code's bits, sign
// extended to 16 and shifted left by 4, put its sign, exponent and mantissa where bfloat16's are,
// and adding 120 to the exponent (bfloat16's bias 127 against e4m3's 7) gives the value; codes
// with a zero exponent (zero and the subnormals) take theirs from a table of 8. The codes lie in
// tile order (as for AMX: the 4-byte words of 16 columns side by side), so a 64-byte line holds 4
// consecutive dimensions of 16 columns; its halves become two vectors of 8 columns' 2 pairs of
// dimensions, each multiplied by a row's 4 values broadcast, and a group's lanes are folded into
// one sum per column before its scale. Every row takes the same instructions in the same order
// whatever rows share the call, so a row's output does not depend on its batch. (Where the CPU
// has AMX, its tiles take the converted codes instead: see "FP8 and level codes times bfloat16
// rows by AMX".)
#if defined(__AVX512BF16__)
#define SLUICE_FLOAT8_DOTS 1
constexpr int64_t kFloat8Rows = 8;
constexpr int64_t kFloat8LineDims = 4;

inline bool takes_float8_dots(const QuantizedMatrix& w) {
  return w.format == CodeFormat::kFloat8 && w.group_size % kFloat8LineDims == 0;
}

// bfloat16's bits of e4m3's zero-exponent codes by mantissa m: m * 2^-9 (sign apart).
inline __m512i float8_subnormals() {
  alignas(64) uint16_t table[32] = {};
  for (int m = 1; m < 8; ++m) {
    const float value = std::ldexp(static_cast<float>(m), -9);
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    table[m] = static_cast<uint16_t>(bits >> 16);  // exact: 3 significant bits
  }
  return _mm512_load_si512(table);
}

// 32 e4m3 codes as bfloat16, exactly.
inline __m512bh float8_as_bf16(__m256i codes, __m512i subnormals) {
  const __m512i lanes = _mm512_cvtepi8_epi16(codes);
  const __m512i sign_and_bits = _mm512_set1_epi16(static_cast<int16_t>(0x87f0));
  const __m512i placed = _mm512_and_si512(_mm512_slli_epi16(lanes, 4), sign_and_bits);
  const __mmask32 normal = _mm512_test_epi16_mask(lanes, _mm512_set1_epi16(0x78));
  constexpr int kOrAnd = 0xf8;  // a | (b & c)
  const __m512i small = _mm512_ternarylogic_epi32(
      _mm512_permutexvar_epi16(lanes, subnormals), placed,
      _mm512_set1_epi16(static_cast<int16_t>(0x8000)), kOrAnd);
  return reinterpret_cast<__m512bh>(
      _mm512_mask_add_epi16(small, normal, placed, _mm512_set1_epi16(120 << 7)));
}

// The indexes of two vectors' even 32-bit lanes taken together (as permutex2var numbers them);
// plus 1, of their odd ones. With lane 2m + j holding column m's pair j (the first vector
// columns 0..7, the second 8..15), they pick each column's pair j.
inline __m512i even_lanes() {
  return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}

// One sum per column from a group's two vectors of lanes (lane 2m + j: column m's pair j).
inline __m512 column_sums(__m512 first, __m512 second) {
  const __m512i even = even_lanes();
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  return _mm512_add_ps(_mm512_permutex2var_ps(first, even, second),
                       _mm512_permutex2var_ps(first, odd, second));
}

// Where a tile's operands lie: rows [row, row + kRows) against the 16 columns from n, and the
// columns' codes as bfloat16 (`converted`: two vectors per line), which the tile's first pass of
// rows writes and the others read, when more rows follow.
struct Float8Tile {
  int64_t row;
  int64_t n;
  bool first_pass;
  __m512bh* converted;  // Null: one pass.
  __m512i subnormals;   // float8_subnormals(), made once per thread
};

// kRows rows from `row` against the 16 columns from n.
template <int64_t kRows>
void float8_dot_tile(const QuantizedMatrix& w, const at::BFloat16* x, const Float8Tile& tile,
                     const float* bias, at::BFloat16* y, int64_t out_features) {
  const int64_t row = tile.row, n = tile.n;
  const __m512i subnormals = tile.subnormals;
  const uint8_t* codes = w.column_codes(n);
  const int64_t next_tile = kWordColumns * w.in_features;
  const int64_t lines_per_group = w.group_size / kFloat8LineDims;
  __m512 totals[kRows];
  for (auto& total : totals) total = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m512 sums[kRows][2];
    for (auto& row_sums : sums) row_sums[0] = row_sums[1] = _mm512_setzero_ps();
    for (int64_t q = g * lines_per_group; q < (g + 1) * lines_per_group; ++q) {
      __m512bh halves[2];
      if (tile.first_pass) {
        const uint8_t* line = codes + q * kLineBytes;
        _mm_prefetch(reinterpret_cast<const char*>(line + next_tile), _MM_HINT_T0);
        const __m512i bytes = _mm512_loadu_si512(line);
        halves[0] = float8_as_bf16(_mm512_castsi512_si256(bytes), subnormals);
        halves[1] = float8_as_bf16(_mm512_extracti64x4_epi64(bytes, 1), subnormals);
        if (tile.converted != nullptr) {
          tile.converted[2 * q] = halves[0];
          tile.converted[2 * q + 1] = halves[1];
        }
      } else {
        halves[0] = tile.converted[2 * q];
        halves[1] = tile.converted[2 * q + 1];
      }
      for (int64_t r = 0; r < kRows; ++r) {
        int64_t values;
        std::memcpy(&values, x + (row + r) * w.in_features + q * kFloat8LineDims, sizeof(values));
        const auto broadcast = reinterpret_cast<__m512bh>(_mm512_set1_epi64(values));
        sums[r][0] = _mm512_dpbf16_ps(sums[r][0], broadcast, halves[0]);
        sums[r][1] = _mm512_dpbf16_ps(sums[r][1], broadcast, halves[1]);
      }
    }
    const __m512 scales = _mm512_loadu_ps(w.scales + w.group_index(n, g));
    for (int64_t r = 0; r < kRows; ++r) {
      totals[r] = _mm512_fmadd_ps(scales, column_sums(sums[r][0], sums[r][1]), totals[r]);
    }
  }
  const __m512 biases = bias != nullptr ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
  for (int64_t r = 0; r < kRows; ++r) {
    store_bf16x16(y + (row + r) * out_features + n, _mm512_add_ps(totals[r], biases));
  }
}

// y [rows, N] for bfloat16 x and FP8 codes in tile order (N a multiple of 16).
void float8_dot_multiply(const QuantizedMatrix& w, const at::BFloat16* x, int64_t row_count,
                         const float* bias, int64_t out_features, at::BFloat16* y) {
  const int64_t tiles = out_features / kWordColumns;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Converted once per tile where more than one pass of rows reads it.
    std::vector<__m512bh> converted(row_count > kFloat8Rows ? 2 * w.in_features / 4 : 0);
    const __m512i subnormals = float8_subnormals();
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t row = 0; row < row_count; row += kFloat8Rows) {
        const Float8Tile tile{row, t * kWordColumns, row == 0,
                              converted.empty() ? nullptr : converted.data(), subnormals};
        with_count<kFloat8Rows>(std::min(kFloat8Rows, row_count - row), [&](auto count) {
          float8_dot_tile<decltype(count)::value>(w, x, tile, bias, y, out_features);
        });
      }
    }
  });
}
#endif

// ---- FP8 and level codes times bfloat16 rows by AMX (builds for CPUs with AMX).
//
// On a CPU with AMX, the dot products above ran 32 rows at a quarter of AMX's bfloat16 matmul's
// speed. There, a thread instead converts each block of 32 columns' codes to bfloat16 once per
// call, exactly as the dot products do, into pack_linear_bf16's layout (per pair of dimensions,
// the 32 columns' two values side by side), which amx_bf16.h's block multiply takes as it takes
// a bfloat16 weight: up to 32 rows at a time, a group of dimensions after another, each group's
// float32 sums scaled into the rows' totals. The first 32 rows convert each step of 32
// dimensions just before its tile multiplies, while it is in L1; later rows read it back. Every
// row of every call of such a weight takes this path (where Linux grants the tiles and a group
// is whole steps of 32 dimensions), so a row's output does not depend on its batch. A step's
// FP8 projections of the default model ran 3.5x as fast as by the dot products at 32 rows (as
// fast as bfloat16's AMX matmul), 1.9x at 8, and 0.8x at one row, where the same loops without
// their few tile instructions ran about 1.2x as fast, more than the tile multiplies' own
// throughput accounts for. Level codes (NF4, FP4; without offsets, as bitsandbytes makes them)
// take the same loop, their pair rows in the dot products' order of dimensions and x's pairs
// gathered alike (pair_rows): 4.3x as fast as by the dot products at 32 rows, 1.8x at 8, 0.63x
// at one row.
#if defined(SLUICE_FLOAT8_DOTS) && defined(SLUICE_PAIR_DOTS) && defined(SLUICE_AMX)
#define SLUICE_CONVERTED_AMX 1
constexpr int64_t kAmxStepDims = 2 * kAmxPairs;  // dimensions per tile multiply
constexpr int64_t kFloat8StepLines = kAmxStepDims / kFloat8LineDims;

inline bool takes_float8_amx(const QuantizedMatrix& w) {
  return takes_float8_dots(w) && w.group_size % kAmxStepDims == 0 && amx_granted();
}

inline bool takes_levels_amx(const QuantizedMatrix& w) {
  return w.format == CodeFormat::kLevels4 && w.offsets == nullptr && takes_pair_dots(w) &&
         amx_granted();
}

// Both writers put step s's pair rows (the 32 columns from n, dimensions [32 s, 32 s + 32)) in
// `tile`, the row for pair p at tile[2p] (columns 0-15) and tile[2p + 1] (16-31; zeros where
// only 16 columns remain). This calls convert(line, half, i) with each tile-order line i of the
// step's codes of each half that holds columns, and zeroes the other half's rows.
template <typename ConvertLine>
inline void for_each_step_line(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t step,
                               __m512bh* tile, const ConvertLine& convert) {
  const int64_t step_bytes = kAmxStepDims * w.bits() / 8 * kWordColumns;
  const int64_t next_block = kLinearColumns * w.code_bytes_per_column();
  for (int64_t half = 0; half < 2; ++half) {
    if (kWordColumns * half >= columns) {
      for (int64_t p = kAmxPairs * step; p < kAmxPairs * (step + 1); ++p) {
        tile[2 * p + half] = reinterpret_cast<__m512bh>(_mm512_setzero_si512());
      }
      continue;
    }
    const uint8_t* lines = w.column_codes(n + kWordColumns * half) + step * step_bytes;
    for (int64_t i = 0; i < step_bytes / kLineBytes; ++i) {
      const uint8_t* line = lines + i * kLineBytes;
      _mm_prefetch(reinterpret_cast<const char*>(line + next_block), _MM_HINT_T0);
      convert(_mm512_loadu_si512(line), half, i);
    }
  }
}

// FP8 codes: a tile-order line, 4 dimensions of 16 columns, converts to two vectors of 8
// columns' two pairs (lane 2m + j: column m's pair j), whose even and odd lanes make the line's
// two pair rows of 16 columns.
struct Float8PairRows {
  __m512i subnormals = float8_subnormals();
  __m512i even = even_lanes();
  __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));

  void write(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t step,
             __m512bh* tile) const {
    for_each_step_line(w, n, columns, step, tile, [&](__m512i bytes, int64_t half, int64_t i) {
      const int64_t q = step * kFloat8StepLines + i;
      const auto low = reinterpret_cast<__m512i>(
          float8_as_bf16(_mm512_castsi512_si256(bytes), subnormals));
      const auto high = reinterpret_cast<__m512i>(
          float8_as_bf16(_mm512_extracti64x4_epi64(bytes, 1), subnormals));
      tile[4 * q + half] = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi32(low, even, high));
      tile[4 * q + 2 + half] =
          reinterpret_cast<__m512bh>(_mm512_permutex2var_epi32(low, odd, high));
    });
  }
};

// Level codes: a step is a run, whose 4 tile-order lines make its 16 pair rows of 16 columns,
// line i's vectors (line_pairs) the pairs 4i to 4i + 3 of the run's gathered order.
struct LevelPairRows {
  __m512i levels;

  void write(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t step,
             __m512bh* tile) const {
    for_each_step_line(w, n, columns, step, tile, [&](__m512i line, int64_t half, int64_t i) {
      __m512bh vectors[4];
      line_pairs<true>(line, levels, vectors);
      for (int v = 0; v < 4; ++v) tile[2 * (step * kPairsPerRun + 4 * i + v) + half] = vectors[v];
    });
  }
};

// The rows' totals of the 32 columns from n plus group g's sums ([rows][32] each) times the
// columns' scales of the group.
inline void add_group(const QuantizedMatrix& w, int64_t n, int64_t columns, int64_t g,
                      int64_t count, const float* sums, float* totals) {
  for (int64_t half = 0; half < 2 && kWordColumns * half < columns; ++half) {
    const __m512 scales = _mm512_loadu_ps(w.scales + w.group_index(n + kWordColumns * half, g));
    for (int64_t r = 0; r < count; ++r) {
      float* total = totals + r * kLinearColumns + kWordColumns * half;
      const __m512 group_sums = _mm512_load_ps(sums + r * kLinearColumns + kWordColumns * half);
      _mm512_store_ps(total, _mm512_fmadd_ps(scales, group_sums, _mm512_load_ps(total)));
    }
  }
}

// y [rows, N] for bfloat16 x (in the order of dimensions `writer`'s pair rows take) and codes
// in tile order (N a multiple of 16).
template <typename Writer>
void converted_amx_multiply(const QuantizedMatrix& w, const Writer& writer,
                            const at::BFloat16* x, int64_t row_count, const float* bias,
                            int64_t out_features, at::BFloat16* y) {
  const int64_t blocks = (out_features + kLinearColumns - 1) / kLinearColumns;
  const int64_t group_pairs = w.group_size / 2;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // in_features / 2 pair rows of two vectors, each written before it is read.
    const auto tile = std::make_unique_for_overwrite<__m512bh[]>(w.in_features);
    const auto* tile_bytes = reinterpret_cast<const char*>(tile.get());
    alignas(64) float sums[kAmxBlockRows * kLinearColumns];
    alignas(64) float totals[kAmxBlockRows * kLinearColumns];
    int64_t configured = 0;  // the rows of the tile configuration loaded; 0: none yet
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kLinearColumns;
      const int64_t columns = std::min(kLinearColumns, out_features - n);
      for (int64_t row = 0; row < row_count; row += kAmxBlockRows) {
        const int64_t count = std::min(kAmxBlockRows, row_count - row);
        if (count != configured) {
          block_config(std::min(count, kAmxRows), std::max<int64_t>(count - kAmxRows, 0)).load();
          configured = count;
        }
        std::fill(totals, totals + count * kLinearColumns, 0.f);
        for (int64_t g = 0; g < w.groups(); ++g) {
          const AmxBlock block{x + row * w.in_features + g * w.group_size, w.in_features,
                               tile_bytes + g * group_pairs * kPackedPairBytes, group_pairs,
                               false};
          // The first block of rows converts each step's codes just before multiplying them.
          const auto convert = [&](int64_t p) {
            if (row > 0) return;
            writer.write(w, n, columns, (g * group_pairs + p) / kAmxPairs, tile.get());
          };
          if (count > kAmxRows) {
            amx_block<2>(block, sums, convert);
          } else {
            amx_block<1>(block, sums, convert);
          }
          add_group(w, n, columns, g, count, sums, totals);
        }
        store_amx_rows(totals, count, bias != nullptr ? bias + n : nullptr, columns,
                       y + row * out_features + n, out_features);
      }
    }
    if (configured != 0) _tile_release();
  });
}

void float8_amx_multiply(const QuantizedMatrix& w, const at::BFloat16* x, int64_t row_count,
                         const float* bias, int64_t out_features, at::BFloat16* y) {
  converted_amx_multiply(w, Float8PairRows{}, x, row_count, bias, out_features, y);
}

void levels_amx_multiply(const QuantizedMatrix& w, const at::BFloat16* x, int64_t row_count,
                         const float* bias, int64_t out_features, at::BFloat16* y) {
  const PairRows rows = pair_rows(x, row_count, w);
  const auto* gathered = reinterpret_cast<const at::BFloat16*>(rows.pairs.data());
  converted_amx_multiply(w, LevelPairRows{bfloat16_levels(w.levels)}, gathered, row_count, bias,
                         out_features, y);
}
#endif

// ---- Prompt rows: the codes dequantized to bfloat16, a tile of 32 columns at a time.
//
// A prompt brings many rows, and per row the paths above do more work than a bfloat16 matmul
// (unpacking the codes, and for integers two multiply-adds per pair of codes where AVX512-BF16
// has one dot product): they ran a 128-row call at about 0.6x bfloat16's speed. Rows that are a
// prompt's tokens instead multiply the weight dequantized once per tile of 32 columns into
// linear.cpp's packed layout, by linear.cpp's loops. The other rows (tokens being decoded, and
// generated tokens recomputed after a preemption) keep the paths above. A row's path depends on
// what the row is, never on how many rows share the call, so a token's arithmetic is the same
// whatever its batch. The tile holds each weight rounded to bfloat16, as a bfloat16 model does,
// so a prompt row's output is linear_bf16's on that weight, bit for bit.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SLUICE_DENSE_PROMPTS 1
// Columns a tile is filled with at a time: their pairs of dimensions are transposed in registers
// into the tile's rows of 32 columns.
constexpr int64_t kFillColumns = 4;

// The codes of columns n .. n + 3's run `run` (16 bytes each: 32 4-bit codes or 16 8-bit ones) in
// tile order (tile_order_codes): word q of the 4 columns lies as 16 bytes, transposed here into
// each column's 16 bytes.
inline void tile_order_runs(const QuantizedMatrix& w, int64_t n, int64_t run,
                            __m128i (&columns)[kFillColumns]) {
  constexpr int64_t kGroupColumns = 16, kWordBytes = 4, kWords = 4;
  constexpr int64_t kLineBytes = kGroupColumns * kWordBytes;  // a word of every column
  const int64_t column = n % kGroupColumns;
  const uint8_t* line =
      w.column_codes(n - column) + run * kWords * kLineBytes + column * kWordBytes;
  __m128i words[kWords];
  for (int64_t q = 0; q < kWords; ++q) {
    words[q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + q * kLineBytes));
  }
  const __m128i first01 = _mm_unpacklo_epi32(words[0], words[1]);
  const __m128i second01 = _mm_unpackhi_epi32(words[0], words[1]);
  const __m128i first23 = _mm_unpacklo_epi32(words[2], words[3]);
  const __m128i second23 = _mm_unpackhi_epi32(words[2], words[3]);
  columns[0] = _mm_unpacklo_epi64(first01, first23);
  columns[1] = _mm_unpackhi_epi64(first01, first23);
  columns[2] = _mm_unpacklo_epi64(second01, second23);
  columns[3] = _mm_unpackhi_epi64(second01, second23);
}

// Column n's `block` of codes (group g) as weights: scale times value plus offset, as
// QuantizedWeight.dequantize computes them.
inline UnpackedBlock weight_block(const QuantizedMatrix& w, int64_t n, int64_t g,
                                  UnpackedBlock block) {
  const int64_t halves[2] = {w.group_index(n, g),
                             w.group_index(n, w.group_size == kHalfBlock ? g + 1 : g)};
  scale_block({w.scales[halves[0]] * w.code_scale(), w.scales[halves[1]] * w.code_scale()}, block);
  if (w.offsets == nullptr) return block;
  for (int i = 0; i < 4; ++i) {
    // The product is rounded before the offset joins, as dequantize() rounds it: the empty asm
    // keeps the compiler from fusing the two into an FMA.
    __m256 product = block.values[i];
    asm("" : "+x"(product));
    block.values[i] = _mm256_add_ps(product, _mm256_set1_ps(w.offsets[halves[i < 2 ? 0 : 1]]));
  }
  return block;
}

// A block's 32 weights as bfloat16, 16 pairs of dimensions (2p, 2p + 1) in 32-bit words: pairs
// [0 1 4 5 | 2 3 6 7] in the first vector and 8 more in the second (packus' lane order).
struct BlockPairs {
  __m256i first, second;
};

inline BlockPairs block_pairs(const UnpackedBlock& block) {
  const auto bits = [&](int i) { return bf16_bits_x8(block.values[i]); };
  return {_mm256_packus_epi32(bits(0), bits(1)), _mm256_packus_epi32(bits(2), bits(3))};
}

// Four columns' 8 pairs (one of BlockPairs' vectors each) into the tile, whose 32-bit word
// p * kLinearColumns + c holds column c's pair p (pack_linear_bf16's layout): a 4 x 4 transpose
// in each 128-bit lane, then one 16-byte store per pair.
inline void store_pairs(const __m256i (&columns)[kFillColumns], uint32_t* words) {
  const __m256i low01 = _mm256_unpacklo_epi32(columns[0], columns[1]);
  const __m256i high01 = _mm256_unpackhi_epi32(columns[0], columns[1]);
  const __m256i low23 = _mm256_unpacklo_epi32(columns[2], columns[3]);
  const __m256i high23 = _mm256_unpackhi_epi32(columns[2], columns[3]);
  // Each holds the four columns' words of pair kPairs[r] in its low lane, of kPairs[r] + 2 in
  // its high lane.
  const __m256i pairs[4] = {
      _mm256_unpacklo_epi64(low01, low23), _mm256_unpackhi_epi64(low01, low23),
      _mm256_unpacklo_epi64(high01, high23), _mm256_unpackhi_epi64(high01, high23)};
  constexpr int kPairs[4] = {0, 1, 4, 5};
  for (int r = 0; r < 4; ++r) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(words + kPairs[r] * kLinearColumns),
                     _mm256_castsi256_si128(pairs[r]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(words + (kPairs[r] + 2) * kLinearColumns),
                     _mm256_extracti128_si256(pairs[r], 1));
  }
}

// Tile t (columns [32 t, 32 t + 32)) of the dequantized weight; columns past out_features zero.
void fill_tile(const QuantizedMatrix& w, int64_t out_features, int64_t t, at::BFloat16* tile) {
  auto* words = reinterpret_cast<uint32_t*>(tile);
  LevelTable levels{_mm256_setzero_ps(), _mm256_setzero_ps()};
  if (w.levels != nullptr) levels = {_mm256_loadu_ps(w.levels), _mm256_loadu_ps(w.levels + 8)};
  for (int64_t c = 0; c < kLinearColumns; c += kFillColumns) {
    const int64_t n = t * kLinearColumns + c;
    const int64_t columns = std::clamp<int64_t>(out_features - n, 0, kFillColumns);
    for_each_block(w, [&](int64_t b, int64_t g) {
      __m256i first[kFillColumns], second[kFillColumns];
      // In tile order out_features is whole groups of 16 columns: all 4 columns or none. A
      // block of 32 codes is one run of 4-bit codes, two of 8-bit ones.
      __m128i runs[2][kFillColumns];
      const int64_t runs_per_block = w.bits() / 4;
      for (int64_t r = 0; w.tile_order && columns > 0 && r < runs_per_block; ++r) {
        tile_order_runs(w, n, b * runs_per_block + r, runs[r]);
      }
      for (int64_t k = 0; k < kFillColumns; ++k) {
        const auto unpacked = [&] {
          if (!w.tile_order) {
            return unpack_block_avx2(w, w.column_codes(n + k) + b * w.block_bytes());
          }
          if (w.format == CodeFormat::kUnsigned4) return unpack_nibbles_avx2(runs[0][k], nullptr);
          if (w.format == CodeFormat::kLevels4) return unpack_nibbles_avx2(runs[0][k], &levels);
          if (w.format == CodeFormat::kSigned8) return unpack_int8_avx2(runs[0][k], runs[1][k]);
          alignas(32) uint8_t bytes[kCodeBlock];
          _mm_store_si128(reinterpret_cast<__m128i*>(bytes), runs[0][k]);
          _mm_store_si128(reinterpret_cast<__m128i*>(bytes + kHalfBlock), runs[1][k]);
          return unpack_block_avx2(w, bytes);
        };
        const BlockPairs pairs = k < columns ? block_pairs(weight_block(w, n + k, g, unpacked()))
                                             : BlockPairs{_mm256_setzero_si256(),
                                                          _mm256_setzero_si256()};
        first[k] = pairs.first;
        second[k] = pairs.second;
      }
      uint32_t* block_words = words + b * (kCodeBlock / 2) * kLinearColumns + c;
      store_pairs(first, block_words);
      store_pairs(second, block_words + 8 * kLinearColumns);
    });
  }
}

at::Tensor multiply_prompt_rows(const QuantizedMatrix& w, const at::Tensor& x,
                                const float* bias, int64_t out_features) {
  const auto fill = [&](int64_t t, at::BFloat16* tile) { fill_tile(w, out_features, t, tile); };
  return linear_bf16_filled(x, out_features, bias, FillTile(fill));
}
#endif

// prompt_rows checked (int64 row indexes of x, each at most once) and the rows it leaves out.
at::Tensor rows_not_listed(const at::Tensor& prompt_rows, int64_t row_count) {
  check_cpu(prompt_rows, "prompt_rows");
  TORCH_CHECK(prompt_rows.dim() == 1 && prompt_rows.scalar_type() == at::kLong,
              "prompt_rows must be int64 [rows]");
  const at::Tensor listed = prompt_rows.contiguous();
  std::vector<bool> seen(row_count, false);
  const int64_t* rows = listed.data_ptr<int64_t>();
  for (int64_t i = 0; i < listed.numel(); ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < row_count && !seen[rows[i]], "prompt_rows lists row ",
                rows[i], ", which is out of range [0, ", row_count, ") or listed twice");
    seen[rows[i]] = true;
  }
  auto others = at::empty({row_count - listed.numel()}, listed.options());
  int64_t* other_rows = others.data_ptr<int64_t>();
  for (int64_t r = 0; r < row_count; ++r) {
    if (!seen[r]) *other_rows++ = r;
  }
  return others;
}

QuantizedMatrix checked_matrix(const at::Tensor& codes, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& offsets, int64_t code_format,
                               int64_t group_size, const c10::optional<at::Tensor>& levels) {
  check_cpu(codes, "codes");
  check_cpu(scales, "scales");
  TORCH_CHECK(code_format >= 0 && code_format <= static_cast<int64_t>(CodeFormat::kLevels4),
              "unknown code format ", code_format);
  const auto format = static_cast<CodeFormat>(code_format);
  TORCH_CHECK(levels.has_value() == (format == CodeFormat::kLevels4),
              "levels are given with, and only with, 4-bit level codes");
  const float* level_data = nullptr;
  if (levels.has_value()) {
    check_cpu(*levels, "levels");
    TORCH_CHECK(levels->scalar_type() == at::kFloat && levels->is_contiguous() &&
                    levels->dim() == 1 && levels->size(0) == kLevelCount,
                "levels must be contiguous float32 [", kLevelCount, "]");
    level_data = levels->data_ptr<float>();
  }
  TORCH_CHECK(group_size == kHalfBlock || (group_size > 0 && group_size % kCodeBlock == 0),
              "group_size must be ", kHalfBlock, " or a multiple of ", kCodeBlock);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
                  (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar),
              "codes must be contiguous uint8 or int8 [out_features, in_features * bits / 8]");
  QuantizedMatrix w{static_cast<const uint8_t*>(codes.data_ptr()),
                    scales.data_ptr<float>(),
                    nullptr,
                    level_data,
                    format,
                    group_size,
                    0,
                    0};
  const int64_t out_features = codes.size(0);
  w.in_features = codes.size(1) * 8 / w.bits();
  TORCH_CHECK(w.in_features % kCodeBlock == 0, "in_features (", w.in_features,
              ") must be a multiple of ", kCodeBlock);
  TORCH_CHECK(w.in_features % group_size == 0, "in_features (", w.in_features,
              ") must be a multiple of group_size (", group_size, ")");
  w.group_count = w.in_features / group_size;
  const auto check_groups = [&](const at::Tensor& tensor, const char* name) {
    TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous() &&
                    tensor.dim() == 2 && tensor.size(0) == out_features &&
                    tensor.size(1) == w.groups(),
                name, " must be contiguous float32 [out_features, in_features / group_size]");
  };
  check_groups(scales, "scales");
  if (offsets.has_value()) {
    check_cpu(*offsets, "offsets");
    check_groups(*offsets, "offsets");
    w.offsets = offsets->data_ptr<float>();
  }
  return w;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Every row against columns [begin, end), a panel of kPanelColumns at a time.
template <typename Out>
void panel_columns(const QuantizedMatrix& w, const RowBlock<Out>& block, const float* bias,
                   int64_t row_count, int64_t begin, int64_t end) {
  std::vector<float> panel(kPanelColumns * w.in_features);
  for (int64_t n = begin; n < end; n += kPanelColumns) {
    const int64_t columns = std::min(kPanelColumns, end - n);
    fill_panel(w, n, columns, panel.data());
    with_count<kPanelColumns>(columns, [&](auto column_count) {
      constexpr int64_t kCols = decltype(column_count)::value;
      for (int64_t row = 0; row < row_count; row += kPanelRows) {
        with_count<kPanelRows>(std::min(kPanelRows, row_count - row), [&](auto row_count_) {
          constexpr int64_t kRows = decltype(row_count_)::value;
          float dots[kRows][kCols];
          const float* x = block.x + row * block.in_features;
          panel_dots<kRows, kCols>(panel.data(), x, block.in_features, dots);
          store_tile<kRows, kCols>(w, block, bias, row, n, dots);
        });
      }
    });
  }
}
#endif

template <typename T>
void multiply(const T* x, int64_t row_count, const QuantizedMatrix& w, const float* bias,
              int64_t out_features, T* y) {
  FloatRows rows;
  widen_rows(x, row_count, w.in_features, w, rows);
  const RowBlock<T> block{rows.data,
                          w.offsets != nullptr ? rows.group_sums.data() : nullptr,
                          y,
                          w.in_features,
                          w.groups(),
                          out_features};
#if defined(SLUICE_INTEGER_AMX)
  if (takes_amx_integer_path(w)) return tile_integer_multiply(w, rows.data, row_count, block, bias);
#endif
  if (takes_integer_path(w)) return integer_multiply(w, rows.data, row_count, block, bias);
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (takes_panel_path(w, row_count)) {
      return panel_columns(w, block, bias, row_count, begin, end);
    }
#endif
    for (int64_t row = 0; row < row_count; row += kRowsPerPass) {
      with_count<kRowsPerPass>(std::min(kRowsPerPass, row_count - row), [&](auto count) {
        quantized_columns<decltype(count)::value>(w, block, bias, row, begin, end);
      });
    }
  });
}

}  // namespace

c10::optional<at::Tensor> tile_order_codes(const at::Tensor& codes, int64_t code_format,
                                           int64_t group_size, bool bfloat16_rows) {
  const auto format = static_cast<CodeFormat>(code_format);
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
                  (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar),
              "codes must be contiguous uint8 or int8 [out_features, in_features * bits / 8]");
  QuantizedMatrix w{};
  w.format = format;
  w.group_size = group_size;
  w.in_features = codes.size(1) * 8 / w.bits();
  const bool whole = group_size > 0 && w.in_features % kCodeBlock == 0 &&
                     w.in_features % group_size == 0 && codes.size(0) % kWordColumns == 0;
  bool regroup = false;  // whether the weight's path reads the codes in tile order
#if defined(SLUICE_FLOAT8_DOTS)
  regroup = bfloat16_rows && takes_float8_dots(w);
#endif
#if defined(SLUICE_INTEGER_AMX)
  regroup = regroup || takes_amx_integer_path(w);
#endif
#if defined(SLUICE_PAIR_DOTS)
  regroup = regroup || (bfloat16_rows && takes_pair_dots(w));
#endif
  (void)bfloat16_rows;
  if (!whole || !regroup) return c10::nullopt;
  // [N][words][4 bytes] -> [N / 16][words][16 columns][4 bytes]
  const int64_t rows = codes.size(0), bytes = codes.size(1);
  constexpr int64_t kWordBytes = 4;
  return codes.view({rows / kWordColumns, kWordColumns, bytes / kWordBytes, kWordBytes})
      .permute({0, 2, 1, 3})
      .contiguous()
      .view({rows, bytes});
}

at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets,
                            const c10::optional<at::Tensor>& bias, int64_t code_format,
                            int64_t group_size, const c10::optional<at::Tensor>& levels,
                            const c10::optional<at::Tensor>& prompt_rows, bool tile_order) {
  check_rows(x, "x");
  QuantizedMatrix w = checked_matrix(codes, scales, offsets, code_format, group_size, levels);
  if (tile_order) {
    bool dot_products = false;
#if defined(SLUICE_FLOAT8_DOTS)
    dot_products = takes_float8_dots(w);
#endif
#if defined(SLUICE_PAIR_DOTS)
    dot_products = dot_products || takes_pair_dots(w);
#endif
#if defined(SLUICE_INTEGER_AMX)
    const bool tiles = takes_amx_integer_path(w) && codes.size(0) % kTileColumns == 0;
#else
    const bool tiles = false;
#endif
    TORCH_CHECK(tiles || (dot_products && codes.size(0) % kWordColumns == 0),
                "codes in tile order, which only tile_order_codes makes");
    TORCH_CHECK(!dot_products || x.scalar_type() == at::kBFloat16,
                "codes in tile order for bfloat16 dot products multiply bfloat16 rows only");
    w.tile_order = true;
  }
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.in_features, "x must be [rows, ", w.in_features, "]");
  const int64_t out_features = codes.size(0);
  const float* bias_data = nullptr;
  at::Tensor bias_float;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must be [out_features]");
    bias_float = bias->to(at::kFloat).contiguous();
    bias_data = bias_float.data_ptr<float>();
  }
  const at::Tensor rows = x.contiguous();
  const auto decode_rows = [&](const at::Tensor& part) {
    auto y = at::empty({part.size(0), out_features}, part.options());
#if defined(SLUICE_FLOAT8_DOTS)
    if (w.tile_order && takes_float8_dots(w)) {
      const auto* x_data = part.data_ptr<at::BFloat16>();
      auto* y_data = y.data_ptr<at::BFloat16>();
#if defined(SLUICE_CONVERTED_AMX)
      if (takes_float8_amx(w)) {
        float8_amx_multiply(w, x_data, part.size(0), bias_data, out_features, y_data);
        return y;
      }
#endif
      float8_dot_multiply(w, x_data, part.size(0), bias_data, out_features, y_data);
      return y;
    }
#endif
#if defined(SLUICE_PAIR_DOTS)
    if (w.tile_order && takes_pair_dots(w)) {
#if defined(SLUICE_CONVERTED_AMX)
      if (takes_levels_amx(w)) {
        levels_amx_multiply(w, part.data_ptr<at::BFloat16>(), part.size(0), bias_data,
                            out_features, y.data_ptr<at::BFloat16>());
        return y;
      }
#endif
      pair_dot_multiply(w, part.data_ptr<at::BFloat16>(), part.size(0), bias_data, out_features,
                        y.data_ptr<at::BFloat16>());
      return y;
    }
#endif
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, part.scalar_type(),
                                    "linear_quantized", [&] {
                                      multiply(part.data_ptr<scalar_t>(), part.size(0), w,
                                               bias_data, out_features, y.data_ptr<scalar_t>());
                                    });
    return y;
  };
  if (!prompt_rows.has_value()) return decode_rows(rows);
  const at::Tensor others = rows_not_listed(*prompt_rows, rows.size(0));
#if defined(SLUICE_DENSE_PROMPTS)
  if (rows.scalar_type() == at::kBFloat16 && others.numel() < rows.size(0)) {
    if (others.numel() == 0) return multiply_prompt_rows(w, rows, bias_data, out_features);
    const at::Tensor listed = prompt_rows->contiguous();
    auto y = at::empty({rows.size(0), out_features}, rows.options());
    y.index_copy_(0, listed,
                  multiply_prompt_rows(w, rows.index_select(0, listed), bias_data, out_features));
    y.index_copy_(0, others, decode_rows(rows.index_select(0, others)));
    return y;
  }
#endif
  return decode_rows(rows);
}

}  // namespace sluice
