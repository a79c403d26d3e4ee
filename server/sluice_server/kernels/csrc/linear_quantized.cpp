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
// per group. (Rounding the activations to integers, 8-bit as llama.cpp does or 16-bit, multiplies
// one row faster, but the 8-bit rounding raised the default model's perplexity by 3.5 % and the
// 16-bit one made many rows slower; see docs/quantization.md.) The AVX2 path
// multiplies a block's four vectors against up to 4 rows of x, so that a column's codes are
// unpacked once per 4 rows, and with fewer rows works on up to 4 columns at once, so that
// independent sums hide the FMAs' latency; the portable path scales a block into a buffer and
// takes dot products. Each row's sums run in the same order whatever rows and columns it is
// computed with, so a request's output does not depend on its batch. Threads split the
// columns. x is widened to float32 and y written in x's dtype here, rather than by separate
// PyTorch conversions around the call (which took a sixth of a one-request decode step).

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

// kRows rows of x (from `x`) against kCols columns (from n): sum_g scale * sum(code * x), the
// codes scaled once per block of 32 and shared by the rows. Each (row, column) sums into two
// chains (a block's first and second half) in the same order whatever kRows and kCols are, so
// that a row's output does not depend on its batch; the kRows * kCols pairs' chains are
// independent, which hides the FMAs' latency.
template <int64_t kRows, int64_t kCols>
inline void scaled_dots(const QuantizedMatrix& w, const float* x, int64_t in_features, int64_t n,
                        float (&dots)[kRows][kCols]) {
  __m256 totals[kRows][kCols][2];
  for (auto& row : totals) {
    for (auto& column : row) {
      for (auto& total : column) total = _mm256_setzero_ps();
    }
  }
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.column_scales(n);
  for_each_block(w, [&](int64_t b, int64_t g) {
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) {
      const uint8_t* block_codes = codes + c * w.code_bytes_per_column() + b * w.block_bytes();
      UnpackedBlock weights = unpack_block_avx2(block_codes, w.bits);
      const __m256 scale = _mm256_set1_ps(scales[c * w.groups() + g]);
      for (auto& values : weights.values) values = _mm256_mul_ps(values, scale);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const float* xr = x + r * in_features + b * kCodeBlock;
        for (int i = 0; i < 4; ++i) {
          __m256& total = totals[r][c][i / 2];
          total = _mm256_fmadd_ps(weights.values[i], _mm256_loadu_ps(xr + 8 * i), total);
        }
      }
    }
  });
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      dots[r][c] = horizontal_sum(_mm256_add_ps(totals[r][c][0], totals[r][c][1]));
    }
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
      unpack_block(codes + b * w.block_bytes(), w.bits, values);
      for (float& value : values) value *= scales[g];
      for (int r = 0; r < kRows; ++r) {
        dots[r][c] += dot(values, x + r * in_features + b * kCodeBlock, kCodeBlock);
      }
    });
  }
}
#endif

// y[row .. row + kRows][n .. n + kCols]: the scaled dots plus the offsets' and bias's terms.
template <int64_t kRows, int64_t kCols, typename Out>
inline void quantized_tile(const QuantizedMatrix& w, const RowBlock<Out>& block,
                           const float* bias, int64_t row, int64_t n) {
  float dots[kRows][kCols];
  scaled_dots<kRows, kCols>(w, block.x + row * block.in_features, block.in_features, n, dots);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      float value = dots[r][c] + (bias ? bias[n + c] : 0.f);
      if (w.offsets != nullptr) {
        const float* offsets = w.offsets + (n + c) * w.groups();
        value += dot(offsets, block.group_sums + (row + r) * block.groups, block.groups);
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
  FloatRows rows;
  widen_rows(x, row_count, w.in_features, w, rows);
  const RowBlock<T> block{rows.data,
                          w.offsets != nullptr ? rows.group_sums.data() : nullptr,
                          y,
                          w.in_features,
                          w.groups(),
                          out_features};
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "linear_quantized",
                                  [&] {
                                    multiply(rows.data_ptr<scalar_t>(), rows.size(0), w, bias_data,
                                             out_features, y.data_ptr<scalar_t>());
                                  });
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
