"""Cost models: what a budget measures, computed exactly as :func:`cwhawq.plan.plan_metrics` does.

A cost model turns a plan (per layer: weight bits per output channel, activation bits per input
channel) into the number a :class:`~cwhawq.plan.Budget` bounds:

- ``size``: packed weight bytes + one float32 scale per output channel, over fp32 bytes (``size_ratio``);
- ``bits``: average weight bits over all weights (``avg_w_bits``);
- ``bops``: bit operations over fp32 BOPs (``bops_ratio``);
- ``latency``: a ratio to fp32 latency, from a measured latency model (plugged in later).

The three built-in costs are *separable*: total = sum over layers of a per-layer cost, so the search
environment updates one layer at a time. A latency model can be plugged in either as a per-layer
function (``layer_fn(info, w_bits, a_bits) -> share of the fp32 latency``, separable) or as a plain
callable ``plan -> latency ratio`` (not separable: the whole plan is re-costed after each change).
Without one, ``latency:`` budgets are refused with a :class:`BudgetError`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import PlanError
from ..plan import Budget, LayerPlan, Plan, fp32_bytes, layer_bops, layer_weight_bytes, plan_metrics


class BudgetError(PlanError):
    """A budget the search cannot honour (unknown kind, no latency model, below the cheapest plan)."""


class CostModel:
    """Maps per-layer bits to the budget's metric. Subclasses define :meth:`layer_cost` (separable) or
    override :meth:`total`."""

    metric: str = ""
    separable: bool = True
    depends_on_acts: bool = False

    def __init__(self, infos):
        self.infos = list(infos)

    def layer_cost(self, i: int, w_bits, a_bits) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def total(self, bits: list[tuple]) -> float:
        """Cost of a full assignment ``[(w_bits, a_bits) per layer]`` (layer order of ``infos``)."""
        return float(sum(self.layer_cost(i, w, a) for i, (w, a) in enumerate(bits)))

    def exact(self, plan: Plan) -> float:
        """The value the budget is checked against (``plan_metrics`` for the built-in kinds)."""
        return float(plan_metrics(plan, self.infos)[self.metric])


class SizeCost(CostModel):
    metric = "size_ratio"

    def __init__(self, infos):
        super().__init__(infos)
        self.fp32 = fp32_bytes(self.infos)

    def layer_cost(self, i, w_bits, a_bits):
        return layer_weight_bytes(self.infos[i], w_bits) / self.fp32


class BitsCost(CostModel):
    metric = "avg_w_bits"

    def __init__(self, infos):
        super().__init__(infos)
        self.n_w = sum(i.params for i in self.infos)

    def layer_cost(self, i, w_bits, a_bits):
        info = self.infos[i]
        return float(np.sum(np.asarray(w_bits) * info.weight_elems_per_channel)) / self.n_w


class BopsCost(CostModel):
    metric = "bops_ratio"
    depends_on_acts = True

    def __init__(self, infos):
        super().__init__(infos)
        self.fbops = sum(i.macs * 32 * 32 for i in self.infos)

    def layer_cost(self, i, w_bits, a_bits):
        return layer_bops(self.infos[i], w_bits, a_bits) / self.fbops


class LayerLatencyCost(CostModel):
    """Separable latency: ``layer_fn(info, w_bits, a_bits)`` gives each layer's share of fp32 latency."""

    metric = "latency_ratio"
    depends_on_acts = True

    def __init__(self, infos, layer_fn: Callable, const: float = 0.0):
        super().__init__(infos)
        self.layer_fn, self.const = layer_fn, float(const)

    def layer_cost(self, i, w_bits, a_bits):
        return float(self.layer_fn(self.infos[i], w_bits, a_bits))

    def total(self, bits):
        return self.const + super().total(bits)

    def exact(self, plan):
        return self.total([(plan[i.name].w_bits, plan[i.name].a_bits) for i in self.infos])


class PlanLatencyCost(CostModel):
    """Non-separable latency: a callable ``plan -> latency ratio`` (e.g. a measured latency table)."""

    metric = "latency_ratio"
    separable = False
    depends_on_acts = True

    def __init__(self, infos, fn: Callable[[Plan], float], bit_set=(2, 4, 8)):
        super().__init__(infos)
        self.fn, self.bit_set = fn, tuple(bit_set)

    def total(self, bits):
        plan = Plan([LayerPlan(i.name, list(map(int, w)), list(map(int, a))) for i, (w, a) in zip(self.infos, bits)],
                    self.bit_set)
        return float(self.fn(plan))

    def exact(self, plan):
        return float(self.fn(plan))


def make_cost_model(budget: Budget, infos, latency=None, bit_set=(2, 4, 8)) -> CostModel:
    """The cost model of a budget. ``latency``: a :class:`CostModel`, a callable ``plan -> ratio``,
    or None (then ``latency:`` budgets raise :class:`BudgetError`)."""
    if budget.kind == "size":
        return SizeCost(infos)
    if budget.kind == "bits":
        return BitsCost(infos)
    if budget.kind == "bops":
        return BopsCost(infos)
    if budget.kind == "latency":
        if latency is None:
            raise BudgetError(f"budget {budget}: latency budgets need a measured latency table, which this "
                              f"version does not have yet; use size:R, bits:B or bops:R")
        if isinstance(latency, CostModel):
            return latency
        if callable(latency):
            return PlanLatencyCost(infos, latency, bit_set)
        raise BudgetError(f"latency model must be a CostModel or a callable plan -> ratio, "
                          f"got {type(latency).__name__}")
    raise BudgetError(f"budget kind {budget.kind!r} unknown: use size:R, bits:B, bops:R or latency:R")
