// The fingerprint that ponder.fast.plan compares to decide whether a prepared plan (weights folded,
// blocked and bound once) is still valid: a hash over the slots of a module tree (each a dict of
// submodules, parameters or buffers and a name in it) of what each slot holds now: the object's
// identity and, for a tensor, its storage address (`.to()`, `.data =` give another) and version
// counter (in-place changes). The caller keeps the objects alive, so an address is never reused.
// ResNet-110's ~1,700 slots take ~40 us, against ~170 us for the same reads from Python.
#include <torch/extension.h>

#include <cstdint>

namespace {

inline uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h;
}

int64_t fingerprint(const py::list& dicts, const py::list& names) {
  TORCH_CHECK(dicts.size() == names.size(), "one name per dict");
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  uint64_t h = dicts.size();
  for (size_t i = 0; i < dicts.size(); ++i) {
    PyObject* v = PyDict_GetItem(PyList_GET_ITEM(dicts.ptr(), i), PyList_GET_ITEM(names.ptr(), i));  // borrowed; NULL when the name is gone
    h = mix(h, reinterpret_cast<uintptr_t>(v));
    if (v != nullptr && PyObject_TypeCheck(v, tensor_type)) {  // (THPVariable_Check runs Parameter's
      // Python __instancecheck__)
      const at::Tensor& t = THPVariable_Unpack(v);
      h = mix(h, reinterpret_cast<uintptr_t>(t.has_storage() ? t.const_data_ptr() : nullptr));
      h = mix(h, t.is_inference() ? 0 : static_cast<uint64_t>(t._version()));
    }
  }
  return static_cast<int64_t>(h);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fingerprint", &fingerprint, "hash of what each (dict, name) slot holds: identity, address, version");
}
