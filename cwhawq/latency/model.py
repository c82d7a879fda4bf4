"""The model of a layer's latency: weight-bit storage classes, the grid of class mixes, interpolation
on the simplex and the activation digits a plan gives a layer (the maths of :mod:`cwhawq.latency`,
whose package docstring describes what is measured and how a plan is predicted)."""
from __future__ import annotations

import math

import numpy as np

from .. import quantizers as Q
from ..errors import CwhawqError
from ..kernels.problem import ActQuant
from ..plan import largest_remainder

TABLE_FORMAT = "cwhawq-latency-table"
TABLE_VERSION = 1
BIT_CLASSES = (8, 4, 2)
DEFAULT_GRID = 2


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
    ranges = np.asarray(ranges, dtype=np.float64)
    a_bits = np.broadcast_to(np.asarray(a_bits, dtype=np.int64), ranges.shape)
    s, _ = Q.act_scales(ranges, a_bits, signed, "pow2")
    lo, hi = Q.act_bounds(s, a_bits, signed)
    act = ActQuant.build(s, 0, lo, hi, len(s))
    return int(act.digits()[0]) if act.integer else 0
