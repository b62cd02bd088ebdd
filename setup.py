"""Builds the optional extension ``dpar_kernels._C``.

C++ CPU ops (C++17, OpenMP) are always built; the CUDA ops are added when torch has CUDA and nvcc is found.
A failed build never fails the install: the package then falls back to the torch reference with one warning.
Set DPAR_NO_EXTENSION=1 to skip the build, DPAR_FORCE_CUDA=1 to build CUDA ops without a visible GPU.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("DPAR_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("dpar_kernels: torch not importable at build time; skipping the extension", file=sys.stderr)
        return [], {}

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.14 headers need C++20
    extra = {"cxx": cxx_flags}
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda_bindings/*.cpp")
        extra["cxx"] = cxx_flags + ["-DDPAR_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "--use_fast_math", "-DDPAR_WITH_CUDA"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="dpar_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension but turns a compile failure into a warning."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: fall back
                print(f"WARNING: dpar_kernels._C failed to build ({exc}); "
                      "the package will use its torch reference implementations.", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
