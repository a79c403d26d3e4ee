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
// The activations are rounded to 16-bit integers per block of 32 (x ~= x_scale * q, |q| <= 32767:
// 2^-16 of the block's largest magnitude, far below bfloat16's own rounding), so that a block's
// 32 products are two integer multiply-adds (vpmaddwd) on codes widened to 16 bits, summed exactly,
// then scaled: sum_k W x = sum_g w_scale * sum_b x_scale * sum(code * q) + sum_g offset * sum(x),
// the offsets joining through x's float sums per group. (8-bit activations, as llama.cpp rounds
// them, multiply faster still but raised the default model's perplexity by 3.5 %; see
// docs/quantization.md.) The AVX2 path unpacks a column's block once for up to 4 rows of x, and
// with fewer rows works on up to 4 columns at once, so that independent sums hide the latency;
// the portable path runs the same arithmetic in loops. Each row's sums run in the same order
// whatever rows and columns it is computed with, so a request's output does not depend on its
// batch. Threads split the columns; x is read in its own dtype and y written in it.

#include <cmath>
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
  int64_t blocks() const { return in_features / kCodeBlock; }
  int64_t block_bytes() const { return kCodeBlock * bits / 8; }
  int64_t code_bytes_per_column() const { return in_features * bits / 8; }
  const uint8_t* column_codes(int64_t n) const { return codes + n * code_bytes_per_column(); }
  const float* column_scales(int64_t n) const { return scales + n * groups(); }
};

// The blocks of 32 codes in order, each with its group (a counter rather than a division per
// block): body(block index, group index).
template <typename Body>
inline void for_each_block(const QuantizedMatrix& w, Body&& body) {
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  for (int64_t b = 0, g = 0, left = blocks_per_group; b < w.blocks(); ++b, --left) {
    if (left == 0) left = blocks_per_group, ++g;
    body(b, g);
  }
}

// Rows of x rounded to 16-bit integers per block of 32 (x ~= scale * value), with their float
// sums per group (for weights with offsets).
struct QuantizedRows {
  std::vector<int16_t> values;    // [rows][in_features]
  std::vector<float> scales;      // [rows][blocks]
  std::vector<float> group_sums;  // [rows][groups]; empty without offsets.
  int64_t in_features;
  int64_t blocks;
  int64_t groups;

  const int16_t* block_values(int64_t row, int64_t b) const {
    return values.data() + row * in_features + b * kCodeBlock;
  }
  float block_scale(int64_t row, int64_t b) const { return scales[row * blocks + b]; }
};

constexpr float kActivationLevels = 32767.f;

// values = round(block * inverse), to nearest even (|block * inverse| <= 32767).
inline void round_block(const float* block, float inverse, int16_t* values) {
#if defined(__AVX2__)
  const __m256 scale = _mm256_set1_ps(inverse);
  for (int64_t i = 0; i < kCodeBlock; i += 16) {
    const __m256i first = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(block + i), scale));
    const __m256i second =
        _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(block + i + 8), scale));
    // packs works within 128-bit lanes; the permutation puts the 16 values back in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(first, second), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + i), packed);
  }
#else
  for (int64_t i = 0; i < kCodeBlock; ++i) {
    values[i] = static_cast<int16_t>(std::nearbyint(block[i] * inverse));
  }
#endif
}

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, const QuantizedMatrix& w) {
  QuantizedRows out{std::vector<int16_t>(rows * w.in_features),
                    std::vector<float>(rows * w.blocks()),
                    std::vector<float>(w.offsets != nullptr ? rows * w.groups() : 0),
                    w.in_features,
                    w.blocks(),
                    w.groups()};
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  at::parallel_for(0, rows, grain_for(w.in_features), [&](int64_t begin, int64_t end) {
    float block[kCodeBlock];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < w.blocks(); ++b) {
        widen(x + r * w.in_features + b * kCodeBlock, block, kCodeBlock);
        float largest = 0.f, sum = 0.f;
#pragma omp simd reduction(max : largest) reduction(+ : sum)
        for (int64_t i = 0; i < kCodeBlock; ++i) {
          largest = std::max(largest, std::abs(block[i]));
          sum += block[i];
        }
        const float inverse = largest > 0.f ? kActivationLevels / largest : 0.f;
        round_block(block, inverse, out.values.data() + r * w.in_features + b * kCodeBlock);
        out.scales[r * w.blocks() + b] = largest / kActivationLevels;
        if (w.offsets != nullptr) out.group_sums[r * w.groups() + b / blocks_per_group] += sum;
      }
    }
  });
  return out;
}

// Rows of x as the kernel reads them, and y in x's dtype.
template <typename Out>
struct RowBlock {
  const QuantizedRows& x;
  Out* y;
  int64_t out_features;
};

// Columns computed together for a pass of kRows rows: enough independent sums to keep the units
// busy when there are few rows, without running out of registers when there are more.
template <int64_t kRows>
constexpr int64_t columns_per_pass() {
  return kRows == 1 ? 4 : kRows == 2 ? 2 : 1;
}

// The portable path's codes of one block of 32 dimensions, as integers.
template <typename T>
inline void unpack_block(const uint8_t* codes, int64_t bits, T* values) {
  if (bits == 4) {
    for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
      values[i] = static_cast<T>(codes[i] & 0x0f);
      values[i + kCodeBlock / 2] = static_cast<T>(codes[i] >> 4);
    }
  } else {
    for (int64_t i = 0; i < kCodeBlock; ++i) {
      values[i] = static_cast<T>(static_cast<int8_t>(codes[i]));
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// 32 codes as two vectors of 16 int16: dimensions 0..15 and 16..31.
struct WidenedBlock {
  __m256i first;
  __m256i second;
};

inline WidenedBlock widen_block_avx2(const uint8_t* codes, int64_t bits) {
  if (bits == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask))};
  }
  const auto* half = reinterpret_cast<const __m128i*>(codes);
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(half)),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(half + 1))};
}

inline float horizontal_sum(__m256 v) {
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// kRows rows of x (from `row`) against kCols columns (from n). Per (row, column): a block's 32
// products summed exactly in 8 int32 lanes, scaled by the block's x scale into the group's 8
// float lanes, which are scaled by the group's weight scale into the total's. The order is the
// same whatever kRows and kCols are; the kRows * kCols sums are independent, which hides the
// latency of their multiply-adds.
template <int64_t kRows, int64_t kCols>
inline void scaled_dots(const QuantizedMatrix& w, const QuantizedRows& x, int64_t row, int64_t n,
                        float (&dots)[kRows][kCols]) {
  __m256 totals[kRows][kCols];
  __m256 group_totals[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) totals[r][c] = _mm256_setzero_ps();
  }
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.column_scales(n);
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  for (int64_t g = 0; g < w.groups(); ++g) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < kCols; ++c) group_totals[r][c] = _mm256_setzero_ps();
    }
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) {
        const uint8_t* block_codes = codes + c * w.code_bytes_per_column() + b * w.block_bytes();
        const WidenedBlock weights = widen_block_avx2(block_codes, w.bits);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          const auto* values = reinterpret_cast<const __m256i*>(x.block_values(row + r, b));
          const __m256i products =
              _mm256_add_epi32(_mm256_madd_epi16(weights.first, _mm256_loadu_si256(values)),
                               _mm256_madd_epi16(weights.second, _mm256_loadu_si256(values + 1)));
          group_totals[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products),
                                               _mm256_set1_ps(x.block_scale(row + r, b)),
                                               group_totals[r][c]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < kCols; ++c) {
        const __m256 scale = _mm256_set1_ps(scales[c * w.groups() + g]);
        totals[r][c] = _mm256_fmadd_ps(group_totals[r][c], scale, totals[r][c]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) dots[r][c] = horizontal_sum(totals[r][c]);
  }
}
#else
template <int64_t kRows, int64_t kCols>
inline void scaled_dots(const QuantizedMatrix& w, const QuantizedRows& x, int64_t row, int64_t n,
                        float (&dots)[kRows][kCols]) {
  int32_t codes[kCodeBlock];
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  for (int c = 0; c < kCols; ++c) {
    const float* scales = w.column_scales(n + c);
    for (int r = 0; r < kRows; ++r) {
      float total = 0.f;
      for (int64_t g = 0; g < w.groups(); ++g) {
        float group_total = 0.f;
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
          unpack_block(w.column_codes(n + c) + b * w.block_bytes(), w.bits, codes);
          const int16_t* values = x.block_values(row + r, b);
          int32_t products = 0;
          for (int64_t i = 0; i < kCodeBlock; ++i) products += codes[i] * values[i];
          group_total += static_cast<float>(products) * x.block_scale(row + r, b);
        }
        total += group_total * scales[g];
      }
      dots[r][c] = total;
    }
  }
}
#endif

// y[row .. row + kRows][n .. n + kCols]: the scaled dots plus the offsets' and bias's terms.
template <int64_t kRows, int64_t kCols, typename Out>
inline void quantized_tile(const QuantizedMatrix& w, const RowBlock<Out>& block,
                           const float* bias, int64_t row, int64_t n) {
  float dots[kRows][kCols];
  scaled_dots<kRows, kCols>(w, block.x, row, n, dots);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      float value = dots[r][c] + (bias ? bias[n + c] : 0.f);
      if (w.offsets != nullptr) {
        const float* offsets = w.offsets + (n + c) * w.groups();
        value += dot(offsets, block.x.group_sums.data() + (row + r) * w.groups(), w.groups());
      }
      block.y[(row + r) * block.out_features + n + c] = from_float<Out>(value);
    }
  }
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

template <typename T>
void multiply(const T* x, int64_t row_count, const QuantizedMatrix& w, const float* bias,
              int64_t out_features, T* y) {
  const QuantizedRows rows = quantize_rows(x, row_count, w);
  const RowBlock<T> block{rows, y, out_features};
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < row_count; row += kRowsPerPass) {
      with_count<kRowsPerPass>(std::min(kRowsPerPass, row_count - row), [&](auto count) {
        quantized_columns<decltype(count)::value>(w, block, bias, row, begin, end);
      });
    }
  });
}

}  // namespace

at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets,
                            const c10::optional<at::Tensor>& bias, int64_t bits,
                            int64_t group_size) {
  check_rows(x, "x");
  const QuantizedMatrix w = checked_matrix(codes, scales, offsets, bits, group_size);
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
  auto y = at::empty({rows.size(0), out_features}, rows.options());
  switch (rows.scalar_type()) {
    case at::kFloat:
      multiply(rows.data_ptr<float>(), rows.size(0), w, bias_data, out_features,
               y.data_ptr<float>());
      break;
    case at::kBFloat16:
      multiply(rows.data_ptr<at::BFloat16>(), rows.size(0), w, bias_data, out_features,
               y.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      multiply(rows.data_ptr<at::Half>(), rows.size(0), w, bias_data, out_features,
               y.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return y;
}

at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& offsets, int64_t bits,
                             int64_t group_size) {
  const QuantizedMatrix w = checked_matrix(codes, scales, offsets, bits, group_size);
  const int64_t out_features = codes.size(0);
  auto weight = at::empty({out_features, w.in_features}, scales.options());
  float* data = weight.data_ptr<float>();
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* column = data + n * w.in_features;
      for_each_block(w, [&](int64_t b, int64_t g) {
        float* values = column + b * kCodeBlock;
        unpack_block(w.column_codes(n) + b * w.block_bytes(), w.bits, values);
        const float scale = w.column_scales(n)[g];
        const float offset = w.offsets != nullptr ? w.offsets[n * w.groups() + g] : 0.f;
#pragma omp simd
        for (int64_t i = 0; i < kCodeBlock; ++i) values[i] = scale * values[i] + offset;
      });
    }
  });
  return weight;
}

}  // namespace sluice
