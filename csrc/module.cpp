// fastgen._C: importing it runs the TORCH_LIBRARY registrations of every csrc/ file.
// The module itself exports nothing; the ops live under torch.ops.fastgen.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
