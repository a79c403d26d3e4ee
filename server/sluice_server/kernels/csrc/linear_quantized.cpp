// Matmul against group-quantized weights, y [M, N] = x [M, K] W^T + b, in integer arithmetic:
// decoding reads every weight once per step, so 4-bit codes (a quarter of bfloat16's bytes, plus
// the groups' scales) make a step that much less memory to stream, and multiplying the codes as
// bytes keeps the arithmetic from becoming the bottleneck instead.
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
// Each row of x is quantized once per call to signed 8 bits per block of 32 dimensions
// (x[k] ~= x_scale[b] * x_code[k], x_scale = max |x| / 127, as llama.cpp's Q8 activations), so
// that a block's dot product is 32 byte products summed exactly in integers:
//   sum_k W x = sum_b scale * x_scale[b] * sum(code * x_code) + sum_g offset * sum_{k in g} x,
// the offsets' term taken with x's exact float sums. The AVX2 path multiplies 32 codes by 32
// x codes in one `vpmaddubsw` (unsigned by signed bytes into pairs of int16; signed 8-bit codes
// go through their absolute value and x's codes with the codes' signs) and one `vpmaddwd`, for
// up to 4 rows of x per column's codes loaded. Each row's result does not depend on the other
// rows of the call: a request's output is the same whatever it is batched with. The portable
// path runs the same arithmetic in scalar loops. Threads split the columns.

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
  const uint8_t* column_codes(int64_t n) const { return codes + n * blocks() * block_bytes(); }
};

// The rows of x as 8-bit codes with a scale per block of 32, their float sums per group (for
// the offsets), and y (float32).
struct QuantizedRows {
  const int8_t* codes;       // [rows][K]
  const float* scales;       // [rows][K / 32]
  const float* group_sums;   // [rows][groups]; null without offsets.
  float* y;                  // [rows][N]
  int64_t in_features;
  int64_t groups;
  int64_t out_features;

  int64_t blocks() const { return in_features / kCodeBlock; }
};

// One row's block of 32: codes and scale such that x ~= scale * code, |code| <= 127.
void quantize_block(const float* x, int8_t* codes, float* scale) {
  float largest = 0.f;
  for (int64_t i = 0; i < kCodeBlock; ++i) largest = std::max(largest, std::abs(x[i]));
  *scale = largest / 127.f;
  const float inverse = largest > 0.f ? 127.f / largest : 0.f;
  for (int64_t i = 0; i < kCodeBlock; ++i) {
    codes[i] = static_cast<int8_t>(std::nearbyint(x[i] * inverse));
  }
}

// The portable path's codes of one block of 32 dimensions, as integers in dimension order.
inline void unpack_block(const uint8_t* codes, int64_t bits, int32_t* values) {
  if (bits == 4) {
    for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
      values[i] = codes[i] & 0x0f;
      values[i + kCodeBlock / 2] = codes[i] >> 4;
    }
  } else {
    for (int64_t i = 0; i < kCodeBlock; ++i) values[i] = static_cast<int8_t>(codes[i]);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// A block's 32 weight codes as the unsigned operand of vpmaddubsw, and what to multiply x's
// codes by first: for 8-bit codes their signs (which vpsignb applies), none for 4-bit ones.
struct ByteCodes {
  __m256i magnitudes;
  __m256i signs;
  bool signed_codes;
};

inline ByteCodes load_block(const uint8_t* codes, int64_t bits) {
  if (bits == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m256i nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                                             _mm_and_si128(bytes, mask));
    return {nibbles, _mm256_setzero_si256(), false};
  }
  const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  return {_mm256_sign_epi8(values, values), values, true};
}

inline float horizontal_sum(__m256 v) {
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// kRows rows (starting at `row`) against column n: sum_b scale * x_scale * sum(code * x_code).
// Each row sums into two chains (even and odd blocks), which keeps two FMAs in flight even for
// one row; the chains are the same whatever kRows is, so a row's sum is too.
template <int64_t kRows>
inline void scaled_dots(const QuantizedMatrix& w, const QuantizedRows& x, int64_t row, int64_t n,
                        float (&dots)[kRows]) {
  __m256 totals[kRows][2];
  for (int r = 0; r < kRows; ++r) totals[r][0] = totals[r][1] = _mm256_setzero_ps();
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.scales + n * w.groups();
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  // Blocks in group order, so that a block's group is a counter, not a division.
  for (int64_t b = 0, g = 0, left = blocks_per_group; b < w.blocks(); ++b, --left) {
    if (left == 0) left = blocks_per_group, ++g;
    const ByteCodes block = load_block(codes + b * w.block_bytes(), w.bits);
    const float scale = scales[g];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const int64_t at = (row + r) * x.in_features + b * kCodeBlock;
      __m256i x_codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + at));
      if (block.signed_codes) x_codes = _mm256_sign_epi8(x_codes, block.signs);
      const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(block.magnitudes, x_codes), ones);
      const __m256 weight = _mm256_set1_ps(scale * x.scales[(row + r) * x.blocks() + b]);
      totals[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), weight, totals[r][b & 1]);
    }
  }
  for (int r = 0; r < kRows; ++r) dots[r] = horizontal_sum(_mm256_add_ps(totals[r][0], totals[r][1]));
}
#else
template <int64_t kRows>
inline void scaled_dots(const QuantizedMatrix& w, const QuantizedRows& x, int64_t row, int64_t n,
                        float (&dots)[kRows]) {
  int32_t values[kCodeBlock];
  for (int r = 0; r < kRows; ++r) dots[r] = 0.f;
  const uint8_t* codes = w.column_codes(n);
  const float* scales = w.scales + n * w.groups();
  const int64_t blocks_per_group = w.group_size / kCodeBlock;
  for (int64_t b = 0, g = 0, left = blocks_per_group; b < w.blocks(); ++b, --left) {
    if (left == 0) left = blocks_per_group, ++g;
    unpack_block(codes + b * w.block_bytes(), w.bits, values);
    const float scale = scales[g];
    for (int r = 0; r < kRows; ++r) {
      const int8_t* x_codes = x.codes + (row + r) * x.in_features + b * kCodeBlock;
      int32_t sum = 0;
      for (int64_t i = 0; i < kCodeBlock; ++i) sum += values[i] * x_codes[i];
      dots[r] += static_cast<float>(sum) * (scale * x.scales[(row + r) * x.blocks() + b]);
    }
  }
}
#endif

// y[row .. row + kRows][n] for columns [begin, end), plus the offsets' and bias's terms.
template <int64_t kRows>
void quantized_columns(const QuantizedMatrix& w, const QuantizedRows& x, const float* bias,
                       int64_t row, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    float dots[kRows];
    scaled_dots<kRows>(w, x, row, n, dots);
    for (int r = 0; r < kRows; ++r) {
      float value = dots[r] + (bias ? bias[n] : 0.f);
      if (w.offsets != nullptr) {
        value += dot(w.offsets + n * w.groups(), x.group_sums + (row + r) * x.groups, x.groups);
      }
      x.y[(row + r) * x.out_features + n] = value;
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
  const int64_t blocks = w.in_features / kCodeBlock;
  auto x_codes = at::empty({row_count, w.in_features}, rows.options().dtype(at::kChar));
  auto x_scales = at::empty({row_count, blocks}, rows.options());
  const float* x_data = rows.data_ptr<float>();
  int8_t* codes_data = x_codes.data_ptr<int8_t>();
  float* scales_data = x_scales.data_ptr<float>();
  at::parallel_for(0, row_count * blocks, grain_for(kCodeBlock), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      quantize_block(x_data + i * kCodeBlock, codes_data + i * kCodeBlock, scales_data + i);
    }
  });
  at::Tensor group_sums;
  if (w.offsets != nullptr) {
    group_sums = rows.view({row_count, w.groups(), group_size}).sum(-1).contiguous();
  }
  auto y = at::empty({row_count, out_features}, rows.options());
  const QuantizedRows quantized{codes_data,
                                scales_data,
                                w.offsets != nullptr ? group_sums.data_ptr<float>() : nullptr,
                                y.data_ptr<float>(),
                                w.in_features,
                                w.groups(),
                                out_features};
  at::parallel_for(0, out_features, kColumnGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < row_count; row += kRowsPerPass) {
      with_count<kRowsPerPass>(std::min(kRowsPerPass, row_count - row), [&](auto count) {
        quantized_columns<decltype(count)::value>(w, quantized, bias_data, row, begin, end);
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
    int32_t values[kCodeBlock];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < w.blocks(); ++b) {
        unpack_block(w.column_codes(n) + b * w.block_bytes(), w.bits, values);
        const int64_t g = n * w.groups() + b * kCodeBlock / w.group_size;
        const float scale = w.scales[g];
        const float offset = w.offsets != nullptr ? w.offsets[g] : 0.f;
        float* out = data + n * w.in_features + b * kCodeBlock;
        for (int64_t i = 0; i < kCodeBlock; ++i) out[i] = scale * values[i] + offset;
      }
    }
  });
  return weight;
}

}  // namespace sluice
