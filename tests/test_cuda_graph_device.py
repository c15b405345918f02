"""GraphedForward captures on a stream of the model's GPU, under that GPU, whichever GPU is current.

With the model on cuda:1 and cuda:0 current, a capture stream of cuda:0 records nothing the model launches on cuda:1:
those kernels run once, eagerly, and every replay returns the capture run's output. On CPU the CUDA runtime calls
that the capture makes are replaced by a stand-in that tracks the current device and each stream's device; on GPUs
replays with new inputs must match eager (and, with two GPUs, with the model on the second one).
"""
import contextlib

import pytest
import torch

import fcdm
import fcdm_kernels
from fcdm import cuda_graph
from fcdm.cuda_graph import GraphedForward


class StandInCuda:
    """The current device, streams that know their device, and a capture that records its stream."""

    def __init__(self, current: int):
        self.current = current
        self.calls = []       # (phase, current device) per call of the captured function
        self.capture = None   # (capture stream's device, current device inside the capture)
        self.replays = []     # current device at each replay
        self.phase = "outside"
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device("cuda", fake.current if device is None else torch.device(device).index)

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.replays.append(fake.current)
        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    @contextlib.contextmanager
    def _current(self, index):
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous

    def device(self, device):
        return self._current(torch.device(device).index)

    def current_stream(self, device=None):
        return self.Stream(device)

    def stream(self, stream):  # torch.cuda.stream makes the stream's device current while it is set
        return self._phase("warmup", stream)

    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        stream = stream if stream is not None else self.Stream()  # torch's default: the current device's
        self.capture = (stream.device.index, None)
        return self._phase("capture", stream)

    @contextlib.contextmanager
    def _phase(self, phase, stream):
        self.phase = phase
        with self._current(stream.device.index):
            if phase == "capture":
                self.capture = (self.capture[0], self.current)
            yield
        self.phase = "outside"


@pytest.fixture
def stand_in(monkeypatch):
    fake = StandInCuda(current=0)
    for name in ("device", "Stream", "current_stream", "stream", "graph", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_capture_runs_on_the_models_gpu_when_another_is_current(stand_in):
    def fn():
        stand_in.calls.append((stand_in.phase, stand_in.current))
        return torch.zeros(1)
    replay, _ = cuda_graph._capture_cuda_graph(fn, torch.device("cuda", 1), warmup=2)
    assert stand_in.calls == [("warmup", 1), ("warmup", 1), ("capture", 1)]
    assert stand_in.capture == (1, 1)  # a cuda:1 stream, with cuda:1 current
    assert stand_in.current == 0       # the caller's device is restored
    replay()
    assert stand_in.replays == [1]


def test_a_new_graph_when_the_reduction_mode_changes(monkeypatch):
    """A graph replays the kernels it recorded, so the deterministic/atomic choice is part of its signature."""
    captures = []

    def capture(fn, device, warmup):
        output = fn()
        captures.append(fcdm_kernels.deterministic())
        return (lambda: output.copy_(fn())), output
    monkeypatch.setattr(cuda_graph, "_require_cuda", lambda device: None)
    monkeypatch.setattr(cuda_graph, "_capture_cuda_graph", capture)
    torch.manual_seed(0)
    model = fcdm.FCDM_models["FCDM-T"](num_classes=5).eval()
    graphed = GraphedForward(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([0, 3])
    with torch.no_grad():
        graphed(x, t, y)
        with fcdm_kernels.use_deterministic(False):
            graphed(x, t, y)
        graphed(x, t, y)
    assert captures == [True, False] and graphed.num_graphs == 2


# ------------------------------------------------------------------------------------------------------ on a GPU
def replays_match_eager(device: torch.device):
    """FCDM-T at 16x16 under bf16 autocast, as tests/test_cuda_graph.py runs it (the same compiled kernels)."""
    torch.manual_seed(0)
    model = fcdm.FCDM_models["FCDM-T"](num_classes=5)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model = model.eval().to(device)
    graphed = GraphedForward(model)
    with torch.no_grad(), fcdm_kernels.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        for seed in range(3):  # the first call captures; the others replay with new inputs
            g = torch.Generator(device).manual_seed(seed)
            x = torch.randn(2, 4, 16, 16, device=device, generator=g)
            t = torch.rand(2, device=device, generator=g) * 999
            y = torch.randint(0, 5, (2,), device=device, generator=g)
            torch.testing.assert_close(graphed(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-4)
    assert graphed.num_graphs == 1


@pytest.mark.gpu
def test_replays_follow_new_inputs():
    replays_match_eager(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_on_the_second_gpu_while_the_first_is_current():
    with torch.cuda.device(0):
        replays_match_eager(torch.device("cuda", 1))
