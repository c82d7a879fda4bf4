"""Export a model under a bit plan to standard ONNX (docs/onnx-format.md is the contract, docs/export.md
the user guide).

The float graph (normalisation, ReLU, adds, pooling, flatten, ...) comes from torch's own ONNX exporter
(``torch.onnx.export(dynamo=True)``) run on the canonical QModel with every quantization hook removed.
Each quantized layer's Conv/Gemm/MatMul node is then found by its weight initializer and replaced by:

    [Gather L/perm_in]  (depthwise only: its input channels follow its output permutation)
    Max L/act_max -> Min L/act_min -> QuantizeLinear L/act_q -> DequantizeLinear L/act_dq
    DequantizeLinear L/dq_w{b} per bit group -> Concat L/concat_w
    Conv|Gemm L  (output channels permuted so that equal bits are contiguous, descending), or for a
    Linear on a rank-r input (r >= 3; torch writes MatMul + Add):
        Transpose L/w_t (of the [out, in] weight) -> MatMul L -> [Add L/bias_add]
    [Gather L/unperm]   (restores the original channel order unless folded, see below)

The activation quantizer's axis is the layer's input-channel axis at the input's rank: 1 for Conv and
Gemm, r - 1 (the features) for MatMul. With ``--act-scale migrate`` the DequantizeLinear's scale is the
layer's base scale S for every channel (``L.act.dq_scale``) while the QuantizeLinear keeps S 2^k_c: the
exponents are in the weight codes (which quantize w * 2^k_c, see :mod:`cwhawq.quantizers`).

Undoing the permutation costs nothing when the layer's output reaches exactly one quantized layer
through channel-wise operators (ReLU, pooling, flatten, per-channel constant Add/Mul, BatchNorm, ...):
the consumer's input channels (weights, activation quantizer, or a depthwise consumer's input Gather)
and the constants on the way are permuted instead. Otherwise (residual adds, graph outputs, several
readers) a Gather restores the order.

Every number comes from the PyTorch simulation of the same plan (:mod:`cwhawq.quantize`): the weight
codes, weight scales, folded biases and calibrated activation scales are written as they are, so that
onnxruntime computes the simulation up to float summation order (measured in docs/export.md).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .checks import (check_labels, check_outputs, check_plan_model, data_file, load_sensitivity, model_classes,
                     require_data)
from .data import load as load_data
from .errors import CwhawqError, ExportError
from .evaluate import check_input_shape, predict
from .graph import qmodel_from_loaded
from .io import atomic_path
from .models import LoadedModel, load_model
from .onnx_graph import OnnxGraph, prune
from .onnx_graph import attrs as onnx_attrs
from .plan import load_plan
from .simulate import calibration_set, rounding_config, rounding_summary, simulate_plan

FORMATS = ("qdq", "int8-container")
MIN_OPSET = 17          # int8-container and 8/6-bit-only plans (per-axis Q/DQ exists since 13)
OPSET_INT4 = 21         # INT4 / UINT4 tensors and DequantizeLinear inputs
OPSET_INT2 = 25         # INT2 / UINT2
MAX_OPSET = 25          # the newest opset torch's exporter emits natively (and onnxruntime 1.32 runs)
MIN_IR_VERSION = 10     # metadata_props on nodes and initializers

_INT2 = getattr(TensorProto, "INT2", None)  # onnx >= 1.20
_STORAGE = {8: TensorProto.INT8, 7: TensorProto.INT8, 6: TensorProto.INT8, 4: TensorProto.INT4, 3: TensorProto.INT4, 2: _INT2}
_TYPE_OPSET = {TensorProto.INT8: MIN_OPSET, TensorProto.INT4: OPSET_INT4, _INT2: OPSET_INT2}

# operators that act on each channel independently (data input first, any other input a constant)
_UNARY_CHANNELWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
                      "Selu", "Celu", "Gelu", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Abs",
                      "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf",
                      "Cast", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                      "GlobalLpPool"}
_BINARY_CONST = {"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Pow"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}


# ===================================================================================== helpers
def storage_type(bits: int, fmt: str = "qdq") -> int:
    """ONNX element type holding the codes of a ``bits``-bit weight group in format ``fmt``."""
    if fmt == "int8-container":
        return TensorProto.INT8
    t = _STORAGE.get(int(bits))
    if t is None:
        if int(bits) == 2:
            raise ExportError(f"onnx {onnx.__version__} has no INT2 type (onnx 1.20+); use --format int8-container")
        raise ExportError(f"no ONNX container for {bits}-bit weights (bit-widths: {sorted(_STORAGE)})")
    return t


def required_opset(plan, fmt: str = "qdq") -> int:
    """The lowest opset that holds the plan's weight bits in format ``fmt``."""
    bits = {int(b) for lp in plan.layers for b in lp.w_bits}
    return max([MIN_OPSET] + [_TYPE_OPSET[storage_type(b, fmt)] for b in bits])


def _check_opset(plan, fmt: str, opset: int | None) -> int:
    need = required_opset(plan, fmt)
    if opset is None:
        return need
    opset = int(opset)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
    if opset < need:
        bits = sorted({int(b) for lp in plan.layers for b in lp.w_bits
                       if _TYPE_OPSET[storage_type(b, fmt)] > opset})
        typ = "INT2" if need >= OPSET_INT2 else "INT4"
        raise ExportError(f"opset {opset} is too low for the plan's {'/'.join(map(str, bits))}-bit weights: "
                          f"{typ} needs opset {need} (use --opset {need}, or --format int8-container for "
                          f"opset {MIN_OPSET}+)")
    return opset


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _set_meta(proto, items: dict) -> None:
    for k, v in items.items():
        e = proto.metadata_props.add()
        e.key = k
        e.value = v if isinstance(v, str) else json.dumps(v)


def _jlist(a) -> str:
    return json.dumps([int(v) for v in np.asarray(a).reshape(-1)])


def _const(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _codes_tensor(name: str, codes: np.ndarray, etype: int) -> onnx.TensorProto:
    import ml_dtypes

    if etype == TensorProto.INT8:
        return _const(name, codes.astype(np.int8))
    dt = ml_dtypes.int4 if etype == TensorProto.INT4 else ml_dtypes.int2
    return numpy_helper.from_array(np.ascontiguousarray(codes.astype(np.int8).astype(dt)), name)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return len(t.SerializeToString())


def _hist(bits) -> dict[str, int]:
    vals, counts = np.unique(np.asarray(bits, dtype=np.int64), return_counts=True)
    return {str(int(v)): int(c) for v, c in sorted(zip(vals, counts), key=lambda vc: -vc[0])}


def _sens_summary(entry: dict | None, w_idx=None) -> dict | None:
    """{"w_trace": {mean,min,max}, "a_trace": {...}} of one layer of a sensitivity file."""
    if not entry:
        return None
    out = {}
    for key, short in (("weight", "w_trace"), ("activation", "a_trace")):
        tr = (entry.get(key) or {}).get("trace")
        if tr is None:
            continue
        a = np.asarray(tr, dtype=np.float64)
        if key == "weight" and w_idx is not None:
            idx = np.asarray(w_idx, dtype=np.int64)
            if idx.size and idx.max() >= a.size:
                return None  # a sensitivity file of another model
            a = a[idx]
        if a.size:
            out[short] = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    return out or None


# ===================================================================================== torch export
def torch_export(qm, input_shape, opset: int) -> onnx.ModelProto:
    """The float graph of the QModel (hooks removed) from torch's exporter, batch symbolic."""
    import torch

    saved = {n: (q.act, q.wq) for n, q in qm.qlayers.items()}
    qm.reset()
    example = torch.zeros((2, *input_shape))
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(qm.eval(), (example,), dynamo=True, input_names=["input"],
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                                     opset_version=max(opset, 18), verbose=False, optimize=True)
        model = prog.model_proto
    except CwhawqError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        raise ExportError(f"torch's ONNX exporter cannot export the float graph: {_one_line(exc)}") from None
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        for n, q in qm.qlayers.items():
            q.act, q.wq = saved[n]
    if opset == 17:
        _downgrade_to_17(model)
    # torch's provenance annotations (stack traces, FX nodes) are noise in a deployment file
    for coll in (model.graph.node, model.graph.value_info, model.graph.input, model.graph.output,
                 model.graph.initializer):
        for p in coll:
            keep = [e for e in p.metadata_props if not (e.key.startswith("pkg.torch") or e.key == "namespace")]
            del p.metadata_props[:]
            p.metadata_props.extend(keep)
    if len(model.graph.output) == 1 and model.graph.output[0].name != "logits":
        _rename_tensor(model, model.graph.output[0].name, "logits")
    return model


def _rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for n in g.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            if v.name == old:
                v.name = new


def _downgrade_to_17(model: onnx.ModelProto) -> None:
    """Opset 18 -> 17: reductions take ``axes`` as an attribute again; any other operator whose
    signature changed in opset 18 is refused (one-line error)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            since = onnx.defs.get_schema(n.op_type, 18, "").since_version
        except Exception:  # noqa: BLE001
            continue
        if since < 18:
            continue
        if n.op_type in _REDUCE and n.op_type != "ReduceSum":
            attrs = onnx_attrs(n)
            axes = None
            if len(n.input) > 1 and n.input[1]:
                if n.input[1] not in inits:
                    raise ExportError(f"opset 17 needs constant reduction axes ({n.op_type} {n.name}); "
                                      f"use --opset 18")
                axes = numpy_helper.to_array(inits[n.input[1]]).astype(np.int64).tolist()
                del n.input[1:]
            if attrs.get("noop_with_empty_axes", 0) and not axes:
                raise ExportError(f"{n.op_type} {n.name} has no opset-17 form; use --opset 18")
            keep = [a for a in n.attribute if a.name != "noop_with_empty_axes"]
            del n.attribute[:]
            n.attribute.extend(keep)
            if axes:
                n.attribute.append(helper.make_attribute("axes", axes))
            continue
        raise ExportError(f"operator {n.op_type} ({n.name}) has no opset-17 form here; use --opset 18 or newer")
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 17


# ===================================================================================== graph rewrite
@dataclass
class _Layer:
    name: str
    info: object
    state: object
    node: onnx.NodeProto
    kind: LayerKind
    perm: np.ndarray                       # position -> original output channel
    groups: int = 1
    in_perm: np.ndarray | None = None      # position -> original input channel (folded producer perm)
    in_gather: np.ndarray | None = None    # depthwise: Gather indices applied to the incoming tensor
    unperm: str = "identity"               # identity | gather | folded:<consumer>
    const_perms: list = field(default_factory=list)  # (node, input index, axis, perm) on a folded chain
    rank: int = 2                          # rank of the layer's input tensor in the graph
    bias_node: onnx.NodeProto | None = None  # MatMul: torch's bias Add after it (replaced with the layer)

    @property
    def out(self) -> str:
        """The tensor holding the layer's output (after the bias) in torch's graph."""
        return (self.bias_node or self.node).output[0]

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.perm, np.arange(len(self.perm))))


# ===================================================================================== layer kinds
class LayerKind:
    """How one ONNX operator that torch's exporter writes for a quantized layer is exported.

    A kind is registered under its ONNX op type (:func:`register_layer_kind`); the exporter finds a
    layer's node by its weight initializer and asks the kind of that node's op type to

    - :meth:`check` the node's form (raise :class:`ExportError` for a form it cannot rewrite),
    - give the :meth:`channel_axis` of a tensor of a given rank (the input channels its activation
      quantizer is per-channel over, and the output channels a permutation Gather acts on),
    - :meth:`emit` the operator itself on the dequantized activation and the dequantized weight, which
      always arrives as ``[out_channels, ...]`` (output channels first, grouped by bits and concatenated
      on axis 0; the weight quantizer is per-axis 0).

    Everything around the operator (activation Max/Min/QuantizeLinear/DequantizeLinear, the weight's
    DequantizeLinear per bit group, the channel permutations and their folding, the annotations) is
    shared by all kinds. docs/architecture.md shows how a MatMul kind is added.
    """

    op_type: str = ""
    layer_kinds: tuple[str, ...] = ()     # the QModel layer kinds (LayerInfo.kind) it exports
    flattens_input: bool = False          # its input channels may be a flattened C x spatial (Flatten folds)

    def check(self, node: onnx.NodeProto, name: str, info) -> None:
        """Raise ExportError if this node's form is not one :meth:`emit` reproduces."""

    def channel_axis(self, rank: int) -> int:
        return 1

    def emit(self, name: str, x: str, w: str, bias: str | None, y: str, node: onnx.NodeProto):
        """The operator node (named ``name``) computing ``y`` from activation ``x``, weight ``w``, ``bias``;
        or a list of nodes in order, one of them named ``name`` (it carries the layer's annotations)."""
        raise NotImplementedError

    def weight_matches(self, init: np.ndarray, w: np.ndarray) -> bool:
        """Whether torch's initializer ``init`` of this node is the layer's weight ``w`` (``[out, ...]``)."""
        return init.shape == w.shape and np.array_equal(init, w)


LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(cls: type[LayerKind]) -> type[LayerKind]:
    """Class decorator: export layers exported as ``cls.op_type`` with this kind."""
    LAYER_KINDS[cls.op_type] = cls()
    return cls


def supported_layer_kinds() -> str:
    return ", ".join(f"{k.op_type} ({'/'.join(k.layer_kinds)} layers)" for k in LAYER_KINDS.values())


def layer_kind(node: onnx.NodeProto, name: str, info) -> LayerKind:
    """The registered kind of a layer's node, checked; one error listing the supported kinds otherwise."""
    kind = LAYER_KINDS.get(node.op_type)
    if kind is None or info.kind not in kind.layer_kinds:
        what = f"a {info.kind} layer"
        if info.kind == "linear" and len(info.in_shape) != 1:
            what = f"a Linear on a rank-{len(info.in_shape) + 1} input"
        raise ExportError(f"layer {name}: unsupported layer type: {what} exported as {node.op_type}; exported "
                          f"layer types: {supported_layer_kinds()}")
    kind.check(node, name, info)
    return kind


@register_layer_kind
class ConvKind(LayerKind):
    op_type = "Conv"
    layer_kinds = ("conv", "depthwise")

    def emit(self, name, x, w, bias, y, node):
        return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], name=name,
                                **onnx_attrs(node))


@register_layer_kind
class GemmKind(LayerKind):
    op_type = "Gemm"
    layer_kinds = ("linear",)
    flattens_input = True

    def check(self, node, name, info):
        at = onnx_attrs(node)
        if int(at.get("transA", 0)) or not int(at.get("transB", 0)) or float(at.get("alpha", 1.0)) != 1.0 \
                or float(at.get("beta", 1.0)) != 1.0:
            raise ExportError(f"layer {name}: unsupported Gemm form {at}")

    def emit(self, name, x, w, bias, y, node):
        return helper.make_node("Gemm", [x, w] + ([bias] if bias else []), [y], name=name, transB=1)


@register_layer_kind
class MatMulKind(LayerKind):
    """A Linear on a rank-r input (r >= 3, e.g. ``[batch, tokens, features]``), which torch writes as
    ``MatMul(x, W^T)`` followed by ``Add(bias)``. Emitted as ``Transpose(perm=[1, 0])`` of the
    dequantized ``[out, in]`` weight, ``MatMul`` and the bias ``Add`` (on the last axis); the input
    channels are the features, the last axis."""

    op_type = "MatMul"
    layer_kinds = ("linear",)

    def check(self, node, name, info):
        if len(node.input) != 2:
            raise ExportError(f"layer {name}: unsupported MatMul form (inputs {list(node.input)})")

    def channel_axis(self, rank):
        return rank - 1

    def weight_matches(self, init, w):
        return w.ndim == 2 and init.shape == w.shape[::-1] and np.array_equal(init, w.T)

    def emit(self, name, x, w, bias, y, node):
        nodes = [helper.make_node("Transpose", [w], [f"{name}.weight_t"], name=f"{name}/w_t", perm=[1, 0]),
                 helper.make_node("MatMul", [x, f"{name}.weight_t"], [f"{name}.matmul" if bias else y], name=name)]
        if bias:
            nodes.append(helper.make_node("Add", [f"{name}.matmul", bias], [y], name=f"{name}/bias_add"))
        return nodes


def _bias_add(view: OnnxGraph, node: onnx.NodeProto, bias: np.ndarray | None, name: str):
    """torch's ``Add`` of a MatMul layer's bias: the MatMul's one consumer, adding a constant equal to the
    layer's bias on the last axis. None for a layer without a bias."""
    if bias is None:
        return None
    cons = view.consumers.get(node.output[0], [])
    if len(cons) == 1 and cons[0].op_type == "Add" and node.output[0] not in view.outputs:
        add = cons[0]
        other = [t for t in add.input if t != node.output[0]]
        v = view.const(other[0]) if len(other) == 1 else None
        if v is not None and v.reshape(-1).shape == bias.shape and v.shape[-1:] == bias.shape and \
                np.allclose(v.reshape(-1), bias, rtol=1e-6, atol=1e-7):
            return add
    raise ExportError(f"layer {name}: cannot find the Add of its bias after its MatMul in the exported ONNX graph")


def _find_layer_nodes(model: onnx.ModelProto, view: OnnxGraph, qm, names) -> dict[str, onnx.NodeProto]:
    """The node of each quantized layer: the one reading the layer's weight initializer (matched by
    torch's parameter name, else by value: as is, or transposed for a MatMul), of a registered
    :class:`LayerKind` (checked)."""
    by_weight: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if len(n.input) > 1 and n.input[1] in view.inits:
            by_weight.setdefault(n.input[1], []).append(n)
    found: dict[str, onnx.NodeProto] = {}
    used: set[str] = set()
    for name in names:
        q = qm.layer(name)
        key = name.replace(".", "__")
        cands = [t for t in by_weight if t.endswith(f"qlayers.{key}.weight")]
        if len(cands) != 1:
            w = q.weight.detach().numpy()
            shapes = (w.shape, w.shape[::-1])
            cands = []
            for t in by_weight:
                if t in used or tuple(view.inits[t].dims) not in shapes:
                    continue
                kinds = {LAYER_KINDS[n.op_type] for n in by_weight[t] if n.op_type in LAYER_KINDS}
                arr = numpy_helper.to_array(view.inits[t])
                if any(k.weight_matches(arr, w) for k in kinds) or (not kinds and np.array_equal(arr, w)):
                    cands.append(t)
        nodes = by_weight.get(cands[0], []) if len(cands) == 1 else []
        if len(nodes) != 1:
            raise ExportError(f"layer {name}: cannot find its node in the exported ONNX graph")
        node = nodes[0]
        layer_kind(node, name, qm.layer_infos[names.index(name)])
        used.add(cands[0])
        found[name] = node
    return found


def _fold_target(view: OnnxGraph, L: _Layer, layers_by_node: dict[int, _Layer]):
    """Follow L's output through channel-wise operators to a single quantized consumer that can absorb
    the permutation. Returns (consumer, expand, const_perms) or None."""
    C = len(L.perm)
    t = L.out
    expand = 1
    const_perms = []
    if not _channels_on_axis_1(L):  # the channel-wise operators below are followed on axis 1 only
        return None
    for _ in range(64):
        if t in view.outputs:
            return None
        cons = view.consumers.get(t, [])
        if len(cons) != 1:
            return None
        n = cons[0]
        M = layers_by_node.get(id(n))
        if M is not None:
            if n.input[0] != t or not _channels_on_axis_1(M):
                return None
            if M.kind.flattens_input:
                return (M, expand, const_perms) if M.info.in_channels == C * expand else None
            if expand != 1 or M.info.in_channels != C:
                return None
            if M.info.kind == "depthwise":
                return (M, 1, const_perms) if M.in_gather is not None else None
            return (M, 1, const_perms) if M.groups == 1 else None
        if n.input[0] != t:
            return None
        shape = view.shapes.get(t)
        if not shape or len(shape) < 2 or shape[1] != C * expand:
            return None
        op = n.op_type
        if op in _UNARY_CHANNELWISE:
            for extra in n.input[1:]:
                if extra and (view.const(extra) is None or view.const(extra).size != 1):
                    return None
            if op in ("MaxPool", "AveragePool", "LpPool") and len(n.output) > 1 and n.output[1]:
                return None  # MaxPool indices
        elif op == "BatchNormalization":
            if expand != 1:
                return None
            for k in range(1, 5):
                v = view.const(n.input[k])
                if v is None or v.shape != (C,):
                    return None
                const_perms.append((n, k, 0))
        elif op in _BINARY_CONST:
            if len(n.input) != 2:
                return None
            v = view.const(n.input[1])
            if v is None:
                return None
            if v.size != 1:
                vs = list(v.shape)
                rank = len(shape)
                if len(vs) > rank:
                    return None
                vs = [1] * (rank - len(vs)) + vs
                if vs[1] != C * expand or any(d != 1 for i, d in enumerate(vs) if i != 1):
                    return None
                const_perms.append((n, 1, len(v.shape) - (rank - 1)))
        elif op in _REDUCE:
            at = onnx_attrs(n)
            axes = at.get("axes")
            if axes is None and len(n.input) > 1 and n.input[1]:
                a = view.const(n.input[1])
                axes = None if a is None else a.reshape(-1).tolist()
            if not axes or expand != 1:
                return None
            axes = [int(a) % len(shape) for a in axes]
            if 0 in axes or 1 in axes:
                return None
        elif op in ("Flatten", "Reshape", "Squeeze"):
            out_shape = view.shapes.get(n.output[0])
            if expand != 1 or out_shape is None or len(out_shape) != 2 or len(shape) < 2:
                return None
            if op == "Flatten":
                at = onnx_attrs(n)
                if int(at.get("axis", 1)) != 1:
                    return None
            rest = shape[2:]
            if any(d is None for d in rest):
                return None
            e = int(np.prod(rest)) if rest else 1
            if out_shape[1] != C * e:
                return None
            expand = e
        else:
            return None
        t = n.output[0]
    return None


def _channels_on_axis_1(L: _Layer) -> bool:
    return L.kind.channel_axis(L.rank) == 1


def _input_rank(view: OnnxGraph, node: onnx.NodeProto, info) -> int:
    """The rank of a layer's input in the graph (shape inference; the batch may be symbolic), else
    from the layer's per-sample shape."""
    shape = view.shapes.get(node.input[0])
    if shape is not None and len(shape) >= 2:
        return len(shape)
    return len(info.in_shape) + 1


def _expand_perm(perm: np.ndarray, e: int) -> np.ndarray:
    return (perm[:, None] * e + np.arange(e)[None, :]).reshape(-1)


def _plan_layers(model, view, qm, sim) -> list[_Layer]:
    names = qm.names
    nodes = _find_layer_nodes(model, view, qm, names)
    layers = []
    for info in qm.layer_infos:
        st = sim.states[info.name]
        perm = np.argsort(-np.asarray(st.w_bits, dtype=np.int64), kind="stable").astype(np.int64)
        q = qm.layer(info.name)
        node = nodes[info.name]
        L = _Layer(info.name, info, st, node, LAYER_KINDS[node.op_type], perm, groups=int(q.groups),
                   rank=_input_rank(view, node, info))
        if isinstance(L.kind, MatMulKind):
            L.bias_node = _bias_add(view, node, None if q.bias is None else q.bias.detach().numpy(), info.name)
        if not L.identity:
            if info.kind == "depthwise":
                L.in_gather = perm.copy()
            elif L.groups != 1:
                raise ExportError(f"layer {info.name}: unsupported layer type for a mixed plan: grouped "
                                  f"convolution (groups={L.groups}) with channels of different bits "
                                  f"(give its channels one bit-width)")
        layers.append(L)
    by_node = {id(L.node): L for L in layers}
    for L in layers:
        if L.identity:
            continue
        tgt = _fold_target(view, L, by_node)
        if tgt is None:
            L.unperm = "gather"
            continue
        M, expand, const_perms = tgt
        L.unperm = f"folded:{M.name}"
        L.const_perms = [(n, k, axis, _expand_perm(L.perm, expand)) for n, k, axis in const_perms]
        if M.info.kind == "depthwise":
            inv = np.argsort(L.perm)
            M.in_gather = inv[M.perm]
        else:
            M.in_perm = _expand_perm(L.perm, expand)
    return layers


def _act_order(L: _Layer) -> np.ndarray | None:
    """Position -> original input channel of the tensor that reaches L's activation quantizer."""
    if L.info.kind == "depthwise" and L.in_gather is not None:
        return L.perm
    return L.in_perm


def _emit_layer(L: _Layer, fmt: str, sens_entry) -> tuple[list, list, dict]:
    """Nodes and initializers replacing L's torch node, and L's size report."""
    st, info, name = L.state, L.info, L.name
    nodes, inits = [], []
    x = L.node.input[0]
    rank = L.rank
    axis = L.kind.channel_axis(rank)
    if L.in_gather is not None:
        inits.append(_const(f"{name}.perm_in.indices", L.in_gather.astype(np.int64)))
        nodes.append(helper.make_node("Gather", [x, f"{name}.perm_in.indices"], [f"{name}.perm_in"],
                                      name=f"{name}/perm_in", axis=axis))
        x = f"{name}.perm_in"
    # ---- activation quantizer
    order = _act_order(L)
    s, lo, hi = (np.asarray(v, np.float32) for v in (st.a_scales, st.a_qmin, st.a_qmax))
    if order is not None:
        s, lo, hi = s[order], lo[order], hi[order]
    C = len(s)
    bshape = tuple(C if d == axis % rank else 1 for d in range(rank))
    zdt = np.int8 if st.a_signed else np.uint8
    inits += [_const(f"{name}.act.lo", (s * lo).reshape(bshape)), _const(f"{name}.act.hi", (s * hi).reshape(bshape)),
              _const(f"{name}.act.scale", s), _const(f"{name}.act.zero_point", np.zeros(C, zdt))]
    dq_scale = f"{name}.act.scale"
    if st.w_exponents is not None:
        # migrate: the codes of scale S 2^k_c are dequantized with S alone; the weights carry the 2^k_c
        dq_scale = f"{name}.act.dq_scale"
        inits.append(_const(dq_scale, np.full(C, np.float32(st.a_params["base_scale"]), np.float32)))
    nodes += [
        helper.make_node("Max", [x, f"{name}.act.lo"], [f"{name}.act.max"], name=f"{name}/act_max"),
        helper.make_node("Min", [f"{name}.act.max", f"{name}.act.hi"], [f"{name}.act.min"], name=f"{name}/act_min"),
        helper.make_node("QuantizeLinear", [f"{name}.act.min", f"{name}.act.scale", f"{name}.act.zero_point"],
                         [f"{name}.act.q"], name=f"{name}/act_q", axis=axis),
        helper.make_node("DequantizeLinear", [f"{name}.act.q", dq_scale, f"{name}.act.zero_point"],
                         [f"{name}.act.dq"], name=f"{name}/act_dq", axis=axis),
    ]
    # ---- weights: permuted output channels, one initializer + DQ per bit group
    codes = np.asarray(st.w_codes)
    if L.in_perm is not None:
        codes = codes[:, L.in_perm]
    codes = codes[L.perm]
    scales = np.asarray(st.w_scales, np.float32)[L.perm]
    bits = np.asarray(st.w_bits, np.int64)[L.perm]
    dq_outs, group_rep = [], []
    pos = 0
    for b in sorted({int(v) for v in bits}, reverse=True):
        n_b = int((bits == b).sum())
        sl = slice(pos, pos + n_b)
        assert np.all(bits[sl] == b)
        etype = storage_type(b, fmt)
        cname = f"{name}.weight.w{b}"
        ct = _codes_tensor(cname, codes[sl], etype)
        chans = L.perm[sl]
        qmax = (1 << (b - 1)) - 1
        meta = {"cwhawq.bits": str(b), "cwhawq.channels": _jlist(chans), "cwhawq.range": json.dumps([-qmax, qmax]),
                "cwhawq.container": TensorProto.DataType.Name(etype)}
        ss = _sens_summary(sens_entry, chans)
        if ss:
            meta["cwhawq.sensitivity"] = json.dumps(ss)
        _set_meta(ct, meta)
        st_ = _const(f"{cname}.scale", scales[sl])
        inits += [ct, st_]
        nodes.append(helper.make_node("DequantizeLinear", [cname, f"{cname}.scale"], [f"{cname}.dq"],
                                      name=f"{name}/dq_w{b}", axis=0))
        dq_outs.append(f"{cname}.dq")
        group_rep.append({"bits": b, "channels": n_b, "type": TensorProto.DataType.Name(etype),
                          "bytes": _tensor_bytes(ct) + _tensor_bytes(st_)})
        pos += n_b
    if len(dq_outs) > 1:
        nodes.append(helper.make_node("Concat", dq_outs, [f"{name}.weight"], name=f"{name}/concat_w", axis=0))
        wname = f"{name}.weight"
    else:
        wname = dq_outs[0]
    bias = None
    if st.bias is not None:
        inits.append(_const(f"{name}.bias", np.asarray(st.bias, np.float32)[L.perm]))
        bias = f"{name}.bias"
    out = L.out
    y = f"{name}.out_perm" if L.unperm == "gather" else out
    emitted = L.kind.emit(name, f"{name}.act.dq", wname, bias, y, L.node)
    emitted = list(emitted) if isinstance(emitted, (list, tuple)) else [emitted]
    layer = next(n for n in emitted if n.name == name)
    pm = st.a_params or {}
    lmeta = {"cwhawq.layer": name, "cwhawq.kind": info.kind, "cwhawq.w_bits": _jlist(st.w_bits),
             "cwhawq.perm": _jlist(L.perm), "cwhawq.a_bits": _jlist(st.a_bits),
             "cwhawq.a_signed": "true" if st.a_signed else "false",
             "cwhawq.a_scale_mode": str(pm.get("mode", "free")),
             "cwhawq.a_base_scale": json.dumps(pm.get("base_scale")),
             "cwhawq.a_exponents": json.dumps(pm.get("exponents")),
             "cwhawq.sensitivity": json.dumps(_sens_summary(sens_entry)),
             "cwhawq.unperm": L.unperm}
    if _act_order(L) is not None:
        lmeta["cwhawq.in_perm"] = _jlist(_act_order(L))
    _set_meta(layer, lmeta)
    nodes += emitted
    if L.unperm == "gather":
        inits.append(_const(f"{name}.unperm.indices", np.argsort(L.perm).astype(np.int64)))
        nodes.append(helper.make_node("Gather", [y, f"{name}.unperm.indices"], [out], name=f"{name}/unperm",
                                      axis=axis))  # the output has the input's rank
    rep = {"name": name, "kind": info.kind, "weight_shape": list(info.weight_shape),
           "w_bits": _hist(st.w_bits), "a_bits": _hist(st.a_bits), "unperm": L.unperm,
           "fp32_bytes": 4 * int(info.params), "groups": group_rep,
           "packed_bytes": sum(gr["bytes"] for gr in group_rep)}
    return nodes, inits, rep


def build_model(float_model: onnx.ModelProto, qm, sim, fmt: str, opset: int, sens=None):
    """Rewrite torch's float graph into the quantized graph (in place); returns the layer reports."""
    view = OnnxGraph(float_model)
    view.shapes  # inferred on the graph as torch wrote it, before any rewrite
    layers = _plan_layers(float_model, view, qm, sim)
    sens_by = {e.get("name"): e for e in (sens or {}).get("layers", [])} if sens else {}
    g = float_model.graph
    # permute the constants on folded chains (copies: an initializer may be shared)
    for L in layers:
        for n, k, axis, perm in L.const_perms:
            v = view.const(n.input[k])
            new = f"{n.input[k]}.perm_{L.name}"
            g.initializer.append(_const(new, np.take(v, perm, axis=axis)))
            n.input[k] = new
    by_node = {id(L.node): L for L in layers}
    replaced = {id(L.bias_node) for L in layers if L.bias_node is not None}   # emitted with their layer
    new_nodes, reports = [], []
    for n in list(g.node):
        L = by_node.get(id(n))
        if id(n) in replaced:
            continue
        if L is None:
            new_nodes.append(n)
            continue
        nodes, inits, rep = _emit_layer(L, fmt, sens_by.get(L.name))
        new_nodes += nodes
        g.initializer.extend(inits)
        reports.append(rep)
    del g.node[:]
    g.node.extend(new_nodes)
    prune(float_model)
    for op in float_model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    float_model.ir_version = max(MIN_IR_VERSION, ir)
    return reports


# ===================================================================================== runtime checks
def _check_onnx(m: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the exported graph does not pass the ONNX checker: {_one_line(exc)}") from None


def _ort_session(model_bytes: bytes):
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot run the exported model: {_one_line(exc)}") from None


def _ort_logits(sess, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max |difference| of two logit arrays, also relative to the reference's logit range."""
    if not ref.size:
        return {"samples": 0, "max_abs_diff": 0.0, "logit_range": 0.0, "rel_diff": 0.0, "within_1e-4": 1.0,
                "argmax_agreement": 1.0}
    per = np.abs(ref.astype(np.float64) - got.astype(np.float64)).reshape(len(ref), -1).max(1)
    rng = float(ref.max() - ref.min())
    diff = float(per.max())
    return {"samples": int(ref.shape[0]), "max_abs_diff": diff, "logit_range": rng,
            "rel_diff": diff / rng if rng > 0 else diff,
            "within_1e-4": float((per <= 1e-4 * rng).mean()),
            "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


# ===================================================================================== entry point
def _build_and_open(float_model, qm, sim, fmt: str, opset: int, sens):
    """The quantized graph (on a copy of torch's float graph), checked, and an onnxruntime session on it:
    (model, session, format, layer reports, fallback note). A runtime that cannot run INT4/INT2
    DequantizeLinear gets the same graph with INT8 containers (the note says so)."""
    m = copy.deepcopy(float_model)
    reports = build_model(m, qm, sim, fmt, opset, sens)
    _check_onnx(m)
    try:
        return m, _ort_session(m.SerializeToString()), fmt, reports, None
    except ExportError as exc:
        if fmt != "qdq" or not any(t.data_type in (TensorProto.INT4, _INT2) for t in m.graph.initializer):
            raise
        import onnxruntime

        fallback = (f"onnxruntime {onnxruntime.__version__} cannot run INT4/INT2 weights ({exc}); wrote "
                    f"--format int8-container instead")
    fmt = "int8-container"
    m = float_model
    reports = build_model(m, qm, sim, fmt, opset, sens)
    _check_onnx(m)
    return m, _ort_session(m.SerializeToString()), fmt, reports, fallback


def _model_meta(plan, loaded, fmt, data, calib, calib_batches, act_scale, finetune_epochs, sim=None) -> dict:
    """The file's ``cwhawq.*`` annotations (docs/onnx-format.md); ``sim``: the simulation exported, whose
    weight rounding ``cwhawq.rounding`` records."""
    return {
        "cwhawq.version": __version__,
        "cwhawq.format": fmt,
        "cwhawq.plan": json.dumps(plan.to_dict()),
        "cwhawq.model": str(plan.model or loaded.spec),
        "cwhawq.model_sha256": str(plan.model_sha256 or loaded.info.get("sha256") or ""),
        "cwhawq.budget": str(plan.budget or ""),
        "cwhawq.method": str(plan.method or ""),
        "cwhawq.search": json.dumps(plan.meta or {}),
        "cwhawq.accuracy": json.dumps((plan.metrics or {}).get("accuracy")),
        "cwhawq.calibration": json.dumps({"data": data if isinstance(data, str) else calib.name,
                                          "split": "train" if isinstance(data, str) else calib.split,
                                          "samples": len(calib), "seed": 1, "calib_batches": calib_batches,
                                          "act_scale": act_scale, "finetune_epochs": finetune_epochs}),
        "cwhawq.rounding": json.dumps(_rounding_meta(sim)),
    }


def _summary(out, loaded, plan, plan_src, qm, m, fmt, opset, reports, fp32_file, size, check, accuracy, fallback,
             t0, rounding_rep=None) -> dict:
    """What :func:`export_onnx` returns (and ``cwhawq export`` prints)."""
    nparams = sum(int(i.params) for i in qm.layer_infos)
    hist: dict[str, float] = {}
    for i in qm.layer_infos:
        for b, c in _hist(plan[i.name].w_bits).items():
            hist[b] = hist.get(b, 0.0) + c * i.weight_elems_per_channel / nparams
    return {
        "out": str(out), "model": loaded.spec, "plan": plan_src, "format": fmt, "opset": opset,
        "ir_version": int(m.ir_version), "layers": reports,
        "w_bits_hist": dict(sorted(hist.items(), key=lambda kv: -int(kv[0]))),
        "fp32_weight_bytes": sum(r["fp32_bytes"] for r in reports),
        "packed_weight_bytes": sum(r["packed_bytes"] for r in reports),
        "fp32_file_bytes": fp32_file, "file_bytes": size,
        "gathers": sum(r["unperm"] == "gather" for r in reports) + sum(
            1 for n in m.graph.node if n.name.endswith("/perm_in")),
        "folded": sum(r["unperm"].startswith("folded") for r in reports),
        "verify": check, "accuracy": accuracy, "fallback": fallback,
        "rounding": rounding_rep if rounding_rep is not None else {"method": "nearest"},
        "seconds": round(time.time() - t0, 3),
    }


def export_onnx(model, plan, out, data=None, fmt: str = "qdq", opset: int | None = None,
                meta: dict | None = None, *, data_dir: str | None = None, calib_batches: int = 4,
                act_scale: str = "pow2", finetune_epochs: int = 0, sens=None, verify: int = 64,
                eval_split: str | None = None, eval_limit: int | None = None, batch_size: int = 500,
                rounding=None, rounding_iters: int | None = None, rounding_seed: int = 0,
                progress: bool = False, log=None) -> dict:
    """Export ``model`` (zoo:NAME, .pt2 or a LoadedModel) under ``plan`` (path or Plan) to ``out``.

    The plan is simulated exactly as ``cwhawq eval --plan`` does (:func:`cwhawq.simulate.simulate_plan`;
    ``data`` is a dataset spec or a Dataset used as the calibration set; None: a zoo model's own
    dataset, any other model must be given its data). The data that calibrated the file is recorded in
    its ``cwhawq.calibration`` annotation. ``verify`` samples of the
    calibration set are run through onnxruntime and compared with the simulation; ``eval_split``
    (e.g. "test") also measures both accuracies on that split and records them in ``cwhawq.accuracy``.
    ``rounding`` (``learned``, the default without a fine-tune, or ``nearest``; or a
    :class:`cwhawq.rounding.RoundingConfig`): how the weight codes are made
    (:func:`cwhawq.simulate.rounding_config`); learned codes are reconstructed on the calibration set,
    deterministically from the plan, the calibration samples, the options (``rounding_iters``,
    ``rounding_seed``) and the thread count, and the file records how (``cwhawq.rounding``).
    Returns a summary dict (layers, bits, sizes, opset, comparison). Nothing is written on error.
    """
    t0 = time.time()
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use {' or '.join(FORMATS)}")
    if eval_split and data is not None and not isinstance(data, str):
        raise ExportError("eval_split needs a dataset spec, not a Dataset")
    if isinstance(model, str) and model.endswith(".onnx"):
        raise ExportError(f"{model}: export takes a PyTorch model (zoo:NAME or .pt2); an .onnx file "
                          f"already holds its plan")
    check_outputs([("--out", out)], [("MODEL", model if isinstance(model, str) and not model.startswith("zoo:")
                                      else None),
                                     ("--plan", plan if isinstance(plan, (str, Path)) else None),
                                     ("--data", data_file(data)),
                                     ("--sens", sens if isinstance(sens, (str, Path)) else None)])
    if isinstance(model, str):
        loaded = load_model(model)
    elif isinstance(model, LoadedModel):
        loaded = model
    else:
        raise ExportError("model must be a spec (zoo:NAME, .pt2) or a LoadedModel")
    if not hasattr(plan, "layers"):
        plan_src = str(plan)
        plan = load_plan(plan)
    else:
        plan_src = "<plan>"
    opset = _check_opset(plan, fmt, opset)
    rcfg = rounding if hasattr(rounding, "iters") else rounding_config(rounding, rounding_iters, rounding_seed,
                                                                        finetune_epochs)
    check_plan_model(plan, loaded, f"plan {plan_src}" if plan_src != "<plan>" else "the plan")
    data = require_data(loaded, data, "calibrate it on")
    calib = calibration_set(data, data_dir, calib_batches)
    check_input_shape(loaded.input_shape, calib)
    if sens is not None:
        sens = load_sensitivity(sens, loaded)
    eval_ds = None
    if eval_split:
        eval_ds = load_data(data, eval_split, data_dir).subset(eval_limit)
        check_labels(eval_ds, model_classes(loaded))
    qm, plan, sim = simulate_plan(loaded, plan, data if finetune_epochs else calib, data_dir, calib_batches,
                                  act_scale, finetune_epochs, rounding=rcfg, progress=progress, log=log)
    rounding_rep = rounding_summary(sim)
    float_model = torch_export(qm, loaded.input_shape, opset)
    fp32_file = len(float_model.SerializeToString())
    m, sess, fmt, reports, fallback = _build_and_open(float_model, qm, sim, fmt, opset, sens)
    model_meta = _model_meta(plan, loaded, fmt, data, calib, calib_batches, act_scale, finetune_epochs, sim)
    for k, v in (meta or {}).items():
        model_meta[k if k.startswith("cwhawq.") else f"cwhawq.{k}"] = v if isinstance(v, str) else json.dumps(v)
    check = None
    if verify:
        sub = calib.subset(min(int(verify), len(calib)), seed=2)
        check = compare_logits(predict(qm, sub, batch_size), _ort_logits(sess, sub.x, batch_size))
    accuracy = None
    if eval_split:
        ds = eval_ds
        ref = predict(qm, ds, batch_size)
        got = _ort_logits(sess, ds.x, batch_size)
        accuracy = {"split": eval_split, "n": len(ds), "simulated": float((ref.argmax(1) == ds.y).mean()),
                    "onnxruntime": float((got.argmax(1) == ds.y).mean()), **{
                        k: v for k, v in compare_logits(ref, got).items() if k != "samples"}}
        model_meta["cwhawq.accuracy"] = json.dumps(accuracy)
    helper.set_model_props(m, model_meta)
    m.producer_name, m.producer_version = "cwhawq", __version__
    with atomic_path(out) as tmp:
        onnx.save_model(m, str(tmp))
        size = Path(tmp).stat().st_size
    return _summary(out, loaded, plan, plan_src, qm, m, fmt, opset, reports, fp32_file, size, check, accuracy,
                    fallback, t0, rounding_rep)


def _rounding_meta(sim) -> dict:
    """The ``cwhawq.rounding`` annotation: how the weight codes were made (enough to make them again
    from the plan and the calibration recorded in ``cwhawq.calibration``)."""
    r = getattr(sim, "rounding", None)
    if not r:
        return {"method": "nearest"}
    keep = ("method", "iters", "batch_size", "lr", "reg", "beta", "warmup", "mode", "inputs", "drop_prob", "seed",
            "samples", "threads", "seconds")
    out = {k: r[k] for k in keep if k in r}
    out["output_error"] = [{"unit": u["unit"], "nearest": u["loss_nearest"], "learned": u["loss_learned"]}
                           for u in r.get("units", [])]
    return out


def summary_text(rep: dict) -> str:
    """The table ``cwhawq export`` prints."""
    rows = [("layer", "kind", "weight bits (channels)", "act bits", "order", "fp32 KiB", "packed KiB")]
    for r in rep["layers"]:
        rows.append((r["name"], r["kind"], " ".join(f"{b}:{c}" for b, c in r["w_bits"].items()),
                     " ".join(f"{b}:{c}" for b, c in r["a_bits"].items()), r["unperm"],
                     f"{r['fp32_bytes'] / 1024:.2f}", f"{r['packed_bytes'] / 1024:.2f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    hist = ", ".join(f"{b}-bit {f * 100:.1f}%" for b, f in rep["w_bits_hist"].items())
    lines.append("")
    lines.append(f"{len(rep['layers'])} layers; weights by bits: {hist}")
    lines.append(f"weights {rep['fp32_weight_bytes'] / 1024:.1f} KiB fp32 -> {rep['packed_weight_bytes'] / 1024:.1f} "
                 f"KiB packed (x{rep['fp32_weight_bytes'] / max(1, rep['packed_weight_bytes']):.2f}); file "
                 f"{rep['fp32_file_bytes'] / 1024:.1f} KiB fp32 -> {rep['file_bytes'] / 1024:.1f} KiB")
    lines.append(f"format {rep['format']}, opset {rep['opset']}, IR {rep['ir_version']}; {rep['folded']} "
                 f"permutations folded, {rep['gathers']} Gathers")
    v = rep.get("verify")
    if v:
        lines.append(f"onnxruntime vs simulation on {v['samples']} samples: max |logit diff| {v['max_abs_diff']:.3g} "
                     f"({v['rel_diff']:.2g} of the logit range; {v['within_1e-4'] * 100:.1f}% of samples within "
                     f"1e-4 of it), argmax agreement {v['argmax_agreement'] * 100:.2f}%")
    a = rep.get("accuracy")
    if a:
        lines.append(f"accuracy on {a['split']} (n={a['n']}): simulated {a['simulated'] * 100:.2f}%, onnxruntime "
                     f"{a['onnxruntime'] * 100:.2f}%; logits: max |diff| {a['max_abs_diff']:.3g} "
                     f"({a['rel_diff']:.2g} of the range), {a['within_1e-4'] * 100:.1f}% of samples within 1e-4, "
                     f"argmax agreement {a['argmax_agreement'] * 100:.2f}%")
    r = rep.get("rounding") or {}
    if r.get("method") == "learned":
        lines.append(f"weights: learned rounding ({r['mode']}-wise, {r['iters']} steps per {r['mode']}, seed {r['seed']}, "
                     f"{r['samples']} calibration samples): {r['seconds']:.1f} s"
                     + (" (reused from earlier in this process)" if r.get("cached") else ""))
    elif r:
        lines.append("weights: nearest rounding")
    if rep.get("fallback"):
        lines.append(f"warning: {rep['fallback']}")
    lines.append(f"-> {rep['out']}")
    return "\n".join(lines)


def export_fp32(model, out, opset: int = 18) -> Path:
    """The float model (BN folded, no quantization) as ONNX with a symbolic batch, written atomically.

    The fp32 baseline of the same graph that :func:`export_onnx` writes, for onnxruntime and TVM
    latency comparisons.
    """
    if isinstance(model, str) and model.endswith(".onnx"):
        raise ExportError(f"{model}: export takes a PyTorch model (zoo:NAME or .pt2), not ONNX")
    check_outputs([("--out", out)], [("MODEL", model if isinstance(model, str) and not model.startswith("zoo:")
                                      else None)])
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    qm = qmodel_from_loaded(loaded, check=False)  # float only: any layer the graph can run is fine
    proto = torch_export(qm, loaded.input_shape, opset)
    _set_meta(proto, {"cwhawq.version": __version__, "cwhawq.model": loaded.spec,
                      "cwhawq.model_sha256": str(loaded.info.get("sha256") or ""), "cwhawq.format": "fp32"})
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)
