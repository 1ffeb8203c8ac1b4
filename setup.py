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

# A100 and H100/H200 always; Blackwell (B200: 10.0, RTX 50xx / RTX PRO: 12.0) where this nvcc knows
# them: "no kernel image is available for this device" is what users of JIT-built GAN ops hit first
# on a new card.
BASE_CUDA_ARCHS = ("8.0", "9.0")
NEWER_CUDA_ARCHS = ("10.0", "12.0")


def _default_cuda_archs() -> str:
    import subprocess

    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    newer = [a for a in NEWER_CUDA_ARCHS if f"compute_{a.replace('.', '')}" in listed]
    return ";".join(BASE_CUDA_ARCHS + tuple(newer))


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


def _cpu_vector_flags() -> list[str]:
    # ATen's Vectorized<float> is header code: without these flags it compiles to scalar loops.
    # fastgen is built from source where it runs, so it uses the widest of AVX512 and AVX2 that
    # this machine has, as torch's own kernels do. FASTGEN_CPU_VEC=avx2 / avx512 / none overrides
    # (e.g. none to build for other CPUs).
    isa = os.environ.get("FASTGEN_CPU_VEC", "").strip().lower()
    if isa == "":
        try:
            with open("/proc/cpuinfo") as f:
                words = set(f.read().split())
        except OSError:
            words = set()
        avx2 = {"avx2", "fma", "f16c"} <= words
        isa = "avx512" if avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= words else "avx2" if avx2 else "none"
    avx2_flags = ["-mavx2", "-mfma", "-mf16c"]
    if isa == "avx512":
        return avx2_flags + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                             "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if isa == "avx2":
        return avx2_flags + ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _pip_cuda_includes() -> list[str]:
    # The system toolkit may be minimal (no cublas_v2.h, cusparse.h, which ATen's CUDA headers
    # include); torch's own pip packages nvidia/* carry them.
    roots = [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
    return sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "include"))})


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with object files named after the whole source name (an op's
    csrc/<op>.cpp and csrc/<op>.cu share a stem, and their objects would collide), kept in a
    persistent build directory: pip builds an editable install in a fresh temporary directory each
    time, which would recompile every source (minutes of nvcc); here ninja recompiles only the
    sources that changed (and those whose headers did). FASTGEN_BUILD_DIR moves it."""

    def finalize_options(self):
        super().finalize_options()
        flavour = f"{sys.implementation.cache_tag}-torch{torch.__version__}-cuda{int(_want_cuda())}"
        root = os.environ.get("FASTGEN_BUILD_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "build")
        self.build_temp = os.path.join(root, f"temp-{flavour}")

    def build_extensions(self):
        name_objects = self.compiler.object_filenames

        def object_filenames(sources, *args, **kwargs):
            return name_objects([s[: -len(".cu")] + "_cu.cu" if s.endswith(".cu") else s for s in sources],
                                *args, **kwargs)

        self.compiler.object_filenames = object_filenames
        super().build_extensions()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    # setuptools skips the build when the library is newer than these; ninja then decides per object
    headers = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.cuh"))
    # -fopenmp: at::parallel_for is header code over OpenMP, serial without it. The C++ standard
    # is torch's choice (C++20 from torch 2.13). -g0: Python's build flags ask for debug information,
    # which took 40% of each C++ unit's compile time and made the library 60 MB (batch_norm_act.cpp:
    # 90 s and 33 MB with it, 53 s and 2.3 MB without)
    cxx = ["-O3", "-g0", "-fopenmp", *_cpu_vector_flags()]
    if not _want_cuda():
        return cpp_extension.CppExtension("fastgen._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"], depends=headers)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_archs())
    # the pip headers are searched after the toolkit's own (nvcc's cuda_fp16.h / cuda_bf16.h must
    # not be shadowed by another CUDA version's): -idirafter for g++, trailing -I for nvcc (its
    # search follows the command line, and these come after torch's -I$CUDA_HOME/include)
    pip = _pip_cuda_includes()
    return cpp_extension.CUDAExtension(
        "fastgen._C",
        sources + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx + [f for d in pip for f in ("-idirafter", d)],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr"] + [f"-I{d}" for d in pip]},
        extra_link_args=["-fopenmp"],
        depends=headers,
    )


setup(
    name="fastgen",
    version="0.1.0",
    description="Fused PyTorch kernels for image generators",
    packages=["fastgen", "fastgen.ops", "fastgen.nn", "fastgen.models", "fastgen.bench", "fastgen.train",
              "fastgen.kernels"],
    package_dir={"fastgen.kernels": "kernels"},
    package_data={"fastgen": ["gpu_verified.json"]},  # the GPU record, once a GPU run commits one
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.9"],
    extras_require={"diffusers": ["diffusers>=0.30"]},  # fastgen.convert of diffusers models (never imported by it)
)
