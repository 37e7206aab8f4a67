// The vlmkernels._C module: build facts plus every function registered with VLMK_BINDINGS.
#include "bindings.h"

#ifndef VLMK_CUDA_ARCHS
#define VLMK_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vlmkernels compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef VLMK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = VLMK_CUDA_ARCHS;
  m.attr("num_threads_default") = at::get_num_threads();
  for (auto fn : vlmk::binding_registry()) fn(m);
}
