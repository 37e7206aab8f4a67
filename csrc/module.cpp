// The vlmkernels._C module: build facts plus every function registered with VLMK_BINDINGS.
#include "bindings.h"
#include "ops/dispatch.h"

#ifndef VLMK_CUDA_ARCHS
#define VLMK_CUDA_ARCHS ""
#endif

namespace vlmk {
pybind11::object& python_backend() {
  static auto* fn = new pybind11::object();  // leaked: must outlive interpreter shutdown
  return *fn;
}
}  // namespace vlmk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vlmkernels compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef VLMK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = VLMK_CUDA_ARCHS;
  m.attr("num_threads_default") = at::get_num_threads();
  m.def("set_python_backend", [](pybind11::object fn) { vlmk::python_backend() = std::move(fn); },
        "the callable (op_name, *args) -> result that runs an op's non-C++ backends (csrc/ops/dispatch.h)");
  for (auto fn : vlmk::binding_registry()) fn(m);
}
