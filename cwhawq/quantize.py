"""Simulated quantization (PyTorch) of a canonical model under a bit plan.

What it computes is what the exported ONNX graph and the compiled kernels compute:
- weights: BN already folded (graph.py); per output channel symmetric codes at the channel's bits,
  scale by MSE (default) or min-max (quantizers.py), dequantized once per plan;
- activations: the input of every quantized layer, per channel (a conv: axis 1; a Linear: its input
  features, the last axis, at any rank: graph.act_axis), at the channel's bits, with ranges
  calibrated once on the float model (``minmax``: max |x| per channel; ``percentile``: the 99.99th
  percentile of |x|) and the ``pow2`` scale representation (or ``migrate``: the same codes with the
  exponents moved into the weights before they are quantized; or ``free`` per-channel scales).

Quantizing a plan reuses a :class:`Quantizer` that caches, per layer and bit-width, the fake-quantized
weights of every channel, so applying a new plan is a gather (no per-batch re-quantization).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quantizers as Q
from .data import Dataset
from .graph import QModel, act_axis
from .plan import Plan


class ActQuant(nn.Module):
    """Per-channel fake quantization of a layer input (straight-through gradient inside the range).
    ``ndim``: the rank of a conv's input (channels on axis 1); None: channels on the last axis (a
    Linear, inputs of any rank)."""

    def __init__(self, scales: np.ndarray, qmin: np.ndarray, qmax: np.ndarray, ndim: int | None):
        super().__init__()
        shape = (-1,) if ndim is None else (1, -1) + (1,) * (ndim - 2)
        self.register_buffer("s", torch.from_numpy(np.asarray(scales, np.float32)).view(shape))
        self.register_buffer("lo", torch.from_numpy(np.asarray(qmin, np.float32)).view(shape))
        self.register_buffer("hi", torch.from_numpy(np.asarray(qmax, np.float32)).view(shape))

    def forward(self, x):
        v = x / self.s
        if torch.is_grad_enabled() and x.requires_grad:
            v = v + (torch.round(v) - v).detach()
        else:
            v = torch.round(v)
        return torch.clamp(v, self.lo, self.hi) * self.s


def _in_factor(exponents, ndim: int, sign: int) -> torch.Tensor | None:
    """``2^(sign * k_c)`` shaped to multiply a weight along its input-channel axis (1), or None."""
    if exponents is None:
        return None
    shape = (1, -1) + (1,) * (ndim - 2)
    return torch.from_numpy(np.exp2(sign * np.asarray(exponents, np.float64)).astype(np.float32)).view(shape)


class WeightQuant(nn.Module):
    """Fake-quantized weight: frozen tensor at inference; STE with fixed scales while fine-tuning.

    ``fq`` is the dequantized weight the codes stand for; with ``exponents`` (``migrate`` activation
    scales) those codes quantize ``w * 2^k`` along the input channels, and the layer uses
    ``fq * 2^-k`` (exact: powers of two)."""

    def __init__(self, fq: torch.Tensor, scales: np.ndarray, qmax: np.ndarray, exponents=None):
        super().__init__()
        self.mult = _in_factor(exponents, fq.dim(), 1)
        self.inv = _in_factor(exponents, fq.dim(), -1)
        self.fq = fq if self.inv is None else fq * self.inv
        shape = (-1,) + (1,) * (fq.dim() - 1)
        self.register_buffer("s", torch.from_numpy(np.asarray(scales, np.float32)).view(shape))
        self.register_buffer("m", torch.from_numpy(np.asarray(qmax, np.float32)).view(shape))
        self.train_mode = False

    def forward(self, w):
        if not self.train_mode:
            return self.fq
        v = (w if self.mult is None else w * self.mult) / self.s
        v = v + (torch.round(v) - v).detach()
        out = torch.clamp(v, -self.m, self.m) * self.s
        return out if self.inv is None else out * self.inv


def weight_hook(st: "LayerQuantState") -> WeightQuant:
    """The fake quantizer of a layer's weight from its state (codes, scales, migrated exponents)."""
    fq = torch.from_numpy(Q.dequantize_weight(st.w_codes, st.w_scales))
    qmax = np.array([Q.qrange(int(b), True)[1] for b in st.w_bits], np.float32)
    return WeightQuant(fq, st.w_scales, qmax, st.w_exponents)


def quantized_weight_input(st: "LayerQuantState", w: np.ndarray) -> np.ndarray:
    """What a layer's weight codes quantize: ``w``, or ``w * 2^k`` along the input channels."""
    return w if st.w_exponents is None else Q.migrate_weight(w, st.w_exponents)


@dataclass
class LayerQuantState:
    """Everything a later stage (export, kernels) needs to reproduce one quantized layer."""

    name: str
    w_bits: np.ndarray
    w_scales: np.ndarray      # float32 [out]
    w_codes: np.ndarray       # int8, weight shape
    bias: np.ndarray | None   # float32 [out]
    a_bits: np.ndarray
    a_signed: bool
    a_scales: np.ndarray      # float32 [in]
    a_qmin: np.ndarray
    a_qmax: np.ndarray
    a_params: dict            # scale representation (pow2: base_scale, exponents)
    w_exponents: np.ndarray | None = None   # migrate: the codes quantize w * 2^k (input channels)


def calibrate_ranges(qm: QModel, calib: Dataset, method: str = "minmax", batch_size: int = 256,
                     percentile: float = 99.99) -> dict[str, dict]:
    """Per-channel input ranges of every quantized layer on the float model.

    Returns {layer: {"range": max|x| (or percentile) per channel, "min": min per channel}}.
    """
    if method not in ("minmax", "percentile"):
        raise ValueError(f"unknown calibration {method!r} (minmax or percentile)")
    qm.reset()
    stats: dict[str, dict] = {}
    samples: dict[str, list] = {}

    kinds = {i.name: i.kind for i in qm.layer_infos}

    def make_hook(name):
        def hook(x):
            ax = act_axis(kinds[name], x.dim())
            xc = x.detach().movedim(ax, 0).reshape(x.shape[ax], -1)
            mn = xc.min(dim=1).values
            ab = xc.abs()
            st = stats.setdefault(name, {"min": mn, "amax": ab.max(dim=1).values})
            st["min"] = torch.minimum(st["min"], mn)
            st["amax"] = torch.maximum(st["amax"], ab.max(dim=1).values)
            if method == "percentile":
                k = min(ab.shape[1], 4096)
                idx = torch.randperm(ab.shape[1], generator=torch.Generator().manual_seed(0))[:k]
                samples.setdefault(name, []).append(ab[:, idx])
            return x
        return hook

    layers = qm.qlayers
    for name, q in layers.items():
        q.act = make_hook(name)
    try:
        with torch.no_grad():
            for xb, _ in calib.batches(batch_size):
                qm(xb)
    finally:
        qm.reset()
    out = {}
    for name in layers:
        st = stats[name]
        rng = st["amax"]
        if method == "percentile":
            allv = torch.cat(samples[name], dim=1)
            rng = torch.quantile(allv, percentile / 100.0, dim=1)
        out[name] = {"range": rng.numpy().astype(np.float64), "min": st["min"].numpy().astype(np.float64)}
    return out


class Quantizer:
    """Applies plans to a QModel quickly: per-bit fake-quantized weights are cached per layer."""

    def __init__(self, qm: QModel, calib: Dataset | None = None, ranges: dict | None = None,
                 act_scale: str = "pow2", weight_method: str = "mse", calib_method: str = "minmax",
                 bit_set=Q.BIT_CHOICES):
        self.qm = qm
        self.act_scale = act_scale
        self.weight_method = weight_method
        self.ranges = ranges if ranges is not None else calibrate_ranges(qm, calib, calib_method)
        self.signed = {n: bool((r["min"] < 0).any()) for n, r in self.ranges.items()}
        self._wcache: dict[tuple[str, int, bytes | None], tuple[np.ndarray, np.ndarray]] = {}  # (layer, bits, exponents)
        self.bit_set = tuple(bit_set)

    def weight_for(self, name: str, b: int, exponents=None) -> tuple[np.ndarray, np.ndarray]:
        """(scales [out], codes int8) of every output channel of a layer at ``b`` bits (of
        ``w * 2^exponents`` along the input channels when given)."""
        ek = None if exponents is None else np.asarray(exponents, np.int32).tobytes()
        key = (name, int(b), ek)
        if key not in self._wcache:
            w = self.qm.layer(name).weight.detach().numpy()
            if exponents is not None:
                w = Q.migrate_weight(w, exponents)
            s = Q.weight_scales(w, b, self.weight_method)
            self._wcache[key] = (s, Q.quantize_weight(w, b, s))
        return self._wcache[key]

    def layer_state(self, name: str, w_bits, a_bits) -> LayerQuantState:
        q = self.qm.layer(name)
        w_bits = np.asarray(w_bits, dtype=np.int64)
        a_bits = np.asarray(a_bits, dtype=np.int64)
        w = q.weight.detach().numpy()
        signed = self.signed[name]
        rng = self.ranges[name]["range"]
        a_scales, params = Q.act_scales(rng, a_bits, signed, self.act_scale)
        lo, hi = Q.act_bounds(a_scales, a_bits, signed)
        exps = None
        if params.get("mode") == "migrate" and q.kind != "depthwise" and w.shape[1] == len(a_scales):
            exps = np.asarray(params["exponents"], np.int32)
            if not exps.any():
                exps = None     # nothing to migrate
        scales = np.empty(w.shape[0], np.float32)
        codes = np.empty(w.shape, np.int8)
        for b in np.unique(w_bits):
            s_b, c_b = self.weight_for(name, int(b), exps)
            idx = w_bits == b
            scales[idx] = s_b[idx]
            codes[idx] = c_b[idx]
        bias = q.bias.detach().numpy().copy() if q.bias is not None else None
        return LayerQuantState(name, w_bits, scales, codes, bias, a_bits, signed, a_scales, lo, hi, params, exps)

    def apply(self, plan: Plan) -> "QuantizedModel":
        """Install the plan's quantizers on the model (in place) and return the simulated model."""
        states = {}
        for info in self.qm.layer_infos:
            lp = plan[info.name]
            st = self.layer_state(info.name, lp.w_bits, lp.a_bits)
            q = self.qm.layer(info.name)
            q.wq = weight_hook(st)
            ndim = None if info.kind == "linear" else len(info.in_shape) + 1
            q.act = ActQuant(st.a_scales, st.a_qmin, st.a_qmax, ndim)
            states[info.name] = st
        return QuantizedModel(self.qm, plan, states)


class QuantizedModel:
    """A QModel with a plan's quantizers installed, and the per-layer quantized state."""

    def __init__(self, qm: QModel, plan: Plan, states: dict[str, LayerQuantState]):
        self.module = qm
        self.plan = plan
        self.states = states

    def refresh_states(self) -> None:
        """Recompute codes and fake-quantized weights from the (fine-tuned) float weights, scales fixed."""
        for name, st in self.states.items():
            q = self.module.layer(name)
            w = quantized_weight_input(st, q.weight.detach().numpy())
            st.w_codes = Q.quantize_weight(w, st.w_bits, st.w_scales)
            q.wq = weight_hook(st)
            if q.bias is not None:
                st.bias = q.bias.detach().numpy().copy()


def quantize_model(qm: QModel, plan: Plan, calib: Dataset, act_scale: str = "pow2",
                   weight_method: str = "mse", calib_method: str = "minmax") -> QuantizedModel:
    """Simulate ``plan`` on ``qm`` (in place): calibrate activation ranges, quantize, install."""
    return Quantizer(qm, calib, act_scale=act_scale, weight_method=weight_method,
                     calib_method=calib_method).apply(plan)


def finetune(sim: QuantizedModel, train: Dataset, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
             seed: int = 0, max_steps: int | None = None, progress: bool = False) -> dict:
    """Quantization-aware fine-tuning with straight-through estimators; the plan and scales stay fixed.

    Only the QLayers' weights and biases are trained (SGD with momentum, cosine schedule); the rest of
    the exported graph is frozen (it holds no BN to update: BN is folded).
    """
    qm = sim.module
    params = [p for q in qm.qlayers.values() for p in ([q.weight] + ([q.bias] if q.bias is not None else []))]
    for q in qm.qlayers.values():
        q.wq.train_mode = True
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total))
    xt, yt = torch.from_numpy(train.x), torch.from_numpy(train.y)
    step, t0, losses = 0, time.time(), []
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(train), generator=g)
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(qm(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
    finally:
        for q in qm.qlayers.values():
            q.wq.train_mode = False
        sim.refresh_states()
    return {"steps": step, "seconds": time.time() - t0, "final_loss": float(np.mean(losses[-50:])) if losses else None}
