"""Builds the extension ``dpar_kernels._C`` (metadata lives in pyproject.toml).

C++ CPU ops (C++20, OpenMP) are always built; the CUDA ops are added when torch has CUDA and nvcc is found.
A failed build fails the install with the compiler's error. Environment:
  DPAR_NO_EXTENSION=1  skip the extension: a pure-Python install (ops use Triton or the torch reference).
  DPAR_FORCE_CUDA=1    make a build without the CUDA kernels an error (CPU-only torch or no nvcc found).
Build against the torch you run with: `pip install --no-build-isolation .` (see README "Install").
"""
import glob
import json
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_C.build.json"  # the torch _C was built against; read by dpar_kernels/_extension.py
NO_EXTENSION_HINT = "set DPAR_NO_EXTENSION=1 to install without dpar_kernels._C (pure-Python ops)"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("DPAR_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(f"building dpar_kernels._C needs torch at build time ({exc}); install torch first and "
                           f"use `pip install --no-build-isolation`, or {NO_EXTENSION_HINT}") from exc

    # csrc/cpu/isa/: one file per (instruction-set path, op), each a small unit of its own (csrc/cpu/isa.h)
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/cpu/isa/*.cpp")
    if not sources:
        raise RuntimeError(f"no C++ sources under {ROOT}/csrc (an incomplete sdist?); {NO_EXTENSION_HINT}")
    # torch >= 2.14 headers need C++20. -g0 overrides the -g that Python's CFLAGS add: debug info of the torch
    # headers is most of what a unit writes, and no one debugs the released extension.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-g0"]
    extra = {"cxx": cxx_flags}
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("DPAR_FORCE_CUDA") == "1" and not with_cuda:
        raise RuntimeError(f"DPAR_FORCE_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
                           f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}")
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

    class BuildExtWithInfo(cpp_extension.BuildExtension):
        """Builds _C, names the way out of a failure, and records the torch it was built against."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                raise RuntimeError(f"dpar_kernels._C failed to build (the compiler's error is above); "
                                   f"{NO_EXTENSION_HINT}") from exc

        def build_extension(self, extension):
            super().build_extension(extension)
            info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None}
            self.build_info = os.path.join(os.path.dirname(self.get_ext_fullpath(extension.name)), BUILD_INFO)
            with open(self.build_info, "w") as f:
                json.dump(info, f)

        def run(self):
            super().run()  # --inplace and editable installs build in build/, then copy _C to the source tree
            if self.inplace and getattr(self, "build_info", None):
                self.copy_file(self.build_info, os.path.join(ROOT, "dpar_kernels", BUILD_INFO))

    return [ext], {"build_ext": BuildExtWithInfo.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
