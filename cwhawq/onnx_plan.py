"""Rebuild a bit plan from an exported ONNX file alone (``cwhawq plan from-onnx``).

The per-layer bits come from the annotations of each quantized layer's node (``cwhawq.w_bits``,
``cwhawq.a_bits``; docs/onnx-format.md) and are checked against the graph itself: the permutation,
the weight group initializers (``L.weight.w{b}``: channels, bit-width, integer container) and the
activation quantizer's channel count. The plan's other fields (model, method, budget, bit set, metrics,
search settings) come from the model's ``cwhawq.plan`` annotation, whose layers must agree with the
nodes. Only onnx is needed (no torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import PlanError
from .plan import LayerPlan, Plan, plan_from_dict

_CONTAINER_BITS = {"INT8": 8, "INT4": 4, "INT2": 2}


def _meta(proto) -> dict:
    return {e.key: e.value for e in proto.metadata_props}


def _ints(meta: dict, key: str, where: str) -> list[int]:
    try:
        v = json.loads(meta[key])
        if not isinstance(v, list) or not all(isinstance(b, int) for b in v):
            raise ValueError
        return v
    except (KeyError, ValueError, TypeError):
        raise PlanError(f"{where}: annotation {key} is missing or not a list of integers") from None


def _check_layer(name: str, meta: dict, w_bits: list[int], inits: dict) -> None:
    """The node's annotations must describe the graph: permutation, groups and their containers."""
    from onnx import TensorProto

    where = f"layer {name}"
    perm = _ints(meta, "cwhawq.perm", where)
    n = len(w_bits)
    if sorted(perm) != list(range(n)):
        raise PlanError(f"{where}: cwhawq.perm is not a permutation of its {n} output channels")
    pb = [w_bits[p] for p in perm]
    if any(a < b for a, b in zip(pb, pb[1:])):
        raise PlanError(f"{where}: cwhawq.perm does not sort the channels by descending bits")
    pos = 0
    for b in sorted(set(w_bits), reverse=True):
        t = inits.get(f"{name}.weight.w{b}")
        if t is None:
            raise PlanError(f"{where}: the plan has {b}-bit channels but the graph has no {name}.weight.w{b}")
        cnt = pb.count(b)
        if not t.dims or t.dims[0] != cnt:
            raise PlanError(f"{where}: {name}.weight.w{b} holds {t.dims[0] if t.dims else 0} channels, the "
                            f"annotations say {cnt}")
        tm = _meta(t)
        if tm.get("cwhawq.bits") not in (None, str(b)):
            raise PlanError(f"{where}: {name}.weight.w{b} is annotated {tm.get('cwhawq.bits')} bits")
        if "cwhawq.channels" in tm and json.loads(tm["cwhawq.channels"]) != perm[pos:pos + cnt]:
            raise PlanError(f"{where}: {name}.weight.w{b} channels disagree with cwhawq.perm")
        cont = _CONTAINER_BITS.get(TensorProto.DataType.Name(t.data_type))
        if cont is None or cont < b:
            raise PlanError(f"{where}: {b}-bit channels stored as {TensorProto.DataType.Name(t.data_type)}")
        pos += cnt


def plan_from_onnx(path) -> Plan:
    """The plan an exported ONNX file was made from (annotations checked against the graph)."""
    import onnx

    p = Path(path)
    if p.is_dir():
        raise PlanError(f"{p} is a directory, not an ONNX file")
    if not p.is_file():
        raise PlanError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors
        raise PlanError(f"{p} is not a valid ONNX file: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    mmeta = _meta(model)
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        meta = _meta(node)
        name = meta.get("cwhawq.layer")
        if not name:
            continue
        w_bits = _ints(meta, "cwhawq.w_bits", f"layer {name}")
        a_bits = _ints(meta, "cwhawq.a_bits", f"layer {name}")
        _check_layer(name, meta, w_bits, inits)
        scale = inits.get(f"{name}.act.scale")
        if scale is not None and int(np.prod(scale.dims)) != len(a_bits):
            raise PlanError(f"layer {name}: cwhawq.a_bits has {len(a_bits)} channels, its activation quantizer "
                            f"{int(np.prod(scale.dims))}")
        layers.append(LayerPlan(name, w_bits, a_bits))
    base = None
    if "cwhawq.plan" in mmeta:
        try:
            base = plan_from_dict(json.loads(mmeta["cwhawq.plan"]), f"{p}: cwhawq.plan")
        except json.JSONDecodeError as exc:
            raise PlanError(f"{p}: cwhawq.plan is not valid JSON: {exc}") from None
    if not layers:
        if base is None:
            raise PlanError(f"{p} carries no cwhawq annotations (not exported by cwhawq export?)")
        return base
    if base is not None:
        if sorted(base.names) != sorted(lp.name for lp in layers):
            raise PlanError(f"{p}: the cwhawq.plan annotation names other layers than the graph's nodes")
        for lp in layers:
            bp = base[lp.name]
            if list(bp.w_bits) != list(lp.w_bits) or list(bp.a_bits) != list(lp.a_bits):
                raise PlanError(f"{p}: layer {lp.name}: the node annotations disagree with cwhawq.plan")
        order = {n: i for i, n in enumerate(base.names)}
        layers.sort(key=lambda lp: order[lp.name])
        return Plan(layers, base.bit_set, base.model, base.method, base.budget, base.metrics, base.meta,
                    base.model_sha256 or mmeta.get("cwhawq.model_sha256") or None)
    used = sorted({b for lp in layers for b in lp.w_bits + lp.a_bits})

    def _j(key):
        try:
            return json.loads(mmeta[key]) if key in mmeta else None
        except json.JSONDecodeError:
            return mmeta[key]
    return Plan(layers, tuple(used), mmeta.get("cwhawq.model") or None, mmeta.get("cwhawq.method") or None,
                mmeta.get("cwhawq.budget") or None, {}, _j("cwhawq.search") or {},
                mmeta.get("cwhawq.model_sha256") or None)
