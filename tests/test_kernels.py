"""Packed weight layout (numpy) and the packed TIR kernels against numpy references: every storage
width (2/4/8 bits) and mixed groups, odd shapes (channels not a multiple of 16, k not a multiple
of the pack/vector width), symbolic and fixed batch, integer (one and two activation digits, zero
points), float-unpack and fp32 modes, conv (stride, padding, dilation) and depthwise (channel
multiplier), fused residual + ReLU; the host instruction set and the portable one run here,
aarch64 sdot and CUDA dp4a code generation is checked."""
from __future__ import annotations

import numpy as np
import pytest

from cwhawq.kernels import packing

RNG = np.random.default_rng(1234)


# ===================================================================================== packing
@pytest.mark.parametrize("bits,lo,hi", [(8, -128, 127), (4, -8, 7), (2, -2, 1)])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 7), (16, 16), (33, 100), (17, 130)])
def test_pack_roundtrip(bits, lo, hi, n, k):
    q = RNG.integers(lo, hi + 1, (n, k))
    pw = packing.pack_weight(q)
    assert pw.bits == packing.storage_bits_for_range(int(q.min()), int(q.max())) <= bits
    pw = packing.pack_weight(q, bits=bits)
    assert pw.bits == bits and pw.n == n and pw.k == k
    assert pw.data.dtype == np.uint8 and pw.data.shape[2] == 64
    assert pw.k_padded % packing.K_ALIGN == 0 and pw.k_padded >= k
    assert pw.nbytes == packing.padded_n(n) * pw.k_padded * bits // 8
    np.testing.assert_array_equal(packing.unpack_weight(pw), q)
    np.testing.assert_array_equal(pw.code_sum[:n], q.sum(axis=1))


def test_pack_layout_is_the_documented_one():
    """Byte 4*i+j of record g holds channel 16*nb+i at k = 4*(g*P+p)+j in bits [p*b, (p+1)*b)."""
    q = RNG.integers(-8, 8, (20, 40))
    pw = packing.pack_weight(q, bits=4)
    for o, kk in [(0, 0), (3, 5), (19, 39), (16, 17), (7, 12)]:
        nb, i = divmod(o, 16)
        w, j = divmod(kk, 4)
        g, p = divmod(w, 2)
        byte = int(pw.data[nb, g, 4 * i + j])
        assert ((byte >> (4 * p)) & 15) - 8 == q[o, kk]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        packing.pack_weight(np.array([[3, 0]]), bits=2)
    with pytest.raises(ValueError):
        packing.pack_weight(np.array([[200]]))
    with pytest.raises(ValueError):
        packing.pack_weight(np.zeros((2, 20)), k_padded=24)


@pytest.mark.parametrize("vrange", [(0, 255), (-127, 127), (-100, 155), (0, 480 * 8), (-3000, 3000)])
def test_packed_integer_identity(vrange):
    """sum_j 256^j sum_k u d_j - z*rowsum + c*code_sum == sum_k q v, for every width."""
    nd, c = packing.digits_needed(*vrange)
    for bits, (lo, hi) in {8: (-127, 127), 4: (-7, 7), 2: (-1, 1)}.items():
        q = RNG.integers(lo, hi + 1, (21, 45))
        pw = packing.pack_weight(q, bits=bits)
        v = RNG.integers(vrange[0], vrange[1] + 1, (3, 45))
        d = np.zeros((nd, 3, pw.k_padded), np.int8)
        d[:, :, :45] = packing.act_digits(v, nd, c)
        np.testing.assert_array_equal(packing.reference_packed_matmul(d, c, pw), v @ q.T)


def test_float_layout_roundtrip():
    w = RNG.normal(size=(19, 23)).astype(np.float32)
    data = packing.pack_float_weight(w)
    assert data.shape == (2, 32, 16)
    np.testing.assert_array_equal(packing.unpack_float_weight(data, 19, 23), w)


# ===================================================================================== TVM kernels
tvm = pytest.importorskip("tvm")

from cwhawq.kernels import conv as kconv  # noqa: E402
from cwhawq.kernels import gemm as kgemm  # noqa: E402


def _host():
    from cwhawq.backends.targets import host_cpu_config

    t = tvm.target.Target(host_cpu_config())
    return t, kgemm.isa_for_target(t)


HOST_TARGET, HOST_ISA = _host()
CPU_ISAS = sorted({HOST_ISA, kgemm.ISA_GENERIC})


def _act(kind: str, c: int):
    if kind == "int2d":  # mixed bits on the pow2 grid: two int8 digits
        abits = RNG.choice([8, 4, 2], c)
        sh = RNG.integers(0, 4, c)
        return kgemm.ActQuant.build(np.float32(0.01) * np.exp2(sh).astype(np.float32), 0, 0, (1 << abits) - 1, c)
    if kind == "int1":  # signed int8, per tensor
        return kgemm.ActQuant.build(np.float32(0.02), 0, -127, 127, c)
    if kind == "u8zp":  # onnxruntime-style uint8 with a zero point
        return kgemm.ActQuant.build(np.float32(0.02), 100, 0, 255, c)
    if kind == "free":  # per-channel float scales: float-unpack path
        return kgemm.ActQuant.build(RNG.uniform(0.01, 0.03, c).astype(np.float32), 0, -127, 127, c)
    return None


def _groups(n, k_rows, bits_list, kp, shape_fn=lambda q: q):
    perm = RNG.permutation(n)
    groups, rows = [], []
    for b, idx in zip(bits_list, np.array_split(np.arange(n), len(bits_list))):
        qm = (1 << (b - 1)) - 1
        q = RNG.integers(-qm, qm + 1, (len(idx),) + k_rows)
        s = RNG.uniform(0.01, 0.1, len(idx)).astype(np.float32)
        mat = shape_fn(q)
        groups.append(kgemm.WeightGroup(out_index=perm[idx].astype(np.int32), scale=s,
                                        packed=packing.pack_weight(mat, bits=b, k_padded=kp)))
        rows.append(q * s.reshape((-1,) + (1,) * len(k_rows)))
    return groups, np.concatenate(rows)


def _run(mod, *arrays):
    ex = tvm.compile(mod, target=HOST_TARGET)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _close(y, ref):
    scale = float(np.abs(ref).max()) + 1e-6
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * scale)


DENSE_CASES = [
    # n, k, bits, act, batch
    (37, 53, [8], "int1", 1),
    (37, 53, [4], "int2d", "n"),
    (37, 53, [2], "u8zp", 3),
    (40, 37, [8, 4, 2], "int2d", 5),
    (64, 200, [4, 2], "int1", 16),
    (16, 16, [2], "free", "n"),
    (70, 50, [8, 2], None, 7),
]


@pytest.mark.tvm
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("n,k,bits,act,batch", DENSE_CASES)
def test_dense_kernels(isa, n, k, bits, act, batch):
    groups, _ = _groups(n, (k,), bits, packing.padded_k(k))
    op = kgemm.LinearOp(k=k, n_out=n, groups=groups, bias=RNG.normal(size=n).astype(np.float32), act=_act(act, k))
    assert op.mode == ("float" if act in (None, "free") else "int")
    rows = 4 if batch == "n" else batch
    x = (RNG.normal(size=(rows, k)) * 2).astype(np.float32)
    _close(_run(kgemm.linear_module(op, isa, batch=batch), x), op.reference(x))


@pytest.mark.tvm
def test_dense_fp32_and_fused_epilogue():
    n, k = 50, 70
    w = RNG.normal(size=(n, k)).astype(np.float32)
    grp = kgemm.WeightGroup(out_index=np.arange(n, dtype=np.int32), scale=np.ones(n, np.float32),
                            float_data=packing.pack_float_weight(w))
    op = kgemm.LinearOp(k=k, n_out=n, groups=[grp], bias=RNG.normal(size=n).astype(np.float32), relu=True)
    x = RNG.normal(size=(5, k)).astype(np.float32)
    _close(_run(kgemm.linear_module(op, HOST_ISA, batch="n"), x), op.reference(x))
    groups, _ = _groups(64, (200,), [4, 2], 208)
    op = kgemm.LinearOp(k=200, n_out=64, groups=groups, bias=None, act=_act("int2d", 200), relu=True, residual=True)
    x = RNG.normal(size=(3, 200)).astype(np.float32)
    r = RNG.normal(size=(3, 64)).astype(np.float32)
    _close(_run(kgemm.linear_module(op, HOST_ISA, batch=3, residual=True), x, r), op.reference(x, r))


CONV_CASES = [
    # cin, cout, h, w, k, stride, pads, dilation, groups, bits, act, batch, layouts (in, out[, residual])
    (16, 16, 10, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8, 4, 2], "int2d", "n", ("NCHW", "NCHW")),
    (16, 16, 10, 10, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8, 4, 2], "int2d", 2, ("NHWC", "NHWC")),
    (5, 7, 9, 8, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, [4, 2], "int1", 1, ("NCHW", "NHWC", "NCHW")),
    (5, 7, 9, 8, 3, (2, 1), (0, 1, 1, 0), (1, 2), 1, [4], "u8zp", 3, ("NHWC", "NCHW")),
    (3, 20, 8, 8, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, [2], "free", "n", ("NCHW", "NCHW")),
    (3, 20, 8, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, [8], None, 2, ("NCHW", "NHWC", "NCHW")),
    (8, 8, 9, 9, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, [8, 4, 2], "int2d", "n", ("NHWC", "NHWC")),
    (8, 16, 9, 9, 3, (2, 2), (1, 1, 1, 1), (1, 1), 8, [4, 2], "free", 2, ("NCHW", "NCHW", "NHWC")),
]


def _to(layout, a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if layout == "NHWC" else a


@pytest.mark.tvm
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("cin,cout,h,w,k,stride,pads,dil,groups,bits,act,batch,layouts", CONV_CASES)
def test_conv_kernels(isa, cin, cout, h, w, k, stride, pads, dil, groups, bits, act, batch, layouts):
    geom = kconv.ConvGeom(cin, cout, h, w, k, k, stride, pads, dil, groups).with_layouts(*layouts)
    cg = cin // groups
    perm = RNG.permutation(cout)
    gr, wrows = [], []
    for b, idx in zip(bits, np.array_split(np.arange(cout), len(bits))):
        qm = (1 << (b - 1)) - 1
        q = RNG.integers(-qm, qm + 1, (len(idx), cg, k, k))
        s = RNG.uniform(0.01, 0.1, len(idx)).astype(np.float32)
        gr.append((q, s, perm[idx]))
        wrows.append(q * s[:, None, None, None])
    op, g2 = kconv.conv_op_from_codes("c", geom, gr, RNG.normal(size=cout).astype(np.float32), _act(act, cin),
                                      relu=True, residual=batch in (1, 2))
    nb = 2 if batch == "n" else batch
    x = (RNG.normal(size=(nb, cin, h, w)) * 2).astype(np.float32)
    args = [_to(layouts[0], x)]
    r = None
    if op.residual:
        r = RNG.normal(size=(nb, cout, g2.out_h, g2.out_w)).astype(np.float32)
        args.append(_to(layouts[-1], r))
    y = _run(kconv.conv_module(op, g2, isa, batch=batch, residual=op.residual), *args)
    _close(y, _to(layouts[1], kconv.reference_conv(op, g2, x, np.concatenate(wrows), r)))


@pytest.mark.tvm
def test_conv_fp32_kernels():
    for groups, cout in ((1, 20), (8, 8)):
        geom = kconv.ConvGeom(8 if groups > 1 else 3, cout, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), groups)
        w = RNG.normal(size=(cout, geom.cin // groups, 3, 3)).astype(np.float32)
        op, g2 = kconv.conv_op_fp32("c", geom, w, RNG.normal(size=cout).astype(np.float32), relu=True)
        x = RNG.normal(size=(2, geom.cin, 8, 8)).astype(np.float32)
        _close(_run(kconv.conv_module(op, g2, HOST_ISA, batch="n"), x), kconv.reference_conv(op, g2, x, w))


# ===================================================================================== other ISAs
def _core_module(isa):
    groups, _ = _groups(40, (64,), [8, 4, 2], 64)
    op = kgemm.LinearOp(k=64, n_out=40, groups=groups, bias=None, act=_act("int1", 64))
    return tvm.IRModule({"core": kgemm.core_func(op, isa, 1, "core")})


@pytest.mark.tvm
def test_arm_sdot_codegen():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    assert kgemm.isa_for_target(target) == kgemm.ISA_ARM_DOT
    lib = tvm.compile(_core_module(kgemm.ISA_ARM_DOT), target=target)
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")
    assert "sdot" in asm


@pytest.mark.tvm
def test_x86_vnni_codegen():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    assert kgemm.isa_for_target(target) == kgemm.ISA_X86_VNNI
    lib = tvm.compile(_core_module(kgemm.ISA_X86_VNNI), target=target)
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")
    assert "vpdpbusd" in asm


@pytest.mark.tvm
def test_cuda_dp4a_codegen():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}})
    lib = tvm.compile(_core_module(kgemm.ISA_CUDA), target=target)
    mod = lib.mod if hasattr(lib, "mod") else lib
    assert "__dp4a" in mod.imports[0].inspect_source()
