"""Builds the flce Python package and its extension flce._C.

The extension holds the torch-free core (csrc/core, csrc/cpu and, when nvcc is found, csrc/cuda)
plus the PyTorch binding (binding/). Environment switches:
  FLCE_WITH_CUDA=0|1   build the CUDA backend (default: 1 when nvcc is found)
  FLCE_CUDA_ARCHS      nvcc -gencode targets, default "80;90a"
  FLCE_CUTLASS_DIR     CUTLASS include directory for the sm_90a fused logits GEMMs (default: the
                       headers of the nvidia-cutlass wheel, when installed; without them the CUDA
                       backend runs on cuBLASLt alone)
  FLCE_BLAS=0          build the CPU backend on its portable fallback GEMM instead of OpenBLAS
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda():
    if os.environ.get("FLCE_WITH_CUDA", "") == "0":
        return False
    if os.environ.get("FLCE_WITH_CUDA", "") == "1":
        return True
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def _find_openblas():
    """Header and library directories of a system OpenBLAS with its CBLAS interface, or None."""
    if os.environ.get("FLCE_BLAS", "") == "0":
        return None
    for inc in ("/usr/include/x86_64-linux-gnu/openblas-pthread", "/usr/include/openblas",
                "/usr/include/x86_64-linux-gnu", "/usr/include", "/usr/local/include"):
        if os.path.exists(os.path.join(inc, "cblas.h")):
            for lib in glob.glob("/usr/lib/x86_64-linux-gnu/libopenblas.so*") + glob.glob(
                    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so*") + glob.glob(
                    "/usr/local/lib/libopenblas.so*"):
                return inc, os.path.dirname(lib)
    return None


def _find_cutlass():
    """The CUTLASS include directory, or None."""
    path = os.environ.get("FLCE_CUTLASS_DIR", "")
    if not path:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "cutlass_include", os.path.join(ROOT, "scripts", "cutlass_include.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        path = module.cutlass_include()
    return path if path and os.path.exists(os.path.join(path, "cutlass", "cutlass.h")) else None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _find_cuda()
    blas = _find_openblas()
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc/core/*.cpp")) +
                   glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")) +
                   glob.glob(os.path.join(ROOT, "binding/*.cpp")))
    if with_cuda:
        sources = [s for s in sources if not s.endswith("cuda_disabled.cpp")]
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc/cuda/*.cpp")))
    define = [("FLCE_WITH_CUDA", "1" if with_cuda else "0")]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")]
    libraries, library_dirs = ["gomp"], []
    if blas:
        define.append(("FLCE_WITH_BLAS", "1"))
        include_dirs.append(blas[0])
        library_dirs.append(blas[1])
        libraries.append("openblas")
    if with_cuda:
        cutlass = _find_cutlass()
        define.append(("FLCE_WITH_CUTLASS", "1" if cutlass else "0"))
        if cutlass:
            include_dirs.append(cutlass)
        archs = os.environ.get("FLCE_CUDA_ARCHS", "80;90a").split(";")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        for a in archs:
            nvcc.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        libraries += ["cublasLt", "cublas"]
        return [CUDAExtension("flce._C", sources, include_dirs=include_dirs,
                              define_macros=define, libraries=libraries,
                              library_dirs=library_dirs,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc})]
    return [CppExtension("flce._C", sources, include_dirs=include_dirs, define_macros=define,
                         libraries=libraries, library_dirs=library_dirs,
                         extra_compile_args={"cxx": cxx})]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
