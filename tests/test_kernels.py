"""Packed weight layouts (numpy) and the TIR kernels of every instruction set against numpy
references: every storage width (2/4/8 bits) and mixed groups, odd shapes (channels not a multiple
of 16, k not a multiple of 4), symbolic and fixed batch, every activation format (int16, one and
two uint8 / int8 digits, zero points, float), fp32, conv (stride, padding, dilation) and depthwise
(channel multiplier), fused residual + ReLU, a producer writing its consumer's activation operand,
and inputs far outside the activation ranges (saturation), all zero, all at the clip, negative.

The host's instruction set and the portable one run natively; instruction sets this machine lacks
(AVX-512 VNNI, AVX-512BW, AVX-VNNI, aarch64 sdot) run with their intrinsics replaced by portable
expressions of the same semantics (so their layouts and digit arithmetic are checked on any x86
machine) and their code generation is checked for the instruction itself. aarch64 artifacts run
under qemu in tests/test_tvm_backend.py."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from cwhawq.kernels import packing
from cwhawq.kernels import problem as P

RNG = np.random.default_rng(1234)


# ===================================================================================== packing
@pytest.mark.parametrize("kind", packing.LAYOUTS)
@pytest.mark.parametrize("bits,lo,hi", [(8, -128, 127), (4, -8, 7), (2, -2, 1)])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 7), (16, 16), (33, 100)])
def test_pack_roundtrip(kind, bits, lo, hi, n, k):
    q = RNG.integers(lo, hi + 1, (n, k))
    lay = packing.RecordLayout(kind, bits)
    data = packing.pack_records(q, lay)
    kw = -(-k // 4)
    assert data.dtype == np.uint8 and data.shape == (-(-n // 16), kw, 64 * bits // 8)
    np.testing.assert_array_equal(packing.unpack_records(data, lay, n, k), q)


def test_layouts_are_the_documented_ones():
    """dot4: code (i, j) in byte 4 (i % (16/P)) + j, bits b (i // (16/P)), offset for 4/2-bit;
    pairs: vector v = 2 (j // 2) + i // 8, lane 2 (i % 8) + j % 2, byte 16 (v // P) + lane."""
    q = RNG.integers(-8, 8, (20, 40))
    data = packing.pack_records(q, packing.RecordLayout("dot4", 4))
    for o, kk in [(0, 0), (3, 5), (19, 39), (9, 17), (15, 12)]:
        nb, i = divmod(o, 16)
        w, j = divmod(kk, 4)
        byte = int(data[nb, w, 4 * (i % 8) + j])
        assert ((byte >> (4 * (i // 8))) & 15) - 8 == q[o, kk]
    data = packing.pack_records(q, packing.RecordLayout("pairs", 4))
    for o, kk in [(0, 0), (3, 5), (19, 39), (9, 17), (15, 12)]:
        nb, i = divmod(o, 16)
        w, j = divmod(kk, 4)
        v = 2 * (j // 2) + i // 8
        byte = int(data[nb, w, 16 * (v // 2) + 2 * (i % 8) + j % 2])
        field = (byte >> (4 * (v % 2))) & 15
        assert (field - 16 if field >= 8 else field) == q[o, kk]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        packing.pack_records(np.array([[3, 0]]), packing.RecordLayout("dot4", 2))
    with pytest.raises(ValueError):
        packing.pack_records(np.array([[200]]), packing.RecordLayout("dot4", 8))
    with pytest.raises(ValueError):
        packing.pack_records(np.zeros((2, 20), np.int64), packing.RecordLayout("dot4", 8), k_padded=18)
    with pytest.raises(ValueError):
        packing.RecordLayout("vnni", 8)


@pytest.mark.parametrize("vrange", [(0, 255), (-127, 127), (-100, 155), (0, 480 * 8), (-3000, 3000)])
def test_activation_digits_roundtrip(vrange):
    nd, c = packing.digits_needed(*vrange)
    v = RNG.integers(vrange[0], vrange[1] + 1, (3, 45))
    d = packing.act_digits(v, nd, c).astype(np.int64)
    np.testing.assert_array_equal(sum((256 ** j) * d[j] for j in range(nd)) + c, v)


def test_float_layout_roundtrip():
    w = RNG.normal(size=(19, 23)).astype(np.float32)
    data = packing.pack_float_weight(w)
    assert data.shape == (2, 24, 16)
    np.testing.assert_array_equal(packing.unpack_float_weight(data, 19, 23), w)




# ===================================================================================== TVM kernels
tvm = pytest.importorskip("tvm")

from cwhawq.kernels import emit  # noqa: E402
from cwhawq.kernels import isa as I  # noqa: E402
from cwhawq.kernels.isa import common as C  # noqa: E402


def _host():
    from cwhawq.backends.targets import host_cpu_config

    t = tvm.target.Target(host_cpu_config())
    return t, I.isa_for_target(t)


HOST_TARGET, HOST_ISA = _host()
X86 = str(HOST_TARGET.attrs.get("mtriple", "")).startswith("x86_64")
EMULATED = {"x86_avx512_vnni_vbmi", "x86_avx512_vnni", "x86_avx512", "x86_avxvnni", "arm_dot", "x86_avx2"} - {HOST_ISA}
if not X86:
    EMULATED -= {"x86_avx2"}
CPU_ISAS = sorted({HOST_ISA, "generic"} | EMULATED)
ALL_INTRINSICS = {C.VBMI_PERMUTE, "llvm.x86.avx2.pmadd.wd", "llvm.x86.avx512.pmaddw.d.512", "llvm.x86.avx2.pmadd.ub.sw",
                  "llvm.x86.avx512.vpdpbusd.512", "llvm.x86.avx512.vpdpbusd.256", "llvm.aarch64.neon.sdot.v4i32.v16i8"}


@contextlib.contextmanager
def _emulated(isa):
    """Portable forms of the intrinsics of an instruction set this machine lacks."""
    if isa in EMULATED:
        C.EMULATE.update(ALL_INTRINSICS)
    try:
        yield
    finally:
        C.EMULATE.clear()


def _act(kind: str, c: int):
    if kind == "pow2":  # mixed bits on the pow2 grid (int16 values up to 12 bits, two uint8/int8 digits)
        abits = RNG.choice([8, 4, 2], c)
        sh = RNG.integers(0, 4, c)
        return P.ActQuant.build(np.float32(0.01) * np.exp2(sh).astype(np.float32), 0, 0, (1 << abits) - 1, c)
    if kind == "s8":  # signed int8, per tensor
        return P.ActQuant.build(np.float32(0.02), 0, -127, 127, c)
    if kind == "u8":  # unsigned 8-bit, per tensor: one digit
        return P.ActQuant.build(np.float32(0.02), 0, 0, 255, c)
    if kind == "u8zp":  # onnxruntime-style uint8 with a zero point
        return P.ActQuant.build(np.float32(0.02), 100, 0, 255, c)
    if kind == "free":  # per-channel float scales: float-unpack path
        return P.ActQuant.build(RNG.uniform(0.01, 0.03, c).astype(np.float32), 0, -127, 127, c)
    return None


def _groups(n, k, bits_list):
    perm = RNG.permutation(n)
    out = []
    for b, idx in zip(bits_list, np.array_split(np.arange(n), len(bits_list))):
        qm = (1 << (b - 1)) - 1
        out.append(P.WeightGroup(out_index=perm[idx], scale=RNG.uniform(0.01, 0.1, len(idx)).astype(np.float32),
                                 codes=RNG.integers(-qm, qm + 1, (len(idx), k))))
    return out


def _run(mod, *arrays):
    ex = tvm.compile(mod, target=HOST_TARGET)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _close(y, ref, tol=2e-5):
    scale = float(np.abs(ref).max()) + 1e-6
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol * scale)


def _inputs(shape, scale):
    """Normal inputs, ones far outside the activation ranges, zeros, all at +-big, negative."""
    x = (RNG.normal(size=shape) * scale).astype(np.float32)
    x[0] *= 300.0
    if shape[0] > 1:
        x[1] = 0.0
    if shape[0] > 2:
        x[2] = -np.abs(x[2]) * 50
    return x


DENSE_CASES = [
    # n, k, bits, act, batch
    (37, 53, [8], "s8", 1),
    (37, 53, [4], "pow2", "n"),
    (37, 53, [2], "u8zp", 3),
    (40, 37, [8, 4, 2], "pow2", 5),
    (64, 200, [4, 2], "u8", 16),
    (16, 16, [2], "free", "n"),
    (70, 50, [8, 2], None, 7),
    (40, 90, [7, 6, 4], "u8", 3),   # 7/6-bit codes on 8-bit activations: AVX2 vpmaddubsw, J = 1 / 2
]


@pytest.mark.tvm
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("n,k,bits,act,batch", DENSE_CASES)
def test_dense_kernels(isa, n, k, bits, act, batch):
    op = P.LinearOp(k=k, n_out=n, groups=_groups(n, k, bits), bias=RNG.normal(size=n).astype(np.float32),
                    act=_act(act, k))
    assert op.mode == ("float" if act in (None, "free") else "int")
    rows = 4 if batch == "n" else batch
    x = _inputs((rows, k), 3)
    with _emulated(isa):
        y = _run(emit.linear_module(op, isa, batch=batch), x)
    _close(y, op.reference(x))


@pytest.mark.tvm
def test_dense_fp32_and_fused_epilogue():
    n, k = 50, 70
    grp = P.WeightGroup(out_index=np.arange(n), scale=np.ones(n, np.float32), float_w=RNG.normal(size=(n, k)))
    op = P.LinearOp(k=k, n_out=n, groups=[grp], bias=RNG.normal(size=n).astype(np.float32), relu=True)
    x = RNG.normal(size=(5, k)).astype(np.float32)
    _close(_run(emit.linear_module(op, HOST_ISA, batch="n"), x), op.reference(x))
    op = P.LinearOp(k=200, n_out=64, groups=_groups(64, 200, [4, 2]), bias=None, act=_act("pow2", 200), relu=True,
                    residual=True)
    x = RNG.normal(size=(3, 200)).astype(np.float32)
    r = RNG.normal(size=(3, 64)).astype(np.float32)
    _close(_run(emit.linear_module(op, HOST_ISA, batch=3, residual=True), x, r), op.reference(x, r))


CONV_CASES = [
    # cin, cout, h, w, k, stride, pads, dilation, groups, bits, act, batch, layouts (in, out[, residual])
    (16, 16, 10, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8, 4, 2], "pow2", "n", ("NCHW", "NCHW")),
    (16, 16, 10, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [4, 2], "u8", 2, ("NHWC", "NHWC")),
    (5, 7, 9, 8, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, [4, 2], "s8", 1, ("NCHW", "NHWC", "NCHW")),
    (5, 7, 9, 8, 3, (2, 1), (0, 1, 1, 0), (1, 2), 1, [4], "u8zp", 3, ("NHWC", "NCHW")),
    (3, 20, 8, 8, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, [2], "free", "n", ("NCHW", "NCHW")),
    (3, 20, 8, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8], None, 2, ("NCHW", "NHWC", "NCHW")),
    (32, 48, 7, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8], "u8", 2, ("NHWC", "NHWC")),
    (24, 40, 7, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [7, 4, 2], "u8", 2, ("NHWC", "NCHW")),
    # flushes inside a tap: unrolled chunks (<= 16 per tap), and a loop over chunks with a rest
    (40, 20, 6, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [4, 2], "u8", 1, ("NHWC", "NHWC")),
    (74, 20, 4, 4, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, [7, 2], "u8", 2, ("NHWC", "NHWC")),
    (600, 16, 3, 3, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, [4], "u8", 1, ("NHWC", "NHWC")),
    (8, 8, 9, 9, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, [8, 4, 2], "pow2", "n", ("NHWC", "NHWC")),
    (8, 16, 9, 9, 3, (2, 2), (1, 1, 1, 1), (1, 1), 8, [4, 2], "free", 2, ("NCHW", "NCHW", "NHWC")),
]


def _to(layout, a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if layout == "NHWC" else a


def _conv_op(name, cin, cout, h, w, k, stride, pads, dil, groups, bits, act, layouts, relu=True, residual=False):
    geom = P.ConvGeom(cin, cout, h, w, k, k, stride, pads, dil, groups).with_layouts(*layouts)
    cg = cin // groups
    if bits == [32]:
        wt = (RNG.normal(size=(cout, cg, k, k)) * 0.3).astype(np.float32)
        op, g2 = P.conv_op_fp32(name, geom, wt, RNG.normal(size=cout).astype(np.float32), relu=relu,
                                residual=residual)
        return op, g2, wt
    perm = RNG.permutation(cout) if groups == 1 else np.arange(cout)
    gr, wrows = [], []
    for b, idx in zip(bits, np.array_split(np.arange(cout), len(bits))):
        qm = (1 << (b - 1)) - 1
        q = RNG.integers(-qm, qm + 1, (len(idx), cg, k, k))
        s = RNG.uniform(0.01, 0.05, len(idx)).astype(np.float32)
        gr.append((q, s, perm[idx]))
        wrows.append(q * s[:, None, None, None])
    op, g2 = P.conv_op_from_codes(name, geom, gr, RNG.normal(size=cout).astype(np.float32) * 0.1, _act(act, cin),
                                  relu=relu, residual=residual)
    return op, g2, np.concatenate(wrows)


@pytest.mark.tvm
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("cin,cout,h,w,k,stride,pads,dil,groups,bits,act,batch,layouts", CONV_CASES)
def test_conv_kernels(isa, cin, cout, h, w, k, stride, pads, dil, groups, bits, act, batch, layouts):
    op, g2, wrows = _conv_op("c", cin, cout, h, w, k, stride, pads, dil, groups, bits, act, layouts,
                             residual=batch in (1, 2))
    nb = 3 if batch == "n" else batch
    x = _inputs((nb, cin, h, w), 3)
    args = [_to(layouts[0], x)]
    r = None
    if op.residual:
        r = RNG.normal(size=(nb, cout, g2.out_h, g2.out_w)).astype(np.float32)
        args.append(_to(layouts[-1], r))
    with _emulated(isa):
        y = _run(emit.conv_module(op, isa, batch=batch, residual=op.residual), *args)
    _close(y, _to(layouts[1], P.reference_conv(op, g2, x, wrows, r)))


@pytest.mark.tvm
@pytest.mark.parametrize("groups,cout", [(1, 20), (8, 8), (1, 33)])
def test_conv_fp32_kernels(groups, cout):
    op, g2, wt = _conv_op("c", 8 if groups > 1 else 3, cout, 8, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), groups, [32],
                          None, ("NCHW", "NCHW"))
    x = _inputs((2, g2.cin, 8, 8), 1)
    _close(_run(emit.conv_module(op, HOST_ISA, batch="n"), x), P.reference_conv(op, g2, x, wt))


FUSED_CASES = [
    # producer (cin, cout, bits, act, output layout), consumer (cout, k, pads, bits, act, depthwise)
    ((3, 16, [8], "s8", "NHWC"), (24, 3, (1, 1, 1, 1), [8, 4], "pow2", False)),
    ((8, 20, [4], "u8", "NHWC"), (16, 3, (1, 0, 2, 1), [4, 2], "u8", False)),
    ((8, 16, [8], "pow2", "NHWC"), (16, 3, (1, 1, 1, 1), [8], "pow2", True)),
    ((8, 16, [32], None, "NHWC"), (16, 1, (0, 0, 0, 0), [32], None, False)),
    ((8, 16, [8], "pow2", "NCHW"), (16, 3, (1, 1, 1, 1), [4], "u8zp", False)),
    ((8, 24, [8], "s8", "NHWC"), (20, 3, (1, 1, 1, 1), [4, 2], "pow2", False)),  # segmented consumer
]


@pytest.mark.tvm
@pytest.mark.parametrize("isa", sorted({HOST_ISA, "generic"}))
@pytest.mark.parametrize("prod,cons", FUSED_CASES)
def test_producer_writes_the_consumers_operand(isa, prod, cons, monkeypatch):
    """A layer's epilogue quantizing its output into the next layer's padded activation operand
    equals the two layers run one after the other (references, saturating inputs included).
    AVX2 may take exponent classes here (growth 1.25) so their scattered operands stay tested."""
    from tvm import relax, tirx

    from cwhawq.kernels.isa import x86

    monkeypatch.setattr(x86, "AVX2_CLASS_GROWTH", 1.25)

    (ci, co, pb, pa, play), (co2, k2, pads2, cb, ca, dw) = prod, cons
    h = w = 9
    opA, gA, wA = _conv_op("a", ci, co, h, w, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, pb, pa, ("NCHW", play))
    opB, gB, wB = _conv_op("b", co, co if dw else co2, h, w, k2, (1, 1), pads2, (1, 1), co if dw else 1, cb, ca,
                           (play, "NCHW"))
    nb = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(gA.in_shape(nb), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            fo = emit.fused_input(opB, isa)
            y1, (a,) = emit.emit_layer(bb, x, opA, isa, 1, fused=[fo], emit_y=play == "NCHW")
            out = bb.emit_output(emit.emit_layer(bb, y1, opB, isa, 1, given_a=a))
        bb.emit_func_output(out)
    xin = _inputs((3, ci, h, w), 4)
    ref = P.reference_conv(opB, gB, P.reference_conv(opA, gA, xin, wA), wB)
    _close(_run(bb.get(), xin), ref)


PANEL_CASES = [
    # conv: cin, cout, h, bits, act, batch (3 blocks of 16: tiles with a tail block; mixed groups)
    ("conv", 24, 40, 12, [8, 4, 2], "u8", 2),
    ("conv", 24, 40, 12, [4, 2], "pow2", 1),
    ("conv", 20, 33, 9, [2], "u8zp", "n"),
    ("dense", 53, 37, None, [4, 2], "u8", 16),
    ("dense", 90, 40, None, [7, 4], "s8", 9),
]


@pytest.mark.tvm
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("kind,cin,cout,h,bits,act,batch", PANEL_CASES)
def test_weight_panel_unpacked_once_per_task(isa, kind, cin, cout, h, bits, act, batch, monkeypatch):
    """Sub-8-bit groups unpacked once per task into an 8-bit panel that every row tile reads (forced
    here for any number of tiles): equal to the reference; the strategies with packed records
    build the panel, the portable ones do not, and 8-bit groups never need one."""
    from cwhawq.kernels import core

    monkeypatch.setattr(core, "PANEL_MIN_TILES", 1)
    if kind == "conv":
        op, g2, wrows = _conv_op("c", cin, cout, h, h, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, bits, act,
                                 ("NHWC", "NHWC"), residual=batch == 2)
        nb = 3 if batch == "n" else batch
        x = _inputs((nb, cin, h, h), 3)
        args = [_to("NHWC", x)]
        r = None
        if op.residual:
            r = RNG.normal(size=(nb, cout, g2.out_h, g2.out_w)).astype(np.float32)
            args.append(_to("NHWC", r))
        make = lambda: emit.conv_module(op, isa, batch=batch, residual=op.residual)  # noqa: E731
        ref = _to("NHWC", P.reference_conv(op, g2, x, wrows, r))
    else:
        op = P.LinearOp(k=cin, n_out=cout, groups=_groups(cout, cin, bits), bias=RNG.normal(size=cout).astype(np.float32),
                        act=_act(act, cin))
        args = [_inputs((batch, cin), 3)]
        make = lambda: emit.linear_module(op, isa, batch=batch)  # noqa: E731
        ref = op.reference(args[0])
    with _emulated(isa):
        mod = make()
        y = _run(mod, *args)
    panels = mod.script().count(f', {4 * packing.BLOCK_N}), "uint8")')
    strategies = I.get(isa).strategies(op)
    narrow = [s for s in strategies if s.g.bits < 8]
    if type(strategies[0]).record8 is core.Strategy.record8:
        assert panels == 0
    else:
        assert panels == len(narrow) > 0
    _close(y, ref)


@pytest.mark.tvm
@pytest.mark.parametrize("isa", sorted({"x86_avx512_vnni", "arm_dot", HOST_ISA} & set(CPU_ISAS) | ({"x86_avx2"} if X86 else set())))
def test_exponent_classes_give_one_digit(isa, monkeypatch):
    """pow2 activations spanning 11 bits run as one 8-bit digit per exponent class (u8 / s8 dot
    products), not as two digits or int16, and equal the reference (saturating inputs too).
    (AVX2 takes classes only when they add no padding by default; allowed here to test the path.)"""
    from cwhawq.kernels.isa import x86

    monkeypatch.setattr(x86, "AVX2_CLASS_GROWTH", 1.25)
    n, k = 40, 61
    sh = RNG.integers(0, 4, k)
    act = P.ActQuant.build(np.float32(0.01) * np.exp2(sh).astype(np.float32), 0, 0, 255, k)
    assert act.digits()[0] == 2
    op = P.LinearOp(k=k, n_out=n, groups=_groups(n, k, [4, 2]), bias=RNG.normal(size=n).astype(np.float32), act=act)
    fmt = I.get(isa).strategies(op)[0].fmt
    if isa in ("x86_avx2", "x86_avx512_vnni", "x86_avx512_vnni_vbmi", "arm_dot"):
        assert fmt.segments is not None and fmt.digits == 1 and fmt.kind in ("u8", "s8")
    x = _inputs((5, k), 3)
    with _emulated(isa):
        y = _run(emit.linear_module(op, isa, batch=5), x)
    _close(y, op.reference(x))
    geom = P.ConvGeom(k, n, 6, 6, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1).with_layouts("NHWC", "NCHW")
    op, g2, wrows = _conv_op("c", k, n, 6, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [4], "pow2", ("NHWC", "NCHW"))
    x = _inputs((2, k, 6, 6), 3)
    with _emulated(isa):
        y = _run(emit.conv_module(op, isa, batch=2), _to("NHWC", x))
    _close(y, P.reference_conv(op, g2, x, wrows))
    del geom


@pytest.mark.tvm
@pytest.mark.parametrize("isa", sorted({"x86_avx2", "x86_avx512_vnni", "generic", HOST_ISA} & set(CPU_ISAS)))
def test_sums_beyond_int32_spill_exactly_into_float(isa):
    """A reduction whose int32 sum could overflow (600 x 127 x 32640 > 2^31) is cut into chunks
    that cannot, each chunk's exact sum added into float accumulators: no wraparound."""
    from cwhawq.kernels.isa import get

    op = _wide_op()
    k = op.k
    assert op.mode == "int" and get(isa).strategies(op)[0].spill_every
    x = np.full((3, k), 1e3, np.float32)  # saturates every channel: the worst case
    x[1] = RNG.normal(size=k) * 40
    with _emulated(isa):
        y = _run(emit.linear_module(op, isa, batch=3), x)
    _close(y, op.reference(x), tol=1e-6)


# ===================================================================================== code generation
def _asm(mod, target) -> str:
    lib = tvm.compile(mod, target=target)
    m = lib.mod if hasattr(lib, "mod") else lib
    out = ""
    for x in [m] + list(m.imports):
        with contextlib.suppress(Exception):
            out += x.inspect_source("asm")
    return out


CODEGEN = [
    ("x86_avx512_vnni_vbmi", {"kind": "llvm", "mcpu": "sapphirerapids"}, "u8", [8, 4, 2], "vpdpbusd"),
    ("x86_avx512_vnni_vbmi", {"kind": "llvm", "mcpu": "sapphirerapids"}, "u8", [4, 2], "vpmultishiftqb"),
    ("x86_avx512_vnni_vbmi", {"kind": "llvm", "mcpu": "znver4"}, "u8", [4], "vpermb"),
    ("x86_avx512_vnni", {"kind": "llvm", "mcpu": "cascadelake"}, "u8", [8, 4, 2], "vpdpbusd"),
    ("x86_avx512", {"kind": "llvm", "mcpu": "skylake-avx512"}, "pow2", [8, 4], "vpmaddwd"),
    ("x86_avxvnni", {"kind": "llvm", "mcpu": "alderlake"}, "u8", [4, 2], "vpdpbusd"),
    ("x86_avx2", {"kind": "llvm", "mcpu": "haswell"}, "pow2", [8, 4, 2], "vpmaddwd"),
    ("x86_avx2", {"kind": "llvm", "mcpu": "znver3"}, "u8", [4, 2], "vpmaddubsw"),
    ("x86_avx2", {"kind": "llvm", "mcpu": "haswell"}, "u8", [7, 4], "vpmaddubsw"),
    ("arm_dot", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "pow2", [8, 2],
     "sdot"),
    ("arm_neon", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, "u8", [8, 4], "smlal"),
]


@pytest.mark.tvm
@pytest.mark.parametrize("isa,cfg,act,bits,instr", CODEGEN)
def test_each_instruction_set_is_selected_and_emits_its_instruction(isa, cfg, act, bits, instr):
    target = tvm.target.Target(cfg)
    assert I.isa_for_target(target) == isa
    op = P.LinearOp(k=64, n_out=40, groups=_groups(40, 64, bits), act=_act(act, 64))
    assert instr in _asm(emit.linear_module(op, isa, batch=4), target)


@pytest.mark.tvm
@pytest.mark.parametrize("bits,strategy", [(7, "Avx2U8"), (6, "Avx2U8"), (8, "Avx2I16")])
def test_avx2_takes_vpmaddubsw_whenever_no_pair_can_saturate(bits, strategy):
    """8-bit one-digit activations on AVX2: ``vpmaddubsw`` for codes up to 7 bits (a pair of
    255 x 63 products fits int16), ``vpmaddwd`` with a note for the user at 8 bits; exact on the
    worst case (every code at +-max with one sign per row, every activation at 255 or 0)."""
    k, n = 72, 20
    qm = (1 << (bits - 1)) - 1
    q = np.full((n, k), qm)
    q[1::2] = -qm
    q[2, ::3] = RNG.integers(-qm, qm + 1, len(q[2, ::3]))
    g = P.WeightGroup(out_index=RNG.permutation(n), scale=RNG.uniform(0.01, 0.1, n).astype(np.float32), codes=q)
    op = P.LinearOp(k=k, n_out=n, groups=[g], bias=RNG.normal(size=n).astype(np.float32), act=_act("u8", k))
    d = emit.describe(op, "x86_avx2")
    assert d["kernel"] == [strategy] and d["act"] == ("u8" if strategy == "Avx2U8" else "i16"), d
    assert bool(d["notes"]) == (bits == 8), d
    (s,) = I.get("x86_avx2").strategies(op)
    if bits == 7:  # J = 1: every vpmaddubsw result widened at once, no int16 sums, 4-row tiles
        assert s.direct and s.flush_every is None and s.tile(4).mt == 4, (s.flush_every, s.tile(4))
    elif bits == 6:  # J = 2 words summed in int16 between widenings
        assert not s.direct and s.flush_every == 2, s.flush_every
    if not X86:
        pytest.skip("the AVX2 kernels run on x86-64 only (selection checked above)")
    x = np.full((4, k), 1e3, np.float32)
    x[1] = -1e3
    x[2, ::2] = 0.0
    x[3] = _inputs((1, k), 3)[0]
    with _emulated("x86_avx2"):
        y = _run(emit.linear_module(op, "x86_avx2", batch=4), x)
    _close(y, op.reference(x))


def test_portable_fallback_is_flagged():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})  # SSE2 only
    assert I.select(target).name == "generic" and I.select(target).portable
    assert not I.get("x86_avx2").portable


def _wide_op():
    """A reduction whose int32 sum could overflow: 600 x 127 x 32640 > 2^31."""
    k, n = 600, 20
    sh = np.full(k, 7)
    sh[:3] = 0
    act = P.ActQuant.build(np.float32(0.01) * np.exp2(sh).astype(np.float32), 0, 0, 255, k)
    q = np.full((n, k), 127)
    q[1::2] = -127
    g = P.WeightGroup(out_index=np.arange(n), scale=np.full(n, 0.01, np.float32), codes=q)
    return P.LinearOp(k=k, n_out=n, groups=[g], act=act)


@pytest.mark.tvm
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "spill"])
def test_cuda_dp4a_codegen(wide):
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}})
    op = _wide_op() if wide else P.LinearOp(k=64, n_out=40, groups=_groups(40, 64, [8, 4, 2]), act=_act("s8", 64))
    assert (op.acc_bound() > P.INT32_MAX) == wide
    lib = tvm.compile(emit.linear_module(op, "cuda", batch=4), target=target)
    mod = lib.mod if hasattr(lib, "mod") else lib

    def sources(m):
        yield from (m.inspect_source(),) if m.kind == "cuda" else ()
        for x in m.imports:
            yield from sources(x)

    src = "".join(sources(mod))
    assert "__dp4a" in src
    if wide:  # each word's exact dot product goes into a float accumulator
        assert "((float)__dp4a(" in src.replace(" ", ""), src[:3000]
