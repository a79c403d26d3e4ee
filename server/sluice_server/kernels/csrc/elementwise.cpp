// The elementwise work between a decoder layer's matmuls, each one pass over memory where
// PyTorch runs several operators with temporaries in between, and the sampler's greedy pick:
//
//   rms_norm, add_rms_norm  RMSNorm, optionally fused with the residual add before it
//   rotary_                 rotary position embedding, in place, "rotate half" layout
//   silu_and_mul            SwiGLU's activation, silu(gate) * up
//   argmax_logprob          the greedy token of each row of logits and its log-probability

#include <type_traits>
#include <vector>

#include <ATen/ops/empty.h>

#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

// ---------------------------------------------------------------------------------------------
// RMSNorm. With a residual: residual += hidden (rounded to the storage type, as an unfused add
// would), then output = norm(residual) * weight.

// Rows of a norm: output = norm(input (+ residual)) * weight, [num_rows, width]; input rows may
// be strided, output and residual are contiguous.
template <typename T>
struct NormRows {
  T* output;
  T* residual;  // Null for a plain norm.
  const T* input;
  int64_t input_stride;
  const T* weight;
  int64_t num_rows;
  int64_t width;
};

// Whether the vector loops below take rows of T: bfloat16 and float32 (the compiler leaves the
// portable loops' bfloat16 conversions and exp scalar, and SiLU's float32 exp too).
template <typename T>
constexpr bool kVectorRows = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>;

#if defined(__AVX512F__)
// A row of rms_norm_impl 16 columns at a time, where the width is a whole number of them; false,
// having done nothing, elsewhere. (On AVX2 the portable loop measured as fast.)
template <typename T>
inline bool norm_row_in_vectors(const NormRows<T>& rows, int64_t r, float eps) {
  const int64_t width = rows.width;
  if (width % kLanes != 0) return false;
  const T* source = rows.input + r * rows.input_stride;
  if (rows.residual != nullptr) {
    T* sum = rows.residual + r * width;
    for (int64_t c = 0; c < width; c += kLanes) {
      const __m512 total = _mm512_add_ps(load_floats_x16(sum + c), load_floats_x16(source + c));
      store_floats_x16(sum + c, total);
    }
    source = sum;
  }
  __m512 squares = _mm512_setzero_ps();
  for (int64_t c = 0; c < width; c += kLanes) {
    const __m512 x = load_floats_x16(source + c);
    squares = _mm512_fmadd_ps(x, x, squares);
  }
  const float mean_square = _mm512_reduce_add_ps(squares) / static_cast<float>(width);
  const __m512 inverse_rms = _mm512_set1_ps(1.f / std::sqrt(mean_square + eps));
  T* destination = rows.output + r * width;
  for (int64_t c = 0; c < width; c += kLanes) {
    const __m512 normed = _mm512_mul_ps(load_floats_x16(source + c), inverse_rms);
    store_floats_x16(destination + c, _mm512_mul_ps(normed, load_floats_x16(rows.weight + c)));
  }
  return true;
}
#endif

template <typename T>
void rms_norm_impl(const NormRows<T>& rows, float eps) {
  const int64_t width = rows.width;
  at::parallel_for(0, rows.num_rows, grain_for(width), [&](int64_t begin, int64_t end) {
    std::vector<float> row(width);
    const T* weight = rows.weight;
    for (int64_t r = begin; r < end; ++r) {
#if defined(__AVX512F__)
      if constexpr (kVectorRows<T>) {
        if (norm_row_in_vectors(rows, r, eps)) continue;
      }
#endif
      const T* source = rows.input + r * rows.input_stride;
      if (rows.residual != nullptr) {
        T* sum = rows.residual + r * width;
        for (int64_t c = 0; c < width; ++c) {
          sum[c] = from_float<T>(to_float(sum[c]) + to_float(source[c]));
        }
        source = sum;
      }
      widen(source, row.data(), width);
      const float mean_square = dot(row.data(), row.data(), width) / static_cast<float>(width);
      const float inverse_rms = 1.f / std::sqrt(mean_square + eps);
      T* destination = rows.output + r * width;
      for (int64_t c = 0; c < width; ++c) {
        destination[c] = from_float<T>(row[c] * inverse_rms * to_float(weight[c]));
      }
    }
  });
}

template <typename T>
NormRows<T> norm_rows(at::Tensor& output, T* residual, const at::Tensor& input,
                      const at::Tensor& weight) {
  return {output.data_ptr<T>(), residual,       input.data_ptr<T>(), input.stride(0),
          weight.data_ptr<T>(), input.size(0), input.size(1)};
}

void check_norm_inputs(const at::Tensor& input, const at::Tensor& weight) {
  check_rows(input, "input");
  check_cpu(weight, "weight");
  TORCH_CHECK(input.dim() == 2, "input must be [rows, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == input.size(1),
              "weight must be contiguous [hidden]");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "input and weight dtypes differ");
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding in place on x [T, heads, D] (rows may be strided) with float32 cos and sin
// [T, D / 2]: pairs are (i, i + D / 2).

template <typename T>
void rotary_impl(at::Tensor& x, const float* cos, const float* sin) {
  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int64_t half = x.size(2) / 2;
  T* data = x.data_ptr<T>();
  const int64_t token_stride = x.stride(0);
  const int64_t head_stride = x.stride(1);
  const int64_t grain = grain_for(num_heads * half * 2);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* token_cos = cos + t * half;
      const float* token_sin = sin + t * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        T* first = data + t * token_stride + h * head_stride;
        T* second = first + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(first[i]);
          const float b = to_float(second[i]);
          first[i] = from_float<T>(a * token_cos[i] - b * token_sin[i]);
          second[i] = from_float<T>(b * token_cos[i] + a * token_sin[i]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU activation: gate_up [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I], computed
// in float32 and rounded once. PyTorch runs it as two operators with a bfloat16 temporary in
// between; for bfloat16 and float32 on AVX-512 and AVX2 this is one pass of intrinsics.

template <typename T>
inline void silu_and_mul_row(const T* __restrict gate, const T* __restrict up,
                             T* __restrict out, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (kVectorRows<T>) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + kLanes <= width; i += kLanes) {
      const __m512 g = load_floats_x16(gate + i);
      const __m512 exp_minus_g = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_minus_g));
      store_floats_x16(out + i, _mm512_mul_ps(silu, load_floats_x16(up + i)));
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (kVectorRows<T>) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= width; i += 8) {
      const __m256 g = load_floats_x8(gate + i);
      const __m256 exp_minus_g = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_minus_g));
      store_floats_x8(out + i, _mm256_mul_ps(silu, load_floats_x8(up + i)));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < width; ++j) {
    const float g = to_float(gate[j]);
    out[j] = from_float<T>(g / (1.f + vector_exp(-g)) * to_float(up[j]));
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy pick: per row of logits [S, V] (float32 or the model's dtype, read as float32), the
// first index of the maximum (as torch.argmax) and its log-probability,
// max - logsumexp(row) = -log(sum(exp(row - max))). Reading the model's bfloat16 logits directly
// saves converting the whole [S, V] block to float32 first, the largest copy of a decode step.

// The first index whose value equals `value`, or the last index if none does (a row of NaN).
// Spans of kSpan values are tested in vector lanes, a span holding it searched one by one.
template <typename T>
int64_t first_equal(const T* row, int64_t vocab, float value) {
  constexpr int64_t kSpan = 256;
  for (int64_t start = 0; start < vocab; start += kSpan) {
    const int64_t end = std::min(vocab, start + kSpan);
    int hits = 0;
#pragma omp simd reduction(+ : hits)
    for (int64_t v = start; v < end; ++v) hits += to_float(row[v]) == value ? 1 : 0;
    if (hits == 0) continue;
    for (int64_t v = start; v < end; ++v) {
      if (to_float(row[v]) == value) return v;
    }
  }
  return vocab - 1;
}

// The row's largest value (a NaN skipped, unless the first value is NaN: then NaN) and the sum of
// exp(value - largest).
template <typename T>
float row_maximum(const T* row, int64_t vocab) {
  float maximum = to_float(row[0]);
#pragma omp simd reduction(max : maximum)
  for (int64_t v = 0; v < vocab; ++v) {
    const float value = to_float(row[v]);
    maximum = value > maximum ? value : maximum;
  }
  return maximum;
}

template <typename T>
float sum_exp(const T* row, int64_t vocab, float maximum) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < vocab; ++v) sum += vector_exp(to_float(row[v]) - maximum);
  return sum;
}

#if defined(__AVX512F__)
// The same for bfloat16 rows, 16 lanes at a time: the compiler keeps the loops above at 8, and
// the exponentials were most of a greedy pick.
template <>
float row_maximum(const at::BFloat16* row, int64_t vocab) {
  // The value second: max_ps returns it where either is NaN, as the loop above keeps it.
  __m512 maxima = _mm512_set1_ps(to_float(row[0]));
  int64_t v = 0;
  for (; v + kLanes <= vocab; v += kLanes) maxima = _mm512_max_ps(load_bf16x16(row + v), maxima);
  float maximum = _mm512_reduce_max_ps(maxima);
  for (; v < vocab; ++v) {
    const float value = to_float(row[v]);
    maximum = value > maximum ? value : maximum;
  }
  return maximum;
}

template <>
float sum_exp(const at::BFloat16* row, int64_t vocab, float maximum) {
  const __m512 largest = _mm512_set1_ps(maximum);
  __m512 sums = _mm512_setzero_ps();
  int64_t v = 0;
  for (; v + kLanes <= vocab; v += kLanes) {
    sums = _mm512_add_ps(sums, exp_avx512(_mm512_sub_ps(load_bf16x16(row + v), largest)));
  }
  float sum = _mm512_reduce_add_ps(sums);
  for (; v < vocab; ++v) sum += vector_exp(to_float(row[v]) - maximum);
  return sum;
}
#endif

template <typename T>
void argmax_logprob_impl(const at::Tensor& logits, int64_t* ids, float* out) {
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const T* data = logits.data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * row_stride;
      const float maximum = row_maximum(row, vocab);
      ids[r] = first_equal(row, vocab, maximum);
      out[r] = -std::log(sum_exp(row, vocab, maximum));
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  auto output = at::empty({input.size(0), input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rms_norm", [&] {
    rms_norm_impl(norm_rows<scalar_t>(output, nullptr, input, weight), static_cast<float>(eps));
  });
  return output;
}

// Adds `input` into `residual` in place and returns the normalised sum.
at::Tensor add_rms_norm(const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_norm_inputs(input, weight);
  check_cpu(residual, "residual");
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == input.sizes() &&
                  residual.scalar_type() == input.scalar_type(),
              "residual must be contiguous and match input");
  auto output = at::empty({input.size(0), input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "add_rms_norm", [&] {
        rms_norm_impl(norm_rows<scalar_t>(output, residual.data_ptr<scalar_t>(), input, weight),
                      static_cast<float>(eps));
      });
  return output;
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be [tokens, heads, even head_dim]");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  TORCH_CHECK(cos.dim() == 2 && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous float32");
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == x.size(2) / 2 &&
                  sin.sizes() == cos.sizes(),
              "cos and sin must be [tokens, head_dim / 2]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotary_impl<scalar_t>(x, cos.data_ptr<float>(), sin.data_ptr<float>());
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [tokens, 2 * I]");
  const int64_t num_tokens = gate_up.size(0);
  const int64_t width = gate_up.size(1) / 2;
  auto output = at::empty({num_tokens, width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
        const scalar_t* source = gate_up.data_ptr<scalar_t>();
        scalar_t* destination = output.data_ptr<scalar_t>();
        const int64_t source_stride = gate_up.stride(0);
        at::parallel_for(0, num_tokens, grain_for(2 * width), [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const scalar_t* gate = source + t * source_stride;
            silu_and_mul_row(gate, gate + width, destination + t * width, width);
          }
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor> argmax_logprob(const at::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be [rows, vocab]");
  const int64_t num_rows = logits.size(0);
  auto token_ids = at::empty({num_rows}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({num_rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "argmax_logprob",
                                  [&] {
                                    argmax_logprob_impl<scalar_t>(logits,
                                                                  token_ids.data_ptr<int64_t>(),
                                                                  logprobs.data_ptr<float>());
                                  });
  return {token_ids, logprobs};
}

}  // namespace sluice
