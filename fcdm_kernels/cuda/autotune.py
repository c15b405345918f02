"""`auto` on CUDA: run whichever of the CUDA and Triton dwconv_ln_modulate is faster for this shape.

The first call per (GPU, dtype, B, H, W, C, torch version) times forward + backward of each available backend on scratch
tensors and stores the winner in a JSON file (FCDM_AUTOTUNE_CACHE, default ~/.cache/fcdm/autotune.json), so later
processes skip the measurement. FCDM_AUTOTUNE=0 turns measuring off (then Triton is tried first, as without this
module). While torch.compile traces, nothing is read, queried or measured (an order an eager call measured is reused);
while a CUDA graph is being captured nothing is measured. Measurements run on the activations' device, whichever is
current.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from fcdm_kernels import dispatch  # absolute, so tests can load this file by path
from fcdm_kernels.reference import LN_EPS

OP = "dwconv_ln_modulate"
CANDIDATES = ("cuda", "triton")
DEFAULT_ORDER = ("triton", "cuda")
_memory: dict[tuple, tuple[str, ...]] = {}  # (device index, dtype, shape) -> order, so a hit costs one lookup


def cache_path() -> Path:
    if os.environ.get("FCDM_AUTOTUNE_CACHE"):
        return Path(os.environ["FCDM_AUTOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fcdm" / "autotune.json"


def shape_key(device_name: str, dtype: torch.dtype, shape) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{OP}|{device_name}|{dtype_name}|{'x'.join(map(str, shape))}|torch {torch.__version__}"


def order_from_timings(timings: dict[str, float]) -> tuple[str, ...]:
    """Fastest measured backend first; backends that were not measured keep their default order after them."""
    measured = sorted(timings, key=timings.get)
    return tuple(measured) + tuple(b for b in DEFAULT_ORDER if b not in timings)


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, key: str, timings: dict[str, float]) -> None:
    """Merge one entry into the cache file atomically, so concurrent processes never leave it half-written."""
    data = read_cache(path)
    data[key] = {"timings_ms": timings, "order": list(order_from_timings(timings))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _time_backend(step, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of `step()` on `device`: run under that device, timed by events on its current stream
    (events on another device's stream would time nothing of this work)."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for _ in range(2):  # compile / warm up
            step()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            step()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(device: torch.device, dtype: torch.dtype, shape: tuple) -> dict[str, float]:
    """Time forward + backward of every available candidate on random (B, H, W, C) activations, on `device`."""
    B, _, _, C = shape
    with torch.inference_mode(False), torch.enable_grad(), torch.cuda.device(device):
        def rand(*size, s=1.0):
            return (torch.randn(*size, device=device, dtype=torch.float32) * s).to(dtype).requires_grad_()
        inputs = (rand(*shape), rand(C, 7, 7, s=0.1), rand(C, s=0.1), rand(B, C, s=0.5), rand(B, C, s=0.5))
        grad = torch.randn(shape, device=device, dtype=dtype)

        def step_of(backend):
            implementation = dispatch.implementation_on(OP, backend)  # the kernels alone: no validation or dispatch

            def step():
                for t in inputs:
                    t.grad = None
                implementation(*inputs, LN_EPS).backward(grad)
            return step
        return {b: _time_backend(step_of(b), device) for b in CANDIDATES
                if dispatch.unavailable_reason(OP, b, device) is None}


_DEVICE_NAMES: dict[int, str] = {}


def _device_name(device: torch.device) -> str:
    if device.index not in _DEVICE_NAMES:
        _DEVICE_NAMES[device.index] = torch.cuda.get_device_name(device)
    return _DEVICE_NAMES[device.index]


_capturing = dispatch.capturing  # a module attribute, so tests can stand in for a capture


def preference(x: torch.Tensor) -> tuple[str, ...]:
    """The chooser handed to dispatch.set_auto_preference: backend order for `auto` on activations x."""
    return order_for(x.device, x.dtype, tuple(x.shape))


def order_for(device: torch.device, dtype: torch.dtype, shape: tuple) -> tuple[str, ...]:
    """Backend order for activations of this shape on `device`: remembered, cached on disk, or measured there."""
    if device.type != "cuda":
        return DEFAULT_ORDER
    fast_key = (device.index, dtype, shape)
    if torch.compiler.is_compiling():
        # While torch.compile traces: no file, device query or timing (each a graph break or worse); an order that an
        # eager call measured is reused.
        return _memory.get(fast_key, DEFAULT_ORDER)
    if fast_key in _memory:
        return _memory[fast_key]
    key = shape_key(_device_name(device), dtype, shape)
    entry = read_cache(cache_path()).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("order"), list):
        _memory[fast_key] = tuple(b for b in entry["order"] if b in CANDIDATES)
        return _memory[fast_key]
    if os.environ.get("FCDM_AUTOTUNE") == "0" or _capturing(device):
        return DEFAULT_ORDER
    try:
        timings = measure(device, dtype, shape)
    except Exception as e:  # a failed measurement must never break the forward pass that triggered it
        warnings.warn(f"fcdm: timing dwconv_ln_modulate backends for {shape} failed ({e}); "
                      f"using {DEFAULT_ORDER}", RuntimeWarning, stacklevel=3)
        _memory[fast_key] = DEFAULT_ORDER
        return DEFAULT_ORDER
    _memory[fast_key] = order_from_timings(timings)
    if len(timings) > 1:  # a one-backend "measurement" says nothing worth keeping
        try:
            write_cache(cache_path(), key, timings)
        except OSError:
            pass
    return _memory[fast_key]


dispatch.set_auto_preference(OP, preference)
