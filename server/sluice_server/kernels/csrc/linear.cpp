// bfloat16 matmul for the model's projections, y [M, N] = x [M, K] W^T + b, on CPUs with
// AVX512-BF16. On the row counts of decoding (1 to a few dozen) oneDNN runs at about 60 % of its
// own large-matrix throughput; this is 1.3 to 2 times faster there, and no slower on prompt
// chunks (benchmark/linear_kernel.py).
//
// The weight is packed once into tiles of 32 output columns, [ceil(N / 32)][K / 2][32][2]: for
// each pair of input dimensions, the 32 columns' two weights side by side, 128 bytes, which is
// the pair layout `vdpbf16ps` multiplies (columns past N are zero). A micro-kernel holds an
// 8-row by 32-column block of y in 16 registers and walks K a pair at a time: two loads of the
// tile, eight broadcasts of x's pairs, sixteen dot-product instructions. Threads split the
// tiles; each streams its tiles from memory once per block of rows, prefetching the next tile
// while the current one is reused from cache for each group of 8 rows.
//
// A build without AVX512-BF16 has the packing but not the matmul (has_linear_bf16 says which);
// the Python side then leaves the projections to PyTorch.

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

constexpr int64_t kLinearColumns = 32;
constexpr int64_t kLinearRows = 8;
// Rows of x worked on together, so that x's block stays in cache while the tiles stream past.
constexpr int64_t kLinearRowBlock = 256;

#if defined(__AVX512BF16__)
// Up to kLinearRows rows of x and the matching rows of y's 32-column tile.
struct RowBlock {
  const at::BFloat16* x;
  int64_t x_stride;
  at::BFloat16* y;
  int64_t y_stride;
};

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
  const auto mask_for = [](int64_t count) -> __mmask16 {
    return count >= 16 ? 0xffff : count <= 0 ? 0 : (1u << count) - 1;
  };
  const __mmask16 low_mask = mask_for(tile.columns);
  const __mmask16 high_mask = mask_for(tile.columns - 16);
  for (int r = 0; r < kRows; ++r) {
    at::BFloat16* row = block.y + r * block.y_stride;
    for (int half = 0; half < 2; ++half) {
      _mm256_mask_storeu_epi16(row + 16 * half, half == 0 ? low_mask : high_mask,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sums[r][half])));
    }
  }
}

// y for tiles [begin, end) of the packed weight, every row of x.
void linear_tiles(const at::Tensor& x, const at::Tensor& packed, const float* bias,
                  at::Tensor& y, int64_t begin, int64_t end) {
  const int64_t rows = x.size(0);
  const int64_t pairs = packed.size(1);
  const int64_t out_features = y.size(1);
  const int64_t tile_vectors = 2 * pairs;  // 512-bit vectors per tile
  const auto* weight = reinterpret_cast<const __m512bh*>(packed.data_ptr<at::BFloat16>());
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  const int64_t x_stride = x.stride(0);
  at::BFloat16* y_data = y.data_ptr<at::BFloat16>();
  for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
    const int64_t block_rows = std::min(kLinearRowBlock, rows - row_start);
    const int64_t passes = (block_rows + kLinearRows - 1) / kLinearRows;
    for (int64_t t = begin; t < end; ++t) {
      const __m512bh* tile_data = weight + t * tile_vectors;
      const char* next =
          t + 1 < end ? reinterpret_cast<const char*>(tile_data + tile_vectors) : nullptr;
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
#endif

}  // namespace

bool has_linear_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be bfloat16 [out_features, in_features]");
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  TORCH_CHECK(in_features % 2 == 0, "in_features must be even");
  const int64_t tiles = (out_features + kLinearColumns - 1) / kLinearColumns;
  auto padded = at::zeros({tiles * kLinearColumns, in_features}, weight.options());
  padded.narrow(0, 0, out_features).copy_(weight);
  // [tiles, 32, K/2, 2] -> [tiles, K/2, 32, 2]
  return padded.view({tiles, kLinearColumns, in_features / 2, 2})
      .permute({0, 2, 1, 3})
      .contiguous();
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
#if defined(__AVX512BF16__)
  check_rows(x, "x");
  check_cpu(packed, "packed");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [rows, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == kLinearColumns &&
                  packed.size(3) == 2 && packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_linear_bf16");
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * packed.size(1), "x has ", x.size(1), " columns, the weight ",
              2 * packed.size(1));
  TORCH_CHECK(out_features > (tiles - 1) * kLinearColumns && out_features <= tiles * kLinearColumns,
              "out_features does not match the packed weight");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == tiles * kLinearColumns,
                "bias must be float32, padded to the packed weight's tiles");
    bias_data = bias->data_ptr<float>();
  }
  auto y = at::empty({x.size(0), out_features}, x.options());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    linear_tiles(x, packed, bias_data, y, begin, end);
  });
  return y;
#else
  (void)x;
  (void)packed;
  (void)bias;
  (void)out_features;
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
#endif
}

}  // namespace sluice
