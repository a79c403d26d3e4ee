// The Python module: every kernel of attention.cpp, linear.cpp, linear_quantized.cpp,
// elementwise.cpp and sampling.cpp, and which instruction sets this build was compiled for (the
// build chooses them, see sluice_server.kernels.build).

#include <torch/extension.h>

#include <string>
#include <vector>

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
  return features;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("paged_attention", &sluice::paged_attention, py::arg("query"), py::arg("key_cache"),
             py::arg("value_cache"), py::arg("block_tables"), py::arg("cache_lens"),
             py::arg("query_starts"), py::arg("scale"), py::arg("sliding_window") = 0,
             py::arg("logit_softcap") = 0.0);
  module.def("write_kv", &sluice::write_kv);
  module.def("rms_norm", &sluice::rms_norm);
  module.def("add_rms_norm", &sluice::add_rms_norm);
  module.def("rotary_", &sluice::rotary_);
  module.def("silu_and_mul", &sluice::silu_and_mul);
  module.def("has_linear_bf16", &sluice::has_linear_bf16);
  module.def("pack_linear_bf16", &sluice::pack_linear_bf16);
  module.def("linear_bf16", &sluice::linear_bf16);
  module.def("linear_quantized", &sluice::linear_quantized, py::arg("x"), py::arg("codes"),
             py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("code_format"),
             py::arg("group_size"), py::arg("levels") = py::none());
  module.def("argmax_logprob", &sluice::argmax_logprob);
  module.def("top_k_top_p_", &sluice::top_k_top_p_);
  module.def("typical_p_", &sluice::typical_p_);
  module.def("draw", &sluice::draw);
  module.def("compiled_isa", &compiled_isa);
}
