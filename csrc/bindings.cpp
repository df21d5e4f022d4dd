// Python bindings of v2l_fast._C. Each kernel family registers its functions here.
#include <torch/extension.h>

#include <string>

#include "lora.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = V2L_VERSION;
  info["torch"] = V2L_TORCH_VERSION;
#ifdef V2L_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(V2L_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "v2l_fast compiled kernels (C++ always, CUDA when built with a CUDA toolchain)";
  m.def("build_info", &build_info,
        "What this extension was built with: version, torch, cuda (bool), cuda_archs, compiler.");
  m.def("lora_sgmv_cpu", &lora_sgmv_cpu, "SGMV LoRA forward on CPU (x, A, B, seg_indptr, seg_adapter, ranks, scaling, base)",
        pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("seg_indptr"),
        pybind11::arg("seg_adapter"), pybind11::arg("ranks"), pybind11::arg("scaling"), pybind11::arg("base"));
#ifdef V2L_WITH_CUDA
  m.def("lora_sgmv_cuda", &lora_sgmv_cuda, "SGMV LoRA decode forward on CUDA, shrink + expand in one launch",
        pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("ranks"), pybind11::arg("scaling"),
        pybind11::arg("base"), pybind11::arg("sorted_tokens"), pybind11::arg("work_group"),
        pybind11::arg("work_start"), pybind11::arg("work_end"));
#endif
}
