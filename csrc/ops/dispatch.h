// The host path of a C++-registered op (vlmkernels/schemas.py declares every schema; the files in
// csrc/ops/ register their C++ kernels at the CPU, CUDA and Autograd keys with TORCH_LIBRARY_IMPL).
//
// A call of torch.ops.vlmkernels.<op> on CPU or CUDA tensors reaches the C++ kernel without
// entering Python. It runs that kernel when `backend` is "auto" (and VLMKERNELS_BACKEND does not
// force another) or names the kernel's own backend ("cpu" at the CPU key, "cuda" at the CUDA key);
// any other backend is handed to the Python registry (vlmkernels/library.py), which runs the
// triton or reference implementation or raises BackendUnavailableError with the reason.
#pragma once
#include <torch/extension.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace vlmk {

// True when this call runs the C++ kernel of `native` ("cpu" or "cuda").
inline bool runs_native(c10::string_view backend, c10::string_view native) {
  if (backend == "auto") {
    const char* env = std::getenv("VLMKERNELS_BACKEND");  // read per call: tests and users set it late
    if (env == nullptr || env[0] == '\0') return true;
    backend = env;
  }
  return backend == "auto" || backend == native;
}

// The Python callable `(op_name, *args) -> result` that runs a non-native backend (set once at import).
pybind11::object& python_backend();

namespace detail {
template <typename T>
const T& to_py(const T& v) { return v; }
inline std::string to_py(c10::string_view s) { return std::string(s); }
inline std::vector<at::Tensor> to_py(at::TensorList l) { return l.vec(); }
inline std::vector<double> to_py(c10::ArrayRef<double> l) { return l.vec(); }
}  // namespace detail

// Runs `op` with the Python backend its `backend` argument (the last of args) selects.
// The call is below the op's autograd, so the backend's own torch ops must record no graph.
template <typename Ret, typename... Args>
Ret call_python_backend(const char* op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  pybind11::gil_scoped_acquire gil;
  pybind11::object& fn = python_backend();
  TORCH_CHECK(fn, "vlmkernels.", op, ": the Python backends are not registered (import vlmkernels)");
  return fn(op, detail::to_py(args)...).template cast<Ret>();
}

}  // namespace vlmk
