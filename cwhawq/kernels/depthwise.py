"""Depthwise convolution (groups = channels, any channel multiplier): a direct kernel vectorized
over 16 channels, channels-last.

The prologue writes the input dequantized (integer layers: ``v * S``, exact in float) or as is
(fp32 layers), padded and channels-last, with every output row's input channel at the row's
position (``A[..., p] = x[..., p // multiplier]``), so each 16 rows read one contiguous vector per
tap. The kernel accumulates ``sum_taps w[tap, p] * A[pixel + tap, p]`` in float (FMA) with the
integer codes (integer layers) or the fp32 weights, then scale, bias, residual, ReLU and the
store at each row's output channel. The weights are tiny (``taps x channels``), so they are kept
as floats; the result equals onnxruntime's float computation of the QDQ graph.
Output is channels-last; an NCHW consumer gets a transpose (Relax ``permute_dims``).
"""
from __future__ import annotations

import numpy as np

from .core import Row, c64, declare_fused, fill_padding, ib, put_fused, tir_activate
from .packing import BLOCK_N
from .problem import LinearOp
from .prologue import PARALLEL_ELEMENTS, schedule_gpu_simple, schedule_prologue_cpu, te_act_fake


def padded_rows(op: LinearOp) -> int:
    return -(-op.n_out // BLOCK_N) * BLOCK_N


def tables(op: LinearOp) -> dict[str, np.ndarray]:
    """Row-order tables: weights float [taps, NP], epi [2, NP], oidx [NP], obase [NP / 16]."""
    npad = padded_rows(op)
    taps = op.k
    w = np.zeros((taps, npad), np.float32)
    sc = np.zeros(npad, np.float32)
    bi = np.zeros(npad, np.float32)
    oidx = np.full(npad, -1, np.int32)
    bias = op.bias_or_zero()
    pos = 0
    for g in op.groups:
        rows = g.codes.astype(np.float32) if g.quantized else g.float_w
        w[:, pos:pos + g.n] = rows.T
        sc[pos:pos + g.n] = g.scale
        bi[pos:pos + g.n] = bias[g.out_index]
        oidx[pos:pos + g.n] = g.out_index
        pos += g.n
    blocks = oidx.reshape(-1, BLOCK_N)
    contiguous = np.all(blocks[:, 1:] - blocks[:, :1] == np.arange(1, BLOCK_N), axis=1) & (blocks[:, 0] >= 0)
    obase = np.where(contiguous, blocks[:, 0], -1).astype(np.int32)
    return {"w": w, "epi": np.stack([sc, bi]).astype(np.float32), "oidx": oidx, "obase": obase}


def prologue_func(op: LinearOp, gpu: bool = False, expected_batch: int = 1):
    """x (``geom.in_layout``) -> ``A [n, Hp, Wp, NP]`` float (dequantized, padded, row-expanded)."""
    from tvm import te, tirx  # noqa: PLC0415

    geom = op.geom
    n = tirx.Var("n", "int64")
    mult = geom.cout // geom.cin
    npad = padded_rows(op)
    top, left = geom.pads[0], geom.pads[1]
    x = te.placeholder(geom.in_shape(n), "float32", name="x")
    args = [x]
    if op.act is not None:
        fs = te.placeholder((1, geom.cin), "float32", name="act_scale")
        it = te.placeholder((4, geom.cin), "int32", name="act_int")
        args += [fs, it]

    def val(b, h, w, p):
        c = tirx.min(p // mult, geom.cin - 1)
        hh = tirx.max(tirx.min(h - top, geom.in_h - 1), 0)
        ww = tirx.max(tirx.min(w - left, geom.in_w - 1), 0)
        v = x[b, c, hh, ww] if geom.in_layout == "NCHW" else x[b, hh, ww, c]
        return te_act_fake(v, c, fs, it) if op.act is not None else v

    def body(b, h, w, p):
        ok = tirx.all(h >= top, h < top + geom.in_h, w >= left, w < left + geom.in_w, p < geom.cout)
        return tirx.if_then_else(ok, val(b, h, w, p), tirx.const(0, "float32"))

    a = te.compute((n, geom.hp, geom.wp, npad), body, name="dw_pro")
    func = te.create_prim_func(args + [a], index_dtype_override="int64")
    if gpu:
        return schedule_gpu_simple(func)
    return schedule_prologue_cpu(func, parallel=expected_batch * geom.hp * geom.wp * npad >= PARALLEL_ELEMENTS)


def kernel_func(op: LinearOp, name: str, expected_batch: int = 1, fused=(), emit_y: bool = True):
    """The CPU kernel: A, W [taps, NP], epi, oidx, obase[, residual NHWC][, fused tables] -> Y NHWC
    [, fused outputs] (:class:`~cwhawq.kernels.core.FusedOut`)."""
    from tvm import tirx  # noqa: PLC0415

    IRBuilder, T = ib()
    geom = op.geom
    npad = padded_rows(op)
    nblk = npad // BLOCK_N
    taps = op.k
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
            n = tirx.Var("n", "int64")
            A = T.arg("A", T.buffer((n, c64(geom.hp), c64(geom.wp), c64(npad)), "float32"))
            W = T.arg("W", T.buffer((c64(taps), c64(npad)), "float32"))
            epi = T.arg("epi", T.buffer((c64(2), c64(npad)), "float32"))
            oidx = T.arg("oidx", T.buffer((c64(npad),), "int32"))
            obase = T.arg("obase", T.buffer((c64(nblk),), "int32"))
            oshape = (n, c64(geom.out_h), c64(geom.out_w), c64(op.n_out))
            res = T.arg("residual", T.buffer(oshape, "float32")) if op.residual else None
            ftabs, fouts = declare_fused(T, fused, n)
            Y = T.arg("Y", T.buffer(oshape, "float32")) if emit_y else None
            fbufs = fouts()
            fl = list(zip(fused, ftabs, fbufs))
            fill_padding(T, tirx, fused, fbufs, n)
            work = expected_batch * geom.out_h * geom.out_w * npad * taps
            loop = T.parallel if work >= 4 * PARALLEL_ELEMENTS else T.serial
            with loop(c64(0), n * c64(geom.out_h)) as bh:
                b = T.Bind(tirx.floordiv(bh, c64(geom.out_h)))
                oh = T.Bind(tirx.floormod(bh, c64(geom.out_h)))
                with T.serial(c64(0), c64(geom.out_w)) as ow:
                    with T.serial(c64(0), c64(nblk)) as cb:
                        acc = T.alloc_buffer((16,), "float32", scope="global")
                        T.buffer_store(acc, T.broadcast(T.float32(0), 16), [T.ramp(0, 1, 16)])
                        with T.serial(c64(0), c64(taps)) as tap:
                            ti = tirx.floordiv(tap, c64(geom.kw)) * c64(geom.dilation[0])
                            tj = tirx.floormod(tap, c64(geom.kw)) * c64(geom.dilation[1])
                            a = A.vload([b, oh * c64(geom.stride[0]) + ti, ow * c64(geom.stride[1]) + tj,
                                         cb * c64(16)], "float32x16")
                            w = W.vload([tap, cb * c64(16)], "float32x16")
                            T.buffer_store(acc, acc[T.ramp(0, 1, 16)] + a * w, [T.ramp(0, 1, 16)])
                        pos = T.Bind(cb * c64(16))
                        f = T.Bind(acc[T.ramp(0, 1, 16)] * epi[c64(0), T.ramp(pos, c64(1), 16)]
                                   + epi[c64(1), T.ramp(pos, c64(1), 16)])
                        ob = T.Bind(T.Cast("int64", obase[cb]))
                        with T.If(ob >= c64(0)):
                            with T.Then():
                                v = f
                                if res is not None:
                                    v = v + res.vload([b, oh, ow, ob], "float32x16")
                                v = tir_activate(T, tirx, op, v, 16)
                                v = T.Bind(v)
                                if Y is not None:
                                    T.buffer_store(Y, v, [b, oh, ow, T.ramp(ob, c64(1), 16)])
                                put_fused(T, tirx, fl, v, Row(None, b, h_out=oh, w_out=ow), ob, 16)
                            with T.Else():
                                fb = T.alloc_buffer((16,), "float32", scope="global")
                                T.buffer_store(fb, f, [T.ramp(0, 1, 16)])
                                with T.serial(c64(0), c64(16)) as i:
                                    o = T.Bind(T.Cast("int64", oidx[pos + i]))
                                    with T.If(o >= c64(0)):
                                        with T.Then():
                                            v = fb[i]
                                            if res is not None:
                                                v = v + res[b, oh, ow, o]
                                            v = tir_activate(T, tirx, op, v, 1)
                                            v = T.Bind(v)
                                            if Y is not None:
                                                T.buffer_store(Y, v, [b, oh, ow, o])
                                            put_fused(T, tirx, fl, v, Row(None, b, h_out=oh, w_out=ow), o, 1)
    return builder.get()


def kernel_func_gpu(op: LinearOp, name: str):
    """CUDA: one thread per output element (TE), same tables as the CPU kernel."""
    from tvm import te, tirx  # noqa: PLC0415

    geom = op.geom
    n = tirx.Var("n", "int64")
    npad = padded_rows(op)
    A = te.placeholder((n, geom.hp, geom.wp, npad), "float32", name="A")
    W = te.placeholder((op.k, npad), "float32", name="W")
    epi = te.placeholder((2, npad), "float32", name="epi")
    oidx = te.placeholder((npad,), "int32", name="oidx")
    obase = te.placeholder((npad // BLOCK_N,), "int32", name="obase")
    # channel o's row: invert oidx on the host side is not possible in TE; use the row table
    rowof = te.placeholder((op.n_out,), "int32", name="rowof")
    args = [A, W, epi, oidx, obase, rowof]
    oshape = (n, geom.out_h, geom.out_w, op.n_out)
    res = te.placeholder(oshape, "float32", name="residual") if op.residual else None
    if res is not None:
        args.append(res)
    ri = te.reduce_axis((0, op.k), name="ri")

    def compute(b, h, w, o):
        p = rowof[o]
        acc = te.sum(W[ri, p] * A[b, h * geom.stride[0] + (ri // geom.kw) * geom.dilation[0],
                                   w * geom.stride[1] + (ri % geom.kw) * geom.dilation[1], p], axis=ri)
        return acc

    accs = te.compute(oshape, compute, name="dw_acc")

    def epilogue(b, h, w, o):
        p = rowof[o]
        v = accs[b, h, w, o] * epi[0, p] + epi[1, p]
        if res is not None:
            v = v + res[b, h, w, o]
        if op.relu:
            v = tirx.max(v, tirx.const(0, "float32"))
        if op.clip_hi is not None:
            v = tirx.min(v, tirx.const(float(op.clip_hi), "float32"))
        return v

    y = te.compute(oshape, epilogue, name="dw_y")
    func = te.create_prim_func(args + [y], index_dtype_override="int64")
    return schedule_gpu_simple(func)


def rowof_table(op: LinearOp) -> np.ndarray:
    """Row (position in the padded row order) of every output channel."""
    t = tables(op)
    rowof = np.zeros(op.n_out, np.int32)
    valid = t["oidx"] >= 0
    rowof[t["oidx"][valid]] = np.nonzero(valid)[0].astype(np.int32)
    return rowof
