"""The TVM backend end to end: ONNX (our exported format, fp32, onnxruntime int8 QDQ) -> artifact ->
run, compared with onnxruntime (graph optimisations off) on the same ONNX; targets, manifest, CLI,
bad input. The test models are built here with onnx.helper following docs/onnx-format.md."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cwhawq import quantizers as qz  # noqa: E402
from cwhawq.errors import CompileError  # noqa: E402

pytestmark = pytest.mark.tvm

GROUP_ORDER = (8, 7, 6, 4, 3, 2)
WTYPE = {8: TensorProto.INT8, 7: TensorProto.INT8, 6: TensorProto.INT8, 4: TensorProto.INT4, 3: TensorProto.INT4, 2: TensorProto.INT2}


# ===================================================================================== builders
class _Builder:
    """Builds a model in the exported format (docs/onnx-format.md), layer by layer."""

    def __init__(self, fmt: str = "qdq", seed: int = 0):
        self.fmt = fmt
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self._n = 0

    def _t(self, arr, name, dtype=None, meta=None):
        if dtype is None:
            t = numpy_helper.from_array(np.asarray(arr), name)
        else:
            t = helper.make_tensor(name, dtype, list(np.shape(arr)), np.asarray(arr).reshape(-1).tolist())
        for k, v in (meta or {}).items():
            e = t.metadata_props.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return name

    def node(self, op, ins, outs=None, name=None, **attrs):
        self._n += 1
        name = name or f"{op.lower()}_{self._n}"
        outs = outs or [f"{name}_out"]
        n = helper.make_node(op, ins, outs, name=name, **attrs)
        self.nodes.append(n)
        return n

    def qlayer(self, name, x, kind, w, b, w_bits, a_bits, a_signed, ranges, conv_attrs=None, perm_fold=False,
               act_axis=None, migrate=False):
        """One quantized layer; returns the output tensor name (original channel order). ``kind``
        "token": a Linear on [B, T, K] (MatMul on the transposed weights + Add, activation
        quantizer per feature on axis 2; ``act_axis`` overrides that axis). ``migrate``: the
        exporter's ``--act-scale migrate`` (DequantizeLinear scale S, weights quantized as w * 2^k)."""
        cin_axis_shape = {"linear": (1, -1), "token": (1, 1, -1)}.get(kind, (1, -1, 1, 1))
        qaxis = {"token": 2}.get(kind, 1) if act_axis is None else act_axis
        if act_axis is not None:
            cin_axis_shape = tuple(-1 if d == act_axis else 1 for d in range(len(cin_axis_shape)))
        S, k = qz.act_pow2_scales(ranges, a_bits, a_signed)
        s = (np.float32(S) * np.exp2(k).astype(np.float32)).astype(np.float32)
        qlo, qhi = qz.act_bounds(s, a_bits, a_signed)
        lo = self._t((s * qlo).reshape(cin_axis_shape).astype(np.float32), f"{name}.act_lo")
        hi = self._t((s * qhi).reshape(cin_axis_shape).astype(np.float32), f"{name}.act_hi")
        sc = self._t(s, f"{name}.act_scale")
        zp = self._t(np.zeros(len(s), np.int8 if a_signed else np.uint8), f"{name}.act_zp")
        t = self.node("Max", [x, lo], name=f"{name}/act_max").output[0]
        t = self.node("Min", [t, hi], name=f"{name}/act_min").output[0]
        t = self.node("QuantizeLinear", [t, sc, zp], name=f"{name}/act_q", axis=qaxis).output[0]
        dsc = self._t(np.full(len(s), S, np.float32), f"{name}.act_dq_scale") if migrate else sc
        xin = self.node("DequantizeLinear", [t, dsc, zp], name=f"{name}/act_dq", axis=qaxis).output[0]
        if migrate:
            w = qz.migrate_weight(w, k)
        w_bits = np.asarray(w_bits)
        ws = qz.weight_scales(w, w_bits)
        codes = qz.quantize_weight(w, w_bits, ws)
        perm = np.concatenate([np.nonzero(w_bits == gb)[0] for gb in GROUP_ORDER])
        dq_outs = []
        for gb in GROUP_ORDER:
            idx = np.nonzero(w_bits == gb)[0]
            if not len(idx):
                continue
            dtype = TensorProto.INT8 if self.fmt == "int8-container" else WTYPE[gb]
            wn = self._t(codes[idx], f"{name}.weight.w{gb}", dtype,
                         {"cwhawq.bits": str(gb), "cwhawq.channels": json.dumps(idx.tolist())})
            sn = self._t(ws[idx], f"{name}.weight.w{gb}.scale")
            dq_outs.append(self.node("DequantizeLinear", [wn, sn], name=f"{name}/dq_w{gb}", axis=0).output[0])
        wt = dq_outs[0] if len(dq_outs) == 1 else self.node("Concat", dq_outs, name=f"{name}/concat_w",
                                                             axis=0).output[0]
        bn = self._t(b[perm].astype(np.float32), f"{name}.bias")
        if kind == "token":
            wtt = self.node("Transpose", [wt], name=f"{name}/w_t", perm=[1, 0]).output[0]
            core = self.node("MatMul", [xin, wtt], name=name)
        elif kind == "linear":
            core = self.node("Gemm", [xin, wt, bn], name=name, transB=1)
        else:
            core = self.node("Conv", [xin, wt, bn], name=name, **(conv_attrs or {}))
        meta = {"cwhawq.layer": name, "cwhawq.kind": kind, "cwhawq.w_bits": json.dumps(w_bits.tolist()),
                "cwhawq.perm": json.dumps(perm.tolist()), "cwhawq.a_bits": json.dumps(list(map(int, a_bits))),
                "cwhawq.a_signed": "true" if a_signed else "false", "cwhawq.a_scale_mode": "pow2",
                "cwhawq.a_base_scale": repr(float(S)), "cwhawq.a_exponents": json.dumps(k.tolist())}
        for kk, v in meta.items():
            e = core.metadata_props.add()
            e.key, e.value = kk, v
        out = core.output[0]
        if kind == "token":
            out = self.node("Add", [out, bn], name=f"{name}/bias").output[0]
        if not np.array_equal(perm, np.arange(len(perm))) and not perm_fold:
            inv = np.argsort(perm).astype(np.int64)
            ind = self._t(inv, f"{name}.inv_perm")
            out = self.node("Gather", [out, ind], name=f"{name}/unperm", axis=2 if kind == "token" else 1).output[0]
        return out

    def model(self, inputs, outputs, opset=25):
        g = helper.make_graph(self.nodes, "cwhawq_test", inputs, outputs, initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="cwhawq-test")
        m.ir_version = 11
        for k, v in {"cwhawq.version": "0.1.0", "cwhawq.format": self.fmt, "cwhawq.budget": "4.0",
                     "cwhawq.plan": json.dumps({"budget": 4.0, "method": "test"})}.items():
            e = m.metadata_props.add()
            e.key, e.value = k, v
        onnx.checker.check_model(m)
        return m


def _bits(rng, n, choices=(8, 4, 2)):
    b = np.array([choices[i % len(choices)] for i in range(n)])
    rng.shuffle(b)
    return b


def mixed_cnn(fmt: str = "qdq", batch="N", seed: int = 0, h: int = 9):
    """conv(3->20, signed acts) -> Relu -> conv(20->20, unsigned acts, Gather) + residual -> Relu
    -> depthwise(20, stride 2) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(20->10)."""
    bld = _Builder(fmt, seed)
    rng = bld.rng
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, h, h])
    w1 = rng.normal(size=(20, 3, 3, 3)).astype(np.float32) * 0.3
    t = bld.qlayer("conv1", "x", "conv", w1, rng.normal(size=20).astype(np.float32) * 0.1, _bits(rng, 20),
                   np.array([8, 4, 8]), True, np.array([2.5, 3.0, 1.0]), {"pads": [1, 1, 1, 1]})
    r1 = bld.node("Relu", [t], name="relu1").output[0]
    w2 = rng.normal(size=(20, 20, 3, 3)).astype(np.float32) * 0.1
    t = bld.qlayer("layer1.conv2", r1, "conv", w2, rng.normal(size=20).astype(np.float32) * 0.1,
                   _bits(rng, 20), _bits(rng, 20), False, rng.uniform(0.5, 4.0, 20), {"pads": [1, 1, 1, 1]})
    t = bld.node("Add", [t, r1], name="layer1.add").output[0]
    r2 = bld.node("Relu", [t], name="layer1.relu").output[0]
    w3 = rng.normal(size=(20, 1, 3, 3)).astype(np.float32) * 0.3
    t = bld.qlayer("dw", r2, "depthwise", w3, rng.normal(size=20).astype(np.float32) * 0.1, _bits(rng, 20),
                   _bits(rng, 20, (8, 4)), False, rng.uniform(0.5, 4.0, 20),
                   {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 20})
    r3 = bld.node("Relu", [t], name="dw.relu").output[0]
    p = bld.node("GlobalAveragePool", [r3], name="pool").output[0]
    f = bld.node("Flatten", [p], name="flatten", axis=1).output[0]
    w4 = rng.normal(size=(10, 20)).astype(np.float32) * 0.3
    bld.qlayer("fc", f, "linear", w4, rng.normal(size=10).astype(np.float32) * 0.1, _bits(rng, 10, (4, 2)),
               _bits(rng, 20, (8, 4)), False, rng.uniform(0.2, 2.0, 20))
    last = bld.nodes[-1].output[0]
    bld.nodes[-1].output[0] = "y"
    assert last
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])
    return bld.model([x], [y])


def tiny_transformer(seed: int = 0, t: int = 6, d: int = 8, heads: int = 2, mlp: int = 16,
                     per_token_layer: bool = False, migrate: bool = False):
    """A pre-LN transformer block on token inputs [N, T, D] in the exported format: LayerNorm,
    Q/K/V/out projections and a GELU (erf) MLP as quantized token Linears (MatMul + Add, per-feature
    activation quantizers on axis 2, mixed 8/4/2-bit weights), softmax attention in float, two
    residual Adds. ``per_token_layer`` adds a last Linear whose activation quantizer is per *token*
    (axis 1; with T == D it has as many scales as features). ``migrate``: the token Linears as
    ``export --act-scale migrate`` writes them."""
    bld = _Builder("qdq", seed)
    rng = bld.rng
    hd = d // heads

    def const(arr, name):
        return bld._t(np.asarray(arr, np.float32), name)

    def ln(x, name):
        g = const(1 + 0.1 * rng.normal(size=d), f"{name}.g")
        b = const(0.1 * rng.normal(size=d), f"{name}.b")
        return bld.node("LayerNormalization", [x, g, b], name=name, axis=-1, epsilon=1e-5).output[0]

    def lin(x, name, k, n):
        w = (rng.normal(size=(n, k)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.normal(size=n)).astype(np.float32)
        return bld.qlayer(name, x, "token", w, b, _bits(rng, n), np.full(k, 8), True,
                          rng.uniform(0.5, 4.0, size=k).astype(np.float32), migrate=migrate)

    def heads_of(x, name, perm):
        shp = bld._t(np.array([-1, t, heads, hd], np.int64), f"{name}.shape")
        r = bld.node("Reshape", [x, shp], name=f"{name}/split").output[0]
        return bld.node("Transpose", [r], name=f"{name}/heads", perm=perm).output[0]

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, d])
    h = ln("x", "ln1")
    q = heads_of(lin(h, "attn.q", d, d), "q", [0, 2, 1, 3])
    k = heads_of(lin(h, "attn.k", d, d), "k", [0, 2, 3, 1])
    v = heads_of(lin(h, "attn.v", d, d), "v", [0, 2, 1, 3])
    sc = bld.node("MatMul", [q, k], name="scores").output[0]
    sc = bld.node("Div", [sc, const(np.sqrt(hd), "sqrt_hd")], name="scale").output[0]
    a = bld.node("Softmax", [sc], name="softmax", axis=-1).output[0]
    o = bld.node("MatMul", [a, v], name="attend").output[0]
    o = bld.node("Transpose", [o], name="merge_t", perm=[0, 2, 1, 3]).output[0]
    o = bld.node("Reshape", [o, bld._t(np.array([-1, t, d], np.int64), "merge.shape")], name="merge").output[0]
    x1 = bld.node("Add", ["x", lin(o, "attn.out", d, d)], name="res1").output[0]
    f = lin(ln(x1, "ln2"), "mlp.fc1", d, mlp)
    e = bld.node("Erf", [bld.node("Div", [f, const(np.sqrt(2.0), "sqrt2")], name="gelu/div").output[0]],
                 name="gelu/erf").output[0]
    e = bld.node("Add", [e, const(1.0, "one")], name="gelu/add").output[0]
    g = bld.node("Mul", [bld.node("Mul", [f, e], name="gelu/mul").output[0], const(0.5, "half")],
                 name="gelu/half").output[0]
    y = bld.node("Add", [x1, lin(g, "mlp.fc2", mlp, d)], name="res2").output[0]
    if per_token_layer:
        w = (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
        y = bld.qlayer("per_token", y, "token", w, np.zeros(d, np.float32), _bits(rng, d), np.full(t, 8), True,
                       rng.uniform(0.5, 4.0, size=t).astype(np.float32), act_axis=1)
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", t, d])
    return bld.model([x], [out])


def fp32_cnn(batch="N", seed: int = 1):
    """A plain fp32 CNN of common operators (Conv, BatchNormalization, Relu, MaxPool, Add, Sigmoid,
    AveragePool, Gemm, MatMul, Softmax)."""
    rng = np.random.default_rng(seed)
    inits = []

    def t(arr, name):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    n = [
        helper.make_node("Conv", ["x", t(rng.normal(size=(12, 3, 3, 3)) * 0.3, "w1"), t(rng.normal(size=12), "b1")],
                         ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", t(rng.uniform(0.5, 1.5, 12), "g"), t(rng.normal(size=12), "be"),
                                                t(rng.normal(size=12) * 0.1, "mu"), t(rng.uniform(0.5, 1.5, 12), "var")],
                         ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", t(rng.normal(size=(12, 12, 3, 3)) * 0.1, "w2")], ["c2"], name="conv2",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a2"], name="add2"),
        helper.make_node("Sigmoid", ["a2"], ["s2"], name="sig2"),
        helper.make_node("AveragePool", ["s2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", t(rng.normal(size=(16, 48)) * 0.2, "w3"), t(rng.normal(size=16), "b3")],
                         ["g3"], name="fc1", transB=1),
        helper.make_node("MatMul", ["g3", t(rng.normal(size=(16, 5)) * 0.3, "w4")], ["m4"], name="fc2"),
        helper.make_node("Softmax", ["m4"], ["y"], name="softmax", axis=-1),
    ]
    g = helper.make_graph(n, "fp32", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def ort_run(model_or_path, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _close(y, ref, rel=2e-3):
    """Outputs agree up to float rounding (and a rare activation code flipped at a rounding tie)."""
    scale = float(np.abs(ref).max()) + 1e-6
    err = np.abs(y - ref)
    assert float(err.max()) <= rel * scale * 10, f"max abs err {err.max():.3g} vs scale {scale:.3g}"
    assert float(np.mean(err > rel * scale)) < 0.01, f"{np.mean(err > rel * scale):.2%} elements off"


# ===================================================================================== fixtures
@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("tvm_backend")


@pytest.fixture(scope="module")
def backend():
    from cwhawq.backends import tvm as btvm

    return btvm


# ===================================================================================== tests
@pytest.mark.parametrize("fmt", ["qdq", "int8-container"])
def test_mixed_plan_matches_onnxruntime(tmp, backend, fmt):
    m = mixed_cnn(fmt)
    path = tmp / f"mixed_{fmt}.onnx"
    onnx.save(m, str(path))
    res = backend.compile_model(path, "llvm", tmp / f"mixed_{fmt}.so")
    lowered = {s["layer"]: s for s in res.report["lowered"]}
    assert set(lowered) == {"conv1", "layer1.conv2", "dw", "fc"}
    assert all(s["mode"] == "int" for s in lowered.values())
    assert lowered["layer1.conv2"]["fused"] == ["add", "relu"]
    assert lowered["conv1"]["w_bits"] == {"8": 7, "4": 7, "2": 6}
    assert res.report["fallback_to_tvm_fp32"] == []
    art = backend.load_artifact(res.artifact)
    rng = np.random.default_rng(5)
    for nb in (1, 3):  # the batch stays symbolic
        x = rng.normal(size=(nb, 3, 9, 9)).astype(np.float32) * 1.5
        (y,) = art.run({"x": x})
        (ref,) = ort_run(m, {"x": x})
        _close(y, ref)
    # far outside the calibrated ranges (every quantizer saturates), all zero, all at a large
    # value, negative: the kernels clip exactly as QuantizeLinear does
    for x in (rng.normal(size=(3, 3, 9, 9)).astype(np.float32) * 100, np.zeros((2, 3, 9, 9), np.float32),
              np.full((2, 3, 9, 9), 1e4, np.float32), -np.abs(rng.normal(size=(2, 3, 9, 9))).astype(np.float32) * 30):
        (y,) = art.run({"x": x})
        (ref,) = ort_run(m, {"x": x})
        _close(y, ref)


def test_every_activation_path_exact_on_saturating_inputs(tmp, backend):
    """One layer per output (no requantization between layers, so no rounding ties can cascade):
    every kernel path this CPU has, against onnxruntime, on inputs far outside the calibrated
    ranges, zero, large and negative; each output within float rounding of onnxruntime's."""
    bld = _Builder("qdq", 11)
    rng = bld.rng
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 6, 6])
    outs = []

    def conv(name, bits, a_bits, signed, ranges, kind="conv", attrs=None):
        cout = 16 if kind == "depthwise" else 24
        w = rng.normal(size=(cout, 1 if kind == "depthwise" else 16, 3, 3)).astype(np.float32) * 0.2
        t = bld.qlayer(name, "x", kind, w, rng.normal(size=cout).astype(np.float32) * 0.1, bits, a_bits, signed,
                       ranges, attrs or {"pads": [1, 1, 1, 1]})
        outs.append((t, cout))

    spread = rng.uniform(0.3, 6.0, 16)           # pow2 exponents 0..4: int16 / exponent classes
    flat = np.full(16, 2.0)                      # one scale: one plain digit
    conv("w8_pow2_unsigned", np.full(24, 8), np.full(16, 8), False, spread)            # i16
    conv("w4_pow2_unsigned", np.full(24, 4), np.full(16, 8), False, spread)            # u8 exponent classes / i16
    conv("w4_flat_unsigned", np.full(24, 4), np.full(16, 8), False, flat)              # u8 one digit
    conv("w8_flat_signed", np.full(24, 8), np.full(16, 8), True, flat)                 # signed
    conv("mixed_bits_mixed_acts", _bits(rng, 24), _bits(rng, 16, (8, 4, 2)), False, spread)
    conv("depthwise", _bits(rng, 16), np.full(16, 8), False, spread, "depthwise",
         {"pads": [1, 1, 1, 1], "group": 16})
    flat_in = bld.node("Flatten", ["x"], name="flat_in", axis=1).output[0]
    w = rng.normal(size=(10, 576)).astype(np.float32) * 0.05
    t = bld.qlayer("linear", flat_in, "linear", w, np.zeros(10, np.float32), _bits(rng, 10, (4, 2)),
                   np.full(576, 8), True, np.full(576, 3.0))
    outs.append((t, 10))
    graph_outs = []
    for i, (t, c) in enumerate(outs):
        bld.nodes[[n.output[0] for n in bld.nodes].index(t)].output[0] = f"y{i}"
        shape = ["N", c] if c == 10 else ["N", c, 6, 6]
        graph_outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, shape))
    m = bld.model([x], graph_outs)
    p = tmp / "paths.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "llvm", tmp / "paths.so")
    assert len(res.report["lowered"]) == 7 and all(s["mode"] == "int" for s in res.report["lowered"])
    art = backend.load_artifact(res.artifact)
    for xin in (rng.normal(size=(2, 16, 6, 6)).astype(np.float32) * 200, np.zeros((1, 16, 6, 6), np.float32),
                np.full((1, 16, 6, 6), 1e5, np.float32), -np.abs(rng.normal(size=(2, 16, 6, 6)).astype(np.float32)) * 90,
                rng.normal(size=(2, 16, 6, 6)).astype(np.float32)):
        ys = art.run({"x": xin})
        refs = ort_run(m, {"x": xin})
        for (name, _), y, ref in zip([(o, None) for o in range(len(outs))], ys, refs):
            scale = float(np.abs(ref).max()) + 1e-6
            assert float(np.abs(y - ref).max()) <= 1e-5 * scale, (name, float(np.abs(y - ref).max()), scale)


@pytest.mark.parametrize("quantized", [True, False], ids=["w8a8", "fp32"])
def test_clip_fuses_into_the_layer(tmp, backend, quantized):
    """ReLU6-style Clip(0, hi) and Clip(-, hi) after a layer run in its epilogue (no separate
    maximum/minimum passes), on inputs far outside the calibrated range."""
    bld = _Builder("qdq", 5)
    rng = bld.rng
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])
    lo6 = bld._t(np.float32(0.0), "lo6")
    hi6 = bld._t(np.float32(6.0), "hi6")
    hi2 = bld._t(np.float32(1.5), "hi2")
    w1 = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(16, 16, 1, 1)).astype(np.float32) * 0.3
    b = rng.normal(size=16).astype(np.float32) * 0.1
    if quantized:
        t = bld.qlayer("conv1", "x", "conv", w1, b, np.full(16, 8), np.full(8, 8), True, np.full(8, 3.0),
                       {"pads": [1, 1, 1, 1]})
    else:
        t = bld.node("Conv", ["x", bld._t(w1, "w1"), bld._t(b, "b1")], name="conv1", pads=[1, 1, 1, 1]).output[0]
    bld.node("Clip", [t, lo6, hi6], ["y0"], name="relu6")
    if quantized:
        t = bld.qlayer("conv2", "y0", "conv", w2, b, _bits(rng, 16), np.full(16, 8), False, rng.uniform(1, 6, 16))
    else:
        t = bld.node("Conv", ["y0", bld._t(w2, "w2"), bld._t(b, "b2")], name="conv2").output[0]
    bld.node("Clip", [t, "", hi2], ["y1"], name="clip_hi")
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16, 6, 6]) for n in ("y0", "y1")]
    m = bld.model([x], outs)
    p = tmp / f"clip_{quantized}.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "llvm", tmp / f"clip_{quantized}.so")
    fused = [set(s["fused"]) for s in res.report["lowered"]]
    assert fused == [{"relu", "clip<=6"}, {"clip<=1.5"}], fused
    art = backend.load_artifact(res.artifact)
    for xin in (rng.normal(size=(2, 8, 6, 6)).astype(np.float32), rng.normal(size=(1, 8, 6, 6)).astype(np.float32) * 100):
        ys, refs = art.run({"x": xin}), ort_run(m, {"x": xin})
        # fp32: the two reductions add in different orders (terms of up to ~100 here)
        assert float(np.abs(ys[0] - refs[0]).max()) <= (1e-5 if quantized else 2e-6 * float(np.abs(xin).max())) * 6
        _close(ys[1], refs[1], rel=1e-3 if quantized else 1e-5)


@pytest.mark.parametrize("fmt", ["qdq", "int8-container"])
def test_migrated_exponents_run_one_digit(tmp, backend, fmt):
    """``--act-scale migrate`` graphs (QuantizeLinear at S 2^k_c, DequantizeLinear at S, weights
    quantized as w * 2^k_c): every 8-bit activation is one 8-bit digit, no exponent classes, and the
    compiled model equals onnxruntime, also on inputs far outside the calibrated range; a fused
    producer writes its migrated consumer's operand, mixed weight bits, signed and unsigned inputs,
    a depthwise consumer (not migrated) and a dense head."""
    m = _migrate_net(fmt, True)
    p = tmp / f"migrate_{fmt}.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "llvm", tmp / f"migrate_{fmt}.so")
    low = {s["layer"]: s for s in res.report["lowered"]}
    assert set(low) == {"conv1", "conv2", "dw", "fc"}, res.report.get("fallbacks")
    for name in ("conv1", "conv2", "fc"):
        assert low[name]["mode"] == "int" and low[name]["kernel"]["exponent_classes"] is None, low[name]
        assert low[name]["act"]["digits"] == 1, low[name]
    from cwhawq.backends.cli_commands import compile_text

    assert "--act-scale migrate" not in compile_text(res)
    rng = np.random.default_rng(12)
    art = backend.load_artifact(res.artifact)
    for xin in (rng.normal(size=(2, 8, 6, 6)).astype(np.float32) * 5, rng.normal(size=(1, 8, 6, 6)).astype(np.float32) * 500,
                np.zeros((1, 8, 6, 6), np.float32)):
        _close(art.run({"x": xin})[0], ort_run(m, {"x": xin})[0], rel=1e-3)
    if fmt == "qdq":   # the same graph with pow2 scales: wide operands, and compile says what would help
        p2 = tmp / "migrate_twin_pow2.onnx"
        onnx.save(_migrate_net(fmt, False), str(p2))
        res2 = backend.compile_model(p2, "llvm", tmp / "migrate_twin_pow2.so")
        assert "--act-scale migrate" in compile_text(res2)
    if fmt == "qdq" and platform.machine() in ("x86_64", "AMD64"):
        # the AVX2 build: 8-bit codes stay on vpmaddwd and compile says what 7 bits would buy;
        # with 7-bit codes every layer takes vpmaddubsw (u8 operand); both exact on every input
        avx2 = json.dumps({"kind": "llvm", "mcpu": "haswell"})
        for choices, note in (((8, 4, 2), True), ((7, 4, 2), False)):
            m3 = _migrate_net(fmt, True, choices)
            p3 = tmp / f"migrate_avx2_{choices[0]}.onnx"
            onnx.save(m3, str(p3))
            res3 = backend.compile_model(p3, avx2, tmp / f"migrate_avx2_{choices[0]}.so")
            low3 = {s["layer"]: s for s in res3.report["lowered"]}
            for name in ("conv1", "conv2", "fc"):
                assert low3[name]["kernel"]["kernel"] == (["Avx2I16"] if note else ["Avx2U8"]), low3[name]
            assert ("7-bit weights" in compile_text(res3)) == note
            art3 = backend.load_artifact(res3.artifact)
            for xin in (rng.normal(size=(2, 8, 6, 6)).astype(np.float32) * 5,
                        rng.normal(size=(1, 8, 6, 6)).astype(np.float32) * 500):
                _close(art3.run({"x": xin})[0], ort_run(m3, {"x": xin})[0], rel=1e-3)


def _migrate_net(fmt, migrate, choices=(8, 4, 2)):
    """conv (signed input) -> relu -> 1x1 conv -> relu -> depthwise -> pool -> Gemm; activation
    ranges that span several pow2 exponents; ``migrate`` as the exporter writes it."""
    bld = _Builder(fmt, 11)
    rng = bld.rng
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])
    wide = rng.uniform(0.2, 40.0, 8)        # 8 channels spanning several exponents
    w1 = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * 0.1
    t = bld.qlayer("conv1", "x", "conv", w1, rng.normal(size=16).astype(np.float32) * 0.1, _bits(rng, 16, choices),
                   np.full(8, 8), True, wide, {"pads": [1, 1, 1, 1]}, migrate=migrate)
    t = bld.node("Relu", [t], name="relu1").output[0]
    w2 = rng.normal(size=(24, 16, 1, 1)).astype(np.float32) * 0.2
    t = bld.qlayer("conv2", t, "conv", w2, rng.normal(size=24).astype(np.float32) * 0.1, _bits(rng, 24, choices),
                   np.full(16, 8), False, rng.uniform(0.5, 30.0, 16), migrate=migrate)
    t = bld.node("Relu", [t], name="relu2").output[0]
    wd = rng.normal(size=(24, 1, 3, 3)).astype(np.float32) * 0.3
    t = bld.qlayer("dw", t, "conv", wd, rng.normal(size=24).astype(np.float32) * 0.1, np.full(24, 8),
                   np.full(24, 8), False, rng.uniform(0.5, 30.0, 24), {"pads": [1, 1, 1, 1], "group": 24})
    t = bld.node("GlobalAveragePool", [t], name="gap").output[0]
    t = bld.node("Flatten", [t], name="flat").output[0]
    wf = rng.normal(size=(10, 24)).astype(np.float32) * 0.3
    bld.qlayer("fc", t, "linear", wf, rng.normal(size=10).astype(np.float32) * 0.1, _bits(rng, 10, choices),
               np.full(24, 8), True, rng.uniform(0.5, 20.0, 24), migrate=migrate)
    y = helper.make_tensor_value_info(bld.nodes[-1].output[0], TensorProto.FLOAT, ["N", 10])
    return bld.model([x], [y])


TOKEN_LAYERS = {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2"}


def _transformer_inputs(rng, t, d):
    """Batches 1 and 3, and inputs far outside the calibrated ranges (x100), zero, large, negative."""
    return [rng.normal(size=(1, t, d)).astype(np.float32), rng.normal(size=(3, t, d)).astype(np.float32),
            rng.normal(size=(2, t, d)).astype(np.float32) * 100, np.zeros((2, t, d), np.float32),
            np.full((1, t, d), 1e4, np.float32), -np.abs(rng.normal(size=(2, t, d))).astype(np.float32) * 30]


@pytest.mark.parametrize("migrate", [False, True], ids=["pow2", "migrate"])
def test_transformer_block_matches_onnxruntime(tmp, backend, migrate):
    """Token Linears (MatMul + bias Add on [N, T, D]) on the packed integer kernels with M = N x T
    rows, the residual Adds fused; LayerNorm, softmax, the attention matmuls and GELU on our CPU
    schedules; compiled = onnxruntime within 1e-3 relative on every input (also with the exponents
    migrated into the weights: then one 8-bit digit per activation)."""
    t, d = 6, 8
    m = tiny_transformer(3, t=t, d=d, migrate=migrate)
    path = tmp / f"tiny_transformer_{migrate}.onnx"
    onnx.save(m, str(path))
    res = backend.compile_model(path, "llvm", tmp / f"tiny_transformer_{migrate}.so")
    lowered = {s["layer"]: s for s in res.report["lowered"]}
    assert set(lowered) == TOKEN_LAYERS
    for s in lowered.values():
        assert s["mode"] == "int" and s["act"]["integer"], s
        if migrate:
            assert s["act"]["digits"] == 1 and s["kernel"]["exponent_classes"] is None, s
    assert lowered["attn.out"]["fused"] == ["add"] and lowered["mlp.fc2"]["fused"] == ["add"]
    assert res.report["fallback_to_tvm_fp32"] == [  # only the attention's activation x activation products
        {"node": n, "op": "MatMul", "reason": "weights are not constant (or not a per-channel DequantizeLinear "
         "of constants)"} for n in ("scores", "attend")]
    assert res.report["schedule_fallbacks"] == []
    rewritten = backend.onnx_import.analyze(m).model
    left = {n.op_type for n in rewritten.graph.node}
    assert "Gather" not in left and "QuantizeLinear" not in left  # channel order and quantizers absorbed
    art = backend.load_artifact(res.artifact)
    for x in _transformer_inputs(np.random.default_rng(4), t, d):
        (y,) = art.run({"x": x})
        (ref,) = ort_run(m, {"x": x})
        _close(y, ref, rel=1e-3)


def test_transformer_activation_axis_is_rank_aware(tmp, backend):
    """T == D: a per-token activation quantizer (axis 1 of [N, T, D]) has as many scales as there are
    features but is not per feature; it must not be absorbed as one (the layer keeps it in front,
    in float), and the result still equals onnxruntime's."""
    t = d = 8
    m = tiny_transformer(5, t=t, d=d, per_token_layer=True)
    path = tmp / "tiny_transformer_tk.onnx"
    onnx.save(m, str(path))
    res = backend.compile_model(path, "llvm", tmp / "tiny_transformer_tk.so")
    lowered = {s["layer"]: s for s in res.report["lowered"]}
    assert set(lowered) == TOKEN_LAYERS | {"per_token"}
    assert lowered["per_token"]["act"] is None  # its quantizer stays a graph operator
    assert all(lowered[n]["act"]["integer"] for n in TOKEN_LAYERS)
    art = backend.load_artifact(res.artifact)
    for x in _transformer_inputs(np.random.default_rng(6), t, d)[:3]:
        (y,) = art.run({"x": x})
        (ref,) = ort_run(m, {"x": x})
        _close(y, ref, rel=1e-3)


def test_packed_size_follows_bits(tmp, backend):
    """The same network at lower bits gives a smaller artifact (weights stored packed)."""
    rng = np.random.default_rng(0)
    sizes = {}
    for bits in (8, 2):
        bld = _Builder("qdq", 0)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])
        w = rng.normal(size=(512, 256)).astype(np.float32)
        bld.qlayer("fc", "x", "linear", w, np.zeros(512, np.float32), np.full(512, bits), np.full(256, 8),
                   True, np.full(256, 2.0))
        bld.nodes[-1].output[0] = "y"
        m = bld.model([x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])])
        p = tmp / f"fc{bits}.onnx"
        onnx.save(m, str(p))
        res = backend.compile_model(p, "llvm", tmp / f"fc{bits}.so")
        assert res.report["packed_bytes"] == 512 * 256 * bits // 8
        sizes[bits] = res.artifact.stat().st_size
        xin = rng.normal(size=(1, 256)).astype(np.float32)
        _close(backend.run_artifact(res.artifact, {"x": xin})[0], ort_run(m, {"x": xin})[0])
    assert sizes[8] - sizes[2] >= 0.9 * 512 * 256 * 6 // 8


@pytest.mark.parametrize("kernels", [True, False])
def test_fp32_model_matches_onnxruntime(tmp, backend, kernels):
    m = fp32_cnn()
    p = tmp / "fp32.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "llvm", tmp / f"fp32_{kernels}.so", kernels=kernels)
    modes = {s["mode"] for s in res.report["lowered"]}
    assert modes == ({"fp32"} if kernels else set())
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _close(backend.run_artifact(res.artifact, {"x": x})[0], ort_run(m, {"x": x})[0], rel=1e-4)


def test_onnxruntime_int8_qdq_model(tmp, backend):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    m = fp32_cnn(batch=1)
    fp = tmp / "fp32_b1.onnx"
    onnx.save(m, str(fp))
    rng = np.random.default_rng(3)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    qp = tmp / "int8_qdq.onnx"
    quantize_static(str(fp), str(qp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    res = backend.compile_model(qp, "llvm", tmp / "int8_qdq.so")
    lowered = res.report["lowered"]
    assert len(lowered) == 4 and all(s["mode"] == "int" for s in lowered)
    assert all(s["storage_bits"] == [8] or s["storage_bits"][0] <= 8 for s in lowered)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    _close(backend.run_artifact(res.artifact, {"x": x})[0], ort_run(qp, {"x": x})[0], rel=5e-3)
    # saturating inputs: every layer's output is requantized, so a value within float rounding of a
    # quantization tie may land one step apart and move the next layers by a step or two (the
    # single-layer tests below show each kernel path itself exact); nothing differs by more
    qm = onnx.load(str(qp))
    out_dq = next(n for n in qm.graph.node if n.output[0] == qm.graph.output[0].name)
    step = float(numpy_helper.to_array(next(t for t in qm.graph.initializer if t.name == out_dq.input[1])))
    for x in (rng.normal(size=(1, 3, 8, 8)).astype(np.float32) * 50, np.zeros((1, 3, 8, 8), np.float32),
              -np.full((1, 3, 8, 8), 7.0, np.float32), np.full((1, 3, 8, 8), 1e4, np.float32)):
        err = np.abs(backend.run_artifact(res.artifact, {"x": x})[0] - ort_run(qp, {"x": x})[0])
        assert float(err.max()) <= 3 * step * 1.001, (float(err.max()), step)


def test_manifest_and_fixed_batch(tmp, backend):
    m = mixed_cnn("qdq", seed=4)
    p = tmp / "mixed_b.onnx"
    onnx.save(m, str(p))
    sym = backend.compile_model(p, "llvm", tmp / "sym.so")
    man = json.loads(backend.manifest_path(sym.artifact).read_text())
    assert man["inputs"] == [{"name": "x", "shape": ["N", 3, 9, 9], "dtype": "float32"}]
    assert man["outputs"][0]["name"] == "y" and man["outputs"][0]["shape"][1:] == [10]
    assert isinstance(man["outputs"][0]["shape"][0], str)
    assert man["tool"]["name"] == "cwhawq" and man["tool"]["version"]
    from cwhawq.kernels.isa import names
    assert man["target"]["name"] == "llvm" and man["target"]["isa"] in names()
    assert man["plan"]["format"] == "qdq" and man["plan"]["plan_budget"] == 4.0
    assert len(man["sha256"]) == 64 and man["size_bytes"] == sym.artifact.stat().st_size
    fixed = backend.compile_model(p, "llvm", tmp / "fixed.so", batch=2)
    fman = json.loads(backend.manifest_path(fixed.artifact).read_text())
    assert fman["inputs"][0]["shape"] == [2, 3, 9, 9]
    art = backend.load_artifact(fixed.artifact)
    from cwhawq.backends.tvm import RunError

    with pytest.raises(RunError):
        art.run({"x": np.zeros((3, 3, 9, 9), np.float32)})
    # a modified artifact is refused
    bad = tmp / "tampered.so"
    shutil.copy(fixed.artifact, bad)
    shutil.copy(backend.manifest_path(fixed.artifact), backend.manifest_path(bad))
    with open(bad, "ab") as f:
        f.write(b"x")
    with pytest.raises(RunError):
        backend.load_artifact(bad)


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_one_line_errors(tmp, backend):
    m = mixed_cnn("qdq", seed=6)
    good = tmp / "good.onnx"
    onnx.save(m, str(good))
    data = good.read_bytes()
    trunc = tmp / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompileError, match="corrupt or truncated|not a valid ONNX"):
        backend.compile_model(trunc, "llvm", tmp / "trunc.so")
    assert not (tmp / "trunc.so").exists()
    with pytest.raises(CompileError, match="unknown target 'nosuchboard'"):
        backend.compile_model(good, "nosuchboard", tmp / "x.so")
    with pytest.raises(CompileError, match="invalid TVM target"):
        backend.compile_model(good, '{"kind": "nosuchkind"}', tmp / "x.so")
    # an operator TVM cannot import, named with its node
    g = helper.make_graph([helper.make_node("Celu", ["x"], ["y"], name="odd_celu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    bad = tmp / "celu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    with pytest.raises(CompileError, match=r"unsupported ONNX operator: Celu \(node 'odd_celu'\)"):
        backend.compile_model(bad, "llvm", tmp / "celu.so")
    assert not (tmp / "celu.so").exists() and not (tmp / "celu.manifest.json").exists()
    assert not list(tmp.glob(".cwhawq-*"))


def test_missing_cross_compiler(tmp, backend, monkeypatch):
    from cwhawq.backends import targets

    p = tmp / "cc.onnx"
    onnx.save(fp32_cnn(batch=1), str(p))
    real_which = shutil.which
    monkeypatch.setattr(targets.shutil, "which",
                        lambda name, *a, **k: None if name == targets.AARCH64_CXX else real_which(name, *a, **k))
    with pytest.raises(CompileError, match="cross compiler aarch64-linux-gnu-g\\+\\+ not found"):
        backend.compile_model(p, "aarch64", tmp / "cc.so")
    assert not (tmp / "cc.so").exists()


def test_targets_resolve():
    from cwhawq.backends.targets import resolve_target

    assert resolve_target("llvm").kind == "llvm"
    t = resolve_target("jetson-orin")
    assert t.config["arch"] == "sm_87" and t.config["host"]["mtriple"].startswith("aarch64")
    assert resolve_target("cuda", arch="sm_90").config["arch"] == "sm_90"
    assert resolve_target("raspberry-pi-4").config["mcpu"] == "cortex-a72"
    assert resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}').is_cross or os.uname().machine == "aarch64"
    with pytest.raises(CompileError):
        resolve_target("cuda", arch="80")
    with pytest.raises(CompileError):
        resolve_target("llvm", arch="sm_80")


# ------------------------------------------------------------------------------------ other targets
def _aarch64_missing(what: str):
    """`make install` provides the aarch64 tools; without them the aarch64 tests fail, unless
    CWHAWQ_SKIP_AARCH64=1 says this machine goes without (then they skip)."""
    if os.environ.get("CWHAWQ_SKIP_AARCH64") == "1":
        pytest.skip(f"CWHAWQ_SKIP_AARCH64=1 and {what} missing")
    pytest.fail(f"{what} missing: run `make install` (as root for the Debian packages) or set "
                "CWHAWQ_SKIP_AARCH64=1 to skip the aarch64 tests", pytrace=False)


def test_aarch64_cross_compile(tmp, backend):
    from cwhawq.backends.native import REQUIRED_LIBS, runtime_dir, runtime_ready

    if shutil.which("aarch64-linux-gnu-g++") is None:
        _aarch64_missing("the aarch64 cross compiler (Debian g++-aarch64-linux-gnu)")
    m = mixed_cnn("qdq", seed=7)
    p = tmp / "arm.onnx"
    onnx.save(m, str(p))
    for tgt in ("aarch64", "aarch64-dotprod"):
        res = backend.compile_model(p, tgt, tmp / f"{tgt}.so")
        head = res.artifact.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and head[18] == 183  # EM_AARCH64
        assert res.manifest["target"]["isa"] == ("arm_dot" if tgt.endswith("dotprod") else "arm_neon")
        out = subprocess.run(["file", str(res.artifact)], capture_output=True, text=True).stdout \
            if shutil.which("file") else "ARM aarch64"
        assert "aarch64" in out or "ARM" in out
    tar = backend.compile_model(p, "raspberry-pi-4", tmp / "rpi.tar")
    import tarfile

    with tarfile.open(tar.artifact) as tf:
        assert any(n.endswith(".o") for n in tf.getnames())
    # run both ARM artifacts under qemu-user with the native runner and aarch64 TVM runtime libraries
    if shutil.which("qemu-aarch64") is None:
        _aarch64_missing("qemu-aarch64 (Debian qemu-user)")
    rt = runtime_dir("aarch64")
    given = "CWHAWQ_AARCH64_TVM_RUNTIME" in os.environ  # libraries placed by hand: no versions.json needed
    if not (runtime_ready(rt) or (given and all((rt / lib).is_file() for lib in REQUIRED_LIBS))):
        _aarch64_missing(f"the aarch64 TVM runtime libraries ({', '.join(REQUIRED_LIBS)} of the installed "
                         f"TVM versions in {rt}, $CWHAWQ_AARCH64_TVM_RUNTIME; tools/fetch_tvm_runtime.py)")
    from cwhawq.backends.native import build_runner

    runner = build_runner(tmp / "cwhawq_run_arm64", [str(rt)], cxx="aarch64-linux-gnu-g++")
    x = np.random.default_rng(12).normal(size=(2, 3, 9, 9)).astype(np.float32)
    x.tofile(tmp / "xa.bin")
    (ref,) = ort_run(m, {"x": x})
    for tgt in ("aarch64", "aarch64-dotprod"):
        r = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max", str(runner),
                            str(tmp / f"{tgt}.so"), "cpu", str(tmp / f"ya_{tgt}.bin"), str(tmp / "xa.bin"), "2x3x9x9"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.splitlines()[0]) == [[2, 10]]
        _close(np.fromfile(tmp / f"ya_{tgt}.bin", np.float32).reshape(ref.shape), ref)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_native_runner_matches_python(tmp, backend):
    """The Python-free runner (C++ over TVM's runtime libraries) gives the same outputs."""
    from cwhawq.backends.native import build_runner

    m = mixed_cnn("qdq", seed=13)
    p = tmp / "native.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "llvm", tmp / "native.so")
    runner = build_runner(tmp / "cwhawq_run")
    x = np.random.default_rng(14).normal(size=(3, 3, 9, 9)).astype(np.float32)
    x.tofile(tmp / "xn.bin")
    r = subprocess.run([str(runner), str(res.artifact), "cpu", str(tmp / "yn.bin"), str(tmp / "xn.bin"), "3x3x9x9",
                        "--repeat", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "median_ms" in r.stdout
    y = np.fromfile(tmp / "yn.bin", np.float32).reshape(3, 10)
    np.testing.assert_array_equal(y, backend.run_artifact(res.artifact, {"x": x})[0])


def test_cuda_export_without_gpu(tmp, backend):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    m = mixed_cnn("qdq", seed=8)
    p = tmp / "gpu.onnx"
    onnx.save(m, str(p))
    res = backend.compile_model(p, "cuda", tmp / "gpu.so", arch="sm_80")
    blob = res.artifact.read_bytes()
    assert b"__global__" not in blob  # a GPU binary, not CUDA source
    assert b"sm_80" in blob
    assert res.manifest["target"]["device"] == "cuda"
    from cwhawq.backends.targets import has_cuda_driver

    if has_cuda_driver():
        import tvm

        if tvm.cuda(0).exist:
            x = np.random.default_rng(9).normal(size=(2, 3, 9, 9)).astype(np.float32)
            _close(backend.run_artifact(res.artifact, {"x": x})[0], ort_run(m, {"x": x})[0])


# ------------------------------------------------------------------------------------ CLI
def test_cli_compile_and_run(tmp):
    m = mixed_cnn("qdq", seed=10)
    p = tmp / "cli.onnx"
    onnx.save(m, str(p))
    env = dict(os.environ)
    exe = [sys.executable, "-m", "cwhawq.cli"]
    r = subprocess.run(exe + ["compile", str(p), "--target", "llvm", "--out", str(tmp / "cli.so")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "layer1.conv2" in r.stdout and "packed" in r.stdout
    x = np.random.default_rng(11).normal(size=(2, 3, 9, 9)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    r = subprocess.run(exe + ["run", str(tmp / "cli.so"), "--input", str(tmp / "x.npy"), "--out",
                              str(tmp / "y.npy")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    _close(np.load(tmp / "y.npy"), ort_run(m, {"x": x})[0])
    r = subprocess.run(exe + ["compile", str(p), "--target", "nosuch", "--out", str(tmp / "no.so")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "unknown target" in r.stderr
    assert not (tmp / "no.so").exists()
