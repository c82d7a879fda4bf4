"""Transformers: Linear layers on [batch, tokens, features] (channels = features, the last axis),
LayerNorm / GELU / softmax attention kept in float. Built here: a tiny ViT (~300 parameters, its
attention written out with a packed q/k/v Linear, 4 tokens of width 4 so that tokens == features),
a piecewise-linear token MLP (for the exact scheme), and a .pt2 with nn.MultiheadAttention.

Checked: per-channel weight and activation traces against the brute-force Hessian
(torch.autograd.functional.hessian), calibration and the activation quantizer on the feature axis,
the ONNX export (MatMul layers, Q/DQ on axis r - 1) against the simulation in onnxruntime, and the
MultiheadAttention graph (packed in-projection = one layer of 3E channels) found, analyzed and exported.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from conftest import write_npz  # noqa: E402

from cwhawq import hessian as H  # noqa: E402
from cwhawq.cli import cli  # noqa: E402
from cwhawq.data import Dataset  # noqa: E402
from cwhawq.export import export_onnx  # noqa: E402
from cwhawq.graph import canonicalize  # noqa: E402
from cwhawq.models import LoadedModel, save_pt2  # noqa: E402
from cwhawq.onnx_plan import plan_from_onnx  # noqa: E402
from cwhawq.plan import LayerPlan, Plan  # noqa: E402
from cwhawq.quantize import calibrate_ranges, quantize_model  # noqa: E402

TOKEN_LAYERS = ["blk.qkv", "blk.proj", "blk.fc1", "blk.fc2"]


class TinyViT(nn.Module):
    """1x8x8 -> 4 patches of 4x4 -> 4 tokens of width 4 (tokens == features); one pre-LN block."""

    def __init__(self, d=4, heads=2, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4, d) * 0.3)
        self.blk = nn.Module()
        self.blk.ln1, self.blk.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.blk.qkv, self.blk.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.blk.fc1, self.blk.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.heads = heads

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos              # N, 4, d
        b, n, d = t.shape
        q, k, v = self.blk.qkv(self.blk.ln1(t)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        t = t + self.blk.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        t = t + self.blk.fc2(F.gelu(self.blk.fc1(self.blk.ln2(t))))
        return self.head(self.ln(t).mean(1))


class TokenMLP(nn.Module):
    """Piecewise linear with Linears on [N, tokens, features]: the exact scheme applies."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.fc1, self.fc2 = nn.Linear(d, 6), nn.Linear(6, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = F.relu(self.patch(x)).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.relu(self.fc1(t)))
        return self.head(t.mean(1))


class MHANet(nn.Module):
    """nn.MultiheadAttention (batch_first; need_weights: its bmm/softmax path, which has a second
    derivative): packed in_proj_weight [3E, E] on [tokens, batch, E], out_proj on [tokens*batch, E]."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        y, _ = self.attn(t, t, t)
        return self.head(self.ln(t + y).mean(1))


def _data(n=48, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return Dataset(rng.random((n, 1, 8, 8)).astype(np.float32), rng.integers(0, classes, n), "rand", "train")


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _mixed_plan(infos, seed=0):
    rng = np.random.default_rng(seed)
    return Plan([LayerPlan(i.name, rng.choice([8, 6, 4], size=i.out_channels).tolist(),
                           rng.choice([8, 6], size=i.in_channels).tolist()) for i in infos], (4, 6, 8), None, "test",
                "bits:6")


# ===================================================================================== layers
def test_token_linears_are_layers():
    qm = canonicalize(_model(TinyViT), (1, 8, 8))
    infos = {i.name: i for i in qm.layer_infos}
    assert list(infos) == ["patch"] + TOKEN_LAYERS + ["head"]
    qkv = infos["blk.qkv"]
    assert (qkv.in_shape, qkv.out_shape, qkv.in_channels, qkv.out_channels) == ((4, 4), (4, 12), 4, 12)
    assert qkv.macs == 4 * 4 * 12 and qkv.act_elems_per_channel == 4 and qkv.tokens == 4
    assert infos["head"].in_shape == (4,) and infos["head"].act_elems_per_channel == 1
    # softmax, GELU and LayerNorm make it not piecewise linear: auto takes a Hutchinson scheme
    bad = " ".join(H.non_piecewise_linear_ops(qm))
    assert all(op in bad for op in ("softmax", "gelu", "layer_norm", "matmul"))
    assert H.resolve_scheme("auto", qm) == "layer"
    with pytest.raises(Exception, match="needs a piecewise-linear network"):
        H.channel_traces(qm, [(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))], scheme="exact")


def test_calibration_and_act_quant_on_the_feature_axis():
    """tokens == features == 4: a quantizer on axis 1 would run without error, but on the tokens."""
    m, data = _model(TinyViT), _data(32)
    qm = canonicalize(m, (1, 8, 8))
    seen = {}
    q = qm.layer("blk.qkv")
    q.act = lambda x: seen.setdefault("x", x.detach()) if "x" not in seen else x
    qm(torch.from_numpy(data.x))
    qm.reset()
    x = seen["x"]                                               # N, tokens, features
    rng = calibrate_ranges(qm, data)["blk.qkv"]
    assert np.allclose(rng["range"], x.abs().amax(dim=(0, 1)).numpy())
    assert np.allclose(rng["min"], x.amin(dim=(0, 1)).numpy())
    plan = _mixed_plan(qm.layer_infos)
    sim = quantize_model(qm, plan, data)
    st = sim.states["blk.qkv"]
    s = torch.from_numpy(st.a_scales).view(1, 1, -1)            # per feature
    lo, hi = torch.from_numpy(st.a_qmin).view(1, 1, -1), torch.from_numpy(st.a_qmax).view(1, 1, -1)
    want = torch.clamp(torch.round(x / s), lo, hi) * s
    assert torch.equal(q.act(x), want)


# ===================================================================================== traces
def _brute_force(qm, x, y, name):
    """Per-output-channel weight traces and per-feature activation traces of the mean CE loss, from the
    full Hessian blocks."""
    q = qm.layer(name)
    w0 = q.weight.detach().clone()

    def f_w(w):
        q.wq = lambda _: w
        try:
            return F.cross_entropy(qm(x), y)
        finally:
            q.wq = None
    hw = torch.autograd.functional.hessian(f_w, w0).reshape(w0.numel(), w0.numel())
    w_tr = torch.diagonal(hw).reshape(w0.shape).sum(1).numpy()
    cap = {}
    q.act = lambda inp: cap.setdefault("x", inp.detach())
    qm(x)
    qm.reset()
    e0 = torch.zeros_like(cap["x"])

    def f_a(e):
        q.act = lambda inp: inp + e
        try:
            return F.cross_entropy(qm(x), y)
        finally:
            q.act = None
    ha = torch.autograd.functional.hessian(f_a, e0).reshape(e0.numel(), e0.numel())
    a_diag = torch.diagonal(ha).reshape(e0.shape)
    return w_tr, a_diag.reshape(-1, e0.shape[-1]).sum(0).numpy()


def test_traces_against_the_exact_hessian():
    """Hutchinson (layer scheme, what auto picks here) against the brute-force Hessian on a softmax /
    GELU / LayerNorm network: within 5 standard errors of the estimate (the exact scheme below checks
    the per-feature reduction deterministically)."""
    torch.manual_seed(1)
    qm = canonicalize(_model(TinyViT, 1), (1, 8, 8))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    tr = H.channel_traces(qm, [(x, y)], scheme="layer", max_probes=40, tol=1e-9, min_probes=40, seed=0)
    for name in ("blk.qkv", "blk.fc2"):
        w_ref, a_ref = _brute_force(qm, x, y, name)
        for est, err, ref in ((tr.weight_trace[name], tr.weight_stderr[name], w_ref),
                              (tr.act_trace[name], tr.act_stderr[name], a_ref)):
            assert est.shape == ref.shape
            assert np.all(np.abs(est - ref) <= 5 * err + 1e-4 * np.abs(ref).max()), (name, est, ref, err)


def test_exact_scheme_on_token_linears():
    """A piecewise-linear network with Linears on [N, tokens, features]: exact equals the Hessian."""
    qm = canonicalize(_model(TokenMLP, 2), (1, 8, 8))
    assert H.resolve_scheme("auto", qm) == "exact"
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    tr = H.channel_traces(qm, [(x, y)], scheme="exact")
    for name in ("fc1", "fc2", "head"):
        w_ref, a_ref = _brute_force(qm, x, y, name)
        assert np.allclose(tr.weight_trace[name], w_ref, rtol=1e-4, atol=1e-7), name
        assert np.allclose(tr.act_trace[name], a_ref, rtol=1e-4, atol=1e-7), name


# ===================================================================================== export
def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_export_equals_simulation(tmp_path):
    m, data = _model(TinyViT, 3), _data(64, 1)
    loaded = LoadedModel("tinyvit", m, (1, 8, 8))
    qm = canonicalize(m, (1, 8, 8))
    plan = _mixed_plan(qm.layer_infos, 3)
    out = tmp_path / "vit.onnx"
    rep = export_onnx(loaded, plan, out, data=data, rounding="learned", verify=64)
    # the export's own check: the written file in onnxruntime against the simulation it was made from
    assert rep["verify"]["samples"] == 64 and rep["verify"]["rel_diff"] <= 1e-4
    assert rep["verify"]["argmax_agreement"] == 1.0
    assert rep["rounding"]["method"] == "learned"
    model = onnx.load(str(out))
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    for name in TOKEN_LAYERS:
        mm = nodes[name]
        assert mm.op_type == "MatMul" and mm.input[0] == f"{name}.act.dq" and mm.input[1] == f"{name}.weight_t"
        meta = {e.key: e.value for e in mm.metadata_props}
        assert meta["cwhawq.layer"] == name and meta["cwhawq.kind"] == "linear"
        t = nodes[f"{name}/w_t"]
        assert t.op_type == "Transpose" and [a.ints for a in t.attribute if a.name == "perm"][0] == [1, 0]
        add = nodes[f"{name}/bias_add"]
        assert add.input == [f"{name}.matmul", f"{name}.bias"]
        perm = json.loads(meta["cwhawq.perm"])
        bias = onnx.numpy_helper.to_array(inits[f"{name}.bias"])
        assert np.allclose(bias, qm.layer(name).bias.detach().numpy()[perm])
        for q in (f"{name}/act_q", f"{name}/act_dq"):       # rank 3, tokens == features: the feature axis
            assert [a.i for a in nodes[q].attribute if a.name == "axis"] == [2]
        dqs = [n for n in model.graph.node if n.name.startswith(f"{name}/dq_w")]
        assert dqs and all([a.i for a in n.attribute if a.name == "axis"] == [0] for n in dqs)
    # torch's own MatMul/Add of a layer are gone: one MatMul per token layer plus the two attention matmuls
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == len(TOKEN_LAYERS) + 2
    assert {"LayerNormalization", "Softmax"} <= {n.op_type for n in model.graph.node}
    assert nodes["head"].op_type == "Gemm"
    back = plan_from_onnx(out)                       # the plan round trip reads MatMul layers too
    assert [(lp.name, list(lp.w_bits), list(lp.a_bits)) for lp in back.layers] == \
        [(lp.name, list(lp.w_bits), list(lp.a_bits)) for lp in plan.layers]


# ===================================================================================== MultiheadAttention
@pytest.fixture(scope="module")
def mha_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mha")
    save_pt2(_model(MHANet, 4), (1, 8, 8), d / "mha.pt2")
    write_npz(d / "data.npz", n=64, shape=(1, 8, 8), classes=3)
    return d


def test_mha_pt2_found_analyzed_and_exported(mha_files):
    d = mha_files
    pt2, data = str(d / "mha.pt2"), str(d / "data.npz")
    r = CliRunner().invoke(cli, ["analyze", pt2, "--data", data, "--out", str(d / "sens.json"), "--max-probes", "8",
                                 "--batch-size", "32"])
    assert r.exit_code == 0, (r.output, r.exception)
    sens = json.loads((d / "sens.json").read_text())
    by = {e["name"]: e for e in sens["layers"]}
    assert sens["scheme"] == "layer"
    assert len(by["attn.in_proj"]["weight"]["trace"]) == 12 and len(by["attn.in_proj"]["activation"]["trace"]) == 4
    assert by["attn.in_proj"]["activation"]["shape"] == [4, 4] and by["attn.out_proj"]["activation"]["shape"] == [4, 4]
    r = CliRunner().invoke(cli, ["plan", "cw-greedy", pt2, "--sens", str(d / "sens.json"), "--budget", "bits:6",
                                 "--bits", "4,8", "--out", str(d / "plan.json")])
    assert r.exit_code == 0, (r.output, r.exception)
    r = CliRunner().invoke(cli, ["export", pt2, "--plan", str(d / "plan.json"), "--data", data,
                                 "--out", str(d / "mha.onnx"), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    model = onnx.load(str(d / "mha.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    # the packed in-projection works on [tokens, batch, E]: a MatMul with its quantizer on axis 2;
    # out_proj on [tokens * batch, E] is 2-D: a Gemm with its quantizer on axis 1
    assert nodes["attn.in_proj"].op_type == "MatMul"
    assert [a.i for a in nodes["attn.in_proj/act_q"].attribute if a.name == "axis"] == [2]
    assert nodes["attn.out_proj"].op_type == "Gemm"
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["verify"]["samples"] > 0 and rep["verify"]["rel_diff"] <= 1e-4, rep["verify"]
    assert rep["verify"]["argmax_agreement"] == 1.0 and rep["rounding"]["method"] == "learned"
    # ... and compiled (the projections on the packed kernels, the attention's bmm on our CPU
    # schedules), equal to onnxruntime also far outside the calibrated range, and benchmarked
    pytest.importorskip("tvm")
    from cwhawq.backends import tvm as backend

    r = CliRunner().invoke(cli, ["compile", str(d / "mha.onnx"), "--target", "llvm", "--out", str(d / "mha.so")])
    assert r.exit_code == 0, (r.output, r.exception)
    man = json.loads((d / "mha.manifest.json").read_text())
    assert {s["layer"] for s in man["lowering"]["lowered"]} == {"patch", "attn.in_proj", "attn.out_proj", "head"}
    art = backend.load_artifact(str(d / "mha.so"))
    sess = ort.InferenceSession(str(d / "mha.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for x in (rng.random((3, 1, 8, 8), np.float32), rng.normal(size=(2, 1, 8, 8)).astype(np.float32) * 100):
        y, ref = art.run({"input": x})[0], sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert float(np.abs(y - ref).max()) <= 1e-3 * float(np.abs(ref).max()) + 1e-6
    r = CliRunner().invoke(cli, ["bench", str(d / "mha.so"), "--batch", "1", "--repeat", "5", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)


# ===================================================================================== demo
def test_demo_runs_through_when_the_compile_fails(tmp_path, monkeypatch):
    """A model the compiler refuses (here: refused on purpose, whatever the model): every other stage
    of the demo runs, the report is written and says why it has no latencies."""
    from cwhawq.backends import tvm as T
    from cwhawq.errors import CompileError

    def refuse(src, **kw):
        raise CompileError(f"{src}: refused by this test")
    monkeypatch.setattr(T, "compile_model", refuse)
    model = str(tmp_path / "net.pt2")
    save_pt2(_model(TokenMLP, 5), (1, 8, 8), model)
    data = str(write_npz(tmp_path / "data.npz", n=120, shape=(1, 8, 8), classes=3))
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--model", model, "--data", data, "--episodes", "2", "--quick",
                                 "--rounding-iters", "2", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "warning: compile failed, no latency measured" in r.output and "refused by this test" in r.output
    report = (out / "report.md").read_text()
    assert "Latency: not measured: compiling for the host CPU failed" in report
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["fp32", "uniform W8A8", "uniform W4A8", "hawq-v3",
                                                         "cw-greedy", "CW-HAWQ (DDPG)"]
    assert (out / "cw-hawq.onnx").exists() and not list(out.glob("*.so"))
