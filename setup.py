"""Build fastgen and its one extension, fastgen._C.

C++ sources (csrc/*.cpp) are always compiled. CUDA sources (csrc/*.cu) are added when nvcc and a
CUDA build of torch are present; FASTGEN_CUDA=1 forces them in (and fails loudly if they cannot be
built), FASTGEN_CUDA=0 leaves them out. No GPU is needed to compile: TORCH_CUDA_ARCH_LIST picks the
targets (default below, Ampere and Hopper).
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda() -> bool:
    flag = os.environ.get("FASTGEN_CUDA", "").strip()
    if flag == "0":
        return False
    can = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1":
        if not can:
            sys.exit("FASTGEN_CUDA=1 but no CUDA build of torch or no nvcc (set CUDA_HOME)")
        return True
    return can


def _pip_cuda_includes() -> list[str]:
    # The system toolkit may be minimal (no cublas_v2.h, cusparse.h, which ATen's CUDA headers
    # include); torch's own pip packages nvidia/* carry them.
    roots = [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
    return sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "include"))})


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with object files named after the whole source name: an op's
    csrc/<op>.cpp and csrc/<op>.cu share a stem, and their objects would collide."""

    def build_extensions(self):
        name_objects = self.compiler.object_filenames

        def object_filenames(sources, *args, **kwargs):
            return name_objects([s[: -len(".cu")] + "_cu.cu" if s.endswith(".cu") else s for s in sources],
                                *args, **kwargs)

        self.compiler.object_filenames = object_filenames
        super().build_extensions()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3"]  # the C++ standard is torch's choice (C++20 from torch 2.13)
    if not _want_cuda():
        return cpp_extension.CppExtension("fastgen._C", sources, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return cpp_extension.CUDAExtension(
        "fastgen._C",
        sources + sorted(glob.glob("csrc/*.cu")),
        include_dirs=_pip_cuda_includes(),
        define_macros=[("FASTGEN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )


setup(
    name="fastgen",
    version="0.1.0",
    description="Fused PyTorch kernels for image generators",
    packages=["fastgen", "fastgen.ops", "fastgen.nn", "fastgen.kernels"],
    package_dir={"fastgen.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.9"],
)
