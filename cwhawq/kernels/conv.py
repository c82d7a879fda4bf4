"""Packed low-bit conv2d kernels (TIR): implicit GEMM for ordinary convolutions, a direct kernel
for depthwise ones.

Ordinary convolution (groups = 1) runs on the GEMM core of :mod:`cwhawq.kernels.gemm` without an
im2col buffer: the prologue quantizes the NCHW input once per element into channels-last int8
digits ``A [D, n, Hp, Wp, Cp]`` with the spatial padding already applied (the padded value is the
integer of 0.0, as ONNX pads the dequantized tensor) and the channels padded to ``Cp`` (a multiple
of 16, so one packed record never straddles two kernel taps), plus the per-pixel channel sums
``S [n, Hp, Wp]`` from which the core forms each output pixel's row sum. The weights are packed
with k ordered (tap, channel): ``k = (i * kw + j) * Cp + c``. The core walks taps x records, reads
each pixel's 4-channel activation word at its tap offset, and stores NCHW output at the row's
original channel (the permutation is free).

Depthwise convolution (groups = channels, any channel multiplier) is a direct TE kernel: the
input quantized to padded int32 (or float), the packed 3x3 (or any) weights unpacked once per
call into a small int32 table, int32 accumulation over the taps, one rescale per channel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import packing
from .gemm import (ISA_CUDA, LinearOp, WeightGroup, _sym, _te_act_fake, _te_act_value, _te_digits, add_func,
                   emit_core, schedule_gpu_simple, schedule_prologue_cpu)


@dataclass(frozen=True)
class ConvGeom:
    """Geometry of a 2-D convolution (ONNX attribute conventions, NCHW)."""

    cin: int
    cout: int
    in_h: int
    in_w: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    cp: int = 0  # channels per tap as stored (set by :meth:`with_channel_pad`)
    in_layout: str = "NCHW"   # layout of the input tensor (NHWC between our own layers)
    out_layout: str = "NCHW"  # layout of the output
    res_layout: str = ""      # layout of the fused residual (default: the output's)

    @classmethod
    def from_onnx(cls, cin, cout, in_h, in_w, kh, kw, attrs: dict) -> "ConvGeom":
        """From ONNX Conv attributes (``strides``, ``pads``, ``dilations``, ``group``, ``auto_pad``)."""
        stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
        dil = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
        group = int(attrs.get("group", 1))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("NOTSET", ""):
            p = tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0)))
            pads = (p[0], p[1], p[2], p[3])
        elif auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            tot = []
            for size, k, s, d in ((in_h, kh, stride[0], dil[0]), (in_w, kw, stride[1], dil[1])):
                out = -(-size // s)
                tot.append(max(0, (out - 1) * s + (k - 1) * d + 1 - size))
            small = [t // 2 for t in tot]
            big = [t - t // 2 for t in tot]
            if auto_pad == "SAME_UPPER":
                pads = (small[0], small[1], big[0], big[1])
            else:
                pads = (big[0], big[1], small[0], small[1])
        else:
            raise ValueError(f"unsupported auto_pad {auto_pad!r}")
        if len(stride) != 2 or len(dil) != 2:
            raise ValueError("only 2-D convolutions are supported")
        return cls(int(cin), int(cout), int(in_h), int(in_w), int(kh), int(kw), stride, pads, dil, group)

    def with_channel_pad(self, cp: int) -> "ConvGeom":
        return replace(self, cp=int(cp))

    def with_layouts(self, in_layout: str = "NCHW", out_layout: str = "NCHW", res_layout: str | None = None) -> "ConvGeom":
        res_layout = res_layout or out_layout
        for lay in (in_layout, out_layout, res_layout):
            if lay not in ("NCHW", "NHWC"):
                raise ValueError(f"unsupported layout {lay!r}")
        return replace(self, in_layout=in_layout, out_layout=out_layout, res_layout=res_layout)

    def res_shape(self, n) -> list:
        lay = self.res_layout or self.out_layout
        return [n, self.cout, self.out_h, self.out_w] if lay == "NCHW" else [n, self.out_h, self.out_w, self.cout]

    def in_shape(self, n) -> list:
        return [n, self.cin, self.in_h, self.in_w] if self.in_layout == "NCHW" else [n, self.in_h, self.in_w, self.cin]

    def out_shape(self, n) -> list:
        return ([n, self.cout, self.out_h, self.out_w] if self.out_layout == "NCHW"
                else [n, self.out_h, self.out_w, self.cout])

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin and self.cout % self.cin == 0

    @property
    def hp(self) -> int:
        return self.in_h + self.pads[0] + self.pads[2]

    @property
    def wp(self) -> int:
        return self.in_w + self.pads[1] + self.pads[3]

    @property
    def out_h(self) -> int:
        return (self.hp - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.wp - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def taps(self) -> int:
        return self.kh * self.kw


def channel_pad(cin: int, storage_bits: list[int] | None) -> int:
    """Channels per tap as stored: whole packed records (4 codes x codes per byte of the widest
    packing among the layer's groups) so no record straddles two taps; fp32 (None): ``cin``."""
    if not storage_bits:
        return cin
    unit = 4 * max(packing.pack_factor(b) for b in storage_bits)
    return -(-cin // unit) * unit


def conv_weight_matrix(codes_or_w: np.ndarray, cp: int) -> np.ndarray:
    """ONNX conv weights ``[n, C, kh, kw]`` as the implicit-GEMM matrix ``[n, kh * kw * cp]``
    (k ordered tap-major, channels zero-padded to ``cp``)."""
    w = np.asarray(codes_or_w)
    n, c, kh, kw = w.shape
    t = np.zeros((n, kh, kw, cp), dtype=w.dtype)
    t[..., :c] = w.transpose(0, 2, 3, 1)
    return t.reshape(n, kh * kw * cp)


def reference_conv(op: LinearOp, geom: ConvGeom, x: np.ndarray, weight_rows: np.ndarray,
                   residual: np.ndarray | None = None) -> np.ndarray:
    """What onnxruntime computes for ``Conv -> Gather(out_index)`` (float64 accumulation).

    ``weight_rows`` is the float weight ``[n, C/groups, kh, kw]`` in row order (the groups of
    ``op`` concatenated, as the ONNX Conv sees them); row ``p`` goes to channel ``out_index[p]``.
    """
    xq = x if op.act is None else op.act.fake_quant(x, axis=1)
    xp = np.pad(xq.astype(np.float64), ((0, 0), (0, 0), (geom.pads[0], geom.pads[2]), (geom.pads[1], geom.pads[3])))
    nb = x.shape[0]
    cg = geom.cin // geom.groups
    og = geom.cout // geom.groups
    rows = np.zeros((nb, geom.cout, geom.out_h, geom.out_w), np.float64)
    for i in range(geom.kh):
        for j in range(geom.kw):
            hs = i * geom.dilation[0]
            ws = j * geom.dilation[1]
            patch = xp[:, :, hs: hs + geom.stride[0] * (geom.out_h - 1) + 1: geom.stride[0],
                       ws: ws + geom.stride[1] * (geom.out_w - 1) + 1: geom.stride[1]]
            for g in range(geom.groups):
                wg = weight_rows[g * og:(g + 1) * og, :, i, j].astype(np.float64)  # [og, cg]
                rows[:, g * og:(g + 1) * og] += np.einsum("oc,nchw->nohw", wg, patch[:, g * cg:(g + 1) * cg])
    y = np.empty_like(rows)
    y[:, np.concatenate([g.out_index for g in op.groups])] = rows
    if op.bias is not None:
        y += op.bias.reshape(1, -1, 1, 1)
    if residual is not None:
        y += residual
    if op.relu:
        y = np.maximum(y, 0)
    return y.astype(np.float32)


# ===================================================================================== implicit GEMM
def conv_prologue_func(op: LinearOp, geom: ConvGeom, isa: str, expected_batch: int = 1):
    """TE prologue: x float32 (NCHW or NHWC) -> channels-last padded A; in int mode also the row
    sums ``R [n, OH, OW]`` (each output pixel's receptive field summed over taps and channels)."""
    import tvm  # noqa: PLC0415
    from tvm import te, tirx  # noqa: PLC0415

    mode = op.mode
    n = tirx.Var("n", "int64")
    c_in, cp = geom.cin, geom.cp
    top, left = geom.pads[0], geom.pads[1]
    x = te.placeholder(geom.in_shape(n), "float32", name="x")
    args = [x]
    if op.act is not None:
        fs = te.placeholder((1, c_in), "float32", name="act_scale")
        it = te.placeholder((4, c_in), "int32", name="act_int")
        args += [fs, it]

    def inside(h, w, c):
        return tirx.all(h >= top, h < top + geom.in_h, w >= left, w < left + geom.in_w, c < c_in)

    def xin(b, h, w, c):
        cc = tirx.min(c, c_in - 1)
        hh = tirx.max(tirx.min(h - top, geom.in_h - 1), 0)
        ww = tirx.max(tirx.min(w - left, geom.in_w - 1), 0)
        return x[b, cc, hh, ww] if geom.in_layout == "NCHW" else x[b, hh, ww, cc]

    shape = (n, geom.hp, geom.wp, cp)
    if mode == "int":
        ndig, off = op.digits
        cc = lambda c: tirx.min(c, c_in - 1)  # noqa: E731
        r = te.compute(shape, lambda b, h, w, c: tirx.if_then_else(
            inside(h, w, c), _te_act_value(xin(b, h, w, c), cc(c), fs, it) - off,
            tirx.if_then_else(c < c_in, tirx.const(-off, "int32"), tirx.const(0, "int32"))), name="pro_r")
        if ndig == 1:
            a = te.compute((1,) + shape, lambda d, b, h, w, c: r[b, h, w, c].astype("int8"), name="pro_a")
        else:
            a = te.compute((2,) + shape, lambda d, b, h, w, c: tirx.if_then_else(
                d == 0, _te_digits(r[b, h, w, c], 0, 2), _te_digits(r[b, h, w, c], 1, 2)), name="pro_a")
        rc = te.reduce_axis((0, cp), name="rc")
        s = te.compute((n, geom.hp, geom.wp), lambda b, h, w: te.sum(r[b, h, w, rc], axis=rc), name="pro_s")
        ri = te.reduce_axis((0, geom.kh), name="ri")
        rj = te.reduce_axis((0, geom.kw), name="rj")
        sh, sw = geom.stride
        dh, dw = geom.dilation
        rs = te.compute((n, geom.out_h, geom.out_w), lambda b, oh, ow: te.sum(
            s[b, oh * sh + ri * dh, ow * sw + rj * dw], axis=[ri, rj]), name="pro_rowsum")
        outs = [a, rs]
    else:
        if op.act is not None:
            val = lambda b, h, w, c: _te_act_fake(xin(b, h, w, c), tirx.min(c, c_in - 1), fs, it)  # noqa: E731
        else:
            val = xin
        a = te.compute(shape, lambda b, h, w, c: tirx.if_then_else(
            inside(h, w, c), val(b, h, w, c), tvm.tirx.const(0, "float32")), name="pro_a")
        outs = [a]
    func = te.create_prim_func(args + outs, index_dtype_override="int64")
    if isa == ISA_CUDA:
        return schedule_gpu_simple(func)
    work = expected_batch * geom.hp * geom.wp * cp
    return schedule_prologue_cpu(func, parallel_rows=work >= 65536)


def emit_conv2d(bb, x, op: LinearOp, geom: ConvGeom, isa: str, expected_batch: int = 1, residual=None,
                name: str | None = None):
    """Emit an ordinary (groups = 1) convolution on ``x`` (float32, ``geom.in_layout``); returns the
    output var (``geom.out_layout``).

    ``op.k`` must be ``kh * kw * geom.cp`` with weights laid out by :func:`conv_weight_matrix`.
    """
    from tvm import relax  # noqa: PLC0415

    if geom.groups != 1:
        raise ValueError("emit_conv2d handles groups=1; use emit_depthwise for depthwise convolutions")
    if op.k != geom.taps * geom.cp:
        raise ValueError(f"op.k={op.k} does not match taps*cp={geom.taps * geom.cp}")
    name = name or _sym(op.name)
    nb = list(x.ty.shape)[0]
    gv = add_func(bb, conv_prologue_func(op, geom, isa, expected_batch), f"{name}_pro")
    args = [x]
    if op.act is not None:
        fs, it = op.act.tables()
        args += [relax.const(fs), relax.const(it)]
    sp = [nb, geom.hp, geom.wp, geom.cp]
    if op.mode == "int":
        ndig, _ = op.digits
        t = bb.emit(relax.call_tir(gv, args, [relax.TensorType([ndig] + sp, "int8"),
                                              relax.TensorType([nb, geom.out_h, geom.out_w], "int32")]))
        a_args = [bb.emit(relax.TupleGetItem(t, 0)), bb.emit(relax.TupleGetItem(t, 1))]
    else:
        a_args = [bb.emit(relax.call_tir(gv, args, relax.TensorType(sp, "float32")))]
    rows = expected_batch * geom.out_h * geom.out_w
    return emit_core(bb, op, isa, a_args, geom.out_shape(nb), rows, f"{name}_core", residual, geom)


# ===================================================================================== depthwise
def depthwise_func(op: LinearOp, geom: ConvGeom, isa: str, expected_batch: int = 1):
    """Direct depthwise convolution as one TE PrimFunc (arguments: x, activation tables, the
    weight groups (packed: uint8 records; fp32: [n_out, taps] float), row tables, residual, y)."""
    from tvm import te, tirx  # noqa: PLC0415

    mode = op.mode
    n = tirx.Var("n", "int64")
    c_in, mult = geom.cin, geom.cout // geom.cin
    top, left = geom.pads[0], geom.pads[1]
    taps = geom.taps
    x = te.placeholder(geom.in_shape(n), "float32", name="x")
    args = [x]
    if op.act is not None:
        fs = te.placeholder((1, c_in), "float32", name="act_scale")
        it = te.placeholder((4, c_in), "int32", name="act_int")
        args += [fs, it]
    acc_dt = "int32" if mode == "int" else "float32"

    def inside(h, w):
        return tirx.all(h >= top, h < top + geom.in_h, w >= left, w < left + geom.in_w)

    def xin(b, c, h, w):
        hh = tirx.max(tirx.min(h - top, geom.in_h - 1), 0)
        ww = tirx.max(tirx.min(w - left, geom.in_w - 1), 0)
        return x[b, c, hh, ww] if geom.in_layout == "NCHW" else x[b, hh, ww, c]

    if mode == "int":
        val = lambda b, c, h, w: _te_act_value(xin(b, c, h, w), c, fs, it)  # noqa: E731
    elif op.act is not None:
        val = lambda b, c, h, w: _te_act_fake(xin(b, c, h, w), c, fs, it)  # noqa: E731
    else:
        val = xin
    vin = te.compute((n, c_in, geom.hp, geom.wp), lambda b, c, h, w: tirx.if_then_else(
        inside(h, w), val(b, c, h, w), tirx.const(0, acc_dt)), name="dw_in")
    # weights per original output channel
    tabs = _depthwise_tables(op, mult)
    if mode == "fp32":
        wf = te.placeholder((op.n_out, taps), "float32", name="W")
        args.append(wf)
        wq = wf
    else:
        wargs = [te.placeholder(g.packed.data.shape, "uint8", name=f"W{gi}") for gi, g in enumerate(op.groups)]
        args += wargs
        gid = te.placeholder((op.n_out,), "int32", name="gid")
        row = te.placeholder((op.n_out,), "int32", name="row")
        args += [gid, row]
    cin_of = te.placeholder((op.n_out,), "int32", name="cin_of")
    args.append(cin_of)
    if mode != "fp32":
        def unpack(o, t):
            val_ = None
            for gi, g in reversed(list(enumerate(op.groups))):
                pk, b = g.packed.pack, g.packed.bits
                word = t // 4
                byte = wargs[gi][row[o] // 16, word // pk, (row[o] % 16) * 4 + t % 4]
                u = (byte >> ((word % pk) * b).astype("uint8")) & tirx.const((1 << b) - 1, "uint8")
                q = u.astype("int32") - g.packed.zero
                val_ = q if val_ is None else tirx.if_then_else(gid[o] == gi, q, val_)
            return val_.astype(acc_dt)

        wq = te.compute((op.n_out, taps), unpack, name="dw_w")
    epi = te.placeholder((2, op.n_out), "float32", name="epi")
    args.append(epi)
    ri = te.reduce_axis((0, geom.kh), name="ri")
    rj = te.reduce_axis((0, geom.kw), name="rj")
    sh, sw = geom.stride
    dh, dw = geom.dilation
    acc = te.compute((n, op.n_out, geom.out_h, geom.out_w), lambda b, o, h, w: te.sum(
        wq[o, ri * geom.kw + rj] * vin[b, cin_of[o], h * sh + ri * dh, w * sw + rj * dw], axis=[ri, rj]),
        name="dw_acc")
    res = None
    if op.residual:
        res = te.placeholder(geom.res_shape(n), "float32", name="residual")
        args.append(res)
    nhwc = geom.out_layout == "NHWC"
    res_nhwc = (geom.res_layout or geom.out_layout) == "NHWC"

    def epilogue(*idx):
        b, o, h, w = (idx[0], idx[3], idx[1], idx[2]) if nhwc else idx
        v = acc[b, o, h, w].astype("float32") * epi[0, o] + epi[1, o]
        if res is not None:
            v = v + (res[b, h, w, o] if res_nhwc else res[b, o, h, w])
        if op.relu:
            v = tirx.max(v, tirx.const(0, "float32"))
        return v

    y = te.compute(geom.out_shape(n), epilogue, name="dw_y")
    func = te.create_prim_func(args + [y], index_dtype_override="int64")
    if isa == ISA_CUDA:
        return schedule_gpu_simple(func), tabs
    return _schedule_depthwise_cpu(func, expected_batch * op.n_out >= 4), tabs


def _depthwise_tables(op: LinearOp, mult: int) -> dict[str, np.ndarray]:
    """Per output channel (in the order stored): weight group, row in the group, scale, bias and
    input channel. Rows are in the layer's channel order (groups concatenated): row ``p`` reads
    input channel ``p // mult`` as in ONNX, and its result goes to channel ``out_index``."""
    gid = np.zeros(op.n_out, np.int32)
    row = np.zeros(op.n_out, np.int32)
    cin = np.zeros(op.n_out, np.int32)
    scale = np.zeros(op.n_out, np.float32)
    s_act = np.float32(op.act.base_scale) if op.mode == "int" else np.float32(1)
    pos = 0
    for gi, g in enumerate(op.groups):
        gid[g.out_index] = gi
        row[g.out_index] = np.arange(g.n, dtype=np.int32)
        cin[g.out_index] = (pos + np.arange(g.n)) // mult
        scale[g.out_index] = g.scale * s_act
        pos += g.n
    bias = np.zeros(op.n_out, np.float32) if op.bias is None else op.bias.astype(np.float32)
    return {"gid": gid, "row": row, "cin": cin, "epi": np.stack([scale, bias]).astype(np.float32)}


def _schedule_depthwise_cpu(func, parallel: bool):
    import tvm  # noqa: PLC0415
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    y = sch.get_sblock("dw_y")
    acc = sch.get_sblock("dw_acc")
    loops = sch.get_loops(y)
    outer = sch.fuse(loops[0], loops[1])
    sch.compute_at(acc, loops[2])
    if parallel:
        sch.parallel(outer)
    vin = sch.get_sblock("dw_in")
    lv = sch.get_loops(vin)
    fused = sch.fuse(lv[0], lv[1])
    if parallel:
        sch.parallel(fused)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def emit_depthwise(bb, x, op: LinearOp, geom: ConvGeom, isa: str, expected_batch: int = 1, residual=None,
                   name: str | None = None, fp32_weight: np.ndarray | None = None):
    """Emit a depthwise convolution; ``op.k`` is the number of taps. For fp32 layers pass the
    weights ``[n_out, taps]`` as ``fp32_weight``."""
    from tvm import relax  # noqa: PLC0415

    name = name or _sym(op.name)
    nb = list(x.ty.shape)[0]
    func, tabs = depthwise_func(op, geom, isa, expected_batch)
    gv = add_func(bb, func, f"{name}_dw")
    args = [x]
    if op.act is not None:
        fs, it = op.act.tables()
        args += [relax.const(fs), relax.const(it)]
    if op.mode == "fp32":
        if fp32_weight is not None:  # rows in the layer's order -> output-channel order
            w = np.empty_like(fp32_weight, dtype=np.float32)
            w[op.groups[0].out_index] = fp32_weight
        else:
            w = op.dense_weight()
        args.append(relax.const(np.ascontiguousarray(w.astype(np.float32))))
    else:
        args += [relax.const(g.packed.data) for g in op.groups]
        args += [relax.const(tabs["gid"]), relax.const(tabs["row"])]
    args.append(relax.const(tabs["cin"]))
    args.append(relax.const(tabs["epi"]))
    if op.residual:
        args.append(residual)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(geom.out_shape(nb), "float32")))


# ===================================================================================== builders
def conv_op_from_codes(name: str, geom: ConvGeom, groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       bias: np.ndarray | None, act, relu: bool = False, residual: bool = False,
                       plan_bits: list[int | None] | None = None) -> tuple[LinearOp, ConvGeom]:
    """A quantized conv op from per-group ``(codes [n_b, C/g, kh, kw], scales [n_b], out_index [n_b])``.

    Returns the op and the geometry with its stored channel padding.
    """
    if geom.depthwise:
        k = geom.taps
        kp = packing.padded_k(k)
        g_list = []
        for i, (q, s, idx) in enumerate(groups):
            pb = plan_bits[i] if plan_bits else None
            sb = packing.storage_bits_for_range(int(q.min()), int(q.max())) if q.size else 2
            g_list.append(WeightGroup(out_index=np.asarray(idx, np.int32), scale=np.asarray(s, np.float32),
                                      packed=packing.pack_weight(q.reshape(q.shape[0], -1), bits=sb, k_padded=kp),
                                      plan_bits=pb))
        return LinearOp(k=k, n_out=geom.cout, groups=g_list, bias=bias, act=act, relu=relu, residual=residual,
                        name=name), geom.with_channel_pad(1)
    if geom.groups != 1:
        raise ValueError("grouped convolutions other than depthwise are not supported by the kernels")
    sbits = [packing.storage_bits_for_range(int(q.min()), int(q.max())) if q.size else 2 for q, _, _ in groups]
    cp = channel_pad(geom.cin, sbits)
    g2 = geom.with_channel_pad(cp)
    k = geom.taps * cp
    g_list = []
    for i, (q, s, idx) in enumerate(groups):
        pb = plan_bits[i] if plan_bits else None
        mat = conv_weight_matrix(q, cp)
        sb = sbits[i]
        g_list.append(WeightGroup(out_index=np.asarray(idx, np.int32), scale=np.asarray(s, np.float32),
                                  packed=packing.pack_weight(mat, bits=sb, k_padded=packing.padded_k(k)),
                                  plan_bits=pb))
    return LinearOp(k=k, n_out=geom.cout, groups=g_list, bias=bias, act=act, relu=relu, residual=residual,
                    name=name), g2


def conv_op_fp32(name: str, geom: ConvGeom, weight: np.ndarray, bias: np.ndarray | None,
                 relu: bool = False, residual: bool = False) -> tuple[LinearOp, ConvGeom]:
    """An fp32 conv op (weights ``[cout, C/g, kh, kw]``) for the blocked fp32 kernels."""
    w = np.asarray(weight, np.float32)
    if geom.depthwise:
        k = geom.taps
        mat = w.reshape(w.shape[0], -1)
        g2 = geom.with_channel_pad(1)
    else:
        if geom.groups != 1:
            raise ValueError("grouped convolutions other than depthwise are not supported by the kernels")
        g2 = geom.with_channel_pad(geom.cin)
        mat = conv_weight_matrix(w, geom.cin)
        k = mat.shape[1]
    grp = WeightGroup(out_index=np.arange(geom.cout, dtype=np.int32), scale=np.ones(geom.cout, np.float32),
                      float_data=packing.pack_float_weight(mat), plan_bits=32)
    return LinearOp(k=k, n_out=geom.cout, groups=[grp], bias=bias, act=None, relu=relu, residual=residual,
                    name=name), g2


def conv_module(op: LinearOp, geom: ConvGeom, isa: str, batch: int | str = "n", residual: bool = False):
    """A Relax IRModule ``main(x[, residual]) -> y`` running one convolution (tests, benchmarks);
    tensors in ``geom.in_layout`` / ``geom.out_layout``."""
    from tvm import relax, tirx  # noqa: PLC0415

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
            if geom.depthwise:
                y = emit_depthwise(bb, x, op, geom, isa, exp, res)
            else:
                y = emit_conv2d(bb, x, op, geom, isa, exp, res)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()
