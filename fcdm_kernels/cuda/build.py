"""How the CUDA extension (csrc/) is compiled: the source list and flags, a JIT build, and the CI compile check.

This file imports nothing from fcdm, so setup.py and the build test can load it by path (importing the
`fcdm_kernels.cuda` package itself tries to load the very extension being built), and torch only inside the
functions that need it, so that setup.py can load it where torch is not installed.

* `jit_load()`: `torch.utils.cpp_extension.load` with ninja, for a source checkout on a machine with a CUDA torch.
* `ci_build(build_dir)`: compiles and links the extension with nvcc for sm_90 against whatever torch is installed, even
  a CPU-only one (no GPU needed). A CPU-only torch lacks libc10_cuda / libtorch_cuda, so the module is linked without
  them; its only unresolved symbols are then c10::cuda functions, and it can be loaded with lazy binding to check the
  op registrations. It cannot run kernels there. Ninja makes the build incremental: an unchanged tree rebuilds nothing.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = REPO_ROOT / "csrc"
DEFAULT_ARCH = "9.0"  # H100: the target when no GPU is visible to ask

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def sources() -> list[Path]:
    """Every .cu and .cpp under csrc/ (setup.py, CMakeLists.txt and the JIT build all compile exactly these)."""
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


def default_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the local GPU's compute capability, else 9.0."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # no driver, or a torch without CUDA: fall back to the default target
        pass
    return DEFAULT_ARCH


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, /usr/local/cuda, or PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolkit_root(nvcc: str) -> Path:
    """The CUDA toolkit nvcc belongs to, as nvcc itself reports it: nvcc may be a link or a wrapper script outside
    the toolkit (/usr/local/bin/nvcc), whose parent directory then holds no CUDA headers or libraries."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return Path(line.split("=", 1)[1].strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(nvcc).resolve().parents[1]


def missing_toolkit_parts(root: Path) -> list[str]:
    """What the builds need from the toolkit at root and cannot find there: the runtime headers (cuda.h is what torch's
    CMake config checks the version with) and the CUDA runtime library, shared and static."""
    include_dirs = [root / "include", *root.glob("targets/*/include")]
    lib_dirs = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    wanted = [("include", name, include_dirs) for name in ("cuda.h", "cuda_runtime.h")]
    wanted += [("lib64", name, lib_dirs) for name in ("libcudart.so", "libcudart_static.a")]
    return [f"{where}/{name}" for where, name, dirs in wanted if not any((d / name).exists() for d in dirs)]


def jit_load(verbose: bool = False):
    """Compile (once, cached by torch under TORCH_EXTENSIONS_DIR) and import the extension; returns the module."""
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    return load(
        name="fcdm_kernels_cuda_jit",
        sources=[str(p) for p in sources()],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        with_cuda=True,
        verbose=verbose,
    )


def _torch_cxx_std() -> str:
    """The C++ standard torch's own extension builder uses (c++17 up to torch 2.12, c++20 after)."""
    import torch.utils.cpp_extension as cpp_extension
    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def _ninja_file(build_dir: Path, arch: str) -> str:
    import torch
    torch_dir = Path(torch.__file__).resolve().parent
    nvcc = find_nvcc()
    cuda_home = toolkit_root(nvcc)
    includes = [CSRC, torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                Path(sysconfig.get_paths()["include"]), cuda_home / "include"]
    inc = " ".join(f"-I{p}" for p in includes)
    # The generated c10/cuda/impl/cuda_cmake_macros.h ships only with CUDA builds of torch; on Linux it only matters
    # for Windows DLL exports, so skipping it changes nothing in the object code.
    defines = "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C"
    std = _torch_cxx_std()
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what CUDAExtension adds (no implicit half conversions)
    torch_nvcc = " ".join(COMMON_NVCC_FLAGS)
    cxx = os.environ.get("CXX", "c++")
    code = arch.replace(".", "")
    lines = [
        "ninja_required_version = 1.3",
        f"cxxflags = {' '.join(CXX_FLAGS)} -std={std} -fPIC {defines} {inc}",
        f"nvccflags = {' '.join(NVCC_FLAGS)} {torch_nvcc} -std={std} -gencode arch=compute_{code},code=sm_{code} "
        f"-Xcompiler -fPIC {defines} {inc}",
        f"ldflags = -shared -L{torch_dir / 'lib'} -lc10 -ltorch -ltorch_cpu -ltorch_python "
        f"-L{cuda_home / 'lib64'} -lcudart_static -lrt -ldl -lpthread",
        "rule cxx",
        f"  command = {cxx} -MMD -MF $out.d $cxxflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule nvcc",
        f"  command = {nvcc} -MD -MF $out.d $nvccflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        f"  command = {cxx} $in $ldflags -o $out",
    ]
    objects = []
    for src in sources():
        obj = f"{src.stem}{'.cuda' if src.suffix == '.cu' else ''}.o"
        objects.append(obj)
        lines.append(f"build {obj}: {'nvcc' if src.suffix == '.cu' else 'cxx'} {src}")
    lines.append(f"build _C.so: link {' '.join(objects)}")
    lines.append("default _C.so")
    return "\n".join(lines) + "\n"


def ci_build(build_dir: str | os.PathLike, arch: str = DEFAULT_ARCH, jobs: int = 2) -> Path:
    """Compile and link csrc/ for one architecture into build_dir/_C.so (incremental); returns its path."""
    if find_nvcc() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    ninja_path = build_dir / "build.ninja"
    text = _ninja_file(build_dir, arch)
    if not ninja_path.exists() or ninja_path.read_text() != text:
        ninja_path.write_text(text)
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    result = subprocess.run([ninja, "-C", str(build_dir), f"-j{jobs}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"CUDA extension build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return build_dir / "_C.so"
