"""The search environment: the agent walks the quantized layers in graph order and, at each layer,
chooses the ratios of channels at each bit-width; channels take their bits in Hessian-trace order.

State (one vector per layer, every entry in about [0, 1])
    Static part, min-max normalised over the model's layers (a constant feature is 0):
    index, kind (one-hot conv / depthwise / linear), log in-channels, log out-channels, kernel area,
    stride, log parameters, log MACs, log input feature-map size (H x W, 1 for linear), and for the
    weight traces (per output channel) and the activation traces (per input channel): mean
    (log10 of the mean |trace|), spread (std of log10 |trace|), the 10/50/90 % quantiles of
    log10 |trace|, and log10 of the layer's summed Omega at the lowest bit-width.
    Dynamic part: the previous layer's action (zeros at the first layer), and the budget: ``spent``
    (cost of the layers so far as chosen, the remaining layers at the lowest bits, over the budget),
    ``left`` (1 - spent), this layer's cost range and the remaining layers' cost range (cost at the
    highest bits minus cost at the lowest, over the budget).

Action (documented mapping, "stick breaking" over the sorted bit set b_1 < ... < b_K)
    K-1 numbers a_1..a_{K-1} in [0, 1] for the weights, then K'-1 for the activations (none when
    the activation bits are fixed). a_j is the fraction of the channels at >= b_j that move up to
    >= b_{j+1}: the fraction at >= b_{j+1} is a_1 * ... * a_j, so ratio(b_k) = prod_{j<k} a_j *
    (1 - a_k) (a_K = 0). With {2, 4, 8}: a_1 = share of channels above 2 bits, a_2 = share of those
    at 8 bits. Raising any a_j never lowers a layer's bits. With ``action_margin`` m > 0 the agent's
    outputs x are first mapped to a = clip((x - m) / (1 - 2m), 0, 1), so that pure levels (a = 0 or 1)
    are reached by a sigmoid actor and small noise near the ends does not move channels.
    The ratios become channel bits with
    :func:`cwhawq.plan.assign_bits` (largest remainder, most sensitive = highest trace first).

Budget enforcement (exact; least sensitive first)
    When the chosen plan exceeds the budget, channels are demoted one bit level at a time until it
    is met. Within a layer the assignment stays in trace order, so a demotion from level b_k always
    takes the least sensitive channel at b_k. Which demotion comes next (``enforce``):

    - ``omega`` (default, separable costs): the one, over all layers and levels, with the smallest
      increase of the channel's Omega (Hessian trace x quantization error, from the sensitivity
      file) per unit of budget saved: the least sensitive layer (per unit of cost) is lowered first,
      and re-ranked after each step. Under a latency budget the candidates also include jumps (every
      channel of one side of a layer above level b down to b), scored the same way: a measured
      latency can fall only when a whole side leaves a level (the kernels store 8-bit activations
      in two int8 digits unless every channel's scale allows one), which no single-channel move sees;
    - ``layers`` (HAQ's sequential lowering; also the fallback for non-separable latency models):
      passes over the layers ordered from the least to the most sensitive (summed Omega of the
      layer's weights at the lowest bit-width, plus its activations' when those are searched); in a
      pass each layer demotes up to ceil(channels / 8) channels of its highest occupied level
      (8 -> 4 before 4 -> 2).

    A measured latency need not fall with the bits (on a CPU a 2-bit kernel can be slower than a
    4-bit one): the cheapest plan is then each layer at its cheapest pure bit levels, only demotions
    that save time are taken, and when none is left the least sensitive layer still above its
    cheapest levels is set to them, until the budget is met.

    Activations are only demoted when the budget depends on them (BOPs, latency). The budget is
    checked after every demotion, and the final check is the budget's own metric on the finished
    plan (:func:`cwhawq.plan.plan_metrics`, ``Budget.satisfied``), so every plan the environment
    emits meets the budget. Plans under the budget are left as chosen. The actions stored for
    learning are the effective ones (the ratios after enforcement mapped back through the
    stick-breaking inverse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CwhawqError
from ..plan import Budget, LayerPlan, Plan, assign_bits
from .costs import BudgetError, CostModel

KINDS = ("conv", "depthwise", "linear")
N_BUDGET_FEATURES = 4
DEMOTE_CHUNK = 8   # a layer demotes up to ceil(channels / DEMOTE_CHUNK) channels per pass


class SensitivityError(CwhawqError):
    """A sensitivity file that does not match the model."""


def sensitivity_by_layer(sens: dict, infos, source: str = "sensitivity file") -> dict:
    """{layer name: record}, checking that every quantized layer is there with matching channels."""
    layers = sens.get("layers") if isinstance(sens, dict) else None
    if not isinstance(layers, list):
        raise SensitivityError(f"{source} is not a cwhawq sensitivity file (no 'layers')")
    by = {}
    for rec in layers:
        if isinstance(rec, dict) and isinstance(rec.get("name"), str):
            by[rec["name"]] = rec
    for i in infos:
        rec = by.get(i.name)
        if rec is None:
            raise SensitivityError(f"{source} has no layer {i.name!r} (made for another model?)")
        try:
            nw, na = len(rec["weight"]["trace"]), len(rec["activation"]["trace"])
        except (KeyError, TypeError):
            raise SensitivityError(f"{source}: layer {i.name!r} lacks weight/activation traces") from None
        if nw != i.out_channels or na != i.in_channels:
            raise SensitivityError(f"{source}: layer {i.name!r} has {nw} weight / {na} activation traces, the "
                                   f"model has {i.out_channels} output / {i.in_channels} input channels "
                                   f"(made for another model?)")
    return by


# ------------------------------------------------------------------------------ action mapping
def stick_ratios(a, bits) -> dict[int, float]:
    """Ratios over ascending ``bits`` from K-1 stick-breaking fractions ``a`` (see module docstring)."""
    bits = sorted(bits)
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0)
    out, above = {}, 1.0   # above: fraction of channels at >= bits[k]
    for k, b in enumerate(bits):
        up = above * a[k] if k < len(bits) - 1 else 0.0
        out[int(b)] = above - up
        above = up
    return out


def stick_action(counts, bits) -> np.ndarray:
    """Inverse of :func:`stick_ratios` for integer channel counts per ascending bit level."""
    counts = np.asarray(counts, dtype=np.float64)
    at_least = np.cumsum(counts[::-1])[::-1]   # channels at >= bits[k]
    a = np.zeros(len(bits) - 1)
    for k in range(len(bits) - 1):
        a[k] = at_least[k + 1] / at_least[k] if at_least[k] > 0 else 0.0
    return a


def _log10(x: float) -> float:
    return math.log10(max(float(x), 1e-30))


def _trace_stats(trace) -> list[float]:
    t = np.log10(np.clip(np.abs(np.asarray(trace, dtype=np.float64)), 1e-30, None))
    return [_log10(np.mean(10.0 ** t)), float(np.std(t)), *np.quantile(t, [0.1, 0.5, 0.9]).tolist()]


class _Side:
    """The channel bookkeeping of one side (weights or activations) of one layer."""

    __slots__ = ("bits", "n", "order", "counts")

    def __init__(self, bits, sens):
        self.bits = tuple(sorted(bits))
        self.n = len(sens)
        self.order = np.argsort(-np.asarray(sens, dtype=np.float64), kind="stable")
        self.counts = np.zeros(len(self.bits), dtype=np.int64)

    def channel_bits(self, counts=None) -> np.ndarray:
        """Bits per channel for counts per ascending level: the most sensitive channels get the most bits
        (the same assignment as :func:`cwhawq.plan.assign_bits`)."""
        c = self.counts if counts is None else counts
        out = np.empty(self.n, dtype=np.int64)
        out[self.order] = np.repeat(np.asarray(self.bits[::-1]), c[::-1])
        return out


@dataclass(frozen=True)
class EnforceMode:
    """A budget enforcement mode (``enforce=NAME``): ``run(env) -> channel demotions`` lowers the
    finished plan until the budget is met; where ``applies(env)`` is False, ``fallback`` runs instead."""

    name: str
    run: Callable
    applies: Callable = lambda env: True
    fallback: str | None = None


#: enforcement modes by name (the module docstring describes them); registered below the environment
ENFORCE_MODES: dict[str, EnforceMode] = {}


def register_enforce_mode(name: str, run: Callable, applies: Callable | None = None,
                          fallback: str | None = None) -> EnforceMode:
    mode = EnforceMode(name, run, applies or (lambda env: True), fallback)
    ENFORCE_MODES[name] = mode
    return mode


class QuantSearchEnv:
    """Layer-by-layer MDP over bit ratios with exact budget enforcement.

    Usage per episode: ``s = env.reset()``; for each layer ``s = env.step(action)`` (returns None after
    the last layer); ``plan, info = env.finish()``.
    """

    def __init__(self, infos, sens: dict, budget: Budget, cost: CostModel, w_bits=(2, 4, 8), a_bits=(8,),
                 enforce: str = "omega", action_margin: float = 0.0, demote_chunk: int = DEMOTE_CHUNK):
        self.infos = list(infos)
        self.L = len(self.infos)
        self.budget = budget
        self.cost = cost
        self.w_bits = tuple(sorted(int(b) for b in w_bits))
        self.a_bits = tuple(sorted(int(b) for b in a_bits))
        self.bit_set = tuple(sorted(set(self.w_bits) | set(self.a_bits)))
        self.dim_w, self.dim_a = len(self.w_bits) - 1, len(self.a_bits) - 1
        self.action_dim = self.dim_w + self.dim_a
        if self.action_dim == 0:
            raise BudgetError("nothing to search: one weight bit-width and one activation bit-width")
        if enforce not in ENFORCE_MODES:
            raise ValueError(f"enforce must be one of {tuple(ENFORCE_MODES)}, got {enforce!r}")
        self.enforce_mode = enforce
        if not 0.0 <= action_margin < 0.5:
            raise ValueError(f"action_margin must be in [0, 0.5), got {action_margin}")
        self.action_margin = float(action_margin)
        self.demote_chunk = int(demote_chunk)
        # whole-side jumps in the omega enforcement: for costs that are not linear in the channels
        # (measured latency); the built-in size/bits/BOPs costs fall channel by channel
        self._jumps = cost.metric == "latency_ratio"
        by = sensitivity_by_layer(sens, self.infos)
        self._omega = self._omega_tables(by)
        self.w_sens = [np.asarray(by[i.name]["weight"]["trace"], dtype=np.float64) for i in self.infos]
        self.a_sens = [np.asarray(by[i.name]["activation"]["trace"], dtype=np.float64) for i in self.infos]
        self._layer_sens = self._layer_sensitivity(by)
        #: enforcement order: least sensitive layer first (ties by graph order)
        self.order = [int(k) for k in np.argsort(self._layer_sens, kind="stable")]
        self.static = self._static_features(by)
        self.state_dim = self.static.shape[1] + self.action_dim + N_BUDGET_FEATURES
        # cost bookkeeping
        self._w = [_Side(self.w_bits, s) for s in self.w_sens]
        self._a = [_Side(self.a_bits, s) for s in self.a_sens]
        lo = [(np.full(i.out_channels, self.w_bits[0]), np.full(i.in_channels, self.a_bits[0])) for i in self.infos]
        hi = [(np.full(i.out_channels, self.w_bits[-1]), np.full(i.in_channels, self.a_bits[-1])) for i in self.infos]
        self._const = float(getattr(cost, "const", 0.0))
        self._cheapest = None
        if cost.separable:
            # a measured latency need not fall with the bits (a 2-bit kernel can be slower than an 8-bit
            # one): the cheapest and dearest plans are taken over each layer's pure bit levels
            a_levels = self.a_bits if cost.depends_on_acts else (self.a_bits[-1],)
            self._cheapest, self._cmin, self._cmax = [], np.zeros(self.L), np.zeros(self.L)
            for k, i in enumerate(self.infos):
                opts = [(cost.layer_cost(k, np.full(i.out_channels, w), np.full(i.in_channels, a)), w, a)
                        for w in reversed(self.w_bits) for a in reversed(a_levels)]
                c, w, a = min(opts, key=lambda o: o[0])
                self._cheapest.append((w, a))
                self._cmin[k], self._cmax[k] = c, max(o[0] for o in opts)
            lo = [(np.full(i.out_channels, w), np.full(i.in_channels, a))
                  for i, (w, a) in zip(self.infos, self._cheapest)]
        self._min_bits = lo
        self.min_total = cost.total(lo)
        self.max_total = cost.total(hi)
        if not budget.satisfied({cost.metric: self.min_total}):
            lat = cost.separable and cost.metric == "latency_ratio"
            what = (f"every layer at its cheapest bit levels (weights from {list(self.w_bits)}, activations "
                    f"from {list(self.a_bits)})" if lat
                    else f"every channel at the lowest bits ({self.w_bits[0]}-bit weights, "
                         f"{self.a_bits[0]}-bit activations)")
            hint = ("; lower activation bits (--a-bits 6,8) can need fewer int8 digits"
                    if lat and len(self.a_bits) == 1 and self.a_bits[0] == 8 else "")
            raise BudgetError(f"budget {budget} cannot be met: with {what} {cost.metric} is "
                              f"{self.min_total:.6g}{hint}")
        if not cost.separable:
            self._cmin = np.zeros(self.L)
            self._cmax = np.array([cost.total(lo[:k] + [hi[k]] + lo[k + 1:]) - self.min_total for k in range(self.L)])
        self._range = self._cmax - self._cmin
        self.reset()

    # ------------------------------------------------------------------------------ features
    def _layer_sensitivity(self, by) -> np.ndarray:
        out = []
        for i in self.infos:
            rec = by[i.name]
            v = self._omega_sum(rec, "weight", self.w_bits[0])
            if self.dim_a:
                v += self._omega_sum(rec, "activation", self.a_bits[0])
            out.append(v)
        return np.asarray(out)

    def _omega_tables(self, by):
        """[side][layer][level] -> per-channel Omega (weights, activations), or None if bits are missing."""
        out = []
        for side, bits in (("weight", self.w_bits), ("activation", self.a_bits)):
            per_layer = []
            for i in self.infos:
                om = by[i.name][side].get("omega") or {}
                if any(str(b) not in om for b in bits):
                    return None
                per_layer.append([np.asarray(om[str(b)], dtype=np.float64) for b in bits])
            out.append(per_layer)
        return out

    @staticmethod
    def _omega_sum(rec, side, b) -> float:
        om = rec[side].get("omega", {}) if isinstance(rec[side], dict) else {}
        if str(b) in om:
            return float(np.sum(np.abs(np.asarray(om[str(b)], dtype=np.float64))))
        return float(np.sum(np.abs(np.asarray(rec[side]["trace"], dtype=np.float64))))

    def _static_features(self, by) -> np.ndarray:
        rows = []
        for k, i in enumerate(self.infos):
            rec = by[i.name]
            fmap = int(np.prod(i.in_shape[1:])) if len(i.in_shape) > 1 else 1
            row = [k / max(1, self.L - 1)] + [1.0 if i.kind == kd else 0.0 for kd in KINDS]
            row += [math.log(i.in_channels), math.log(i.out_channels), float(i.kernel[0] * i.kernel[1]),
                    float(max(i.stride)), math.log(max(i.params, 1)), math.log(max(i.macs, 1)),
                    math.log(max(fmap, 1))]
            row += _trace_stats(rec["weight"]["trace"]) + [_log10(self._omega_sum(rec, "weight", self.w_bits[0]))]
            row += _trace_stats(rec["activation"]["trace"]) + [
                _log10(self._omega_sum(rec, "activation", self.a_bits[0]))]
            rows.append(row)
        x = np.asarray(rows, dtype=np.float64)
        lo, hi = x.min(0), x.max(0)
        span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
        x = np.where(hi - lo > 1e-12, (x - lo) / span, 0.0)
        x[:, 1:4] = np.asarray(rows)[:, 1:4]  # one-hot kinds stay as they are
        return x.astype(np.float32)

    def _state(self, t: int, prev_action, spent: float) -> np.ndarray:
        B = self.budget.value
        dyn = [spent / B, (B - spent) / B, self._range[t] / B, float(self._range[t + 1:].sum()) / B]
        return np.concatenate([self.static[t], np.asarray(prev_action, np.float32), np.asarray(dyn, np.float32)])

    # ------------------------------------------------------------------------------ episode
    def reset(self) -> np.ndarray:
        self.t = 0
        self.actions: list[np.ndarray] = []
        self._spent_sep = 0.0        # separable: sum of chosen layer costs so far
        for s in self._w + self._a:
            s.counts[:] = 0
        return self._state(0, np.zeros(self.action_dim), self.min_total)

    def _spent(self) -> float:
        """Cost with layers < t as chosen and layers >= t at the lowest bits."""
        if self.cost.separable:
            return self._const + self._spent_sep + float(self._cmin[self.t:].sum())
        bits = [self._layer_bits(k) for k in range(self.t)] + self._min_bits[self.t:]
        return self.cost.total(bits)

    def split_action(self, action):
        """(weight fractions, activation fractions): the action after the end margins."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if a.shape[0] != self.action_dim:
            raise ValueError(f"action has {a.shape[0]} entries, expected {self.action_dim}")
        m = self.action_margin
        if m > 0:
            a = np.clip((a - m) / (1.0 - 2.0 * m), 0.0, 1.0)
        return a[:self.dim_w], a[self.dim_w:]

    def ratios(self, action) -> tuple[dict, dict]:
        aw, aa = self.split_action(action)
        rw = stick_ratios(aw, self.w_bits)
        ra = stick_ratios(aa, self.a_bits) if self.dim_a else {self.a_bits[0]: 1.0}
        return rw, ra

    def step(self, action):
        """Take the current layer's action; return the next layer's state (None after the last)."""
        t = self.t
        rw, ra = self.ratios(action)
        for side, sens, r in ((self._w[t], self.w_sens[t], rw), (self._a[t], self.a_sens[t], ra)):
            bits = np.asarray(assign_bits(sens, r))
            side.counts[:] = [(bits == b).sum() for b in side.bits]
        self.actions.append(np.clip(np.asarray(action, dtype=np.float64).reshape(-1), 0, 1))
        if self.cost.separable:
            self._spent_sep += self.cost.layer_cost(t, *self._layer_bits(t))
        self.t += 1
        if self.t == self.L:
            return None
        return self._state(self.t, self.actions[-1], self._spent())

    def _layer_bits(self, k: int):
        return self._w[k].channel_bits(), self._a[k].channel_bits()

    def effective_actions(self) -> list[np.ndarray]:
        """Per layer, the action that gives the current (enforced) counts (inverse of the mapping)."""
        out = []
        m = self.action_margin
        for k in range(self.L):
            a = [stick_action(self._w[k].counts, self.w_bits)]
            if self.dim_a:
                a.append(stick_action(self._a[k].counts, self.a_bits))
            out.append(m + np.concatenate(a) * (1.0 - 2.0 * m))
        return out

    def states_for(self, actions) -> list[np.ndarray]:
        """The L states an episode with these actions visits (for storing effective transitions)."""
        saved = [(s.counts.copy()) for s in self._w + self._a], list(self.actions), self.t, self._spent_sep
        states = [self.reset()]
        for a in actions:
            s = self.step(a)
            if s is not None:
                states.append(s)
        counts, self.actions, self.t, self._spent_sep = saved
        for s, c in zip(self._w + self._a, counts):
            s.counts[:] = c
        return states

    # ------------------------------------------------------------------------------ budget
    def _demote(self, side: _Side) -> bool:
        c = side.counts
        for k in range(len(c) - 1, 0, -1):
            if c[k] > 0:
                c[k] -= 1
                c[k - 1] += 1
                return True
        return False

    def enforce(self) -> int:
        """Demote channels until the budget is met (see the module docstring); returns the number of
        channel demotions."""
        assert self.t == self.L, "enforce() after the last layer's step"
        mode = ENFORCE_MODES[self.enforce_mode]
        while not mode.applies(self):
            mode = ENFORCE_MODES[mode.fallback]
        return mode.run(self)

    def _limit_ok(self, v: float) -> bool:
        return self.budget.satisfied({self.cost.metric: v})

    def _exact_ok(self) -> bool:
        plan = self._plan()
        self._plan_cache = plan
        return self._limit_ok(self.cost.exact(plan))

    def _demotable_sides(self):
        return [self._w] + ([self._a] if (self.cost.depends_on_acts and self.dim_a) else [])

    def _enforce_omega(self) -> int:
        sides = self._demotable_sides()
        bits = [self._layer_bits(k) for k in range(self.L)]
        lc = np.array([self.cost.layer_cost(k, *bits[k]) for k in range(self.L)])

        def best_move(k):
            """(score, side index, move) of layer k's best demotion, Omega increase per cost saved. A move
            is ``j`` > 0 (the least sensitive channel at level j down one level) or ``-t - 1`` (a jump:
            every channel above level t down to t, which prices a cost that falls only when a whole
            side leaves a level, e.g. the int8 digits of the activations)."""
            best = (math.inf, -1, 0)
            for si, arr in enumerate(sides):
                side = arr[k]
                om = self._omega[si][k]
                c = side.counts

                def saved_by(new_bits):
                    wb, ab = (new_bits, bits[k][1]) if si == 0 else (bits[k][0], new_bits)
                    return lc[k] - self.cost.layer_cost(k, wb, ab)

                for j in range(len(c) - 1, 0, -1):
                    if c[j] == 0:
                        continue
                    ch = side.order[int(c[j:].sum()) - 1]   # the least sensitive channel at level j
                    d_om = max(0.0, om[j - 1][ch] - om[j][ch])
                    c[j] -= 1
                    c[j - 1] += 1
                    saved = saved_by(side.channel_bits())
                    c[j] += 1
                    c[j - 1] -= 1
                    if saved > 0 and d_om / saved < best[0]:
                        best = (d_om / saved, si, j)
                if not self._jumps:
                    continue
                cur_bits = side.channel_bits()
                level = np.searchsorted(np.asarray(side.bits), cur_bits)
                cur_om = np.stack(om)[level, np.arange(side.n)]
                for t in range(len(c) - 1):
                    above = level > t
                    if int(above.sum()) < 2:      # one channel: the single move above
                        continue
                    new_bits = np.where(above, side.bits[t], cur_bits)
                    saved = saved_by(new_bits)
                    d_om = float(np.maximum(0.0, om[t][above] - cur_om[above]).sum())
                    if saved > 0 and d_om / saved < best[0]:
                        best = (d_om / saved, si, -t - 1)
            return best

        moves = [best_move(k) for k in range(self.L)]
        demotions = 0
        while True:
            if self._limit_ok(self._const + float(lc.sum())) and self._exact_ok():
                return demotions
            k = min(range(self.L), key=lambda q: moves[q][0])
            score, si, j = moves[k]
            if not math.isfinite(score):
                # no demotion saves anything (costs that do not fall with the bits): move the least
                # sensitive layer not yet there to its cheapest pure levels
                k = self._to_cheapest(sides, lc)
            elif j < 0:   # a jump: every channel above level t down to t
                c, t = sides[si][k].counts, -j - 1
                c[t] = c[t:].sum()
                c[t + 1:] = 0
            else:
                c = sides[si][k].counts
                c[j] -= 1
                c[j - 1] += 1
            demotions += 1
            bits[k] = self._layer_bits(k)
            lc[k] = self.cost.layer_cost(k, *bits[k])
            moves[k] = best_move(k)

    def _to_cheapest(self, sides, lc) -> int:
        """Set the least sensitive layer still above its cheapest cost to its cheapest pure levels."""
        for k in self.order:
            if self._cheapest is not None and lc[k] > self._cmin[k] + 1e-15:
                w, a = self._cheapest[k]
                for si, side in enumerate(sides):
                    side[k].counts[:] = [side[k].n if b == (w if si == 0 else a) else 0 for b in side[k].bits]
                return k
        raise BudgetError(f"budget {self.budget} cannot be met by this bit set")

    def _enforce_layers(self) -> int:
        bits = [self._layer_bits(k) for k in range(self.L)]
        sep = self.cost.separable
        lc = np.array([self.cost.layer_cost(k, *bits[k]) for k in range(self.L)]) if sep else None

        def total():
            return self._const + float(lc.sum()) if sep else self.cost.total(bits)

        demotions = 0
        sides = self._demotable_sides()
        while True:
            if self._limit_ok(total()) and self._exact_ok():
                return demotions
            moved = False
            done = False
            for k in self.order:
                for arr in sides:
                    side = arr[k]
                    for _ in range(max(1, math.ceil(side.n / self.demote_chunk))):
                        if not self._demote(side):
                            break
                        moved = True
                        demotions += 1
                        bits[k] = self._layer_bits(k)
                        if sep:
                            lc[k] = self.cost.layer_cost(k, *bits[k])
                            if self._limit_ok(self._const + float(lc.sum())):
                                done = True
                                break
                    if not sep and moved:
                        done = self._limit_ok(total())
                    if done:
                        break
                if done:
                    break
            if not moved:  # everything at the lowest bits: only float round-off can land here
                raise BudgetError(f"budget {self.budget} cannot be met by this bit set")

    def _plan(self) -> Plan:
        layers = []
        for k, i in enumerate(self.infos):
            ws, as_ = self._w[k], self._a[k]
            wb = assign_bits(self.w_sens[k], {b: c / ws.n for b, c in zip(ws.bits, ws.counts)})
            ab = assign_bits(self.a_sens[k], {b: c / as_.n for b, c in zip(as_.bits, as_.counts)})
            layers.append(LayerPlan(i.name, wb, ab))
        return Plan(layers, self.bit_set, budget=str(self.budget))

    def finish(self) -> tuple[Plan, dict]:
        """Enforce the budget and return (plan, info) for the episode's actions."""
        demotions = self.enforce()
        plan = self._plan_cache
        info = {"demotions": demotions, "cost": self.cost.exact(plan),
                "w_ratios": [(s.counts / s.n).round(6).tolist() for s in self._w],
                "a_ratios": [(s.counts / s.n).round(6).tolist() for s in self._a] if self.dim_a else None}
        return plan, info


register_enforce_mode("omega", QuantSearchEnv._enforce_omega, fallback="layers",
                      applies=lambda env: env.cost.separable and env._omega is not None)
register_enforce_mode("layers", QuantSearchEnv._enforce_layers)
