// Sluice's matmul for the model's projections, y [M, N] = x [M, K] W^T + b: bfloat16 weights on
// three paths, and float32 weights on the float32 FMAs of AVX2 or AVX-512.
//
// - AVX512-BF16: on the row counts of decoding (1 to a few dozen) oneDNN runs at about 60 % of
//   its own large-matrix throughput; this is 1.3 to 2 times faster there, and no slower on
//   prompt chunks (benchmark/linear_kernel.py).
// - AMX (builds for CPUs with AMX-BF16, where Linux grants the tiles): the same packed weight fed
//   to tile multiplies, 16 rows by 16 columns by 32 dimensions an instruction. On a CPU with
//   both, the AVX-512 loops ran 32 rows at about a quarter of AMX's speed and prompt chunks at
//   a sixth to an eighth; AMX matches them on one row (see amx_bf16.h).
// - AVX2 with FMA (CPUs without AVX-512, where oneDNN has no bfloat16 at all): weights stay
//   bfloat16 in memory, half the bytes of float32, and are widened in registers for float32
//   FMAs. Decoding reads every weight once per step, so this beats oneDNN's float32 matmul.
//   The same loops take float32 weights (linear_f32, for models served in float32): oneDNN's
//   float32 matmul reads one row's weights at about 60 % of the memory's bandwidth and loses
//   more at a few rows; these are 1.3 to 1.4 times faster at 1 to 64 rows, on par at 512.
//   AVX-512 builds multiply float32 weights with 512-bit FMAs, a whole tile at a time: 1.9x
//   oneDNN's speed at 1 row, 1.5x at 8, 1.2x at 32, 0.96x to 0.98x at 512 to 4,096.
//
// The weight is packed once into tiles of 32 output columns, [ceil(N / 32)][K / 2][32][2]: for
// each pair of input dimensions, the 32 columns' two weights side by side, 128 bytes, which is
// the pair layout `vdpbf16ps` multiplies (columns past N are zero). The AVX-512 micro-kernel
// holds an 8-row by 32-column block of y in 16 registers and walks K a pair at a time: two loads
// of the tile, eight broadcasts of x's pairs, sixteen dot-product instructions. The AVX2 path
// works on one half of a tile (16 columns) at a time: a 256-bit load of a pair row is 8 columns'
// two weights, and a shift and a mask widen it to those columns' float32 weights of the pair's
// first and second dimension. Up to 8 rows multiply straight from the bfloat16 tile, up to 4 at a
// time (1 or 2 rows take the whole tile in one pass, so that a row has four independent sums);
// more rows widen the half tile into a float32 panel, 192 input dimensions at a time so that it
// stays in L1, and run a 6-row by 16-column kernel (12 sums in registers) over it, the sums
// carried across the panels in float32. Threads split the tiles, and one done with its share
// takes over the others' last (parallel_chunks); each streams its tiles from memory once per
// block of rows, prefetching the next tile while the current one is reused from cache for each
// group of rows.
//
// A float32 weight is packed as [ceil(N / 32)][2][K][16]: each half tile as the float32 panel
// that the AVX2 path widens a bfloat16 half tile into, so the widened passes read it where it
// lies, at every row count past 2 (1 or 2 rows take the whole tile in one pass, as above). With
// AVX-512, a dimension's row of each panel is one vector, and up to 12 rows take both at once
// over all of K.
//
// The same loops also take a weight given tile by tile (linear_bf16_filled): each tile is
// written into a buffer when the loops reach it, which is how linear_quantized.cpp multiplies a
// prompt's many rows by its codes dequantized to bfloat16 once per tile.
//
// A build with neither has the packing but not the matmul (has_linear_bf16 and has_linear_f32
// say which); the Python side then leaves the projections to oneDNN or PyTorch.

#include <unistd.h>

#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "amx_bf16.h"
#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

// Rows of x worked on together, so that x's block stays in cache while the tiles stream past.
constexpr int64_t kLinearRowBlock = 256;

// Where the loops find tile t: in the packed weight, whose next tile they prefetch (past the
// end of a chunk too: it is most often the thread's next)...
template <typename Weight>
struct PackedTiles {
  const Weight* weight;
  int64_t tile_elements;
  int64_t count;

  const Weight* at(int64_t t) const { return weight + t * tile_elements; }
  const Weight* prefetch_after(int64_t t) const {
    return t + 1 < count ? at(t + 1) : nullptr;
  }
};

// ... or written into a buffer of the thread's by `fill` (nothing to prefetch: the buffer stays in
// cache from one tile to the next).
class FilledTiles {
 public:
  FilledTiles(const FillTile& fill, int64_t tile_elements)
      : fill_(fill), buffer_((tile_elements * sizeof(at::BFloat16) + 63) / 64) {}

  const at::BFloat16* at(int64_t t) {
    auto* tile = reinterpret_cast<at::BFloat16*>(buffer_.data());
    fill_(t, tile);
    return tile;
  }
  const at::BFloat16* prefetch_after(int64_t) const { return nullptr; }

 private:
  struct alignas(64) Line {
    uint8_t bytes[64];
  };
  const FillTile& fill_;
  std::vector<Line> buffer_;  // 64-byte aligned, as the AVX-512 loads of a tile expect
};

// Whether Tiles (PackedTiles or FilledTiles) gives float32 weights rather than bfloat16 ones.
template <typename Tiles>
constexpr bool kFloatTiles =
    std::is_same_v<decltype(std::declval<Tiles&>().at(0)), const float*>;

// A micro-kernel's rows of x (bfloat16 for AVX512-BF16, widened to float32 for AVX2) and the
// matching rows of y's columns (bfloat16, or float32 for a float32 weight).
template <typename Input, typename Output = at::BFloat16>
struct Rows {
  const Input* x;
  int64_t x_stride;
  Output* y;
  int64_t y_stride;
};

#if defined(__AVX512BF16__)
#define SLUICE_HAS_LINEAR_BF16 1
// ---- AVX512-BF16 (and AMX): bfloat16 weights times x as it is, in dot products of pairs.
namespace avx512 {

constexpr int64_t kLinearRows = 8;

// Up to kLinearRows rows of x and the matching rows of y's 32-column tile.
using RowBlock = Rows<at::BFloat16>;

// One packed tile: `pairs` pairs of input dimensions, two 512-bit vectors each; its 32 biases
// (padded, or null) and how many of its columns are real.
struct WeightTile {
  const __m512bh* data;
  int64_t pairs;
  const float* bias;
  int64_t columns;
};

// The next tile to fetch while this one is multiplied: of each pair of input dimensions, the
// 64-byte line `lane` (0 or 1), or both lines when `lane` is 2. No fetch when `next` is null.
struct TilePrefetch {
  const char* next;
  int lane;
};

inline __m512bh broadcast_pair(const at::BFloat16* pair) {
  uint32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

template <int64_t kRows>
inline void linear_block(RowBlock block, WeightTile tile, TilePrefetch fetch) {
  __m512 sums[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    sums[r][0] = tile.bias ? _mm512_loadu_ps(tile.bias) : _mm512_setzero_ps();
    sums[r][1] = tile.bias ? _mm512_loadu_ps(tile.bias + 16) : _mm512_setzero_ps();
  }
  const __m512bh* __restrict weights = tile.data;
  const at::BFloat16* __restrict x = block.x;
  for (int64_t k = 0; k < tile.pairs; ++k) {
    const __m512bh low = weights[2 * k];
    const __m512bh high = weights[2 * k + 1];
    if (fetch.next != nullptr) {
      const char* line = fetch.next + k * 2 * sizeof(__m512bh);
      if (fetch.lane != 1) _mm_prefetch(line, _MM_HINT_T1);
      if (fetch.lane != 0) _mm_prefetch(line + sizeof(__m512bh), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh pair = broadcast_pair(x + r * block.x_stride + 2 * k);
      sums[r][0] = _mm512_dpbf16_ps(sums[r][0], pair, low);
      sums[r][1] = _mm512_dpbf16_ps(sums[r][1], pair, high);
    }
  }
  const __mmask16 low_mask = first_lanes(tile.columns);
  const __mmask16 high_mask = first_lanes(tile.columns - 16);
  for (int r = 0; r < kRows; ++r) {
    at::BFloat16* row = block.y + r * block.y_stride;
    for (int half = 0; half < 2; ++half) {
      _mm256_mask_storeu_epi16(row + 16 * half, half == 0 ? low_mask : high_mask,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sums[r][half])));
    }
  }
}

#if defined(SLUICE_AMX)
// ---- AMX: amx_bf16.h's block multiply.

// The next tile's weights, brought into L2 by the blocks of rows after the first while they
// reuse this tile from cache: without them the memory would sit idle while those blocks run and
// the next tile's first block would wait for all of its weights. The shares depend only on K
// and the rows, so one plan serves every tile of a block of rows.
class NextTileLines {
 public:
  // Later blocks it takes: one alone would have to fetch a whole tile while it runs, and the
  // first block fetching its own tile ahead was faster there (a 64-row prompt's step, 7 %).
  static constexpr int64_t kMinSharers = 2;

  NextTileLines(int64_t pairs, int64_t rows)
      : bytes_(pairs * kPackedPairBytes),
        sharers_((rows + kAmxBlockRows - 1) / kAmxBlockRows - 1) {
    if (sharers_ < kMinSharers) {
      sharers_ = 0;
      return;
    }
    per_block_ = (bytes_ / kTileRowBytes + sharers_ - 1) / sharers_;
    const int64_t steps = pairs / kAmxPairs;
    per_step_ = (per_block_ + steps - 1) / steps;
  }

  // Whether the later blocks fetch the next tile (else the first block fetches its own).
  bool shared() const { return sharers_ > 0; }

  // Block `index` of this tile's rows (0: the first) takes its share of `next` (null: none).
  void share(const at::BFloat16* next, int64_t index, AmxBlock& block) const {
    if (next == nullptr || !shared() || index == 0) return;
    const char* lines = reinterpret_cast<const char*>(next);
    const int64_t first = std::min(bytes_, (index - 1) * per_block_ * kTileRowBytes);
    block.ahead = lines + first;
    block.ahead_end = lines + std::min(bytes_, first + per_block_ * kTileRowBytes);
    block.ahead_lines = per_step_;
  }

 private:
  int64_t bytes_;  // of a tile
  int64_t sharers_;
  int64_t per_block_ = 0;  // lines
  int64_t per_step_ = 0;   // lines
};

// linear_tiles with AMX: for each block of kLinearRowBlock rows, each of the thread's tiles
// times the block's rows, 32 at a time (the tile's weights stay in cache from one to the next,
// while the later ones bring the next tile into L2).
template <typename Tiles>
void amx_tiles(const at::Tensor& x, Tiles& tiles, int64_t pairs, const float* bias,
               at::Tensor& y, int64_t begin, int64_t end) {
  const int64_t rows = x.size(0);
  const int64_t out_features = y.size(1);
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  const int64_t x_stride = x.stride(0);
  at::BFloat16* y_data = y.data_ptr<at::BFloat16>();
  alignas(64) float sums[kAmxBlockRows * kLinearColumns];
  int64_t configured = 0;  // the rows of the tile configuration loaded; 0: none yet
  for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
    const int64_t block_end = std::min(rows, row_start + kLinearRowBlock);
    const NextTileLines next_tile(pairs, block_end - row_start);
    for (int64_t t = begin; t < end; ++t) {
      const char* weights = reinterpret_cast<const char*>(tiles.at(t));
      // Weights read from memory (not a filled tile in cache) are fetched ahead: by the later
      // blocks of rows into L2 where there are enough of them (the previous tile's brought this
      // one), else by the first block as it multiplies, a few steps of K ahead into L1. Both at
      // once held up the tile loads (a 128-row call's first block stalled on the fetches).
      const at::BFloat16* following = tiles.prefetch_after(t);
      const bool fetch = following != nullptr && !next_tile.shared();
      const float* tile_bias = bias ? bias + t * kLinearColumns : nullptr;
      const int64_t columns = std::min(kLinearColumns, out_features - t * kLinearColumns);
      for (int64_t r = row_start; r < block_end; r += kAmxBlockRows) {
        const int64_t count = std::min(kAmxBlockRows, block_end - r);
        if (count != configured) {
          block_config(std::min(count, kAmxRows), std::max<int64_t>(count - kAmxRows, 0)).load();
          configured = count;
        }
        AmxBlock block{x_data + r * x_stride, x_stride, weights, pairs, fetch && r == row_start};
        next_tile.share(following, (r - row_start) / kAmxBlockRows, block);
        if (count > kAmxRows) {
          amx_block<2>(block, sums);
        } else {
          amx_block<1>(block, sums);
        }
        store_amx_rows(sums, count, tile_bias, columns,
                       y_data + r * out_features + t * kLinearColumns, out_features);
      }
    }
  }
  if (configured != 0) _tile_release();
}
#endif

// y for tiles [begin, end), every row of x.
template <typename Tiles>
void linear_tiles(const at::Tensor& x, Tiles& tiles, int64_t pairs, const float* bias,
                  at::Tensor& y, int64_t begin, int64_t end) {
#if defined(SLUICE_AMX)
  if (pairs % kAmxPairs == 0 && amx_granted()) {
    return amx_tiles(x, tiles, pairs, bias, y, begin, end);
  }
#endif
  const int64_t rows = x.size(0);
  const int64_t out_features = y.size(1);
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  const int64_t x_stride = x.stride(0);
  at::BFloat16* y_data = y.data_ptr<at::BFloat16>();
  for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
    const int64_t block_rows = std::min(kLinearRowBlock, rows - row_start);
    const int64_t passes = (block_rows + kLinearRows - 1) / kLinearRows;
    for (int64_t t = begin; t < end; ++t) {
      const auto* tile_data = reinterpret_cast<const __m512bh*>(tiles.at(t));
      const auto* next = reinterpret_cast<const char*>(tiles.prefetch_after(t));
      const WeightTile tile{tile_data, pairs, bias ? bias + t * kLinearColumns : nullptr,
                            std::min(kLinearColumns, out_features - t * kLinearColumns)};
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t r = row_start + pass * kLinearRows;
        // The first two passes fetch the next tile, a line of each pair each.
        const TilePrefetch fetch{pass < 2 ? next : nullptr,
                                 passes == 1 ? 2 : static_cast<int>(pass)};
        const RowBlock block{x_data + r * x_stride, x_stride,
                             y_data + r * out_features + t * kLinearColumns, out_features};
        with_count<kLinearRows>(std::min(kLinearRows, rows - r), [&](auto count) {
          linear_block<decltype(count)::value>(block, tile, fetch);
        });
      }
    }
  }
}

}  // namespace avx512
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define SLUICE_HAS_LINEAR_BF16 1
#define SLUICE_HAS_LINEAR_F32 1
// ---- AVX2 with FMA: x widened to float32, the weights too (bfloat16 ones in registers or
// panels), float32 FMAs. Every float32 weight takes these, in AVX-512 builds with 512-bit ones.
namespace fma {

// Rows up to which a block is multiplied straight from the bfloat16 tile (decoding's few rows,
// where the weights' bytes bound the time), in passes of up to kDirectRows rows; more rows
// widen each half tile to float32 a block of K at a time and run the 6-row kernel over it for
// every group of rows.
constexpr int64_t kDirectBlockRows = 8;
constexpr int64_t kDirectRows = 4;
// Rows up to which the direct path takes a whole tile (32 columns) in one pass: four sums per
// row instead of two, so that one row's FMAs, two per pair row on each sum, overlap.
constexpr int64_t kWholeTileRows = 2;
constexpr int64_t kWidenedRows = 6;
// Pairs of input dimensions widened at a time: the block (16 columns x 192 dimensions, 12 KB)
// and a group's rows of x (6 KB) stay in a 32 KB L1 cache while the groups of rows reuse them.
constexpr int64_t kWidenedPairs = 96;
constexpr int64_t kHalfColumns = 16;
// One pair of input dimensions of a packed tile: 32 columns x 2 bfloat16.
constexpr int64_t kPairRowBytes = kLinearColumns * 2 * sizeof(at::BFloat16);

// Up to kWidenedRows rows of x (widened to float32) and the matching rows of y's 16 columns, of
// the weight's dtype.
template <typename Output>
using RowBlock = Rows<float, Output>;

// One half (16 columns) of a packed tile. bfloat16: its first pair row's 64 bytes, then every
// kPairRowBytes. float32: its [K][16] panel. Its 16 biases (or null) and how many of its columns
// are real.
struct WeightHalf {
  const char* data;
  int64_t pairs;
  const float* bias;
  int64_t columns;
};

// 8 columns' weights of a pair, [w(c, k) w(c, k + 1)] per 32-bit lane, as float32 vectors of
// the first dimension (the low halves shifted up) and of the second (the high halves as they are).
inline __m256 first_of_pairs(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
}

inline __m256 second_of_pairs(__m256i pairs) {
  return _mm256_castsi256_ps(
      _mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

template <int64_t kRows>
inline void start_sums(__m256 (&sums)[kRows][2], const float* bias) {
  for (int r = 0; r < kRows; ++r) {
    sums[r][0] = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    sums[r][1] = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  }
}

// Row r's 16 sums into y, the first `columns` of them.
template <int64_t kRows>
inline void store_sums(const __m256 (&sums)[kRows][2], RowBlock<float> block, int64_t columns) {
  for (int r = 0; r < kRows; ++r) {
    float* row = block.y + r * block.y_stride;
    if (columns >= kHalfColumns) {
      _mm256_storeu_ps(row, sums[r][0]);
      _mm256_storeu_ps(row + 8, sums[r][1]);
    } else {
      alignas(32) float values[kHalfColumns];
      _mm256_store_ps(values, sums[r][0]);
      _mm256_store_ps(values + 8, sums[r][1]);
      std::memcpy(row, values, columns * sizeof(float));
    }
  }
}

template <int64_t kRows>
inline void store_sums(const __m256 (&sums)[kRows][2], RowBlock<at::BFloat16> block,
                       int64_t columns) {
  for (int r = 0; r < kRows; ++r) {
    // packus interleaves the 128-bit lanes (low 0-3, high 0-3, low 4-7, high 4-7); the
    // permute puts them back in order.
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(bf16_bits_x8(sums[r][0]), bf16_bits_x8(sums[r][1])), 0xd8);
    at::BFloat16* row = block.y + r * block.y_stride;
    if (columns >= kHalfColumns) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), packed);
    } else {
      alignas(32) at::BFloat16 values[kHalfColumns];
      _mm256_store_si256(reinterpret_cast<__m256i*>(values), packed);
      std::memcpy(row, values, columns * sizeof(at::BFloat16));
    }
  }
}

// The 16 columns' weights of one input dimension, as float32.
struct WeightRow {
  __m256 low;
  __m256 high;
};

// sums[r] += x[r][k] * w for kRows rows.
template <int64_t kRows>
inline void accumulate(__m256 (&sums)[kRows][2], const float* x, int64_t x_stride, WeightRow w) {
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    const __m256 value = _mm256_broadcast_ss(x + r * x_stride);
    sums[r][0] = _mm256_fmadd_ps(value, w.low, sums[r][0]);
    sums[r][1] = _mm256_fmadd_ps(value, w.high, sums[r][1]);
  }
}

// Up to kDirectRows rows straight from the bfloat16 half tile. `next`: the next tile's same
// half, fetched a line per pair row while this one is multiplied; null for none.
template <int64_t kRows>
inline void linear_block_direct(RowBlock<at::BFloat16> block, WeightHalf half, const char* next) {
  __m256 sums[kRows][2];
  start_sums(sums, half.bias);
  for (int64_t k = 0; k < half.pairs; ++k) {
    const auto* pair_row = reinterpret_cast<const __m256i*>(half.data + k * kPairRowBytes);
    if (next != nullptr) _mm_prefetch(next + k * kPairRowBytes, _MM_HINT_T1);
    const __m256i columns_0_7 = _mm256_loadu_si256(pair_row);
    const __m256i columns_8_15 = _mm256_loadu_si256(pair_row + 1);
    accumulate(sums, block.x + 2 * k, block.x_stride,
               {first_of_pairs(columns_0_7), first_of_pairs(columns_8_15)});
    accumulate(sums, block.x + 2 * k + 1, block.x_stride,
               {second_of_pairs(columns_0_7), second_of_pairs(columns_8_15)});
  }
  store_sums(sums, block, half.columns);
}

// Up to kWholeTileRows rows straight from a whole bfloat16 tile: the halves' sums are separate
// chains, and each column's sum is taken in the same order as in the other paths.
template <int64_t kRows>
inline void linear_tile_direct(RowBlock<at::BFloat16> block, WeightHalf first, WeightHalf second,
                               const char* next) {
  __m256 first_sums[kRows][2];
  __m256 second_sums[kRows][2];
  start_sums(first_sums, first.bias);
  start_sums(second_sums, second.bias);
  for (int64_t k = 0; k < first.pairs; ++k) {
    const auto* pair_row = reinterpret_cast<const __m256i*>(first.data + k * kPairRowBytes);
    if (next != nullptr) {
      _mm_prefetch(next + k * kPairRowBytes, _MM_HINT_T1);
      _mm_prefetch(next + k * kPairRowBytes + kPairRowBytes / 2, _MM_HINT_T1);
    }
    const __m256i columns_0_7 = _mm256_loadu_si256(pair_row);
    const __m256i columns_8_15 = _mm256_loadu_si256(pair_row + 1);
    const __m256i columns_16_23 = _mm256_loadu_si256(pair_row + 2);
    const __m256i columns_24_31 = _mm256_loadu_si256(pair_row + 3);
    const float* x = block.x + 2 * k;
    accumulate(first_sums, x, block.x_stride,
               {first_of_pairs(columns_0_7), first_of_pairs(columns_8_15)});
    accumulate(second_sums, x, block.x_stride,
               {first_of_pairs(columns_16_23), first_of_pairs(columns_24_31)});
    accumulate(first_sums, x + 1, block.x_stride,
               {second_of_pairs(columns_0_7), second_of_pairs(columns_8_15)});
    accumulate(second_sums, x + 1, block.x_stride,
               {second_of_pairs(columns_16_23), second_of_pairs(columns_24_31)});
  }
  store_sums(first_sums, block, first.columns);
  if (second.columns > 0) {
    store_sums(second_sums,
               RowBlock<at::BFloat16>{block.x, block.x_stride, block.y + kHalfColumns,
                                      block.y_stride},
               second.columns);
  }
}

// Pairs [first_pair, first_pair + count) of the half tile as float32 rows of 16,
// [2 * count][16], into `widened`.
inline void widen_half(WeightHalf half, int64_t first_pair, int64_t count, const char* next,
                       float* widened) {
  for (int64_t k = first_pair; k < first_pair + count; ++k) {
    const auto* pair_row = reinterpret_cast<const __m256i*>(half.data + k * kPairRowBytes);
    if (next != nullptr) _mm_prefetch(next + k * kPairRowBytes, _MM_HINT_T1);
    const __m256i columns_0_7 = _mm256_loadu_si256(pair_row);
    const __m256i columns_8_15 = _mm256_loadu_si256(pair_row + 1);
    float* rows = widened + 4 * (k - first_pair) * 8;
    _mm256_store_ps(rows, first_of_pairs(columns_0_7));
    _mm256_store_ps(rows + 8, first_of_pairs(columns_8_15));
    _mm256_store_ps(rows + 16, second_of_pairs(columns_0_7));
    _mm256_store_ps(rows + 24, second_of_pairs(columns_8_15));
  }
}

// One block of input dimensions of a widened pass: x's columns [first_dim, first_dim + dims).
// A group's sums start from the biases on the first block and from its float32 partial sums
// after it; they go into y on the last block and back to the partial sums before it. Each sum
// is still one chain of FMAs over K in order, so the bits are those of a single pass.
struct DimBlock {
  int64_t first_dim;
  int64_t dims;
  bool first;
  bool last;
};

// Row r's 16 partial sums at partial + 16 r.
template <int64_t kRows>
inline void load_partial_sums(__m256 (&sums)[kRows][2], const float* partial) {
  for (int r = 0; r < kRows; ++r) {
    sums[r][0] = _mm256_load_ps(partial + r * kHalfColumns);
    sums[r][1] = _mm256_load_ps(partial + r * kHalfColumns + 8);
  }
}

template <int64_t kRows>
inline void store_partial_sums(const __m256 (&sums)[kRows][2], float* partial) {
  for (int r = 0; r < kRows; ++r) {
    _mm256_store_ps(partial + r * kHalfColumns, sums[r][0]);
    _mm256_store_ps(partial + r * kHalfColumns + 8, sums[r][1]);
  }
}

// Up to kWidenedRows rows against one block of a widened half tile (or of a float32 panel, which
// is one already): 12 sums, 2 weights and a broadcast in the 16 registers.
template <int64_t kRows, typename Output>
inline void linear_block_widened(RowBlock<Output> block, const float* widened, DimBlock dims,
                                 WeightHalf half, float* partial) {
  __m256 sums[kRows][2];
  if (dims.first) {
    start_sums(sums, half.bias);
  } else {
    load_partial_sums(sums, partial);
  }
  const float* x = block.x + dims.first_dim;
  for (int64_t k = 0; k < dims.dims; ++k) {
    const float* w = widened + k * kHalfColumns;
    WeightRow row{_mm256_load_ps(w), _mm256_load_ps(w + 8)};
    // Left to itself GCC folds loads of these into the rows' FMAs (13 loads to 6 rows' 12
    // FMAs, 12 to 4 rows' 8), so the load ports, not the FMA units, bound the loop; the empty
    // asm makes them values in registers.
    asm("" : "+x"(row.low), "+x"(row.high));
    accumulate(sums, x + k, block.x_stride, row);
  }
  if (dims.last) {
    store_sums(sums, block, half.columns);
  } else {
    store_partial_sums(sums, partial);
  }
}

// body(first, n) for `rows` rows split into as few groups of at most kMax rows as can be, as
// evenly as can be (n a compile-time count): 32 rows in groups of 6 as 6, 6, 5, 5, 5, 5 rather
// than five 6s and a 2, whose 4 sums would leave the FMA units waiting on their latency.
template <int64_t kMax, typename Body>
inline void in_even_groups(int64_t rows, Body&& body) {
  const int64_t groups = (rows + kMax - 1) / kMax;
  for (int64_t g = 0, first = 0; g < groups; ++g) {
    const int64_t count = rows / groups + (g < rows % groups ? 1 : 0);
    with_count<kMax>(count, [&](auto n) { body(first, n); });
    first += count;
  }
}

// Up to kWholeTileRows rows against both float32 panels of a tile at once: four sums per row,
// so that a row's FMAs overlap, each column's sum taken in the same order as in the other paths.
template <int64_t kRows>
inline void linear_tile_panels(RowBlock<float> block, WeightHalf first, WeightHalf second) {
  __m256 first_sums[kRows][2];
  __m256 second_sums[kRows][2];
  start_sums(first_sums, first.bias);
  start_sums(second_sums, second.bias);
  const auto* low = reinterpret_cast<const float*>(first.data);
  const auto* high = reinterpret_cast<const float*>(second.data);
  for (int64_t k = 0; k < 2 * first.pairs; ++k) {
    const float* low_row = low + k * kHalfColumns;
    const float* high_row = high + k * kHalfColumns;
    accumulate(first_sums, block.x + k, block.x_stride,
               {_mm256_load_ps(low_row), _mm256_load_ps(low_row + 8)});
    accumulate(second_sums, block.x + k, block.x_stride,
               {_mm256_load_ps(high_row), _mm256_load_ps(high_row + 8)});
  }
  store_sums(first_sums, block, first.columns);
  if (second.columns > 0) {
    store_sums(second_sums,
               RowBlock<float>{block.x, block.x_stride, block.y + kHalfColumns, block.y_stride},
               second.columns);
  }
}

#if defined(__AVX512F__)
// float32 weights in AVX-512 builds: a tile's two float32 panels, a 512-bit vector each per input
// dimension, times up to kFloatRows rows over the whole of K (24 sums, the two weights and a
// broadcast in the 32 registers), the tile (K x 128 bytes) staying in L2 while the groups of rows
// reuse it. Every row count takes these, each column's sum one chain of FMAs over K in order from
// its bias, as in the AVX2 loops (the same bits). The AVX2 loops' 6 by 16 kernel ran 32 rows and
// more 12-19 % slower than oneDNN's float32 on an AVX-512 CPU, and this kernel over the widened
// passes' L1-sized blocks of K (partial sums kept between them) 2-15 % slower than over all of K.
constexpr int64_t kFloatRows = 12;

// One float32 tile: its two [K][16] panels and K (`dims`), its 32 biases (padded, or null) and
// how many of its columns are real.
struct FloatTile {
  const float* low;
  const float* high;
  int64_t dims;
  const float* bias;
  int64_t columns;
};

// The next tile to fetch while this one is multiplied (as the bfloat16 loops do): of each input
// dimension, the line of its low panel (`lane` 0), of its high panel (1) or both (2). No fetch
// when `next` is null.
struct FloatPrefetch {
  const float* next;
  int lane;
};

template <int64_t kRows>
inline void linear_block_float(RowBlock<float> block, FloatTile tile, FloatPrefetch fetch) {
  __m512 sums[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    for (int half = 0; half < 2; ++half) {
      sums[r][half] = tile.bias ? _mm512_loadu_ps(tile.bias + 16 * half) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < tile.dims; ++k) {
    const __m512 low_weights = _mm512_loadu_ps(tile.low + k * kHalfColumns);
    const __m512 high_weights = _mm512_loadu_ps(tile.high + k * kHalfColumns);
    if (fetch.next != nullptr) {
      const float* low_line = fetch.next + k * kHalfColumns;
      if (fetch.lane != 1) _mm_prefetch(reinterpret_cast<const char*>(low_line), _MM_HINT_T1);
      if (fetch.lane != 0) {
        _mm_prefetch(reinterpret_cast<const char*>(low_line + tile.dims * kHalfColumns),
                     _MM_HINT_T1);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512 value = _mm512_set1_ps(block.x[r * block.x_stride + k]);
      sums[r][0] = _mm512_fmadd_ps(value, low_weights, sums[r][0]);
      sums[r][1] = _mm512_fmadd_ps(value, high_weights, sums[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int half = 0; half < 2; ++half) {
      _mm512_mask_storeu_ps(block.y + r * block.y_stride + 16 * half,
                            first_lanes(tile.columns - 16 * half), sums[r][half]);
    }
  }
}

// y for tiles [begin, end) of a float32 weight, every row of x: for each block of kLinearRowBlock
// rows, each tile times the block's rows, kFloatRows at a time, the first two groups of rows
// fetching the next tile into L2 while the others reuse this one (without, the memory sat idle
// while a batch of 32 rows ran its second and third group). A single row streams its tiles at
// the memory's pace, which the hardware prefetcher follows: fetching ahead gained it nothing.
template <typename Tiles>
void float_tiles(const at::Tensor& x, Tiles& tiles, int64_t pairs, const float* bias,
                 at::Tensor& y, int64_t begin, int64_t end) {
  const int64_t rows = x.size(0);
  const int64_t out_features = y.size(1);
  const float* x_data = x.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  float* y_data = y.data_ptr<float>();
  for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
    const int64_t block_rows = std::min(kLinearRowBlock, rows - row_start);
    const bool one_group = block_rows <= kFloatRows;
    for (int64_t t = begin; t < end; ++t) {
      const float* panels = tiles.at(t);
      const float* next = block_rows > 1 ? tiles.prefetch_after(t) : nullptr;
      const FloatTile tile{panels, panels + 2 * pairs * kHalfColumns, 2 * pairs,
                           bias ? bias + t * kLinearColumns : nullptr,
                           std::min(kLinearColumns, out_features - t * kLinearColumns)};
      int group = 0;
      in_even_groups<kFloatRows>(block_rows, [&](int64_t done, auto n) {
        const int64_t r = row_start + done;
        const RowBlock<float> block{x_data + r * x_stride, x_stride,
                                    y_data + r * out_features + t * kLinearColumns, out_features};
        const FloatPrefetch fetch{group < 2 ? next : nullptr, one_group ? 2 : group};
        linear_block_float<decltype(n)::value>(block, tile, fetch);
        ++group;
      });
    }
  }
}
#endif

// A thread's buffers for the widened passes, made once per thread of a matmul rather than for
// every chunk of tiles it takes: a block of a half tile widened to float32, 2 * kWidenedPairs
// rows of 16 (two vectors; a float32 weight needs none), and a block of rows' partial sums when
// K takes more than one block; __m256 elements keep them aligned for the vector loads.
class TileScratch {
 public:
  TileScratch(int64_t rows, int64_t pairs, bool float_weights)
      : widened_(rows > kDirectBlockRows && !float_weights ? 4 * std::min(pairs, kWidenedPairs)
                                                           : 0),
        partial_(rows >= first_widened_rows(float_weights) && pairs > kWidenedPairs
                     ? 2 * kLinearRowBlock
                     : 0) {}

  // The fewest rows that take the widened passes: a float32 weight is its own widened panel,
  // so every row count past the whole-tile kernel's runs them.
  static int64_t first_widened_rows(bool float_weights) {
    return float_weights ? kWholeTileRows + 1 : kDirectBlockRows + 1;
  }

  float* widened() { return reinterpret_cast<float*>(widened_.data()); }
  float* partial() { return reinterpret_cast<float*>(partial_.data()); }

 private:
  std::vector<__m256> widened_;
  std::vector<__m256> partial_;
};

// The widened passes for one half tile: for each block of kWidenedPairs pairs of input
// dimensions, its float32 panel (`panel_of(first_pair, count)`: widened, or where it lies in a
// float32 weight) times the first `block_rows` of `rows`, a group at a time.
template <typename Output, typename PanelOf>
inline void widened_passes(const Rows<float, Output>& rows, int64_t block_rows, WeightHalf half,
                           float* partial, PanelOf&& panel_of) {
  for (int64_t first_pair = 0; first_pair < half.pairs; first_pair += kWidenedPairs) {
    const int64_t count = std::min(kWidenedPairs, half.pairs - first_pair);
    const float* panel = panel_of(first_pair, count);
    const DimBlock dims{2 * first_pair, 2 * count, first_pair == 0,
                        first_pair + count == half.pairs};
    in_even_groups<kWidenedRows>(block_rows, [&](int64_t done, auto n) {
      const RowBlock<Output> block{rows.x + done * rows.x_stride, rows.x_stride,
                                   rows.y + done * rows.y_stride, rows.y_stride};
      linear_block_widened<decltype(n)::value>(block, panel, dims, half,
                                               partial + done * kHalfColumns);
    });
  }
}

// y for tiles [begin, end), every row of x (float32): bfloat16 weights widened in registers or
// into panels, float32 weights read as they are.
template <typename Tiles>
void linear_tiles(const at::Tensor& x, Tiles& tiles, int64_t pairs, const float* bias,
                  at::Tensor& y, int64_t begin, int64_t end, TileScratch& scratch) {
  constexpr bool kFloatWeights = kFloatTiles<Tiles>;
  using Output = std::conditional_t<kFloatWeights, float, at::BFloat16>;
  // Where the second half tile starts, in bytes from its tile's start: half a pair row in for
  // bfloat16 (its 64 bytes of each pair row); after the first panel for float32.
  const int64_t half_bytes =
      kFloatWeights ? 2 * pairs * kHalfColumns * int64_t{sizeof(float)} : kPairRowBytes / 2;
  const int64_t rows = x.size(0);
  const int64_t out_features = y.size(1);
  const float* x_data = x.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  Output* y_data = y.data_ptr<Output>();
  float* widened = scratch.widened();
  float* partial = scratch.partial();
  for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
    const int64_t block_rows = std::min(kLinearRowBlock, rows - row_start);
    for (int64_t t = begin; t < end; ++t) {
      const auto* tile = reinterpret_cast<const char*>(tiles.at(t));
      const auto* next_tile = reinterpret_cast<const char*>(tiles.prefetch_after(t));
      const auto half_of = [&](int64_t h) {
        const int64_t first_column = t * kLinearColumns + h * kHalfColumns;
        return WeightHalf{tile + h * half_bytes, pairs, bias ? bias + first_column : nullptr,
                          std::min(kHalfColumns, out_features - first_column)};
      };
      const RowBlock<Output> tile_rows{x_data + row_start * x_stride, x_stride,
                                       y_data + row_start * out_features + t * kLinearColumns,
                                       out_features};
      if (block_rows <= kWholeTileRows) {
        with_count<kWholeTileRows>(block_rows, [&](auto count) {
          constexpr int64_t kCount = decltype(count)::value;
          if constexpr (kFloatWeights) {
            linear_tile_panels<kCount>(tile_rows, half_of(0), half_of(1));
          } else {
            linear_tile_direct<kCount>(tile_rows, half_of(0), half_of(1), next_tile);
          }
        });
        continue;
      }
      for (int64_t h = 0; h < 2; ++h) {
        const WeightHalf half = half_of(h);
        if (half.columns <= 0) break;
        const RowBlock<Output> half_rows{tile_rows.x, x_stride, tile_rows.y + h * kHalfColumns,
                                         out_features};
        if constexpr (kFloatWeights) {
          const auto* panel = reinterpret_cast<const float*>(half.data);
          widened_passes(half_rows, block_rows, half, partial, [&](int64_t first_pair, int64_t) {
            return panel + 2 * first_pair * kHalfColumns;
          });
        } else {
          // Whichever pass reads the bfloat16 half also fetches the next tile's line of it.
          const char* next = next_tile != nullptr ? next_tile + h * half_bytes : nullptr;
          if (block_rows <= kDirectBlockRows) {
            // Only the first pass over the half fetches the next tile's line of it.
            in_even_groups<kDirectRows>(block_rows, [&](int64_t done, auto n) {
              const RowBlock<Output> block{half_rows.x + done * x_stride, x_stride,
                                           half_rows.y + done * out_features, out_features};
              linear_block_direct<decltype(n)::value>(block, half, done == 0 ? next : nullptr);
            });
          } else {
            widened_passes(half_rows, block_rows, half, partial,
                           [&](int64_t first_pair, int64_t count) {
                             widen_half(half, first_pair, count, next, widened);
                             return static_cast<const float*>(widened);
                           });
          }
        }
      }
    }
  }
}

}  // namespace fma
#endif

}  // namespace

bool has_linear_bf16() {
#if defined(SLUICE_HAS_LINEAR_BF16)
  return true;
#else
  return false;
#endif
}

namespace {

// weight [out_features, K], checked to be `dtype` (named `dtype_name`), with zero rows after it up
// to whole tiles of kLinearColumns: [tiles, kLinearColumns, K].
at::Tensor padded_to_tiles(const at::Tensor& weight, at::ScalarType dtype,
                           const char* dtype_name) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype, "weight must be ", dtype_name,
              " [out_features, in_features]");
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  TORCH_CHECK(in_features % 2 == 0, "in_features must be even");
  const int64_t tiles = (out_features + kLinearColumns - 1) / kLinearColumns;
  auto padded = at::zeros({tiles * kLinearColumns, in_features}, weight.options());
  padded.narrow(0, 0, out_features).copy_(weight);
  return padded.view({tiles, kLinearColumns, in_features});
}

}  // namespace

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  const at::Tensor tiles = padded_to_tiles(weight, at::kBFloat16, "bfloat16");
  // [tiles, 32, K/2, 2] -> [tiles, K/2, 32, 2]
  return tiles.view({tiles.size(0), kLinearColumns, tiles.size(2) / 2, 2})
      .permute({0, 2, 1, 3})
      .contiguous();
}

#if defined(SLUICE_HAS_LINEAR_BF16)
namespace {

// The checks of out_features against a packed weight's `tiles` and of its bias (float32, padded
// to the tiles); the bias's data, or null.
const float* checked_bias(const c10::optional<at::Tensor>& bias, int64_t tiles,
                          int64_t out_features) {
  TORCH_CHECK(out_features > (tiles - 1) * kLinearColumns && out_features <= tiles * kLinearColumns,
              "out_features does not match the packed weight");
  if (!bias.has_value()) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                  bias->numel() == tiles * kLinearColumns,
              "bias must be float32, padded to the packed weight's tiles");
  return bias->data_ptr<float>();
}

// Whether Tiles' weights take AVX512-BF16's dot products (bfloat16 ones, in builds that have
// them) rather than the AVX2 loops.
template <typename Tiles>
#if defined(__AVX512BF16__)
constexpr bool kDotProducts = !kFloatTiles<Tiles>;
#else
constexpr bool kDotProducts = false;
#endif

// A thread's worker over chunks of `tiles`, y = x W^T + b for the chunk's tiles: the AVX512-BF16
// loops for bfloat16 weights, the AVX-512 float32 kernel for float32 ones, where the build has
// them; else the AVX2 loops with their buffers, made once per thread.
template <typename Tiles>
auto tile_worker(const at::Tensor& x, Tiles tiles, int64_t pairs, const float* bias,
                 at::Tensor& y) {
#if defined(__AVX512BF16__)
  if constexpr (kDotProducts<Tiles>) {
    return [&x, &y, tiles, pairs, bias](int64_t begin, int64_t end) mutable {
      avx512::linear_tiles(x, tiles, pairs, bias, y, begin, end);
    };
  } else
#endif
#if defined(__AVX512F__)
  if constexpr (kFloatTiles<Tiles>) {
    return [&x, &y, tiles, pairs, bias](int64_t begin, int64_t end) mutable {
      fma::float_tiles(x, tiles, pairs, bias, y, begin, end);
    };
  } else
#endif
  {
    return [&x, &y, tiles, pairs, bias,
            scratch = fma::TileScratch(x.size(0), pairs, kFloatTiles<Tiles>)](
               int64_t begin, int64_t end) mutable {
      fma::linear_tiles(x, tiles, pairs, bias, y, begin, end, scratch);
    };
  }
}

// Rows of x that one pass of the threads over the tiles takes: as many whole blocks of
// kLinearRowBlock rows as fill half of this CPU's L2 cache (its size from the C library, 1 MiB
// where it does not say), at least one block.
int64_t rows_per_pass(int64_t row_bytes) {
  static const int64_t cache_bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? static_cast<int64_t>(l2) : int64_t{1} << 20;
  }();
  return std::max<int64_t>(1, cache_bytes / 2 / row_bytes / kLinearRowBlock) * kLinearRowBlock;
}

// y = x W^T + b over `tile_count` tiles of `pairs` pairs of input dimensions each, the tiles as
// `make_tiles()` gives them to each thread, which split them. With `split_rows`, they do that
// for x's rows a pass at a time (rows_per_pass), so that the rows a thread multiplies by each of
// its tiles in turn stay in cache: with every row in one pass, a chunk of one tile (the
// threads' share of a narrow projection) read all of x from memory again, and the 576-column
// projections of a 4,096-row prompt ran at half the speed of a 1,024-row one's. Without it
// (tiles filled on the fly, which each pass would fill again), one pass takes every row. A row's
// sums do not change: the loops block the rows at the same multiples of kLinearRowBlock.
template <typename MakeTiles>
at::Tensor multiply_tiles(const at::Tensor& x, int64_t tile_count, int64_t pairs,
                          const float* bias, int64_t out_features, bool split_rows,
                          MakeTiles&& make_tiles) {
  auto y = at::empty({x.size(0), out_features}, x.options());
  // The AVX2 loops broadcast x's values as float32 (a float32 x is used as it is).
  const at::Tensor rows =
      kDotProducts<decltype(make_tiles())> ? x : x.to(at::kFloat);
  const int64_t row_count = rows.size(0);
  const int64_t pass_rows =
      split_rows ? rows_per_pass(rows.size(1) * rows.element_size()) : row_count;
  // Chunks small enough for each thread to have several, so that taking over a slow thread's
  // last ones evens out its lag.
  const int64_t chunk = std::clamp<int64_t>(tile_count / (8 * at::get_num_threads()), 1, 16);
  for (int64_t first_row = 0; first_row < row_count; first_row += pass_rows) {
    const int64_t count = std::min(pass_rows, row_count - first_row);
    const at::Tensor pass_x = rows.narrow(0, first_row, count);
    at::Tensor pass_y = y.narrow(0, first_row, count);
    parallel_chunks(tile_count, chunk,
                    [&] { return tile_worker(pass_x, make_tiles(), pairs, bias, pass_y); });
  }
  return y;
}

}  // namespace
#endif

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
#if defined(SLUICE_HAS_LINEAR_BF16)
  check_rows(x, "x");
  check_cpu(packed, "packed");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [rows, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == kLinearColumns &&
                  packed.size(3) == 2 && packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_linear_bf16");
  const int64_t tiles = packed.size(0);
  const int64_t pairs = packed.size(1);
  TORCH_CHECK(x.size(1) == 2 * pairs, "x has ", x.size(1), " columns, the weight ", 2 * pairs);
  const float* bias_data = checked_bias(bias, tiles, out_features);
  const PackedTiles<at::BFloat16> packed_tiles{packed.data_ptr<at::BFloat16>(),
                                               pairs * kLinearColumns * 2, tiles};
  return multiply_tiles(x, tiles, pairs, bias_data, out_features, true,
                        [&] { return packed_tiles; });
#else
  (void)x;
  (void)packed;
  (void)bias;
  (void)out_features;
  TORCH_CHECK(false, "linear_bf16 needs a build for AVX512-BF16 or AVX2 with FMA");
#endif
}

bool has_linear_f32() {
#if defined(SLUICE_HAS_LINEAR_F32)
  return true;
#else
  return false;
#endif
}

at::Tensor pack_linear_f32(const at::Tensor& weight) {
  const at::Tensor tiles = padded_to_tiles(weight, at::kFloat, "float32");
  // [tiles, 2, 16, K] -> [tiles, 2, K, 16]
  return tiles.view({tiles.size(0), 2, kLinearColumns / 2, tiles.size(2)})
      .permute({0, 1, 3, 2})
      .contiguous();
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias, int64_t out_features) {
#if defined(SLUICE_HAS_LINEAR_F32)
  check_rows(x, "x");
  check_cpu(packed, "packed");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [rows, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(1) == 2 &&
                  packed.size(3) == kLinearColumns / 2 && packed.size(2) % 2 == 0 &&
                  packed.scalar_type() == at::kFloat,
              "packed must come from pack_linear_f32");
  // The loops load its panels as aligned vectors.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0,
              "packed must be 32-byte aligned");
  const int64_t tiles = packed.size(0);
  const int64_t in_features = packed.size(2);
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " columns, the weight ",
              in_features);
  const float* bias_data = checked_bias(bias, tiles, out_features);
  const PackedTiles<float> packed_tiles{packed.data_ptr<float>(), in_features * kLinearColumns,
                                        tiles};
  return multiply_tiles(x, tiles, in_features / 2, bias_data, out_features, true,
                        [&] { return packed_tiles; });
#else
  (void)x;
  (void)packed;
  (void)bias;
  (void)out_features;
  TORCH_CHECK(false, "linear_f32 needs a build for AVX2 with FMA");
#endif
}

at::Tensor linear_bf16_filled(const at::Tensor& x, int64_t out_features, const float* bias,
                              const FillTile& fill) {
#if defined(SLUICE_HAS_LINEAR_BF16)
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 2 == 0,
              "x must be bfloat16 [rows, K], K even");
  const int64_t pairs = x.size(1) / 2;
  const int64_t tiles = (out_features + kLinearColumns - 1) / kLinearColumns;
  // The loops read a whole tile's biases.
  at::Tensor padded_bias;
  if (bias != nullptr) {
    padded_bias = at::zeros({tiles * kLinearColumns}, x.options().dtype(at::kFloat));
    std::memcpy(padded_bias.data_ptr<float>(), bias, out_features * sizeof(float));
  }
  return multiply_tiles(x, tiles, pairs, bias ? padded_bias.data_ptr<float>() : nullptr,
                        out_features, false,
                        [&] { return FilledTiles(fill, pairs * kLinearColumns * 2); });
#else
  (void)x;
  (void)out_features;
  (void)bias;
  (void)fill;
  TORCH_CHECK(false, "linear_bf16_filled needs a build for AVX512-BF16 or AVX2 with FMA");
#endif
}

}  // namespace sluice
