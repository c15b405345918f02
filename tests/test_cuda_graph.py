"""fcdm.cuda_graph.GraphedForward: its bookkeeping on CPU (with the capture replaced by a stand-in that re-runs the
captured function into the same output buffer, as a replay does), and real CUDA graphs against eager on a GPU."""
import warnings

import pytest
import torch

import fcdm
from fcdm import cuda_graph
from fcdm.cuda_graph import GraphedForward
from fcdm.sampling import generate


def random_fcdm(num_classes=5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fcdm.FCDM_models["FCDM-T"](num_classes=num_classes)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def inputs(batch, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.rand(batch, generator=g) * 999, \
        torch.randint(0, 5, (batch,), generator=g)


@pytest.fixture
def stand_in_capture(monkeypatch):
    """Capture = remember fn; replay = run fn again and write into the captured output, so stale static inputs or an
    aliased output would show. Records the autocast cache state seen while capturing."""
    log = {"captures": 0, "cache_enabled": []}

    def capture(fn, device, warmup):
        for _ in range(warmup):
            fn()
        log["captures"] += 1
        log["cache_enabled"].append(torch.is_autocast_cache_enabled())
        output = fn()
        return (lambda: output.copy_(fn())), output
    monkeypatch.setattr(cuda_graph, "_require_cuda", lambda device: None)
    monkeypatch.setattr(cuda_graph, "_capture_cuda_graph", capture)
    return log


def test_refuses_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedForward(random_fcdm())


def test_one_graph_per_signature_and_fresh_outputs(stand_in_capture):
    model = random_fcdm()
    graphed = GraphedForward(model)
    with torch.no_grad():
        first = graphed(*inputs(2, seed=1))
        second = graphed(*inputs(2, seed=2))  # same signature: replayed with the new inputs
        third = graphed(*inputs(3, seed=3))   # a new batch size: a second graph
        torch.testing.assert_close(first, model(*inputs(2, seed=1)), rtol=0, atol=0)
        torch.testing.assert_close(second, model(*inputs(2, seed=2)), rtol=0, atol=0)
        torch.testing.assert_close(third, model(*inputs(3, seed=3)), rtol=0, atol=0)
    assert stand_in_capture["captures"] == graphed.num_graphs == 2
    assert not torch.equal(first, second)  # the first output was not overwritten by the second replay


def test_capture_runs_without_the_autocast_cache(stand_in_capture):
    graphed = GraphedForward(random_fcdm())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        out = graphed(*inputs(2))
        graphed(*inputs(2, seed=4))
        assert torch.is_autocast_cache_enabled()  # restored for the caller
    assert out.dtype == torch.bfloat16
    assert stand_in_capture["cache_enabled"] == [False]


def test_bad_calls_are_refused(stand_in_capture):
    graphed = GraphedForward(random_fcdm())
    with pytest.raises(RuntimeError, match="no_grad"):
        graphed(*inputs(2))
    x, t, y = inputs(2)
    with torch.no_grad(), pytest.raises(ValueError, match="x is on meta"):
        graphed(x.to("meta"), t, y)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedForward(random_fcdm(), max_graphs=0)


def test_beyond_max_graphs_runs_eagerly_with_one_warning(stand_in_capture):
    model = random_fcdm()
    graphed = GraphedForward(model, max_graphs=1)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed(*inputs(2))
        out3 = graphed(*inputs(3))
        graphed(*inputs(4))
        torch.testing.assert_close(out3, model(*inputs(3)), rtol=0, atol=0)
    assert graphed.num_graphs == 1
    assert sum("input signatures" in str(w.message) for w in caught) == 1


def test_generate_through_the_wrapper_matches_the_model(stand_in_capture):
    """The samplers see the wrapped model's attributes (eval mode, parameters' device) and get the same samples."""
    model = random_fcdm()
    y = torch.tensor([0, 3])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(sampler="ddpm", steps=3, cfg_scale=1.5, noise=noise, generator=torch.Generator().manual_seed(6))
    direct = generate(model, "ddpm", y, (4, 8, 8), **kw)
    kw["generator"] = torch.Generator().manual_seed(6)
    graphed = GraphedForward(model)
    through = generate(graphed, "ddpm", y, (4, 8, 8), **kw)
    torch.testing.assert_close(through, direct, rtol=0, atol=0)
    assert graphed.num_graphs == 1  # the conditional and unconditional halves run as one doubled batch


@pytest.mark.gpu
def test_real_cuda_graphs_match_eager_sampling():
    cuda = torch.device("cuda")
    model = random_fcdm().to(cuda)
    y = torch.tensor([0, 3, 4], device=cuda)
    noise = torch.randn(3, 4, 16, 16, device=cuda)
    for dtype in (torch.bfloat16,):  # what sample.py runs on a GPU (fp32 would add compiles to gpu_check's time box)
        kw = dict(sampler="ddpm", steps=5, cfg_scale=1.5, noise=noise, autocast_dtype=dtype)
        direct = generate(model, "ddpm", y, (4, 16, 16), generator=torch.Generator(cuda).manual_seed(0), **kw)
        graphed = GraphedForward(model)
        through = generate(graphed, "ddpm", y, (4, 16, 16), generator=torch.Generator(cuda).manual_seed(0), **kw)
        assert graphed.num_graphs == 1
        assert torch.isfinite(through).all()
        # The same kernels replayed: any real difference is far larger.
        torch.testing.assert_close(through, direct, rtol=1e-3, atol=1e-3)
