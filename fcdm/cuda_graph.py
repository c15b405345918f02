"""`GraphedForward`: a model's inference forward replayed from CUDA graphs, so a sampling step costs one launch.

    fast = GraphedForward(model)          # model on CUDA, in eval mode, used under torch.no_grad()
    x = generate(fast, objective, y, shape, ...)

A sampling step of FCDM runs a few hundred kernels; at small batches the CPU cannot launch them as fast as the GPU
runs them. A CUDA graph records the whole forward once and replays it with one call. One graph is captured per input
signature (shapes, dtypes and the autocast state), on its first use, after warm-up calls that also let the Triton and
CUDA backends tune their configs outside the capture. Inputs are copied into the graph's static buffers and the output
is returned as a fresh tensor, so callers may keep it across steps. Beyond `max_graphs` signatures (each holds its own
memory pool) calls run eagerly, with one warning.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from fcdm_kernels import dispatch
from fcdm_kernels.determinism import deterministic


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")


def _current(device: torch.device):
    """Make `device` the current CUDA device (nothing to do for the CPU models of the tests' stand-in capture)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capture_cuda_graph(fn: Callable[[], torch.Tensor], device: torch.device,
                        warmup: int) -> tuple[Callable[[], None], torch.Tensor]:
    """(replay, output): `fn` captured into a CUDA graph after `warmup` calls on a side stream, as torch.cuda.graph
    requires; `replay()` recomputes `output` in place from the tensors `fn` reads.

    Everything runs under `device` and the capture stream is one of its streams: kernels launched on another device's
    stream (a launcher that switches to its tensors' device) would run outside the graph, and every replay would
    return the capture run's output."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            output = fn()

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()
    return replay, output


class GraphedForward:
    """Callable like `model(x, t, y)`; replays a CUDA graph per input signature. Inference only (no autograd)."""

    def __init__(self, model: torch.nn.Module, max_graphs: int = 8, warmup: int = 2):
        try:
            device = next(model.parameters()).device
        except StopIteration:
            raise ValueError("model has no parameters to place it on a device") from None
        _require_cuda(device)
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be positive, got {max_graphs} and {warmup}")
        self.model, self.device, self.max_graphs, self.warmup = model, device, max_graphs, warmup
        self._graphs: dict[tuple, tuple[list[torch.Tensor], Callable[[], None], torch.Tensor]] = {}
        self._warned = False

    def __getattr__(self, name):
        # Samplers read model attributes (e.g. `training`, `eval`, `parameters`); they are the wrapped model's.
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _signature(self, inputs) -> tuple:
        autocast = (torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(self.device.type))
        # The fused-op backend and the reduction mode too: a graph replays the kernels it recorded, whatever is
        # selected later.
        return tuple((tuple(a.shape), a.dtype, a.device) for a in inputs) + (
            autocast, self.model.training, dispatch.get_backend(), deterministic())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedForward is for inference: call it under torch.no_grad() "
                               "(a replayed graph records no autograd history)")
        inputs = (x, t, y)
        for name, a in zip(("x", "t", "y"), inputs):
            if a.device != self.device:
                raise ValueError(f"{name} is on {a.device} but the model is on {self.device}")
        key = self._signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"GraphedForward: more than {self.max_graphs} input signatures; new ones run "
                                  f"eagerly", RuntimeWarning, stacklevel=2)
                return self.model(x, t, y)
            static = [a.clone() for a in inputs]
            kind = self.device.type
            # Autocast's weight-cast cache must stay off: a graph that read cached casts would replay from memory
            # that is freed when the caller's autocast region ends.
            with torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind),
                                cache_enabled=False):
                replay, output = _capture_cuda_graph(lambda: self.model(*static), self.device, self.warmup)
            entry = self._graphs[key] = (static, replay, output)
        static, replay, output = entry
        with _current(self.device):  # the copies, the replay and the clone on one stream of the model's GPU
            for buffer, a in zip(static, inputs):
                buffer.copy_(a)
            replay()
            return output.clone()


__all__ = ["GraphedForward"]
