// The kernels the Python side calls, by family (bound in bindings.cpp). Shapes and layouts are
// described where each is defined.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <tuple>
#include <vector>

namespace sluice {

// attention.cpp: the paged KV cache.
// Whether paged_attention's bfloat16 fast path runs on AVX512-BF16 dot products.
bool attention_has_dot_products();
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& cache_lens, const at::Tensor& query_starts,
                           double scale, int64_t sliding_window, double logit_softcap,
                           double key_scale, double value_scale);
void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& slot_mapping, double key_scale,
              double value_scale);

// linear.cpp: the bfloat16 matmul of CPUs with AVX512-BF16 or AVX2.
bool has_linear_bf16();
at::Tensor pack_linear_bf16(const at::Tensor& weight);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, int64_t out_features);
// Output columns per tile of pack_linear_bf16's layout, [tiles][K / 2][32][2].
constexpr int64_t kLinearColumns = 32;
// Writes tile t of a weight in pack_linear_bf16's layout (columns past out_features zero).
using FillTile = c10::function_ref<void(int64_t t, at::BFloat16* tile)>;
// linear_bf16 against a weight whose tiles `fill` writes as the matmul reaches them (each thread
// into a buffer of its own); bias null or float32 [out_features]. For linear_quantized's prompt
// rows.
at::Tensor linear_bf16_filled(const at::Tensor& x, int64_t out_features, const float* bias,
                              const FillTile& fill);
// The float32 matmul of AVX2 CPUs without AVX-512, the weight in tiles of 32 output
// columns as two [K][16] panels, [tiles][2][K][16].
bool has_linear_f32();
at::Tensor pack_linear_f32(const at::Tensor& weight);
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias, int64_t out_features);

// linear_quantized.cpp: the matmul against 4- and 8-bit group-quantized weights. The rows listed
// in prompt_rows (int64, each row once) are a prompt's tokens: they multiply the weight
// dequantized to bfloat16 where x is bfloat16 and the build has linear_bf16.
at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets,
                            const c10::optional<at::Tensor>& bias, int64_t code_format,
                            int64_t group_size, const c10::optional<at::Tensor>& levels,
                            const c10::optional<at::Tensor>& prompt_rows, bool tile_order);
// Integer codes ([out_features, in_features * bits / 8]) in the order linear_quantized reads with
// tile_order (the same bytes, the words of 16 columns side by side) where it takes that path for
// such a weight on this CPU: with AMX, 4-bit integers in groups of whole runs of 32 or 8-bit
// integers; with AVX512-BF16 and no AMX, such 4-bit integers multiplying bfloat16 rows
// (`bfloat16_rows`). out_features a multiple of 16; none otherwise.
c10::optional<at::Tensor> tile_order_codes(const at::Tensor& codes, int64_t code_format,
                                           int64_t group_size, bool bfloat16_rows);

// elementwise.cpp: the work between the matmuls, and the greedy pick.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
std::tuple<at::Tensor, at::Tensor> argmax_logprob(const at::Tensor& logits);

// sampling.cpp: the sampler's top-k/top-p, min-p and typical-p cuts and its draw.
void top_k_top_p_(at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p);
void min_p_(at::Tensor& logits, const at::Tensor& min_p);
void typical_p_(at::Tensor& logits, const at::Tensor& typical_p);
std::tuple<at::Tensor, at::Tensor> draw(const at::Tensor& logits, const at::Tensor& uniforms);

// decoder.cpp: a stack of pre-norm decoder layers run in one call.

// A projection's weight, as one of the matmuls above (or oneDNN's) takes it.
struct Projection {
  enum class Matmul { kSluiceBf16, kSluiceF32, kOneDnn, kQuantized };
  Matmul matmul = Matmul::kSluiceBf16;
  // The packed weight (kSluiceBf16, kSluiceF32, kOneDnn) or the codes (kQuantized).
  at::Tensor weight;
  // In the form the matmul takes it: float32 padded to the tiles for kSluiceBf16 and kSluiceF32.
  c10::optional<at::Tensor> bias;
  int64_t out_features = 0;
  // kQuantized only, as linear_quantized takes them; input_order permutes x's features first
  // (GPTQ's act-order).
  at::Tensor scales;
  c10::optional<at::Tensor> offsets;
  c10::optional<at::Tensor> levels;
  c10::optional<at::Tensor> input_order;
  int64_t code_format = 0;
  int64_t group_size = 0;
  bool tile_order = false;
};

// One layer: x + attn(norm(x)), then x + mlp(norm(x)), the MLP SiLU-gated.
struct DecoderLayerWeights {
  at::Tensor input_norm;
  at::Tensor post_attention_norm;
  double norm_eps = 0.0;
  // Each query and key head's RMSNorm before the rotation (Qwen3); undefined where none.
  at::Tensor query_norm;
  at::Tensor key_norm;
  double head_norm_eps = 0.0;
  Projection qkv;
  Projection output;
  Projection gate_up;
  Projection down;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  double scale = 1.0;
  int64_t sliding_window = 0;  // 0: none
  double logit_softcap = 0.0;  // 0: none
};

// What every layer of one step reads besides its own weights and cache.
struct StepInputs {
  at::Tensor cos;
  at::Tensor sin;
  at::Tensor slot_mapping;
  at::Tensor block_tables;
  at::Tensor cache_lens;
  at::Tensor query_starts;
  // The rows that are a prompt's tokens, for the quantized projections; none if absent.
  c10::optional<at::Tensor> prompt_rows;
};

class DecoderStack {
 public:
  explicit DecoderStack(std::vector<DecoderLayerWeights> layers);
  // (the last layer's block output, the residual stream before it), as the Python layers return.
  // Per layer: its key and value caches, and the scales an 8-bit cache stores them divided by.
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor hidden, const StepInputs& step,
                                             std::vector<at::Tensor> key_caches,
                                             std::vector<at::Tensor> value_caches,
                                             std::vector<double> key_scales,
                                             std::vector<double> value_scales) const;

 private:
  std::vector<DecoderLayerWeights> layers_;
};

}  // namespace sluice
