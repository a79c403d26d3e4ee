// Matmul against group-quantized weights, y [M, N] = x [M, K] W^T + b, dequantizing in registers:
// decoding reads every weight once per step, so 4-bit codes (a quarter of bfloat16's bytes, plus
// the groups' scales) make a step that much less memory to stream.
//
// The weight (`QuantizedMatrix`): per output column n and group g of `group_size` consecutive
// input dimensions, W[n][k] = scale[n][g] * code[n][k] + offset[n][g] (no offset: symmetric
// codes). Codes are
//
// - 4 bits, unsigned (0..15): [N][K / 2] bytes, each 32 dimensions as 16 bytes, the low nibbles
//   holding the first 16 and the high nibbles the next 16 (GGUF's Q4 block layout, which unpacks
//   with one mask and one shift);
// - 8 bits, signed: [N][K] bytes.
//
// Scales and offsets are float32 [N][K / group_size]; group_size is a multiple of 32.
//
// The activations stay float32: sum_k W x = sum_b scale * sum(code * x) + sum_g offset * sum(x),
// each block's 32 codes widened to float32 and scaled once, the offsets joining through x's sums
// per group. (Rounding the activations to 8-bit codes, as llama.cpp does, multiplies faster but
// raised the default model's perplexity by 3.5 %; see docs/quantization.md.) The AVX2 path
// multiplies a block's four vectors against up to 4 rows of x, so that a column's codes are
// unpacked once per 4 rows; the portable path scales a block into a buffer and takes dot
// products. Each row's sums run in the same order whatever rows it is computed with, so a
// request's output does not depend on its batch. Threads split the columns.

#include <vector>

#include <ATen/ops/empty.h>

#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

constexpr int64_t kCodeBlock = 32;
constexpr int64_t kRowsPerPass = 4;
// Columns per thread at least: a decode step's smallest projections still split across threads.
constexpr int64_t kColumnGrain = 16;

struct QuantizedMatrix {
  const uint8_t* codes;
  const float* scales;
  const float* offsets;  // Null: symmetric codes.
  int64_t bits;
  int64_t group_size;
  int64_t in_features;

  int64_t groups() const { return in_features / group_size; }
  int64_t code_bytes_per_column() const { return in_features * bits / 8; }
  const uint8_t* column_codes(int64_t n) const { return codes + n * code_bytes_per_column(); }
};

// Column n's blocks of 32 codes in order, each with its group's scale (the group a counter
// rather than a division per block): body(block index, block's codes, scale).
template <typename Body>
inline void for_each_block(const QuantizedMatrix& w, int64_t n, Body&& body) {
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.scales + n * w.groups();
  const int64_t block_bytes = kCodeBlock * w.bits / 8;
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  for (int64_t b = 0, g = 0, left = blocks_per_group; b < w.in_features / kCodeBlock; ++b, --left) {
    if (left == 0) left = blocks_per_group, ++g;
    body(b, codes + b * block_bytes, scales[g]);
  }
}

// Rows of x (float32, contiguous) with their per-group sums, and y (float32).
struct RowBlock {
  const float* x;
  const float* group_sums;  // [rows][groups]; null without offsets.
  float* y;
  int64_t in_features;
  int64_t groups;
  int64_t out_features;
};

// The portable path's codes of one block of 32 dimensions, as floats.
inline void unpack_block(const uint8_t* codes, int64_t bits, float* values) {
  if (bits == 4) {
    for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
      values[i] = static_cast<float>(codes[i] & 0x0f);
      values[i + kCodeBlock / 2] = static_cast<float>(codes[i] >> 4);
    }
  } else {
    for (int64_t i = 0; i < kCodeBlock; ++i) {
      values[i] = static_cast<float>(static_cast<int8_t>(codes[i]));
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// 32 codes as four vectors of 8 float32, in dimension order.
struct UnpackedBlock {
  __m256 values[4];
};

inline UnpackedBlock unpack_block_avx2(const uint8_t* codes, int64_t bits) {
  UnpackedBlock block;
  if (bits == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    block.values[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
    block.values[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
    block.values[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
    block.values[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
  } else {
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * i));
      block.values[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
  }
  return block;
}

inline float horizontal_sum(__m256 v) {
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// kRows rows of the block (starting at `row`) against column n: sum_g scale * sum(code * x),
// the codes scaled once per block of 32 and shared by the rows. Each row sums into two chains
// (a block's first and second half), so that FMAs overlap even for one row; the chains are the
// same whatever kRows is, so a row's sum is too.
template <int64_t kRows>
inline void scaled_dots(const QuantizedMatrix& w, const RowBlock& block, int64_t row, int64_t n,
                        float (&dots)[kRows]) {
  __m256 totals[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    for (auto& total : totals[r]) total = _mm256_setzero_ps();
  }
  const float* x = block.x + row * block.in_features;
  for_each_block(w, n, [&](int64_t b, const uint8_t* codes, float scale_value) {
    UnpackedBlock weights = unpack_block_avx2(codes, w.bits);
    const __m256 scale = _mm256_set1_ps(scale_value);
    for (auto& values : weights.values) values = _mm256_mul_ps(values, scale);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const float* xr = x + r * block.in_features + b * kCodeBlock;
      for (int i = 0; i < 4; ++i) {
        __m256& total = totals[r][i / 2];
        total = _mm256_fmadd_ps(weights.values[i], _mm256_loadu_ps(xr + 8 * i), total);
      }
    }
  });
  for (int r = 0; r < kRows; ++r) {
    dots[r] = horizontal_sum(_mm256_add_ps(totals[r][0], totals[r][1]));
  }
}
#else
template <int64_t kRows>
inline void scaled_dots(const QuantizedMatrix& w, const RowBlock& block, int64_t row, int64_t n,
                        float (&dots)[kRows]) {
  float values[kCodeBlock];
  for (int r = 0; r < kRows; ++r) dots[r] = 0.f;
  const float* x = block.x + row * block.in_features;
  for_each_block(w, n, [&](int64_t b, const uint8_t* codes, float scale) {
    unpack_block(codes, w.bits, values);
    for (float& value : values) value *= scale;
    for (int r = 0; r < kRows; ++r) {
      dots[r] += dot(values, x + r * block.in_features + b * kCodeBlock, kCodeBlock);
    }
  });
}
#endif

// y[row .. row + kRows][n] for columns [begin, end), plus the offsets' and bias's terms.
template <int64_t kRows>
void quantized_columns(const QuantizedMatrix& w, const RowBlock& block, const float* bias,
                       int64_t row, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    float dots[kRows];
    scaled_dots<kRows>(w, block, row, n, dots);
    for (int r = 0; r < kRows; ++r) {
      float value = dots[r] + (bias ? bias[n] : 0.f);
      if (w.offsets != nullptr) {
        const float* offsets = w.offsets + n * w.groups();
        value += dot(offsets, block.group_sums + (row + r) * block.groups, block.groups);
      }
      block.y[(row + r) * block.out_features + n] = value;
    }
  }
}

QuantizedMatrix checked_matrix(const at::Tensor& codes, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& offsets, int64_t bits,
                               int64_t group_size) {
  check_cpu(codes, "codes");
  check_cpu(scales, "scales");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group_size > 0 && group_size % kCodeBlock == 0, "group_size must be a multiple of ",
              kCodeBlock);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
                  (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar),
              "codes must be contiguous uint8 or int8 [out_features, in_features * bits / 8]");
  const int64_t out_features = codes.size(0);
  const int64_t in_features = codes.size(1) * 8 / bits;
  TORCH_CHECK(in_features % group_size == 0, "in_features (", in_features,
              ") must be a multiple of group_size (", group_size, ")");
  const int64_t groups = in_features / group_size;
  const auto check_groups = [&](const at::Tensor& tensor, const char* name) {
    TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous() &&
                    tensor.dim() == 2 && tensor.size(0) == out_features &&
                    tensor.size(1) == groups,
                name, " must be contiguous float32 [out_features, in_features / group_size]");
  };
  check_groups(scales, "scales");
  const float* offset_data = nullptr;
  if (offsets.has_value()) {
    check_cpu(*offsets, "offsets");
    check_groups(*offsets, "offsets");
    offset_data = offsets->data_ptr<float>();
  }
  return QuantizedMatrix{static_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr<float>(),
                         offset_data, bits, group_size, in_features};
}

}  // namespace

at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets,
                            const c10::optional<at::Tensor>& bias, int64_t bits,
                            int64_t group_size) {
  check_rows(x, "x");
  const QuantizedMatrix w = checked_matrix(codes, scales, offsets, bits, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.in_features, "x must be [rows, ", w.in_features, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const int64_t out_features = codes.size(0);
  const float* bias_data = nullptr;
  at::Tensor bias_float;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must be [out_features]");
    bias_float = bias->to(at::kFloat).contiguous();
    bias_data = bias_float.data_ptr<float>();
  }
  const at::Tensor rows = x.to(at::kFloat).contiguous();
  const int64_t row_count = rows.size(0);
  at::Tensor group_sums;
  if (w.offsets != nullptr) {
    group_sums = rows.view({row_count, w.groups(), group_size}).sum(-1).contiguous();
  }
  auto y = at::empty({row_count, out_features}, rows.options());
  const RowBlock block{rows.data_ptr<float>(),
                       w.offsets != nullptr ? group_sums.data_ptr<float>() : nullptr,
                       y.data_ptr<float>(),
                       w.in_features,
                       w.groups(),
                       out_features};
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < row_count; row += kRowsPerPass) {
      with_count<kRowsPerPass>(std::min(kRowsPerPass, row_count - row), [&](auto count) {
        quantized_columns<decltype(count)::value>(w, block, bias_data, row, begin, end);
      });
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& offsets, int64_t bits,
                             int64_t group_size) {
  const QuantizedMatrix w = checked_matrix(codes, scales, offsets, bits, group_size);
  const int64_t out_features = codes.size(0);
  auto weight = at::empty({out_features, w.in_features}, scales.options());
  float* data = weight.data_ptr<float>();
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
    const int64_t block_bytes = kCodeBlock * w.bits / 8;
    for (int64_t n = begin; n < end; ++n) {
      float* column = data + n * w.in_features;
      for (int64_t k = 0; k < w.in_features; k += kCodeBlock) {
        unpack_block(w.column_codes(n) + k / kCodeBlock * block_bytes, w.bits, column + k);
        const int64_t g = n * w.groups() + k / w.group_size;
        const float scale = w.scales[g];
        const float offset = w.offsets != nullptr ? w.offsets[g] : 0.f;
#pragma omp simd
        for (int64_t i = 0; i < kCodeBlock; ++i) column[k + i] = scale * column[k + i] + offset;
      }
    }
  });
  return weight;
}

}  // namespace sluice
