// Self-registering pybind11 bindings: each kernel file adds its functions to vlmkernels._C with
// VLMK_BINDINGS(name) { m.def(...); } so that no central file lists every family.
#pragma once
#include <torch/extension.h>

#include <functional>
#include <vector>

namespace vlmk {

using BindFn = void (*)(pybind11::module_&);

inline std::vector<BindFn>& binding_registry() {
  static std::vector<BindFn> fns;  // function-local: safe against static init order
  return fns;
}

struct BindingRegistrar {
  explicit BindingRegistrar(BindFn fn) { binding_registry().push_back(fn); }
};

}  // namespace vlmk

#define VLMK_BINDINGS(name)                                                   \
  static void vlmk_bind_##name(pybind11::module_& m);                         \
  static ::vlmk::BindingRegistrar vlmk_registrar_##name(&vlmk_bind_##name);   \
  static void vlmk_bind_##name(pybind11::module_& m)
