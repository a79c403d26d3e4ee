// The kernels the Python side calls, by family (bound in bindings.cpp). Shapes and layouts are
// described where each is defined.

#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sluice {

// attention.cpp: the paged KV cache.
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& cache_lens, const at::Tensor& query_starts,
                           double scale, int64_t sliding_window, double logit_softcap);
void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& slot_mapping);

// linear.cpp: the bfloat16 matmul of CPUs with AVX512-BF16 or AVX2.
bool has_linear_bf16();
at::Tensor pack_linear_bf16(const at::Tensor& weight);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, int64_t out_features);

// linear_quantized.cpp: the matmul against 4- and 8-bit group-quantized weights.
at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets,
                            const c10::optional<at::Tensor>& bias, int64_t code_format,
                            int64_t group_size, const c10::optional<at::Tensor>& levels);

// elementwise.cpp: the work between the matmuls, and the greedy pick.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
std::tuple<at::Tensor, at::Tensor> argmax_logprob(const at::Tensor& logits);

// sampling.cpp: the sampler's top-k/top-p and typical-p cuts and its draw.
void top_k_top_p_(at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p);
void typical_p_(at::Tensor& logits, const at::Tensor& typical_p);
std::tuple<at::Tensor, at::Tensor> draw(const at::Tensor& logits, const at::Tensor& uniforms);

}  // namespace sluice
