"""Bit plans: schema, validation, metrics, budgets and the ratio -> channel assignment.

A plan gives every quantized layer the bits of each weight output channel and of each input
activation channel. JSON (see docs/plans.md)::

    {"format": "cwhawq-plan", "version": 1, "model": "zoo:resnet20-fmnist", "model_sha256": null,
     "bit_set": [2, 4, 8], "method": "cw-greedy", "budget": "size:0.125",
     "layers": [{"name": "conv1", "w_bits": [8, 4, ...], "a_bits": [8]}, ...],
     "metrics": {...}, "meta": {...}}
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PlanError
from .quantizers import BIT_CHOICES

DEFAULT_BIT_SET = (2, 4, 8)
PLAN_FORMAT, PLAN_VERSION = "cwhawq-plan", 1
SCALE_BYTES = 4  # one float32 scale per output channel
BUDGET_KINDS = ("size", "bits", "bops", "latency")


@dataclass
class LayerPlan:
    name: str
    w_bits: list[int]
    a_bits: list[int]

    def to_dict(self) -> dict:
        return {"name": self.name, "w_bits": [int(b) for b in self.w_bits], "a_bits": [int(b) for b in self.a_bits]}


@dataclass
class Plan:
    layers: list[LayerPlan]
    bit_set: tuple[int, ...] = DEFAULT_BIT_SET
    model: str | None = None
    method: str | None = None
    budget: str | None = None
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_sha256: str | None = None   # SHA-256 of the .pt2 the plan was made for (None: a zoo model)

    def __post_init__(self):
        self._by_name = {lp.name: lp for lp in self.layers}

    def __getitem__(self, name: str) -> LayerPlan:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [lp.name for lp in self.layers]

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model,
                "model_sha256": self.model_sha256, "bit_set": list(self.bit_set),
                "method": self.method, "budget": self.budget,
                "layers": [lp.to_dict() for lp in self.layers], "metrics": self.metrics, "meta": self.meta}

    def save(self, path) -> None:
        from .io import write_json

        write_json(path, self.to_dict(), indent=None)

    def validate(self, infos) -> None:
        """Check the plan against a model's layers; raise PlanError naming the field."""
        expected = {i.name: i for i in infos}
        for lp in self.layers:
            if lp.name not in expected:
                raise PlanError(f"plan layer {lp.name!r} is not a quantizable layer of this model "
                                f"(a plan for another model?)")
        for i in infos:
            if i.name not in self._by_name:
                raise PlanError(f"plan has no entry for layer {i.name!r}")
            lp = self._by_name[i.name]
            if len(lp.w_bits) != i.out_channels:
                raise PlanError(f"layers[{i.name}].w_bits has {len(lp.w_bits)} channels, the layer has "
                                f"{i.out_channels} output channels")
            if len(lp.a_bits) != i.in_channels:
                raise PlanError(f"layers[{i.name}].a_bits has {len(lp.a_bits)} channels, the layer has "
                                f"{i.in_channels} input channels")

    def compute_metrics(self, infos) -> dict:
        return plan_metrics(self, infos)


def _bits_list(v, where: str, bit_set) -> list[int]:
    if not isinstance(v, list) or not v:
        raise PlanError(f"{where} must be a non-empty list of bit-widths")
    out = []
    for j, b in enumerate(v):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or int(b) != b:
            raise PlanError(f"{where}[{j}] = {b!r} is not an integer bit-width")
        if int(b) not in bit_set:
            raise PlanError(f"{where}[{j}] = {int(b)} is outside the plan's bit set {sorted(bit_set)}")
        out.append(int(b))
    return out


def plan_from_dict(d: dict, source: str = "plan") -> Plan:
    if not isinstance(d, dict):
        raise PlanError(f"{source}: a plan is a JSON object")
    if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        raise PlanError(f"{source}: format {d.get('format')!r} is not a cwhawq plan")
    if d.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise PlanError(f"{source}: plan version {d.get('version')!r} is not supported (this cwhawq reads "
                        f"version {PLAN_VERSION})")
    for key in ("model", "model_sha256", "method", "budget"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise PlanError(f"{source}: '{key}' must be a string or null, got {d[key]!r}")
    for key in ("metrics", "meta"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise PlanError(f"{source}: '{key}' must be an object, got {type(d[key]).__name__}")
    bit_set = d.get("bit_set", list(DEFAULT_BIT_SET))
    if (not isinstance(bit_set, list) or not bit_set
            or any(isinstance(b, bool) or b not in BIT_CHOICES for b in bit_set)):
        raise PlanError(f"{source}: bit_set must be a list drawn from {list(BIT_CHOICES)}, got {bit_set!r}")
    layers = d.get("layers")
    if not isinstance(layers, list) or not layers:
        raise PlanError(f"{source}: 'layers' must be a non-empty list")
    out, seen = [], set()
    for i, lp in enumerate(layers):
        if not isinstance(lp, dict) or not isinstance(lp.get("name"), str):
            raise PlanError(f"{source}: layers[{i}] needs a 'name'")
        name = lp["name"]
        if name in seen:
            raise PlanError(f"{source}: layer {name!r} appears twice")
        seen.add(name)
        out.append(LayerPlan(name, _bits_list(lp.get("w_bits"), f"layers[{name}].w_bits", bit_set),
                             _bits_list(lp.get("a_bits"), f"layers[{name}].a_bits", bit_set)))
    return Plan(out, tuple(sorted(int(b) for b in bit_set)), d.get("model"), d.get("method"), d.get("budget"),
                d.get("metrics") or {}, d.get("meta") or {}, d.get("model_sha256"))


def load_plan(path) -> Plan:
    p = Path(path)
    if p.is_dir():
        raise PlanError(f"plan {p} is a directory, not a plan file")
    if not p.is_file():
        raise PlanError(f"plan file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{p} is not valid JSON: {e}") from None
    except OSError as e:
        raise PlanError(f"cannot read plan {p}: {e.strerror}") from None
    return plan_from_dict(d, str(p))


def uniform_plan(infos, w_bits: int, a_bits: int, bit_set=None) -> Plan:
    bit_set = tuple(sorted(set(bit_set or DEFAULT_BIT_SET) | {w_bits, a_bits}))
    return Plan([LayerPlan(i.name, [w_bits] * i.out_channels, [a_bits] * i.in_channels) for i in infos], bit_set)


# --------------------------------------------------------------------------------------- metrics
def layer_weight_bytes(info, w_bits) -> float:
    per = info.weight_elems_per_channel
    return float(np.sum(np.asarray(w_bits, dtype=np.float64) * per) / 8.0 + SCALE_BYTES * info.out_channels)


def layer_bops(info, w_bits, a_bits) -> float:
    """Bit operations: sum over (out channel, connected in channel) MACs x w_bits x a_bits."""
    w = np.asarray(w_bits, dtype=np.float64)
    a = np.asarray(a_bits, dtype=np.float64)
    g = max(1, info.groups)
    if g == 1:
        return float(info.macs * w.mean() * a.mean())
    wg = w.reshape(g, -1).mean(axis=1)
    ag = a.reshape(g, -1).mean(axis=1)
    return float(info.macs / g * np.sum(wg * ag))


def fp32_bytes(infos) -> float:
    return float(sum(4 * i.params for i in infos))


def plan_metrics(plan: Plan, infos) -> dict:
    wbytes = sum(layer_weight_bytes(i, plan[i.name].w_bits) for i in infos)
    fbytes = fp32_bytes(infos)
    n_w = sum(i.params for i in infos)
    wbits = sum(float(np.sum(np.asarray(plan[i.name].w_bits) * i.weight_elems_per_channel)) for i in infos) / n_w
    n_a = sum(i.in_channels * i.act_elems_per_channel for i in infos)
    abits = sum(float(np.sum(np.asarray(plan[i.name].a_bits) * i.act_elems_per_channel)) for i in infos) / n_a
    bops = sum(layer_bops(i, plan[i.name].w_bits, plan[i.name].a_bits) for i in infos)
    fbops = sum(i.macs * 32 * 32 for i in infos)
    hist: dict[int, int] = {}
    for i in infos:
        for b in plan[i.name].w_bits:
            hist[b] = hist.get(b, 0) + i.weight_elems_per_channel
    return {"weight_bytes": wbytes, "fp32_bytes": fbytes, "size_ratio": wbytes / fbytes,
            "compression": fbytes / wbytes, "avg_w_bits": wbits, "avg_a_bits": abits, "bops": bops,
            "bops_ratio": bops / fbops, "w_bits_hist": {str(k): v / n_w for k, v in sorted(hist.items())}}


# --------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    kind: str     # size | bits | bops | latency
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"

    @property
    def metric(self) -> str:
        return {"size": "size_ratio", "bits": "avg_w_bits", "bops": "bops_ratio", "latency": "latency_ratio"}[self.kind]

    def satisfied(self, metrics: dict, slack: float = 1e-9) -> bool:
        return metrics[self.metric] <= self.value * (1 + slack)


def parse_budget(s: str) -> Budget:
    if not isinstance(s, str) or ":" not in s:
        raise PlanError(f"budget {s!r} does not parse: use size:R, bits:B, bops:R or latency:R")
    kind, _, val = s.partition(":")
    if kind not in BUDGET_KINDS:
        raise PlanError(f"budget kind {kind!r} unknown: use one of {', '.join(BUDGET_KINDS)}")
    try:
        v = float(val)
    except ValueError:
        raise PlanError(f"budget value {val!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise PlanError(f"budget value must be positive, got {val}")
    if kind in ("size", "bops") and v > 1:
        raise PlanError(f"{kind} budget is a fraction of fp32 (0 < R <= 1), got {v}")
    if kind == "latency" and v > 4:
        # above 1 only for models whose quantized kernels are slower than fp32 (tiny layers)
        raise PlanError(f"latency budget is a ratio to the fp32 latency (0 < R <= 4), got {v}")
    if kind == "bits" and v > 32:
        raise PlanError(f"bits budget is an average weight bit-width (<= 32), got {v}")
    return Budget(kind, v)


# ----------------------------------------------------------------------- ratios -> channel bits
def largest_remainder(ratios, n: int) -> np.ndarray:
    """Integer counts summing to n, proportional to ratios (largest-remainder rounding)."""
    r = np.clip(np.asarray(ratios, dtype=np.float64), 0, None)
    tot = r.sum()
    r = r / tot if tot > 0 else np.full(len(r), 1.0 / len(r))
    raw = r * n
    counts = np.floor(raw).astype(np.int64)
    rem = n - counts.sum()
    if rem > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:rem]] += 1
    return counts


def assign_bits(sensitivity, ratios: dict[int, float]) -> list[int]:
    """Bits per channel: counts from ``ratios`` ({bits: fraction}) by largest remainder; the most
    sensitive channels (highest ``sensitivity``) get the most bits."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    n = len(sens)
    bits = sorted(ratios, reverse=True)
    counts = largest_remainder([ratios[b] for b in bits], n)
    order = np.argsort(-sens, kind="stable")
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for b, c in zip(bits, counts):
        out[order[pos:pos + c]] = b
        pos += c
    return out.tolist()

