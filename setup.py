"""Build script: the pure-Python packages always; the CUDA extension (csrc/) when it can be built.

The extension is built when nvcc and a CUDA build of torch are both present (or FCDM_FORCE_CUDA=1), and skipped with
one clear line otherwise (or with FCDM_SKIP_CUDA=1). Build with `pip install --no-build-isolation -e .` so the
extension compiles against the torch you already have.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_extension_modules():
    """Return (ext_modules, cmdclass); empty with a one-line explanation when the extension cannot be built."""
    def skip(reason):
        print(f"fcdm: skipping the CUDA extension ({reason}); the Triton and torch backends still work", file=sys.stderr)
        return [], {}

    if os.environ.get("FCDM_SKIP_CUDA") == "1":
        return skip("FCDM_SKIP_CUDA=1")
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return skip("no CUDA sources in csrc/ yet")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable here; install with --no-build-isolation")
    force = os.environ.get("FCDM_FORCE_CUDA") == "1"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return skip("nvcc not found")
    if torch.version.cuda is None and not force:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    ext = CUDAExtension(
        name="fcdm_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
