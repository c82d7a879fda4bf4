"""Finding the quantizable layers of a model, on its ``torch.export`` graph.

Zoo models (nn.Modules) and ``.pt2`` archives go through the same path: the model is exported to an
ATen-level FX graph, batch norms that follow a conv are folded into it, and every ``aten.conv2d`` /
``aten.convolution`` (2-D, not transposed) and ``aten.linear`` whose weight is a parameter becomes a
call to a :class:`QLayer` module. A QLayer owns the (folded) float weight and bias, and two hooks
the later stages use: ``act`` (applied to the layer's input: a quantizer, or a Hessian probe) and
``wq`` (the weight's fake quantizer under a plan). Layer names are the weight parameter's
name without ``.weight`` / ``_weight`` (``layer1.0.conv1``, ``attn.in_proj`` for
``nn.MultiheadAttention``'s packed ``in_proj_weight``), in graph (topological) order.

Channels: a conv's output channels are axis 0 of its weight and its input channels axis 1 of its
input. A Linear takes inputs of any rank >= 2 (``[batch, features]``, ``[batch, tokens, features]``,
or the ``[tokens, batch, features]`` and ``[tokens * batch, features]`` that
``nn.MultiheadAttention`` works in): its output channels are the output features (axis 0 of the
``[out, in]`` weight) and its input channels the input features, the **last** axis of the input
(:func:`act_axis`). A packed projection (``in_proj_weight`` ``[3E, E]``) is one layer with 3E output
channels.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import ModelError

aten = torch.ops.aten
_CONV_OPS = {aten.conv2d.default, aten.convolution.default}
_LINEAR_OPS = {aten.linear.default}
_BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def act_axis(kind: str, ndim: int) -> int:
    """The axis of a layer's input that holds its input channels: 1 for a conv (N, C, H, W), the
    last for a Linear (features), whatever the rank (``[batch, tokens, features]``: 2)."""
    return 1 if kind != "linear" else ndim - 1


class QLayer(nn.Module):
    """A quantizable Conv2d or Linear with hooks for quantization and Hessian probes."""

    def __init__(self, name: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
        super().__init__()
        self.layer_name = name
        self.kind = kind  # conv | depthwise | linear
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups
        self.act = None   # callable applied to the input (quantizer / probe), or None
        self.wq = None    # callable weight -> weight used in the op (fake quantizer), or None

    def __setattr__(self, name, value):
        # the hooks are plain attributes (not registered submodules), so any callable can be swapped in
        if name in ("act", "wq"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = self.weight if self.wq is None else self.wq(self.weight)
        if self.is_conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.layer_name}: {self.kind} {tuple(self.weight.shape)}"


@dataclass
class LayerInfo:
    """Static description of one quantizable layer (used for plans, costs and the agent's state)."""

    index: int
    name: str
    kind: str                 # conv | depthwise | linear
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    weight_shape: tuple[int, ...]
    params: int
    in_shape: tuple[int, ...]   # input per sample: conv (C,H,W); linear (features,) or (tokens, features)
    out_shape: tuple[int, ...]  # likewise: conv (C,H,W); linear (out,) or (tokens, out)
    macs: int                   # multiply-accumulates per sample

    @property
    def tokens(self) -> int:
        """Rows a Linear applies its weight to per sample (1 for [batch, features]); 1 for a conv."""
        return int(self.in_shape[0]) if self.kind == "linear" and len(self.in_shape) == 2 else 1

    @property
    def weight_elems_per_channel(self) -> int:
        return self.params // self.out_channels

    @property
    def act_elems_per_channel(self) -> int:
        """Input values per sample of one input channel: H*W for a conv, the tokens for a Linear."""
        if self.kind == "linear":
            return self.tokens
        n = 1
        for d in self.in_shape[1:]:
            n *= d
        return n

    def to_dict(self) -> dict:
        return asdict(self)


class QModel(nn.Module):
    """The canonical graph module plus its QLayers, in order."""

    def __init__(self, gm: fx.GraphModule, layers: list[LayerInfo], input_shape):
        super().__init__()
        self.gm = gm
        self.layer_infos = layers
        self.input_shape = tuple(input_shape)

    def forward(self, x):
        return self.gm(x)

    def train(self, mode: bool = True):
        # the exported graph is frozen in inference form (BN in eval, no dropout); the flag is moot
        self.training = mode
        return self

    @property
    def qlayers(self) -> dict[str, QLayer]:
        return {info.name: self.gm.qlayers[_key(info.name)] for info in self.layer_infos}

    def layer(self, name: str) -> QLayer:
        try:
            return self.gm.qlayers[_key(name)]
        except KeyError:
            raise ModelError(f"no quantizable layer named {name!r}") from None

    def reset(self) -> None:
        """Remove every hook and override (back to the float model)."""
        for q in self.qlayers.values():
            q.act = None
            q.wq = None

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.layer_infos]


def _layer_name(param: str) -> str:
    """``layer1.0.conv1.weight`` -> ``layer1.0.conv1``; ``attn.in_proj_weight`` -> ``attn.in_proj``."""
    for suffix in (".weight", "_weight"):
        if param.endswith(suffix) and len(param) > len(suffix):
            return param[:-len(suffix)]
    return param


def _key(name: str) -> str:
    return name.replace(".", "__")


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _pair(v, default):
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v if len(v) == 2 else (v[0], v[0])


def _export(module: nn.Module, input_shape) -> fx.GraphModule:
    example = torch.zeros((2, *input_shape))
    try:
        ep = torch.export.export(module.eval(), (example,),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    except Exception:
        ep = torch.export.export(module.eval(), (example,))
    return ep.module()


def canonicalize(module: nn.Module, input_shape, exported=None, fold_bn: bool = True,
                 check: bool = True) -> QModel:
    """Export (if needed), fold BN and replace quantizable ops by QLayers. Raises ModelError if none,
    and (``check``) for layers quantization cannot handle yet (:func:`check_supported_layers`)."""
    from .models import quiet_torch

    if exported is not None:
        with quiet_torch():
            gm = copy.deepcopy(exported.module())
    elif isinstance(module, fx.GraphModule):
        with quiet_torch():
            gm = copy.deepcopy(module)
    else:
        gm = _export(module, input_shape)
    graph = gm.graph
    # drop shape guards: we run other batch sizes than the example
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    qlayers = nn.ModuleDict()
    gm.add_module("qlayers", qlayers)
    names: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_CONV_OPS | _LINEAR_OPS):
            continue
        args = list(node.args) + [None] * 9
        weight = _attr(gm, args[1])
        if weight is None or not isinstance(args[1], fx.Node):
            continue
        name = _layer_name(args[1].target)
        bias = _attr(gm, args[2]) if args[2] is not None else None
        if args[2] is not None and bias is None:
            continue  # a computed bias: leave the op alone
        if node.target in _CONV_OPS:
            if weight.dim() != 4:
                continue
            if node.target == aten.convolution.default:
                if args[6]:  # transposed
                    continue
                stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
            else:
                stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
                stride = node.kwargs.get("stride", stride)
                padding = node.kwargs.get("padding", padding)
                dilation = node.kwargs.get("dilation", dilation)
                groups = node.kwargs.get("groups", groups)
            if isinstance(padding, str):
                continue
            groups = int(groups or 1)
            out_ch = weight.shape[0]
            kind = "depthwise" if groups > 1 and groups == out_ch and weight.shape[1] == 1 else "conv"
            w = weight.detach().float()
            b = bias.detach().float() if bias is not None else None
            bn_users = [u for u in node.users if u.op == "call_function" and u.target in _BN_OPS]
            if fold_bn and len(node.users) == 1 and bn_users:
                bn = bn_users[0]
                training = bn.args[5] if bn.target == aten.batch_norm.default else False
                params = [_attr(gm, a) for a in bn.args[1:5]]
                if not training and all(p is not None for p in params[2:]):
                    gamma, beta, mean, var = params
                    eps = bn.args[7] if bn.target == aten.batch_norm.default else bn.args[6]
                    inv = torch.rsqrt(var.float() + eps)
                    g = gamma.float() if gamma is not None else torch.ones_like(inv)
                    bb = beta.float() if beta is not None else torch.zeros_like(inv)
                    w = w * (g * inv).view(-1, 1, 1, 1)
                    b = bb + ((b if b is not None else 0) - mean.float()) * g * inv
                    if bn.target == aten.batch_norm.default:
                        bn.replace_all_uses_with(node)
                    else:  # returns a tuple: redirect getitem(…, 0)
                        for u in list(bn.users):
                            if u.target is operator.getitem and u.args[1] == 0:
                                u.replace_all_uses_with(node)
                    if not bn.users:
                        graph.erase_node(bn)
            q = QLayer(name, kind, w, b, _pair(stride, (1, 1)), _pair(padding, (0, 0)),
                       _pair(dilation, (1, 1)), groups)
        else:
            q = QLayer(name, "linear", weight.detach().float(), bias.detach().float() if bias is not None else None)
        if name in names:
            raise ModelError(f"parameter {name}.weight is used by two layers; weight sharing is not supported")
        qlayers.add_module(_key(name), q)
        with graph.inserting_after(node):
            new = graph.call_module(f"qlayers.{_key(name)}", (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        names.append(name)
    graph.eliminate_dead_code()
    gm.recompile()
    if not names:
        raise ModelError("the model has no Conv2d or Linear layers to quantize")
    # drop parameters no longer referenced by the graph (the folded originals)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for pname, _ in list(gm.named_parameters()):
        if not pname.startswith("qlayers.") and pname not in used:
            _delattr(gm, pname)
    infos = _layer_infos(gm, names, input_shape)
    if check:
        check_supported_layers(infos)
    return QModel(gm, infos, input_shape)


def check_supported_layers(infos: list[LayerInfo]) -> None:
    """Refuse, in one line naming the first such layer, what quantization, analysis and export cannot
    handle: a layer the example input never reached (its shapes are unknown)."""
    unrun = [i for i in infos if not i.in_shape]
    if unrun:
        raise ModelError(f"layer {unrun[0].name}: not reached by the model's forward pass on an example input, "
                         f"so its shapes are unknown")


def _delattr(root: nn.Module, dotted: str) -> None:
    parts = dotted.split(".")
    obj = root
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if obj is None:
            return
    if hasattr(obj, parts[-1]):
        delattr(obj, parts[-1])


@torch.no_grad()
def _layer_infos(gm: fx.GraphModule, names: list[str], input_shape) -> list[LayerInfo]:
    shapes: dict[str, tuple] = {}
    hooks = []
    for n in names:
        mod = gm.qlayers[_key(n)]

        def hook(m, inp, out, n=n):
            if m.is_conv:
                shapes[n] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
            else:
                # a batch-1 run: whatever the layout (batch first, tokens first, or both merged on
                # one axis as nn.MultiheadAttention's out_proj), the rows are the sample's tokens
                k, o = int(inp[0].shape[-1]), int(out.shape[-1])
                rows = inp[0].numel() // max(1, k)
                shapes[n] = ((rows, k), (rows, o)) if inp[0].dim() > 2 or rows > 1 else ((k,), (o,))
        hooks.append(mod.register_forward_hook(hook))
    try:
        gm(torch.zeros((1, *input_shape)))
    except Exception as e:
        raise ModelError(f"model does not run on input shape {tuple(input_shape)}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
    order = sorted(names, key=lambda n: list(shapes).index(n) if n in shapes else 1 << 30)
    infos = []
    for i, n in enumerate(order):
        m: QLayer = gm.qlayers[_key(n)]
        ishape, oshape = shapes.get(n, ((), ()))
        w = m.weight
        if m.is_conv:
            kh, kw = w.shape[2], w.shape[3]
            spatial = oshape[1] * oshape[2] if len(oshape) == 3 else 1
            macs = int(w.numel() * spatial)
            infos.append(LayerInfo(i, n, m.kind, int(w.shape[1] * m.groups), int(w.shape[0]), (int(kh), int(kw)),
                                   m.stride, m.groups, tuple(w.shape), int(w.numel()), ishape, oshape, macs))
        else:
            rows = int(ishape[0]) if len(ishape) == 2 else 1
            infos.append(LayerInfo(i, n, "linear", int(w.shape[1]), int(w.shape[0]), (1, 1), (1, 1), 1,
                                   tuple(w.shape), int(w.numel()), ishape, oshape, int(w.numel()) * rows))
    return infos


def qmodel_from_loaded(loaded, check: bool = True) -> QModel:
    """Canonical QModel of a :class:`cwhawq.models.LoadedModel` (``check=False``: also models whose
    layers cannot be quantized yet, for float-only uses such as the fp32 export)."""
    return canonicalize(loaded.module, loaded.input_shape, exported=loaded.exported, check=check)
