// A minimal CPython module init, so `import calm_fast._C` loads the shared library (which registers the
// ops with the dispatcher through static initialisers) without pulling pybind11 into every build.
#pragma once
#include <Python.h>

#define CALM_FAST_PY_MODULE(name)                                                       \
  extern "C" PyObject* PyInit_##name(void) {                                            \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, #name,                      \
                                     "calm_fast native ops (see torch.ops.calm_fast)",  \
                                     -1, nullptr, nullptr, nullptr, nullptr, nullptr};  \
    return PyModule_Create(&def);                                                       \
  }
