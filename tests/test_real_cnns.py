"""Real CNN architectures through `cwhawq compile --target llvm` (fp32), against onnxruntime.

One network holds the blocks of several architectures side by side (VGG, ResNet basic blocks with
a 1x1 projection shortcut, MobileNetV2 inverted residuals with depthwise convs and ReLU6, an
Inception-v3 block and a GoogLeNet block with pooling branches and Concat, Flatten/Gemm and
global average pooling), so each ONNX convention costs one TVM compile:

* ``classic``: torch's TorchScript exporter with ``keep_initializers_as_inputs=True`` and no
  constant folding: every initializer is also a graph input (ONNX model-zoo convention), the
  BatchNormalization nodes stay in the graph;
* ``modern``: initializers only (not inputs), BatchNormalization folded into the convolutions
  (torch's exporter defaults, opset 17);
* ``train_bn``: an Inception block exported in training mode (BatchNormalization with
  ``training_mode=1``), whose TVM function once failed dlight's Reduction schedule (compute-at).

Random weights; BN statistics randomised so that folding matters. The reference is onnxruntime
with graph optimisations off; inputs include large values (x100, 0..255 images).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

REPO = Path(__file__).resolve().parents[1]
REL = 1e-3  # max |compiled - onnxruntime| / max |onnxruntime|, per output
HW = 16


def _cbr(cin, cout, k, act=nn.ReLU, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout), act())


class VGGBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * (HW // 4) ** 2, 16), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 3, padding=1)
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 12, 2))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        h = cin * t
        self.res = stride == 1 and cin == cout
        layers = [_cbr(cin, h, 1, nn.ReLU6)] if t != 1 else []
        layers += [_cbr(h, h, 3, nn.ReLU6, stride=stride, padding=1, groups=h),
                   nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 3, nn.ReLU6, stride=2, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 4),
                                    InvertedResidual(12, 12, 1, 4))
        self.head = _cbr(12, 16, 1, nn.ReLU6)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class InceptionA(nn.Module):
    """Inception-v3 A: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1, concatenated."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = _cbr(cin, 4, 1)
        self.b5 = nn.Sequential(_cbr(cin, 3, 1), _cbr(3, 4, 5, padding=2))
        self.b3 = nn.Sequential(_cbr(cin, 4, 1), _cbr(4, 6, 3, padding=1), _cbr(6, 6, 3, padding=1))
        self.bp = _cbr(cin, 3, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class GoogLeNetBlock(nn.Module):
    """GoogLeNet inception: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool(ceil) -> 1x1, concatenated."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = _cbr(cin, 4, 1)
        self.b2 = nn.Sequential(_cbr(cin, 3, 1), _cbr(3, 5, 3, padding=1))
        self.b3 = nn.Sequential(_cbr(cin, 2, 1), _cbr(2, 3, 3, padding=1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _cbr(cin, 3, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 3, padding=1)
        self.a = InceptionA(8)
        self.g = GoogLeNetBlock(17)
        self.fc = nn.Linear(15 + 17, 5)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2, ceil_mode=True)
        a = self.a(x)
        x = torch.cat([self.g(a), F.max_pool2d(a, 3, 1, 1)], 1)  # a pooling branch straight into Concat
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Zoo(nn.Module):
    """The architectures side by side on one input; one output each."""

    def __init__(self):
        super().__init__()
        self.vgg, self.resnet, self.mobilenet, self.inception = VGGBlock(), ResNet(), MobileNetV2(), Inception()

    def forward(self, x):
        return self.vgg(x), self.resnet(x), self.mobilenet(x), self.inception(x)


OUTPUTS = ["vgg", "resnet", "mobilenet", "inception"]


class TrainBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = InceptionA(3)

    def forward(self, x):
        return self.a(x)


def _randomise_bn(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
    return m


def _export(kind: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and BN-mutation notes
        return _export_quiet(kind)


def _export_quiet(kind: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    x = torch.randn(2, 3, HW, HW)
    if kind == "train_bn":
        m = _randomise_bn(TrainBN(), 1).train()
        f = io.BytesIO()
        torch.onnx.export(m, (x,), f, dynamo=False, input_names=["x"], output_names=["y"], opset_version=15,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return onnx.load_from_string(f.getvalue())
    m = _randomise_bn(Zoo(), 0).eval()
    if kind == "classic":
        f = io.BytesIO()
        torch.onnx.export(m, (x,), f, dynamo=False, input_names=["x"], output_names=OUTPUTS, opset_version=13,
                          keep_initializers_as_inputs=True, do_constant_folding=False,
                          dynamic_axes={"x": {0: "N"}, **{o: {0: "N"} for o in OUTPUTS}})
        return onnx.load_from_string(f.getvalue())
    f = io.BytesIO()  # the dynamo exporter gives the same convention but takes ~20 s on this model
    torch.onnx.export(m, (x,), f, dynamo=False, input_names=["x"], output_names=OUTPUTS, opset_version=17,
                      dynamic_axes={"x": {0: "N"}, **{o: {0: "N"} for o in OUTPUTS}})
    return onnx.load_from_string(f.getvalue())


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "cwhawq.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # the classic convention's "initializer appears in graph inputs" warnings
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _inputs(batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    shape = (batch, 3, HW, HW)
    return {"normal": rng.normal(size=shape).astype(np.float32),
            "x100": (rng.normal(size=shape) * 100).astype(np.float32),
            "image_0_255": rng.uniform(0, 255, shape).astype(np.float32),
            "negative": -rng.uniform(0, 50, shape).astype(np.float32)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """kind -> (onnx path, artifact path, compile stdout); compiled on first use."""
    tmp = tmp_path_factory.mktemp("real_cnns")
    cache = {}

    def get(kind):
        if kind not in cache:
            p = tmp / f"{kind}.onnx"
            onnx.save(_export(kind), str(p))
            art = tmp / f"{kind}.so"
            r = _cli("compile", str(p), "--target", "llvm", "--out", str(art))
            assert r.returncode == 0, r.stderr[-3000:]
            cache[kind] = (p, art, r.stdout)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["classic", "modern"])
def test_architectures_match_onnxruntime(compiled, kind):
    from cwhawq.backends.tvm import load_artifact

    p, art, out = compiled(kind)
    model = onnx.load(str(p))
    inits = {t.name for t in model.graph.initializer}
    n_init_inputs = sum(v.name in inits for v in model.graph.input)
    ops = {n.op_type for n in model.graph.node}
    # the two conventions really are what they claim, and the graphs hold the operators named above
    if kind == "classic":
        assert n_init_inputs == len(inits) > 50 and "BatchNormalization" in ops
    else:
        assert n_init_inputs == 0
    assert {"Conv", "Concat", "MaxPool", "AveragePool", "Add"} <= ops, ops
    assert ops & {"Gemm", "MatMul"} and ops & {"Flatten", "Reshape"}, ops
    assert ops & {"Clip", "Min", "Max"} and ops & {"GlobalAveragePool", "ReduceMean"}, ops  # ReLU6, pooling heads
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node)
    man = json.loads((art.with_name(f"{kind}.manifest.json")).read_text())
    assert [i["name"] for i in man["inputs"]] == ["x"], man["inputs"]  # initializers are not inputs
    assert [o["name"] for o in man["outputs"]] == OUTPUTS
    assert "compiled" in out
    a = load_artifact(art)
    for label, x in _inputs().items():
        ys, refs = a.run({"x": x}), _ort(p, x)
        assert len(ys) == len(refs) == len(OUTPUTS)
        for name, y, ref in zip(OUTPUTS, ys, refs):
            assert y.shape == ref.shape
            rel = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-12))
            assert rel <= REL, f"{kind} {name} on {label} inputs: relative error {rel:.2e}"
    (y1,) = a.run({"x": _inputs(1)["normal"]})[:1]  # the batch stays symbolic
    assert y1.shape == (1, 5)


def test_training_mode_batchnorm_compiles(compiled):
    """BatchNormalization in training mode: dlight's Reduction rule raises compute-at on its TVM
    function (reductions writing outputs); the build must go on with the next rule and match."""
    from cwhawq.backends.tvm import load_artifact

    p, art, out = compiled("train_bn")
    model = onnx.load(str(p))
    assert any(n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i == 1 for a in n.attribute)
               for n in model.graph.node)
    man = json.loads(art.with_name("train_bn.manifest.json").read_text())
    falls = man["lowering"]["schedule_fallbacks"]
    assert falls and all(f["rule"] == "Reduction" and "compute-at" in f["error"] for f in falls), falls
    assert "could not apply" in out
    a = load_artifact(art)
    for label, x in _inputs().items():
        (y,) = a.run({"x": x})
        (ref,) = _ort(p, x)[:1]
        rel = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-12))
        assert rel <= REL, f"{label}: relative error {rel:.2e}"


def test_a_raising_rule_hands_the_operator_on():
    """schedule_func: a rule that raises is recorded and the next rule schedules the function."""
    import tvm
    from tvm import te
    from tvm.s_tir.dlight.base import ScheduleRule

    from cwhawq.backends.schedule_rules import CpuFallback, schedule_func

    class Broken(ScheduleRule):
        def apply(self, func, target, tunable):
            raise tvm.error.InternalError("boom")

    a = te.placeholder((64, 32), "float32", name="a")
    b = te.compute((64, 32), lambda i, j: a[i, j] * 2, name="b")
    func = te.create_prim_func([a, b])
    target = tvm.target.Target({"kind": "llvm"})
    notes = []
    sch = schedule_func(func, target, [Broken(), CpuFallback()], notes, "f")
    assert sch is not None
    assert len(notes) == 1 and notes[0]["function"] == "f" and notes[0]["rule"] == "Broken"
    assert "boom" in notes[0]["error"]
    notes.clear()
    assert schedule_func(func, target, [Broken()], notes, "f") is None and len(notes) == 1
