// A stack of pre-norm decoder layers run in one call from Python.
//
// Layer by layer in Python, a step pays for about a dozen module calls, views and kernel calls
// per layer around the kernels' arithmetic: at one sequence decoding, a fifth to a third of the
// step. This file makes the same kernel calls, in the same order and on the same tensors, from
// C++ (but for a long step's MLP, which it runs on chunks of rows that get the same bits), so
// its outputs are bitwise those of the Python layers
// (sluice_server.models.decoder.PreNormLayer with a SiLU-gated MLP; the stack is built where a
// model is all such layers, see sluice_server.models.compiled_stack).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>

#include "kernels.h"

namespace sluice {
namespace {

// oneDNN's matmul against its packed weight: the operator the Python ops call for it.
at::Tensor onednn_linear(const at::Tensor& x, const Projection& projection) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            c10::string_view, c10::List<c10::optional<at::Scalar>>,
                            c10::optional<c10::string_view>)>();
  return op.call(x, projection.weight, projection.bias, "none",
                 c10::List<c10::optional<at::Scalar>>(), c10::string_view(""));
}

at::Tensor project(const Projection& projection, const at::Tensor& x, const StepInputs& step) {
  switch (projection.matmul) {
    case Projection::Matmul::kSluiceBf16:
      return linear_bf16(x, projection.weight, projection.bias, projection.out_features);
    case Projection::Matmul::kSluiceF32:
      return linear_f32(x, projection.weight, projection.bias, projection.out_features);
    case Projection::Matmul::kOneDnn:
      return onednn_linear(x, projection);
    case Projection::Matmul::kQuantized: {
      const at::Tensor rows = projection.input_order.has_value()
                                  ? x.index_select(-1, *projection.input_order)
                                  : x;
      return linear_quantized(rows, projection.weight, projection.scales, projection.offsets,
                              projection.bias, projection.code_format, projection.group_size,
                              projection.levels, step.prompt_rows, projection.tile_order);
    }
  }
  TORCH_CHECK(false, "unknown matmul");
}

// [T, num_heads + num_kv_heads, head_dim]: the projection's queries and keys as heads, each
// RMS-normalised where the layer has head norms.
at::Tensor query_key_heads(const DecoderLayerWeights& layer, const at::Tensor& query_key) {
  const int64_t tokens = query_key.size(0);
  const int64_t heads = layer.num_heads + layer.num_kv_heads;
  if (!layer.query_norm.defined()) return query_key.view({tokens, heads, layer.head_dim});
  const auto parts = query_key.split(
      {layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim}, -1);
  const at::Tensor query = rms_norm(parts[0].reshape({-1, layer.head_dim}), layer.query_norm,
                                    layer.head_norm_eps);
  const at::Tensor key =
      rms_norm(parts[1].reshape({-1, layer.head_dim}), layer.key_norm, layer.head_norm_eps);
  return at::cat({query.view({tokens, layer.num_heads, -1}),
                  key.view({tokens, layer.num_kv_heads, -1})},
                 1);
}

// The attention block on the normalised stream: its output, [T, hidden].
at::Tensor attend(const DecoderLayerWeights& layer, const at::Tensor& normed,
                  const StepInputs& step, at::Tensor& key_cache, at::Tensor& value_cache,
                  double key_scale, double value_scale) {
  const int64_t tokens = normed.size(0);
  const int64_t query_size = layer.num_heads * layer.head_dim;
  const int64_t kv_size = layer.num_kv_heads * layer.head_dim;
  const auto query_key_value =
      project(layer.qkv, normed, step).split({query_size + kv_size, kv_size}, -1);
  at::Tensor heads = query_key_heads(layer, query_key_value[0]);
  // Queries and keys rotate by the same angles: one rotation over both, in place.
  rotary_(heads, step.cos, step.sin);
  const auto query_key = heads.split({layer.num_heads, layer.num_kv_heads}, 1);
  const at::Tensor value = query_key_value[1].view({tokens, layer.num_kv_heads, layer.head_dim});
  write_kv(key_cache, value_cache, query_key[1], value, step.slot_mapping, key_scale,
           value_scale);
  const at::Tensor attended = paged_attention(
      query_key[0], key_cache, value_cache, step.block_tables, step.cache_lens,
      step.query_starts, layer.scale, layer.sliding_window, layer.logit_softcap, key_scale,
      value_scale);
  return project(layer.output, attended.view({tokens, query_size}), step);
}

// The most rows of a step that go through the MLP together where both its projections are
// Sluice's own matmuls (bfloat16 or float32). gate_up's bfloat16 output is 6 KiB a row on a
// 576-wide model: a 4,096-row step's, 25 MiB, left the caches before the activation read it back,
// and the matmul wrote it at two thirds of its speed on 1,024 rows. A row's sums do not depend
// on the rows beside it (linear.cpp), so the output has the same bits either way. oneDNN's matmul promises no such
// thing, and the quantized one takes the step's prompt rows by index: their MLPs stay whole.
constexpr int64_t kMlpRowChunk = 1024;

// The SiLU-gated MLP on the normalised stream: its output, [T, hidden].
at::Tensor mlp(const DecoderLayerWeights& layer, const at::Tensor& normed,
               const StepInputs& step) {
  const auto apply = [&](const at::Tensor& rows) {
    return project(layer.down, silu_and_mul(project(layer.gate_up, rows, step)), step);
  };
  const int64_t rows = normed.size(0);
  const auto compiled = [](const Projection& projection) {
    return projection.matmul == Projection::Matmul::kSluiceBf16 ||
           projection.matmul == Projection::Matmul::kSluiceF32;
  };
  const bool compiled_matmuls = compiled(layer.gate_up) && compiled(layer.down);
  if (rows <= kMlpRowChunk || !compiled_matmuls) return apply(normed);
  // Chunks of equal size, so that none is a few rows (which AVX2's matmul sums differently).
  const int64_t chunks = (rows + kMlpRowChunk - 1) / kMlpRowChunk;
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  at::Tensor output = at::empty({rows, layer.down.out_features}, normed.options());
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t count = std::min(chunk_rows, rows - first);
    output.narrow(0, first, count).copy_(apply(normed.narrow(0, first, count)));
  }
  return output;
}

void check_projection(const Projection& projection, int64_t out_features, const char* name) {
  TORCH_CHECK(projection.weight.defined(), name, ": no weight");
  TORCH_CHECK(projection.out_features == out_features, name, " has ", projection.out_features,
              " output features, the layer expects ", out_features);
}

}  // namespace

DecoderStack::DecoderStack(std::vector<DecoderLayerWeights> layers) : layers_(std::move(layers)) {
  TORCH_CHECK(!layers_.empty(), "a stack has at least one layer");
  for (const auto& layer : layers_) {
    TORCH_CHECK(layer.num_heads > 0 && layer.num_kv_heads > 0 && layer.head_dim > 0,
                "heads and head_dim must be positive");
    TORCH_CHECK(layer.query_norm.defined() == layer.key_norm.defined(),
                "head norms come for both queries and keys or neither");
    const int64_t hidden = layer.input_norm.size(0);
    const int64_t kv_size = layer.num_kv_heads * layer.head_dim;
    check_projection(layer.qkv, layer.num_heads * layer.head_dim + 2 * kv_size, "qkv");
    check_projection(layer.output, hidden, "output");
    check_projection(layer.down, hidden, "down");
    TORCH_CHECK(layer.gate_up.out_features % 2 == 0, "gate_up must have an even width");
  }
}

std::tuple<at::Tensor, at::Tensor> DecoderStack::forward(
    at::Tensor hidden, const StepInputs& step, std::vector<at::Tensor> key_caches,
    std::vector<at::Tensor> value_caches, std::vector<double> key_scales,
    std::vector<double> value_scales) const {
  const size_t layers = layers_.size();
  TORCH_CHECK(key_caches.size() == layers && value_caches.size() == layers &&
                  key_scales.size() == layers && value_scales.size() == layers,
              "one key and one value cache, and their scales, per layer");
  // The residual add is deferred into the next norm, which fuses the two; the first layer starts
  // the stream from the embeddings.
  at::Tensor residual;
  for (size_t index = 0; index < layers_.size(); ++index) {
    const DecoderLayerWeights& layer = layers_[index];
    at::Tensor normed;
    if (residual.defined()) {
      normed = add_rms_norm(hidden, residual, layer.input_norm, layer.norm_eps);
    } else {
      residual = hidden;
      normed = rms_norm(hidden, layer.input_norm, layer.norm_eps);
    }
    hidden = attend(layer, normed, step, key_caches[index], value_caches[index],
                    key_scales[index], value_scales[index]);
    normed = add_rms_norm(hidden, residual, layer.post_attention_norm, layer.norm_eps);
    hidden = mlp(layer, normed, step);
  }
  return {hidden, residual};
}

}  // namespace sluice
