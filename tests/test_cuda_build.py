"""The CUDA extension without a GPU: it compiles and links for sm_90, and its Python glue behaves.

* `cuda_build` tests compile csrc/ with nvcc for sm_90 into build/cuda_ci/ (ninja: an unchanged tree rebuilds nothing)
  and check what a machine without a GPU can: the only unresolved symbols of the module are c10::cuda functions (which
  a CUDA build of torch provides), and the module, loaded with lazy binding, registers torch.ops.fcdm.* with working
  fake kernels, autograd and the dispatch entry. Kernels are not run here (tests/test_cuda_kernels.py does, on a GPU).
* The unmarked tests check that without the extension the backend reports itself unavailable and the dispatcher
  falls back with one warning, and the autotune cache logic.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from fcdm_kernels.reference import dwconv_ln_modulate_reference
from tests.numerics import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cuda_ci"


def load_by_path(name: str, relative: str):
    # fcdm_kernels.cuda raises ImportError without the extension, so its standalone helpers are loaded by path.
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_by_path("fcdm_cuda_build", "fcdm_kernels/cuda/build.py")


def complete_toolkit_nvcc() -> str:
    """nvcc, after skipping the test where there is none or its toolkit lacks what the builds need (saying what)."""
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot compile the CUDA extension")
    root = build.toolkit_root(nvcc)
    missing = build.missing_toolkit_parts(root)
    if missing:
        pytest.skip(f"the CUDA toolkit at {root} (of {nvcc}) is incomplete: it has no {', '.join(missing)}")
    return nvcc


@pytest.fixture(scope="module")
def ci_module() -> Path:
    complete_toolkit_nvcc()
    start = time.perf_counter()
    path = build.ci_build(BUILD_DIR, arch="9.0")
    print(f"CUDA extension built (or found up to date) in {time.perf_counter() - start:.1f} s: {path}")
    return path


@pytest.mark.cuda_build
def test_compiles_for_sm90(ci_module):
    assert ci_module.is_file() and ci_module.stat().st_size > 0
    ninja_file = (BUILD_DIR / "build.ninja").read_text()
    assert "-gencode arch=compute_90,code=sm_90" in ninja_file
    assert {f"{s.stem}" for s in build.sources()} >= {"bindings", "dwconv_ln_modulate"}
    # The object holds sm_90 machine code (a fatbin section); a compile without kernels would have none.
    sections = subprocess.run(["readelf", "-S", "-W", str(BUILD_DIR / "dwconv_ln_modulate.cuda.o")],
                              capture_output=True, text=True).stdout
    assert ".nv_fatbin" in sections


def _dynamic_symbols(path: Path, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.cuda_build
def test_only_cuda_torch_symbols_unresolved(ci_module):
    """All the module needs is in the installed torch, Python or the C/C++ runtimes, except c10::cuda functions."""
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    provided = set()
    for lib in ("libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_python.so"):
        provided |= _dynamic_symbols(torch_lib / lib, defined=True)
    missing = [s for s in _dynamic_symbols(ci_module, defined=False)
               if "@" not in s and s not in provided and not re.match(r"_?Py", s) and not s.startswith("_ITM_")
               and s not in ("__gmon_start__",)]
    demangled = subprocess.run(["c++filt"], input="\n".join(missing), capture_output=True, text=True).stdout.split("\n")
    foreign = [d for d in demangled if d.strip() and not d.startswith(("c10::cuda::", "at::cuda::"))]
    assert not foreign, f"symbols neither torch nor a CUDA torch provides: {foreign}"


REGISTRATION_CHECK = r"""
import os, sys, warnings
sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)  # c10::cuda functions stay unresolved: a CPU-only torch lacks them
import importlib.util
import torch
spec = importlib.util.spec_from_file_location("fcdm_kernels._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["fcdm_kernels._C"] = module
spec.loader.exec_module(module)

import fcdm_kernels
import fcdm_kernels.cuda as backend
from fcdm_kernels import dispatch

schema = str(torch.ops.fcdm.dwconv_ln_modulate_cuda.default._schema)
assert schema.startswith("fcdm::dwconv_ln_modulate_cuda(Tensor x, Tensor weight"), schema
backward_schema = str(torch.ops.fcdm.dwconv_ln_modulate_cuda_backward.default._schema)
assert backward_schema.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor)"), backward_schema
assert dispatch._IMPLS["dwconv_ln_modulate"]["cuda"] is backend.registration.dwconv_ln_modulate_cuda
assert dispatch.auto_preference("dwconv_ln_modulate") is backend.autotune.preference

# Fake kernels and autograd on meta tensors: shapes and dtypes flow through forward and backward.
B, H, W, C = 2, 7, 5, 40
def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
args = [meta(B, H, W, C), meta(C, 7, 7), meta(C), meta(B, C), meta(B, C)]
h = torch.ops.fcdm.dwconv_ln_modulate_cuda(*args, 1e-6)
assert h.shape == (B, H, W, C) and h.dtype == torch.bfloat16 and h.device.type == "meta"
h.sum().backward()
assert all(a.grad is not None and a.grad.shape == a.shape for a in args)

# Real CPU tensors: a clean error from the dispatcher, not a crash.
cpu = [torch.randn(B, H, W, C), torch.randn(C, 7, 7), torch.randn(C), torch.randn(B, C), torch.randn(B, C)]
try:
    torch.ops.fcdm.dwconv_ln_modulate_cuda(*cpu, 1e-6)
    raise AssertionError("a CPU call must fail")
except NotImplementedError as e:
    assert "CPU" in str(e)

# The C++ argument checks (reached directly through the CUDA kernel) raise ValueError naming the argument.
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
for bad, message in ((cpu, "x must be a CUDA tensor"), ([cpu[0][0]] + cpu[1:], "x must be a 4-D")):
    try:
        torch.ops.fcdm.dwconv_ln_modulate_cuda.default.redispatch(cuda_key, *bad, 1e-6)
        raise AssertionError("bad arguments must fail")
    except ValueError as e:
        assert message in str(e), str(e)

# backend="cuda" on CPU tensors falls back (one warning) and still computes the right thing.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fcdm_kernels.use_backend("cuda"):
        out = fcdm_kernels.dwconv_ln_modulate(*cpu)
        out = fcdm_kernels.dwconv_ln_modulate(*cpu)
# (Without TRITON_INTERPRET, as on a GPU machine, the triton step of the fallback warns too; count the cuda one.)
assert sum("the cuda backend needs CUDA tensors" in str(w.message) for w in caught) == 1, \
    [str(w.message) for w in caught]
ref = fcdm_kernels.dwconv_ln_modulate_reference(*cpu)
assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
print("REGISTRATION OK")
"""


@pytest.mark.cuda_build
def test_module_registers_ops(ci_module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", REGISTRATION_CHECK, str(ci_module)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0 and "REGISTRATION OK" in result.stdout, result.stdout + result.stderr


def cmake_configure(build_dir: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Configure CMakeLists.txt into build_dir (from scratch) for this Python's torch, sm_90, with Ninja."""
    import shutil
    complete_toolkit_nvcc()
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    shutil.rmtree(build_dir, ignore_errors=True)
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    command = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
               f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_CUDA_ARCHITECTURES=90", *options]
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.mark.cuda_build
def test_cmake_builds_the_same_module():
    """CMakeLists.txt compiles the same sources into a module that registers the same ops (build/cuda_cmake/)."""
    build_dir = ROOT / "build" / "cuda_cmake"
    module_dir = build_dir / "module"
    result = cmake_configure(build_dir, f"-DCMAKE_CUDA_COMPILER={build.find_nvcc()}", f"-DFCDM_MODULE_DIR={module_dir}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    result = subprocess.run(["cmake", "--build", str(build_dir), "-j", "2"], capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    commands = (build_dir / "compile_commands.json").read_text()
    assert all(str(src) in commands for src in build.sources())
    assert "sm_90" in commands or "arch=compute_90" in commands
    (module,) = module_dir.glob("_C*.so")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", REGISTRATION_CHECK, str(module)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0 and "REGISTRATION OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.cuda_build
@pytest.mark.parametrize("how", ["wrapper_on_path", "cuda_home"])
def test_cmake_finds_the_toolkit_behind_a_wrapper_or_cuda_home(how, tmp_path):
    """Without -DCMAKE_CUDA_COMPILER: nvcc is a wrapper script outside the toolkit, first on PATH (as
    /usr/local/bin/nvcc is on some machines), or only CUDA_HOME names the toolkit. The configure resolves the real
    toolkit root and hands it to torch's CMake config, whose legacy FindCUDA (in a CUDA build of torch) would otherwise
    guess a root without the headers and libraries."""
    root = build.toolkit_root(complete_toolkit_nvcc())
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDACXX")}
    if how == "wrapper_on_path":
        wrapper_dir = tmp_path / "bin"
        wrapper_dir.mkdir()
        (wrapper_dir / "nvcc").write_text(f'#!/bin/sh\nexec "{root / "bin" / "nvcc"}" "$@"\n')
        (wrapper_dir / "nvcc").chmod(0o755)
        env["PATH"] = os.pathsep.join([str(wrapper_dir), env.get("PATH", "")])
    else:
        env["CUDA_HOME"] = str(root)
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if p and not (Path(p) / "nvcc").exists())
    result = cmake_configure(tmp_path / "build", f"-DFCDM_MODULE_DIR={tmp_path / 'module'}", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"fcdm: CUDA toolkit root {root}" in output, output[-6000:]
    if torch.version.cuda is not None:  # only a CUDA build of torch looks for the toolkit itself
        assert f"PyTorch: CUDA toolkit directory: {root}" in output, output[-6000:]


# ----------------------------------------------------------------------------------------------------------------------
# Without the extension (this machine's normal state unless it has a CUDA torch and a build).

def _extension_importable() -> bool:
    try:
        import fcdm_kernels.cuda  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forget which backends were loaded and which warnings were given, so each test sees a first import."""
    if _extension_importable():
        pytest.skip("the CUDA extension is built and loads here")
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    return dispatch


def test_unavailable_backend_reports_why(fresh_dispatch):
    with pytest.raises(ImportError, match="CPU-only build|not built|JIT"):
        import fcdm_kernels.cuda  # noqa: F401
    reason = dispatch.unavailable_reason("dwconv_ln_modulate", "cuda", torch.device("cuda"))
    assert reason is not None and "cuda backend could not be loaded" in reason


def test_dispatch_falls_back_with_one_warning(fresh_dispatch):
    B, H, W, C = 2, 5, 6, 12
    args = (torch.randn(B, H, W, C), torch.randn(C, 7, 7) * 0.2, torch.randn(C), torch.randn(B, C), torch.randn(B, C))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fcdm_kernels.use_backend("cuda"):
            outs = [fcdm_kernels.dwconv_ln_modulate(*args) for _ in range(3)]
    about_cuda = [str(w.message) for w in caught if "cuda backend" in str(w.message)]
    assert len(about_cuda) == 1, about_cuda
    assert "falling back" in about_cuda[0]
    ref = dwconv_ln_modulate_reference(*(a.double() for a in args))
    for out in outs:
        assert_rel_close(out, ref, 1e-5, "fallback output")


def test_autotune_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "_auto_preference", {})  # loading autotune.py registers its chooser
    autotune = load_by_path("fcdm_autotune_under_test", "fcdm_kernels/cuda/autotune.py")
    assert dispatch.auto_preference("dwconv_ln_modulate") is autotune.preference
    assert autotune.order_from_timings({"cuda": 0.5, "triton": 0.7}) == ("cuda", "triton")
    assert autotune.order_from_timings({"cuda": 0.9, "triton": 0.7}) == ("triton", "cuda")
    assert autotune.order_from_timings({"cuda": 0.9}) == ("cuda", "triton")
    path = tmp_path / "sub" / "autotune.json"
    key = autotune.shape_key("NVIDIA H100", torch.bfloat16, (64, 32, 32, 512))
    autotune.write_cache(path, key, {"cuda": 0.2, "triton": 0.3})
    autotune.write_cache(path, key + "2", {"cuda": 0.4, "triton": 0.3})
    data = autotune.read_cache(path)
    assert data[key]["order"] == ["cuda", "triton"] and data[key + "2"]["order"] == ["triton", "cuda"]
    path.write_text("{not json")
    assert autotune.read_cache(path) == {}
    assert autotune.preference(torch.zeros(1, 1, 1, 1)) == autotune.DEFAULT_ORDER  # CPU: never measures


# ----------------------------------------------------------------------------------------------------------------------
# The kernels themselves, emulated on the CPU (csrc/testing/cpu_emulation.h): the .cu file compiled as C++ with every
# CUDA thread a std::thread, checked against the fp64 reference. This is what verifies the kernels' logic on a
# machine without a GPU; it does not model timing, memory coalescing or the hardware's warp scheduling.

EMULATION_WRAPPERS = r"""
extern "C" {
int emu_plan(int B, int H, int W, int C, int type, long long* out) {
  try {
    const fcdm::DwconvPlan p = fcdm::dwconv_plan(B, H, W, C, static_cast<fcdm::ElemType>(type), 0);
    const long long values[8] = {p.tile_rows, p.chunk_channels, p.tiles_w, p.tiles_per_image, p.padded_channels,
                                 p.weight_splits, (long long)p.fused_smem_forward, (long long)p.fused_smem_backward};
    for (int i = 0; i < 8; ++i) out[i] = values[i];
    return 0;
  } catch (const std::exception&) { return 1; }
}
int emu_forward(int type, const void* x, const void* w, const void* bias, const void* shift, const void* scale,
                void* h, float* weight_t, int B, int H, int W, int C, float eps, int vec) {
  try {
    const fcdm::DwconvPlan p = fcdm::dwconv_plan(B, H, W, C, static_cast<fcdm::ElemType>(type), 0);
    fcdm::dwconv_ln_modulate_forward(static_cast<fcdm::ElemType>(type), x, w, bias, shift, scale, h, weight_t, B, H,
                                     W, C, eps, vec != 0, p, nullptr);
    return 0;
  } catch (const std::exception&) { return 1; }
}
int emu_backward(int type, const void* grad_h, const void* x, const void* w, const void* bias, const void* scale,
                 void* dx, float* dh0, float* weight_t, float* weight_partial, float* modulation_partial, int B, int H,
                 int W, int C, float eps, int vec) {
  try {
    const fcdm::DwconvPlan p = fcdm::dwconv_plan(B, H, W, C, static_cast<fcdm::ElemType>(type), 0);
    fcdm::dwconv_ln_modulate_backward(static_cast<fcdm::ElemType>(type), grad_h, x, w, bias, scale, dx, dh0,
                                      weight_t, weight_partial, modulation_partial, B, H, W, C, eps, vec != 0, p,
                                      nullptr);
    return 0;
  } catch (const std::exception&) { return 1; }
}
}
"""
CUDA_ONLY_INCLUDES = ("#include <cuda_runtime_api.h>", "#include <cuda_bf16.h>", "#include <cuda_fp16.h>",
                      "#include <cuda_runtime.h>", "#include <c10/cuda/CUDAException.h>",
                      '#include "dwconv_ln_modulate.h"')
EMU_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def emulation_source() -> str:
    """The kernel sources rewritten into plain C++ for cpu_emulation.h."""
    text = (ROOT / "csrc" / "dwconv_ln_modulate.h").read_text() + (ROOT / "csrc" / "dwconv_ln_modulate.cu").read_text()
    for line in CUDA_ONLY_INCLUDES:
        text = text.replace(line, "")
    text = text.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                        "unsigned char* smem_raw = emu::dynamic_smem();")
    text, launches = re.subn(r"([\w:]+(?:<\w+>)?)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", text, flags=re.S)
    assert launches == 5, f"expected 5 kernel launches in the .cu, rewrote {launches}"
    assert "<<<" not in text and "__shared__ __align__(16) unsigned char" not in text
    return '#include "cpu_emulation.h"\n' + text + EMULATION_WRAPPERS


@pytest.fixture(scope="module")
def emulated():
    import ctypes
    import shutil as _shutil
    cxx = os.environ.get("CXX", "c++")
    if _shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the CPU emulation")
    out_dir = ROOT / "build" / "cuda_emulation"
    out_dir.mkdir(parents=True, exist_ok=True)
    src, lib = out_dir / "emulated.cpp", out_dir / "emulated.so"
    source = emulation_source()
    torch_dir = Path(torch.__file__).resolve().parent
    cmd = [cxx, "-O2", "-std=c++20", "-pthread", "-fPIC", "-shared", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'csrc' / 'testing'}", f"-I{torch_dir / 'include'}", str(src), f"-L{torch_dir / 'lib'}", "-lc10",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(lib)]
    stamp = out_dir / "stamp.txt"
    key = source + " ".join(cmd) + (ROOT / "csrc" / "testing" / "cpu_emulation.h").read_text()
    if not (lib.exists() and stamp.exists() and stamp.read_text() == key):
        src.write_text(source)
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-6000:]
        stamp.write_text(key)
    return ctypes.CDLL(str(lib))


def emulated_plan(lib, shape, dtype) -> list[int]:
    import ctypes
    out = (ctypes.c_longlong * 8)()
    assert lib.emu_plan(*shape, EMU_TYPES[dtype], out) == 0
    return list(out)


def emulated_forward_backward(lib, inputs, grad_h, vec: bool):
    """What bindings.cpp does around the kernels: allocate (NaN-poisoned), launch, reduce the partial sums."""
    import ctypes
    x, weight, bias, shift, scale = inputs
    B, H, W, C = x.shape
    _, _, _, tiles, cpad, splits, _, _ = emulated_plan(lib, (B, H, W, C), x.dtype)
    f32 = dict(dtype=torch.float32)
    nan = float("nan")
    h, dx = torch.full_like(x, nan), torch.full_like(x, nan)
    weight_t = torch.full((49 * cpad,), nan, **f32)
    dh0 = torch.full((B, H, W, C), nan, **f32)
    weight_partial = torch.full((splits, C, 50), nan, **f32)
    mod_partial = torch.full((2, B, tiles, C), nan, **f32)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    dims = (B, H, W, C, ctypes.c_float(1e-6), int(vec))
    t = EMU_TYPES[x.dtype]
    assert lib.emu_forward(t, p(x), p(weight), p(bias), p(shift), p(scale), p(h), p(weight_t), *dims) == 0
    weight_t.fill_(nan)
    assert lib.emu_backward(t, p(grad_h), p(x), p(weight), p(bias), p(scale), p(dx), p(dh0), p(weight_t),
                            p(weight_partial), p(mod_partial), *dims) == 0
    weight_sums, mod_sums = weight_partial.sum(0), mod_partial.sum(2)
    grads = (dx, weight_sums[:, :49].reshape(C, 7, 7).to(x.dtype), weight_sums[:, 49].to(x.dtype),
             mod_sums[0].to(x.dtype), mod_sums[1].to(x.dtype))
    return h, grads


def _reference_and_tolerances(inputs, grad_h):
    from tests.numerics import REL_TOL, rel_error

    def run(fn, args, g):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, g))
    oracle = run(dwconv_ln_modulate_reference, [a.double() for a in inputs], grad_h.double())
    same = run(lambda *a: dwconv_ln_modulate_reference(*a, upcast=True), inputs, grad_h)
    tols = [max(REL_TOL[inputs[0].dtype], 2 * rel_error(s, o)) for s, o in zip(same, oracle)]
    return oracle, tols


EMULATED_CASES = [
    ((2, 7, 7, 40), torch.float32, True),    # C=40: the second 32-channel chunk is mostly empty; image < one tile
    ((2, 7, 7, 40), torch.bfloat16, True),   # 16-byte vectors of 8 bf16
    ((2, 7, 7, 40), torch.bfloat16, False),  # same data through the scalar path (unaligned or odd-C tensors)
    ((1, 9, 13, 44), torch.float16, False),  # C % 8 != 0
    ((1, 5, 3, 3), torch.float32, False),    # odd C: a channel pair without partner; image narrower than the halo
    ((1, 18, 17, 24), torch.float32, True),  # several partial tiles in both directions
    ((1, 2, 9, 2056), torch.bfloat16, True),  # C > 2048: one-row tiles, several channel chunks
]


@pytest.mark.cuda_build
@pytest.mark.parametrize("shape,dtype,vec", EMULATED_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_emulated_kernels_match_fp64(emulated, shape, dtype, vec):
    B, H, W, C = shape
    inputs = (torch.randn(B, H, W, C).to(dtype), (torch.randn(C, 7, 7) / 7).to(dtype), (torch.randn(C) * 0.5).to(dtype),
              (torch.randn(B, C) * 0.5).to(dtype), (torch.randn(B, C) * 0.5).to(dtype))
    grad_h = torch.randn(B, H, W, C).to(dtype)
    h, grads = emulated_forward_backward(emulated, inputs, grad_h, vec)
    oracle, tols = _reference_and_tolerances(inputs, grad_h)
    for name, got, ref, tol in zip(("h", "dx", "dweight", "dbias", "dshift", "dscale"), (h,) + grads, oracle, tols):
        assert_rel_close(got, ref, tol, f"emulated {name}")


@pytest.mark.cuda_build
def test_emulated_plan_fits_an_h100(emulated):
    """Two fused blocks per SM (228 KB of shared memory, 1 KB reserved each) at every FCDM width, fp32 included."""
    for C in (32, 40, 512, 1024, 2048):
        for dtype in (torch.float32, torch.bfloat16):
            th, ck, _, _, cpad, splits, smem_fwd, smem_bwd = emulated_plan(emulated, (64, 32, 32, C), dtype)
            assert th * 8 * C <= 16384 or th == 1
            assert ck % 8 == 0 and cpad % 8 == 0 and cpad >= C and splits >= 1
            assert smem_fwd <= smem_bwd <= 113 * 1024, (C, dtype, smem_bwd)
