"""Channel-wise Hessian traces (Hutchinson) and trace-weighted sensitivities (Omega).

For every quantized layer l we estimate, from the same Hessian-vector products (HVPs):

- the weight trace per output channel c: Tr(H_c) = E_v[<v_c, (H v)_c>] over Rademacher v, where
  H is the Hessian of the mean cross-entropy loss of the analysis batch w.r.t. the layer's weight
  (BN folded) and v_c, (Hv)_c are the entries of output channel c;
- the activation trace per input channel c: the same with H the Hessian of the loss w.r.t. the
  layer's input activation x (a probe eps is added to x, eps = 0: H = d^2 L / d eps^2), summed over
  the batch and spatial positions. Because the loss is a mean over the N samples of the batch, this
  equals the average over samples of the per-sample trace summed over the channel's H x W positions.
  For a Linear the input channel is an input feature, the last axis of its input whatever its rank
  (graph.act_axis); on ``[batch, tokens, features]`` its trace is summed over the batch and the
  tokens (= the per-sample average of the feature's trace summed over the sample's tokens). Output
  channels of a Linear are its output features (rows of the ``[out, in]`` weight), at any rank.

Probing schemes (which coordinates share one HVP; see docs/hessian.md for measured error per second):
- ``network``: one Rademacher vector spanning every weight and activation: 1 HVP per probe, but
  cross-layer Hessian terms add variance to every estimate;
- ``layer``: one HVP per block (each layer's weight, each layer's activation): 2L HVPs per probe,
  cross-block terms vanish;
- ``interleave:K``: K HVPs per probe; blocks are dealt round-robin in graph order into K groups, so
  that neighbours (the strongest-coupled blocks) never share a product;
- ``channel``: one HVP per channel (the reference the issue asks to compare against; slow).
Cross-terms have zero mean, so every scheme is unbiased; they differ in variance and cost.

All HVPs of a batch reuse one first-order graph (forward + backward with create_graph), kept alive
for the whole run: only the second backward is paid per product.

Stopping rule: after each probe, the standard error of every layer's trace (weights and
activations, the sum over channels, from the per-probe samples) must be below ``tol`` times its
magnitude; else continue until ``max_probes``. Each channel gets its own standard error. A block
(a layer's weights or its activations) that meets the rule after ``min_probes`` is finished: later
probes leave it out (its products, or under ``ggn`` its per-sample weight squares, are not computed
and its estimate is that of the probes it had), so the cost of the run is set by the slowest blocks.

Omega_c(b) = Tr(H_c) / n_c * ||Q_b(w_c) - w_c||^2 with the per-channel weight quantizer of
quantizers.py (n_c: elements of the channel); for activations Omega_c(b) = Tr(H_c) / n_c *
E_x ||Q_b(x_c) - x_c||^2 with the channel's calibrated quantizer at b bits (free scale
max|x_c| / qmax(b), sign from the calibration), the expectation over the analysis samples and
n_c = H*W (a conv) or the tokens per sample (a Linear).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from . import quantizers as Q
from .data import Dataset
from .errors import CwhawqError, DataError, ModelError
from .graph import QModel, act_axis

SCHEMES = ("exact", "ggn", "network", "layer", "interleave", "channel")
DEFAULT_SCHEME = "auto"   # piecewise linear: exact or ggn, whichever costs fewer backward passes; else layer
MIN_PROBES = 8
# per-probe relative standard deviation of the worst layer's ggn trace that ``auto`` assumes when it
# prices ggn: the low end of what was measured (0.09 on ResNet-18 at 224 with 1000 classes and 16
# images; 0.2 on lenet-fmnist, 0.6 on resnet20-fmnist with 10 classes; docs/hessian.md), so that
# ggn is chosen only where exact would need more backward passes than ggn does at its best
GGN_PROBE_REL_SD = 0.1


# ops through which a network stays piecewise linear in every layer's weights and inputs
_PL_OPS = {
    "aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.leaky_relu.default", "aten.max_pool2d.default", "aten.max_pool2d_with_indices.default",
    "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default", "aten.mean.dim", "aten.add.Tensor",
    "aten.add_.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.mul.Tensor", "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default", "aten.flatten.using_ints", "aten.view.default",
    "aten.reshape.default", "aten.cat.default", "aten.permute.default", "aten.transpose.int",
    "aten.contiguous.default", "aten.dropout.default", "aten.pad.default", "aten.constant_pad_nd.default",
    "aten.clone.default", "aten.squeeze.dim", "aten.unsqueeze.default", "aten.slice.Tensor",
    "<built-in function getitem>", "aten.alias.default", "aten._assert_tensor_metadata.default",
}


def non_piecewise_linear_ops(qm: QModel) -> list[str]:
    """Ops of the graph that make it not piecewise linear (or that multiply two activations)."""
    bad = []
    for node in qm.gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = str(node.target)
        if t not in _PL_OPS:
            bad.append(t)
        elif t in ("aten.mul.Tensor", "aten.div.Tensor"):
            # a product of two activations is not linear; by a constant (get_attr / scalar) it is
            if isinstance(node.args[1], torch.fx.Node) and node.args[1].op != "get_attr" and \
                    isinstance(node.args[0], torch.fx.Node) and node.args[0].op != "get_attr":
                bad.append(t + " (of two activations)")
    return sorted(set(bad))


def num_classes(qm: QModel) -> int:
    """Width of the model's output (the classes), from the exported graph."""
    for node in qm.gm.graph.nodes:
        if node.op == "output":
            out = node.args[0]
            out = out[0] if isinstance(out, (tuple, list)) else out
            val = getattr(out, "meta", {}).get("val")
            if val is not None and hasattr(val, "shape"):
                return int(val.shape[-1])
    return int(qm.layer_infos[-1].out_channels)


def resolve_scheme(s: str, qm: QModel, tol: float = 0.01, max_probes: int = 512) -> str:
    """``auto``: for a piecewise-linear network the cheaper of ``exact`` (one backward pass per class
    and batch) and ``ggn`` (one backward pass per probe and batch, probes expected to reach ``tol``:
    (GGN_PROBE_REL_SD / tol)^2, at least MIN_PROBES, at most ``max_probes``); ``layer`` otherwise.
    A backward pass costs the same in both (it scales with the parameters, MACs and batch), so the
    rule compares the number of passes; exact wins ties (it has no error)."""
    if s != "auto":
        return s
    if non_piecewise_linear_ops(qm):
        return "layer"
    probes = max_probes if tol <= 0 else min(max_probes, max(MIN_PROBES, math.ceil((GGN_PROBE_REL_SD / tol) ** 2)))
    return "exact" if num_classes(qm) <= probes else "ggn"


def parse_scheme(s: str) -> tuple[str, int]:
    name, _, k = s.partition(":")
    if name not in SCHEMES:
        raise CwhawqError(f"unknown probing scheme {s!r}: use exact, ggn, network, layer, interleave:K or channel")
    if name == "interleave":
        try:
            kk = int(k or 4)
        except ValueError:
            raise CwhawqError(f"interleave:K needs an integer K, got {k!r}") from None
        if kk < 1:
            raise CwhawqError("interleave:K needs K >= 1")
        return name, kk
    return name, 0


_NO_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")


def _no_second_derivative(qm: QModel, exc: RuntimeError) -> ModelError | None:
    """PyTorch's "derivative for aten::X_backward is not implemented" (an operator without a
    second derivative, e.g. the CPU flash attention kernel behind scaled_dot_product_attention)
    as a one-line ModelError naming the operator and the graph node that calls it; None for
    any other error."""
    m = _NO_DERIVATIVE.search(str(exc))
    if m is None:
        return None
    op = m.group(1)
    fwd = op.split("::")[-1]
    fwd = fwd[:-len("_backward")] if fwd.endswith("_backward") else fwd
    words = set(fwd.strip("_").split("_"))
    nodes = []
    for node in qm.gm.graph.nodes:
        if node.op != "call_function":
            continue
        base = str(node.target).split(".")[1] if str(node.target).startswith("aten.") else str(node.target)
        if base.strip("_") and set(base.strip("_").split("_")) <= words:
            nodes.append(f"{node.name} ({node.target})")
    where = f" used by graph node {nodes[0]}" if nodes else ""
    more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
    return ModelError(f"{op} has no derivative in PyTorch, so the Hessian (a second derivative) cannot be "
                      f"computed through aten.{fwd}{where}{more}; models with this operator cannot be analyzed yet")


class _Welford:
    def __init__(self, shape):
        self.n = 0
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def add(self, x):
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def var(self):
        return self.m2 / max(1, self.n - 1)

    @property
    def stderr(self):
        return np.sqrt(self.var / max(1, self.n))


@dataclass
class _Block:
    layer: str
    kind: str        # weight | activation
    index: int       # position of the leaf in the leaf list


class _BatchGraph:
    """First-order graph of one batch: loss, leaves (weights + activation probes) and their grads."""

    def __init__(self, qm: QModel, x: torch.Tensor, y: torch.Tensor, n_total: int | None = None):
        """``n_total``: the samples of the whole batch when ``x`` is one rank's share of it (the loss is
        the sum over these samples over ``n_total``, so that the ranks' Hessians add up to the batch's)."""
        self.qm = qm
        self.n_total = int(n_total if n_total is not None else x.shape[0])
        eps: dict[str, torch.Tensor] = {}
        acts: dict[str, torch.Tensor] = {}

        def make(name):
            def probe(inp):
                e = torch.zeros_like(inp, requires_grad=True)
                eps[name] = e
                acts[name] = inp.detach()
                return inp + e
            return probe

        outs: dict[str, torch.Tensor] = {}
        hooks = []
        for name, q in qm.qlayers.items():
            q.act = make(name)
            hooks.append(q.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o)))
        try:
            out = qm(x)
        finally:
            qm.reset()
            for h in hooks:
                h.remove()
        self.out = out
        self.layer_outputs = [outs[n] for n in qm.names]
        self.layer_modules = [qm.layer(n) for n in qm.names]
        self.loss = F.cross_entropy(out, y, reduction="sum") / self.n_total
        if not torch.isfinite(self.loss):
            raise CwhawqError("loss is NaN or inf on the analysis batch")
        names = qm.names
        self.weights = [qm.layer(n).weight for n in names]
        self.eps = [eps[n] for n in names]
        self.acts = [acts[n] for n in names]
        self.n_samples = int(x.shape[0])
        # the input-channel axis of every layer's activation leaf (1 for convs, last for Linears)
        self.axes = [act_axis(qm.layer(n).kind, e.dim()) for n, e in zip(names, self.eps)]
        self.leaves = self.weights + self.eps
        self._grads = None
        self._a_half = None

    @property
    def grads(self):
        if self._grads is None:
            self._grads = torch.autograd.grad(self.loss, self.leaves, create_graph=True)
        return self._grads

    def hvp(self, idx: list[int], vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """(H v) restricted to leaves ``idx`` for a probe v supported on those leaves."""
        try:
            gv = sum((self.grads[i] * v).sum() for i, v in zip(idx, vs))
            return torch.autograd.grad(gv, [self.leaves[i] for i in idx], retain_graph=True)
        except RuntimeError as exc:
            err = _no_second_derivative(self.qm, exc)
            if err is None:
                raise
            raise err from None

    def _probs(self) -> torch.Tensor:
        return torch.softmax(self.out.detach().double(), dim=1)

    def a_half(self) -> torch.Tensor:
        """A factor B of A/N per sample [N, C, C] (B B^T = A_n / N): B = (I - p 1^T) diag(sqrt p) / sqrt N,
        since (I - p 1^T) diag(p) (I - 1 p^T) = diag(p) - p p^T when the p sum to 1 (no eigendecomposition)."""
        if self._a_half is None:
            with torch.no_grad():
                p = self._probs()
                sq = p.sqrt()
                half = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)
                self._a_half = (half / math.sqrt(self.n_total)).float()
        return self._a_half

    def b_times(self, r: torch.Tensor) -> torch.Tensor:
        """B r per sample for r [N, C], in O(N C): (sqrt(p) * r - p <sqrt(p), r>) / sqrt N."""
        with torch.no_grad():
            p = self._probs()
            sq = p.sqrt()
            g = sq * r.double() - p * (sq * r.double()).sum(1, keepdim=True)
            return (g / math.sqrt(self.n_total)).float()

    def _gn_squares(self, gout: torch.Tensor, weights=None) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        """Per-channel squares of the per-sample gradients of <out, gout> (weights, activations);
        ``weights``: the layers whose weight squares are wanted (default all; the others get None)."""
        L = len(self.weights)
        want = range(L) if weights is None else sorted(weights)
        outs = [self.layer_outputs[i] for i in want]
        gouts = torch.autograd.grad(self.out, self.eps + outs, grad_outputs=gout, retain_graph=True)
        wtr: list[np.ndarray | None] = [None] * L
        with torch.no_grad():
            atr = [_channel_sums(gouts[i] ** 2, "activation", self.axes[i]) for i in range(L)]
            for j, i in enumerate(want):
                wtr[i] = _per_sample_weight_sq(self.layer_modules[i], self.acts[i], gouts[L + j], self.n_samples)
        return wtr, atr

    def exact(self, tick=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Exact per-channel traces of the GGN diagonal blocks (weights, activations).

        One backward pass per class k with output gradient column k of (A/N)^(1/2): the activation
        gradients are per sample (their squares sum to the activation traces) and the per-sample weight
        gradients come from the layer's output gradient and its unfolded input (the squares of those,
        summed over samples and classes, are the weight traces). ``tick(k, classes)`` after each class.
        """
        L = len(self.weights)
        half = self.a_half()
        wtr = [np.zeros(w.shape[0]) for w in self.weights]
        atr = [np.zeros(e.shape[a]) for e, a in zip(self.eps, self.axes)]
        for k in range(half.shape[2]):
            w_k, a_k = self._gn_squares(half[:, :, k])
            for i in range(L):
                atr[i] += a_k[i]
                wtr[i] += w_k[i]
            if tick is not None:
                tick(k + 1, half.shape[2])
        return wtr, atr

    def ggn_probe(self, r: torch.Tensor, weights=None) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        """Per-channel GGN trace estimates (weights, activations) from an output-space probe r [N, classes]:
        one backward pass.

        A_n = diag(p_n) - p_n p_n^T is the Hessian of the cross-entropy w.r.t. sample n's logits; the
        loss is a mean over N samples, hence A/N, with a factor B B^T = A/N. For each sample n,
        E_r[||(J_n^T B r)_c||^2] = Tr_c(J_n^T B B^T J_n); summed over samples that is Tr_c(GGN). The squares
        are taken per sample (the weights' per-sample gradients from the layer's output gradient and input,
        as in :meth:`exact`), so no cross-sample products add variance. ``weights``: as in :meth:`_gn_squares`.
        """
        return self._gn_squares(self.b_times(r), weights)


def _per_sample_weight_sq(q, x: torch.Tensor, delta: torch.Tensor, n_samples: int | None = None) -> np.ndarray:
    """sum_n ||dL_n/dW_c||^2 per output channel c, from inputs x and output gradients delta.

    A Linear on ``[batch, ..., features]``: sample n's gradient is sum over its tokens t of
    delta[n, t]^T x[n, t]. That needs the batch on the first axis (a layer working on
    ``[tokens, batch, features]`` or on batch and tokens merged cannot be split into samples here)."""
    n = x.shape[0]
    if not q.is_conv:
        if n_samples is not None and n != n_samples:
            raise CwhawqError(f"layer {q.layer_name}: exact traces need the batch on the first axis of a Linear's "
                              f"input, got shape {tuple(x.shape)} for {n_samples} samples; use --scheme layer")
        if x.dim() == 2:
            return ((delta.double() ** 2).t() @ (x.double() ** 2).sum(1)).numpy()
        xs = x.reshape(n, -1, x.shape[-1]).double()                                    # N, T, K
        ds = delta.reshape(n, -1, delta.shape[-1]).double()                            # N, T, O
        grads = torch.einsum("nto,ntk->nok", ds, xs)                                   # per-sample grads
        return (grads ** 2).sum(dim=(0, 2)).numpy()
    kh, kw = q.weight.shape[2:]
    g = q.groups
    co, ci = q.weight.shape[0] // g, q.weight.shape[1] * kh * kw     # per group: outputs, inputs x kernel
    p_out = delta[0, 0].numel()                                      # output positions P
    # ||dL_n/dW_o||^2 = ||D_o U^T||^2 (D: output gradient [o, P], U: unfolded input [i, P]) either from the
    # per-sample gradients (o i P multiply-adds) or as D_o G D_o^T with the Gram matrix G = U^T U of the
    # positions (i P^2 + o P^2): the latter where positions are few (the deep layers of a CNN)
    gram = ci * p_out * p_out + co * p_out * p_out < co * ci * p_out
    # samples in chunks, so that the per-sample tensors stay under ~2^24 elements
    size = g * (p_out * p_out if gram else co * ci)
    step = max(1, (1 << 24) // max(1, size))
    total = torch.zeros(g * co, dtype=torch.float64)
    for s in range(0, n, step):
        xs, ds = x[s:s + step], delta[s:s + step]
        m = xs.shape[0]
        u = F.unfold(xs, (kh, kw), dilation=q.dilation, padding=q.padding, stride=q.stride)  # m, Cin*kk, P
        d = ds.reshape(m, g, co, -1)                                                         # m, g, Co/g, P
        u = u.reshape(m, g, ci, -1)                                                          # m, g, Ci/g*kk, P
        if gram:
            d, u = d.double(), u.double()
            G = torch.einsum("ngip,ngiq->ngpq", u, u)                                        # m, g, P, P
            part = (torch.einsum("ngop,ngpq->ngoq", d, G) * d).sum(dim=(0, 3))
        else:
            grads = torch.einsum("ngop,ngip->ngoi", d, u)                                    # per-sample grads
            part = (grads * grads).sum(dim=(0, 3), dtype=torch.float64)
        total += part.reshape(-1)
    return total.numpy()


def _channel_sums(t: torch.Tensor, kind: str, axis: int = 1) -> np.ndarray:
    """Per-channel sums: a weight's output channels (axis 0); an activation's channels on ``axis``
    (1 for a conv, the last for a Linear), summed over every other axis (batch, positions, tokens)."""
    if kind == "weight":
        return t.reshape(t.shape[0], -1).sum(1).double().numpy()
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1).double().numpy()


def _rademacher(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float().mul_(2).sub_(1)


@dataclass
class TraceResult:
    names: list[str]
    weight_trace: dict[str, np.ndarray]
    weight_stderr: dict[str, np.ndarray]
    act_trace: dict[str, np.ndarray]
    act_stderr: dict[str, np.ndarray]
    probes: int
    hvps: int
    loss: float
    seconds: float
    converged: bool
    layer_rel_stderr: float


def channel_traces(qm: QModel, batches: list[tuple[torch.Tensor, torch.Tensor]], scheme: str = DEFAULT_SCHEME,
                   max_probes: int = 512, tol: float = 0.01, seed: int = 0, min_probes: int = MIN_PROBES,
                   progress=None, time_limit: float | None = None, log=None) -> TraceResult:
    """Per-channel Hutchinson traces of weights and input activations of every quantized layer.

    Under torchrun (:mod:`cwhawq.dist`) every batch is split into the ranks' contiguous shares of its
    samples; each rank draws every probe at the whole batch's shape (the same generator on every
    rank) and keeps its rows, so that the ranks' estimates add up, per probe, to one process's on the
    whole batch; the per-probe estimates are summed across ranks before the running mean, variance
    and stopping rule (decided on rank 0 and broadcast). ``log(line)``: a line when the first-order
    graphs are built, at every tenth of ``max_probes`` (every tenth of the classes of ``exact``) and at
    the end."""
    if not batches:
        raise DataError("no data to analyze (empty dataset)")
    scheme = resolve_scheme(scheme, qm, tol, max_probes)
    name, k = parse_scheme(scheme)
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    qm.reset()
    if name in ("ggn", "exact"):
        bad = non_piecewise_linear_ops(qm)
        if bad:
            raise CwhawqError(f"scheme {name} needs a piecewise-linear network (there the generalised Gauss-Newton "
                              f"diagonal blocks equal the Hessian's); this one has {', '.join(bad[:3])}: "
                              f"use --scheme layer")
    # this rank's share of every batch: (rows lo:hi of the batch, batch size); None where it has no rows
    shares = [(dist.shard_range(len(x)), len(x)) for x, _ in batches]
    with torch.enable_grad():
        graphs = [_BatchGraph(qm, x[lo:hi], y[lo:hi], n_total=n) if hi > lo else None
                  for (x, y), ((lo, hi), n) in zip(batches, shares)]
    nb = len(graphs)
    names = qm.names
    L = len(names)
    blocks = [_Block(n, "weight", i) for i, n in enumerate(names)] + \
             [_Block(n, "activation", L + i) for i, n in enumerate(names)]
    # interleave in graph order: w0 a0 w1 a1 ...
    ordered = [b for i in range(L) for b in (blocks[i], blocks[L + i])]
    if name == "network":
        groups = [ordered]
    elif name == "layer":
        groups = [[b] for b in ordered]
    elif name == "interleave":
        kk = min(k, len(ordered))
        groups = [ordered[j::kk] for j in range(kk)]
    else:
        groups = None  # channel, ggn
    # the leaves' shapes at each whole batch (activation probes are drawn at it, then cut to the share:
    # a layer input holding r rows per sample, [N, ...] or [N * tokens, ...], gives rows lo*r:hi*r)
    leaf_shapes = [_input_shapes(qm, x) for x, _ in batches]
    w_shapes = [tuple(qm.layer(n).weight.shape) for n in names]
    if dist.active():
        for (x, _), ls in zip(batches, leaf_shapes):
            for n, shp in ls.items():
                if shp[0] % len(x):
                    raise CwhawqError(f"layer {n}: its input {shp} does not hold the batch's {len(x)} samples on "
                                      f"its first axis, so it cannot be shared across processes: analyze it in one")

    def draw(b: _Block, bi: int) -> torch.Tensor | None:
        """A probe over block b of batch bi at the whole batch's shape; this rank's rows of it (None: no rows)."""
        (lo, hi), n_batch = shares[bi]
        if b.kind == "weight":
            v = _rademacher(w_shapes[b.index], gen)
        else:
            full = leaf_shapes[bi][b.layer]
            v = _rademacher(full, gen)
            r = full[0] // n_batch if full[0] % n_batch == 0 else None
            if r is not None and (lo, hi) != (0, n_batch):
                v = v[lo * r:hi * r]
        return v if hi > lo else None

    # activation channels: axis 1 of a conv's input, the last (features) of a Linear's, whatever its rank
    axes = {b.index: 0 if b.kind == "weight" else act_axis(qm.layer(b.layer).kind, len(leaf_shapes[0][b.layer]))
            for b in blocks}
    shapes = {b.index: (w_shapes[b.index][0] if b.kind == "weight" else leaf_shapes[0][b.layer][axes[b.index]])
              for b in blocks}
    offsets, off = {}, 0
    for b in blocks:
        offsets[b.index] = off
        off += shapes[b.index]
    acc = {b.index: _Welford(shapes[b.index]) for b in blocks}
    acc_sum = {b.index: _Welford(()) for b in blocks}   # per-probe layer traces (sums over channels)
    hvps = 0
    converged = False
    worst = math.inf
    probes = 0
    every = max(1, max_probes // 10)
    if log is not None:
        log(f"  first-order graphs of {nb} batch{'es' if nb > 1 else ''} built in {time.time() - t0:.1f} s "
            f"({scheme}; this process: {sum(hi - lo for (lo, hi), _ in shares)} samples"
            + (f", rank {dist.rank()} of {dist.world()}" if dist.active() else "") + ")")
    n_classes = num_classes(qm)
    live = {b.index for b in blocks}   # blocks still short of the rule (the others are finished)
    with torch.enable_grad():
        for p in range(max_probes):
            est = {b.index: np.zeros(shapes[b.index]) for b in blocks}
            for bi, g in enumerate(graphs):
                if name == "exact":
                    hvps += n_classes
                    if g is None:
                        continue
                    tick = None
                    if log is not None and n_classes * nb >= 100:   # long enough to be worth the lines
                        step = max(1, n_classes // 10)

                        def tick(kc, kt, bi=bi):
                            if kc % step == 0 and kc < kt:
                                log(f"  exact: batch {bi + 1}/{nb}, class {kc}/{kt} ({time.time() - t0:.1f} s)")
                    wtr, atr = g.exact(tick)
                    for b in blocks:
                        est[b.index] += (wtr[b.index] if b.kind == "weight" else atr[b.index - L]) / nb
                elif name == "ggn":
                    (lo, hi), n_batch = shares[bi]
                    r = _rademacher((n_batch, n_classes), gen)[lo:hi]
                    hvps += 1
                    if g is None:
                        continue
                    wtr, atr = g.ggn_probe(r, weights=[i for i in range(L) if i in live])
                    for b in blocks:
                        if b.index in live:
                            est[b.index] += (wtr[b.index] if b.kind == "weight" else atr[b.index - L]) / nb
                elif groups is not None:
                    for grp in groups:
                        grp = [b for b in grp if b.index in live]
                        if not grp:
                            continue
                        vs = [draw(b, bi) for b in grp]
                        hvps += 1
                        if g is None:
                            continue
                        idx = [b.index for b in grp]
                        hv = g.hvp(idx, vs)
                        for b, v, h in zip(grp, vs, hv):
                            est[b.index] += _channel_sums(v * h, b.kind, axes[b.index]) / nb
                else:
                    for b in blocks:
                        if b.index not in live:
                            continue
                        v_full = draw(b, bi)
                        for c in range(shapes[b.index]):
                            hvps += 1
                            if g is None:
                                continue
                            v = torch.zeros_like(v_full)
                            sel = (slice(None),) * axes[b.index] + (c,)
                            v[sel] = v_full[sel]
                            h = g.hvp([b.index], [v])[0]
                            est[b.index][c] += float((v * h).sum()) / nb
            if dist.active():   # the ranks' shares add up to the batch's estimate
                flat = dist.all_sum(np.concatenate([est[b.index] for b in blocks]))
                for b in blocks:
                    est[b.index] = flat[offsets[b.index]:offsets[b.index] + shapes[b.index]]
            for i, e in est.items():
                if i in live:
                    acc[i].add(e)
                    acc_sum[i].add(e.sum())
            probes = p + 1
            # stopping rule on layer traces (sums over channels); a block that meets it is finished
            rel = {i: float(a.stderr) / max(abs(float(a.mean)), 1e-30) for i, a in acc_sum.items()}
            worst = max(rel.values())
            if name != "exact" and probes >= min_probes:
                live = {i for i in live if not rel[i] < tol}
            if progress is not None:
                progress(probes, worst)
            if log is not None and name != "exact" and (probes % every == 0 or probes == max_probes):
                log(f"  probe {probes}/{max_probes}: worst layer rel. stderr {worst:.3g} (tol {tol:g}), "
                    f"{len(live)} of {len(blocks)} blocks left, {time.time() - t0:.1f} s")
            stop = 1 if (probes >= min_probes and worst < tol) or name == "exact" else 0
            if not stop and time_limit is not None and time.time() - t0 > time_limit:
                stop = 2
            stop = dist.broadcast(stop)   # rank 0 decides: every rank runs the same probes
            if stop:
                converged = stop == 1
                break
    loss = float(dist.all_sum(sum(g.loss.item() for g in graphs if g is not None))) / nb
    res = TraceResult(names,
                      {n: acc[i].mean.copy() for i, n in enumerate(names)},
                      {n: acc[i].stderr.copy() for i, n in enumerate(names)},
                      {n: acc[L + i].mean.copy() for i, n in enumerate(names)},
                      {n: acc[L + i].stderr.copy() for i, n in enumerate(names)},
                      probes, hvps, loss, time.time() - t0, converged, float(worst))
    if log is not None:
        log(f"  traces: {probes} probe{'s' if probes > 1 else ''}, {hvps} products, "
            f"{'converged' if converged else 'not converged'} (worst layer rel. stderr {worst:.3g}), "
            f"{res.seconds:.1f} s")
    for n in names:
        for d in (res.weight_trace, res.weight_stderr, res.act_trace, res.act_stderr):
            if not np.isfinite(d[n]).all():
                raise CwhawqError(f"trace of layer {n} is NaN or inf")
    return res



# ----------------------------------------------------------------------------------- sensitivities
def act_sq_error(acts: torch.Tensor, bits: int, signed: bool, amax: np.ndarray, axis: int = 1,
                 n_samples: int | None = None) -> np.ndarray:
    """E over samples of ||Q_b(x_c) - x_c||^2 (summed over spatial positions or tokens), per channel
    (channels on ``axis``; ``n_samples`` defaults to the first axis's size)."""
    x = acts.double().movedim(axis, 1)
    s = torch.from_numpy(Q.act_free_scales(amax, bits, signed).astype(np.float64))
    lo, hi = Q.qrange(bits, signed)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = s.view(shape)
    err = (torch.clamp(torch.round(x / s), lo, hi) * s - x) ** 2
    n = n_samples if n_samples is not None else x.shape[0]
    return (err.transpose(0, 1).reshape(x.shape[1], -1).sum(1) / n).numpy()


def sensitivities(qm: QModel, tr: TraceResult, acts: dict[str, torch.Tensor], bit_choices=Q.BIT_CHOICES,
                  weight_method: str = "mse") -> list[dict]:
    """Per-layer JSON records: traces, standard errors and Omega per bit-width, weights and activations."""
    layers = []
    infos = {i.name: i for i in qm.layer_infos}
    for name in tr.names:
        info = infos[name]
        w = qm.layer(name).weight.detach().numpy()
        n_w = w[0].size
        werr = Q.weight_sq_error(w, bit_choices, weight_method)
        wtr = tr.weight_trace[name]
        a = acts[name]
        ax = act_axis(info.kind, a.dim())
        amax = a.abs().movedim(ax, 0).reshape(a.shape[ax], -1).max(1).values.double().numpy()
        signed = bool((a < 0).any())
        n_a = info.act_elems_per_channel
        n_samples = a.numel() // (a.shape[ax] * n_a)
        atr = tr.act_trace[name]
        layers.append({
            "name": name, "kind": info.kind,
            "weight": {"shape": list(w.shape), "trace": wtr.tolist(), "stderr": tr.weight_stderr[name].tolist(),
                       "omega": {str(b): (wtr / n_w * werr[b]).tolist() for b in bit_choices}},
            "activation": {"shape": list(info.in_shape), "trace": atr.tolist(), "stderr": tr.act_stderr[name].tolist(),
                           "range": amax.tolist(), "signed": signed,
                           "omega": {str(b): (atr / n_a * act_sq_error(a, b, signed, amax, ax, n_samples)).tolist()
                                     for b in bit_choices}},
        })
    return layers


def analyze(qm: QModel, data: Dataset, batch_size: int = 128, batches: int = 1, max_probes: int = 512,
            tol: float = 0.01, seed: int = 0, scheme: str = DEFAULT_SCHEME, bit_choices=Q.BIT_CHOICES,
            progress=None, model_name: str | None = None, log=None) -> dict | None:
    """The whole analysis: traces from ``batches`` batches of ``data`` and Omega per channel (JSON dict).

    Under torchrun the traces are computed on the ranks' shares of every batch and summed
    (:func:`channel_traces`); the sensitivities (one forward pass over the samples) are computed on
    rank 0, and every other rank returns None. ``log(line)``: progress lines (see :func:`channel_traces`)."""
    if len(data) == 0:
        raise DataError("empty dataset")
    t0 = time.time()
    n = min(len(data), batch_size * batches)
    sub = data.subset(n, seed=seed)
    bl = [(torch.from_numpy(sub.x[i:i + batch_size]), torch.from_numpy(sub.y[i:i + batch_size]))
          for i in range(0, n, batch_size)]
    asked = scheme
    scheme = resolve_scheme(scheme, qm, tol, max_probes)
    if log is not None:
        why = ""
        if asked == "auto":
            why = (" (auto: not piecewise linear)" if scheme == "layer" else
                   f" (auto: {num_classes(qm)} classes, i.e. backward passes per batch for exact, against the "
                   f"ggn probes expected to reach tol {tol:g})")
        log(f"traces of {len(qm.names)} layers on {n} samples in {len(bl)} batch{'es' if len(bl) > 1 else ''} "
            f"(batch size {batch_size}): scheme {scheme}{why}"
            + (f"; {dist.world()} processes, each on its share of every batch" if dist.active() else ""))
    tr = channel_traces(qm, bl, scheme=scheme, max_probes=max_probes, tol=tol, seed=seed, progress=progress,
                        log=log)
    if not dist.is_main():
        return None
    if log is not None:
        log("sensitivities (Omega per channel and bit-width)")
    acts = _capture_inputs(qm, bl)
    layers = sensitivities(qm, tr, acts, bit_choices)
    return {"format": "cwhawq-sensitivity", "version": 1, "model": model_name, "data": data.name,
            "samples": n, "batch_size": batch_size, "batches": len(bl), "scheme": scheme, "tol": tol,
            "max_probes": max_probes, "seed": seed, "probes": tr.probes, "hvps": tr.hvps,
            "converged": tr.converged, "worst_rel_stderr": tr.layer_rel_stderr, "loss": tr.loss,
            "trace_seconds": tr.seconds, "seconds": time.time() - t0,
            "normalisation": "mean cross-entropy over the analysis samples; activation traces summed over "
                             "batch and spatial positions, or batch and tokens for a Linear whose channels are "
                             "its input features (= per-sample average of the channel's trace)",
            "layers": layers}


@torch.no_grad()
def _input_shapes(qm: QModel, x: torch.Tensor) -> dict[str, tuple]:
    """Every quantized layer's input shape, as the layer sees it, for the batch ``x``."""
    shapes: dict[str, tuple] = {}

    def make(name):
        def hook(t):
            shapes[name] = tuple(t.shape)
            return t
        return hook

    for name, q in qm.qlayers.items():
        q.act = make(name)
    try:
        with torch.no_grad():
            qm(x)
    finally:
        qm.reset()
    return shapes


def _capture_inputs(qm: QModel, bl) -> dict[str, torch.Tensor]:
    acts: dict[str, list] = {}

    kinds = {i.name: i.kind for i in qm.layer_infos}

    def make(name):
        def hook(x):
            # a Linear's rows are independent: kept as [rows, features], whatever the layout of batch
            # and tokens, so that batches concatenate
            acts.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]) if kinds[name] == "linear"
                                             else x.detach())
            return x
        return hook

    for name, q in qm.qlayers.items():
        q.act = make(name)
    try:
        for x, _ in bl:
            qm(x)
    finally:
        qm.reset()
    return {n: torch.cat(v) for n, v in acts.items()}


def load_sensitivity(path) -> dict:
    """Read a sens.json file, checking its format."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise CwhawqError(f"sensitivity file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CwhawqError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
        raise CwhawqError(f"{p} is not a cwhawq sensitivity file (no 'layers')")
    return d


def plot_sensitivity(sens: dict, path) -> None:
    """Per-layer distribution of channel traces (weights and activations), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    names = [l["name"] for l in sens["layers"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(names)), 7), sharex=True)
    for ax, key, title in ((axes[0], "weight", "weight trace per output channel"),
                           (axes[1], "activation", "activation trace per input channel")):
        data = [np.clip(np.abs(np.asarray(l[key]["trace"])), 1e-12, None) for l in sens["layers"]]
        ax.boxplot(data, whis=(0, 100))
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_xticks(range(1, len(names) + 1), names, rotation=70, fontsize=7)
    fig.suptitle(f"Channel-wise Hessian traces ({sens.get('model') or ''}, {sens['probes']} probes)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=str(path).rsplit(".", 1)[-1] if "." in str(path) else "png")
    plt.close(fig)
