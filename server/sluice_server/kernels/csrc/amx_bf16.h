// AMX's bfloat16 block multiply, shared by linear.cpp's matmul and linear_quantized.cpp's FP8
// codes converted to bfloat16: up to 32 rows of x times a tile of 32 columns in
// pack_linear_bf16's layout.

#pragma once

#include "common.h"
#include "kernels.h"

#if defined(SLUICE_AMX)
namespace sluice {

// ---- AMX: one tile instruction multiplies up to 16 rows of x by 32 input dimensions of 16
// columns.
//
// A packed tile's 16 pair rows from pair p, one half (16 columns) of each, are an AMX weight tile
// as they lie: 64 bytes per pair row, 128 bytes apart. An x tile is up to 16 rows of 32
// dimensions, each row's own 64 bytes. A block of up to 32 rows by the tile's 32 columns keeps
// four float32 accumulator tiles, two x tiles and two weight tiles (the eight AMX registers) and
// walks K 32 dimensions at a time. The tiles are configured with the block's own row counts, so
// a decode step's single row is loaded and multiplied alone. Every row's sums take the same
// instructions in the same order whatever the other rows are, so a row's output does not depend
// on its batch; the order differs from the AVX512-BF16 loops', and a process takes one of the two
// for every call of a weight (AMX where the CPU has it and Linux grants it, and K is whole steps
// of 32).
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxPairs = 16;  // pairs of input dimensions per tile multiply
constexpr int64_t kAmxBlockRows = 2 * kAmxRows;
constexpr int64_t kPackedPairBytes = kLinearColumns * 2 * sizeof(at::BFloat16);
// Steps of K ahead whose weights a lone block of rows prefetches: the tile's own further on,
// and past its end the next tile's (a thread's tiles lie one after the other). 1 to 3 steps
// measured alike; fetching the whole next tile while multiplying this one was slower. Where a
// call has more blocks of rows, the later ones spread the next tile's fetch into L2 over their
// steps instead (`ahead`).
constexpr int64_t kAmxStepsAhead = 2;

// Registers 0-3: the sums of x tile 0's rows (0, 1) and of x tile 1's (2, 3), each 16 float32
// columns; 4-5 the x tiles, `first` and `second` rows (0: unused); 6-7 the weight tiles, 16 pair
// rows each.
inline TileConfig block_config(int64_t first, int64_t second) {
  TileConfig config;
  for (int t : {0, 1, 4}) config.set(t, first);
  for (int t : {2, 3, 5}) config.set(t, second);
  for (int t : {6, 7}) config.set(t, kAmxPairs);
  return config;
}

// A block's rows of x (kGroups tiles of them, the second right after the first), the tile's
// weights, and whether to prefetch the weights ahead.
struct AmxBlock {
  const at::BFloat16* x;
  int64_t x_stride;  // elements
  const char* weights;
  int64_t pairs;
  bool fetch;
  // Lines [ahead, ahead_end) of the next tile to bring into L2 while this block runs,
  // ahead_lines at each step of K (none where `ahead` is null).
  const char* ahead = nullptr;
  const char* ahead_end = nullptr;
  int64_t ahead_lines = 0;
};

// What runs before a step's weights are loaded: nothing where they lie ready.
struct WeightsReady {
  void operator()(int64_t) const {}
};

// The block's rows times the tile's 32 columns, as float32 [rows][32] into `sums`. `prepare(p)`
// runs before the weights of pairs [p, p + kAmxPairs) are loaded: a caller that writes the tile
// step by step (linear_quantized.cpp's FP8 codes, converted) does it there.
template <int kGroups, typename Prepare = WeightsReady>
inline void amx_block(const AmxBlock& block, float* sums, const Prepare& prepare = {}) {
  const int64_t x_stride_bytes = block.x_stride * sizeof(at::BFloat16);
  const at::BFloat16* second_x = block.x + kAmxRows * block.x_stride;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kGroups == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t p = 0; p < block.pairs; p += kAmxPairs) {
    prepare(p);
    const char* pair_rows = block.weights + p * kPackedPairBytes;
    if (block.fetch) {
      const char* lines = pair_rows + kAmxStepsAhead * kAmxPairs * kPackedPairBytes;
      for (int64_t line = 0; line < kAmxPairs * kPackedPairBytes; line += kTileRowBytes) {
        _mm_prefetch(lines + line, _MM_HINT_T0);
      }
    }
    if (block.ahead != nullptr) {
      const int64_t bytes = block.ahead_end - block.ahead;
      const int64_t first = std::min(bytes, p / kAmxPairs * block.ahead_lines * kTileRowBytes);
      const int64_t last = std::min(bytes, first + block.ahead_lines * kTileRowBytes);
      for (int64_t at = first; at < last; at += kTileRowBytes) {
        _mm_prefetch(block.ahead + at, _MM_HINT_T1);
      }
    }
    _tile_loadd(6, pair_rows, kPackedPairBytes);
    _tile_loadd(7, pair_rows + kTileRowBytes, kPackedPairBytes);
    _tile_loadd(4, block.x + 2 * p, x_stride_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kGroups == 2) {
      _tile_loadd(5, second_x + 2 * p, x_stride_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t kSumsStride = kLinearColumns * sizeof(float);
  _tile_stored(0, sums, kSumsStride);
  _tile_stored(1, sums + 16, kSumsStride);
  if constexpr (kGroups == 2) {
    _tile_stored(2, sums + kAmxRows * kLinearColumns, kSumsStride);
    _tile_stored(3, sums + kAmxRows * kLinearColumns + 16, kSumsStride);
  }
}

// `count` rows of sums plus the tile's biases into y as bfloat16, its first `columns` columns.
inline void store_amx_rows(const float* sums, int64_t count, const float* bias, int64_t columns,
                           at::BFloat16* y, int64_t y_stride) {
  for (int64_t r = 0; r < count; ++r) {
    for (int half = 0; half < 2; ++half) {
      __m512 values = _mm512_loadu_ps(sums + r * kLinearColumns + 16 * half);
      if (bias != nullptr) values = _mm512_add_ps(values, _mm512_loadu_ps(bias + 16 * half));
      _mm256_mask_storeu_epi16(y + r * y_stride + 16 * half, first_lanes(columns - 16 * half),
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(values)));
    }
  }
}

}  // namespace sluice
#endif
