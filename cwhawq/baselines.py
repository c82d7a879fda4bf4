"""Baseline plans on the same budget, in the same tool.

- ``uniform``: every channel at one weight bit-width and one activation bit-width.
- ``hawq-v3``: layer-wise bits from an integer linear program (scipy.optimize.milp) minimising the
  summed layer sensitivity Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2 (the layer's average
  trace, as HAWQ-V3 does) under the budget. With mixed activations, each layer picks a
  (weight bits, activation bits) pair and the activation term Omega^a_l(b) is added.
- ``cw-greedy``: channel-wise, no learning: every channel starts at the lowest bit-width; repeatedly
  the channel upgrade with the largest Omega reduction per unit of budget is taken (lazy re-evaluation
  of stale costs), until nothing more fits.

Sensitivities come from a sens.json (``cwhawq analyze``). Budgets: ``size:R`` (packed weight bytes
<= R x fp32 bytes), ``bits:B`` (average weight bits), ``bops:R`` (BOPs <= R x fp32 BOPs).

Each method is registered by name in :data:`PLANNERS` (:func:`register_planner`) with what it needs
(a sensitivity file, a budget); :func:`cwhawq.api.make_plan` and ``cwhawq plan METHOD`` dispatch on
the name and hand the planner a :class:`PlanConfig`.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import PlanError
from .plan import Budget, LayerPlan, Plan, SCALE_BYTES, fp32_bytes, plan_metrics
from .quantizers import BIT_CHOICES



@dataclass(frozen=True)
class PlanConfig:
    """What every planner is given besides the layers and the sensitivity."""

    budget: Budget | None = None
    bit_set: tuple[int, ...] = (2, 4, 8)
    a_bits: int | str = 8          # one bit-width, or "mixed"
    w_bits: int = 8                # uniform only
    latency: object = None         # a LatencyTable or separable latency cost model (latency:R budgets)


@dataclass(frozen=True)
class Planner:
    """A registered plan method: ``make(infos, sens, PlanConfig) -> Plan``."""

    name: str
    make: Callable
    needs_sens: bool = False
    needs_budget: bool = False
    check: Callable | None = None    # check(cfg): cheap option checks before the model is loaded
    help: str = ""


PLANNERS: dict[str, Planner] = {}


def register_planner(name: str, *, needs_sens: bool = False, needs_budget: bool = False, check=None, help: str = ""):
    """Decorator: register ``fn(infos, sens, cfg: PlanConfig) -> Plan`` as plan method ``name``."""
    def deco(fn):
        PLANNERS[name] = Planner(name, fn, needs_sens=needs_sens, needs_budget=needs_budget, check=check, help=help)
        return fn
    return deco


def get_planner(name: str) -> Planner:
    try:
        return PLANNERS[name]
    except KeyError:
        raise PlanError(f"unknown plan method {name!r}: use one of {', '.join(PLANNERS)}") from None


def _sens_by_layer(sens: dict, infos) -> dict:
    by = {l["name"]: l for l in sens["layers"]}
    for i in infos:
        if i.name not in by:
            raise PlanError(f"sensitivity file has no layer {i.name!r} (made for another model?)")
        w = by[i.name]["weight"]
        if len(w["trace"]) != i.out_channels:
            raise PlanError(f"sensitivity of {i.name} has {len(w['trace'])} weight channels, the model "
                            f"{i.out_channels} (made for another model?)")
    return by


def _omega(rec: dict, side: str, b: int) -> np.ndarray:
    om = rec[side]["omega"]
    if str(b) not in om:
        raise PlanError(f"sensitivity file has no Omega for {b} bits (layer {rec['name']})")
    return np.asarray(om[str(b)], dtype=np.float64)


def _latency_cost(infos, budget: Budget | None, latency):
    """The latency cost model of a ``latency:R`` budget (a LatencyTable or a separable cost model)."""
    if budget is None or budget.kind != "latency":
        return None
    if latency is None:
        raise PlanError(f"budget {budget} needs a latency table (--latency-table, from cwhawq latency-table)")
    cm = latency.cost_model(infos) if hasattr(latency, "cost_model") else latency
    if not getattr(cm, "separable", False):
        raise PlanError("the baselines need a separable latency model (a latency table)")
    return cm


def _check(plan: Plan, infos, budget: Budget | None, latency=None) -> Plan:
    plan.metrics = plan_metrics(plan, infos)
    cm = _latency_cost(infos, budget, latency)
    if cm is not None:
        plan.metrics["latency_ratio"] = cm.exact(plan)
    if budget is not None:
        plan.budget = str(budget)
        plan.metrics["meets_budget"] = budget.satisfied(plan.metrics)
    return plan


def uniform(infos, w_bits: int = 8, a_bits: int = 8, budget: Budget | None = None, bit_set=None,
            latency=None) -> Plan:
    bit_set = tuple(sorted(set(bit_set or (2, 4, 8)) | {w_bits, a_bits}))
    plan = Plan([LayerPlan(i.name, [w_bits] * i.out_channels, [a_bits] * i.in_channels) for i in infos],
                bit_set, method="uniform")
    return _check(plan, infos, budget, latency)


def _cost_fns(infos, budget: Budget, latency=None):
    """Per-layer cost(w_bits mean, a_bits mean) in the budget's unit and the budget limit (latency:
    the measured table's per-layer share of the fp32 latency at one bit-width per layer)."""
    if budget.kind == "size":
        limit = budget.value * fp32_bytes(infos)
        return (lambda i, wb, ab: i.params * wb / 8.0 + SCALE_BYTES * i.out_channels), limit
    if budget.kind == "bits":
        n = sum(i.params for i in infos)
        return (lambda i, wb, ab: i.params * wb / n), budget.value
    if budget.kind == "bops":
        limit = budget.value * sum(i.macs * 32 * 32 for i in infos)
        return (lambda i, wb, ab: i.macs * wb * ab), limit
    if budget.kind == "latency":
        cm = _latency_cost(infos, budget, latency)
        idx = {i.name: k for k, i in enumerate(infos)}

        def lat(i, wb, ab):
            return cm.layer_cost(idx[i.name], np.full(i.out_channels, int(wb)), np.full(i.in_channels, int(ab)))
        return lat, budget.value - float(getattr(cm, "const", 0.0))
    raise PlanError(f"budget {budget} is not supported by the baselines (size, bits, bops or latency)")


def hawq_v3(infos, sens: dict, budget: Budget, bit_set=(2, 4, 8), a_bits: int | str = 8, latency=None) -> Plan:
    """Layer-wise ILP (one weight bit-width per layer; activation bits fixed or chosen per layer).
    ``latency:R`` budgets (HAWQ-V3's latency constraint) take the measured table as ``latency``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    by = _sens_by_layer(sens, infos)
    cost, limit = _cost_fns(infos, budget, latency)
    a_set = tuple(bit_set) if a_bits == "mixed" else (int(a_bits),)
    options, c, costs, rows = [], [], [], []
    for li, i in enumerate(infos):
        rec = by[i.name]
        wtr = np.asarray(rec["weight"]["trace"], dtype=np.float64)
        n_w = np.prod(rec["weight"]["shape"][1:])
        atr = np.asarray(rec["activation"]["trace"], dtype=np.float64)
        for bw in bit_set:
            # layer-wise Omega: the layer's average trace times the layer's quantization error
            err_w = _omega(rec, "weight", bw) / np.where(wtr == 0, 1, wtr) * n_w
            om_w = wtr.sum() / (n_w * i.out_channels) * float(np.sum(np.where(wtr == 0, 0, err_w)))
            for ba in a_set:
                om_a = 0.0
                if len(a_set) > 1:
                    om_a = float(np.sum(_omega(rec, "activation", ba)))
                options.append((li, bw, ba))
                c.append(om_w + om_a)
                costs.append(cost(i, bw, ba))
    n = len(options)
    c = np.asarray(c)
    A_eq = np.zeros((len(infos), n))
    for j, (li, _, _) in enumerate(options):
        A_eq[li, j] = 1
    cons = [LinearConstraint(A_eq, 1, 1), LinearConstraint(np.asarray(costs)[None, :], -np.inf, limit)]
    res = milp(c / max(np.abs(c).max(), 1e-300), constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1))
    if not res.success:
        raise PlanError(f"hawq-v3: no layer-wise plan meets budget {budget} ({res.message})")
    chosen = {options[j][0]: options[j] for j in range(n) if res.x[j] > 0.5}
    layers = []
    for li, i in enumerate(infos):
        _, bw, ba = chosen[li]
        layers.append(LayerPlan(i.name, [bw] * i.out_channels, [ba] * i.in_channels))
    plan = Plan(layers, tuple(sorted(set(bit_set) | set(a_set))), method="hawq-v3")
    plan.meta = {"a_bits": a_bits, "objective": float(np.dot(c, res.x))}
    return _check(plan, infos, budget, latency)


def cw_greedy(infos, sens: dict, budget: Budget, bit_set=(2, 4, 8), a_bits: int | str = 8) -> Plan:
    """Channel-wise greedy fill: best Omega reduction per unit of budget first."""
    by = _sens_by_layer(sens, infos)
    bits_sorted = sorted(bit_set)
    mixed_a = a_bits == "mixed"
    if budget.kind == "latency":
        raise PlanError("cw-greedy does not take latency budgets (a channel's latency is not additive): "
                        "use hawq-v3 or cwhawq search")
    cost, limit = _cost_fns(infos, budget)
    w = {i.name: np.full(i.out_channels, bits_sorted[0], dtype=np.int64) for i in infos}
    a = {i.name: np.full(i.in_channels, bits_sorted[0] if mixed_a else int(a_bits), dtype=np.int64) for i in infos}
    om = {}
    for i in infos:
        rec = by[i.name]
        om[(i.name, "w")] = {b: _omega(rec, "weight", b) for b in bits_sorted}
        if mixed_a:
            om[(i.name, "a")] = {b: _omega(rec, "activation", b) for b in bits_sorted}
    info_by = {i.name: i for i in infos}

    def layer_cost(name):
        return cost(info_by[name], w[name].mean(), a[name].mean())

    spent = sum(layer_cost(i.name) for i in infos)
    if spent > limit * (1 + 1e-12):
        raise PlanError(f"cw-greedy: budget {budget} cannot be met even with every channel at "
                        f"{bits_sorted[0]} bits")

    def best_upgrade(name, side, ch):
        """(gain per unit cost, new bits, cost) of the best upgrade of one channel that still fits."""
        arr = (w if side == "w" else a)[name]
        cur = arr[ch]
        base = layer_cost(name)
        best = None
        for nb in bits_sorted:
            if nb <= cur:
                continue
            arr[ch] = nb
            dc = layer_cost(name) - base
            arr[ch] = cur
            if spent + dc > limit * (1 + 1e-12):
                continue
            gain = om[(name, side)][cur][ch] - om[(name, side)][nb][ch]
            ratio = gain / max(dc, 1e-300)
            if best is None or ratio > best[0]:
                best = (ratio, nb, dc)
        return best

    heap = []
    sides = ("w", "a") if mixed_a else ("w",)
    for i in infos:
        for side in sides:
            for ch in range((i.out_channels if side == "w" else i.in_channels)):
                bu = best_upgrade(i.name, side, ch)
                if bu is not None:
                    heapq.heappush(heap, (-bu[0], i.name, side, ch, bu[1]))
    while heap:
        negr, name, side, ch, nb = heapq.heappop(heap)
        bu = best_upgrade(name, side, ch)
        if bu is None:
            continue
        if abs(-negr - bu[0]) > 1e-12 * max(1.0, abs(bu[0])) or bu[1] != nb:
            heapq.heappush(heap, (-bu[0], name, side, ch, bu[1]))   # stale: re-queue with fresh cost
            continue
        arr = (w if side == "w" else a)[name]
        arr[ch] = nb
        spent += bu[2]
        nxt = best_upgrade(name, side, ch)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0], name, side, ch, nxt[1]))
    layers = [LayerPlan(i.name, w[i.name].tolist(), a[i.name].tolist()) for i in infos]
    a_set = set(bits_sorted) if mixed_a else {int(a_bits)}
    plan = Plan(layers, tuple(sorted(set(bits_sorted) | a_set)), method="cw-greedy")
    plan.meta = {"a_bits": a_bits}
    return _check(plan, infos, budget)


# ===================================================================================== registry
def _check_w_bits(cfg: PlanConfig) -> None:
    if int(cfg.w_bits) not in BIT_CHOICES:
        raise PlanError(f"--w-bits {cfg.w_bits}: weight bits must come from {list(BIT_CHOICES)}")


@register_planner("uniform", check=_check_w_bits, help="Every channel at --w-bits / --a-bits (reports whether --budget is met).")
def _uniform_planner(infos, sens, cfg: PlanConfig) -> Plan:
    if cfg.a_bits == "mixed":
        raise PlanError("uniform plans take one activation bit-width (--a-bits N)")
    return uniform(infos, int(cfg.w_bits), cfg.a_bits, cfg.budget, cfg.bit_set, latency=cfg.latency)


@register_planner("hawq-v3", needs_sens=True, needs_budget=True)
def _hawq_v3_planner(infos, sens, cfg: PlanConfig) -> Plan:
    return hawq_v3(infos, sens, cfg.budget, cfg.bit_set, cfg.a_bits, latency=cfg.latency)


@register_planner("cw-greedy", needs_sens=True, needs_budget=True)
def _cw_greedy_planner(infos, sens, cfg: PlanConfig) -> Plan:
    return cw_greedy(infos, sens, cfg.budget, cfg.bit_set, cfg.a_bits)


METHODS = tuple(PLANNERS)
