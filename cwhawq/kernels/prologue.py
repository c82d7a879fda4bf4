"""Prologues (TE): a layer's float input -> the activation operand of its core, in the
:class:`~cwhawq.kernels.core.ActFormat` the instruction set asks for.

The quantization is exactly ONNX QuantizeLinear after the exporter's clipping Max/Min:
``q = clip(nearbyint(x / s_c) + zp_c, qmin_c, qmax_c)``, ``v = (q - zp_c) << k_c``; padded
positions (convolution padding, channel and k padding) hold ``v = 0``, as ONNX pads the
dequantized tensor with 0.0. Formats: ``i16`` stores ``v``; ``u8`` / ``s8`` store base-256
digits of ``v - offset``; ``f32`` the dequantized value (float path) or the input itself (fp32
layers: only the layout and padding change).

dense: ``x [m, k] -> A [D, m, Kp]``; conv: ``x (NCHW or NHWC) -> A [D, n, Hp, Wp, Cp]``
(channels-last with the spatial padding applied).
"""
from __future__ import annotations

from .core import ActFormat
from .problem import LinearOp


def te_act_value(x, c, fscale, itab):
    """TE expression of the activation integer v = (clip(rint(x / s) + zp, lo, hi) - zp) << k."""
    from tvm import te, tirx  # noqa: PLC0415

    q = tirx.nearbyint(x / fscale[0, c]) + itab[0, c].astype("float32")
    q = te.max(te.min(q, itab[2, c].astype("float32")), itab[1, c].astype("float32"))
    return (q.astype("int32") - itab[0, c]) << itab[3, c]


def te_act_code(x, c, fscale, itab):
    """TE expression of the code relative to the zero point, ``q - zp`` (segmented operands)."""
    from tvm import te, tirx  # noqa: PLC0415

    q = tirx.nearbyint(x / fscale[0, c]) + itab[0, c].astype("float32")
    q = te.max(te.min(q, itab[2, c].astype("float32")), itab[1, c].astype("float32"))
    return q.astype("int32") - itab[0, c]


def te_act_fake(x, c, fscale, itab):
    """Dequantized value of x (float path)."""
    from tvm import te, tirx  # noqa: PLC0415

    q = tirx.nearbyint(x / fscale[0, c]) + itab[0, c].astype("float32")
    q = te.max(te.min(q, itab[2, c].astype("float32")), itab[1, c].astype("float32"))
    return (q - itab[0, c].astype("float32")) * fscale[0, c]


def te_digit(r, d: int, fmt: ActFormat):
    """Digit ``d`` of the offset value ``r = v - offset`` (int32) in ``fmt``."""
    if fmt.kind == "i16":
        return r.astype("int16")
    if fmt.kind == "u8":
        if fmt.digits == 1:
            return r.astype("uint8")
        return (r & 255).astype("uint8") if d == 0 else (r >> 8).astype("uint8")
    if fmt.digits == 1:
        return r.astype("int8")
    lo = ((r + 128) & 255) - 128
    return lo.astype("int8") if d == 0 else ((r - lo) >> 8).astype("int8")


def _digits(shape, r_of, fmt: ActFormat, name: str):
    """A ``[D, *shape]`` from the offset integer function ``r_of(*idx)``."""
    from tvm import te, tirx  # noqa: PLC0415

    if fmt.digits == 1:
        return te.compute((1,) + tuple(shape), lambda d, *idx: te_digit(r_of(*idx), 0, fmt), name=name)
    return te.compute((fmt.digits,) + tuple(shape), lambda d, *idx: tirx.if_then_else(
        d == 0, te_digit(r_of(*idx), 0, fmt), te_digit(r_of(*idx), 1, fmt)), name=name)


def schedule_prologue_cpu(func, parallel: bool, vector: int = 16):
    """CPU schedule: every block gets its outer loops fused (parallel when ``parallel``) and its
    innermost loop vectorized."""
    import tvm  # noqa: PLC0415
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(b)
        if not loops:
            continue
        if len(loops) > 1:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            inner = loops[-1]
        else:
            outer, inner = None, loops[0]
        ext = sch.get(inner).extent
        if isinstance(ext, tvm.tirx.IntImm):
            lanes = next((v for v in (vector, 8, 4) if ext.value % v == 0), None)
            if lanes is not None:
                _, vi = sch.split(inner, factors=[None, lanes])
                sch.vectorize(vi)
        if parallel and outer is not None:
            sch.parallel(outer)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_gpu_simple(func, threads: int = 128):
    """CUDA schedule for TE PrimFuncs (prologues, depthwise): every block its own kernel with the
    spatial loops fused over blocks x threads and its reduction (if any) serial in the thread."""
    import tvm  # noqa: PLC0415
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        blk = sch.get(b)
        loops = sch.get_loops(b)
        n_spatial = sum(1 for iv in blk.iter_vars if iv.iter_type == 0)
        spatial = loops[:n_spatial]
        if not spatial:
            continue
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, factors=[None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


PARALLEL_ELEMENTS = 32768  # below this a prologue runs on one thread (a fork/join costs more)


def _placeholders(op: LinearOp, channels: int):
    from tvm import te  # noqa: PLC0415

    if op.act is None:
        return None, None, []
    fs = te.placeholder((1, channels), "float32", name="act_scale")
    it = te.placeholder((4, channels), "int32", name="act_int")
    return fs, it, [fs, it]


def dense_prologue_func(op: LinearOp, fmt: ActFormat, gpu: bool = False, expected_rows: int = 1):
    """``x [m, k] -> A [D, m, Kp]`` (see the module docstring)."""
    from tvm import te, tirx  # noqa: PLC0415

    m = tirx.Var("m", "int64")
    x = te.placeholder((m, op.k), "float32", name="x")
    kp, k = op.k_padded, op.k
    fs, it, extra = _placeholders(op, op.k)
    if fmt.kind == "f32":
        if op.act is not None:
            val = lambda i, kk: te_act_fake(x[i, kk], kk, fs, it)  # noqa: E731
        else:
            val = lambda i, kk: x[i, kk]  # noqa: E731
        a = te.compute((1, m, kp), lambda d, i, kk: tirx.if_then_else(
            kk < k, val(i, tirx.min(kk, k - 1)), tirx.const(0, "float32")), name="pro_a")
    elif fmt.segments is not None:
        seg = fmt.segments
        st = te.placeholder((2, seg.width), "int32", name="seg")
        extra = extra + [st]

        def r_of(i, p):
            c = st[0, p]
            cc = tirx.max(c, 0)
            return tirx.if_then_else(c >= 0, te_act_code(x[i, cc], cc, fs, it), tirx.const(0, "int32")) - st[1, p]
        a = _digits((m, seg.width), r_of, fmt, "pro_a")
    else:
        off = fmt.offset

        def r_of(i, kk):
            return tirx.if_then_else(kk < k, te_act_value(x[i, tirx.min(kk, k - 1)], tirx.min(kk, k - 1), fs, it),
                                     tirx.const(0, "int32")) - off
        a = _digits((m, kp), r_of, fmt, "pro_a")
    func = te.create_prim_func([x] + extra + [a], index_dtype_override="int64")
    if gpu:
        return schedule_gpu_simple(func)
    return schedule_prologue_cpu(func, parallel=expected_rows * kp >= PARALLEL_ELEMENTS)


def conv_prologue_func(op: LinearOp, fmt: ActFormat, gpu: bool = False, expected_batch: int = 1):
    """x (``geom.in_layout``) -> ``A [D, n, Hp, Wp, Cp]`` (see the module docstring)."""
    from tvm import te, tirx  # noqa: PLC0415

    geom = op.geom
    n = tirx.Var("n", "int64")
    c_in, cp = geom.cin, geom.cp
    top, left = geom.pads[0], geom.pads[1]
    x = te.placeholder(geom.in_shape(n), "float32", name="x")
    fs, it, extra = _placeholders(op, c_in)

    def inside(h, w, c):
        return tirx.all(h >= top, h < top + geom.in_h, w >= left, w < left + geom.in_w, c < c_in)

    def xin(b, h, w, c):
        cc = tirx.min(c, c_in - 1)
        hh = tirx.max(tirx.min(h - top, geom.in_h - 1), 0)
        ww = tirx.max(tirx.min(w - left, geom.in_w - 1), 0)
        return x[b, cc, hh, ww] if geom.in_layout == "NCHW" else x[b, hh, ww, cc]

    shape = (n, geom.hp, geom.wp, cp)
    if fmt.kind == "f32":
        if op.act is not None:
            val = lambda b, h, w, c: te_act_fake(xin(b, h, w, c), tirx.min(c, c_in - 1), fs, it)  # noqa: E731
        else:
            val = xin
        a = te.compute((1,) + shape, lambda d, b, h, w, c: tirx.if_then_else(
            inside(h, w, c), val(b, h, w, c), tirx.const(0, "float32")), name="pro_a")
    elif fmt.segments is not None:
        seg = fmt.segments
        st = te.placeholder((2, seg.width), "int32", name="seg")
        extra = extra + [st]
        shape = (n, geom.hp, geom.wp, seg.width)

        def r_of(b, h, w, p):
            c = st[0, p]
            cc = tirx.max(c, 0)
            v = te_act_code(xin(b, h, w, cc), cc, fs, it)
            return tirx.if_then_else(tirx.all(inside(h, w, cc), c >= 0), v, tirx.const(0, "int32")) - st[1, p]
        a = _digits(shape, r_of, fmt, "pro_a")
    else:
        off = fmt.offset

        def r_of(b, h, w, c):
            v = te_act_value(xin(b, h, w, c), tirx.min(c, c_in - 1), fs, it)
            return tirx.if_then_else(inside(h, w, c), v, tirx.const(0, "int32")) - off
        a = _digits(shape, r_of, fmt, "pro_a")
    func = te.create_prim_func([x] + extra + [a], index_dtype_override="int64")
    if gpu:
        return schedule_gpu_simple(func)
    work = expected_batch * geom.hp * geom.wp * cp
    return schedule_prologue_cpu(func, parallel=work >= PARALLEL_ELEMENTS)
