// Python bindings of v2l_fast._C. Each kernel family registers its functions here.
#include <torch/extension.h>

#include <string>

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
}
