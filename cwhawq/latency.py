"""Per-layer latency tables: the measured cost model behind ``latency:R`` budgets.

``cwhawq latency-table MODEL --target T [--rpc HOST:PORT --key K] --out table.json``

What is measured
    For every quantized layer the table holds the latency of that layer *alone*, compiled for the
    target (:func:`cwhawq.backends.tvm.compile_model`) from a one-layer ONNX model written by the
    exporter itself (:func:`cwhawq.export.export_onnx` on a one-layer PyTorch model with the layer's
    shape, stride, padding and groups), for each weight-bit mix on a grid of ratios:

    * weight bits fall into three storage classes (8: 8 and 6 bits, 4: 4 and 3 bits, 2: 2 bits);
      a layer's mix is the point (r8, r4, r2) of the simplex of class fractions, and the grid holds
      every point with coordinates that are multiples of ``1/grid`` (``grid=2``: pure 8, 4 and 2 and
      the three half/half mixes: 6 points; ``grid=4``: 15 points);
    * activation bits matter only through the number of int8 digits ``D`` the integer kernels
      store per activation value (1 or 2; see :meth:`cwhawq.kernels.problem.ActQuant.digits`), which follows from the
      layer's calibrated per-channel input ranges and the plan's activation bits (the pow2 scale
      exponents, :func:`cwhawq.quantizers.act_pow2_scales`). Both ``D`` are measured (only ``D=1``
      for single-channel inputs, which cannot need two); the layer's calibrated ranges are stored
      in the table so that :meth:`LatencyTable.predict` computes a plan's ``D`` exactly;
    * plus the layer in fp32 (the same one-layer model without quantization).

    Layers of equal shape (resnet20 repeats most of its 22) are measured once.

Prediction (``LatencyTable.predict(plan) -> seconds``)
    ``T(plan) = overhead + sum over layers of L(layer, mix, D)``, with ``L`` from :func:`mix_cost`:
    linear in the class fractions between the three pure points, plus the extra cost of every
    additional group of channels the mix creates (each storage class present is a separate kernel
    group), measured on the grid's mixed points of the same face of the simplex, and
    ``overhead = T_fp32_model - sum over layers of L_fp32(layer)``: the measured latency of the
    whole fp32 model compiled for the target minus its layers measured alone. It holds what is not
    a layer (normalisation, pooling, the unfused adds) and is *negative* when per-call costs
    that every single-layer measurement pays (a VM call, output allocation) outweigh it, so that
    ``T(plan) = T_fp32_model + sum (L_q - L_fp32)``: those costs cancel layer by layer.
    ``ratio(plan) = T(plan) / T_fp32_model`` is what a ``latency:R`` budget bounds.
    Every number is a median of 100 results of about 1 ms each (:mod:`cwhawq.bench`); a whole
    model (the fp32 model here, the plans of a prediction check), whose one call can last longer
    than the time slices of other processes on a shared CPU, is measured in three rounds spread
    over the build and its lowest median kept (on a dedicated board the rounds agree). Not modelled:
    ``free`` (non power-of-two) activation scales, which run the float fallback kernels (such a
    layer is priced as ``D=2``).

Cache
    Every measurement is a JSON file under ``$CWHAWQ_CACHE`` (default
    ``$XDG_CACHE_HOME/cwhawq/latency``, i.e. ``~/.cache/cwhawq/latency``), named by the SHA-256 of
    (layer shape, stride, padding, dilation, groups, activation sign, weight-bit counts per class,
    ``D``, batch, target JSON, where it was measured: ``local`` or the RPC key, and the tool
    version: cwhawq and TVM versions plus a hash of the exporter, quantizer, kernel and backend
    sources). A second table for the same model and target compiles and measures nothing.

For the search (:mod:`cwhawq.search`): ``table.ratio(plan)`` or the separable
``table.cost_model(infos)`` (a :class:`cwhawq.search.costs.LayerLatencyCost`), e.g.
``make_cost_model(parse_budget("latency:0.5"), infos, latency=LatencyTable.load(p).cost_model(infos))``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .bench import BoardPool, Remote, make_job, summarize
from .errors import CwhawqError, PlanError

TABLE_FORMAT = "cwhawq-latency-table"
TABLE_VERSION = 1
BIT_CLASSES = (8, 4, 2)
DEFAULT_GRID = 2
WHOLE_MODEL_ROUNDS = 3  # whole models: the least-contended of this many medians (module docstring)


class LatencyError(CwhawqError):
    """A latency table that cannot be built, read or applied."""


# ===================================================================================== small math
def bit_class(b: int) -> int:
    """The storage class of a weight bit-width: 8 (8, 6 bits), 4 (4, 3 bits) or 2."""
    b = int(b)
    return 8 if b >= 6 else 4 if b >= 3 else 2


def class_fractions(w_bits) -> tuple[float, float, float]:
    """(r8, r4, r2): fractions of a layer's output channels in each storage class."""
    w = np.asarray([bit_class(b) for b in np.asarray(w_bits).reshape(-1)])
    n = max(1, w.size)
    return float((w == 8).sum() / n), float((w == 4).sum() / n), float((w == 2).sum() / n)


def grid_points(grid: int) -> list[tuple[int, int]]:
    """Grid points (i, j): r8 = i / grid, r4 = j / grid, r2 = 1 - r8 - r4."""
    return [(i, j) for i in range(grid, -1, -1) for j in range(grid - i, -1, -1)]


def point_counts(point: tuple[int, int], grid: int, channels: int) -> dict[int, int]:
    """Channels per storage class at a grid point (largest remainder, as plans round)."""
    from .plan import largest_remainder

    i, j = point
    c = largest_remainder([i, j, grid - i - j], channels)
    return {8: int(c[0]), 4: int(c[1]), 2: int(c[2])}


def interpolate(values: dict[tuple[int, int], float], grid: int, r8: float, r4: float) -> float:
    """Barycentric interpolation of grid values at (r8, r4) on the simplex's triangulation."""
    x = min(max(r8, 0.0), 1.0) * grid
    y = min(max(r4, 0.0), 1.0) * grid
    if x + y > grid:  # rounding: project back onto the simplex
        s = grid / (x + y)
        x, y = x * s, y * s
    i, j = int(math.floor(x + 1e-9)), int(math.floor(y + 1e-9))
    fx, fy = max(0.0, x - i), max(0.0, y - j)
    if fx + fy <= 1.0 + 1e-12:
        verts = [((i, j), 1.0 - fx - fy), ((i + 1, j), fx), ((i, j + 1), fy)]
    else:
        verts = [((i + 1, j), 1.0 - fy), ((i, j + 1), 1.0 - fx), ((i + 1, j + 1), fx + fy - 1.0)]
    total = 0.0
    for p, wgt in verts:
        if wgt <= 1e-12:
            continue
        if p not in values:
            raise LatencyError(f"latency table misses grid point {p} (grid {grid})")
        total += wgt * values[p]
    return total


def _classes_present(r8: float, r4: float, r2: float) -> tuple[int, ...]:
    return tuple(c for c, x in zip(BIT_CLASSES, (r8, r4, r2)) if x > 1e-12)


def face_extras(values: dict[tuple[int, int], float], grid: int) -> dict[tuple[int, ...], float]:
    """Extra cost of mixing storage classes, per face of the simplex (a set of classes present).

    A face's extra is the mean, over the grid points inside it, of (measured value - the linear
    blend of the pure points); a face with no grid point inside (the three-class face at grid 2)
    gets twice the mean extra of the two-class faces (two extra kernel groups instead of one)."""
    def pure(c):
        p = {8: (grid, 0), 4: (0, grid), 2: (0, 0)}[c]
        if p not in values:
            raise LatencyError(f"latency table misses grid point {p} (grid {grid})")
        return values[p]

    lin = {c: pure(c) for c in BIT_CLASSES}
    sums: dict[tuple[int, ...], list[float]] = {}
    for (i, j), v in values.items():
        r = (i / grid, j / grid, (grid - i - j) / grid)
        face = _classes_present(*r)
        if len(face) > 1:
            sums.setdefault(face, []).append(v - sum(x * lin[c] for c, x in zip(BIT_CLASSES, r)))
    out = {face: float(np.mean(v)) for face, v in sums.items()}
    pairs = [out[f] for f in ((8, 4), (8, 2), (4, 2)) if f in out]
    if (8, 4, 2) not in out and pairs:
        out[(8, 4, 2)] = 2.0 * float(np.mean(pairs))
    return out


def mix_cost(values: dict[tuple[int, int], float], grid: int, r8: float, r4: float, extras=None) -> float:
    """Cost of a layer at class fractions (r8, r4, 1 - r8 - r4): the linear blend of the pure points
    plus the extra of the face the mix lies on (:func:`face_extras`). Exact for costs linear in the
    fractions plus a constant per set of classes present (kernel groups)."""
    r8, r4 = min(max(r8, 0.0), 1.0), min(max(r4, 0.0), 1.0)
    if r8 + r4 > 1.0:
        r8, r4 = r8 / (r8 + r4), r4 / (r8 + r4)
    r = (r8, r4, max(0.0, 1.0 - r8 - r4))
    pure = [values.get(p) for p in ((grid, 0), (0, grid), (0, 0))]
    if any(v is None for v in pure):
        raise LatencyError(f"latency table misses a pure grid point (grid {grid})")
    base = sum(x * v for x, v in zip(r, pure))
    face = _classes_present(*r)
    if len(face) <= 1:
        return base
    extras = face_extras(values, grid) if extras is None else extras
    if face not in extras:  # grid 1 has no mixed point: nothing measured about mixing
        return interpolate(values, grid, r8, r4)
    return base + extras[face]


def act_digits(ranges, signed: bool, a_bits) -> int:
    """Int8 digits per activation value the integer kernels use for a layer (0: float fallback).

    The same scales the simulation and exporter derive (pow2 mode) and the same digit rule the
    kernels apply (:meth:`cwhawq.kernels.problem.ActQuant.digits`)."""
    from . import quantizers as Q
    from .kernels.problem import ActQuant

    ranges = np.asarray(ranges, dtype=np.float64)
    a_bits = np.broadcast_to(np.asarray(a_bits, dtype=np.int64), ranges.shape)
    s, _ = Q.act_scales(ranges, a_bits, signed, "pow2")
    lo, hi = Q.act_bounds(s, a_bits, signed)
    act = ActQuant.build(s, 0, lo, hi, len(s))
    return int(act.digits()[0]) if act.integer else 0


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
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    if shape.kind == "linear":
        return nn.Sequential(nn.Linear(shape.in_channels, shape.out_channels)).eval()
    return nn.Sequential(nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
                                   shape.dilation, shape.groups, bias=True)).eval()


def _calibration(shape: LayerShape, digits: int):
    """Calibration samples whose per-channel ranges make 8-bit activations need ``digits`` digits:
    equal ranges (exponents 0) for one digit, ranges 1 and 1/2 alternating (exponents 1, 0) for two."""
    from .data import Dataset

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
    onnxruntime verification). Should those helpers change, ``export_onnx`` itself is used.
    """

    def __init__(self, shape: LayerShape):
        from .graph import qmodel_from_loaded
        from .models import LoadedModel

        self.shape = shape
        self.loaded = LoadedModel(f"layer:{shape.id}", single_layer_module(shape), tuple(shape.in_shape))
        self.qm = qmodel_from_loaded(self.loaded)
        self._float: dict[int, object] = {}

    def _float_graph(self, opset: int):
        from .export import _torch_export

        if opset not in self._float:
            self._float[opset] = _torch_export(self.qm, self.loaded.input_shape, opset)
        return self._float[opset]

    def write(self, counts: dict[int, int] | None, digits: int, out: Path) -> None:
        """Write the one-layer model (``counts`` None: fp32) with ``digits``-digit activations."""
        import onnx

        from .io import atomic_path

        if counts is None:
            from .export import MIN_OPSET

            model = self._float_graph(MIN_OPSET)
        else:
            from .plan import LayerPlan, Plan

            name = self.qm.layer_infos[0].name
            w_bits = [b for b in BIT_CLASSES for _ in range(counts[b])]
            plan = Plan([LayerPlan(name, w_bits, [8] * self.shape.in_channels)], (2, 4, 8), method="latency-probe")
            try:
                model = self._quantized(plan, digits)
            except (ImportError, AttributeError, TypeError):  # the exporter's internals moved: the slow way
                from .export import export_onnx

                export_onnx(self.loaded, plan, out, data=_calibration(self.shape, digits), verify=0, rounding="nearest")
                return
        with atomic_path(out) as tmp:
            onnx.save_model(model, str(tmp))

    def _quantized(self, plan, digits: int):
        import copy

        from .export import build_model, required_opset
        from .quantize import quantize_model

        plan.validate(self.qm.layer_infos)
        sim = quantize_model(self.qm, plan, _calibration(self.shape, digits))
        opset = required_opset(plan, "qdq")
        model = copy.deepcopy(self._float_graph(opset))
        build_model(model, self.qm, sim, "qdq", opset)
        return model


def fp32_onnx(loaded, out: Path) -> None:
    """The fp32 model (batch norms folded, as the exporter sees it) as ONNX, batch symbolic."""
    from .export import export_fp32

    export_fp32(loaded, out)


# ===================================================================================== cache
def default_cache_dir() -> Path:
    env = os.environ.get("CWHAWQ_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cwhawq" / "latency"


_CODE_FILES = ("export.py", "quantizers.py", "kernels", "backends")


def tool_version() -> dict:
    """cwhawq and TVM versions plus a hash of the sources that decide what a layer compiles to."""
    import tvm

    root = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CODE_FILES:
        p = root / name
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return {"cwhawq": __version__, "tvm": str(tvm.__version__), "code": h.hexdigest()[:16]}


class LatencyCache:
    """One JSON file per measurement, named by the SHA-256 of its key (written atomically)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    @staticmethod
    def key(fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec if isinstance(rec, dict) and "median_s" in rec else None

    def put(self, key: str, record: dict) -> None:
        from .io import write_json

        try:
            write_json(self.path(key), record)
        except OSError as exc:
            raise LatencyError(f"cannot write the latency cache {self.root}: {exc.strerror}") from None


# ===================================================================================== the table
class LatencyTable:
    """A measured latency table (see the module docstring); the search's latency cost model.

    ``predict(plan) -> seconds``, ``ratio(plan) -> T(plan) / T_fp32``, ``layer_seconds(name, w_bits,
    a_bits)``, ``cost_model(infos)`` (separable, for :func:`cwhawq.search.costs.make_cost_model`).
    """

    def __init__(self, data: dict):
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise LatencyError("not a cwhawq latency table (format != cwhawq-latency-table)")
        if int(data.get("version", 0)) != TABLE_VERSION:
            raise LatencyError(f"latency table version {data.get('version')} is not supported (need {TABLE_VERSION})")
        self.data = data
        self.grid = int(data["grid"])
        self._layers = {e["name"]: e for e in data["layers"]}
        self._cells: dict[str, dict[int, dict[tuple[int, int], float]]] = {}
        for sid, s in data["shapes"].items():
            self._cells[sid] = {int(d): {(int(i), int(j)): float(v) for i, j, v in pts}
                                for d, pts in s["cells"].items()}
        self._digits_cache: dict = {}
        self._extras = {sid: {d: face_extras(v, self.grid) for d, v in cells.items()}
                        for sid, cells in self._cells.items()}

    # -------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        if not p.is_file():
            raise LatencyError(f"latency table not found: {p}")
        try:
            return cls(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise LatencyError(f"{p} is not valid JSON: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyError(f"{p}: malformed latency table ({exc})") from None

    def save(self, path: str | Path) -> None:
        from .io import write_json

        write_json(path, self.data)

    def to_dict(self) -> dict:
        return self.data

    # -------------------------------------------------------------- queries
    @property
    def fp32_seconds(self) -> float:
        """Measured latency of the whole fp32 model compiled for the target."""
        return float(self.data["fp32"]["model_s"])

    @property
    def overhead_seconds(self) -> float:
        """fp32 model minus the sum of its layers measured alone (may be negative)."""
        return float(self.data["fp32"]["overhead_s"])

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.data["layers"]]

    def digits(self, name: str, a_bits) -> int:
        e = self._entry(name)
        key = (name, tuple(int(b) for b in np.asarray(a_bits).reshape(-1)))
        if key not in self._digits_cache:
            if len(key[1]) != len(e["a_ranges"]):
                raise PlanError(f"layer {name}: {len(key[1])} activation bits for {len(e['a_ranges'])} input channels")
            self._digits_cache[key] = act_digits(e["a_ranges"], e["a_signed"], key[1])
        return self._digits_cache[key]

    def _entry(self, name: str) -> dict:
        try:
            return self._layers[name]
        except KeyError:
            raise PlanError(f"layer {name!r} is not in the latency table (a table for another model?)") from None

    def layer_seconds(self, name: str, w_bits, a_bits) -> float:
        """Predicted latency of one layer alone at these per-channel bits."""
        e = self._entry(name)
        cells = self._cells[e["shape"]]
        d = self.digits(name, a_bits)
        if d not in cells:
            d = max(cells) if d == 0 or d > max(cells) else min(cells, key=lambda k: abs(k - d))
        r8, r4, _ = class_fractions(w_bits)
        return mix_cost(cells[d], self.grid, r8, r4, self._extras[e["shape"]][d])

    def layer_fp32_seconds(self, name: str) -> float:
        return float(self.data["shapes"][self._entry(name)["shape"]]["fp32_s"])

    def predict(self, plan) -> float:
        """Predicted whole-model latency (seconds) of a plan (a Plan or a plan file)."""
        if not hasattr(plan, "layers"):
            from .plan import load_plan

            plan = load_plan(plan)
        names = {lp.name for lp in plan.layers}
        missing = [n for n in self.names if n not in names]
        if missing:
            raise PlanError(f"plan has no entry for layer {missing[0]!r} of the latency table")
        per_layer = [self.layer_seconds(n, plan[n].w_bits, plan[n].a_bits) for n in self.names]
        # a whole model is never faster than its slowest layer run alone (each alone-measurement
        # holds one call's overhead, as the model does): a floor against noise in the differences
        return max(self.overhead_seconds + sum(per_layer), max(per_layer, default=0.0))

    def ratio(self, plan) -> float:
        """Predicted latency relative to the fp32 model compiled for the same target (``latency:R``)."""
        return self.predict(plan) / self.fp32_seconds

    def cost_model(self, infos):
        """The table as a separable :class:`cwhawq.search.costs.LayerLatencyCost` over ``infos``:
        layer cost = ``layer_seconds / T_fp32``, constant = ``overhead / T_fp32``; total = ratio."""
        from .search.costs import LayerLatencyCost

        for i in infos:
            self._entry(i.name)
        t = self.fp32_seconds
        return LayerLatencyCost(infos, lambda info, w, a: self.layer_seconds(info.name, w, a) / t,
                                const=self.overhead_seconds / t)

    def summary(self) -> dict:
        d = self.data
        return {"model": d["model"], "target": d["target"]["name"], "batch": d["batch"], "where": d["where"],
                "grid": self.grid, "layers": len(d["layers"]), "shapes": len(d["shapes"]),
                "fp32_model_s": self.fp32_seconds, "overhead_s": self.overhead_seconds, **d.get("stats", {}),
                "checks": d.get("checks", [])}


# ===================================================================================== building
def _model_fingerprint(qm) -> str:
    h = hashlib.sha256(qm.gm.code.encode())
    for k, v in sorted(qm.gm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass
class _Cell:
    key: str
    fields: dict
    label: str
    shape_id: str | None = None
    digits: int | None = None
    point: tuple | None = None     # None: fp32
    shape: LayerShape | None = None
    result: dict | None = None
    cached: bool = False


def _check_plan_spec(spec, infos):
    """A plan file, a Plan, or ``uniform:W`` (every weight at W bits, activations 8)."""
    from .plan import Plan, load_plan, uniform_plan

    if isinstance(spec, Plan):
        return spec, spec.method or "plan"
    s = str(spec)
    if s.startswith("uniform:"):
        try:
            w = int(s.split(":", 1)[1])
        except ValueError:
            raise PlanError(f"--check {s!r}: use uniform:W (W in 2,3,4,6,8) or a plan file") from None
        from .quantizers import BIT_CHOICES

        if w not in BIT_CHOICES:
            raise PlanError(f"--check {s!r}: weight bits must come from {list(BIT_CHOICES)}")
        p = uniform_plan(infos, w, 8)
        p.method = s
        return p, f"uniform W{w}A8"
    return load_plan(s), Path(s).name


def build_table(model: str, target: str = "llvm", out: str | Path | None = None, batch: int = 1,
                remote: Remote | None = None, grid: int = DEFAULT_GRID, data=None,
                data_dir: str | None = None, calib_batches: int = 4, cache_dir: str | Path | None = None,
                checks=(), repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10,
                timeout: float = 60.0, max_boards: int | None = None, jobs: int | None = None,
                log=None) -> LatencyTable:
    """Build (or complete from the cache) the latency table of ``model`` for ``target``.

    ``checks``: plans (files, Plans or ``uniform:W``) compiled whole and measured to check the
    prediction (``table.data["checks"]``). Everything is compiled first (``jobs`` processes, default
    two), then measured: on this machine (``remote=None``, one measurement at a time) or on every
    free board behind the tracker, in parallel.
    """
    from . import api
    from .backends.targets import resolve_target
    from .evaluate import check_input_shape
    from .graph import qmodel_from_loaded
    from .models import load_model
    from .quantize import calibrate_ranges

    from .checks import check_outputs, check_plan_model, data_file, require_data

    log = log or (lambda m: None)
    t_start = time.time()
    check_outputs([("--out", out)], [("MODEL", None if str(model).startswith("zoo:") else str(model)),
                                     ("--data", data_file(data))]
                  + [("--check", c) for c in checks
                     if isinstance(c, (str, Path)) and not str(c).startswith("uniform:")])
    if grid < 1 or grid > 8:
        raise LatencyError("--grid must be in 1..8")
    if batch < 1:
        raise LatencyError("--batch must be >= 1")
    ts = resolve_target(target)
    loaded = load_model(model)
    data = require_data(loaded, data, "calibrate it on")
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    check_plans = [_check_plan_spec(c, infos) for c in checks]
    for (p, name), c in zip(check_plans, checks):
        if not isinstance(c, str) or not c.startswith("uniform:"):
            check_plan_model(p, loaded, f"--check {name}")
        p.validate(infos)
    calib = api.calibration_set(data, data_dir, calib_batches)
    check_input_shape(loaded.input_shape, calib)
    ranges = calibrate_ranges(qm, calib)
    tool = tool_version()
    where = f"rpc:{remote.key}" if remote else "local"
    base = {"batch": int(batch), "target": ts.config, "device": ts.device, "where": where, "tool": tool}
    cache = LatencyCache(cache_dir)

    shapes: dict[str, LayerShape] = {}
    layers = []
    for info in infos:
        signed = bool((ranges[info.name]["min"] < 0).any())
        shp = LayerShape.of_layer(info, qm.layer(info.name), signed)
        shapes.setdefault(shp.id, shp)
        layers.append({"name": info.name, "shape": shp.id, "a_signed": signed,
                       "a_ranges": [float(v) for v in ranges[info.name]["range"]]})

    cells: list[_Cell] = []
    for sid, shp in shapes.items():
        f = {**base, "layer": shp.to_dict(), "bits": None}
        cells.append(_Cell(LatencyCache.key(f), f, f"{shp.describe()} fp32", sid, None, None, shp))
        for d in shp.digit_variants():
            for pt in grid_points(grid):
                counts = point_counts(pt, grid, shp.out_channels)
                f = {**base, "layer": shp.to_dict(), "bits": {str(k): v for k, v in counts.items()}, "digits": d}
                mix = "/".join(f"{b}:{counts[b]}" for b in BIT_CLASSES if counts[b])
                cells.append(_Cell(LatencyCache.key(f), f, f"{shp.describe()} w[{mix}] D{d}", sid, d, pt, shp))
    f = {**base, "model": _model_fingerprint(qm), "bits": None}
    model_cell = _Cell(LatencyCache.key(f), f, f"{model} fp32 (whole model)")
    cells.append(model_cell)

    # one measurement per distinct key (equal grid counts on small layers collapse)
    by_key: dict[str, list[_Cell]] = {}
    for c in cells:
        by_key.setdefault(c.key, []).append(c)
    todo = []
    for key, group in by_key.items():
        rec = cache.get(key)
        if rec is not None:
            for c in group:
                c.result, c.cached = rec, True
        else:
            todo.append(group[0])
    n_cached = len(by_key) - len(todo)
    log(f"{len(infos)} layers, {len(shapes)} distinct shapes, {len(by_key)} measurements: {n_cached} cached, "
        f"{len(todo)} to measure ({'local' if remote is None else str(remote)}); cache {cache.root}")

    meas = {"warmup": int(warmup), "repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms)}
    tmp = Path(tempfile.mkdtemp(prefix="cwhawq-latency-"))
    pool = BoardPool(remote, timeout=timeout, max_boards=max_boards, log=log)
    by_id: dict[str, _Cell] = {}
    runs: dict[str, list] = {}

    def finish(job_id, res):
        c = by_id.pop(job_id)
        runs.setdefault(c.key, []).append(res)
        log(f"  {c.label}: {summarize(res['results_s'])['median_s'] * 1e6:.1f} us ({res.get('board')})")

    def record(c: _Cell) -> None:
        """Cache one cell's measurement (the least-contended round of a whole model)."""
        rs = sorted(runs[c.key], key=lambda r: summarize(r["results_s"])["median_s"])
        res = rs[0]
        rec = {**summarize(res["results_s"]), "results_s": res["results_s"], "board": res.get("board"),
               "label": c.label, "digits": c.fields.get("digits"), "lowered": c.fields.get("_lowered"),
               "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "key": {k: v for k, v in c.fields.items() if not k.startswith("_")}}
        if len(rs) > 1:
            rec["round_medians_s"] = [summarize(r["results_s"])["median_s"] for r in runs[c.key]]
        cache.put(c.key, rec)
        for cc in by_key[c.key]:
            cc.result = rec

    try:
        with pool:
            # 1. compile everything (in ``jobs`` processes), 2. measure everything: a measurement
            # never shares the CPU with a compilation. The whole model is measured in
            # WHOLE_MODEL_ROUNDS rounds spread over the measurements (first, middle, last).
            t0 = time.time()
            if todo:
                pool.start()  # the boards connect while this machine compiles
            arts = _compile_all(todo, model_cell, loaded, target, batch, grid, tmp, jobs, log, pool.poll)
            if todo:
                pool.start(wait=True)
            if todo:
                log(f"compiled {len(todo)} models in {time.time() - t0:.0f} s; measuring")
            seq = [(c, art) for c, art in zip(todo, arts) if c is not model_cell]
            if model_cell in todo:
                m = (model_cell, arts[todo.index(model_cell)])
                n = len(seq)
                at = sorted({round(r * n / max(1, WHOLE_MODEL_ROUNDS - 1)) for r in range(WHOLE_MODEL_ROUNDS)},
                            reverse=True) if WHOLE_MODEL_ROUNDS > 1 else [0]
                for pos in at:
                    seq.insert(pos, m)
                seq += [m] * (WHOLE_MODEL_ROUNDS - len(at))
            for k, (c, art) in enumerate(seq, 1):
                job = make_job(art, ts.device, batch, remote=remote, label=f"[{k}/{len(seq)}] {c.label}", **meas)
                jid = f"{art}#{k}"
                by_id[jid] = c
                pool.submit(jid, job)
                for j, r in pool.collect():
                    finish(j, r)
            for j, r in pool.drain():
                finish(j, r)
            for c in todo:
                record(c)
            table = _assemble(model, ts, batch, remote, grid, tool, meas, shapes, layers, cells, model_cell)
            stats = {"measurements": len(by_key), "cached": n_cached, "measured": len(todo),
                     "boards": len({r.get("board") for rs in runs.values() for r in rs})}
            table.data["checks"] = _checks(table, loaded, check_plans, target, ts, batch, remote, pool, tmp, data,
                                           data_dir, calib_batches, meas, log)
            stats["seconds"] = round(time.time() - t_start, 1)
            table.data["stats"] = stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out:
        table.save(out)
    return table


def _compile_shape(target: str, batch: int, shape: dict, items: list) -> list:
    """Export and compile the cells of one layer shape (runs in a compile process).

    ``items``: ``(counts or None, digits, onnx path, artifact path)``; returns ``(lowered, digits)``
    per item, the digits the compiled kernel actually uses (0: float path, None: not lowered)."""
    from .backends.tvm import compile_model

    ex = OneLayerExporter(LayerShape.from_dict(shape))
    out = []
    for counts, digits, onnx_path, art in items:
        ex.write(counts, digits, Path(onnx_path))
        res = compile_model(onnx_path, target, art, batch=batch)
        Path(onnx_path).unlink(missing_ok=True)
        lowered = res.report["lowered"]
        act = (lowered[0].get("act") or {}) if lowered else {}
        out.append((bool(lowered), (act.get("digits") if act.get("integer") else 0) if lowered else None))
    return out


def _compile_all(todo, model_cell, loaded, target, batch, grid, tmp: Path, jobs, log, poll=None) -> list[Path]:
    """Compile every cell to be measured; returns the artifacts in ``todo`` order. ``poll()`` is
    called after each shape (the board pool: a tracker that cannot be reached fails early)."""
    from .backends.tvm import compile_model

    arts = [tmp / f"{k}.so" for k in range(len(todo))]
    groups: dict[str, list[int]] = {}
    for k, c in enumerate(todo):
        if c is not model_cell:
            groups.setdefault(c.shape_id, []).append(k)
    tasks = []
    for sid, ks in groups.items():
        shape = todo[ks[0]].shape
        items = [(None if todo[k].point is None else point_counts(todo[k].point, grid, shape.out_channels),
                  todo[k].digits or 1, str(tmp / f"{k}.onnx"), str(arts[k])) for k in ks]
        tasks.append((sid, ks, shape, items))

    def record(ks, shape, outs):
        for k, (lowered, got) in zip(ks, outs):
            c = todo[k]
            c.fields["_lowered"] = lowered
            if c.digits is not None and lowered and got != c.digits:
                raise LatencyError(f"internal: the one-layer model of {shape.describe()} compiled with {got} "
                                   f"activation digit(s), expected {c.digits}")
        log(f"compiled {shape.describe()}: {len(ks)} model(s)")
        if poll is not None:
            poll()

    jobs = max(1, int(jobs if jobs else min(2, os.cpu_count() or 1)))
    if jobs == 1 or len(tasks) <= 1:
        for sid, ks, shape, items in tasks:
            record(ks, shape, _compile_shape(target, batch, shape.to_dict(), items))
    else:
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = {ex.submit(_compile_shape, target, batch, shape.to_dict(), items): (ks, shape)
                    for sid, ks, shape, items in tasks}
            try:
                for fut in cf.as_completed(futs):
                    ks, shape = futs[fut]
                    record(ks, shape, fut.result())
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    if model_cell in todo:
        k = todo.index(model_cell)
        fp32_onnx(loaded, tmp / f"{k}.onnx")
        compile_model(tmp / f"{k}.onnx", target, arts[k], batch=batch)
        log("compiled the whole fp32 model")
    return arts


def _assemble(model, ts, batch, remote, grid, tool, meas, shapes, layers, cells, model_cell) -> LatencyTable:
    shape_out = {}
    for sid, shp in shapes.items():
        shape_out[sid] = {"shape": shp.to_dict(), "describe": shp.describe(), "fp32_s": None, "lowered": None,
                          "cells": {}}
    for c in cells:
        if c is model_cell:
            continue
        s = shape_out[c.shape_id]
        if c.point is None:
            s["fp32_s"] = c.result["median_s"]
        else:
            s["cells"].setdefault(str(c.digits), []).append([c.point[0], c.point[1], c.result["median_s"]])
            if c.result.get("lowered") is not None:
                s["lowered"] = c.result["lowered"]
    layers_fp32 = sum(shape_out[e["shape"]]["fp32_s"] for e in layers)
    t_model = model_cell.result["median_s"]
    data = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "model": model, "target": ts.summary(),
        "batch": int(batch), "where": str(remote) if remote else "local", "tool": tool,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "grid": int(grid), "bit_classes": list(BIT_CLASSES), "measure": meas,
        "fp32": {"model_s": t_model, "layers_s": layers_fp32, "overhead_s": t_model - layers_fp32},
        "shapes": shape_out, "layers": layers,
    }
    return LatencyTable(data)


def _measure_whole(pool, jobs: list[dict]) -> tuple[list[list[float]], list]:
    """Median of every job in each of WHOLE_MODEL_ROUNDS rounds (all jobs once per round, one after
    another), and the board that measured it: whole models keep their least-contended round."""
    medians: list[list[float]] = [[] for _ in jobs]
    boards: list = [None] * len(jobs)
    for _ in range(WHOLE_MODEL_ROUNDS if jobs else 0):
        for k, job in enumerate(jobs):
            res = pool.run(job)
            medians[k].append(summarize(res["results_s"])["median_s"])
            boards[k] = res.get("board")
    return medians, boards


def _compile_plan(loaded, plan, target, batch, onnx_path: Path, art: Path, data, data_dir, calib_batches,
                  rounding="nearest") -> None:
    """Export and compile a plan to time it. The weight codes do not change the latency, so nearest
    rounding (fast) unless ``rounding`` asks otherwise (an artifact that is kept)."""
    from .backends.tvm import compile_model
    from .export import export_onnx

    export_onnx(loaded, plan, onnx_path, data=data, data_dir=data_dir, calib_batches=calib_batches, verify=0,
                rounding=rounding)
    compile_model(onnx_path, target, art, batch=batch)


def _checks(table: LatencyTable, loaded, plans, target, ts, batch, remote, pool, tmp, data, data_dir, calib_batches,
            meas, log) -> list[dict]:
    """Compile whole plans, measure them (WHOLE_MODEL_ROUNDS rounds over all of them, keeping each
    plan's least-contended round, as for the fp32 model) and compare with the table's prediction."""
    jobs = []
    for k, (plan, name) in enumerate(plans):
        onnx_path, art = tmp / f"check{k}.onnx", tmp / f"check{k}.so"
        _compile_plan(loaded, plan, target, batch, onnx_path, art, data, data_dir, calib_batches)
        jobs.append(make_job(art, ts.device, batch, remote=remote, label=f"check {name}", **meas))
    medians, boards = _measure_whole(pool, jobs)
    out = []
    for (plan, name), ms, board in zip(plans, medians, boards):
        measured = min(ms)
        predicted = table.predict(plan)
        out.append({"plan": name, "predicted_s": predicted, "measured_s": measured, "round_medians_s": ms,
                    "rel_error": predicted / measured - 1.0, "predicted_ratio": predicted / table.fp32_seconds,
                    "measured_ratio": measured / table.fp32_seconds, "board": board})
        log(f"check {name}: predicted {predicted * 1e3:.3f} ms, measured {measured * 1e3:.3f} ms "
            f"({out[-1]['rel_error'] * 100:+.1f}%)")
    return out


def measure_artifacts(artifacts, device: str | None = None, batch: int = 1, remote: Remote | None = None,
                      repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10, timeout: float = 60.0,
                      log=None) -> list[dict]:
    """Measure compiled artifacts (``[(path, name)]``; an ``.onnx`` file runs in onnxruntime) in the
    same WHOLE_MODEL_ROUNDS rounds, each round a median of ``repeat`` short runs (``cwhawq bench``'s
    statistics), and keep each one's least-contended round: ``[{name, measured_s, round_medians_s,
    board}]`` in the order given."""
    meas = {"warmup": int(warmup), "repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms)}
    jobs = [make_job(p, None if str(p).endswith(".onnx") else device, batch, remote=remote, label=name, **meas)
            for p, name in artifacts]
    if log:
        log(f"measuring {len(jobs)} model(s), {WHOLE_MODEL_ROUNDS} rounds ({'local' if remote is None else remote})")
    with BoardPool(remote, timeout=timeout, max_boards=1, log=log) as pool:
        medians, boards = _measure_whole(pool, jobs)
    return [{"name": name, "measured_s": min(ms), "round_medians_s": ms, "board": board}
            for (_, name), ms, board in zip(artifacts, medians, boards)]


def measure_plans(model: str, plans, target: str = "llvm", batch: int = 1, remote: Remote | None = None,
                  table: LatencyTable | None = None, data=None, data_dir: str | None = None,
                  calib_batches: int = 4, repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10,
                  timeout: float = 60.0, artifacts_dir: str | Path | None = None, log=None,
                  rounding="nearest") -> dict:
    """Compile ``plans`` (``[(Plan, name)]``) and the fp32 model for ``target`` and measure them all in
    the same rounds (:func:`measure_artifacts`, here or on a board behind a tracker), so that the
    measured ratio to fp32 compares numbers taken under the same conditions.

    Returns ``{"fp32_s", "fp32_round_medians_s", "plans": [{plan, measured_s, round_medians_s,
    measured_ratio, predicted_s?, predicted_ratio?, rel_error?, board, artifact?}], target, batch,
    where}``; the prediction fields when ``table`` is given. ``artifacts_dir``: keep the compiled
    plans there (``<name>.so``, their weights rounded as ``rounding`` says: ``nearest``, ``learned`` or a
    :class:`cwhawq.rounding.RoundingConfig`); otherwise they live in a temporary directory (nearest
    rounding: the codes do not change the latency)."""
    from .backends.targets import resolve_target
    from .backends.tvm import compile_model
    from .models import load_model

    from .checks import require_data

    log = log or (lambda m: None)
    ts = resolve_target(target)
    loaded = load_model(model)
    data = require_data(loaded, data, "calibrate it on")
    tmp = Path(tempfile.mkdtemp(prefix="cwhawq-measure-"))
    keep = Path(artifacts_dir) if artifacts_dir else None
    try:
        fp32_onnx(loaded, tmp / "fp32.onnx")
        compile_model(tmp / "fp32.onnx", target, tmp / "fp32.so", batch=batch)
        arts = [(tmp / "fp32.so", "fp32")]
        for k, (plan, name) in enumerate(plans):
            art = (keep / f"{name}.so") if keep else tmp / f"plan{k}.so"
            log(f"compiling {name} for {ts.name}")
            _compile_plan(loaded, plan, target, batch, tmp / f"plan{k}.onnx", art, data, data_dir, calib_batches,
                          rounding if artifacts_dir is not None else "nearest")
            arts.append((art, name))
        res = measure_artifacts(arts, ts.device, batch, remote, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                warmup=warmup, timeout=timeout, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fp32_s = res[0]["measured_s"]
    out = {"target": ts.name, "batch": int(batch), "where": str(remote) if remote else "local",
           "fp32_s": fp32_s, "fp32_round_medians_s": res[0]["round_medians_s"], "plans": []}
    for (plan, name), m, (art, _) in zip(plans, res[1:], arts[1:]):
        rec = {"plan": name, "measured_s": m["measured_s"], "round_medians_s": m["round_medians_s"],
               "measured_ratio": m["measured_s"] / fp32_s, "board": m["board"]}
        if keep:
            rec["artifact"] = str(art)
        if table is not None:
            pred = table.predict(plan)
            rec.update(predicted_s=pred, predicted_ratio=pred / table.fp32_seconds,
                       rel_error=pred / m["measured_s"] - 1.0)
        out["plans"].append(rec)
        log(f"{name}: measured {m['measured_s'] * 1e3:.3f} ms ({rec['measured_ratio']:.3f} x fp32 "
            f"{fp32_s * 1e3:.3f} ms)" + (f", predicted {rec['predicted_s'] * 1e3:.3f} ms "
                                          f"({rec['rel_error'] * 100:+.1f}%)" if table else ""))
    return out


def table_text(table: LatencyTable) -> str:
    d = table.data
    lines = [f"latency table of {d['model']} for {d['target']['name']} (batch {d['batch']}, {d['where']}, grid "
             f"{d['grid']}): {len(d['layers'])} layers, {len(d['shapes'])} distinct shapes"]
    lines.append(f"fp32 model {table.fp32_seconds * 1e3:.3f} ms; layers alone {d['fp32']['layers_s'] * 1e3:.3f} ms; "
                 f"overhead {table.overhead_seconds * 1e3:+.3f} ms")
    for sid, s in d["shapes"].items():
        pure = {}
        for dd, pts in s["cells"].items():
            for i, j, v in pts:
                if (i, j) == (d["grid"], 0):
                    pure[f"W8 D{dd}"] = v
                if (i, j) == (0, 0):
                    pure[f"W2 D{dd}"] = v
        extra = "  ".join(f"{k} {v * 1e6:.1f}" for k, v in sorted(pure.items()))
        lines.append(f"  {s['describe']:<40} fp32 {s['fp32_s'] * 1e6:8.1f} us  {extra}")
    st = d.get("stats", {})
    if st:
        lines.append(f"{st.get('measurements')} measurements: {st.get('cached')} cached, {st.get('measured')} measured "
                     f"({st.get('seconds')} s)")
    for c in d.get("checks", []):
        lines.append(f"check {c['plan']}: predicted {c['predicted_s'] * 1e3:.3f} ms, measured "
                     f"{c['measured_s'] * 1e3:.3f} ms ({c['rel_error'] * 100:+.1f}%), ratio to fp32 "
                     f"{c['measured_ratio']:.3f}")
    return "\n".join(lines)
