"""The lazy GEMM tuner of launch.py: what it skips, what it lets through, when it does not time, and its cache key.

On CPU the GPU is a stand-in: launch.py is told it is not interpreting, the device kind and the capture state are
given, and triton.testing.do_bench is replaced by a timer that runs the candidate once and returns a set time. The GPU
tests tune for real, once inside a CUDA-graph capture.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.testing  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from fcdm_kernels.triton import launch  # noqa: E402

OP, N, K, P, DTYPE = "gemm1", 1536, 512, 1024, torch.bfloat16
CANDIDATES = launch.gemm_candidates(OP, N, DTYPE)


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU: its kind per device index, whether a capture is on, and the candidates' times (ms)."""
    state = {"kinds": {0: "NVIDIA H100 80GB HBM3 sm_90", 1: "NVIDIA H100 80GB HBM3 sm_90"}, "capturing": False,
             "times": {cfg: 1.0 + i for i, cfg in enumerate(CANDIDATES)}, "timed": []}
    monkeypatch.setattr(launch, "_TUNED", {})
    monkeypatch.setattr(launch, "interpreting", lambda device: False)
    monkeypatch.setattr(launch, "device_kind", lambda device: state["kinds"][device.index or 0])
    monkeypatch.setattr(launch, "capturing", lambda device: state["capturing"])
    monkeypatch.setenv("FCDM_TRITON_TUNE", "1")

    def do_bench(fn, warmup, rep):
        cfg = fn()
        state["timed"].append(cfg)
        return state["times"][cfg]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return state


def tune(run, device=torch.device("cuda", 0)):
    return launch.gemm_config(OP, 65536, N, K, P, DTYPE, device, run)


def failing_for(bad: dict):
    """run(cfg): raises bad[cfg] for those configs, else returns cfg (so the stand-in timer knows which ran)."""
    def run(cfg):
        if cfg in bad:
            raise bad[cfg]
        return cfg
    return run


def test_the_fastest_candidate_is_cached(gpu):
    gpu["times"][CANDIDATES[2]] = 0.5
    assert tune(failing_for({})) == CANDIDATES[2]
    assert gpu["timed"] == CANDIDATES
    assert tune(failing_for({})) == CANDIDATES[2] and len(gpu["timed"]) == len(CANDIDATES)  # no second timing


@pytest.mark.parametrize("error", [OutOfResources(232448, 232448 - 1024, "shared memory"),
                                   CompilationError(None, None, "unsupported layout")],
                         ids=["out_of_resources", "compilation_error"])
def test_a_config_that_does_not_fit_is_skipped(gpu, error):
    assert tune(failing_for({CANDIDATES[0]: error})) == CANDIDATES[1]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   RuntimeError("operation not permitted when stream is capturing")],
                         ids=["out_of_memory", "cuda_error", "capture_error"])
def test_any_other_error_propagates_with_its_own_message(gpu, error):
    with pytest.raises(type(error), match=str(error)[:20]):
        tune(failing_for({CANDIDATES[1]: error}))
    assert not launch._TUNED  # nothing half-tuned is cached


def test_no_fitting_config_lists_every_reason(gpu):
    errors = {cfg: OutOfResources(300000 + i, 232448, "shared memory") for i, cfg in enumerate(CANDIDATES)}
    with pytest.raises(RuntimeError, match="no Triton GEMM config fits gemm1") as caught:
        tune(failing_for(errors))
    assert all(str(300000 + i) in str(caught.value) for i in range(len(CANDIDATES)))
    assert "NVIDIA H100" in str(caught.value)


def test_no_timing_while_a_cuda_graph_is_captured(gpu):
    gpu["times"][CANDIDATES[1]] = 0.1
    gpu["capturing"] = True
    assert tune(failing_for({})) == CANDIDATES[0]
    assert gpu["timed"] == [] and not launch._TUNED  # not cached: a call outside the capture still tunes
    gpu["capturing"] = False
    assert tune(failing_for({})) == CANDIDATES[1]


def test_each_kind_of_gpu_tunes_for_itself(gpu):
    gpu["kinds"][1] = "NVIDIA L4 sm_89"
    gpu["times"][CANDIDATES[1]] = 0.1
    assert tune(failing_for({})) == CANDIDATES[1]
    gpu["times"][CANDIDATES[1]] = 9.0  # on the other card another config wins
    assert tune(failing_for({}), torch.device("cuda", 1)) == CANDIDATES[0]
    assert len(gpu["timed"]) == 2 * len(CANDIDATES)
    assert tune(failing_for({})) == CANDIDATES[1]  # each kind keeps its own pick
    assert {key[-1] for key in launch._TUNED} == {"NVIDIA H100 80GB HBM3 sm_90", "NVIDIA L4 sm_89"}


def test_two_gpus_of_one_kind_share_the_tuning(gpu):
    tune(failing_for({}))
    tune(failing_for({}), torch.device("cuda", 1))
    assert len(gpu["timed"]) == len(CANDIDATES)


@pytest.mark.parametrize("switch", ["env", "torch_deterministic"])
def test_tuning_off_takes_the_default_untimed(gpu, monkeypatch, switch):
    gpu["times"][CANDIDATES[1]] = 0.1
    tune(failing_for({}))  # tuned earlier in the process: still not used while tuning is off
    gpu["timed"].clear()
    if switch == "env":
        monkeypatch.setenv("FCDM_TRITON_TUNE", "0")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(switch == "torch_deterministic" or previous)
    try:
        assert tune(failing_for({})) == CANDIDATES[0] and gpu["timed"] == []
    finally:
        torch.use_deterministic_algorithms(previous)


def test_device_kind_names_the_model_and_capability(monkeypatch):
    class Props:
        name, major, minor = "NVIDIA H100 80GB HBM3", 9, 0
    calls = []
    monkeypatch.setattr(launch, "_DEVICE_KINDS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: calls.append(index) or Props)
    assert launch.device_kind(torch.device("cuda", 3)) == "NVIDIA H100 80GB HBM3 sm_90"
    assert launch.device_kind(torch.device("cuda", 3)) == "NVIDIA H100 80GB HBM3 sm_90"
    assert calls == [3]  # asked once per device


# ------------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_first_call_inside_a_cuda_graph_capture_does_not_tune(monkeypatch):
    """A shape first seen while capturing: the capture succeeds (no timing, no sync) and replays like eager."""
    import fcdm_kernels
    monkeypatch.setenv("FCDM_TRITON_TUNE", "1")
    monkeypatch.setattr(launch, "_TUNED", {})
    cuda = torch.device("cuda")
    B, H, W, C = 2, 32, 32, 512  # FCDM-XL level 1's kernels, which the other GPU tests compile too
    args = [torch.randn(s, device=cuda, dtype=torch.bfloat16) * 0.1 for s in
            ((B, H, W, C), (B, H, W, C), (B, C), (3 * C, C), (3 * C,), (3 * C,), (3 * C,), (C, 3 * C), (C,))]
    with fcdm_kernels.use_backend("triton"), torch.no_grad():
        monkeypatch.setenv("FCDM_TRITON_TUNE", "0")
        eager = fcdm_kernels.grn_mlp(*args)  # the default configs, compiled outside the capture
        monkeypatch.setenv("FCDM_TRITON_TUNE", "1")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fcdm_kernels.grn_mlp(*args)
        assert not launch._TUNED
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)  # the same default kernels
