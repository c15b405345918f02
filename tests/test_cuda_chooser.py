"""The CUDA backend's `auto` chooser (fcdm_kernels/cuda/autotune.py): safe under torch.compile, and timing on the
activations' GPU whichever GPU is current.

autotune.py is loaded by path (the fcdm_kernels.cuda package needs the built extension). On CPU the GPU is a stand-in:
the current device, per-device streams and timing events are recorded; torch.compile traces the chooser on CPU with
everything that must not run while tracing made to raise. On a GPU with the extension built, the public op compiles
with fullgraph=True under `auto`.
"""
import contextlib
import sys
import warnings

import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from tests.test_cuda_build import load_by_path

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
SHAPE = (8, 16, 16, 64)


@pytest.fixture
def autotune(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "_auto_preference", {})  # loading autotune.py registers its chooser
    module = load_by_path("fcdm_autotune_chooser_test", "fcdm_kernels/cuda/autotune.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # torch.compile looks its globals up by module name
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.delenv("FCDM_AUTOTUNE", raising=False)
    return module


def forbid(monkeypatch, module, *names):
    def refuse(*args, **kwargs):
        raise AssertionError("called while torch.compile traces")
    for name in names:
        monkeypatch.setattr(module, name, refuse)


def test_tracing_reads_no_file_queries_no_device_and_times_nothing(autotune, monkeypatch):
    forbid(monkeypatch, autotune, "read_cache", "_device_name", "_capturing", "measure")

    def uses_the_order(x):
        order = autotune.order_for(CUDA0, x.dtype, tuple(x.shape))
        return x * (2.0 if order[0] == "cuda" else 3.0)
    x = torch.ones(SHAPE)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(uses_the_order, fullgraph=True, backend="eager")(x), x * 3)  # the default
    autotune._memory[(0, x.dtype, SHAPE)] = ("cuda", "triton")  # measured by an earlier eager call
    torch._dynamo.reset()
    assert torch.equal(torch.compile(uses_the_order, fullgraph=True, backend="eager")(x), x * 2)
    del autotune._memory[(0, x.dtype, SHAPE)]
    with pytest.raises(AssertionError, match="while torch.compile"):  # the control: eager does consult them
        uses_the_order(x)


class StandInCuda:
    """The current device, streams that know their device, and events that record the stream they were put on."""

    def __init__(self):
        self.current, self.steps, self.recorded = 0, [], []
        fake = self

        class Stream:
            def __init__(self, device):
                self.device = device

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self, stream=None):
                fake.recorded.append(stream.device if stream is not None else torch.device("cuda", fake.current))

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 1.0
        self.Stream, self.Event = Stream, Event

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    def current_stream(self, device=None):
        return self.Stream(torch.device("cuda", self.current) if device is None else torch.device(device))


def test_timing_runs_on_the_activations_gpu(autotune, monkeypatch):
    fake = StandInCuda()
    for name in ("device", "current_stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    ms = autotune._time_backend(lambda: fake.steps.append(fake.current), CUDA1, reps=3)
    assert ms == 1.0
    assert fake.steps == [1] * 5            # warm-up and timed runs with cuda:1 current
    assert fake.recorded == [CUDA1] * 6     # every event on a cuda:1 stream
    assert fake.current == 0                # the caller's device restored


def test_the_order_is_measured_and_cached_for_the_tensors_gpu(autotune, monkeypatch):
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA L4"}
    asked = []
    monkeypatch.setattr(autotune, "_device_name", lambda device: names[device.index])
    monkeypatch.setattr(autotune, "_capturing", lambda device: False)
    monkeypatch.setattr(autotune, "measure", lambda device, dtype, shape: asked.append(device) or
                        {"cuda": 1.0 if device.index == 1 else 3.0, "triton": 2.0})
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.order_for(CUDA1, torch.bfloat16, SHAPE) == ("cuda", "triton")
    assert autotune.order_for(CUDA0, torch.bfloat16, SHAPE) == ("triton", "cuda")
    assert asked == [CUDA1, CUDA0]
    cached = autotune.read_cache(autotune.cache_path())
    assert {k.split("|")[1] for k in cached} == {"NVIDIA H100 80GB HBM3", "NVIDIA L4"}
    autotune._memory.clear()  # a new process: the file answers, nothing is measured
    assert autotune.order_for(CUDA1, torch.bfloat16, SHAPE) == ("cuda", "triton") and len(asked) == 2


def test_no_measurement_while_a_cuda_graph_is_captured(autotune, monkeypatch):
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(autotune, "_capturing", lambda device: True)
    forbid(monkeypatch, autotune, "measure")
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.order_for(CUDA0, torch.bfloat16, SHAPE) == autotune.DEFAULT_ORDER
    assert not autotune._memory  # not remembered: a call after the capture measures
    key = autotune.shape_key("NVIDIA H100 80GB HBM3", torch.bfloat16, SHAPE)
    autotune.write_cache(autotune.cache_path(), key, {"cuda": 1.0, "triton": 2.0})
    assert autotune.order_for(CUDA0, torch.bfloat16, SHAPE) == ("cuda", "triton")  # reading the file is harmless


# ------------------------------------------------------------------------------------------------------ on a GPU
def cuda_extension_or_skip():
    if dispatch.unavailable_reason("dwconv_ln_modulate", "cuda", torch.device("cuda")) is not None:
        pytest.skip("the CUDA extension is not built here")


@pytest.mark.gpu
def test_auto_compiles_fullgraph_and_matches_eager(tmp_path, monkeypatch):
    cuda_extension_or_skip()
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    from tests.test_triton_dwconv_ln_modulate import make_args
    args = [a.detach() for a in make_args(4, 32, 32, 512, torch.bfloat16, torch.device("cuda"))]  # level 1's kernels
    torch._dynamo.reset()
    with fcdm_kernels.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed measurement warns
        # Dynamo's tracing is what must not break; the eager backend spares the inductor build.
        compiled = torch.compile(fcdm_kernels.dwconv_ln_modulate, fullgraph=True, backend="eager")(*args)
        eager = fcdm_kernels.dwconv_ln_modulate(*args)  # measures now (and caches the order)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_measures_on_the_second_gpu_while_the_first_is_current(tmp_path, monkeypatch):
    cuda_extension_or_skip()
    import fcdm_kernels.cuda.autotune as autotune
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "_memory", {})
    with torch.cuda.device(0):
        timings = autotune.measure(CUDA1, torch.bfloat16, SHAPE)
    assert set(timings) == {"cuda", "triton"} and all(t > 0 for t in timings.values())
