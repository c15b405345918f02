"""fcdm_kernels/dispatch.py: which backend is requested (context, set_backend, FCDM_BACKEND), what each op resolves
to here, the fallback and its one warning per reason, `auto`'s registered preferences, and block_plan, the one rule
for how a whole block runs."""
import warnings

import pytest
import torch

import fcdm
from fcdm_kernels import BackendFallbackWarning, convnext_block, dispatch
from tests.test_ops_reference import dwconv_args, mlp_args


def block_inputs():
    x, w, b, shift, scale = dwconv_args(C=4, H=3, W=5)
    _, _, gate, w1, b1, gamma, beta, w2, b2 = mlp_args(C=4, H=3, W=5)
    return x, shift, scale, gate, w, b, w1, b1, gamma, beta, w2, b2


def test_backend_selection_precedence(monkeypatch):
    monkeypatch.setenv("FCDM_BACKEND", "torch")
    monkeypatch.setattr(dispatch, "_global_backend", None)
    assert fcdm.get_backend() == "torch"
    fcdm.set_backend("auto")
    assert fcdm.get_backend() == "auto"
    with fcdm.use_backend("TRITON"):
        assert fcdm.get_backend() == "triton"
        with fcdm.use_backend("torch"):
            assert fcdm.get_backend() == "torch"
        assert fcdm.get_backend() == "triton"
    assert fcdm.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        fcdm.set_backend("cudnn")
    monkeypatch.setattr(dispatch, "_global_backend", None)
    monkeypatch.setenv("FCDM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FCDM_BACKEND"):
        fcdm.get_backend()


def test_auto_resolves_to_reference_on_cpu():
    x = torch.randn(1, 4, 4, 8)
    with fcdm.use_backend("auto"):
        assert dispatch.resolve("dwconv_ln_modulate", x) == "torch"


def test_unavailable_backend_falls_back_with_a_single_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(1, 4, 4, 8)
    with fcdm.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dispatch.resolve("grn_mlp", x)
        dispatch.resolve("grn_mlp", x)
    assert first == "torch"
    messages = [str(w.message) for w in caught]
    assert messages and all("falling back" in m for m in messages)
    assert len(messages) == len(set(messages))  # each reason is reported once, not on every call


def test_a_registered_whole_block_op_runs_the_block(monkeypatch):
    calls = []
    monkeypatch.setitem(dispatch._IMPLS, "convnext_block", {"torch": lambda *a: calls.append(a) or a[0]})
    args = block_inputs()
    with fcdm.use_backend("torch"):
        assert dispatch.block_plan(args[0]).fused is dispatch._IMPLS["convnext_block"]["torch"]
        out = convnext_block(*args)
    assert len(calls) == 1 and out is args[0]


def test_the_backends_a_user_may_request_are_one_list():
    assert fcdm.BACKENDS is dispatch.BACKENDS and set(dispatch.BACKENDS) == {"auto", "torch", "triton", "cuda"}
    from fcdm.train.config import build_parser
    backend = next(a for a in build_parser()._actions if a.dest == "backend")
    assert tuple(backend.choices) == dispatch.BACKENDS


def test_without_a_whole_block_op_the_block_is_the_two_ops_on_one_backend(monkeypatch):
    monkeypatch.setitem(dispatch._IMPLS, "convnext_block", {})
    args = block_inputs()
    with fcdm.use_backend("torch"):
        plan = dispatch.block_plan(args[0])
        assert plan == ("torch", "torch", None)
        assert plan.dwconv_ln_modulate is dispatch._IMPLS["dwconv_ln_modulate"]["torch"]
        assert plan.grn_mlp is dispatch._IMPLS["grn_mlp"]["torch"]
        assert plan.describe() == "torch dwconv_ln_modulate + torch grn_mlp"
        out = convnext_block(*args)
    h = dispatch._IMPLS["dwconv_ln_modulate"]["torch"](*args[:1], *args[4:6], *args[1:3])
    assert torch.equal(out, dispatch._IMPLS["grn_mlp"]["torch"](h, args[0], *args[3:4], *args[6:]))


def test_a_backend_with_only_dwconv_runs_it_and_the_fallback_runs_grn_mlp_as_an_op_of_its_own(monkeypatch):
    """cuda has dwconv_ln_modulate but no grn_mlp: its dwconv runs, grn_mlp falls back (with a warning), and the
    fallback's whole-block op is not used, since it would replace the requested dwconv."""
    fused_calls = []
    monkeypatch.setitem(dispatch._IMPLS["dwconv_ln_modulate"], "cuda", dispatch._IMPLS["dwconv_ln_modulate"]["torch"])
    monkeypatch.setitem(dispatch._IMPLS, "convnext_block", {"torch": lambda *a: fused_calls.append(a) or a[0]})
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda op, backend, device: {
        "cuda": None if op == "dwconv_ln_modulate" else "no grn_mlp here", "triton": "no Triton here"}.get(backend))
    monkeypatch.setattr(dispatch, "_warned", set())
    args = block_inputs()
    with fcdm.use_backend("cuda"), pytest.warns(BackendFallbackWarning, match="grn_mlp"):
        plan = dispatch.block_plan(args[0])
        convnext_block(*args)
    assert plan == ("cuda", "torch", None) and plan.describe() == "cuda dwconv_ln_modulate + torch grn_mlp"
    assert not fused_calls
    with fcdm.use_backend("auto"):  # auto on CPU: the reference, whose whole-block op (here, a stand-in) runs
        assert dispatch.block_plan(args[0]) == ("torch", "torch", dispatch._IMPLS["convnext_block"]["torch"])
        assert dispatch.block_plan(args[0]).describe() == "torch convnext_block op"


def test_the_triton_backend_runs_the_block_as_its_whole_block_op():
    pytest.importorskip("triton")
    x = block_inputs()[0].float()
    dispatch._load("triton")
    with fcdm.use_backend("triton"):
        plan = dispatch.block_plan(x)
    assert plan.fused is dispatch.implementation_on("convnext_block", "triton") is not None
    assert plan.describe() == "triton convnext_block op"


def test_auto_preferences_are_registered_through_a_public_call(monkeypatch):
    monkeypatch.setattr(dispatch, "_auto_preference", {})

    def first(x):
        return ("cuda", "triton")

    def second(x):
        return ("triton", "cuda")
    assert dispatch.auto_preference("grn_mlp") is None
    assert dispatch.set_auto_preference("grn_mlp", first)
    assert not dispatch.set_auto_preference("grn_mlp", second, replace=False)  # an earlier chooser is kept
    assert dispatch.auto_preference("grn_mlp") is first
    assert dispatch.set_auto_preference("grn_mlp", second) and dispatch.auto_preference("grn_mlp") is second
    # Importing the Triton backend installs its preference without replacing one installed first.
    triton_backend = pytest.importorskip("fcdm_kernels.triton")
    monkeypatch.setattr(dispatch, "_auto_preference", {"grn_mlp": first})
    import importlib
    importlib.reload(triton_backend)
    assert dispatch.auto_preference("grn_mlp") is first
    assert dispatch.auto_preference("dwconv_ln_modulate")(torch.empty(0))[0] == "triton"
