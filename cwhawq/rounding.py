"""Learned weight rounding (post-training, no labels): AdaRound-style reconstruction for mixed bits.

Nearest rounding puts every weight on the code closest to it; that minimises each weight's own error,
not the error of the layer's output, which is what the network sees. AdaRound (Nagel et al. 2020)
learns, for every weight, whether to round down or up, so that the quantized part of the network
reproduces the float network's outputs on a few hundred unlabelled samples; BRECQ (Li et al. 2021)
does it block by block (a residual block at a time), QDrop (Wei et al. 2022) randomly drops the
activation quantization while doing it.

Here, for a plan (every output channel at its own bit-width), with the plan's scales fixed (the MSE
scales of :mod:`cwhawq.quantizers`, one per channel at that channel's bits):

- every weight w of channel c gets a rounding variable alpha; its soft code is
  ``clip(floor(w / s_c) + h(alpha), -qmax(b_c), qmax(b_c))`` with the rectified sigmoid
  ``h = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1), started where
  the soft code equals w / s_c exactly;
- the units reconstructed one after the other are the model's **blocks** (``mode="block"``, the
  default): the graph is cut where every path goes through one tensor (between residual blocks, and
  between the layers of a plain chain), each piece holding at least one quantized layer, with the
  element-wise operators that follow it (ReLU); or single layers (``mode="layer"``, their
  pre-activation outputs);
- the input of a unit comes from the already quantized part before it (``inputs="quant"``, as
  AdaRound and BRECQ recommend: later units learn to compensate the earlier ones' errors), from the
  float model (``"float"``), or an element-wise random mix of both with the unit's activation
  quantizers randomly dropped (``"qdrop"``, QDrop's p = 0.5); the target is always the float model's
  output of that unit on the float input. The unit's activation quantizers (the plan's, calibrated
  as everywhere else) are in place (straight-through gradients);
- loss = mean squared error of the unit's output (summed over channels, averaged over samples and
  positions, as BRECQ) + ``reg`` x sum over weights of (1 - |2h - 1|^beta), beta annealed from 20
  to 2 after a warm-up of 20 % of the iterations without it; Adam on alpha;
- at the end every weight takes floor + 1 where h >= 0.5, floor elsewhere (clipped to the channel's
  range): integer codes per channel at the channel's bits, which :class:`cwhawq.quantize.LayerQuantState`
  and the export carry like nearest codes. Biases stay the folded float biases.

Everything is seeded (batch order, QDrop masks) and runs in a fixed order, so the same plan, model,
calibration samples, options and thread count give the same codes. Results are cached in-process
(the same plan evaluated and then exported is reconstructed once).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CwhawqError

ROUNDINGS = ("learned", "nearest")
MODES = ("block", "layer")
INPUTS = ("quant", "float", "qdrop")
ZETA, GAMMA = 1.1, -0.1
#: optimisation steps per unit when none are asked for (eval --plan, export, search, demo)
DEFAULT_ITERS = 100


class RoundingError(CwhawqError):
    """Learned rounding asked for in a way that cannot run."""


@dataclass
class RoundingConfig:
    iters: int = DEFAULT_ITERS  # optimisation steps per unit (block or layer)
    batch_size: int = 64
    lr: float = 3e-2            # Adam on the rounding variables
    reg: float = 0.01           # weight of the rounding regulariser
    beta: tuple = (20.0, 2.0)   # annealed exponent of the regulariser
    warmup: float = 0.2         # fraction of the iterations without the regulariser
    mode: str = "block"         # block | layer
    inputs: str = "quant"       # quant | float | qdrop
    drop_prob: float = 0.5      # qdrop: probability of keeping a value unquantized
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["beta"] = list(self.beta)
        return d

    def check(self) -> "RoundingConfig":
        if int(self.iters) < 0:
            raise RoundingError(f"rounding iterations must be >= 0, got {self.iters}")
        if int(self.batch_size) < 1:
            raise RoundingError(f"rounding batch size must be >= 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise RoundingError(f"rounding mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.inputs not in INPUTS:
            raise RoundingError(f"rounding inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        for name in ("lr", "reg", "warmup", "drop_prob"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise RoundingError(f"rounding {name} must be a finite number >= 0, got {v}")
        return self


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise RoundingError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


# ===================================================================================== quantizers
def _rect_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class SoftRoundWeight(nn.Module):
    """The weight hook while learning: per-channel scale and range fixed, rounding variables learned."""

    def __init__(self, w: torch.Tensor, scales: np.ndarray, qmax: np.ndarray, exponents=None):
        super().__init__()
        from .quantize import _in_factor

        shape = (-1,) + (1,) * (w.dim() - 1)
        s = torch.from_numpy(np.asarray(scales, np.float32)).view(shape)
        m = torch.from_numpy(np.asarray(qmax, np.float32)).view(shape)
        # migrate: the codes quantize w * 2^k along the input channels; the layer uses them * 2^-k
        self.inv = _in_factor(exponents, w.dim(), -1)
        mult = _in_factor(exponents, w.dim(), 1)
        v = (w.detach() if mult is None else w.detach() * mult) / s
        fl = torch.floor(v)
        rest = (v - fl).clamp(0.0, 1.0)
        self.register_buffer("s", s)
        self.register_buffer("m", m)
        self.register_buffer("floor", fl)
        # h(alpha) = rest: the soft weight starts at the float weight (inside the range)
        p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
        self.alpha = nn.Parameter(torch.log(p) - torch.log1p(-p))
        self.hard = False

    def h(self) -> torch.Tensor:
        return _rect_sigmoid(self.alpha)

    def forward(self, w):
        r = (self.alpha >= 0).to(self.floor.dtype) if self.hard else self.h()
        out = torch.clamp(self.floor + r, -self.m, self.m) * self.s
        return out if self.inv is None else out * self.inv

    def reg(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def codes(self) -> np.ndarray:
        up = (self.alpha >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up, -self.m, self.m).numpy().astype(np.int8)


class _STEActFn(torch.autograd.Function):
    """Per-channel activation fake quantization with a straight-through gradient inside the range
    (what :class:`cwhawq.quantize.ActQuant` computes while training, in one node)."""

    @staticmethod
    def forward(ctx, x, s, lo, hi):
        v = x / s
        ctx.save_for_backward((v >= lo) & (v <= hi))
        return torch.clamp(torch.round(v), lo, hi) * s

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None


class _TrainActQuant:
    """The plan's activation quantizer while learning; with ``drop`` > 0 (QDrop) each value is kept
    unquantized with that probability."""

    def __init__(self, aq, drop: float = 0.0, gen: torch.Generator | None = None):
        self.aq, self.drop, self.gen = aq, drop, gen

    def __call__(self, x):
        if not torch.is_grad_enabled():
            return self.aq(x)
        q = _STEActFn.apply(x, self.aq.s, self.aq.lo, self.aq.hi)
        if self.drop <= 0:
            return q
        keep = torch.rand(x.shape, generator=self.gen) < self.drop
        return torch.where(keep, x, q)


# ===================================================================================== graph units
@dataclass
class Unit:
    """A piece of the model reconstructed at once: a sub-graph (block mode) or one layer."""

    name: str
    layers: list            # QLayer names inside, in graph order
    module: object          # callable: input tensor -> output tensor


def _segment_module(gm: fx.GraphModule, inp: fx.Node, nodes: list, out: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``out`` from ``inp`` through ``nodes`` (sharing gm's submodules)."""
    g = fx.Graph()
    env = {inp: g.placeholder("x")}
    inside = set(nodes)

    def get(n):
        if n in env:
            return env[n]
        if n in inside:
            raise RoundingError(f"internal error: node {n.name} used before it is computed")
        # a value that does not depend on the input (a constant, a buffer): copy its producer
        if n.op == "placeholder":
            raise RoundingError(f"block reconstruction: node {n.name} reads a second graph input")
        env[n] = g.node_copy(n, get)
        return env[n]

    for n in nodes:
        env[n] = g.node_copy(n, get)
    g.output(env[out])
    return fx.GraphModule(gm, g)


def block_units(qm) -> list[Unit] | None:
    """The blocks of a QModel: pieces of its graph between cut tensors (every path from the input to
    the output goes through them), each with at least one quantized layer. None when the graph does
    not cut into pieces with one input (several inputs, say)."""
    gm = qm.gm
    nodes = list(gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    outs = [n for n in nodes if n.op == "output"]
    if len(ph) != 1 or len(outs) != 1:
        return None
    data: list = []
    dset = set()
    for n in nodes:
        if n.op == "output":
            continue
        if n.op == "placeholder" or any(a in dset for a in n.all_input_nodes):
            data.append(n)
            dset.add(n)
    pos = {n: i for i, n in enumerate(data)}
    out_arg = outs[0].args[0]
    while isinstance(out_arg, (tuple, list)) and len(out_arg) == 1:
        out_arg = out_arg[0]
    if not isinstance(out_arg, fx.Node) or out_arg not in dset:
        return None
    cuts, reach = [], 0
    for i, n in enumerate(data):
        if reach <= i:
            cuts.append(i)
        for u in n.users:
            reach = max(reach, pos.get(u, len(data)))
    if cuts[-1] != len(data) - 1 and pos[out_arg] != len(data) - 1:
        return None
    qkey = {f"qlayers.{name.replace('.', '__')}": name for name in qm.names}

    def layers_of(seg):
        return [qkey[n.target] for n in seg if n.op == "call_module" and n.target in qkey]

    # consecutive segments (cut_j, cut_{j+1}]
    segs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        segs.append((a, b))
    if cuts[-1] != len(data) - 1:
        return None
    # example shapes: which segments without a layer keep the shape (ReLU-like, join the block
    # before) and which change it (pooling, flatten: they start the next block)
    shapes = {}
    x0 = torch.zeros((3, *qm.input_shape))
    saved = {n: (q.act, q.wq) for n, q in qm.qlayers.items()}
    hooks = []
    try:
        qm.reset()
        vals = {}

        class _Interp(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                vals[n] = r
                return r
        with torch.no_grad():
            _Interp(gm).run(x0)
        for n in data:
            v = vals.get(n)
            shapes[n] = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    finally:
        for n, q in qm.qlayers.items():
            q.act, q.wq = saved[n]
        for h in hooks:
            h.remove()
    # a unit's input and output are sliced into samples on their first axis: a cut tensor must hold the
    # batch there (inside nn.MultiheadAttention tensors are [tokens, batch, ...] or batch and tokens
    # merged; such cuts are joined with their neighbours)
    kept = [c for c in cuts if c == 0 or c == len(data) - 1 or
            (shapes.get(data[c]) is not None and len(shapes[data[c]]) > 0 and shapes[data[c]][0] == x0.shape[0])]
    segs = list(zip(kept[:-1], kept[1:]))
    groups: list[list[tuple[int, int]]] = []
    pending: list[tuple[int, int]] = []   # layer-less segments waiting for the next block
    for a, b in segs:
        seg_nodes = data[a + 1:b + 1]
        has = bool(layers_of(seg_nodes))
        if shapes.get(data[b]) is None:
            return None
        if has:
            groups.append(pending + [(a, b)])
            pending = []
        elif groups and not pending and shapes[data[b]] == shapes[data[a]]:
            groups[-1].append((a, b))
        else:
            pending.append((a, b))
    if not groups:
        return None
    if pending:
        groups[-1] += pending
    units = []
    for grp in groups:
        a, b = grp[0][0], grp[-1][1]
        seg_nodes = data[a + 1:b + 1]
        lay = layers_of(seg_nodes)
        mod = _segment_module(gm, data[a], seg_nodes, data[b])
        units.append(Unit(lay[0] if len(lay) == 1 else _common_prefix(lay), lay, mod))
    # the pieces before the first block (e.g. input normalisation): part of the first unit's input
    first = groups[0][0][0]
    pre = None
    if first > 0:
        pre = _segment_module(gm, data[0], data[1:first + 1], data[first])
    return [Unit("<input>", [], pre)] + units if pre is not None else units


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return ".".join(out) or f"{names[0]}..{names[-1]}"


# ===================================================================================== reconstruction
def _batched(fn, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def _rec_loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions (BRECQ's). Channels
    are axis 1 of an N, C, H, W (or N, C) tensor and the last axis (features) of a 3-D one (the
    N, tokens, features of a transformer block)."""
    d = (out - tgt).pow(2)
    if d.dim() == 3:
        return d.sum(-1).mean()
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


class _LayerUnit:
    """Layer mode: one QLayer, its input captured from the whole model with hooks."""

    def __init__(self, qm, name):
        self.qm, self.name = qm, name
        self.q = qm.layer(name)

    def __call__(self, x):
        return self.q(x)

    def capture(self, x: torch.Tensor, quant: bool, saved: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(input before the activation quantizer, output) of the layer over x, quantized model or
        float model (hooks of every layer off)."""
        got_in, got_out = [], []

        def hook(m, inp, out):
            xi, yo = inp[0].detach(), out.detach()
            if not m.is_conv:   # a Linear's rows are independent: [rows, features] whatever the layout
                xi, yo = xi.reshape(-1, xi.shape[-1]), yo.reshape(-1, yo.shape[-1])
            got_in.append(xi)
            got_out.append(yo)
            raise _Stop
        h = self.q.register_forward_hook(hook)
        cur = {n: (q.act, q.wq) for n, q in self.qm.qlayers.items()}
        try:
            if not quant:
                self.qm.reset()
            with torch.no_grad():
                for i in range(0, len(x), 256):
                    try:
                        self.qm(x[i:i + 256])
                    except _Stop:
                        pass
        finally:
            h.remove()
            for n, q in self.qm.qlayers.items():
                q.act, q.wq = cur[n]
        return torch.cat(got_in), torch.cat(got_out)


class _Stop(Exception):
    pass


SMALL_UNIT_MACS = 5e7   # a unit's multiply-accumulates per step below which it learns on one thread


@contextlib.contextmanager
def _threads(n: int):
    """Tiny layers gain nothing from several threads, and lose a lot on busy cores."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_CACHE: dict[str, tuple[dict, dict]] = {}
_CACHE_SIZE = 8


def _cache_key(sim, x: torch.Tensor, cfg: RoundingConfig) -> str:
    h = hashlib.sha1()
    for name, st in sim.states.items():
        q = sim.module.layer(name)
        h.update(name.encode())
        h.update(q.weight.detach().numpy().tobytes())
        if q.bias is not None:
            h.update(q.bias.detach().numpy().tobytes())
        for a in (st.w_bits, st.w_scales, st.a_scales, st.a_qmin, st.a_qmax):
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(x.numpy().tobytes())
    h.update(repr(sorted(cfg.to_dict().items())).encode())
    h.update(str(torch.get_num_threads()).encode())
    return h.hexdigest()


def _install_codes(sim, name: str, codes: np.ndarray) -> None:
    from .quantize import weight_hook

    st = sim.states[name]
    st.w_codes = np.asarray(codes, np.int8)
    sim.module.layer(name).wq = weight_hook(st)


def _train_unit(unit, layers, soft, acts, cfg, gen, inp_q, inp_fp, y_fp, bar, tag) -> None:
    """The optimisation of one unit's rounding variables (Adam; regulariser after the warm-up)."""
    params = [s.alpha for s in soft.values()]
    opt = torch.optim.Adam(params, lr=float(cfg.lr))
    iters, n = int(cfg.iters), len(inp_q)
    warm = int(cfg.warmup * iters)
    b0, b1 = float(cfg.beta[0]), float(cfg.beta[1])
    try:
        for it in range(iters):
            idx = torch.randint(n, (min(int(cfg.batch_size), n),), generator=gen)
            if cfg.inputs == "float":
                xin = inp_fp[idx]
            elif cfg.inputs == "qdrop":
                m = torch.rand(inp_q[idx].shape, generator=gen) < float(cfg.drop_prob)
                xin = torch.where(m, inp_fp[idx], inp_q[idx])
            else:
                xin = inp_q[idx]
            rec = _rec_loss(unit.module(xin), y_fp[idx])
            loss = rec
            if it >= warm and cfg.reg > 0:
                rel = (it - warm) / max(1, iters - warm)
                beta = b1 + (b0 - b1) * (1.0 - rel)
                loss = rec + float(cfg.reg) * sum(s.reg(beta) for s in soft.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None and (it % 25 == 24 or it == iters - 1):
                bar.update(25 if it % 25 == 24 else (it % 25) + 1)
                bar.set_postfix(unit=f"{tag} {unit.name}", rec=f"{rec.item():.4g}")
    finally:
        for nm, q in layers.items():
            q.act = acts[nm]


def learn_rounding(sim, calib, cfg: RoundingConfig | None = None, progress: bool = False, log=None) -> dict:
    """Learn the rounding of every weight of a simulated plan (``sim``, a
    :class:`cwhawq.quantize.QuantizedModel` with the plan's quantizers installed) on the samples of
    ``calib`` (a Dataset; labels unused). Changes ``sim`` in place (codes in its states, the weight
    hooks) and returns a report (options, seconds, per-unit output errors under nearest and learned
    rounding), also kept as ``sim.rounding``. ``progress``: a progress bar on stderr; ``log``: a
    callable given one line per unit."""
    from . import quantizers as Q

    cfg = (cfg or RoundingConfig()).check()
    qm = sim.module
    x = torch.from_numpy(np.ascontiguousarray(calib.x))
    if len(x) == 0:
        raise RoundingError("learned rounding needs calibration samples")
    key = _cache_key(sim, x, cfg)
    if key in _CACHE:
        codes, rep = _CACHE[key]
        for name, c in codes.items():
            _install_codes(sim, name, c)
        rep = dict(rep, cached=True)
        sim.rounding = rep
        if log:
            log(f"learned rounding: reused this session's result ({rep['seconds']:.1f} s when computed)")
        return rep
    t0, c0 = time.perf_counter(), time.process_time()
    infos = {i.name: i for i in qm.layer_infos}
    units = block_units(qm) if cfg.mode == "block" else None
    mode = cfg.mode if units is not None or cfg.mode == "layer" else "layer"
    if units is None:
        units = [Unit(n, [n], _LayerUnit(qm, n)) for n in qm.names]
    n_train = sum(1 for u in units if u.layers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_train * int(cfg.iters), desc="learned rounding", unit="it", leave=False,
                   dynamic_ncols=True, file=sys.stderr)
    reports = []
    saved_wq = {n: q.wq for n, q in qm.qlayers.items()}
    try:
        x_q = x_fp = x
        k_train = 0
        for ui, unit in enumerate(units):
            t_u = time.perf_counter()
            if not unit.layers:            # input pre-processing: no quantizer inside
                x_q = x_fp = _batched(unit.module, x_fp)
                continue
            k_train += 1
            layers = {n: qm.layer(n) for n in unit.layers}
            if mode == "layer":
                lu: _LayerUnit = unit.module
                inp_q, _ = lu.capture(x, True, saved_wq)
                inp_fp, y_fp = lu.capture(x, False, saved_wq)
            else:
                inp_q, inp_fp = x_q, x_fp
                hooks = {n: (q.act, q.wq) for n, q in layers.items()}
                for q in layers.values():
                    q.act = q.wq = None
                try:
                    y_fp = _batched(unit.module, inp_fp)
                finally:
                    for n, q in layers.items():
                        q.act, q.wq = hooks[n]
            with torch.no_grad():
                loss_near = float(_rec_loss(_batched(unit.module, inp_q), y_fp))
            soft = {}
            for n, q in layers.items():
                st = sim.states[n]
                qmax = np.array([Q.qrange(int(b), True)[1] for b in st.w_bits], np.float32)
                soft[n] = SoftRoundWeight(q.weight, st.w_scales, qmax, st.w_exponents)
                q.wq = soft[n]
            acts = {n: q.act for n, q in layers.items()}
            gen = torch.Generator().manual_seed(int(cfg.seed) * 1000003 + ui)
            drop = float(cfg.drop_prob) if cfg.inputs == "qdrop" else 0.0
            for n, q in layers.items():
                q.act = _TrainActQuant(acts[n], drop, gen)
            macs = sum(infos[nm].macs for nm in layers) * min(int(cfg.batch_size), len(inp_q))
            with _threads(1 if macs < SMALL_UNIT_MACS else torch.get_num_threads()):
                _train_unit(unit, layers, soft, acts, cfg, gen, inp_q, inp_fp, y_fp, bar, f"{k_train}/{n_train}")
            for nm in layers:
                _install_codes(sim, nm, soft[nm].codes())
            with torch.no_grad():
                out_q = _batched(unit.module, inp_q)
                loss_learned = float(_rec_loss(out_q, y_fp))
            if mode == "block":
                x_q, x_fp = out_q, y_fp
            flips = sum(int((sim.states[nm].w_codes != saved_codes).sum())
                        for nm, saved_codes in ((nm, _nearest_codes(sim, nm)) for nm in layers))
            total = sum(int(sim.states[nm].w_codes.size) for nm in layers)
            reports.append({"unit": unit.name, "layers": list(unit.layers), "loss_nearest": loss_near,
                            "loss_learned": loss_learned, "changed_codes": flips / max(1, total),
                            "seconds": round(time.perf_counter() - t_u, 3)})
            if log and bar is None:
                log(f"learned rounding {k_train}/{n_train} {unit.name}: output MSE {loss_near:.4g} (nearest) -> "
                    f"{loss_learned:.4g}, {flips / max(1, total) * 100:.1f}% of codes changed, "
                    f"{time.perf_counter() - t_u:.1f} s")
    except BaseException:
        for n, q in qm.qlayers.items():   # leave the nearest plan installed, not a half-learned one
            q.wq = saved_wq[n]
        raise
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t0
    rep = {"method": "learned", **cfg.to_dict(), "mode": mode, "samples": int(len(x)), "units": reports,
           "layers": len(qm.names), "seconds": round(secs, 3), "cpu_seconds": round(time.process_time() - c0, 3), "threads": torch.get_num_threads(), "cached": False}
    if log:
        log(f"learned rounding of {len(qm.names)} layers ({n_train} {mode}s, {int(cfg.iters)} steps each, "
            f"{len(x)} calibration samples): {secs:.1f} s")
    codes = {n: sim.states[n].w_codes.copy() for n in qm.names}
    _CACHE[key] = (codes, rep)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    sim.rounding = rep
    return rep


def _nearest_codes(sim, name: str) -> np.ndarray:
    from . import quantizers as Q
    from .quantize import quantized_weight_input

    st = sim.states[name]
    w = quantized_weight_input(st, sim.module.layer(name).weight.detach().numpy())
    return Q.quantize_weight(w, st.w_bits, st.w_scales)
