// The paged KV cache: paged_attention (queries of decodes and prompt chunks against K/V read in
// place from the cache) and write_kv (new tokens' K/V into their slots).
//
// Layout. Values: [H_kv, num_blocks, block_size, D], a block's tokens as rows. Keys:
// [H_kv, num_blocks, D, block_size] as a tensor, but within a block the elements are stored as
// [D / 2][block_size][2]: for each pair of dimensions (d, d + 1), every key's two elements side
// by side. Scoring a block against a query is then a sum over the pairs of (query[d],
// query[d + 1]) times one contiguous run of keys: vector multiply-adds with no horizontal
// reduction per key, and on CPUs with AVX512-BF16 one dot-product instruction per pair of
// dimensions and 16 keys, straight from the stored bfloat16. On CPUs with AMX, 32 dimensions of
// 16 keys are an AMX tile operand as they lie.

#include <algorithm>
#include <functional>
#include <limits>
#include <queue>
#include <utility>
#include <vector>

#include <ATen/ops/empty.h>

#include "common.h"
#include "kernels.h"

// CPUs with AVX512-BF16 (all of which have AVX512-BW) score keys and add up value rows with
// bfloat16 dot products in the fast path (attend_item_with_dot_products).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SLUICE_ATTENTION_DOT_PRODUCTS 1
// Where the CPU also has AMX, with tile multiplies instead (see "AMX" below).
#if defined(SLUICE_AMX)
#define SLUICE_ATTENTION_TILES 1
#endif
#endif

namespace sluice {
namespace {

// Where element d of the key in row `column` of a block sits within the block (see above).
inline int64_t key_offset(int64_t d, int64_t column, int64_t block_size) {
  return (d / 2) * block_size * 2 + column * 2 + (d & 1);
}

// ---------------------------------------------------------------------------------------------
// Block-level arithmetic: scoring one cache block's keys against up to kMaxVectors query
// vectors, and adding one block's value rows, weighted, into their accumulators. The block is
// read from memory once per call and worked on in registers, where the accumulators also stay
// for the whole block. A generic version serves every type; bfloat16 on AVX-512 machines gets an
// intrinsics version (head sizes 64 and 128, block sizes multiples of 16: the fast path), and
// elsewhere float32, bfloat16 and 8-bit float caches are worked on with AVX2 where the CPU has
// it: keys scored for block sizes that are multiples of 8, values added for head sizes that are
// multiples of 16, both from a float32 copy of the block made once per item where several
// groups of vectors read it (in AVX-512 builds, 16 lanes at a time where the copy or the cache is
// float32).
// With AVX512-BF16 the fast path instead scores runs of several blocks and adds value rows in
// pairs, both with bfloat16 dot products (attend_item_with_dot_products).

constexpr int64_t kMaxVectors = 4;

// Whether a cache element type is one of the 8-bit floats (--kv-cache-dtype).
template <typename C>
constexpr bool kIsFp8 =
    std::is_same_v<C, c10::Float8_e4m3fn> || std::is_same_v<C, c10::Float8_e5m2>;

// The cache element types the AVX2 loops read, widening to float32 in registers.
template <typename C>
constexpr bool kAvx2Reads =
    std::is_same_v<C, float> || std::is_same_v<C, at::BFloat16> || kIsFp8<C>;

// What the AVX2 loops read an element of a C cache as, over its value: e4m3 codes as their value
// times 2^-8, a multiply fewer per 8 codes, made up by the call's key and value scales.
template <typename C>
constexpr float kAvx2ReadScale = std::is_same_v<C, c10::Float8_e4m3fn> ? 1.f / 256 : 1.f;

// The float32 value of each of the 256 codes of an 8-bit float.
template <typename C>
const std::vector<float>& fp8_values() {
  static const std::vector<float> values = [] {
    std::vector<float> table(256);
    for (int code = 0; code < 256; ++code) {
      table[code] = static_cast<float>(C(static_cast<uint8_t>(code), C::from_bits()));
    }
    return table;
  }();
  return values;
}

// What the block arithmetic needs to know of the cache and the call.
struct BlockShape {
  int64_t head_dim;
  int64_t block_size;
  bool fast;          // Whether the AVX-512 version applies (has_fast_path).
  bool avx2_scores;   // Whether keys are scored with AVX2 (has_avx2_scores).
  bool avx2_values;   // Whether value rows are added with AVX2 (has_avx2_values).
  float scale;        // The softmax scale, which the bfloat16 dot products apply to their sums.
};

// Query vectors, [count][head_dim], float32 multiplied by the scale: up to kMaxVectors (or
// kAvx2ScoreVectors for the AVX2 tiles, kWideScoreVectors for their 16-lane version, which reads
// the same vectors as [head_dim][count] from `by_dimension`: see gather_queries).
struct QueryVectors {
  const float* scaled;
  int64_t count;
  const float* by_dimension;
};

// One row of floats per query vector, `stride` apart, from a block's first column: scores, then
// softmax weights.
struct ScoreRows {
  float* data;
  int64_t stride;
};

// scores[v][c] = queries[v] . (key c) for every column c of the block (columns past the
// sequence's context are scored too and ignored by the caller).
template <typename T>
inline void score_block_generic(BlockShape shape, QueryVectors queries,
                                const T* __restrict keys_t, ScoreRows scores) {
  const int64_t head_dim = shape.head_dim;
  const int64_t block_size = shape.block_size;
  const float* __restrict query_data = queries.scaled;
  for (int64_t column = 0; column < block_size; column += kLanes) {
    const int64_t count = std::min(kLanes, block_size - column);
    float sums[kMaxVectors][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      float keys[kLanes] = {};
      for (int64_t lane = 0; lane < count; ++lane) {
        keys[lane] = to_float(keys_t[key_offset(d, column + lane, block_size)]);
      }
      for (int64_t v = 0; v < queries.count; ++v) {
        const float q = query_data[v * head_dim + d];
#pragma omp simd
        for (int64_t lane = 0; lane < kLanes; ++lane) sums[v][lane] += q * keys[lane];
      }
    }
    for (int64_t v = 0; v < queries.count; ++v) {
      for (int64_t lane = 0; lane < count; ++lane) {
        scores.data[v * scores.stride + column + lane] = sums[v][lane];
      }
    }
  }
}

// accumulators[v][:] += sum over r < num_rows of weights[v][r] * rows[r][:].
template <typename T>
inline void accumulate_block_generic(int64_t head_dim, int64_t num_vectors,
                                     float* __restrict accumulators, const T* __restrict rows,
                                     int64_t num_rows, ScoreRows weights) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const T* row = rows + r * head_dim;
    for (int64_t v = 0; v < num_vectors; ++v) {
      const float weight = weights.data[v * weights.stride + r];
      float* accumulator = accumulators + v * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) accumulator[d] += weight * to_float(row[d]);
    }
  }
}

#if defined(__AVX512F__)
// sums[v] += queries[v][d : d + 2] . (16 keys' elements d and d + 1), from one 512-bit load of
// the pair layout: element d in the low half of each 32-bit lane, d + 1 in the high half.
template <int64_t kVectors>
inline void accumulate_key_pairs(__m512* __restrict sums, QueryVectors queries, int64_t head_dim,
                                 int64_t d, const at::BFloat16* __restrict keys) {
  const __m512i pairs = _mm512_loadu_si512(keys);
  const __m512 keys_even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512 keys_odd = _mm512_castsi512_ps(
      _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  for (int64_t v = 0; v < kVectors; ++v) {
    const float* q = queries.scaled + v * head_dim + d;
    sums[v] = _mm512_fmadd_ps(_mm512_set1_ps(q[0]), keys_even, sums[v]);
    sums[v] = _mm512_fmadd_ps(_mm512_set1_ps(q[1]), keys_odd, sums[v]);
  }
}

// Without AVX512-BF16: the float32 queries are scaled already.
template <int64_t kVectors>
inline void score_block_bf16(BlockShape shape, QueryVectors queries,
                             const at::BFloat16* __restrict keys_t, ScoreRows scores) {
  const int64_t head_dim = shape.head_dim;
  const int64_t block_size = shape.block_size;
  // Two partial sums per vector (alternate pairs of dimensions): independent chains of
  // multiply-adds keep more of them in flight. head_dim is a multiple of 16, so of 4.
  for (int64_t column = 0; column < block_size; column += kLanes) {
    __m512 first[kVectors], second[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) first[v] = second[v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 4) {
      accumulate_key_pairs<kVectors>(first, queries, head_dim, d,
                                     keys_t + key_offset(d, column, block_size));
      accumulate_key_pairs<kVectors>(second, queries, head_dim, d + 2,
                                     keys_t + key_offset(d + 2, column, block_size));
    }
    for (int64_t v = 0; v < kVectors; ++v) {
      _mm512_storeu_ps(scores.data + v * scores.stride + column,
                       _mm512_add_ps(first[v], second[v]));
    }
  }
}

template <int64_t kVectors, int64_t kChunks>
inline void accumulate_block_bf16(float* __restrict accumulators,
                                  const at::BFloat16* __restrict rows, int64_t num_rows,
                                  ScoreRows weights) {
  constexpr int64_t head_dim = kChunks * kLanes;
  __m512 sums[kVectors][kChunks];
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kChunks; ++c) {
      sums[v][c] = _mm512_loadu_ps(accumulators + v * head_dim + c * kLanes);
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    __m512 row[kChunks];
    for (int64_t c = 0; c < kChunks; ++c) row[c] = load_bf16x16(rows + r * head_dim + c * kLanes);
    for (int64_t v = 0; v < kVectors; ++v) {
      const __m512 weight = _mm512_set1_ps(weights.data[v * weights.stride + r]);
      for (int64_t c = 0; c < kChunks; ++c) {
        sums[v][c] = _mm512_fmadd_ps(weight, row[c], sums[v][c]);
      }
    }
  }
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kChunks; ++c) {
      _mm512_storeu_ps(accumulators + v * head_dim + c * kLanes, sums[v][c]);
    }
  }
}

#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
// The value pass with bfloat16 dot products: value rows r and r + 1, interleaved element by
// element, are one operand of vdpbf16ps and the two rows' softmax weights (rounded to bfloat16,
// as GPU flash attention rounds them) the other, so one instruction adds two rows to 16
// dimensions of a sum. Widening every row to float32 for multiply-adds took twice the
// instructions, and made this pass the largest part of a prompt's attention time.

// Two value rows a and b interleave with one unpack each way per 32 dimensions: unpacklo gives
// dimensions {0-3, 8-11, 16-19, 24-27} (four per 128-bit lane), unpackhi the other half, so
// the sums come out in that order; at the end a two-source permute puts each 16 back in order.
// (A cross-lane word permute would give the natural order at once, but it costs more than an
// unpack, and it would run once per pair of rows.)
constexpr int32_t kUnpackedOrder[2][16] = {
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
    {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31}};

// 8-bit float caches: 32 codes at a time widened to bfloat16, exactly (every e4m3 and e5m2
// value is a bfloat16 one), by looking each code's magnitude up in a table of the 128 (two
// two-source word permutes, one per half, picked by the code's bit 6) and moving its sign bit
// to bfloat16's.
struct Fp8Widener {
  __m512i table[4];  // The bfloat16 bits of codes 0-127, 32 to a register.

  __m512i widen(__m256i codes) const {
    const __m512i words = _mm512_cvtepu8_epi16(codes);
    const __m512i low = _mm512_permutex2var_epi16(table[0], words, table[1]);
    const __m512i high = _mm512_permutex2var_epi16(table[2], words, table[3]);
    const __mmask32 upper = _mm512_test_epi16_mask(words, _mm512_set1_epi16(0x40));
    const __m512i magnitude = _mm512_mask_blend_epi16(upper, low, high);
    // magnitude | (code << 8 & 0x8000): bit 7, the sign, to bit 15.
    return _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(words, 8),
                                     _mm512_set1_epi16(static_cast<int16_t>(0x8000)), 0xF8);
  }
};

template <typename C>
const Fp8Widener& fp8_widener() {
  static const Fp8Widener widener = [] {
    const std::vector<float>& values = fp8_values<C>();
    alignas(64) uint16_t bits[128];
    for (int code = 0; code < 128; ++code) bits[code] = from_float<at::BFloat16>(values[code]).x;
    Fp8Widener result;
    for (int r = 0; r < 4; ++r) result.table[r] = _mm512_load_si512(bits + 32 * r);
    return result;
  }();
  return widener;
}

// Loads 32 consecutive elements of a cache of type C as bfloat16 bits, those not in `mask` as
// zeros. Made once per loop, outside it: an 8-bit cache's keeps its table in registers.
template <typename C>
struct Bf16Loads {
  Fp8Widener widener = fp8_widener<C>();

  __m512i operator()(const C* source, __mmask32 mask = ~0u) const {
    return widener.widen(_mm256_maskz_loadu_epi8(mask, source));
  }
};

template <>
struct Bf16Loads<at::BFloat16> {
  __m512i operator()(const at::BFloat16* source, __mmask32 mask = ~0u) const {
    return _mm512_maskz_loadu_epi16(mask, source);
  }
};

// Scoring with bfloat16 dot products, kColumns runs of 16 keys (from one block or several) at a
// time against kVectors query vectors: each query pair, broadcast once, multiplies every run, so
// a broadcast serves kColumns dot products (scoring one block per group of vectors took a
// broadcast per dot product, which bounded the loop). 6 x 4 sums, 4 runs and a broadcast fill 29
// of the 32 registers.
constexpr int64_t kScoreVectors = 6;
constexpr int64_t kScoreColumns = 4;

// scores[v][16 c + k] = scale * queries[v] . key k of run c, for runs of 16 keys in the pair
// layout (pair p of a run's keys at runs[c] + p * pair_stride), bfloat16 or 8-bit floats.
template <int64_t kVectors, int64_t kColumns, typename R>
inline void score_columns_bf16(int64_t head_dim, float scale, const uint32_t* __restrict queries,
                               const R* const* runs, int64_t pair_stride,
                               float* __restrict scores, int64_t score_stride) {
  const Bf16Loads<R> load;
  __m512 sums[kVectors][kColumns];
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kColumns; ++c) sums[v][c] = _mm512_setzero_ps();
  }
  for (int64_t pair = 0; pair < head_dim / 2; ++pair) {
    __m512bh keys[kColumns];
    for (int64_t c = 0; c < kColumns; ++c) {
      keys[c] = reinterpret_cast<__m512bh>(load(runs[c] + pair * pair_stride));
    }
    for (int64_t v = 0; v < kVectors; ++v) {
      const __m512bh query = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(queries[v * head_dim / 2 + pair])));
      for (int64_t c = 0; c < kColumns; ++c) {
        sums[v][c] = _mm512_dpbf16_ps(sums[v][c], keys[c], query);
      }
    }
  }
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kColumns; ++c) {
      _mm512_storeu_ps(scores + v * score_stride + c * kLanes,
                       _mm512_mul_ps(sums[v][c], _mm512_set1_ps(scale)));
    }
  }
}

// Dimensions the pair pass keeps in registers at a time: 4 sums of 16 per vector.
constexpr int64_t kPairDims = 64;
// Query vectors the pair pass adds up at once: 6 x 4 sums, the 4 operands and a weight fill 29
// of the 32 registers.
constexpr int64_t kPairVectors = 6;

// Where accumulate_pairs finds each pair of value rows as vdpbf16ps operands (16 dimensions of
// both rows, interleaved element by element, per operand; see kUnpackedOrder), 64 dimensions at
// a time: read from the
// cache and interleaved as they are needed (CachedPairs), or from an item's rows interleaved once
// into a scratch buffer (InterleavedPairs) when several groups of vectors read them.

// 64 dimensions of two consecutive value rows, `first` and the one head_dim after it (each as
// zeros where not `first_seen` or `second_seen`), interleaved into a pair's four operands.
template <typename C>
inline void interleave_rows(const Bf16Loads<C>& load, const C* first, int64_t head_dim,
                            bool first_seen, bool second_seen, __m512bh operands[4]) {
  const __mmask32 first_mask = first_seen ? ~0u : 0u;
  const __mmask32 second_mask = second_seen ? ~0u : 0u;
  for (int64_t half = 0; half < 2; ++half) {
    const __m512i a = load(first + half * 32, first_mask);
    const __m512i b = load(first + head_dim + half * 32, second_mask);
    operands[2 * half] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
    operands[2 * half + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
  }
}

// The item's value rows in the cache. Pairs and positions count from the item's first block; a
// row outside [begin, end) is never read (it may lie before the window or past the context) and
// counts as zeros.
template <typename C>
struct CachedPairs {
  const void* const* pair_rows;  // Each pair's first row, a const C* (cached_pairs).
  int64_t head_dim;
  int64_t begin;
  int64_t end;
  Bf16Loads<C> rows = {};

  void load(int64_t pair, int64_t offset, __m512bh operands[4]) const {
    const int64_t row = 2 * pair;
    interleave_rows(rows, static_cast<const C*>(pair_rows[pair]) + offset, head_dim,
                    row >= begin, row + 1 < end, operands);
  }
};

// The same operands, interleaved once: [pairs][head_dim / 16].
struct InterleavedPairs {
  const __m512i* operands;
  int64_t head_dim;

  void load(int64_t pair, int64_t offset, __m512bh values[4]) const {
    const __m512i* pair_operands = operands + pair * (head_dim / kLanes) + offset / kLanes;
    for (int64_t c = 0; c < 4; ++c) {
      values[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pair_operands + c));
    }
  }
};

// accumulators[v][offset, offset + 64) = sum over pairs [first_pair, end_pair) of the vector's
// two weights (one 32-bit word of weight_pairs) times the pair's operands.
template <int64_t kVectors, typename Pairs>
inline void accumulate_pairs(float* __restrict accumulators, int64_t head_dim, int64_t offset,
                             const Pairs& pairs, int64_t first_pair, int64_t end_pair,
                             const uint32_t* __restrict weight_pairs, int64_t pair_stride) {
  __m512 sums[kVectors][4];
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < 4; ++c) sums[v][c] = _mm512_setzero_ps();
  }
  for (int64_t pair = first_pair; pair < end_pair; ++pair) {
    __m512bh values[4];
    pairs.load(pair, offset, values);
    for (int64_t v = 0; v < kVectors; ++v) {
      const __m512bh weights = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(weight_pairs[v * pair_stride + pair])));
      for (int64_t c = 0; c < 4; ++c) sums[v][c] = _mm512_dpbf16_ps(sums[v][c], values[c], weights);
    }
  }
  const __m512i first_order = _mm512_loadu_si512(kUnpackedOrder[0]);
  const __m512i second_order = _mm512_loadu_si512(kUnpackedOrder[1]);
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t half = 0; half < 2; ++half) {
      const __m512 low = sums[v][2 * half];
      const __m512 high = sums[v][2 * half + 1];
      float* destination = accumulators + v * head_dim + offset + half * 32;
      _mm512_storeu_ps(destination, _mm512_permutex2var_ps(low, first_order, high));
      _mm512_storeu_ps(destination + kLanes, _mm512_permutex2var_ps(low, second_order, high));
    }
  }
}
#endif
#endif

#if defined(__AVX2__) && defined(__FMA__)
// Scoring with AVX2, for float32, bfloat16 and 8-bit float keys, in register tiles of up to
// kAvx2ScoreVectors query vectors and 16 keys: each query element, broadcast once, multiplies
// both runs of 8 keys. Where an item's vectors take more than one tile (a prompt's), each block
// is widened once to float32 as [head_dim][block_size] (widen_keys_avx2) and every tile reads
// that; a decode's few vectors read the stored pairs in place. Scoring 8 keys at a time from the
// stored pairs for every group of vectors took a broadcast per multiply-add and widened the block
// again for each group (a long prompt's attention ran at two thirds of the AVX2 matmul's rate).
// Every score is one chain of multiply-adds over d, in order, whichever tile computes it, so a
// vector's scores do not depend on the other rows.
//
// In AVX-512 builds the same loops run 16 lanes wide on what they read as float32 (the widened
// keys, float32 value rows): twice the work per instruction and twice the registers for sums.
// The 8-lane loops had left a float32 prompt's attention at half the float32 matmul's rate. The
// order of every chain is the same at either width, so the results are too.
constexpr int64_t kAvx2Columns = 8;
// The tile's vectors: 6 x 2 sums, 2 runs of keys and a broadcast fill 15 of the 16 registers.
constexpr int64_t kAvx2ScoreVectors = 6;
// Vectors up to which an item's keys are scored in place: one tile of 4 x 2 sums, the 2 runs'
// stored pairs and their widened halves.
constexpr int64_t kAvx2InPlaceVectors = 4;

// 8 elements of a cache as float32, exactly, times kAvx2ReadScale: common.h's for float32 and
// bfloat16 (named here, beside the 8-bit floats' below, which would otherwise hide them).
using sluice::load_floats_x8;

// 8 codes of an 8-bit float, each in the upper byte of a 16-bit lane.
inline __m128i fp8_codes_x8(const void* source) {
  const __m128i codes = _mm_loadl_epi64(static_cast<const __m128i*>(source));
  return _mm_unpacklo_epi8(_mm_setzero_si128(), codes);
}

// An e5m2 code is the upper byte of a float16.
inline __m256 load_floats_x8(const c10::Float8_e5m2* source) {
  return _mm256_cvtph_ps(fp8_codes_x8(source));
}

// An e4m3 code's exponent and mantissa moved one bit down (the sign stays) make a float16 of its
// value times 2^-8 (exponent bias 15 against 7), subnormals included: kAvx2ReadScale.
inline __m256 load_floats_x8(const c10::Float8_e4m3fn* source) {
  const __m128i shifted = _mm_srai_epi16(fp8_codes_x8(source), 1);  // The sign in bits 15 and 14.
  return _mm256_cvtph_ps(_mm_and_si128(shifted, _mm_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

// The float32 vectors a tile loop works in: 8 lanes (AVX2), or 16 (Lanes16, AVX-512).
struct Lanes8 {
  using Vector = __m256;
  static constexpr int64_t kWidth = 8;
  static Vector zero() { return _mm256_setzero_ps(); }
  static Vector load(const float* source) { return _mm256_loadu_ps(source); }
  template <typename C>
  static Vector read(const C* source) {  // Times kAvx2ReadScale.
    return load_floats_x8(source);
  }
  static Vector broadcast(const float* source) { return _mm256_broadcast_ss(source); }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* destination, Vector values) { _mm256_storeu_ps(destination, values); }
  static constexpr int64_t kRegisters = 16;
};

#if defined(__AVX512F__)
struct Lanes16 {
  using Vector = __m512;
  static constexpr int64_t kWidth = 16;
  static Vector zero() { return _mm512_setzero_ps(); }
  static Vector load(const float* source) { return _mm512_loadu_ps(source); }
  template <typename C>
  static Vector read(const C* source) {  // float32 and bfloat16 rows.
    return load_floats_x16(source);
  }
  static Vector broadcast(const float* source) { return _mm512_set1_ps(*source); }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* destination, Vector values) { _mm512_storeu_ps(destination, values); }
  static constexpr int64_t kRegisters = 32;
};

// The 16-lane score tile's vectors: 12 x 1 run of 16 keys (blocks of 16 tokens), or 12 x 2 with
// 2 runs and the broadcast, 27 of the 32 registers.
constexpr int64_t kWideScoreVectors = 12;
#endif

// Dimension d (even) or d + 1 (odd) of 8 keys, from the block as stored: their run of pairs.
template <typename K>
struct StoredKeys {
  using Lanes = Lanes8;
  const K* keys_t;
  int64_t block_size;

  __m256 even(int64_t d, int64_t column) const { return half<0>(d, column); }
  __m256 odd(int64_t d, int64_t column) const { return half<1>(d, column); }

  template <int kOdd>
  __m256 half(int64_t d, int64_t column) const {
    const K* pairs = keys_t + key_offset(d, column, block_size);
    if constexpr (std::is_same_v<K, at::BFloat16>) {
      // 8 32-bit words, element d in the low half of each, d + 1 in the high.
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
      return _mm256_castsi256_ps(
          kOdd ? _mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))
               : _mm256_slli_epi32(words, 16));
    } else {
      // Keys 0-3's pairs, then 4-7's: the shuffle gives [0 1 4 5 2 3 6 7], the permute the order.
      const __m256 first = load_floats_x8(pairs);
      const __m256 second = load_floats_x8(pairs + kAvx2Columns);
      const __m256 mixed = kOdd ? _mm256_shuffle_ps(first, second, 0xDD)
                                : _mm256_shuffle_ps(first, second, 0x88);
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mixed), 0xD8));
    }
  }
};

// The same from the block's float32 copy, [head_dim][block_size], a run of Lanes::kWidth keys.
template <typename L>
struct WidenedKeys {
  using Lanes = L;
  const float* keys;
  int64_t block_size;

  typename L::Vector even(int64_t d, int64_t column) const {
    return L::load(keys + d * block_size + column);
  }
  typename L::Vector odd(int64_t d, int64_t column) const { return even(d + 1, column); }
};

// The block's keys as float32 [head_dim][block_size], times kAvx2ReadScale.
template <typename K>
inline void widen_keys_avx2(BlockShape shape, const K* __restrict keys_t,
                            float* __restrict widened) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<K, float>) {
    if (shape.block_size % Lanes16::kWidth == 0) {
      // 16 keys' pairs are 32 floats: their elements d and d + 1 picked from both vectors at
      // once, a permute each where 8 lanes take a shuffle and a permute.
      const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                              28, 30);
      const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
      for (int64_t d = 0; d < shape.head_dim; d += 2) {
        for (int64_t column = 0; column < shape.block_size; column += Lanes16::kWidth) {
          const float* pairs = keys_t + key_offset(d, column, shape.block_size);
          const __m512 first = _mm512_loadu_ps(pairs);
          const __m512 second = _mm512_loadu_ps(pairs + Lanes16::kWidth);
          float* even_row = widened + d * shape.block_size + column;
          _mm512_storeu_ps(even_row, _mm512_permutex2var_ps(first, evens, second));
          _mm512_storeu_ps(even_row + shape.block_size,
                           _mm512_permutex2var_ps(first, odds, second));
        }
      }
      return;
    }
  }
#endif
  const StoredKeys<K> stored{keys_t, shape.block_size};
  for (int64_t d = 0; d < shape.head_dim; d += 2) {
    for (int64_t column = 0; column < shape.block_size; column += kAvx2Columns) {
      _mm256_storeu_ps(widened + d * shape.block_size + column, stored.even(d, column));
      _mm256_storeu_ps(widened + (d + 1) * shape.block_size + column, stored.odd(d, column));
    }
  }
}

// scores[v][w r + k] = queries[v] . key k of run r, for kRuns runs of w = Lanes::kWidth keys
// from `column`. (The small loops are unrolled before the sums' array is split into registers;
// otherwise it lives on the stack, stored to and loaded from at every multiply-add.) The 16-lane
// tiles read the queries by dimension: a pointer per vector, as from [count][head_dim], did not
// fit the general registers for 12 vectors, and reloading them doubled the loop's loads.
template <int kVectors, int kRuns, typename Keys>
inline void score_runs(int64_t head_dim, QueryVectors queries, const Keys& keys, int64_t column,
                       float* __restrict scores, int64_t score_stride) {
  using L = typename Keys::Lanes;
  constexpr bool kByDimension = L::kWidth == 16;
  typename L::Vector sums[kVectors][kRuns];
#pragma GCC unroll 12
  for (int v = 0; v < kVectors; ++v) {
#pragma GCC unroll 2
    for (int r = 0; r < kRuns; ++r) sums[v][r] = L::zero();
  }
  // Dimension d's keys times every vector's element d, then d + 1's.
  const auto add = [&](int64_t d, const typename L::Vector (&runs)[kRuns]) {
#pragma GCC unroll 12
    for (int v = 0; v < kVectors; ++v) {
      const typename L::Vector query =
          L::broadcast(kByDimension ? queries.by_dimension + d * kVectors + v
                                    : queries.scaled + v * head_dim + d);
#pragma GCC unroll 2
      for (int r = 0; r < kRuns; ++r) sums[v][r] = L::fmadd(query, runs[r], sums[v][r]);
    }
  };
  for (int64_t d = 0; d < head_dim; d += 2) {
    typename L::Vector runs[kRuns];
#pragma GCC unroll 2
    for (int r = 0; r < kRuns; ++r) runs[r] = keys.even(d, column + r * L::kWidth);
    add(d, runs);
#pragma GCC unroll 2
    for (int r = 0; r < kRuns; ++r) runs[r] = keys.odd(d, column + r * L::kWidth);
    add(d + 1, runs);
  }
#pragma GCC unroll 12
  for (int v = 0; v < kVectors; ++v) {
#pragma GCC unroll 2
    for (int r = 0; r < kRuns; ++r) {
      L::store(scores + v * score_stride + r * L::kWidth, sums[v][r]);
    }
  }
}

// score_block for up to kMaxTile vectors (up to kAvx2InPlaceVectors from StoredKeys), the block
// in pairs of runs of Lanes::kWidth keys (block sizes of a multiple of that).
template <int64_t kMaxTile, typename Keys>
inline void score_block_in_tiles(BlockShape shape, QueryVectors queries, const Keys& keys,
                                 ScoreRows scores) {
  constexpr int64_t kRun = Keys::Lanes::kWidth;
  with_count<kMaxTile>(queries.count, [&](auto n) {
    constexpr int kVectors = decltype(n)::value;
    int64_t column = 0;
    for (; column + 2 * kRun <= shape.block_size; column += 2 * kRun) {
      score_runs<kVectors, 2>(shape.head_dim, queries, keys, column, scores.data + column,
                              scores.stride);
    }
    if (column < shape.block_size) {
      score_runs<kVectors, 1>(shape.head_dim, queries, keys, column, scores.data + column,
                              scores.stride);
    }
  });
}

// Dimensions of the value rows one AVX2 accumulation pass holds in registers at least.
constexpr int64_t kAvx2ValueChunk = 16;
// Vectors one pass accumulates: 6 x 2 sums, a row's 16 values and a weight fill 15 of the 16
// registers, and each row's values, loaded once, serve six vectors.
constexpr int64_t kAvx2ValueVectors = 6;

// `elements` elements of value rows of a cache as float32, times kAvx2ReadScale.
template <typename C>
inline void widen_rows_avx2(const C* __restrict rows, int64_t elements, float* __restrict widened) {
  for (int64_t i = 0; i < elements; i += 8) _mm256_storeu_ps(widened + i, load_floats_x8(rows + i));
}

// accumulate_block_generic's sums for up to kAvx2ValueVectors vectors, each element's in the same
// order (row by row), with the vectors' sums of kSums vectors of dimensions kept in registers
// across the block's rows instead of loaded and stored for every row.
template <typename L, int kVectors, int kSums, typename T>
inline void accumulate_block_in_tiles(int64_t head_dim, float* __restrict accumulators,
                                      const T* __restrict rows, int64_t num_rows,
                                      ScoreRows weights) {
  constexpr int64_t kChunk = L::kWidth * kSums;
  // A row's values, then one weight at a time, where the registers hold them (2 + 12 + 1 for 6
  // vectors x 16 dimensions with AVX2); else every weight, then one vector of values at a time
  // (3 + 12 + 1 for 3 vectors x 32 dimensions).
  constexpr bool kValuesFirst = kVectors * kSums + kSums + 1 <= L::kRegisters;
  for (int64_t chunk = 0; chunk < head_dim; chunk += kChunk) {
    typename L::Vector sums[kVectors][kSums];  // Unrolled loops: see score_runs.
#pragma GCC unroll 6
    for (int v = 0; v < kVectors; ++v) {
#pragma GCC unroll 4
      for (int i = 0; i < kSums; ++i) {
        sums[v][i] = L::load(accumulators + v * head_dim + chunk + L::kWidth * i);
      }
    }
    for (int64_t r = 0; r < num_rows; ++r) {
      const T* row = rows + r * head_dim + chunk;
      if constexpr (kValuesFirst) {
        typename L::Vector values[kSums];
#pragma GCC unroll 4
        for (int i = 0; i < kSums; ++i) values[i] = L::read(row + L::kWidth * i);
#pragma GCC unroll 6
        for (int v = 0; v < kVectors; ++v) {
          const typename L::Vector weight = L::broadcast(weights.data + v * weights.stride + r);
#pragma GCC unroll 4
          for (int i = 0; i < kSums; ++i) sums[v][i] = L::fmadd(weight, values[i], sums[v][i]);
        }
      } else {
        typename L::Vector weight[kVectors];
#pragma GCC unroll 6
        for (int v = 0; v < kVectors; ++v) {
          weight[v] = L::broadcast(weights.data + v * weights.stride + r);
        }
#pragma GCC unroll 4
        for (int i = 0; i < kSums; ++i) {
          typename L::Vector values = L::read(row + L::kWidth * i);
          // A float32 row's load would otherwise be folded into each vector's FMA, a load per
          // FMA where one serves them all (the load ports then bound the loop).
          asm("" : "+x"(values));
#pragma GCC unroll 6
          for (int v = 0; v < kVectors; ++v) sums[v][i] = L::fmadd(weight[v], values, sums[v][i]);
        }
      }
    }
#pragma GCC unroll 6
    for (int v = 0; v < kVectors; ++v) {
#pragma GCC unroll 4
      for (int i = 0; i < kSums; ++i) {
        L::store(accumulators + v * head_dim + chunk + L::kWidth * i, sums[v][i]);
      }
    }
  }
}

// Few vectors hold 32 dimensions of sums each where the head size allows, so that enough chains
// of multiply-adds overlap (a decode's 3 vectors x 16 dimensions left a third of the time
// waiting on them). In AVX-512 builds, float32 and bfloat16 rows are added 16 lanes wide, 64 (or
// 32) dimensions at a time.
template <int kVectors, typename T>
inline void accumulate_rows_avx2(int64_t head_dim, float* accumulators, const T* rows,
                                 int64_t num_rows, ScoreRows weights) {
#if defined(__AVX512F__)
  if constexpr (!kIsFp8<T>) {
    if (head_dim % 64 == 0) {
      accumulate_block_in_tiles<Lanes16, kVectors, 4>(head_dim, accumulators, rows, num_rows,
                                                      weights);
      return;
    }
    if (head_dim % 32 == 0) {
      accumulate_block_in_tiles<Lanes16, kVectors, 2>(head_dim, accumulators, rows, num_rows,
                                                      weights);
      return;
    }
  }
#endif
  if (kVectors <= 3 && head_dim % 32 == 0) {
    accumulate_block_in_tiles<Lanes8, kVectors, 4>(head_dim, accumulators, rows, num_rows,
                                                   weights);
  } else {
    accumulate_block_in_tiles<Lanes8, kVectors, 2>(head_dim, accumulators, rows, num_rows,
                                                   weights);
  }
}

#endif

// Whether keys are scored with AVX2 (where the AVX-512 path does not apply): float32, bfloat16
// and 8-bit float keys, blocks of a multiple of 8 tokens.
template <typename C>
inline bool has_avx2_scores(int64_t block_size) {
#if defined(__AVX2__) && defined(__FMA__)
  return kAvx2Reads<C> && block_size % kAvx2Columns == 0;
#else
  (void)block_size;
  return false;
#endif
}

// Whether value rows are added with AVX2 (where the AVX-512 path does not apply): the same
// types, head sizes of a multiple of 16.
template <typename C>
inline bool has_avx2_values(int64_t head_dim) {
#if defined(__AVX2__) && defined(__FMA__)
  return kAvx2Reads<C> && head_dim % kAvx2ValueChunk == 0;
#else
  (void)head_dim;
  return false;
#endif
}

// Whether an item's `vectors` are scored in the 16-lane tiles (AVX-512 builds): where the AVX2
// tiles apply, from a widened copy of each block (more vectors than one tile in place), and the
// blocks hold runs of 16 keys.
inline bool scores_in_wide_tiles(BlockShape shape, int64_t vectors) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__AVX512F__)
  return shape.avx2_scores && vectors > kAvx2InPlaceVectors &&
         shape.block_size % Lanes16::kWidth == 0;
#else
  (void)shape, (void)vectors;
  return false;
#endif
}

// Scores a block with the AVX2 tiles where they apply (has_avx2_scores; false elsewhere), for
// each group of up to kAvx2ScoreVectors (kWideScoreVectors) of the item's `vectors`:
// in_groups(per group, score) calls score(group's vectors, their score rows) for each group that
// sees the block. The keys are read in place where the vectors make one small tile (a decode's),
// else from a float32 copy made once here for all groups, 16 lanes wide in AVX-512 builds.
template <typename K, typename InGroups>
inline bool score_in_avx2_tiles(BlockShape shape, int64_t vectors, const K* keys_t,
                                float* float_block, const InGroups& in_groups) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kAvx2Reads<K>) {
    if (shape.avx2_scores) {
      // Tiles of up to `tile` vectors, the keys read through `keys`.
      const auto score_from = [&](auto tile, const auto& keys) {
        in_groups(tile, [&](QueryVectors group, ScoreRows scores) {
          score_block_in_tiles<decltype(tile)::value>(shape, group, keys, scores);
        });
      };
      if (vectors <= kAvx2InPlaceVectors) {
        score_from(std::integral_constant<int64_t, kAvx2ScoreVectors>(),
                   StoredKeys<K>{keys_t, shape.block_size});
        return true;
      }
      widen_keys_avx2(shape, keys_t, float_block);
#if defined(__AVX512F__)
      if (scores_in_wide_tiles(shape, vectors)) {
        score_from(std::integral_constant<int64_t, kWideScoreVectors>(),
                   WidenedKeys<Lanes16>{float_block, shape.block_size});
        return true;
      }
#endif
      score_from(std::integral_constant<int64_t, kAvx2ScoreVectors>(),
                 WidenedKeys<Lanes8>{float_block, shape.block_size});
      return true;
    }
  }
#endif
  (void)shape, (void)vectors, (void)keys_t, (void)float_block, (void)in_groups;
  return false;
}

// Adds a block's first `rows` value rows with the AVX2 loops where they apply (has_avx2_values;
// false elsewhere): add_in_groups(per group, rows) adds them for each group of up to
// kAvx2ValueVectors vectors that sees the block. Where more than one group reads them, they
// are widened to float32 once here (only those rows: the ones past the context may hold
// anything).
template <typename C, typename AddInGroups>
inline bool add_in_avx2_tiles(BlockShape shape, int64_t vectors, const C* values, int64_t rows,
                              float* float_block, const AddInGroups& add_in_groups) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kAvx2Reads<C>) {
    if (shape.avx2_values) {
      if (!std::is_same_v<C, float> && vectors > kAvx2ValueVectors) {
        widen_rows_avx2(values, rows * shape.head_dim, float_block);
        add_in_groups(kAvx2ValueVectors, static_cast<const float*>(float_block));
      } else {
        add_in_groups(kAvx2ValueVectors, values);
      }
      return true;
    }
  }
#endif
  (void)shape, (void)vectors, (void)values, (void)rows, (void)float_block, (void)add_in_groups;
  return false;
}

// Whether the fast path runs on bfloat16 dot products (attend_item_with_dot_products).
#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
constexpr bool kDotProducts = true;
#else
constexpr bool kDotProducts = false;
#endif

// T: the query's type, C: the cache's. An 8-bit cache is widened to bfloat16 for the dot
// products; without them it takes the generic path.
template <typename T, typename C>
inline bool has_fast_path(int64_t head_dim, int64_t block_size) {
#if defined(__AVX512F__)
  const bool cache = std::is_same_v<C, at::BFloat16> || (kIsFp8<C> && kDotProducts);
  return std::is_same_v<T, at::BFloat16> && cache && head_dim % kLanes == 0 &&
         block_size % kLanes == 0 && (head_dim == 64 || head_dim == 128);
#else
  (void)head_dim;
  (void)block_size;
  return false;
#endif
}

template <typename T>
inline void score_block(BlockShape shape, QueryVectors queries, const T* keys_t,
                        ScoreRows scores) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (shape.fast) {
      with_count<kMaxVectors>(queries.count, [&](auto n) {
        score_block_bf16<decltype(n)::value>(shape, queries, keys_t, scores);
      });
      return;
    }
  }
#endif
  score_block_generic(shape, queries, keys_t, scores);
}

template <typename T>
inline void accumulate_block(BlockShape shape, int64_t num_vectors, float* accumulators,
                             const T* rows, int64_t num_rows, ScoreRows weights) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (shape.fast) {
      with_count<kMaxVectors>(num_vectors, [&](auto n) {
        constexpr int64_t kVectors = decltype(n)::value;
        if (shape.head_dim == 64) {
          accumulate_block_bf16<kVectors, 4>(accumulators, rows, num_rows, weights);
        } else {
          accumulate_block_bf16<kVectors, 8>(accumulators, rows, num_rows, weights);
        }
      });
      return;
    }
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kAvx2Reads<T>) {
    if (shape.avx2_values) {  // Called for up to kAvx2ValueVectors vectors.
      with_count<kAvx2ValueVectors>(num_vectors, [&](auto n) {
        accumulate_rows_avx2<decltype(n)::value>(shape.head_dim, accumulators, rows, num_rows,
                                                 weights);
      });
      return;
    }
  }
#endif
  accumulate_block_generic(shape.head_dim, num_vectors, accumulators, rows, num_rows, weights);
}

// ---------------------------------------------------------------------------------------------
// Paged attention over a flat batch of chunks (decodes are chunks of one token).
//
// Sequence s owns query rows [query_starts[s], query_starts[s + 1]); its row i sits at position
// p = cache_lens[s] + i and sees the positions up to itself, all of which are in the cache (the
// new tokens' K/V were written first), or with a sliding window W those in (p - W, p]. One work
// item is one (sequence, KV head, tile of up to kTileRows query rows): the tile's rows and the
// `group` query heads sharing the KV head are scored together, so each block is read from memory
// and widened to float32 once for all of them. Per item, in phases: gather its queries, score
// every block it sees (with a window, from the block holding its first row's first position:
// blocks wholly before the window are never read), softmax per row and head (soft-capping the
// scores first where asked), add up the weighted value rows, write the output.

constexpr int64_t kTileRows = 16;
// How many key blocks ahead of use to fetch (see KeyPrefetcher), where blocks are scored one at
// a time.
constexpr int64_t kPrefetchBlocks = 1;

// The shapes and strides of one paged_attention call.
struct AttentionGeometry {
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t group;  // Query heads per KV head.
  int64_t head_dim;
  int64_t num_blocks;
  int64_t block_size;
  int64_t max_blocks;  // Width of the block tables.
  int64_t query_row_stride;
  int64_t query_head_stride;
  // Positions a query row sees at most, itself included: the sliding window; 0: all.
  int64_t window;

  int64_t block_elements() const { return block_size * head_dim; }
  // Offset of a KV head's block in either cache.
  int64_t block_offset(int64_t kv_head, int64_t block) const {
    return (kv_head * num_blocks + block) * block_elements();
  }
};

// The tensors of one call, as pointers.
template <typename T, typename C = T>
struct AttentionData {
  const T* query;
  const C* keys;  // The cache's element type: the query's, or an 8-bit float.
  const C* values;
  T* output;
  const int32_t* block_tables;  // [S, max_blocks]
  const int32_t* cache_lens;    // [S]
  const int32_t* query_starts;  // [S + 1]
  float value_scale;            // What the stored values are multiplied by (write_kv's scales).
};

// Cache positions one item reads at most. The work is one tile per sequence, KV head and 16
// query rows, and a tile whose context reaches past a multiple of this is split there into
// partitions, one item each: each item's result is partial (its vectors' unnormalised value sums,
// score maxima and weight sums), and the tile's output merges them in order. Where the splits
// fall depends only on positions, never on the batch or on which thread attends a partition, so
// a row's output does not either; a row whose context is shorter than this is attended exactly as
// without splitting. Few tiles (one sequence decoding has one per KV head, fewer than the threads
// on most machines) have their partitions attended by different threads; otherwise a thread
// attends a tile's partitions one after another and merges them while they are in its cache.
constexpr int64_t kPartitionPositions = 2048;
// Tiles per thread below which a split tile's partitions go to different threads.
constexpr int64_t kTilesPerThreadToSplit = 2;

struct AttentionItem {
  int64_t sequence;
  int64_t kv_head;
  int64_t first_row;    // Within the sequence's rows.
  int64_t first_block;  // The first cache block its rows see (its first row's window's).
  int64_t blocks;       // Cache blocks up to the last its rows see, or to its partition's end.
  int64_t cost;         // Query rows times positions read: what balances the threads.
  // Where its partial result goes in the step's partials, for a partition attended apart from
  // its tile's others; -1: none (a whole tile, or a partition merged by its own thread).
  int64_t partial = -1;
};

// A tile's items (one, or its partitions), consecutive in the item list.
struct ItemRun {
  size_t first_item;
  size_t count;
};

// The step's tiles, split into items.
struct AttentionPlan {
  std::vector<AttentionItem> items;
  std::vector<ItemRun> tiles;
};

// What the threads attend: runs of items each attended by one thread (a whole tile, or one
// partition of a tile); the tiles whose partitions were attended apart, merged afterwards; and
// the floats the partial results of those partitions take.
struct AttentionWork {
  std::vector<ItemRun> runs;
  std::vector<ItemRun> merges;
  int64_t partial_floats = 0;
};

// An item's query rows and what they see.
struct ItemSpan {
  int64_t row_offset;     // Its first row in the flat batch.
  int64_t rows;
  int64_t first_context;  // Positions up to its first row's, itself included; row r: + r.
  int64_t context;        // Positions up to its last row's, or to the limit.
  // (row, head) pairs, row-major: vector v sees positions [begin(v), end(v)) of the item's.
  int64_t vectors;
  int64_t group;
  int64_t window;         // 0: none
  // The position of the first block the item reads, where its score rows start. They cover
  // whole blocks (columns before a vector's window or past its position are scored and then
  // ignored), so the block loops need no ragged ends.
  int64_t first_position;
  int64_t limit;          // Where the item's blocks end: a partition's end, or past the context.
  int64_t stride;         // Positions of its blocks, from first_position.
  int64_t score_pitch;    // Floats between vectors' score rows in the scratch (row_pitch).
  const int32_t* table;   // The sequence's blocks.

  // Positions up to the vector's own, itself included.
  int64_t position(int64_t vector) const { return first_context + vector / group; }
  int64_t end(int64_t vector) const { return std::min(position(vector), limit); }
  // Without a window, the item's first position at no cost: this runs for every block and
  // group of vectors. A vector may see nothing of a partition: begin >= end.
  int64_t begin(int64_t vector) const {
    return window == 0 ? first_position
                       : std::max<int64_t>(first_position, position(vector) - window);
  }

  // Whether none of vectors [first, first + count) sees the block at [start, start + length):
  // vectors see later positions the later they come, so the group's last decides whether they
  // all end before the block and its first whether they all begin after it.
  bool skips(int64_t first, int64_t count, int64_t start, int64_t length) const {
    return end(first + count - 1) <= start || begin(first) >= start + length;
  }
};

// Elements between rows of `length` elements of `element_bytes` each that are read or written
// together (a tile's 16, a group of vectors'): an odd number of cache lines, so that
// consecutive rows fall in different sets of the L1 cache. Rows a power of two of bytes apart (a
// 2,048-position partition's scores) all fell in one set, which held only a few of them.
inline int64_t row_pitch(int64_t length, int64_t element_bytes) {
  constexpr int64_t kCacheLineBytes = 64;
  const int64_t per_line = kCacheLineBytes / element_bytes;
  return ((length + per_line - 1) / per_line | 1) * per_line;
}

// The step's tiles, each split into partitions where its blocks reach past one.
template <typename T, typename C>
AttentionPlan plan_items(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                         int64_t num_sequences) {
  const int64_t partition_blocks =
      std::max<int64_t>(1, kPartitionPositions / geometry.block_size);
  AttentionPlan plan;
  for (int64_t s = 0; s < num_sequences; ++s) {
    for (int64_t h = 0; h < geometry.num_kv_heads; ++h) {
      const int64_t query_len = data.query_starts[s + 1] - data.query_starts[s];
      for (int64_t row = 0; row < query_len; row += kTileRows) {
        const int64_t rows = std::min(kTileRows, query_len - row);
        const int64_t context = data.cache_lens[s] + row + rows;
        const int64_t first_seen =
            geometry.window == 0
                ? 0
                : std::max<int64_t>(0, data.cache_lens[s] + row + 1 - geometry.window);
        const int64_t first_block = first_seen / geometry.block_size;
        const int64_t blocks = (context + geometry.block_size - 1) / geometry.block_size;
        const int64_t first_partition = first_block / partition_blocks;
        const int64_t last_partition = (blocks - 1) / partition_blocks;
        plan.tiles.push_back({plan.items.size(),
                              static_cast<size_t>(last_partition - first_partition + 1)});
        for (int64_t p = first_partition; p <= last_partition; ++p) {
          const int64_t begin = std::max(first_block, p * partition_blocks);
          const int64_t end = std::min(blocks, (p + 1) * partition_blocks);
          plan.items.push_back({s, h, row, begin, end, rows * (end - begin)});
        }
      }
    }
  }
  return plan;
}

// An item's query rows: its tile's.
template <typename T, typename C>
int64_t rows_of(const AttentionData<T, C>& data, const AttentionItem& item) {
  return std::min(kTileRows, data.query_starts[item.sequence + 1] -
                                 data.query_starts[item.sequence] - item.first_row);
}

// The floats a partition's partial result takes (see Partial): per vector, its value sums, its
// maximum and its sum.
inline int64_t floats_per_partial(const AttentionGeometry& geometry, int64_t rows) {
  return rows * geometry.group * (geometry.head_dim + 2);
}

template <typename T, typename C>
ItemSpan span_of(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                 const AttentionItem& item) {
  const int64_t sequence_start = data.query_starts[item.sequence];
  const int64_t rows = rows_of(data, item);
  const int64_t first_context = data.cache_lens[item.sequence] + item.first_row + 1;
  const int64_t limit = item.blocks * geometry.block_size;
  const int64_t stride = (item.blocks - item.first_block) * geometry.block_size;
  return {sequence_start + item.first_row,
          rows,
          first_context,
          std::min(first_context + rows - 1, limit),
          rows * geometry.group,
          geometry.group,
          geometry.window,
          item.first_block * geometry.block_size,
          limit,
          stride,
          row_pitch(stride, sizeof(float)),
          data.block_tables + item.sequence * geometry.max_blocks};
}

// The key blocks one thread will score, fetched `ahead` blocks ahead across the ends of its
// items, and each block's values as it is scored: a sequence's blocks lie anywhere in the cache,
// and without this every item would start with full memory-latency misses. An item that starts
// at the same block of the same sequence and KV head as one of the two before it on the thread
// (a prompt's next tile, or its next tile's partition when tiles are split) finds its blocks in
// the caches, and is not fetched: the prefetches' own cost was up to a tenth of a long prompt's
// attention. Off the AVX-512 fast path (not `fetch_runs`: the AVX2 and portable loops), nor is a
// block that directly follows the one before it in the same cache: a run of adjacent blocks (a
// prompt's, as the allocator hands them out in ascending order) is a stream the CPU's own
// prefetcher follows at the pace of those loops, and fetching it as well took a decode step's
// attention 3-26 % longer on a CPU without AVX-512 (benchmark/attention_kernel.py, layout
// `contiguous`; docs/microbenchmarks.md). The AVX-512 fast path reads its blocks faster, and
// there fetching every block paid (0.22-0.25 ms a layer against 0.30 without,
// docs/architecture.md; on AMX, leaving runs to the CPU took 8-11 % longer).
template <typename T, typename C = T>
class KeyPrefetcher {
 public:
  KeyPrefetcher(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                const std::vector<AttentionItem>& items, const std::vector<size_t>& order,
                int64_t ahead, bool fetch_runs)
      : geometry_(geometry), data_(data), items_(items), order_(order), fetch_runs_(fetch_runs) {
    if (!order_.empty()) block_ = items_[order_[0]].first_block;
    for (int64_t i = 0; i < ahead; ++i) advance();
  }

  // The thread starts on the next item in its order.
  void start() {
    warm_ = warm(started_++);
    last_value_offset_ = -1;
  }

  // The started item scores the block at `offset` (of either cache): fetches the next key block
  // in this thread's order, and this block's values unless they are in the caches (see fetch).
  void next_block(int64_t offset) {
    advance();
    if (!warm_) fetch(data_.values, offset, last_value_offset_);
  }

 private:
  // Whether the item at order_[i] starts where one of the two before it did.
  bool warm(size_t i) const {
    const AttentionItem& item = items_[order_[i]];
    for (size_t before = i >= 2 ? i - 2 : 0; before < i; ++before) {
      const AttentionItem& other = items_[order_[before]];
      if (other.sequence == item.sequence && other.kv_head == item.kv_head &&
          other.first_block == item.first_block) {
        return true;
      }
    }
    return false;
  }

  void advance() {
    while (next_ < order_.size() && block_ == items_[order_[next_]].blocks) {
      ++next_;
      while (next_ < order_.size() && warm(next_)) ++next_;
      if (next_ < order_.size()) block_ = items_[order_[next_]].first_block;
    }
    if (next_ >= order_.size()) return;
    const AttentionItem& ahead = items_[order_[next_]];
    const int32_t block = data_.block_tables[ahead.sequence * geometry_.max_blocks + block_++];
    fetch(data_.keys, geometry_.block_offset(ahead.kv_head, block), last_key_offset_);
  }

  // Fetches the block at `offset` of `cache`, unless it directly follows the block at `last`
  // and runs are left to the CPU; `offset` becomes the last.
  template <typename E>
  void fetch(const E* cache, int64_t offset, int64_t& last) const {
    const int64_t elements = geometry_.block_elements();
    if (fetch_runs_ || offset != last + elements) prefetch(cache + offset, elements);
    last = offset;
  }

  const AttentionGeometry& geometry_;
  const AttentionData<T, C>& data_;
  const std::vector<AttentionItem>& items_;
  const std::vector<size_t>& order_;
  const bool fetch_runs_;  // Whether a block that follows the one before it is fetched too.
  size_t next_ = 0;     // Into order_.
  int64_t block_ = 0;   // Of the item at order_[next_].
  size_t started_ = 0;  // Items started.
  bool warm_ = false;   // The started item's blocks are in the caches.
  int64_t last_key_offset_ = -1;    // Of the key block fetched or passed over last.
  int64_t last_value_offset_ = -1;  // Of the started item's value block seen last.
};

// Which items each thread attends in one go (see kPartitionPositions); gives the partitions
// attended apart from their tiles' others their places in the partials.
template <typename T, typename C>
AttentionWork plan_work(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                        AttentionPlan& plan, int64_t threads) {
  AttentionWork work;
  const bool apart =
      static_cast<int64_t>(plan.tiles.size()) < kTilesPerThreadToSplit * threads;
  for (const ItemRun& tile : plan.tiles) {
    if (tile.count == 1 || !apart) {
      work.runs.push_back(tile);
      continue;
    }
    work.merges.push_back(tile);
    for (size_t i = tile.first_item; i < tile.first_item + tile.count; ++i) {
      AttentionItem& item = plan.items[i];
      item.partial = work.partial_floats;
      work.partial_floats += floats_per_partial(geometry, rows_of(data, item));
      work.runs.push_back({i, 1});
    }
  }
  return work;
}

// The runs each of `threads` threads attends, each thread's in the order of the step: the
// costliest first, each to the thread with the least work so far. Runs differ a lot in cost (a
// decode against a prefill tile, a partition against the short last one of its context), which
// dealing them out in turn left unbalanced.
std::vector<std::vector<size_t>> assign_runs(const std::vector<AttentionItem>& items,
                                             const std::vector<ItemRun>& runs, int64_t threads) {
  std::vector<int64_t> costs(runs.size(), 0);
  for (size_t r = 0; r < runs.size(); ++r) {
    for (size_t i = runs[r].first_item; i < runs[r].first_item + runs[r].count; ++i) {
      costs[r] += items[i].cost;
    }
  }
  std::vector<size_t> by_cost(runs.size());
  for (size_t r = 0; r < runs.size(); ++r) by_cost[r] = r;
  std::stable_sort(by_cost.begin(), by_cost.end(),
                   [&](size_t a, size_t b) { return costs[a] > costs[b]; });
  using Load = std::pair<int64_t, int64_t>;  // (cost so far, thread)
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> loads;
  for (int64_t thread = 0; thread < threads; ++thread) loads.push({0, thread});
  std::vector<std::vector<size_t>> assigned(threads);
  for (size_t run : by_cost) {
    auto [cost, thread] = loads.top();
    loads.pop();
    assigned[thread].push_back(run);
    loads.push({cost + costs[run], thread});
  }
  // In the step's order, a sequence's tiles one after another: they read the same blocks.
  for (auto& list : assigned) std::sort(list.begin(), list.end());
  return assigned;
}

#if defined(SLUICE_ATTENTION_TILES)
// The tile path's value rows interleaved in pairs (InterleavedPairs' operands), kept from item
// to item of a sequence's KV head: a thread attends a prompt's tiles of one head in order, and
// each sees the rows the one before it saw and the next 16, so only those are interleaved.
// Pair p (counted from the sequence's first position) lies at operands + (p - base) * slices.
// Rows [2 first, 2 done) are interleaved whole; the pairs around them hold rows interleaved for
// an earlier item or zeros, all finite, which the value pass multiplies by zero weights only.
struct KeptPairs {
  std::vector<__m512i> operands;
  int64_t sequence = -1;
  int64_t kv_head = -1;
  int64_t base = 0;
  int64_t first = 0;
  int64_t done = 0;
};
#endif

// One thread's buffers, sized for the largest item.
struct ItemScratch {
  std::vector<float> queries;        // [vectors][head_dim], float32, scaled
  // The same, each group of kWideScoreVectors as [head_dim][its vectors] (scores_in_wide_tiles).
  std::vector<float> query_columns;
  std::vector<uint32_t> query_pairs; // [vectors][head_dim / 2], as stored, unscaled
  std::vector<float> accumulators;   // [vectors][head_dim]
  std::vector<float> maxima;         // [vectors], each vector's largest score
  std::vector<float> sums;           // [vectors], its softmax weights' sum
  std::vector<float> scores;         // [vectors][stride]
  // A block as float32: an 8-bit cache's for the generic loops (read_block), or the AVX2 tiles'
  // copy (score_in_avx2_tiles, add_in_avx2_tiles); never both for one block.
  std::vector<float> float_block;
#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
  std::vector<uint16_t> weights;     // [vectors][stride], the softmax weights as bfloat16 bits
  std::vector<__m512i> value_pairs;  // [pairs][head_dim / 16], see accumulate_values_in_pairs
  std::vector<const void*> pair_rows;  // [pairs]
  std::vector<__m512i> key_runs;       // An 8-bit cache's keys widened (score_keys_in_columns)
#endif
#if defined(SLUICE_ATTENTION_TILES)
  int64_t tile_vectors = 0;  // The vectors the AMX tiles are configured for; 0: not configured.
  KeptPairs kept_pairs;

  ~ItemScratch() {
    if (tile_vectors != 0) _tile_release();
  }
#endif

  explicit ItemScratch(const AttentionGeometry& geometry)
      : queries(kTileRows * geometry.group * geometry.head_dim),
        query_columns(queries.size()),
        query_pairs(kTileRows * geometry.group * geometry.head_dim / 2),
        accumulators(kTileRows * geometry.group * geometry.head_dim),
        maxima(kTileRows * geometry.group),
        sums(kTileRows * geometry.group),
        float_block(geometry.block_elements()) {}

  QueryVectors vectors_from(int64_t first, int64_t count, int64_t head_dim) const {
    return {queries.data() + first * head_dim, count, query_columns.data() + first * head_dim};
  }
};

// Copies the item's query vectors into the scratch, in the form the scoring reads.
template <typename T, typename C>
void gather_queries(const AttentionGeometry& geometry, BlockShape shape,
                    const AttentionData<T, C>& data, const AttentionItem& item,
                    const ItemSpan& span, ItemScratch& scratch) {
  const int64_t head_dim = geometry.head_dim;
  for (int64_t r = 0; r < span.rows; ++r) {
    for (int64_t g = 0; g < geometry.group; ++g) {
      const T* source = data.query + (span.row_offset + r) * geometry.query_row_stride +
                        (item.kv_head * geometry.group + g) * geometry.query_head_stride;
      const int64_t vector = r * geometry.group + g;
      if constexpr (std::is_same_v<T, at::BFloat16> && kDotProducts) {
        if (shape.fast) {  // Scored straight from the stored bfloat16 (see score_block).
          std::memcpy(scratch.query_pairs.data() + vector * head_dim / 2, source,
                      head_dim * sizeof(T));
          continue;
        }
      }
      float* destination = scratch.queries.data() + vector * head_dim;
      widen(source, destination, head_dim);
      for (int64_t d = 0; d < head_dim; ++d) destination[d] *= shape.scale;
    }
  }
#if defined(__AVX512F__)
  if (scores_in_wide_tiles(shape, span.vectors)) {
    for (int64_t first = 0; first < span.vectors; first += kWideScoreVectors) {
      const int64_t count = std::min(kWideScoreVectors, span.vectors - first);
      const float* rows = scratch.queries.data() + first * head_dim;
      float* columns = scratch.query_columns.data() + first * head_dim;
      for (int64_t v = 0; v < count; ++v) {
        for (int64_t d = 0; d < head_dim; ++d) columns[d * count + v] = rows[v * head_dim + d];
      }
    }
  }
#endif
}

// Calls read(block) with a cache block of `elements` as the generic and AVX2 loops read it: in
// place, unless it is an 8-bit float one that the AVX2 loops do not widen in registers (no
// AVX2, or a shape they do not take, `in_place` false): then widened into the scratch first,
// once for every group of vectors (c10's conversion per element, in the loops, made a float32
// model's decode step twice as long as on a float32 cache).
template <typename C, typename Read>
void read_block(const C* block, bool in_place, int64_t elements, ItemScratch& scratch,
                Read&& read) {
  if constexpr (kIsFp8<C>) {
    if (!in_place) {
      const float* values = fp8_values<C>().data();
      float* widened = scratch.float_block.data();  // block_elements() long
      for (int64_t i = 0; i < elements; ++i) widened[i] = values[block[i].x];
      read(static_cast<const float*>(widened));
      return;
    }
  }
  read(block);
}

// Scores every block the item sees into scratch.scores, keeping the prefetcher one block ahead
// and fetching each block's values for the value pass.
template <typename T, typename C>
void score_keys(const AttentionGeometry& geometry, BlockShape shape,
                const AttentionData<T, C>& data, const AttentionItem& item, const ItemSpan& span,
                ItemScratch& scratch, KeyPrefetcher<T, C>& prefetcher) {
  const int64_t block_size = geometry.block_size;
  for (int64_t block = item.first_block, start = span.first_position; start < span.context;
       start += block_size, ++block) {
    const int64_t offset = geometry.block_offset(item.kv_head, span.table[block]);
    prefetcher.next_block(offset);
    float* block_scores = scratch.scores.data() + (start - span.first_position);
    // Calls score(vectors, their score rows) for each group of up to `per_call` vectors that sees
    // the block.
    const auto in_groups = [&](int64_t per_call, const auto& score) {
      for (int64_t first = 0; first < span.vectors; first += per_call) {
        const int64_t count = std::min(per_call, span.vectors - first);
        if (span.skips(first, count, start, block_size)) continue;
        score(scratch.vectors_from(first, count, geometry.head_dim),
              ScoreRows{block_scores + first * span.score_pitch, span.score_pitch});
      }
    };
    read_block(data.keys + offset, shape.avx2_scores, geometry.block_elements(), scratch,
               [&](const auto* block_keys) {
                 if (score_in_avx2_tiles(shape, span.vectors, block_keys,
                                         scratch.float_block.data(), in_groups)) {
                   return;
                 }
                 in_groups(kMaxVectors, [&](QueryVectors vectors, ScoreRows scores) {
                   score_block(shape, vectors, block_keys, scores);
                 });
               });
  }
}

#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
// score_keys for the fast path: runs of kScoreColumns x 16 keys (across blocks) against groups
// of kScoreVectors vectors, each score one chain of dot products over the pairs of dimensions
// whatever the group and the run, so a vector's scores do not depend on the other rows.
template <typename C>
void score_keys_in_columns(const AttentionGeometry& geometry, BlockShape shape,
                           const AttentionData<at::BFloat16, C>& data, const AttentionItem& item,
                           const ItemSpan& span, ItemScratch& scratch,
                           KeyPrefetcher<at::BFloat16, C>& prefetcher) {
  const int64_t block_size = geometry.block_size;
  const int64_t head_dim = geometry.head_dim;
  const int64_t span_columns = span.stride / kLanes;
  if constexpr (kIsFp8<C>) scratch.key_runs.resize(kScoreColumns * head_dim / 2);
  for (int64_t column = 0; column < span_columns; column += kScoreColumns) {
    const int64_t columns = std::min(kScoreColumns, span_columns - column);
    const int64_t start = span.first_position + column * kLanes;
    const C* runs[kScoreColumns];
    for (int64_t c = 0; c < columns; ++c) {
      const int64_t position = (column + c) * kLanes;  // From span.first_position.
      const int64_t within = position % block_size;
      const int64_t offset = geometry.block_offset(
          item.kv_head, span.table[item.first_block + position / block_size]);
      if (within == 0) prefetcher.next_block(offset);  // The block's first run.
      runs[c] = data.keys + offset + within * 2;
    }
    const auto score = [&](const auto* const* score_runs, int64_t pair_stride) {
      for (int64_t first = 0; first < span.vectors; first += kScoreVectors) {
        const int64_t count = std::min(kScoreVectors, span.vectors - first);
        if (span.skips(first, count, start, columns * kLanes)) continue;
        with_count<kScoreVectors>(count, [&](auto n) {
          with_count<kScoreColumns>(columns, [&](auto m) {
            score_columns_bf16<decltype(n)::value, decltype(m)::value>(
                head_dim, shape.scale, scratch.query_pairs.data() + first * head_dim / 2,
                score_runs, pair_stride,
                scratch.scores.data() + first * span.score_pitch + column * kLanes,
                span.score_pitch);
          });
        });
      }
    };
    // An 8-bit cache's runs that several groups of vectors score (a prompt's tile) are widened
    // once, into the scratch with a run's pairs 32 elements apart; one group (a decode) widens
    // them in registers as it loads them.
    if constexpr (kIsFp8<C>) {
      if (span.vectors > kScoreVectors) {
        const Bf16Loads<C> load;
        const at::BFloat16* widened[kScoreColumns];
        for (int64_t c = 0; c < columns; ++c) {
          __m512i* run = scratch.key_runs.data() + c * head_dim / 2;
          for (int64_t pair = 0; pair < head_dim / 2; ++pair) {
            run[pair] = load(runs[c] + pair * block_size * 2);
          }
          widened[c] = reinterpret_cast<const at::BFloat16*>(run);
        }
        score(widened, 2 * kLanes);
        continue;
      }
    }
    score(runs, block_size * 2);
  }
}
#endif

// The scores [begin, end) of a vector's row, counted from the item's first position, that it
// sees. A partition's vector may see nothing of it (begin == end): its window begins past the
// partition's end, or its position comes before the partition's start.
inline std::pair<int64_t, int64_t> seen_scores(const ItemSpan& span, int64_t vector) {
  const int64_t begin = std::min(span.begin(vector) - span.first_position, span.stride);
  return {begin, std::max(begin, span.end(vector) - span.first_position)};
}

// Each vector's scores of what it sees, times `scale` (1 where the scoring applied it), become
// cap * tanh(score / cap). A pass of its own, out of line, so that the item loop of attention
// without a cap keeps the code it had.
__attribute__((noinline)) void soft_cap_rows(const ItemSpan& span, float scale, float cap,
                                             ItemScratch& scratch) {
  const float inverse_cap = 1.f / cap;
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    const auto [begin, end] = seen_scores(span, vector);
    float* row_scores = scratch.scores.data() + vector * span.score_pitch;
#pragma omp simd
    for (int64_t t = begin; t < end; ++t) {
      row_scores[t] = cap * vector_tanh(row_scores[t] * scale * inverse_cap);
    }
  }
}

// A vector's softmax before normalising: its largest score, and the sum of its weights
// exp(score - maximum). A vector that sees nothing gets a sum of 0.
struct RowSoftmax {
  float maximum;
  float sum;
};

// The softmax of scores [begin, end), each weight handed to `store` (a lane of floats, and
// which of them lie before `end`), a vector of lanes at a time from `begin`. The sum adds lane
// by lane from `begin`, so its order depends on the vector's positions, not on its item.
#if defined(__AVX512F__)
// 2^x to within 1e-4 (relative), for softmax weights that are rounded to bfloat16 (8 significant
// bits) next: a cubic (a minimax fit) on the fraction x - floor(x), which vreduceps gives in one
// instruction, times 2^floor(x) by vscalefps. Half the instructions of exp_avx512. Below -127
// (-inf too) it gives 2^-127 or so, a weight too small to count.
inline __m512 exp2_for_bfloat16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);  // x second: a NaN stays NaN
  const __m512 fraction = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.07802403f);
  p = _mm512_fmadd_ps(p, fraction, _mm512_set1_ps(0.22606707f));
  p = _mm512_fmadd_ps(p, fraction, _mm512_set1_ps(0.69583398f));
  p = _mm512_fmadd_ps(p, fraction, _mm512_set1_ps(0.99992514f));
  return _mm512_scalef_ps(p, x);
}

// The largest of scores [begin, end): -inf where the range is empty.
inline float row_maximum(const float* scores, int64_t begin, int64_t end) {
  __m512 maxima = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = begin;
  for (; t + kLanes <= end; t += kLanes) {
    maxima = _mm512_max_ps(_mm512_loadu_ps(scores + t), maxima);  // a NaN score is passed over
  }
  if (t < end) {
    const __mmask16 lanes = first_lanes(end - t);
    maxima = _mm512_mask_max_ps(maxima, lanes, _mm512_maskz_loadu_ps(lanes, scores + t), maxima);
  }
  return _mm512_reduce_max_ps(maxima);
}

// `largest` is the largest of the scores (row_maximum's). They are multiplied by `scale` on the
// way (the tile path's scoring leaves them unscaled): the maximum is the scaled one, `largest`
// times the scale. With kToBfloat16 the weights come from exp2_for_bfloat16, log2(e) folded
// into the scale and the shift: exp(y) = 2^(y log2(e)).
template <bool kToBfloat16, typename Store>
inline RowSoftmax softmax_row(const float* scores, int64_t begin, int64_t end, float scale,
                              float largest, Store&& store) {
  const float maximum = largest * scale;
  const float base = kToBfloat16 ? 1.44269504f : 1.f;
  const __m512 shift = _mm512_set1_ps(maximum * base);
  const __m512 scales = _mm512_set1_ps(scale * base);
  __m512 sums = _mm512_setzero_ps();
  const auto weigh = [&](int64_t t, __mmask16 lanes) {
    const __m512 shifted = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, scores + t), scales, shift);
    const __m512 weights = kToBfloat16 ? exp2_for_bfloat16(shifted) : exp_avx512(shifted);
    sums = _mm512_mask_add_ps(sums, lanes, sums, weights);
    store(t, weights, lanes);
  };
  // Whole vectors with a constant mask, which the compiler drops, then the ragged end.
  int64_t t = begin;
  for (; t + kLanes <= end; t += kLanes) weigh(t, __mmask16{0xffff});
  if (t < end) weigh(t, first_lanes(end - t));
  return {maximum, _mm512_reduce_add_ps(sums)};
}

inline RowSoftmax softmax_row_in_place(float* scores, int64_t begin, int64_t end) {
  const auto store = [&](int64_t t, __m512 weights, __mmask16 lanes) {
    _mm512_mask_storeu_ps(scores + t, lanes, weights);
  };
  return softmax_row<false>(scores, begin, end, 1.f, row_maximum(scores, begin, end), store);
}
#else
inline RowSoftmax softmax_row_in_place(float* scores, int64_t begin, int64_t end) {
  float maximum = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : maximum)
  for (int64_t t = begin; t < end; ++t) maximum = scores[t] > maximum ? scores[t] : maximum;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = begin; t < end; ++t) {
    scores[t] = vector_exp(scores[t] - maximum);
    sum += scores[t];
  }
  return {maximum, sum};
}
#endif

inline void keep_softmax(const RowSoftmax& softmax, int64_t vector, ItemScratch& scratch) {
  scratch.maxima[vector] = softmax.maximum;
  scratch.sums[vector] = softmax.sum;
}

// Softmax per vector over what it sees, in place, zero elsewhere (so the value pass can weight
// whole blocks), unnormalised: the maximum and the sum go to the scratch, applied at the output
// (or where partitions merge).
inline void softmax_rows(const ItemSpan& span, ItemScratch& scratch) {
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    const auto [begin, end] = seen_scores(span, vector);
    float* row_scores = scratch.scores.data() + vector * span.score_pitch;
    keep_softmax(softmax_row_in_place(row_scores, begin, end), vector, scratch);
    std::fill(row_scores, row_scores + begin, 0.f);
    std::fill(row_scores + end, row_scores + span.stride, 0.f);
  }
}

#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
// softmax_rows for the fast paths, whose value pass reads the weights as bfloat16: they go
// straight to scratch.weights, each vector's row `stride` long: `lead` zeros, its span.stride
// weights (zero where it sees nothing), zeros to the end. The scores are multiplied by `scale`
// first (1 where the scoring applied it). With `maxima_known`, scratch.maxima holds each
// vector's largest score already (the tile path's scoring keeps it). The fast path's strides are
// multiples of 16.
inline void softmax_to_weights(const ItemSpan& span, float scale, int64_t lead, int64_t stride,
                               bool maxima_known, ItemScratch& scratch) {
  scratch.weights.resize(span.vectors * stride);
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    const auto [begin, end] = seen_scores(span, vector);
    uint16_t* row = scratch.weights.data() + vector * stride;
    uint16_t* weights = row + lead;  // From the item's first position.
    std::fill(row, weights + begin, uint16_t{0});
    std::fill(weights + end, row + stride, uint16_t{0});
    const float* row_scores = scratch.scores.data() + vector * span.score_pitch;
    const auto store = [&](int64_t t, __m512 values, __mmask16 lanes) {
      _mm256_mask_storeu_epi16(weights + t, lanes,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(values)));
    };
    const float largest =
        maxima_known ? scratch.maxima[vector] : row_maximum(row_scores, begin, end);
    keep_softmax(softmax_row<true>(row_scores, begin, end, scale, largest, store), vector,
                 scratch);
  }
}
#endif

// scratch.accumulators = the softmax weights times the value rows the item sees.
template <typename T, typename C>
void accumulate_values(const AttentionGeometry& geometry, BlockShape shape,
                       const AttentionData<T, C>& data, const AttentionItem& item,
                       const ItemSpan& span, ItemScratch& scratch) {
  std::fill(scratch.accumulators.begin(),
            scratch.accumulators.begin() + span.vectors * geometry.head_dim, 0.f);
  const int64_t block_size = geometry.block_size;
  for (int64_t block = item.first_block, start = span.first_position; start < span.context;
       start += block_size, ++block) {
    // Rows past the context may hold anything (even NaN), so they are never read; nor are those
    // before the vectors' window.
    const int64_t block_end = std::min(start + block_size, span.context);
    // Adds the block's rows (`rows`, laid out as the cache's) for each group of up to `per_call`
    // vectors that sees the block.
    const auto add_in_groups = [&](int64_t per_call, const auto* rows) {
      for (int64_t first = 0; first < span.vectors; first += per_call) {
        const int64_t count = std::min(per_call, span.vectors - first);
        if (span.skips(first, count, start, block_size)) continue;
        const int64_t row_begin = std::max(start, span.begin(first));
        accumulate_block(shape, count, scratch.accumulators.data() + first * geometry.head_dim,
                         rows + (row_begin - start) * geometry.head_dim, block_end - row_begin,
                         ScoreRows{scratch.scores.data() + first * span.score_pitch +
                                       (row_begin - span.first_position),
                                   span.score_pitch});
      }
    };
    read_block(
        data.values + geometry.block_offset(item.kv_head, span.table[block]), shape.avx2_values,
        geometry.block_elements(), scratch, [&](const auto* block_values) {
          const int64_t rows = block_end - start;
          if (!add_in_avx2_tiles(shape, span.vectors, block_values, rows,
                                 scratch.float_block.data(), add_in_groups)) {
            add_in_groups(kMaxVectors, block_values);
          }
        });
  }
}

#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
// The item's pairs of value rows where they lie in the cache, from the first row any vector
// reads to the context's end (scratch.pair_rows holds each pair's first row, so that the loops
// over pairs divide nothing by the block size).
template <typename C>
CachedPairs<C> cached_pairs(const AttentionGeometry& geometry,
                            const AttentionData<at::BFloat16, C>& data,
                            const AttentionItem& item, const ItemSpan& span,
                            ItemScratch& scratch) {
  const int64_t head_dim = geometry.head_dim;
  // Rows before the item's first vector's window are read by no vector.
  const int64_t item_begin = std::max(span.first_position, span.begin(0));
  const int64_t end_pair = (span.context - span.first_position + 1) / 2;
  scratch.pair_rows.resize(end_pair);
  for (int64_t pair = 0; pair < end_pair; ++pair) {
    const int64_t row = 2 * pair;
    const int64_t block = item.first_block + row / geometry.block_size;
    scratch.pair_rows[pair] = data.values +
                              geometry.block_offset(item.kv_head, span.table[block]) +
                              (row % geometry.block_size) * head_dim;
  }
  return {scratch.pair_rows.data(), head_dim, item_begin - span.first_position,
          span.context - span.first_position};
}

// The pairs [cached.begin / 2, cached.end rounded up to a pair) as InterleavedPairs' operands,
// pair p at operands + p * (head_dim / 16).
template <typename C>
void interleave_pairs(const CachedPairs<C>& cached, __m512i* operands) {
  const int64_t head_dim = cached.head_dim;
  for (int64_t pair = cached.begin / 2; pair < (cached.end + 1) / 2; ++pair) {
    for (int64_t offset = 0; offset < head_dim; offset += kPairDims) {
      __m512bh pair_operands[4];
      cached.load(pair, offset, pair_operands);
      for (int64_t c = 0; c < 4; ++c) {
        _mm512_storeu_si512(operands + pair * (head_dim / kLanes) + offset / kLanes + c,
                            reinterpret_cast<__m512i>(pair_operands[c]));
      }
    }
  }
}

// accumulate_values for the fast path: each group of kPairVectors vectors adds up every pair of
// value rows it sees with its sums in registers. An item with several groups (a prompt's tile)
// interleaves its rows into the scratch once for all of them. A vector's sum runs over the same
// pairs in the same order whatever group it is in: pairs outside what it sees have zero weights
// and add exact zeros. The weights' rows lie `weight_pitch` apart, as softmax_to_weights wrote
// them.
template <typename C>
void accumulate_values_in_pairs(const AttentionGeometry& geometry,
                                const AttentionData<at::BFloat16, C>& data,
                                const AttentionItem& item, const ItemSpan& span,
                                int64_t weight_pitch, ItemScratch& scratch) {
  const int64_t head_dim = geometry.head_dim;
  const CachedPairs<C> cached = cached_pairs(geometry, data, item, span, scratch);
  const int64_t item_begin = span.first_position + cached.begin;
  const auto* weight_pairs = reinterpret_cast<const uint32_t*>(scratch.weights.data());
  auto add_up = [&](const auto& pairs) {
    for (int64_t first = 0; first < span.vectors; first += kPairVectors) {
      const int64_t count = std::min(kPairVectors, span.vectors - first);
      // The pairs holding what the group sees.
      const int64_t group_begin =
          (std::max(item_begin, span.begin(first)) - span.first_position) / 2;
      const int64_t group_end = (span.end(first + count - 1) - span.first_position + 1) / 2;
      for (int64_t offset = 0; offset < head_dim; offset += kPairDims) {
        with_count<kPairVectors>(count, [&](auto n) {
          accumulate_pairs<decltype(n)::value>(
              scratch.accumulators.data() + first * head_dim, head_dim, offset, pairs,
              group_begin, group_end, weight_pairs + first * weight_pitch / 2, weight_pitch / 2);
        });
      }
    }
  };
  if (span.vectors <= kPairVectors) {
    add_up(cached);
    return;
  }
  scratch.value_pairs.resize((cached.end + 1) / 2 * (head_dim / kLanes));
  interleave_pairs(cached, scratch.value_pairs.data());
  add_up(InterleavedPairs{scratch.value_pairs.data(), head_dim});
}

#if defined(SLUICE_ATTENTION_TILES)
// ---- AMX: an item's scores and value sums as tile multiplies, 16 vectors at a time.
//
// Scores: a run of 16 keys in the pair layout is an AMX operand as it lies, 32 dimensions (16
// pair rows of 64 bytes, block_size * 4 bytes apart) at a time, and so are 16 vectors' queries
// (each vector's 64 bytes of those dimensions). Values: the pairs of value rows interleaved as
// for accumulate_pairs are an operand of 32 positions by 16 dimensions, and 16 vectors' softmax
// weights, rounded to bfloat16, one of 16 vectors by 32 positions. Every item takes this path
// on a CPU with AMX (decode steps' too), so that a vector's sums take the same instructions
// whatever else its item holds. The value pass takes 32 positions a tile multiply from absolute
// multiples of 32, so that the grouping is the same whichever block an item starts from (with a
// sliding window that depends on the item's first row): a row's bits then do not rest on the
// order of the sums inside the instruction, which on the CPUs measured did not matter either.
constexpr int64_t kTileVectors = 16;
constexpr int64_t kTilePairs = 16;  // pairs of positions (or of dimensions) per tile multiply
constexpr int64_t kTilePositions = 2 * kTilePairs;

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Registers 0-3: sums (a run's scores in 0; four 16-dimension slices of value sums), 4: the
// vectors' queries or weights, 5-7: keys or values.
void use_tiles(ItemScratch& scratch, int64_t vectors) {
  if (scratch.tile_vectors == vectors) return;
  TileConfig config;
  for (int t = 0; t < 5; ++t) config.set(t, vectors);
  for (int t = 5; t < 8; ++t) config.set(t, kTilePairs);
  config.load();
  scratch.tile_vectors = vectors;
}

// Each of vectors [first, first + count)'s running maximum, `maxima`, over the scores it sees of
// the 16 at positions [start, start + 16), just stored to `rows` (one row per vector).
inline void keep_maxima(const ItemSpan& span, int64_t first, int64_t count, int64_t start,
                        const float* rows, __m512* maxima) {
  const bool all_seen =
      span.begin(first + count - 1) <= start && span.end(first) >= start + kLanes;
  for (int64_t r = 0; r < count; ++r) {
    const __mmask16 lanes =
        all_seen ? __mmask16{0xffff}
                 : static_cast<__mmask16>(first_lanes(span.end(first + r) - start) &
                                          ~first_lanes(span.begin(first + r) - start));
    maxima[r] = _mm512_mask_max_ps(maxima[r], lanes, _mm512_loadu_ps(rows + r * span.score_pitch),
                                   maxima[r]);
  }
}

// score_keys for the tile path: every run of 16 keys the group of vectors sees, into
// scratch.scores, unscaled (the softmax applies the scale as it reads them), and each vector's
// largest score of those it sees into scratch.maxima, taken while the run is in the L1 cache
// (a pass of its own read the rows back from the L2). The first group's pass fetches the blocks
// ahead.
void score_keys_in_tiles(const AttentionGeometry& geometry,
                         const AttentionData<at::BFloat16>& data, const AttentionItem& item,
                         const ItemSpan& span, ItemScratch& scratch,
                         KeyPrefetcher<at::BFloat16>& prefetcher) {
  const int64_t head_dim = geometry.head_dim;
  const int64_t query_bytes = head_dim * sizeof(at::BFloat16);
  const int64_t key_pair_bytes = geometry.block_size * 2 * sizeof(at::BFloat16);
  const auto* queries = reinterpret_cast<const char*>(scratch.query_pairs.data());
  for (int64_t first = 0; first < span.vectors; first += kTileVectors) {
    const int64_t count = std::min(kTileVectors, span.vectors - first);
    use_tiles(scratch, count);
    const char* group_queries = queries + first * query_bytes;
    __m512 maxima[kTileVectors];
    std::fill(maxima, maxima + kTileVectors,
              _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    for (int64_t position = 0; position < span.stride; position += kLanes) {
      const int64_t within = position % geometry.block_size;
      const int64_t offset = geometry.block_offset(
          item.kv_head, span.table[item.first_block + position / geometry.block_size]);
      if (first == 0 && within == 0) prefetcher.next_block(offset);
      if (span.skips(first, count, span.first_position + position, kLanes)) continue;
      const auto* keys = reinterpret_cast<const char*>(data.keys + offset + within * 2);
      _tile_zero(0);
      for (int64_t d = 0; d < head_dim; d += 2 * kTilePairs) {
        _tile_loadd(4, group_queries + d * sizeof(at::BFloat16), query_bytes);
        _tile_loadd(5, keys + (d / 2) * key_pair_bytes, key_pair_bytes);
        _tile_dpbf16ps(0, 4, 5);
      }
      float* rows = scratch.scores.data() + first * span.score_pitch + position;
      _tile_stored(0, rows, span.score_pitch * sizeof(float));
      keep_maxima(span, first, count, span.first_position + position, rows, maxima);
    }
    for (int64_t r = 0; r < count; ++r) {
      scratch.maxima[first + r] = _mm512_reduce_max_ps(maxima[r]);
    }
  }
}

// The operands of pairs [origin_pair, origin_pair + pairs) for the item, interleaving those of
// the rows it sees, [item_begin, span.context), that `kept` lacks. A row past the context is
// interleaved as zeros (its pair again when a later item sees it).
const __m512i* kept_value_pairs(const AttentionGeometry& geometry,
                                const AttentionData<at::BFloat16>& data, const AttentionItem& item,
                                const ItemSpan& span, int64_t item_begin, int64_t origin_pair,
                                int64_t pairs, KeptPairs& kept) {
  const int64_t head_dim = geometry.head_dim;
  const int64_t slices = head_dim / kLanes;
  const int64_t first_pair = item_begin / 2;
  if (kept.sequence != item.sequence || kept.kv_head != item.kv_head ||
      origin_pair < kept.base || first_pair < kept.first || first_pair > kept.done) {
    kept.sequence = item.sequence;
    kept.kv_head = item.kv_head;
    kept.base = origin_pair;
    kept.first = kept.done = first_pair;
  }
  const size_t size = (origin_pair + pairs - kept.base) * slices;
  if (kept.operands.size() < size) kept.operands.resize(size, _mm512_setzero_si512());
  const int64_t end_pair = (span.context + 1) / 2;
  for (int64_t pair = kept.done; pair < end_pair; ++pair) {
    const int64_t row = 2 * pair;
    const at::BFloat16* first_row =
        data.values + geometry.block_offset(item.kv_head, span.table[row / geometry.block_size]) +
        (row % geometry.block_size) * head_dim;
    __m512i* destination = kept.operands.data() + (pair - kept.base) * slices;
    for (int64_t offset = 0; offset < head_dim; offset += kPairDims) {
      __m512bh operands[4];
      interleave_rows(Bf16Loads<at::BFloat16>{}, first_row + offset, head_dim, true,
                      row + 1 < span.context, operands);
      for (int64_t c = 0; c < 4; ++c) {
        _mm512_storeu_si512(destination + offset / kLanes + c,
                            reinterpret_cast<__m512i>(operands[c]));
      }
    }
  }
  kept.done = std::max(kept.done, span.context / 2);
  return kept.operands.data() + (origin_pair - kept.base) * slices;
}

// The softmax (of the scores times `scale`) and accumulate_values for the tile path. Positions
// are counted from `origin`, the multiple of 32 at or before the item's first: the weights' rows
// and the interleaved pairs start `lead` positions of zeros before the item's.
void accumulate_values_in_tiles(const AttentionGeometry& geometry,
                                const AttentionData<at::BFloat16>& data,
                                const AttentionItem& item, const ItemSpan& span, float scale,
                                bool maxima_known, ItemScratch& scratch) {
  const int64_t head_dim = geometry.head_dim;
  const int64_t slices = head_dim / kLanes;  // operands of 16 dimensions per pair
  const int64_t lead = span.first_position % kTilePositions;
  const int64_t weight_stride = row_pitch(lead + span.stride, sizeof(uint16_t));
  // Rows before the item's first vector's window are read by no vector.
  const int64_t item_begin = std::max(span.first_position, span.begin(0));
  const int64_t origin = span.first_position - lead;
  const int64_t pairs = round_up((lead + span.context - span.first_position + 1) / 2, kTilePairs);
  const __m512i* operands = kept_value_pairs(geometry, data, item, span, item_begin, origin / 2,
                                             pairs, scratch.kept_pairs);
  // After the pairs, not before: a tile load takes nothing from stores still in flight and waits
  // for them, and the softmax gives the pairs' stores time to land (a decode's layer of attention
  // took 4-9 % less time so, docs/microbenchmarks.md).
  softmax_to_weights(span, scale, lead, weight_stride, maxima_known, scratch);

  const auto* weights = reinterpret_cast<const char*>(scratch.weights.data());
  const int64_t weight_bytes = weight_stride * sizeof(uint16_t);
  const int64_t pair_bytes = slices * sizeof(__m512i);
  const auto* values = reinterpret_cast<const char*>(operands);
  const __m512i first_order = _mm512_loadu_si512(kUnpackedOrder[0]);
  const __m512i second_order = _mm512_loadu_si512(kUnpackedOrder[1]);
  alignas(64) float sums[4][kTileVectors][kLanes];
  for (int64_t first = 0; first < span.vectors; first += kTileVectors) {
    const int64_t count = std::min(kTileVectors, span.vectors - first);
    use_tiles(scratch, count);
    // The pairs holding what the group sees, in whole tiles.
    const int64_t seen_begin = std::max(item_begin, span.begin(first));
    const int64_t group_begin =
        (lead + seen_begin - span.first_position) / kTilePositions * kTilePairs;
    const int64_t group_end = std::min(
        pairs, round_up((lead + span.end(first + count - 1) - span.first_position + 1) / 2,
                        kTilePairs));
    const char* group_weights = weights + first * weight_bytes;
    for (int64_t offset = 0; offset < head_dim; offset += kPairDims) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t pair = group_begin; pair < group_end; pair += kTilePairs) {
        _tile_loadd(4, group_weights + 2 * pair * sizeof(uint16_t), weight_bytes);
        const char* slice = values + pair * pair_bytes + offset / kLanes * sizeof(__m512i);
        _tile_loadd(5, slice, pair_bytes);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, slice + sizeof(__m512i), pair_bytes);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, slice + 2 * sizeof(__m512i), pair_bytes);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, slice + 3 * sizeof(__m512i), pair_bytes);
        _tile_dpbf16ps(3, 4, 5);
      }
      constexpr int64_t kSumBytes = kLanes * sizeof(float);
      _tile_stored(0, sums[0], kSumBytes);
      _tile_stored(1, sums[1], kSumBytes);
      _tile_stored(2, sums[2], kSumBytes);
      _tile_stored(3, sums[3], kSumBytes);
      // Back into dimension order, as accumulate_pairs puts its sums.
      for (int64_t v = 0; v < count; ++v) {
        for (int64_t half = 0; half < 2; ++half) {
          const __m512 low = _mm512_load_ps(sums[2 * half][v]);
          const __m512 high = _mm512_load_ps(sums[2 * half + 1][v]);
          float* destination =
              scratch.accumulators.data() + (first + v) * head_dim + offset + half * 32;
          _mm512_storeu_ps(destination, _mm512_permutex2var_ps(low, first_order, high));
          _mm512_storeu_ps(destination + kLanes,
                           _mm512_permutex2var_ps(low, second_order, high));
        }
      }
    }
  }
}
#endif
#endif

template <typename T, typename C>
void store_output(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                  const AttentionItem& item, const ItemSpan& span, const ItemScratch& scratch) {
  const int64_t head_dim = geometry.head_dim;
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    const int64_t r = vector / geometry.group;
    const int64_t head = item.kv_head * geometry.group + vector % geometry.group;
    T* destination = data.output + ((span.row_offset + r) * geometry.num_heads + head) * head_dim;
    const float* accumulator = scratch.accumulators.data() + vector * head_dim;
    // A product, not value_scale / sum: built so, the kernel measured 10 % slower with its blocks
    // in the caches (batch 32, 1,024 positions).
    const float inverse_sum = data.value_scale * (1.f / scratch.sums[vector]);
    for (int64_t d = 0; d < head_dim; ++d) {
      destination[d] = from_float<T>(accumulator[d] * inverse_sum);
    }
  }
}

// A partition's result, unnormalised: [vectors][head_dim] value sums, then the vectors' maxima,
// then their sums.
struct Partial {
  float* data;
  int64_t vectors;
  int64_t head_dim;

  float* accumulators(int64_t vector) const { return data + vector * head_dim; }
  float& maximum(int64_t vector) const { return data[vectors * head_dim + vector]; }
  float& sum(int64_t vector) const { return data[vectors * (head_dim + 1) + vector]; }
};

void store_partial(const ItemSpan& span, const ItemScratch& scratch, Partial partial) {
  std::memcpy(partial.data, scratch.accumulators.data(),
              span.vectors * partial.head_dim * sizeof(float));
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    partial.maximum(vector) = scratch.maxima[vector];
    partial.sum(vector) = scratch.sums[vector];
  }
}

// A split tile's output from its partitions', in order: each rescaled to the largest maximum.
// Partitions a vector sees nothing of (a sum of 0) are left out, so a vector that sees one
// partition gets the very bits store_output gives it unsplit (a scale of exactly 1, the same sum
// and reciprocal). A NaN in a partition reaches the output, as it does unsplit.
template <typename T, typename C>
void merge_partials(const AttentionGeometry& geometry, const AttentionData<T, C>& data,
                    const AttentionItem& first, const ItemSpan& span, const Partial* partials,
                    size_t count, float* merged) {
  const int64_t head_dim = geometry.head_dim;
  for (int64_t vector = 0; vector < span.vectors; ++vector) {
    float maximum = -std::numeric_limits<float>::infinity();
    for (size_t p = 0; p < count; ++p) {
      if (partials[p].sum(vector) != 0.f) maximum = std::max(maximum, partials[p].maximum(vector));
    }
    float sum = 0.f;
    bool started = false;
    for (size_t p = 0; p < count; ++p) {
      const Partial& partial = partials[p];
      if (partial.sum(vector) == 0.f) continue;
      const float gap = partial.maximum(vector) - maximum;
      const float scale = gap == 0.f ? 1.f : std::exp(gap);
      const float* accumulators = partial.accumulators(vector);
      if (!started) {
        sum = scale * partial.sum(vector);
        for (int64_t d = 0; d < head_dim; ++d) merged[d] = scale * accumulators[d];
        started = true;
        continue;
      }
      sum += scale * partial.sum(vector);
      for (int64_t d = 0; d < head_dim; ++d) merged[d] += scale * accumulators[d];
    }
    const int64_t r = vector / geometry.group;
    const int64_t head = first.kv_head * geometry.group + vector % geometry.group;
    T* destination = data.output + ((span.row_offset + r) * geometry.num_heads + head) * head_dim;
    const float inverse_sum = data.value_scale * (1.f / sum);
    for (int64_t d = 0; d < head_dim; ++d) {
      destination[d] = from_float<T>(merged[d] * inverse_sum);
    }
  }
}

#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
// One item of the fast path on CPUs with AVX512-BF16, after its queries are gathered: the keys
// scored in runs of columns, the softmax weights rounded to bfloat16, the value rows added in
// pairs, into the scratch. Per vector, every score and every sum runs the same instructions in
// the same order whatever else the item holds, so a row's output does not depend on how its
// sequence's rows are chunked or batched.
template <typename C>
void attend_item_with_dot_products(const AttentionGeometry& geometry, BlockShape shape,
                                   const AttentionData<at::BFloat16, C>& data,
                                   const AttentionItem& item, const ItemSpan& span,
                                   float logit_softcap, ItemScratch& scratch,
                                   KeyPrefetcher<at::BFloat16, C>& prefetcher) {
#if defined(SLUICE_ATTENTION_TILES)
  // The tiles read a bfloat16 cache in place; an 8-bit one takes the dot products for every item.
  if constexpr (std::is_same_v<C, at::BFloat16>) {
    if (amx_granted()) {
      score_keys_in_tiles(geometry, data, item, span, scratch, prefetcher);
      if (logit_softcap > 0.f) {
        soft_cap_rows(span, shape.scale, logit_softcap, scratch);
        accumulate_values_in_tiles(geometry, data, item, span, 1.f, false, scratch);
      } else {
        accumulate_values_in_tiles(geometry, data, item, span, shape.scale, true, scratch);
      }
      return;
    }
  }
#endif
  score_keys_in_columns(geometry, shape, data, item, span, scratch, prefetcher);
  if (logit_softcap > 0.f) soft_cap_rows(span, 1.f, logit_softcap, scratch);
  const int64_t weight_pitch = row_pitch(span.stride, sizeof(uint16_t));
  softmax_to_weights(span, 1.f, 0, weight_pitch, false, scratch);
  accumulate_values_in_pairs(geometry, data, item, span, weight_pitch, scratch);
}
#endif

// How many blocks ahead the prefetcher runs: one block's scoring ahead, or one run of columns'
// (score_keys_in_columns scores kScoreColumns x 16 keys at a time).
template <typename T>
int64_t prefetch_distance(const AttentionGeometry& geometry, BlockShape shape) {
#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
  if (std::is_same_v<T, at::BFloat16> && shape.fast) {
    return std::max<int64_t>(kPrefetchBlocks, kScoreColumns * kLanes / geometry.block_size);
  }
#endif
  (void)geometry;
  (void)shape;
  return kPrefetchBlocks;
}

// One item's scores, softmax and value sums, into the scratch.
template <typename T, typename C>
void attend_item(const AttentionGeometry& geometry, BlockShape shape,
                 const AttentionData<T, C>& data, const AttentionItem& item,
                 const ItemSpan& span, float logit_softcap, ItemScratch& scratch,
                 KeyPrefetcher<T, C>& prefetcher) {
#if defined(SLUICE_ATTENTION_DOT_PRODUCTS)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (shape.fast) {
      attend_item_with_dot_products(geometry, shape, data, item, span, logit_softcap, scratch,
                                    prefetcher);
      return;
    }
  }
#endif
  score_keys(geometry, shape, data, item, span, scratch, prefetcher);
  if (logit_softcap > 0.f) soft_cap_rows(span, 1.f, logit_softcap, scratch);
  softmax_rows(span, scratch);
  accumulate_values(geometry, shape, data, item, span, scratch);
}

template <typename T, typename C>
void paged_attention_impl(const AttentionGeometry& geometry, BlockShape shape,
                          const AttentionData<T, C>& data, int64_t num_sequences,
                          float logit_softcap) {
  AttentionPlan plan = plan_items(geometry, data, num_sequences);
  const std::vector<AttentionItem>& items = plan.items;
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), items.size());
  const AttentionWork work = plan_work(geometry, data, plan, num_threads);
  const std::vector<std::vector<size_t>> assigned = assign_runs(items, work.runs, num_threads);
  const auto partial_in = [&](float* base, const AttentionItem& item) {
    return Partial{base, rows_of(data, item) * geometry.group, geometry.head_dim};
  };
  // A split tile's output from its partitions' partial results, partition k's at base_of(k).
  const auto merge_tile = [&](const ItemRun& tile, const auto& base_of,
                              std::vector<Partial>& partials, float* merged) {
    partials.clear();
    for (size_t k = 0; k < tile.count; ++k) {
      partials.push_back(partial_in(base_of(k), items[tile.first_item + k]));
    }
    const AttentionItem& first = items[tile.first_item];
    merge_partials(geometry, data, first, span_of(geometry, data, first), partials.data(),
                   tile.count, merged);
  };
  std::vector<float> partial_data(work.partial_floats);
  at::parallel_for(0, num_threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    ItemScratch scratch(geometry);
    std::vector<float> tile_partials;  // A whole split tile's partitions'.
    std::vector<Partial> partials;
    std::vector<float> merged(geometry.head_dim);
    for (int64_t thread = thread_begin; thread < thread_end; ++thread) {
      std::vector<size_t> order;  // The thread's items, for the prefetcher.
      for (size_t run : assigned[thread]) {
        const ItemRun& thread_run = work.runs[run];
        for (size_t k = 0; k < thread_run.count; ++k) order.push_back(thread_run.first_item + k);
      }
      KeyPrefetcher<T, C> prefetcher(geometry, data, items, order,
                                     prefetch_distance<T>(geometry, shape), shape.fast);
      const auto attend_one = [&](const AttentionItem& item) {
        const ItemSpan span = span_of(geometry, data, item);
        prefetcher.start();
        scratch.scores.resize(span.vectors * span.score_pitch);
        gather_queries(geometry, shape, data, item, span, scratch);
        attend_item(geometry, shape, data, item, span, logit_softcap, scratch, prefetcher);
        return span;
      };
      for (size_t run_index : assigned[thread]) {
        const ItemRun& run = work.runs[run_index];
        const AttentionItem& first = items[run.first_item];
        if (run.count == 1) {
          const ItemSpan span = attend_one(first);
          if (first.partial < 0) {
            store_output(geometry, data, first, span, scratch);
          } else {
            store_partial(span, scratch, partial_in(partial_data.data() + first.partial, first));
          }
          continue;
        }
        const int64_t floats = floats_per_partial(geometry, rows_of(data, first));
        tile_partials.resize(run.count * floats);
        const auto in_tile = [&](size_t k) { return tile_partials.data() + k * floats; };
        for (size_t k = 0; k < run.count; ++k) {
          const AttentionItem& item = items[run.first_item + k];
          store_partial(attend_one(item), scratch, partial_in(in_tile(k), item));
        }
        merge_tile(run, in_tile, partials, merged.data());
      }
    }
  });
  if (work.merges.empty()) return;
  at::parallel_for(0, work.merges.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<Partial> partials;
    std::vector<float> merged(geometry.head_dim);
    for (int64_t index = begin; index < end; ++index) {
      const ItemRun& tile = work.merges[index];
      const auto in_shared = [&](size_t k) {
        return partial_data.data() + items[tile.first_item + k].partial;
      };
      merge_tile(tile, in_shared, partials, merged.data());
    }
  });
}

void check_cache_layout(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_cpu(key_cache, "key_cache");
  check_cpu(value_cache, "value_cache");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches must be 4-d");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "cache dtypes differ");
  TORCH_CHECK(key_cache.size(0) == value_cache.size(0) &&
                  key_cache.size(1) == value_cache.size(1) &&
                  key_cache.size(2) == value_cache.size(3) &&
                  key_cache.size(3) == value_cache.size(2),
              "key_cache must be [H_kv, blocks, D, block_size] for value_cache "
              "[H_kv, blocks, block_size, D]");
  TORCH_CHECK(value_cache.size(3) % 2 == 0,
              "head_dim must be even: keys are stored in pairs of dimensions");
}

// Every sequence has rows, a block table long enough for its context, and blocks in the cache.
void check_sequences(const at::Tensor& query, const at::Tensor& value_cache,
                     const at::Tensor& block_tables, const at::Tensor& cache_lens,
                     const at::Tensor& query_starts) {
  for (const at::Tensor* tensor : {&block_tables, &cache_lens, &query_starts}) {
    check_cpu(*tensor, "block_tables, cache_lens and query_starts");
    TORCH_CHECK(tensor->scalar_type() == at::kInt && tensor->is_contiguous(),
                "block_tables, cache_lens and query_starts must be contiguous int32");
  }
  const int64_t num_sequences = cache_lens.dim() == 1 ? cache_lens.size(0) : -1;
  TORCH_CHECK(num_sequences >= 0 && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_sequences && query_starts.dim() == 1 &&
                  query_starts.size(0) == num_sequences + 1,
              "one block table and cache length per sequence, and one more query start");
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* cached = cache_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t block_size = value_cache.size(2);
  const int64_t table_width = block_tables.size(1);
  TORCH_CHECK(starts[0] == 0 && starts[num_sequences] == query.size(0),
              "query_starts must run from 0 to the number of query rows");
  for (int64_t s = 0; s < num_sequences; ++s) {
    TORCH_CHECK(starts[s + 1] > starts[s] && cached[s] >= 0, "sequence ", s, " has no rows");
    const int64_t context = cached[s] + starts[s + 1] - starts[s];
    const int64_t blocks = (context + block_size - 1) / block_size;
    TORCH_CHECK(blocks <= table_width, "sequence ", s, ": its block table is too short for ",
                context, " tokens");
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t block = tables[s * table_width + b];
      TORCH_CHECK(block >= 0 && block < value_cache.size(1), "block ", block, " out of range");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// KV cache write: token t's heads go to slot slot_mapping[t] (block slot / block_size, row
// slot % block_size); keys into their block's column, values into its row.

// Items (token, head) per thread's chunk. An item writes a few hundred bytes, but its key lands
// on one cache line per pair of dimensions, which at decode are rarely in cache: its cost is
// those misses, so a decode batch's items are split across threads (measured at 32 tokens and 3
// heads: 28 us a layer against 56 us on one thread).
constexpr int64_t kWriteGrainItems = 8;

// A float as an 8-bit float cache stores it: saturated at the format's largest finite value (a
// key past it would otherwise become NaN in e4m3, infinity in e5m2), then rounded by c10.
template <typename C>
inline C saturated(float value) {
  const float largest = static_cast<float>(std::numeric_limits<C>::max());
  return C(std::clamp(value, -largest, largest));
}

// The 8-bit code of every bfloat16 value, by its bits: c10's rounding takes a few dozen
// instructions an element, which made writing a 1,024-token prompt's keys and values take 0.9 ms
// a layer against 0.25 into a bfloat16 cache.
template <typename C>
const std::vector<uint8_t>& fp8_codes_of_bfloat16() {
  static const std::vector<uint8_t> codes = [] {
    std::vector<uint8_t> table(1 << 16);
    for (uint32_t bits = 0; bits < table.size(); ++bits) {
      const at::BFloat16 value(static_cast<uint16_t>(bits), at::BFloat16::from_bits());
      table[bits] = saturated<C>(to_float(value)).x;
    }
    return table;
  }();
  return codes;
}

// Elements of type T as a cache of type C stores them: an 8-bit float one holds each divided by
// `scale` (a checkpoint's calibrated scale, 1 without one).
template <typename C, typename T>
struct ToCache {
  float scale = 1.f;
  const uint8_t* bfloat16_codes = [] {
    if constexpr (kIsFp8<C> && std::is_same_v<T, at::BFloat16>) {
      return fp8_codes_of_bfloat16<C>().data();
    } else {
      return static_cast<const uint8_t*>(nullptr);
    }
  }();

  C operator()(T value) const {
    if constexpr (std::is_same_v<C, T>) {
      return value;
    } else {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (scale == 1.f) return C(bfloat16_codes[value.x], C::from_bits());
      }
      return saturated<C>(to_float(value) / scale);
    }
  }
};

template <typename T, typename C>
void write_kv_impl(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
                   const at::Tensor& value, const int64_t* slots, float key_scale,
                   float value_scale) {
  const int64_t num_tokens = key.size(0);
  const int64_t num_kv_heads = key.size(1);
  const int64_t head_dim = key.size(2);
  const int64_t num_blocks = value_cache.size(1);
  const int64_t block_size = value_cache.size(2);
  const int64_t block_elements = block_size * head_dim;
  C* keys = key_cache.data_ptr<C>();
  C* values = value_cache.data_ptr<C>();
  const T* key_rows = key.data_ptr<T>();
  const T* value_rows = value.data_ptr<T>();
  const int64_t key_stride[2] = {key.stride(0), key.stride(1)};
  const int64_t value_stride[2] = {value.stride(0), value.stride(1)};
  const ToCache<C, T> key_to_cache{key_scale};
  const ToCache<C, T> value_to_cache{value_scale};
  at::parallel_for(0, num_tokens * num_kv_heads, kWriteGrainItems,
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_kv_heads;
      const int64_t head = item % num_kv_heads;
      const int64_t block = slots[token] / block_size;
      const int64_t row = slots[token] % block_size;
      C* block_keys = keys + (head * num_blocks + block) * block_elements;
      const T* key_row = key_rows + token * key_stride[0] + head * key_stride[1];
      for (int64_t d = 0; d < head_dim; ++d) {
        block_keys[key_offset(d, row, block_size)] = key_to_cache(key_row[d]);
      }
      C* value_slot = values + (head * num_blocks + block) * block_elements + row * head_dim;
      const T* value_row = value_rows + token * value_stride[0] + head * value_stride[1];
      for (int64_t d = 0; d < head_dim; ++d) value_slot[d] = value_to_cache(value_row[d]);
    }
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body with a TypeTag of the cache's element type: the same as the rows', T, or an 8-bit
// float.
template <typename T, typename Body>
void with_cache_type(at::ScalarType cache, Body&& body) {
  if (cache == at::kFloat8_e4m3fn) {
    body(TypeTag<c10::Float8_e4m3fn>{});
  } else if (cache == at::kFloat8_e5m2) {
    body(TypeTag<c10::Float8_e5m2>{});
  } else {
    TORCH_CHECK(cache == c10::CppTypeToScalarType<T>::value, "a cache of ", cache,
                " for rows of ", c10::CppTypeToScalarType<T>::value,
                ": the cache holds the rows' dtype, float8_e4m3fn or float8_e5m2");
    body(TypeTag<T>{});
  }
}

// An 8-bit float cache may hold its keys and values divided by scales; any other holds them as
// they are.
void check_kv_scales(const at::Tensor& cache, double key_scale, double value_scale) {
  for (const double scale : {key_scale, value_scale}) {
    TORCH_CHECK(std::isfinite(scale) && scale > 0, "KV cache scales must be positive, got ",
                scale);
  }
  const bool eight_bit =
      cache.scalar_type() == at::kFloat8_e4m3fn || cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(eight_bit || (key_scale == 1 && value_scale == 1),
              "KV cache scales apply to an 8-bit float cache only (this one holds ",
              cache.scalar_type(), ")");
}

}  // namespace

bool attention_has_dot_products() { return kDotProducts; }

// query [T, H, D] (rows may be strided); caches as described above; block_tables
// [S, max_blocks], cache_lens [S] and query_starts [S + 1], all int32. sliding_window: positions
// a query sees at most, itself included (0: all); logit_softcap: scores become
// cap * tanh(score / cap) before the softmax (0: as they are). key_scale and value_scale: what
// an 8-bit cache's stored keys and values are multiplied by (write_kv's). Returns [T, H, D].
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& cache_lens, const at::Tensor& query_starts,
                           double scale, int64_t sliding_window, double logit_softcap,
                           double key_scale, double value_scale) {
  check_rows(query, "query");
  check_cache_layout(key_cache, value_cache);
  TORCH_CHECK(query.dim() == 3, "query must be [T, H, D]");
  TORCH_CHECK(query.size(2) == value_cache.size(3), "query and cache head_dim differ");
  TORCH_CHECK(query.size(1) % value_cache.size(0) == 0, "heads must be a multiple of KV heads");
  check_sequences(query, value_cache, block_tables, cache_lens, query_starts);
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be at least 1, or 0 for none");
  TORCH_CHECK(logit_softcap >= 0 && std::isfinite(logit_softcap),
              "logit_softcap must be positive, or 0 for none");
  check_kv_scales(value_cache, key_scale, value_scale);

  auto output = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  const int64_t num_sequences = cache_lens.size(0);
  if (num_sequences == 0) return output;
  const AttentionGeometry geometry{
      query.size(1),       value_cache.size(0), query.size(1) / value_cache.size(0),
      query.size(2),       value_cache.size(1), value_cache.size(2),
      block_tables.size(1), query.stride(0),    query.stride(1),
      sliding_window};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention", [&] {
        using T = scalar_t;
        with_cache_type<T>(value_cache.scalar_type(), [&](auto cache_type) {
          using C = typename decltype(cache_type)::type;
          const bool fast = has_fast_path<T, C>(geometry.head_dim, geometry.block_size);
          const bool avx2_scores = !fast && has_avx2_scores<C>(geometry.block_size);
          const bool avx2_values = !fast && has_avx2_values<C>(geometry.head_dim);
          // A key's score is its stored value's times key_scale: the queries take the factor, and
          // the output that of the values (as the AVX2 loops read them, kAvx2ReadScale).
          const double key_read = avx2_scores ? kAvx2ReadScale<C> : 1.0;
          const double value_read = avx2_values ? kAvx2ReadScale<C> : 1.0;
          const BlockShape shape{geometry.head_dim, geometry.block_size, fast, avx2_scores,
                                 avx2_values, static_cast<float>(scale * key_scale / key_read)};
          const AttentionData<T, C> data{
              query.data_ptr<T>(),              key_cache.data_ptr<C>(),
              value_cache.data_ptr<C>(),        output.data_ptr<T>(),
              block_tables.data_ptr<int32_t>(), cache_lens.data_ptr<int32_t>(),
              query_starts.data_ptr<int32_t>(), static_cast<float>(value_scale / value_read)};
          paged_attention_impl(geometry, shape, data, num_sequences,
                               static_cast<float>(logit_softcap));
        });
      });
  return output;
}

// key_scale and value_scale: an 8-bit cache stores keys and values divided by them.
void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& slot_mapping, double key_scale,
              double value_scale) {
  check_rows(key, "key");
  check_rows(value, "value");
  check_cache_layout(key_cache, value_cache);
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key and value must be [T, H_kv, D]");
  TORCH_CHECK(key.size(1) == value_cache.size(0) && key.size(2) == value_cache.size(3),
              "key and value rows do not match the cache's heads and head_dim");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  check_kv_scales(value_cache, key_scale, value_scale);
  check_cpu(slot_mapping, "slot_mapping");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64 [T]");
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "one slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = value_cache.size(1) * value_cache.size(2);
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " out of range");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_kv", [&] {
    with_cache_type<scalar_t>(value_cache.scalar_type(), [&](auto cache_type) {
      write_kv_impl<scalar_t, typename decltype(cache_type)::type>(
          key_cache, value_cache, key, value, slots, static_cast<float>(key_scale),
          static_cast<float>(value_scale));
    });
  });
}

}  // namespace sluice
