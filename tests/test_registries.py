"""The extension points (docs/architecture.md): exporter layer kinds, TVM lowering converters, planners,
rewards and enforcement modes are registered by name, and everything that lists or dispatches on them
reads the registries."""
from __future__ import annotations

import click
import pytest
from onnx import helper

from cwhawq import baselines as B
from cwhawq.backends import onnx_import
from cwhawq.errors import ExportError, PlanError


def _choices(cmd, name):
    opt = next(p for p in cmd.params if p.name == name)
    assert isinstance(opt.type, click.Choice)
    return list(opt.type.choices)


def test_cli_lists_what_is_registered():
    from cwhawq.cli import cli
    from cwhawq.search.env import ENFORCE_MODES
    from cwhawq.search.reward import REWARDS

    search = cli.commands["search"]
    assert _choices(search, "reward") == list(REWARDS)
    assert _choices(search, "enforce") == list(ENFORCE_MODES)
    assert set(cli.commands["plan"].commands) == set(B.PLANNERS) | {"from-onnx"}


class _Info:
    def __init__(self, kind, in_shape):
        self.kind, self.in_shape = kind, in_shape


def test_layer_kinds_and_the_one_error_for_the_others():
    from cwhawq.export import LAYER_KINDS, layer_kind

    assert {"Conv", "Gemm", "MatMul"} <= set(LAYER_KINDS)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    assert layer_kind(conv, "c", _Info("conv", (3, 8, 8))) is LAYER_KINDS["Conv"]
    assert LAYER_KINDS["Conv"].channel_axis(4) == 1 and LAYER_KINDS["Gemm"].channel_axis(2) == 1
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="m")
    assert layer_kind(mm, "m", _Info("linear", (4, 16))) is LAYER_KINDS["MatMul"]
    assert LAYER_KINDS["MatMul"].channel_axis(3) == 2 and LAYER_KINDS["MatMul"].channel_axis(4) == 3
    with pytest.raises(ExportError, match=r"unsupported layer type: a conv layer exported as MatMul; "
                                          r"exported layer types: Conv \(conv/depthwise layers\), Gemm \(linear "
                                          r"layers\), MatMul \(linear layers\)"):
        layer_kind(mm, "m", _Info("conv", (3, 8, 8)))
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)
    with pytest.raises(ExportError, match="unsupported layer type: a conv layer exported as Gemm"):
        layer_kind(gemm, "g", _Info("conv", (3, 8, 8)))
    with pytest.raises(ExportError, match="unsupported Gemm form"):
        layer_kind(helper.make_node("Gemm", ["x", "w"], ["y"], name="g"), "g", _Info("linear", (16,)))


def test_a_registered_layer_kind_is_used(monkeypatch):
    from cwhawq import export as E

    @E.register_layer_kind
    class _Tokens(E.LayerKind):       # e.g. a MatMul kind: channels on the last axis
        op_type = "TokenMatMul"
        layer_kinds = ("linear",)

        def channel_axis(self, rank):
            return rank - 1

    try:
        node = helper.make_node("TokenMatMul", ["x", "w"], ["y"], name="t")
        kind = E.layer_kind(node, "t", _Info("linear", (4, 16)))
        assert kind.channel_axis(3) == 2 and "TokenMatMul (linear layers)" in E.supported_layer_kinds()
    finally:
        del E.LAYER_KINDS["TokenMatMul"]


def test_lowering_converters():
    assert set(onnx_import.CONVERTERS) == {"Conv", "Gemm", "MatMul"}


def test_planners_dispatch_by_name(monkeypatch):
    from cwhawq import api

    assert list(B.PLANNERS)[:3] == ["uniform", "hawq-v3", "cw-greedy"] and B.METHODS == tuple(B.PLANNERS)
    with pytest.raises(PlanError, match="unknown plan method 'nope': use one of uniform, hawq-v3, cw-greedy"):
        api.make_plan("nope", "zoo:lenet-fmnist")
    seen = {}

    def all_high(infos, sens, cfg):
        seen["cfg"] = cfg
        return B.uniform(infos, max(cfg.bit_set), 8, cfg.budget, cfg.bit_set)

    monkeypatch.setitem(B.PLANNERS, "all-high", B.Planner("all-high", all_high))
    plan = api.make_plan("all-high", "zoo:lenet-fmnist", bits="2,4", budget="bits:8")
    assert seen["cfg"].bit_set == (2, 4) and str(seen["cfg"].budget) == "bits:8"
    assert {b for lp in plan.layers for b in lp.w_bits} == {4} and plan.model == "zoo:lenet-fmnist"


def test_rewards_and_enforcement_modes_are_registered():
    from cwhawq.search.env import ENFORCE_MODES
    from cwhawq.search.reward import REWARDS

    assert REWARDS["acc"].fn(0.9, 0.0, 0.92, 0.0) == pytest.approx(-0.2)
    assert REWARDS["loss"].fn(0.0, 0.5, 0.0, 0.25) == pytest.approx(-0.25)
    assert ENFORCE_MODES["omega"].fallback == "layers" and ENFORCE_MODES["layers"].fallback is None


def test_search_config_of_keyword_calls():
    from cwhawq.search import SearchConfig

    c = SearchConfig.of("zoo:lenet-fmnist", None, sens="s.json", episodes=3, warmup=1, hidden=8)
    assert (c.model, c.sens, c.episodes, c.agent) == ("zoo:lenet-fmnist", "s.json", 3, {"warmup": 1, "hidden": 8})
    with pytest.raises(TypeError, match="multiple values"):
        SearchConfig.of("zoo:lenet-fmnist", None, data="x")


def test_tvm_compat_checks_the_version(monkeypatch):
    from cwhawq.backends import tvm_compat
    from cwhawq.errors import CompileError

    tvm_compat.check_version()      # the pinned TVM
    monkeypatch.setattr(tvm_compat, "tvm_version", lambda: "9.1.0")
    with pytest.raises(CompileError, match="TVM 9.1.0 is not supported"):
        tvm_compat.onnx_converter_ops()
    monkeypatch.setenv("CWHAWQ_TVM_ANY", "1")
    tvm_compat.check_version()
