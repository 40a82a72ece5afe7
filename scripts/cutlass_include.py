"""Prints the CUTLASS include directory shipped in the nvidia-cutlass wheel, or nothing.

Used by CMakeLists.txt and setup.py. The package is located without being imported (importing it
needs its Python dependencies, which building flce does not).
"""

import importlib.util
import os


def cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return path if os.path.exists(os.path.join(path, "cutlass", "cutlass.h")) else ""


if __name__ == "__main__":
    print(cutlass_include())
