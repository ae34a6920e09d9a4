// A minimal CPython module so that `import lct_kernels._C` (or `_C_cuda`) runs
// the static TORCH_LIBRARY registrations of this shared library.  No pybind11:
// keeping the heavy torch/extension.h header out cuts the build from ~75 s to
// ~15 s per file.  The module carries the build facts as string constants, which
// lct_kernels/_ext.py compares with the running torch.
#include <Python.h>

#ifndef LCT_MODULE_NAME
#error "LCT_MODULE_NAME must be defined (e.g. _C)"
#endif
#ifndef LCT_TORCH_VERSION
#define LCT_TORCH_VERSION "unknown"
#endif
#ifndef LCT_CUDA_ARCHS
#define LCT_CUDA_ARCHS ""
#endif

#define LCT_CAT_(a, b) a##b
#define LCT_CAT(a, b) LCT_CAT_(a, b)
#define LCT_STR_(a) #a
#define LCT_STR(a) LCT_STR_(a)

static struct PyModuleDef lct_module = {PyModuleDef_HEAD_INIT, LCT_STR(LCT_MODULE_NAME),
                                        "lct_kernels compiled operators", -1, nullptr};

PyMODINIT_FUNC LCT_CAT(PyInit_, LCT_MODULE_NAME)(void) {
  PyObject* module = PyModule_Create(&lct_module);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "torch_version", LCT_TORCH_VERSION);
  PyModule_AddStringConstant(module, "cuda_archs", LCT_CUDA_ARCHS);
#if defined(__clang__)
  PyModule_AddStringConstant(module, "compiler", "clang " __clang_version__);
#elif defined(__GNUC__)
  PyModule_AddStringConstant(module, "compiler", "gcc " __VERSION__);
#else
  PyModule_AddStringConstant(module, "compiler", "unknown");
#endif
#if defined(_OPENMP)
  PyModule_AddIntConstant(module, "openmp", _OPENMP);
#else
  PyModule_AddIntConstant(module, "openmp", 0);
#endif
  return module;
}
