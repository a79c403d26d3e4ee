// The Python module: every kernel of attention.cpp, linear.cpp, linear_quantized.cpp,
// elementwise.cpp and sampling.cpp, the decoder stack of decoder.cpp, and which instruction sets
// this build was compiled for (the build chooses them, see sluice_server.kernels.build).

#include <torch/extension.h>

#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace {

// The vector extensions the compiler was allowed to use, as the kernels' #if branches see them.
std::vector<std::string> compiled_isa() {
  std::vector<std::string> features;
#if defined(__AVX2__)
  features.emplace_back("avx2");
#endif
#if defined(__FMA__)
  features.emplace_back("fma");
#endif
#if defined(__AVX512F__)
  features.emplace_back("avx512f");
#endif
#if defined(__AVX512BF16__)
  features.emplace_back("avx512_bf16");
#endif
#if defined(SLUICE_AMX) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
  features.emplace_back("amx_int8");  // linear_quantized's integer tiles
#endif
  return features;
}

// Types are module-local: a process may import two builds of these kernels (each ISA build is its
// own module; the tests load the AVX2 build beside the AVX-512 one), and pybind11 otherwise
// registers a C++ type once per process.
void bind_decoder_stack(py::module& module) {
  using Matmul = sluice::Projection::Matmul;
  py::enum_<Matmul>(module, "Matmul", py::module_local())
      .value("SLUICE_BF16", Matmul::kSluiceBf16)
      .value("SLUICE_F32", Matmul::kSluiceF32)
      .value("ONEDNN", Matmul::kOneDnn)
      .value("QUANTIZED", Matmul::kQuantized);
  py::class_<sluice::Projection>(module, "Projection", py::module_local())
      .def(py::init<>())
      .def_readwrite("matmul", &sluice::Projection::matmul)
      .def_readwrite("weight", &sluice::Projection::weight)
      .def_readwrite("bias", &sluice::Projection::bias)
      .def_readwrite("out_features", &sluice::Projection::out_features)
      .def_readwrite("scales", &sluice::Projection::scales)
      .def_readwrite("offsets", &sluice::Projection::offsets)
      .def_readwrite("levels", &sluice::Projection::levels)
      .def_readwrite("input_order", &sluice::Projection::input_order)
      .def_readwrite("code_format", &sluice::Projection::code_format)
      .def_readwrite("group_size", &sluice::Projection::group_size)
      .def_readwrite("tile_order", &sluice::Projection::tile_order);
  using Layer = sluice::DecoderLayerWeights;
  py::class_<Layer>(module, "DecoderLayerWeights", py::module_local())
      .def(py::init<>())
      .def_readwrite("input_norm", &Layer::input_norm)
      .def_readwrite("post_attention_norm", &Layer::post_attention_norm)
      .def_readwrite("norm_eps", &Layer::norm_eps)
      .def_readwrite("query_norm", &Layer::query_norm)
      .def_readwrite("key_norm", &Layer::key_norm)
      .def_readwrite("head_norm_eps", &Layer::head_norm_eps)
      .def_readwrite("qkv", &Layer::qkv)
      .def_readwrite("output", &Layer::output)
      .def_readwrite("gate_up", &Layer::gate_up)
      .def_readwrite("down", &Layer::down)
      .def_readwrite("num_heads", &Layer::num_heads)
      .def_readwrite("num_kv_heads", &Layer::num_kv_heads)
      .def_readwrite("head_dim", &Layer::head_dim)
      .def_readwrite("scale", &Layer::scale)
      .def_readwrite("sliding_window", &Layer::sliding_window)
      .def_readwrite("logit_softcap", &Layer::logit_softcap);
  py::class_<sluice::StepInputs>(module, "StepInputs", py::module_local())
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    c10::optional<at::Tensor>>(),
           py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"), py::arg("block_tables"),
           py::arg("cache_lens"), py::arg("query_starts"), py::arg("prompt_rows") = py::none());
  py::class_<sluice::DecoderStack>(module, "DecoderStack", py::module_local())
      .def(py::init<std::vector<sluice::DecoderLayerWeights>>())
      // The layers' kernels need no Python: other threads (the gRPC server's) run meanwhile.
      .def("forward", &sluice::DecoderStack::forward, py::arg("hidden"), py::arg("step"),
           py::arg("key_caches"), py::arg("value_caches"), py::arg("key_scales"),
           py::arg("value_scales"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("paged_attention", &sluice::paged_attention, py::arg("query"), py::arg("key_cache"),
             py::arg("value_cache"), py::arg("block_tables"), py::arg("cache_lens"),
             py::arg("query_starts"), py::arg("scale"), py::arg("sliding_window") = 0,
             py::arg("logit_softcap") = 0.0, py::arg("key_scale") = 1.0,
             py::arg("value_scale") = 1.0);
  module.def("write_kv", &sluice::write_kv, py::arg("key_cache"), py::arg("value_cache"),
             py::arg("key"), py::arg("value"), py::arg("slot_mapping"), py::arg("key_scale") = 1.0,
             py::arg("value_scale") = 1.0);
  module.def("rms_norm", &sluice::rms_norm);
  module.def("add_rms_norm", &sluice::add_rms_norm);
  module.def("rotary_", &sluice::rotary_);
  module.def("silu_and_mul", &sluice::silu_and_mul);
  module.def("has_linear_bf16", &sluice::has_linear_bf16);
  module.def("attention_has_dot_products", &sluice::attention_has_dot_products);
  module.def("pack_linear_bf16", &sluice::pack_linear_bf16);
  module.def("linear_bf16", &sluice::linear_bf16);
  module.def("has_linear_f32", &sluice::has_linear_f32);
  module.def("pack_linear_f32", &sluice::pack_linear_f32);
  module.def("linear_f32", &sluice::linear_f32);
  module.def("linear_quantized", &sluice::linear_quantized, py::arg("x"), py::arg("codes"),
             py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("code_format"),
             py::arg("group_size"), py::arg("levels") = py::none(),
             py::arg("prompt_rows") = py::none(), py::arg("tile_order") = false);
  module.def("tile_order_codes", &sluice::tile_order_codes);
  module.def("argmax_logprob", &sluice::argmax_logprob);
  module.def("top_k_top_p_", &sluice::top_k_top_p_);
  module.def("min_p_", &sluice::min_p_);
  module.def("typical_p_", &sluice::typical_p_);
  module.def("draw", &sluice::draw);
  module.def("compiled_isa", &compiled_isa);
  bind_decoder_stack(module);
}
