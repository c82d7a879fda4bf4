"""Relax emission: a layer (:class:`~cwhawq.kernels.problem.LinearOp`) as calls of its prologue and
core PrimFuncs on a ``relax.BlockBuilder`` for one instruction set (:mod:`cwhawq.kernels.isa`).

:func:`emit_layer` is what the backend uses; :func:`linear_module` / :func:`conv_module` build a
one-layer IRModule (tests, benchmarks).
"""
from __future__ import annotations

import numpy as np

from . import core, depthwise, prologue
from .core import ActFormat
from . import isa as isa_mod
from .problem import LinearOp

OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque: our kernels are never fused with other ops


def resolve(isa) -> isa_mod.Isa:
    return isa if isinstance(isa, isa_mod.Isa) else isa_mod.get(str(isa))


def add_func(bb, func, name: str):
    """Add a PrimFunc to the BlockBuilder under its own global symbol, marked opaque so Relax's
    operator fusion leaves it alone; returns the GlobalVar."""
    func = func.with_attr("global_symbol", name).with_attr("op_pattern", OPAQUE_PATTERN)
    return bb.add_func(func, name)


def sym(name: str) -> str:
    out = "".join(ch if ch.isalnum() else "_" for ch in name)
    return ("k_" + out) if not out[:1].isalpha() else out


def _const(arr: np.ndarray):
    from tvm import relax  # noqa: PLC0415

    return relax.const(np.ascontiguousarray(arr))


def _act_args(op: LinearOp) -> list:
    if op.act is None:
        return []
    fs, it = op.act.tables()
    return [_const(fs), _const(it)]


def describe(op: LinearOp, isa) -> dict:
    """What runs for this layer on ``isa``: strategy names, activation format, tiles."""
    isa = resolve(isa)
    if op.geom is not None and op.geom.depthwise:
        return {"kernel": "depthwise", "act": "f32"}
    ss = isa.strategies(op)
    seg = ss[0].fmt.segments
    notes = sorted({s.note for s in ss if s.note})
    return {"kernel": sorted({type(s).__name__ for s in ss}), "act": ss[0].fmt.kind,
            "digits": ss[0].fmt.digits, "exponent_classes": len(seg.shifts) if seg is not None else None,
            "notes": notes}


def _outputs(bb, call, n_out: int):
    from tvm import relax  # noqa: PLC0415

    if n_out == 1:
        return [call]
    return [bb.emit(relax.TupleGetItem(call, i)) for i in range(n_out)]


def _fused_types(fused, nb, rows):
    from tvm import relax  # noqa: PLC0415

    return [relax.TensorType(fo.shape(nb, rows), fo.fmt.dtype) for fo in fused]


def _fused_args(fused) -> list:
    args = []
    for fo in fused:
        tabs = fo.tables()
        if tabs is not None:
            args += [_const(tabs[0]), _const(tabs[1])]
            if fo.fmt.segments is not None:
                args.append(_const(fo.seg_table()))
    return args


def _seg_args(fmt) -> list:
    return [] if fmt.segments is None else [_const(fmt.segments.table())]


def _core(bb, op, isa, strategies, a_args, out_shape, expected_rows, name, residual, fused=(), emit_y=True,
          nb=None, rows=None):
    from tvm import relax  # noqa: PLC0415

    if isa.name == "cuda":
        if fused or not emit_y:
            raise ValueError("fused outputs are CPU-only")
        from .isa import cuda  # noqa: PLC0415

        func = cuda.core_func(op, strategies, name)
    else:
        func = core.core_func(op, strategies, expected_rows, name, list(fused), emit_y)
    gv = add_func(bb, func, name)
    args = list(a_args) + [_const(a) for a in core.core_args(op, strategies)]
    if op.residual:
        if residual is None:
            raise ValueError("fused residual requested but no residual tensor given")
        args.append(residual)
    args += _fused_args(fused)
    types = ([relax.TensorType(out_shape, "float32")] if emit_y else []) + _fused_types(fused, nb, rows)
    outs = _outputs(bb, bb.emit(relax.call_tir(gv, args, types if len(types) > 1 else types[0])), len(types))
    return (outs[0] if emit_y else None), outs[1 if emit_y else 0:]


def emit_linear(bb, x, op: LinearOp, isa, expected_rows: int = 1, residual=None, name: str | None = None,
                fused=(), emit_y: bool = True, given_a=None):
    """A dense layer on the Relax var ``x`` (float32 [M, k]); returns the output var, or with
    ``fused`` outputs (:class:`~cwhawq.kernels.core.FusedOut`) ``(y or None, [fused vars])``.
    ``given_a``: the activation operand a producer already wrote (no prologue)."""
    from tvm import relax, tirx  # noqa: PLC0415

    isa = resolve(isa)
    name = name or sym(op.name)
    rows = list(x.ty.shape)[0] if given_a is None else list(given_a.ty.shape)[1]
    static = isinstance(rows, (int, tirx.IntImm))
    exp = int(rows) if static else expected_rows
    ss = isa.strategies(op)
    fmt = ss[0].fmt
    if given_a is not None:
        a_args = [given_a]
    elif op.mode == "fp32":
        a_args = [x]
    else:
        f = prologue.dense_prologue_func(op, fmt, gpu=isa.name == "cuda", expected_rows=exp)
        gv = add_func(bb, f, f"{name}_pro")
        a = bb.emit(relax.call_tir(gv, [x] + _act_args(op) + _seg_args(fmt),
                                   relax.TensorType([fmt.digits, rows, fmt.channels(op.k_padded)], fmt.dtype)))
        a_args = [a]
    y, fv = _core(bb, op, isa, ss, a_args, [rows, op.n_out], exp, f"{name}_core", residual, fused, emit_y,
                  rows=rows)
    return (y, fv) if (fused or not emit_y) else y


def emit_conv2d(bb, x, op: LinearOp, isa, expected_batch: int = 1, residual=None, name: str | None = None,
                fused=(), emit_y: bool = True, given_a=None):
    """An ordinary (groups = 1) convolution on ``x`` (float32, ``op.geom.in_layout``); returns the
    output var (``op.geom.out_layout``), or ``(y or None, [fused vars])`` (see :func:`emit_linear`)."""
    from tvm import relax  # noqa: PLC0415

    isa = resolve(isa)
    geom = op.geom
    if geom is None or geom.groups != 1:
        raise ValueError("emit_conv2d handles groups=1; use emit_depthwise for depthwise convolutions")
    if op.k != geom.taps * geom.cp:
        raise ValueError(f"op.k={op.k} does not match taps*cp={geom.taps * geom.cp}")
    name = name or sym(op.name)
    nb = list(x.ty.shape)[0] if given_a is None else list(given_a.ty.shape)[1]
    ss = isa.strategies(op)
    fmt = ss[0].fmt
    if given_a is not None:
        a = given_a
    else:
        f = prologue.conv_prologue_func(op, fmt, gpu=isa.name == "cuda", expected_batch=expected_batch)
        gv = add_func(bb, f, f"{name}_pro")
        a = bb.emit(relax.call_tir(gv, [x] + _act_args(op) + _seg_args(fmt), relax.TensorType(
            [fmt.digits, nb, geom.hp, geom.wp, fmt.channels(geom.cp)], fmt.dtype)))
    rows = expected_batch * geom.out_h * geom.out_w
    y, fv = _core(bb, op, isa, ss, [a], geom.out_shape(nb), rows, f"{name}_core", residual, fused, emit_y, nb=nb)
    return (y, fv) if (fused or not emit_y) else y


def emit_depthwise(bb, x, op: LinearOp, isa, expected_batch: int = 1, residual=None, name: str | None = None,
                   fused=(), emit_y: bool = True, given_a=None):
    """A depthwise convolution (see :mod:`cwhawq.kernels.depthwise`); returns the output var in
    ``op.geom.out_layout``, or ``(y or None, [fused vars])`` (see :func:`emit_linear`)."""
    from tvm import relax  # noqa: PLC0415

    isa = resolve(isa)
    geom = op.geom
    name = name or sym(op.name)
    nb = list(x.ty.shape)[0] if given_a is None else list(given_a.ty.shape)[0]
    gpu = isa.name == "cuda"
    npad = depthwise.padded_rows(op)
    if given_a is not None:
        a = given_a
    else:
        f = depthwise.prologue_func(op, gpu=gpu, expected_batch=expected_batch)
        gv = add_func(bb, f, f"{name}_pro")
        a = bb.emit(relax.call_tir(gv, [x] + _act_args(op), relax.TensorType([nb, geom.hp, geom.wp, npad], "float32")))
    tabs = depthwise.tables(op)
    args = [a, _const(tabs["w"]), _const(tabs["epi"]), _const(tabs["oidx"]), _const(tabs["obase"])]
    nhwc_out = geom.out_layout == "NHWC" or not emit_y
    if gpu:
        if fused or not emit_y:
            raise ValueError("fused outputs are CPU-only")
        args.append(_const(depthwise.rowof_table(op)))
        kf = depthwise.kernel_func_gpu(op, f"{name}_dw")
    else:
        kf = depthwise.kernel_func(op, f"{name}_dw", expected_batch, list(fused), emit_y)
    if op.residual:
        if residual is None:
            raise ValueError("fused residual requested but no residual tensor given")
        if (geom.res_layout or geom.out_layout) == "NCHW":
            residual = bb.emit(relax.op.permute_dims(residual, [0, 2, 3, 1]))
        args.append(residual)
    args += _fused_args(fused)
    gk = add_func(bb, kf, f"{name}_dw")
    types = ([relax.TensorType([nb, geom.out_h, geom.out_w, op.n_out], "float32")] if emit_y else []) + \
        _fused_types(fused, nb, None)
    outs = _outputs(bb, bb.emit(relax.call_tir(gk, args, types if len(types) > 1 else types[0])), len(types))
    y = outs[0] if emit_y else None
    if y is not None and not nhwc_out:
        y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
    fv = outs[1 if emit_y else 0:]
    return (y, fv) if (fused or not emit_y) else y


def emit_layer(bb, x, op: LinearOp, isa, expected_rows: int = 1, residual=None, name: str | None = None,
               fused=(), emit_y: bool = True, given_a=None):
    """Dense, conv or depthwise, by the op's geometry. ``expected_rows``: rows (dense) or images (conv)."""
    kw = {"fused": fused, "emit_y": emit_y, "given_a": given_a}
    if op.geom is None:
        return emit_linear(bb, x, op, isa, expected_rows, residual, name, **kw)
    if op.geom.depthwise:
        return emit_depthwise(bb, x, op, isa, expected_rows, residual, name, **kw)
    return emit_conv2d(bb, x, op, isa, expected_rows, residual, name, **kw)


def fused_input(consumer: LinearOp, isa) -> core.FusedOut:
    """How a producer writes ``consumer``'s activation operand (``consumer.geom`` set, its input
    channels-last)."""
    isa = resolve(isa)
    geom = consumer.geom
    if geom is None:
        fmt = ActFormat("f32") if consumer.mode == "fp32" else isa.strategies(consumer)[0].fmt
        if consumer.mode == "fp32":
            raise ValueError("an fp32 dense layer reads its float input directly")
        return core.FusedOut(fmt, consumer.act, "dense", consumer.k, fmt.channels(consumer.k_padded))
    if geom.depthwise:
        if geom.cout != geom.cin:
            raise ValueError("fused input of a depthwise layer with a channel multiplier")
        return core.FusedOut(ActFormat("f32"), consumer.act, "depthwise", geom.cin, depthwise.padded_rows(consumer),
                             geom.hp, geom.wp, geom.pads[0], geom.pads[1], geom.in_h, geom.in_w)
    fmt = isa.strategies(consumer)[0].fmt
    return core.FusedOut(fmt, consumer.act, "conv", geom.cin, fmt.channels(geom.cp), geom.hp, geom.wp, geom.pads[0],
                         geom.pads[1], geom.in_h, geom.in_w)


def linear_module(op: LinearOp, isa, batch: int | str = "n", residual: bool = False):
    """A Relax IRModule ``main(x[, residual]) -> y`` running one dense layer (tests, benchmarks)."""
    from tvm import relax, tirx  # noqa: PLC0415

    rows = tirx.Var(batch, "int64") if isinstance(batch, str) else batch
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([rows, op.k], "float32"))
    params = [x]
    res = None
    if residual:
        res = relax.Var("residual", relax.TensorType([rows, op.n_out], "float32"))
        params.append(res)
    with bb.function("main", params):
        with bb.dataflow():
            y = emit_linear(bb, x, op, isa, expected_rows=rows if isinstance(rows, int) else 1, residual=res)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def conv_module(op: LinearOp, isa, batch: int | str = "n", residual: bool = False):
    """A Relax IRModule ``main(x[, residual]) -> y`` running one convolution (tests, benchmarks);
    tensors in ``op.geom.in_layout`` / ``op.geom.out_layout``."""
    from tvm import relax, tirx  # noqa: PLC0415

    geom = op.geom
    nb = tirx.Var(batch, "int64") if isinstance(batch, str) else batch
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(geom.in_shape(nb), "float32"))
    params = [x]
    res = None
    if residual:
        res = relax.Var("residual", relax.TensorType(geom.res_shape(nb), "float32"))
        params.append(res)
    exp = nb if isinstance(nb, int) else 1
    with bb.function("main", params):
        with bb.dataflow():
            y = emit_layer(bb, x, op, isa, exp, res)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()
