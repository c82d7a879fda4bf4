"""The quantizer math, in one place (numpy only).

Used by the Hessian sensitivities (Omega), the PyTorch simulation, the ONNX export and the kernels'
reference tests, so that all stages compute the same thing.

Weights
    Per output channel, symmetric, narrow range: codes q in [-(2^(b-1)-1), 2^(b-1)-1] (8 bits: +-127,
    4 bits: +-7, 2 bits: {-1, 0, 1}, 3 bits: +-3, 6 bits: +-31), w ~= s_c * q. Rounding is
    round-half-to-even (numpy, torch and ONNX QuantizeLinear all do this). The scale is
    ``minmax`` (s = max|w_c| / qmax) or ``mse`` (the default): s = alpha * max|w_c| / qmax with alpha
    the clipping ratio from a grid of ``MSE_GRID`` values in [MSE_MIN_RATIO, 1] that minimises
    ||Q(w_c) - w_c||^2 for that channel.

Activations
    Per input channel of a quantized layer, calibrated ranges. A layer's input is ``unsigned``
    (codes 0 .. 2^b-1) when its calibrated minimum is >= 0 (post-ReLU), else ``signed`` (symmetric
    narrow range, like weights). Zero point is always 0.

    Scale representation ``pow2`` (the default, what the integer kernels need): one float base scale
    S per layer and an integer exponent k_c >= 0 per channel, s_c = S * 2^k_c. Then
    x_c ~= S * (q_c << k_c): every channel lives on the layer's common integer grid and an integer
    dot product sum_c w_q[o, c] * (q_c << k_c) is exact in int32, rescaled once per output channel by
    s_w[o] * S. The free scale of channel c is r_c / qmax(b_c); S is the smallest free scale over
    the layer's channels and k_c = ceil(log2(free_c / S)), so no channel clips more than its
    calibrated range (resolution is lost instead, at most one bit). Exponents are capped so that
    qmax(b_c) << k_c fits in 15 bits (int16 activations); where a nearly dead channel would make S so
    small that a wide channel needs more shift than that, S is raised instead (the narrow channel then
    gets a coarser grid, never the wide one a clipped range). ``free`` keeps each channel's float scale
    (reported as the upper bound of what per-channel activation scales can give).

    ``migrate``: the same codes as ``pow2`` (``q_c = round(x_c / (S 2^k_c))``), but the exponents
    move into the consumer's weights before they are quantized (SmoothQuant-style, exact in float
    because the factors are powers of two): ``x_c ~= S 2^k_c q_c``, so
    ``w[o, c] x_c ~= (w[o, c] 2^k_c) (S q_c)``; the migrated row ``w'[o, :] = w[o, :] * 2^k`` is
    quantized per output channel at its bits, and the activation integers are the codes themselves,
    one 8-bit digit in the kernels (``pow2`` needs up to 15 bits for ``q << k``). What it costs: the
    weights of an output channel share one scale across input channels whose activations differ by
    up to 2^k in scale (docs/results.md measures the accuracy). Depthwise layers have one input
    channel per output channel: there the factor is absorbed by the channel's own weight scale and
    nothing changes.
"""
from __future__ import annotations

import math

import numpy as np

BIT_CHOICES = (2, 3, 4, 6, 7, 8)
MSE_GRID = 80
MSE_MIN_RATIO = 0.2
MAX_ACT_SHIFT_BITS = 15  # qmax << k must fit in this many bits (int16 activations)


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes: symmetric narrow range if signed, [0, 2^b-1] if not."""
    if bits < 1 or bits > 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if signed:
        m = (1 << (bits - 1)) - 1
        return (-m, m) if m > 0 else (0, 0)
    return 0, (1 << bits) - 1


def _as2d(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(w.shape[0], -1)


def _quant(w2: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.round(w2 / s[:, None]), qmin, qmax)


def weight_scales(w: np.ndarray, bits, method: str = "mse") -> np.ndarray:
    """Per-output-channel scales (float32, shape [C]) for weights w [C, ...] at per-channel ``bits``."""
    w2 = _as2d(w)
    c = w2.shape[0]
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (c,))
    amax = np.abs(w2).max(axis=1) if w2.shape[1] else np.zeros(c, np.float32)
    scales = np.ones(c, dtype=np.float32)
    for b in np.unique(bits):
        idx = np.nonzero(bits == b)[0]
        _, qmax = qrange(int(b), True)
        base = (amax[idx] / max(qmax, 1)).astype(np.float32)
        if method == "minmax":
            s = base
        elif method == "mse":
            ratios = np.linspace(MSE_MIN_RATIO, 1.0, MSE_GRID, dtype=np.float32)
            sub = w2[idx]
            best_err = np.full(len(idx), np.inf, dtype=np.float64)
            s = base.copy()
            for r in ratios:
                cand = np.maximum(base * r, np.float32(1e-30))
                err = ((_quant(sub, cand, -qmax, qmax) * cand[:, None] - sub) ** 2).sum(axis=1)
                better = err < best_err
                best_err[better] = err[better]
                s[better] = cand[better]
        else:
            raise ValueError(f"unknown weight scale method {method!r} (minmax or mse)")
        scales[idx] = s
    scales[~(scales > 0)] = 1.0  # all-zero channels: any scale gives code 0
    return scales.astype(np.float32)


def quantize_weight(w: np.ndarray, bits, scales: np.ndarray) -> np.ndarray:
    """Integer codes (int8, same shape as w) for per-channel bits and scales."""
    w2 = _as2d(w)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), (w2.shape[0],))
    qmax = np.array([qrange(int(b), True)[1] for b in bits], dtype=np.float32)
    q = np.clip(np.round(w2 / scales[:, None]), -qmax[:, None], qmax[:, None])
    return q.astype(np.int8).reshape(np.shape(w))


def dequantize_weight(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    q2 = np.asarray(q).reshape(q.shape[0], -1).astype(np.float32)
    return (q2 * scales[:, None].astype(np.float32)).reshape(q.shape)


def fake_quant_weight(w: np.ndarray, bits, method: str = "mse") -> np.ndarray:
    s = weight_scales(w, bits, method)
    return dequantize_weight(quantize_weight(w, bits, s), s)


def weight_sq_error(w: np.ndarray, bit_choices=BIT_CHOICES, method: str = "mse") -> dict[int, np.ndarray]:
    """{b: ||Q_b(w_c) - w_c||^2 per output channel} for each bit-width b."""
    w2 = _as2d(w)
    out = {}
    for b in bit_choices:
        fq = _as2d(fake_quant_weight(w2, b, method))
        out[int(b)] = ((fq - w2) ** 2).sum(axis=1).astype(np.float64)
    return out


# ----------------------------------------------------------------------------------- activations
def act_free_scales(ranges: np.ndarray, bits, signed: bool) -> np.ndarray:
    """Free per-channel scales r_c / qmax(b_c) (float32); r_c is the calibrated max |x_c|."""
    ranges = np.asarray(ranges, dtype=np.float64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), ranges.shape)
    qmax = np.array([qrange(int(b), signed)[1] for b in bits], dtype=np.float64)
    s = ranges / qmax
    pos = s[s > 0]
    floor = pos.min() if pos.size else 1.0
    s = np.where(s > 0, s, floor)  # dead channels: any scale
    return s.astype(np.float32)


def act_pow2_scales(ranges: np.ndarray, bits, signed: bool) -> tuple[float, np.ndarray]:
    """(S, k) with s_c = S * 2^k_c: S the smallest free scale, k_c = ceil(log2(free_c / S))."""
    free = act_free_scales(ranges, bits, signed).astype(np.float64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), free.shape)
    qmax_bits = np.array([int(math.ceil(math.log2(qrange(int(b), signed)[1] + 1))) for b in bits])
    kcap = np.maximum(MAX_ACT_SHIFT_BITS - qmax_bits, 0)
    # the smallest free scale, unless then a wide channel would need more shift than its cap allows
    base = float(np.float32(max(free.min(), float(np.max(free / np.exp2(kcap))))))
    k = np.ceil(np.log2(free / base) - 1e-9).astype(np.int64)
    k = np.clip(k, 0, kcap)
    return base, k.astype(np.int32)


ACT_SCALE_MODES = ("pow2", "migrate", "free")   # act_scales' modes (the CLI's --act-scale choices)


def act_scales(ranges: np.ndarray, bits, signed: bool, mode: str = "pow2") -> tuple[np.ndarray, dict]:
    """Per-channel activation scales (float32) and the representation's parameters."""
    if mode in ("pow2", "migrate"):
        base, k = act_pow2_scales(ranges, bits, signed)
        s = (np.float32(base) * np.exp2(k).astype(np.float32)).astype(np.float32)
        return s, {"mode": mode, "base_scale": float(np.float32(base)), "exponents": k.tolist()}
    if mode == "free":
        return act_free_scales(ranges, bits, signed), {"mode": "free"}
    raise ValueError(f"unknown activation scale mode {mode!r} ({', '.join(ACT_SCALE_MODES)})")


def migrate_weight(w: np.ndarray, exponents) -> np.ndarray:
    """``w[o, c, ...] * 2^k_c`` (the weight a ``migrate`` layer quantizes), float32."""
    w = np.asarray(w, np.float32)
    shape = [1] * w.ndim
    shape[1] = -1
    return (w * np.exp2(np.asarray(exponents, np.float64)).astype(np.float32).reshape(shape)).astype(np.float32)


def act_bounds(scales: np.ndarray, bits, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (qmin, qmax) codes as float32 arrays."""
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), np.shape(scales))
    r = np.array([qrange(int(b), signed) for b in bits], dtype=np.float32).reshape(-1, 2)
    return r[:, 0], r[:, 1]


def fake_quant_act(x: np.ndarray, scales: np.ndarray, qmin: np.ndarray, qmax: np.ndarray,
                   axis: int = 1) -> np.ndarray:
    """Reference per-channel fake quantization of activations along ``axis`` (numpy)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    s = scales.reshape(shape)
    return (np.clip(np.round(x / s), qmin.reshape(shape), qmax.reshape(shape)) * s).astype(np.float32)
