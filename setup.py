"""Build script: the pure-Python packages always; the CUDA extension fcdm_kernels._C (csrc/) when it can be built.

    pip install --no-deps --no-build-isolation -e .       # builds the extension against the torch you already have

The extension is built when nvcc, a CUDA build of torch and a GPU are present; FCDM_FORCE_CUDA=1 builds it without a
GPU (for TORCH_CUDA_ARCH_LIST, default 9.0), FCDM_SKIP_CUDA=1 never builds it. Otherwise one line says why it was
skipped and the pure-Python package (Triton and torch backends) is installed. See docs/building.md.
"""
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_build_config():
    # By path: importing the fcdm_kernels.cuda package would try to load the extension this script is about to build.
    path = os.path.join(ROOT, "fcdm_kernels", "cuda", "build.py")
    spec = importlib.util.spec_from_file_location("fcdm_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_modules():
    """Return (ext_modules, cmdclass); empty with a one-line explanation when the extension cannot be built."""
    def skip(reason):
        print(f"fcdm: skipping the CUDA extension ({reason}); the Triton and torch backends still work",
              file=sys.stderr)
        return [], {}

    if os.environ.get("FCDM_SKIP_CUDA") == "1":
        return skip("FCDM_SKIP_CUDA=1")
    build = load_build_config()
    sources = [os.path.relpath(p, ROOT) for p in build.sources()]
    if not sources:
        return skip("no CUDA sources in csrc/")
    nvcc = build.find_nvcc()
    if nvcc is None:
        return skip("nvcc not found; set CUDA_HOME to the CUDA toolkit")
    # torch.utils.cpp_extension takes the parent of the first nvcc on PATH for CUDA_HOME, which is wrong where that
    # nvcc is a link or wrapper outside the toolkit (/usr/local/bin/nvcc): name the toolkit nvcc itself reports.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        os.environ["CUDA_HOME"] = str(build.toolkit_root(nvcc))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable here; install with --no-build-isolation")
    force = os.environ.get("FCDM_FORCE_CUDA") == "1"
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"no nvcc in CUDA_HOME={CUDA_HOME}; set CUDA_HOME to the CUDA toolkit")
    if not force and not torch.cuda.is_available():
        return skip("no GPU visible; set FCDM_FORCE_CUDA=1 to build for TORCH_CUDA_ARCH_LIST (default 9.0) anyway")
    # torch.utils.cpp_extension reads the target architectures from this variable.
    os.environ["TORCH_CUDA_ARCH_LIST"] = build.default_arch_list()
    print(f"fcdm: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
          file=sys.stderr)
    ext = CUDAExtension(
        name="fcdm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
