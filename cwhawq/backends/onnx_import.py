"""ONNX import: find the quantized layers, pack their weights, rewrite the graph for TVM.

Input models (see docs/onnx-format.md):

* our exported ONNX, both formats (``qdq`` with INT8/INT4/INT2 weight groups, ``int8-container``):
  per layer ``x -> Max -> Min -> QuantizeLinear -> DequantizeLinear -> Conv/Gemm`` with the weights
  ``DequantizeLinear`` per bit group -> ``Concat`` and an optional ``Gather`` restoring the channel
  order;
* per-channel int8 QDQ models (onnxruntime ``quantize_static``): ``Q -> DQ`` activations (per
  tensor, any zero point), int8 weights through ``DequantizeLinear``, biases through int32 DQ;
* plain fp32 models.

Graph inputs that are also initializers (the older ONNX convention) are constants, not inputs of
the artifact (:func:`_initializer_inputs_as_constants`).

Every ``Conv`` (2-D, groups 1 or depthwise), ``Gemm`` and ``MatMul`` whose weights are constant
(directly or through ``DequantizeLinear``/``Concat`` of constants) becomes one node
``cwhawq.CwhawqLayer`` that absorbs its activation quantizer (Max/Min/Q/DQ), weight dequantizers,
the output ``Gather`` and a following residual ``Add`` and ``Relu`` when nothing else reads the
intermediate tensors. The graph structure decides, not the metadata (which is only used for
reporting the plan's bits), so models quantized by other tools lower the same way. Layers that
cannot be lowered (grouped non-depthwise convolutions, computed weights, ...) stay in the graph
and are reported as falling back to TVM in fp32.

The rewritten graph goes through TVM's Relax ONNX importer, with the custom node converted by
:func:`to_relax` into calls of the packed kernels; low-bit initializers left in the graph are
widened to 8 bits first (TVM's importer cannot read INT4/INT2).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CompileError
from ..kernels import packing
from ..kernels.problem import ActQuant, LinearOp, WeightGroup, channel_pad, conv_weight_matrix
from ..onnx_graph import OnnxGraph, prune
from ..onnx_graph import attrs as _attrs
from . import tvm_compat

CUSTOM_OP = "CwhawqLayer"
CUSTOM_DOMAIN = "cwhawq"

_INT_RANGES = {
    TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
}
if hasattr(TensorProto, "INT2"):
    _INT_RANGES[TensorProto.INT2] = (-2, 1)
    _INT_RANGES[TensorProto.UINT2] = (0, 3)
_WIDEN = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
if hasattr(TensorProto, "INT2"):
    _WIDEN[TensorProto.INT2] = TensorProto.INT8
    _WIDEN[TensorProto.UINT2] = TensorProto.UINT8


# ===================================================================================== loading
def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; any problem is a one-line :class:`CompileError`."""
    p = Path(path)
    if not p.is_file():
        raise CompileError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise CompileError(f"{p} is not a valid ONNX file (corrupt or truncated): {_line(exc)}") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise CompileError(f"{p} is not a valid ONNX file (no graph)")
    if model.ir_version < 3:
        raise CompileError(f"{p}: ONNX IR version {model.ir_version} is too old")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"{p} is not a valid ONNX model: {_line(exc)}") from None
    return model


def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# ===================================================================================== results
@dataclass
class LayerPlan:
    """One lowered layer: its kernel op and where it sits in the graph."""

    index: int
    name: str
    kind: str                 # conv | depthwise | linear
    op_type: str              # Conv | Gemm | MatMul
    source: str               # input tensor (before the absorbed activation quantizer)
    output: str               # tensor the lowered node produces
    residual: str | None
    op: LinearOp
    conv: dict | None = None  # kh, kw, cin, attrs (ONNX Conv attributes)
    plan_w_bits: list[int] | None = None
    replaced: list[str] = field(default_factory=list)  # core chain first, then absorbed quantizers
    core_len: int = 1  # layer node + fused Gather/Add/Relu: replaced by the lowered node
    in_layout: str = "NCHW"   # conv layers: NHWC when the input comes from another lowered conv
    out_layout: str = "NCHW"  # NHWC when only lowered convs read the output
    res_layout: str = "NCHW"  # layout of the fused residual tensor
    fused_consumers: list[int] = field(default_factory=list)  # layers whose input this one's epilogue writes
    fused_from: int | None = None  # the layer that writes this one's activation operand
    emit_y: bool = True            # the float output is needed (graph output, other readers)
    rank: int | None = None        # dense layers: rank of the input (rows = all but the last axis)

    def summary(self, isa: str | None = None) -> dict:
        op = self.op
        bits: dict[str, int] = {}
        if self.plan_w_bits is not None:
            for b in self.plan_w_bits:
                bits[str(b)] = bits.get(str(b), 0) + 1
        else:
            for g in op.groups:
                key = str(g.plan_bits or g.storage_bits)
                bits[key] = bits.get(key, 0) + g.n
        k_real = self.conv["kh"] * self.conv["kw"] * (self.conv["cin"] // self.conv["attrs"].get("group", 1)) \
            if self.conv else op.k
        act = None
        if op.act is not None:
            act = {"integer": op.mode == "int", "digits": op.act.digits()[0] if op.mode == "int" else None}
        kernel = None
        if isa is not None:
            if self.kind == "depthwise":
                kernel = {"kernel": ["depthwise"], "act": "f32", "digits": 1}
            else:
                from ..kernels.emit import describe  # noqa: PLC0415

                kernel = describe(op, isa)
        return {
            "layer": self.name, "kind": self.kind, "mode": op.mode, "out_channels": op.n_out,
            "w_bits": dict(sorted(bits.items(), key=lambda kv: -int(kv[0]))),
            "storage_bits": sorted({g.storage_bits for g in op.groups}, reverse=True),
            "packed_bytes": (4 * op.k * (-(-op.n_out // 16) * 16) if self.kind == "depthwise" else op.weight_bytes),
            "fp32_bytes": 4 * op.n_out * k_real,
            "act": act, "kernel": kernel,
            "fused": op.fused_ops(),
            "layout": f"{self.in_layout}->{self.out_layout}" if self.kind != "linear" else None,
        }


@dataclass
class ImportResult:
    model: onnx.ModelProto          # rewritten graph (custom nodes, widened initializers)
    layers: list[LayerPlan]
    fallbacks: list[dict]           # compute layers left to TVM in fp32: {node, op, reason}
    inputs: list[dict]
    outputs: list[dict]
    metadata: dict

    def report(self, isa: str | None = None) -> dict:
        layers = [lp.summary(isa) for lp in self.layers]
        quant = [s for s in layers if s["mode"] != "fp32"]
        return {
            "lowered": layers,
            "quantized_layers": len(quant),
            "fp32_kernel_layers": len(layers) - len(quant),
            "packed_bytes": sum(s["packed_bytes"] for s in layers),
            "fp32_bytes": sum(s["fp32_bytes"] for s in layers),
            "fallback_to_tvm_fp32": self.fallbacks,
        }


def _meta(proto) -> dict:
    return {p.key: p.value for p in getattr(proto, "metadata_props", [])}


def _int_array(a) -> np.ndarray:
    return np.asarray(a).astype(np.int64)


# ===================================================================================== matching
@dataclass
class _DQ:
    codes: np.ndarray     # int64
    scale: np.ndarray     # float32 (scalar or per axis)
    zero: np.ndarray      # int64 (broadcastable)
    axis: int
    node: onnx.NodeProto
    bits_meta: int | None


def _match_const_dq(gr: OnnxGraph, name: str) -> _DQ | None:
    n = gr.producer.get(name)
    if n is None or n.op_type != "DequantizeLinear":
        return None
    at = _attrs(n)
    if int(at.get("block_size", 0) or 0):
        return None
    codes = gr.const(n.input[0])
    scale = gr.const(n.input[1]) if len(n.input) > 1 else None
    zp = gr.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if codes is None or scale is None or (len(n.input) > 2 and n.input[2] and zp is None):
        return None
    if not np.issubdtype(np.asarray(codes).dtype, np.integer) and gr.elem_type(n.input[0]) not in _INT_RANGES \
            and gr.elem_type(n.input[0]) != TensorProto.INT32:
        return None
    meta = _meta(gr.inits[n.input[0]]) if n.input[0] in gr.inits else {}
    bits = int(meta["cwhawq.bits"]) if "cwhawq.bits" in meta and str(meta["cwhawq.bits"]).isdigit() else None
    z = _int_array(zp) if zp is not None else np.zeros(1, np.int64)
    return _DQ(_int_array(codes), np.asarray(scale, np.float32), z, int(at.get("axis", 1)), n, bits)


def _dq_float(d: _DQ) -> np.ndarray:
    """Dequantized float value of a constant DQ (biases)."""
    c = d.codes
    if d.scale.ndim == 0 or d.scale.size == 1:
        return ((c - d.zero.reshape(-1)[0]) * d.scale.reshape(-1)[0]).astype(np.float32)
    shape = [1] * c.ndim
    shape[d.axis] = -1
    return ((c - d.zero.reshape(shape)) * d.scale.reshape(shape)).astype(np.float32)


def _weight_groups(gr: OnnxGraph, name: str, layout: str):
    """Weight source -> ("fp32", array) or ("quant", [(codes [n,...], scales [n], bits_meta)]).

    ``layout``: "nk" (Conv, Gemm transB=1: output channels on axis 0) or "kn" (MatMul, Gemm
    transB=0: output channels on axis 1; returned transposed to [n, k]).
    """
    w = gr.const(name)
    if w is not None:
        if not np.issubdtype(w.dtype, np.floating):
            return None
        w = np.asarray(w, np.float32)
        return ("fp32", w.T.copy() if layout == "kn" and w.ndim == 2 else w)
    parts = []
    n = gr.producer.get(name)
    if n is None:
        return None
    if n.op_type == "Transpose" and layout in ("nk", "kn"):
        perm = [int(v) for v in _attrs(n).get("perm", [1, 0])]
        if perm != [1, 0]:
            return None
        # W[k, n] = Transpose(W'[n, k]) (how cwhawq exports a MatMul's weight groups) and back
        return _weight_groups(gr, n.input[0], "nk" if layout == "kn" else "kn")
    if n.op_type == "Concat":
        if int(_attrs(n).get("axis", 0)) != (0 if layout == "nk" else 1):
            return None
        srcs = list(n.input)
    elif n.op_type == "DequantizeLinear":
        srcs = [name]
    else:
        return None
    ch_axis = 0 if layout == "nk" else 1
    for s in srcs:
        d = _match_const_dq(gr, s)
        if d is None:
            return None
        codes = d.codes
        nch = codes.shape[ch_axis]
        scale = d.scale.reshape(-1)
        zero = d.zero.reshape(-1)
        if scale.size == 1:
            scale = np.full(nch, scale[0], np.float32)
        elif d.axis % codes.ndim != ch_axis or scale.size != nch:
            return None
        if zero.size == 1:
            zero = np.full(nch, zero[0], np.int64)
        elif zero.size != nch:
            return None
        if layout == "kn":
            codes = codes.T
        q = codes - zero.reshape((-1,) + (1,) * (codes.ndim - 1))
        if q.size and (q.min() < -128 or q.max() > 127):
            return None
        parts.append((q, scale.astype(np.float32), d.bits_meta))
    return ("quant", parts)


def _match_act(gr: OnnxGraph, name: str, channels: int, chan_axis_ok):
    """Activation quantizer feeding ``name`` -> (source tensor, ActQuant | None, absorbed nodes)."""
    dq = gr.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name, None, []
    q = gr.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return name, None, []
    dqa, qa = _attrs(dq), _attrs(q)
    if int(dqa.get("block_size", 0) or 0) or int(qa.get("block_size", 0) or 0):
        return name, None, []
    if int(qa.get("saturate", 1)) != 1 and qa.get("saturate") is not None:
        return name, None, []
    sq = gr.const(q.input[1])
    sd = gr.const(dq.input[1])
    zq = gr.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    zd = gr.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if sq is None or sd is None:
        return name, None, []
    sd_f = np.asarray(sd, np.float32).reshape(-1)
    if sd_f.size not in (1, channels):
        return name, None, []
    # a DequantizeLinear scale other than the QuantizeLinear's: the exponents migrated into the
    # weights (export --act-scale migrate); ActQuant.build accepts it on a power-of-two grid only
    dq_scale = None if np.array_equal(np.asarray(sq, np.float32), np.asarray(sd, np.float32)) else sd_f
    if sd_f.size != 1 and not chan_axis_ok(int(dqa.get("axis", 1))):
        return name, None, []
    zq_i = _int_array(zq) if zq is not None else np.zeros(1, np.int64)
    zd_i = _int_array(zd) if zd is not None else np.zeros(1, np.int64)
    if not np.array_equal(zq_i.reshape(-1), zd_i.reshape(-1)):
        return name, None, []
    if len(q.input) > 2 and q.input[2]:
        qtype = gr.elem_type(q.input[2])
    else:
        qtype = int(qa.get("output_dtype", 0) or 0) or TensorProto.UINT8
    if qtype not in _INT_RANGES:
        return name, None, []
    tlo, thi = _INT_RANGES[qtype]
    s = np.asarray(sq, np.float32).reshape(-1)
    if s.size != 1:
        if not chan_axis_ok(int(qa.get("axis", 1))) or int(dqa.get("axis", 1)) != int(qa.get("axis", 1)) \
                or s.size != channels:
            return name, None, []
    zp = zq_i.reshape(-1)
    if zp.size not in (1, channels):
        return name, None, []
    lo = np.full(channels, tlo, np.int64)
    hi = np.full(channels, thi, np.int64)
    absorbed = [q.name, dq.name]
    src = q.input[0]
    s_full = np.broadcast_to(s, (channels,)).astype(np.float32)
    z_full = np.broadcast_to(zp, (channels,))
    # fold a clipping Max/Min pair (either order) whose bounds sit on the code grid
    for _ in range(2):
        clip = gr.producer.get(src)
        if clip is None or clip.op_type not in ("Max", "Min") or len(clip.input) != 2:
            break
        if gr.single_consumer(src) is None:
            break
        bound = gr.const(clip.input[1])
        data = clip.input[0]
        if bound is None:
            bound = gr.const(clip.input[0])
            data = clip.input[1]
        if bound is None:
            break
        b = np.asarray(bound, np.float32).reshape(-1)
        if b.size not in (1, channels):
            break
        codes = np.broadcast_to(b, (channels,)).astype(np.float64) / s_full.astype(np.float64) + z_full
        rc = np.round(codes)
        if np.any(np.abs(codes - rc) > 1e-3):
            break
        if clip.op_type == "Max":
            lo = np.maximum(lo, rc.astype(np.int64))
        else:
            hi = np.minimum(hi, rc.astype(np.int64))
        absorbed.append(clip.name)
        src = data
    if np.any(lo > hi):
        return name, None, []
    try:
        act = ActQuant.build(s_full, z_full, lo, hi, channels, dq_scale=dq_scale)
    except ValueError:
        return name, None, []
    return src, act, absorbed


# ===================================================================================== converters
@dataclass
class LayerWeights:
    """What a converter finds at a layer node: its constant weights (``wsrc``, see
    :func:`_weight_groups`) and geometry; the rest of the lowering (activation quantizer, bias,
    output Gather/Add/Relu, packing) is the same for every operator."""

    wsrc: tuple
    kind: str                      # conv | depthwise | linear
    cout: int
    channels: int                  # channels of the activation quantizer it absorbs
    act_axis_ok: Callable[[int], bool]
    cin: int | None = None         # convolutions
    kh: int | None = None
    kw: int | None = None
    k_flat: int | None = None      # dense layers: the reduction length
    rank: int | None = None        # rank of the input (dense layers; None when not inferred)


#: ONNX op type -> converter ``(graph, node, attrs) -> LayerWeights | reason it is not lowered``
CONVERTERS: dict[str, Callable] = {}


def register_converter(*op_types: str):
    """Decorator: lower nodes of these op types with the decorated converter."""
    def deco(fn):
        for op in op_types:
            CONVERTERS[op] = fn
        return fn
    return deco


_NOT_CONST = "weights are not constant (or not a per-channel DequantizeLinear of constants)"


@register_converter("Conv")
def _conv_weights(gr: OnnxGraph, node, at: dict):
    wsrc = _weight_groups(gr, node.input[1], "nk")
    if wsrc is None:
        return _NOT_CONST
    wshape = (wsrc[1].shape if wsrc[0] == "fp32" else
              (sum(p[0].shape[0] for p in wsrc[1]),) + wsrc[1][0][0].shape[1:])
    if len(wshape) != 4:
        return "only 2-D convolutions are lowered"
    group = int(at.get("group", 1))
    cout, cg, kh, kw = (int(v) for v in wshape)
    cin = cg * group
    if group != 1 and not (cg == 1 and cout % group == 0):
        return f"grouped convolution (group={group}) is not lowered"
    return LayerWeights(wsrc, "conv" if group == 1 else "depthwise", cout, cin, lambda ax: ax in (1, -3),
                        cin=cin, kh=kh, kw=kw)


@register_converter("Gemm", "MatMul")
def _dense_weights(gr: OnnxGraph, node, at: dict):
    if node.op_type == "Gemm":
        if int(at.get("transA", 0)) != 0:
            return "Gemm with transA=1 is not lowered"
        if float(at.get("alpha", 1.0)) != 1.0 or float(at.get("beta", 1.0)) != 1.0:
            return "Gemm with alpha/beta != 1 is not lowered"
        layout = "nk" if int(at.get("transB", 0)) == 1 else "kn"
    else:
        layout = "kn"
    wsrc = _weight_groups(gr, node.input[1], layout)
    if wsrc is None:
        return _NOT_CONST
    if wsrc[0] == "fp32":
        if wsrc[1].ndim != 2:
            return "only 2-D weights are lowered"
        cout, k_flat = wsrc[1].shape
    else:
        if any(p[0].ndim != 2 for p in wsrc[1]):
            return "only 2-D weights are lowered"
        cout = sum(p[0].shape[0] for p in wsrc[1])
        k_flat = wsrc[1][0][0].shape[1]
    if node.op_type == "Gemm":
        rank = 2
    else:
        shp = gr.shapes.get(node.input[0])
        rank = len(shp) if shp is not None else None
        if rank is not None and rank < 2:
            return "MatMul on a 1-D input is not lowered"
    # per-feature activation quantizers sit on the last axis; on a [B, T, K] input axis 1 is the
    # token axis (T == K would otherwise pass for per-feature), so the check needs the rank
    feat_axes = (rank - 1, -1) if rank is not None else (-1,)
    return LayerWeights(wsrc, "linear", cout, k_flat, lambda ax: ax in feat_axes, k_flat=k_flat, rank=rank)


class _Lowerer:
    def __init__(self, model: onnx.ModelProto, fp32_kernels: bool):
        self.gr = OnnxGraph(model)
        self.fp32_kernels = fp32_kernels
        self.layers: list[LayerPlan] = []
        self.fallbacks: list[dict] = []
        self.claimed: set[str] = set()  # Gather/Add/Relu nodes fused into an earlier layer

    def run(self):
        for node in list(self.gr.model.graph.node):
            if node.op_type not in CONVERTERS:
                continue
            reason = self._try(node)
            if reason is not None:
                self.fallbacks.append({"node": node.name or node.output[0], "op": node.op_type, "reason": reason})

    def _try(self, node) -> str | None:
        gr = self.gr
        at = _attrs(node)
        meta = _meta(node)
        found = CONVERTERS[node.op_type](gr, node, at)
        if isinstance(found, str):
            return found
        wsrc, kind, cout, channels, act_axis_ok = found.wsrc, found.kind, found.cout, found.channels, found.act_axis_ok
        cin, kh, kw, k_flat = found.cin, found.kh, found.kw, found.k_flat
        if wsrc[0] == "fp32" and not self.fp32_kernels:
            return "fp32 layer (kernels disabled)"
        # bias
        bias = None
        if len(node.input) > 2 and node.input[2]:
            b = gr.const(node.input[2])
            if b is None:
                d = _match_const_dq(gr, node.input[2])
                if d is None:
                    return "bias is not constant"
                b = _dq_float(d)
            b = np.asarray(b, np.float32)
            if b.size != cout or (b.ndim > 1 and b.shape[-1] != cout):
                return "bias is not per output channel"
            bias = b.reshape(-1)
        source, act, absorbed = _match_act(gr, node.input[0], channels, act_axis_ok)
        if act is not None and act.dq_scale is not None and kind == "depthwise":
            source, act, absorbed = node.input[0], None, []  # the depthwise kernel dequantizes with one scale
        if act is not None and wsrc[0] == "fp32":
            source, act, absorbed = node.input[0], None, []  # fp32 kernels take the dequantized input
        if len(self.gr.consumers.get(node.output[0], [])) == 0 and node.output[0] not in gr.outputs:
            return "output unused"
        # output side: Gather (channel order), Add (residual), Relu
        replaced = [node.name]
        out = node.output[0]
        out_index = None
        nxt = gr.single_consumer(out)
        if node.op_type == "MatMul" and bias is None and nxt is not None and nxt.op_type == "Add" \
                and len(nxt.input) == 2:
            # MatMul + Add(constant per output feature): the bias of a Linear as exporters write it
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            b = gr.const(other) if other != out else None
            if b is not None and np.issubdtype(np.asarray(b).dtype, np.floating) and b.size == cout \
                    and b.shape[-1:] == (cout,) and b.ndim <= max(found.rank or 2, 1):
                bias = np.asarray(b, np.float32).reshape(-1)
                replaced.append(nxt.name)
                out = nxt.output[0]
                nxt = gr.single_consumer(out)
        out_axes = (1, -1) if kind == "linear" and found.rank in (None, 2) else (1,)
        if kind == "linear" and found.rank is not None and found.rank > 2:
            out_axes = (found.rank - 1, -1)
        if nxt is not None and nxt.op_type == "Gather" and int(_attrs(nxt).get("axis", 0)) in out_axes \
                and nxt.input[0] == out:
            idx = gr.const(nxt.input[1])
            if idx is not None and idx.ndim == 1 and sorted(idx.tolist()) == list(range(cout)):
                out_index = np.empty(cout, np.int32)
                out_index[idx.astype(np.int64)] = np.arange(cout, dtype=np.int32)
                replaced.append(nxt.name)
                out = nxt.output[0]
        residual = None
        relu = False
        nxt = gr.single_consumer(out)
        if nxt is not None and nxt.name in self.claimed:
            nxt = None
        if nxt is not None and nxt.op_type == "Add" and len(nxt.input) == 2:
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            if other != out and gr.const(other) is None:
                residual = other
                replaced.append(nxt.name)
                out = nxt.output[0]
                nxt = gr.single_consumer(out)
        clip_hi = None
        if nxt is not None and nxt.op_type == "Relu" and nxt.name not in self.claimed:
            relu = True
            replaced.append(nxt.name)
            out = nxt.output[0]
        elif nxt is not None and nxt.op_type == "Clip" and nxt.name not in self.claimed:
            bounds = _clip_bounds(gr, nxt)  # ReLU6 and friends: Clip(0, hi) or Clip(-inf, hi)
            if bounds is not None:
                relu, clip_hi = bounds
                replaced.append(nxt.name)
                out = nxt.output[0]
        if out_index is None:
            out_index = np.arange(cout, dtype=np.int32)
        if bias is not None:  # ONNX gives it in the layer's (permuted) channel order
            b_out = np.empty_like(bias)
            b_out[out_index] = bias
            bias = b_out
        # weight groups -> kernel op
        name = meta.get("cwhawq.layer") or node.name or node.output[0]
        plan_w_bits = None
        if "cwhawq.w_bits" in meta:
            try:
                plan_w_bits = [int(b) for b in json.loads(meta["cwhawq.w_bits"])]
            except (ValueError, TypeError):
                plan_w_bits = None
        conv = None
        quantized = wsrc[0] != "fp32"
        if kind in ("conv", "depthwise"):
            conv = {"kh": kh, "kw": kw, "cin": cin, "cout": cout, "attrs": _conv_attrs(at)}
            cp = channel_pad(cin, quantized) if kind == "conv" else 1
            conv["cp"] = cp
            k = kh * kw * cp if kind == "conv" else kh * kw
        else:
            k = k_flat

        def rows_of(w):
            if kind == "conv":
                return conv_weight_matrix(w, cp)
            return w.reshape(w.shape[0], -1)

        groups = []
        if not quantized:
            groups.append(WeightGroup(out_index=out_index, scale=np.ones(cout, np.float32),
                                      float_w=rows_of(wsrc[1]), plan_bits=32))
        else:
            outs, scales, sbits, pbits, codes = [], [], [], [], []
            pos = 0
            for q, s, bmeta in wsrc[1]:
                nb = q.shape[0]
                codes.append(q)
                outs.append(out_index[pos:pos + nb])
                scales.append(s)
                sbits.append(packing.storage_bits_for_range(int(q.min()), int(q.max())) if q.size else 2)
                pbits.append(bmeta)
                pos += nb
            runs = packing.merge_groups([q.shape[0] for q in codes], sbits, packing.padded_k(k))
            for run in runs:
                rb = max(sbits[i] for i in run)
                # rows in output-channel order: runs of consecutive channels become vector stores
                # (depthwise rows keep the ONNX order, which decides the input channel they read)
                oi = np.concatenate([outs[i] for i in run]).astype(np.int32)
                order = np.argsort(oi, kind="stable") if kind != "depthwise" else np.arange(len(oi))
                mat = rows_of(np.concatenate([codes[i] for i in run]))
                plan_b = {pbits[i] for i in run}
                groups.append(WeightGroup(out_index=oi[order],
                                          scale=np.concatenate([scales[i] for i in run]).astype(np.float32)[order],
                                          codes=mat[order], bits=rb,
                                          plan_bits=plan_b.pop() if len(plan_b) == 1 else None))
        try:
            op = LinearOp(k=k, n_out=cout, groups=groups, bias=bias, act=act, relu=relu, clip_hi=clip_hi,
                          residual=residual is not None, name=name, cin=cin if conv is not None else None,
                          conv_kind=kind if conv is not None else None)
        except ValueError as exc:
            return f"cannot build kernel op: {exc}"
        self.claimed.update(replaced)
        self.layers.append(LayerPlan(index=len(self.layers), name=name, kind=kind, op_type=node.op_type,
                                     source=source, output=out, residual=residual, op=op, conv=conv,
                                     plan_w_bits=plan_w_bits,
                                     replaced=replaced + absorbed, core_len=len(replaced),
                                     rank=found.rank if kind == "linear" else None))
        return None


def _conv_attrs(at: dict) -> dict:
    out = {}
    for key in ("strides", "pads", "dilations", "group", "auto_pad"):
        if key in at:
            v = at[key]
            out[key] = v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


# ===================================================================================== rewriting
def _rewrite(model: onnx.ModelProto, layers: list[LayerPlan]) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    g = m.graph
    nodes = list(g.node)
    name_of = {id(n): n.name for n in nodes}
    core_sets = []
    for lp in layers:
        # the core chain (layer node, Gather, Add, Relu) is replaced; absorbed quantizers die by DCE
        core_sets.append(set(lp.replaced[: lp.core_len]))
    last_pos = {}
    for li, cs in enumerate(core_sets):
        positions = [i for i, n in enumerate(nodes) if n.name in cs]
        last_pos[max(positions)] = li
    replaced_all = set().union(*core_sets) if core_sets else set()
    new_nodes = []
    for i, n in enumerate(nodes):
        if i in last_pos:
            lp = layers[last_pos[i]]
            ins = [lp.source] + ([lp.residual] if lp.residual else [])
            new_nodes.append(helper.make_node(CUSTOM_OP, ins, [lp.output], name=f"cwhawq/{lp.name}",
                                              domain=CUSTOM_DOMAIN, index=lp.index))
        elif name_of[id(n)] in replaced_all:
            continue
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    prune(m)
    _widen_low_bit(m)
    if not any(op.domain == CUSTOM_DOMAIN for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return m


def _widen_low_bit(m: onnx.ModelProto) -> None:
    """INT4/INT2 (and unsigned) initializers -> 8 bits (same values): TVM's importer cannot read them."""
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in _WIDEN:
            arr = numpy_helper.to_array(t).astype(np.int64)
            wide = numpy_helper.from_array(arr.astype(np.int8 if _WIDEN[t.data_type] == TensorProto.INT8 else np.uint8),
                                           t.name)
            g.initializer[i].CopyFrom(wide)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in _WIDEN:
                    arr = numpy_helper.to_array(a.t).astype(np.int64)
                    a.t.CopyFrom(numpy_helper.from_array(
                        arr.astype(np.int8 if _WIDEN[a.t.data_type] == TensorProto.INT8 else np.uint8), a.t.name))
        if n.op_type == "QuantizeLinear":
            for a in n.attribute:
                if a.name == "output_dtype" and a.i in _WIDEN:
                    a.i = _WIDEN[a.i]


def _assign_layouts(model: onnx.ModelProto, layers: list[LayerPlan]) -> None:
    """Keep activations channels-last (NHWC) between lowered convolutions.

    A lowered conv's output stays NHWC when it is not a graph output and only lowered convs read
    it (as their input or as a fused residual, which the kernels read in either layout). This
    removes the NCHW transposes of the prologues and epilogues between our own layers; tensors
    that TVM's operators read stay NCHW.
    """
    conv_kinds = ("conv", "depthwise")
    by_out = {lp.output: lp for lp in layers}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in model.graph.output}
    nhwc = {}
    for lp in layers:
        ok = lp.kind in conv_kinds and lp.output not in outputs and bool(consumers.get(lp.output))
        for n in consumers.get(lp.output, []):
            if n.op_type != CUSTOM_OP or layers[next(a.i for a in n.attribute if a.name == "index")].kind \
                    not in conv_kinds:
                ok = False
                break
        nhwc[lp.output] = ok

    def layout(tensor):
        return "NHWC" if tensor in by_out and nhwc.get(tensor) else "NCHW"

    for lp in layers:
        if lp.kind in conv_kinds:
            lp.out_layout = layout(lp.output)
            lp.in_layout = layout(lp.source)
            lp.res_layout = layout(lp.residual) if lp.residual else lp.out_layout


def _assign_fusion(model: onnx.ModelProto, layers: list[LayerPlan]) -> None:
    """Let a lowered layer's epilogue quantize its output straight into the activation operand of
    the lowered layers that read it (no prologue for them, one pass less over the tensor): conv /
    depthwise (no channel multiplier) producers into conv / depthwise consumers, dense into dense
    (2-D). The float output is still written when something else reads it (a residual, TVM's
    operators, a graph output)."""
    by_out = {lp.output: lp for lp in layers}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    outputs = {o.name for o in model.graph.output}
    spatial = ("conv", "depthwise")
    for lp in layers:
        readers = consumers.get(lp.output, [])
        fusable = []
        other = lp.output in outputs
        for n, i in readers:
            if n.op_type != CUSTOM_OP or i != 0:
                other = True
                continue
            cl = layers[next(a.i for a in n.attribute if a.name == "index")]
            ok = (lp.kind in spatial and cl.kind in spatial) or \
                (lp.kind == "linear" and cl.kind == "linear" and lp.rank == 2 and cl.rank == 2)
            if cl.kind == "depthwise" and cl.conv["cout"] != cl.conv["cin"]:
                ok = False
            if ok and cl.fused_from is None and cl.index not in fusable:
                fusable.append(cl.index)
            else:
                other = True
        lp.fused_consumers = fusable
        lp.emit_y = other or not fusable
        for ci in fusable:
            layers[ci].fused_from = lp.index
    del by_out


def _io(vis) -> list[dict]:
    out = []
    for v in vis:
        tt = v.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or "?")
        out.append({"name": v.name, "shape": shape,
                    "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "float32"})
    return out


def check_supported(model: onnx.ModelProto) -> None:
    """Every remaining operator must be known to TVM's importer (one-line error otherwise)."""
    known = tvm_compat.onnx_converter_ops() | {"Constant", "If", CUSTOM_OP}
    bad = [(n.op_type, n.name or n.output[0]) for n in model.graph.node if n.op_type not in known]
    if bad:
        first = ", ".join(f"{op} (node {nm!r})" for op, nm in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CompileError(f"unsupported ONNX operator: {first}{more}")


def _unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have distinct names (the lowering identifies nodes by name)."""
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return model
    m = copy.deepcopy(model)
    seen: set[str] = set()
    for i, n in enumerate(m.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}_{n.output[0] if n.output else i}"
            name, j = base, 0
            while name in seen:
                j += 1
                name = f"{base}_{j}"
            n.name = name
        seen.add(n.name)
    return m


def _initializer_inputs_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the graph inputs that are also initializers.

    Older exporters (ONNX IR < 4, many model-zoo CNNs, ``torch.onnx.export(...,
    keep_initializers_as_inputs=True)``) list every initializer among the graph inputs; onnxruntime
    treats them as constants whose value a caller may override. The compiled artifact takes them
    as constants: its inputs are the real ones only, and the lowering may fold and drop them.
    """
    inits = {t.name for t in model.graph.initializer}
    if not any(v.name in inits for v in model.graph.input):
        return model
    m = copy.deepcopy(model)
    keep = [v for v in m.graph.input if v.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m


def analyze(model: onnx.ModelProto, kernels: bool = True, fp32_kernels: bool = True) -> ImportResult:
    """Find and pack the lowerable layers and rewrite the graph (see the module docstring)."""
    model = _initializer_inputs_as_constants(_unique_node_names(model))
    meta = {p.key: p.value for p in model.metadata_props}
    graph_inputs = list(model.graph.input)
    if kernels:
        low = _Lowerer(model, fp32_kernels)
        low.run()
        layers, fallbacks = low.layers, low.fallbacks
    else:
        layers, fallbacks = [], [{"node": n.name or n.output[0], "op": n.op_type, "reason": "kernels disabled"}
                                 for n in model.graph.node if n.op_type in CONVERTERS]
    rewritten = _rewrite(model, layers)
    check_supported(rewritten)
    _assign_layouts(rewritten, layers)
    _assign_fusion(rewritten, layers)
    return ImportResult(rewritten, layers, fallbacks, _io(graph_inputs), _io(model.graph.output), meta)


# ===================================================================================== relax
def to_relax(result: ImportResult, isa: str, batch: int | None = None):
    """Import the rewritten graph into a Relax IRModule with the packed kernels in place."""
    from tvm import relax, tirx  # noqa: PLC0415

    layers = result.layers
    shape_dict = {}
    sym_vars: dict[str, tirx.Var] = {}
    for inp in result.inputs:
        shp = []
        for i, d in enumerate(inp["shape"]):
            if isinstance(d, int):
                shp.append(d)
            elif i == 0 and batch is not None:
                shp.append(int(batch))
            else:
                key = d if d != "?" else f"{inp['name']}_dim{i}"
                shp.append(sym_vars.setdefault(key, tirx.Var(key, "int64")))
        shape_dict[inp["name"]] = shp

    fused_ctx: dict = {}

    def convert_layer(bb, inputs, attrs):
        return _emit_layer(bb, layers[int(attrs["index"])], list(inputs), isa, layers, fused_ctx)

    _Importer = tvm_compat.onnx_importer({CUSTOM_OP: convert_layer})

    opset = 1
    for o in result.model.opset_import:
        if o.domain in ("", "ai.onnx"):
            opset = o.version
    imp = _Importer(shape_dict, "float32", keep_params_in_input=False, sanitize=True)
    try:
        mod = imp.from_onnx(result.model.graph, opset)
    except CompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - the importer raises many exception types
        raise CompileError(f"TVM's ONNX importer failed: {_line(exc)}") from None
    return relax.transform.DeadCodeElimination()(mod)


def _static(v):
    from tvm import tirx  # noqa: PLC0415

    if isinstance(v, int):
        return v
    return int(v.value) if isinstance(v, tirx.IntImm) else None


def _conv_op(lp: LayerPlan, c: int, h: int, w: int):
    """The layer's op with its geometry for an input of ``c`` channels, ``h`` x ``w``."""
    from ..kernels.problem import ConvGeom  # noqa: PLC0415

    cv = lp.conv
    if c != cv["cin"]:
        raise CompileError(f"layer {lp.name}: input has {c} channels, weights expect {cv['cin']}")
    try:
        geom = ConvGeom.from_onnx(c, cv["cout"], h, w, cv["kh"], cv["kw"], cv["attrs"])
    except ValueError as exc:
        raise CompileError(f"layer {lp.name}: {exc}") from None
    geom = geom.with_channel_pad(cv["cp"]).with_layouts(lp.in_layout, lp.out_layout, lp.res_layout)
    if geom.out_h < 1 or geom.out_w < 1:
        raise CompileError(f"layer {lp.name}: empty convolution output")
    return replace(lp.op, geom=geom)


def _emit_layer(bb, lp: LayerPlan, inputs: list, isa: str, layers: list[LayerPlan] | None = None,
                ctx: dict | None = None):
    """Emit one lowered layer. ``ctx`` carries the activation operands producers wrote for their
    fused consumers (``ctx[consumer index] = (var, batch, logical input shape)``)."""
    from tvm import relax  # noqa: PLC0415

    from ..kernels import emit as kemit  # noqa: PLC0415

    ctx = {} if ctx is None else ctx
    x = inputs[0]
    res = inputs[1] if lp.residual else None
    given = ctx.pop(lp.index, None)
    if given is not None:
        given_a, nbatch, logical = given
        shape = logical
    else:
        given_a = None
        shape = list(x.ty.shape)
    op = lp.op
    fname = f"cw{lp.index}_{kemit.sym(lp.name)}"
    if lp.kind == "linear":
        if len(shape) < 2:
            raise CompileError(f"layer {lp.name}: input must have at least 2 dimensions")
        if _static(shape[-1]) != op.k:
            raise CompileError(f"layer {lp.name}: input has {shape[-1]} features, weights expect {op.k}")
        x2 = x
        lead = shape[:-1]
        out_shape = lead + [op.n_out]
        fused_ok = res is None or _same_shape(res, out_shape)
        if len(shape) != 2:
            # token inputs [B, T, ..., K]: one GEMM with M = B x T x ... rows; the row count the
            # kernel is tiled for counts a symbolic batch as 1
            rows, hint = lead[0], _static(lead[0]) or 1
            for d in lead[1:]:
                rows = rows * d
                hint *= _static(d) or 1
            x2 = bb.emit(relax.op.reshape(x, [rows, op.k]))
            if res is not None and fused_ok:
                res2 = bb.emit(relax.op.reshape(res, [rows, op.n_out]))
                y = kemit.emit_linear(bb, x2, op, isa, hint, res2, fname)
                return bb.emit(relax.op.reshape(y, out_shape))
            op_run = replace(op, residual=False, relu=False, clip_hi=None) if res is not None else op
            y = kemit.emit_linear(bb, x2, op_run, isa, hint, None, fname)
            y = bb.emit(relax.op.reshape(y, out_shape))
            return _unfused_tail(bb, y, res, op) if res is not None else y
        rows_static = _static(shape[0])
        if not fused_ok:
            op_run = replace(op, residual=False, relu=False, clip_hi=None)
            y = kemit.emit_linear(bb, x2, op_run, isa, rows_static or 1, None, fname)
            return _unfused_tail(bb, y, res, op)
        fused, plans = _fused_outputs(lp, layers, isa, None, [shape[0], op.n_out])
        out = kemit.emit_linear(bb, x2, op, isa, rows_static or 1, res, fname, fused=fused,
                                emit_y=lp.emit_y or not fused, given_a=given_a)
        return _store_fused(lp, out, fused, plans, ctx, shape[0])
    if len(shape) != 4:
        raise CompileError(f"layer {lp.name}: convolution input must be 4-D NCHW")
    if given is not None or lp.in_layout != "NHWC":
        c, h, w = (_static(s) for s in shape[1:])
    else:
        h, w, c = (_static(s) for s in shape[1:])
    if None in (c, h, w):
        raise CompileError(f"layer {lp.name}: symbolic channel/spatial sizes are not supported (only the batch)")
    op = _conv_op(lp, c, h, w)
    geom = op.geom
    nb_static = _static(shape[0]) or 1
    if res is not None and not _same_shape(res, geom.res_shape(shape[0])):
        # a broadcasting residual: add it with TVM's operator, in NCHW as the ONNX Add does
        y = kemit.emit_layer(bb, x, replace(op, residual=False, relu=False, clip_hi=None), isa, nb_static, None, fname,
                             given_a=given_a)
        nhwc_res = geom.res_layout == "NHWC" and len(list(res.ty.shape)) == 4
        if geom.out_layout == "NHWC":
            y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
        if nhwc_res:
            res = bb.emit(relax.op.permute_dims(res, [0, 3, 1, 2]))
        y = _unfused_tail(bb, y, res, op)
        return bb.emit(relax.op.permute_dims(y, [0, 2, 3, 1])) if geom.out_layout == "NHWC" else y
    fused, plans = _fused_outputs(lp, layers, isa, geom, None)
    out = kemit.emit_layer(bb, x, op, isa, nb_static, res, fname, fused=fused, emit_y=lp.emit_y or not fused,
                           given_a=given_a)
    return _store_fused(lp, out, fused, plans, ctx, shape[0], [geom.cout, geom.out_h, geom.out_w])


def _fused_outputs(lp: LayerPlan, layers, isa: str, geom, dense_shape):
    """The consumers' activation operands this layer writes (see :func:`_assign_fusion`)."""
    from ..kernels import emit as kemit  # noqa: PLC0415

    if not lp.fused_consumers or layers is None or isa == "cuda":
        return [], []
    fused, plans = [], []
    for ci in lp.fused_consumers:
        cl = layers[ci]
        if geom is not None:
            cop = _conv_op(cl, geom.cout, geom.out_h, geom.out_w)
        else:
            cop = cl.op
        try:
            fused.append(kemit.fused_input(cop, isa))
        except ValueError:
            continue
        plans.append(ci)
    return fused, plans


def _store_fused(lp: LayerPlan, out, fused, plans, ctx, nbatch, chw=None):
    if not fused:
        return out
    y, fvars = out
    for ci, var in zip(plans, fvars):
        logical = [nbatch] + (chw if chw is not None else [lp.op.n_out])
        ctx[ci] = (var, nbatch, logical)
    return y if y is not None else fvars[0]


def _unfused_tail(bb, y, res, op):
    from tvm import relax  # noqa: PLC0415

    if res is not None:
        y = bb.emit(relax.op.add(y, res))
    if op.relu:
        y = bb.emit(relax.op.nn.relu(y))
    if op.clip_hi is not None:
        y = bb.emit(relax.op.minimum(y, relax.const(float(op.clip_hi), "float32")))
    return y


def _clip_bounds(gr, node) -> tuple[bool, float] | None:
    """``(relu, hi)`` when a Clip is max(x, 0) or nothing below and a finite constant above; else None."""
    def bound(i):
        if len(node.input) <= i or not node.input[i]:
            return None, True
        v = gr.const(node.input[i])
        if v is None or v.size != 1:
            return None, False
        return float(v.reshape(())), True

    lo, ok_lo = bound(1)
    hi, ok_hi = bound(2)
    if not (ok_lo and ok_hi) or hi is None or not np.isfinite(hi):
        return None
    if lo is None or lo == -np.inf:
        return False, hi
    if lo == 0.0 and hi >= 0.0:
        return True, hi
    return None


def _same_shape(expr, shape) -> bool:
    import tvm_ffi  # noqa: PLC0415

    try:
        rs = list(expr.ty.shape)
    except Exception:  # noqa: BLE001 - unknown shape
        return False
    if len(rs) != len(shape):
        return False
    for a, b in zip(rs, shape):
        if isinstance(b, int):
            if _static(a) != b:
                return False
        elif not tvm_ffi.structural_equal(a, b, map_free_vars=False):
            return False
    return True
