"""One read-only view of an ONNX graph and one pruning pass, shared by the exporter
(:mod:`cwhawq.export`, which rewrites torch's float graph) and the TVM import
(:mod:`cwhawq.backends.onnx_import`, which reads exported graphs back).

Both work on an ``onnx.ModelProto`` in place and need only who produces and who reads each tensor,
the value of constant tensors (initializers and ``Constant`` nodes) and, for the exporter, the
inferred shapes; a view is built once per pass and not updated when the graph changes.
(``onnx_ir``, the ONNX project's in-memory IR, would hold the same; a ModelProto view keeps both
passes free of a conversion round trip.)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraph:
    """Producers, consumers, graph outputs and constant values of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self._const: dict[str, np.ndarray | None] = {}
        self._shapes: dict[str, list] | None = None

    def _constant_value(self, name: str):
        """The TensorProto behind an initializer or a Constant node's output (None if computed)."""
        if name in self.inits:
            return self.inits[name]
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return a.t
        return None

    def const(self, name: str):
        """numpy value of an initializer or Constant output (None if computed); cached."""
        if not name:
            return None
        if name not in self._const:
            t = self._constant_value(name)
            self._const[name] = None if t is None else numpy_helper.to_array(t)
        return self._const[name]

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a constant tensor (None if computed)."""
        t = self._constant_value(name) if name else None
        return None if t is None else t.data_type

    def single_consumer(self, name: str):
        """The one node reading ``name`` (None when several or none read it, or it is a graph output)."""
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or name in self.outputs:
            return None
        return cons[0]

    @property
    def shapes(self) -> dict[str, list]:
        """Inferred shapes (``None`` for symbolic dimensions) of every tensor ONNX shape inference types."""
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(self.model)
            self._shapes = {}
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                dims = v.type.tensor_type.shape.dim
                self._shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        return self._shapes


def prune(model: onnx.ModelProto) -> None:
    """Dead-code elimination in place: drop the nodes no graph output depends on (repeatedly), then the
    initializers and value_info that no remaining node or graph output names."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        read = set(outputs)
        for n in g.node:
            read.update(i for i in n.input if i)
        keep = [n for n in g.node if any(o in read for o in n.output if o)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = set(outputs)
    for n in g.node:
        used.update(i for i in n.input if i)
        used.update(o for o in n.output if o)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in used]
    del g.value_info[:]
    g.value_info.extend(vis)
