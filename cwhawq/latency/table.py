"""The latency table: measured cells of every layer shape, the prediction of a plan's latency, the
search's separable cost model, and the text ``cwhawq latency-table`` prints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import PlanError
from ..io import write_json
from ..plan import load_plan
from ..search.costs import LayerLatencyCost
from .model import LatencyError, TABLE_FORMAT, TABLE_VERSION, act_digits, class_fractions, face_extras, mix_cost

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
            plan = load_plan(plan)
        names = {lp.name for lp in plan.layers}
        missing = [n for n in self.names if n not in names]
        if missing:
            raise PlanError(f"plan has no entry for layer {missing[0]!r} of the latency table")
        per_layer = [self.layer_seconds(n, plan[n].w_bits, plan[n].a_bits) for n in self.names]
        # a whole model is never faster than its slowest layer run alone (each alone-measurement
        # holds one call's overhead, as the model does): a floor against noise in the differences
        total = self.constant_seconds + sum(self.work_seconds(t) for t in per_layer)
        return max(total, max(per_layer, default=0.0))

    @property
    def constant_seconds(self) -> float:
        """The prediction's constant term: a positive overhead (what is not a layer); 0 when the
        layers alone sum to more than the model (their per-call costs, see :meth:`work_seconds`)."""
        return max(self.overhead_seconds, 0.0)

    def work_seconds(self, alone_s: float) -> float:
        """A layer's share of the whole model from its alone-measurement ``alone_s``.

        With a positive overhead it is ``alone_s``. With a negative one, each alone-measurement holds a
        call's cost the model pays once: ``c = -overhead / layers`` comes off every layer, so the fp32
        plan predicts the fp32 model. Noise can make a fast layer's ``alone_s - c`` tiny or negative
        (a tiny model predicted at -220 x fp32): the share is never below the proportional one,
        ``alone_s * T_fp32 / sum of fp32 layers``, which is always positive."""
        ov = self.overhead_seconds
        if ov >= 0:
            return alone_s
        n = max(len(self.data["layers"]), 1)
        layers_s = self.fp32_seconds - ov
        return max(alone_s + ov / n, alone_s * self.fp32_seconds / layers_s)

    def ratio(self, plan) -> float:
        """Predicted latency relative to the fp32 model compiled for the same target (``latency:R``)."""
        return self.predict(plan) / self.fp32_seconds

    def cost_model(self, infos):
        """The table as a separable :class:`cwhawq.search.costs.LayerLatencyCost` over ``infos``:
        layer cost = ``work_seconds(layer_seconds) / T_fp32``, constant = ``constant_seconds / T_fp32``;
        total = ratio (before the slowest-layer floor), never negative."""
        for i in infos:
            self._entry(i.name)
        t = self.fp32_seconds
        return LayerLatencyCost(infos, lambda info, w, a: self.work_seconds(self.layer_seconds(info.name, w, a)) / t,
                                const=self.constant_seconds / t)

    def summary(self) -> dict:
        d = self.data
        return {"model": d["model"], "target": d["target"]["name"], "batch": d["batch"], "where": d["where"],
                "grid": self.grid, "layers": len(d["layers"]), "shapes": len(d["shapes"]),
                "fp32_model_s": self.fp32_seconds, "overhead_s": self.overhead_seconds, **d.get("stats", {}),
                "checks": d.get("checks", [])}



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
