"""One-layer probes: the latency-relevant shape of a layer, a one-layer PyTorch model of it, and its
ONNX models (fp32 and each weight-bit mix) written by the exporter itself."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..data import Dataset
from ..export import MIN_OPSET, build_model, export_fp32, required_opset, torch_export
from ..graph import qmodel_from_loaded
from ..io import atomic_path
from ..models import LoadedModel
from ..plan import LayerPlan, Plan
from ..quantize import quantize_model
from .model import BIT_CLASSES

# ===================================================================================== layer shapes
@dataclass(frozen=True)
class LayerShape:
    """What a layer's latency depends on, besides its bits."""

    kind: str                  # conv | depthwise | linear
    in_shape: tuple            # (C, H, W) or (C,), without batch
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    a_signed: bool

    @property
    def in_channels(self) -> int:
        return int(self.in_shape[0])

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerShape":
        return cls(d["kind"], tuple(d["in_shape"]), int(d["out_channels"]), tuple(d["kernel"]), tuple(d["stride"]),
                   tuple(d["padding"]), tuple(d["dilation"]), int(d["groups"]), bool(d["a_signed"]))

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        if self.kind == "linear":
            return f"linear {self.in_channels}->{self.out_channels}"
        c, h, w = self.in_shape
        s = "x".join(map(str, self.stride))
        g = f" g{self.groups}" if self.groups > 1 else ""
        return (f"{self.kind} {c}->{self.out_channels} k{self.kernel[0]}x{self.kernel[1]} s{s}{g} @{h}x{w}"
                + (" signed" if self.a_signed else ""))

    def digit_variants(self) -> tuple[int, ...]:
        return (1,) if self.in_channels == 1 else (1, 2)

    @classmethod
    def of_layer(cls, info, qlayer, a_signed: bool) -> "LayerShape":
        if info.kind == "linear":
            return cls("linear", (int(info.in_channels),), int(info.out_channels), (1, 1), (1, 1), (0, 0), (1, 1), 1,
                       bool(a_signed))
        return cls(info.kind, tuple(int(v) for v in info.in_shape), int(info.out_channels),
                   tuple(int(v) for v in info.kernel), tuple(int(v) for v in qlayer.stride),
                   tuple(int(v) for v in qlayer.padding), tuple(int(v) for v in qlayer.dilation), int(qlayer.groups),
                   bool(a_signed))


def single_layer_module(shape: LayerShape, seed: int = 0):
    """A one-layer PyTorch model of the shape (random weights: latency does not depend on them)."""
    torch.manual_seed(seed)
    if shape.kind == "linear":
        return nn.Sequential(nn.Linear(shape.in_channels, shape.out_channels)).eval()
    return nn.Sequential(nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
                                   shape.dilation, shape.groups, bias=True)).eval()


def _calibration(shape: LayerShape, digits: int):
    """Calibration samples whose per-channel ranges make 8-bit activations need ``digits`` digits:
    equal ranges (exponents 0) for one digit, ranges 1 and 1/2 alternating (exponents 1, 0) for two."""
    rng = np.random.default_rng(0)
    c = shape.in_channels
    r = np.ones(c)
    if digits == 2:
        r[1::2] = 0.5
    bshape = (-1,) + (1,) * (len(shape.in_shape) - 1)
    x = rng.random((4, *shape.in_shape)) * r.reshape(bshape)
    if shape.a_signed:
        x = 2 * x - r.reshape(bshape)
    x = x.astype(np.float32)
    x[0].reshape(c, -1)[:, 0] = r            # exact ranges: max |x_c| = r_c
    x[1].reshape(c, -1)[:, 0] = -r if shape.a_signed else 0.0
    return Dataset(x, np.zeros(len(x), np.int64), "synthetic", "calibration")


class OneLayerExporter:
    """One-layer models of a shape in our exported ONNX format, written by the exporter.

    :func:`cwhawq.export.export_onnx` runs torch's ONNX exporter (seconds) on every call; here the
    float graph is exported once per shape and opset and the exporter's own ``build_model`` writes
    the quantized layer of each bit mix into a copy (the same steps export_onnx takes, without its
    onnxruntime verification).
    """

    def __init__(self, shape: LayerShape):
        self.shape = shape
        self.loaded = LoadedModel(f"layer:{shape.id}", single_layer_module(shape), tuple(shape.in_shape))
        self.qm = qmodel_from_loaded(self.loaded)
        self._float: dict[int, object] = {}

    def _float_graph(self, opset: int):
        if opset not in self._float:
            self._float[opset] = torch_export(self.qm, self.loaded.input_shape, opset)
        return self._float[opset]

    def write(self, counts: dict[int, int] | None, digits: int, out: Path) -> None:
        """Write the one-layer model (``counts`` None: fp32) with ``digits``-digit activations."""
        if counts is None:
            model = self._float_graph(MIN_OPSET)
        else:
            name = self.qm.layer_infos[0].name
            w_bits = [b for b in BIT_CLASSES for _ in range(counts[b])]
            plan = Plan([LayerPlan(name, w_bits, [8] * self.shape.in_channels)], (2, 4, 8), method="latency-probe")
            model = self._quantized(plan, digits)
        with atomic_path(out) as tmp:
            onnx.save_model(model, str(tmp))

    def _quantized(self, plan, digits: int):
        plan.validate(self.qm.layer_infos)
        sim = quantize_model(self.qm, plan, _calibration(self.shape, digits))
        opset = required_opset(plan, "qdq")
        model = copy.deepcopy(self._float_graph(opset))
        build_model(model, self.qm, sim, "qdq", opset)
        return model


def fp32_onnx(loaded, out: Path) -> None:
    """The fp32 model (batch norms folded, as the exporter sees it) as ONNX, batch symbolic."""
    export_fp32(loaded, out)
