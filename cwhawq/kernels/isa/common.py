"""Strategies shared by several instruction sets: portable integer and float-unpack kernels on
the ``dot4`` layout (16-lane vectors, one ``k`` at a time: LLVM turns the four strided byte loads
of a word into ``ld4`` on aarch64), the fp32 kernel, and the unpacking helpers of both layouts."""
from __future__ import annotations

import numpy as np

from ..core import ActFormat, Strategy, TileShape, c64, concat, lanes_of  # noqa: F401 (concat: re-exported)
from ..packing import BLOCK_N, WORD_K, RecordLayout, pack_float_weight, pack_records, record_bytes


def best_tile(strategy: Strategy, expected_rows: int, need, score) -> TileShape:
    """The (mt, nt) with the best ``score`` among those whose register ``need`` fits."""
    nb = strategy.g.n_blocks
    rows = max(1, int(expected_rows))
    best = None
    for nt in range(1, min(nb, strategy.max_nt) + 1):
        for mt in range(1, min(rows, strategy.max_mt) + 1):
            if need(mt, nt) > strategy.regs:
                continue
            key = (score(mt, nt), mt)
            if best is None or key > best[0]:
                best = (key, TileShape(mt, nt))
    return best[1] if best else TileShape(1, 1)


# Intrinsics the tests may replace by portable expressions of the same semantics, so a strategy's
# data flow (layout, digits, offsets, accumulator indexing) is checked on machines without the
# instruction (e.g. AVX-512 VNNI on an AVX2 host); the instruction itself is checked by codegen tests.
EMULATE: set[str] = set()


def _pairwise(p, lanes_in: int, group: int):
    from tvm import tirx  # noqa: PLC0415

    out = None
    for j in range(group):
        v = tirx.Shuffle([p], [tirx.const(group * i + j, "int32") for i in range(lanes_in // group)])
        out = v if out is None else out + v
    return out


def intrin(T, ret: str, name: str, *args):
    """``T.call_llvm_pure_intrin`` unless ``name`` is in :data:`EMULATE`."""
    if name not in EMULATE:
        return T.call_llvm_pure_intrin(ret, name, *args)
    n_out = int(ret.split("x")[1])
    if name in ("llvm.x86.avx2.pmadd.wd", "llvm.x86.avx512.pmaddw.d.512"):
        a, b = args
        n = 2 * n_out
        p = T.Cast(f"int32x{n}", a) * T.Cast(f"int32x{n}", b)
        return _pairwise(p, n, 2)
    if name == "llvm.x86.avx2.pmadd.ub.sw":
        a, b = args
        n = 2 * n_out
        p = T.Cast(f"int32x{n}", T.reinterpret(f"uint8x{n}", a)) * T.Cast(f"int32x{n}", b)
        s = _pairwise(p, n, 2)
        lo, hi = T.broadcast(T.int32(-32768), n_out), T.broadcast(T.int32(32767), n_out)
        from tvm import tirx  # noqa: PLC0415

        return T.Cast(ret, tirx.max(tirx.min(s, hi), lo))
    if name.startswith("llvm.x86.avx512.vpdpbusd") or name.startswith("llvm.aarch64.neon.sdot"):
        acc, a, b = args
        n = 4 * n_out
        ua = T.reinterpret(f"uint8x{n}", a) if "vpdpbusd" in name else a
        p = T.Cast(f"int32x{n}", ua) * T.Cast(f"int32x{n}", b)
        return acc + _pairwise(p, n, 4)
    raise ValueError(f"no portable form of {name}")


def bcast_word(T, word, dtype: str, lanes: int):
    """Broadcast a 4-element activation word (a vector of 4 x dtype) as ``lanes`` x dtype."""
    bits = {"int8": 8, "uint8": 8, "int16": 16}[dtype]
    wide = {8: "int32", 16: "int64"}[bits]
    reps = lanes * bits // {8: 32, 16: 64}[bits]
    return T.reinterpret(f"{dtype}x{lanes}", T.broadcast(T.reinterpret(wide, word), reps))


# ------------------------------------------------------------------ dot4 unpacking (16 channels)
def dot4_codes_k(t, W, nb, kw, bits: int, j: int):
    """Signed codes of the 16 channels at ``k = 4 kw + j`` as int32x16 (portable: strided loads)."""
    T = t.T
    lay = RecordLayout("dot4", bits)
    p = 8 // bits
    per = BLOCK_N // p
    raw = W[nb, kw, T.ramp(c64(j), c64(4), per)]
    if bits == 8:
        return T.Cast("int32x16", T.reinterpret("int8x16", raw))
    mask = T.broadcast(T.uint8((1 << bits) - 1), per)
    planes = []
    for pl in range(p):
        v = raw if pl == 0 else T.shift_right(raw, T.broadcast(T.uint8(bits * pl), per))
        planes.append(T.bitwise_and(v, mask))
    u = concat(planes)
    return T.Cast("int32x16", u) - T.broadcast(T.int32(lay.zero), 16)


VBMI_SHIFT = "llvm.x86.avx512.pmultishift.qb.512"
VBMI_PERMUTE = "llvm.x86.avx512.permvar.qi.512"


def _const_bytes(T, values):
    """An int8 vector constant (a Shuffle of scalars, which LLVM folds into one constant)."""
    from tvm import tirx  # noqa: PLC0415

    return tirx.Shuffle([tirx.const(int(v), "int8") for v in values],
                        [tirx.const(i, "int32") for i in range(len(values))])


def dot4_half_s8(t, W, nb, kw, bits: int, first: int, lanes: int, vbmi: bool = False):
    """Signed bytes of channels ``first .. first + lanes/4 - 1`` (dot4 byte order) as int8xlanes.

    ``vbmi`` (a whole record on zmm, AVX-512 VBMI): ``vpmultishiftqb`` takes each byte's field from
    its qword at its plane's bit offset and ``vpermb`` maps the field (low bits; the neighbours'
    bits above it index equal table entries) to the signed code: 2 shuffle-port instructions, where
    the shift / mask / subtract sequence puts a variable shift on port 0 beside ``vpdpbusd``."""
    T = t.T
    nch = lanes // 4
    rb = record_bytes(bits)
    if bits == 8:
        return T.reinterpret(f"int8x{lanes}", W.vload([nb, kw, c64(4 * first)], f"uint8x{lanes}"))
    p = 8 // bits
    per = BLOCK_N // p                 # channels per plane
    zero = 1 << (bits - 1)
    if vbmi and lanes == 4 * BLOCK_N and first == 0 and VBMI_PERMUTE not in EMULATE:
        raw = T.reinterpret("int8x64", concat([W.vload([nb, kw, c64(0)], f"uint8x{rb}")] * p))
        ctrl = _const_bytes(T, [(j % 8) * 8 + bits * (j // rb) for j in range(64)])
        table = _const_bytes(T, [(i & ((1 << bits) - 1)) - zero for i in range(64)])
        field = T.call_llvm_pure_intrin("int8x64", VBMI_SHIFT, ctrl, raw)
        return T.call_llvm_pure_intrin("int8x64", VBMI_PERMUTE, table, field)
    if lanes == 4 * BLOCK_N and first == 0:
        # the whole record (zmm): plane q is lanes q*rb .. q*rb + rb-1, the record's bytes shifted by
        # bits*q; one load broadcast p times, one 16-bit variable shift (a byte's neighbour bits land
        # above the mask), one mask: 3 vector operations instead of 2p + p-1 inserts
        raw = W.vload([nb, kw, c64(0)], f"uint8x{rb}")
        u = T.reinterpret(f"uint16x{lanes // 2}", concat([raw] * p))
        sh = concat([T.broadcast(T.uint16(bits * q), rb // 2) for q in range(p)])
        v = T.reinterpret(f"uint8x{lanes}", T.shift_right(u, sh))
        v = T.bitwise_and(v, T.broadcast(T.uint8((1 << bits) - 1), lanes))
        return T.reinterpret(f"int8x{lanes}", v - T.broadcast(T.uint8(zero), lanes))
    parts = []
    ch = first
    while ch < first + nch:
        plane, inner = divmod(ch, per)
        take = min(per - inner, first + nch - ch)
        raw = W.vload([nb, kw, c64(4 * inner)], f"uint8x{4 * take}")
        v = raw if plane == 0 else T.shift_right(raw, T.broadcast(T.uint8(bits * plane), 4 * take))
        if plane != p - 1:
            v = T.bitwise_and(v, T.broadcast(T.uint8((1 << bits) - 1), 4 * take))
        parts.append(v)
        ch += take
    u = concat(parts)
    assert rb * 8 // bits == 64
    return T.reinterpret(f"int8x{lanes}", u - T.broadcast(T.uint8(zero), lanes))


def record_as_8bit(t, W, nb, kw, kind: str, bits: int, vector_bits: int = 512, vbmi: bool = False):
    """Record (``nb``, ``kw``) of ``bits``-bit ``kind`` records as the 8-bit record of that layout
    (uint8x64: two's complement codes, in the byte order the 8-bit inner loop loads);
    ``vector_bits``: the machine's vectors (256: built from two halves, as the ymm loops unpack)."""
    T = t.T
    if kind == "dot4":
        lanes = min(4 * BLOCK_N, vector_bits // 8)
        v = concat([dot4_half_s8(t, W, nb, kw, bits, f, lanes, vbmi) for f in range(0, BLOCK_N, lanes // 4)])
    else:  # quads / pairs: vector q of the 8-bit record is bytes 16q .. 16q + 15
        v = concat([T.Cast("int8x16", quad_i16(t, W, nb, kw, bits, q)) for q in range(4)])
    return T.reinterpret("uint8x64", v)


def panel_record8(self, t, W, nb, kw):
    """:meth:`Strategy.record8` of a strategy with a packed ``self.layout``."""
    return record_as_8bit(t, W, nb, kw, self.layout.kind, self.g.bits, self.vector_bits,
                          getattr(self, "vbmi", False))


# ------------------------------------------------------------------ quads unpacking
def quad_i16(t, W, nb, kw, bits: int, q: int):
    """Vector ``q`` of a ``quads`` / ``pairs`` record as signed int16x16 (same storage rule)."""
    T = t.T
    p = 8 // bits
    if bits == 8:
        return T.Cast("int16x16", T.reinterpret("int8x16", W.vload([nb, kw, c64(16 * q)], "uint8x16")))
    x = T.Cast("int16x16", W.vload([nb, kw, c64(16 * (q // p))], "uint8x16"))
    s = bits * (q % p)
    up = 16 - bits - s
    v = T.shift_left(x, T.broadcast(T.int16(up), 16)) if up else x
    return T.shift_right(v, T.broadcast(T.int16(16 - bits), 16))


# ===================================================================================== portable
class PortableInt(Strategy):
    """int32 vectors: acc[16 ch] += code[16 ch, k] * v[k], one k at a time (any LLVM target)."""

    k_step = WORD_K

    def __init__(self, op, group, regs: int = 16, vector_bits: int = 128):
        super().__init__(op, group)
        self.fmt = ActFormat("i16")
        self.regs = regs
        self.acc_regs = max(1, 512 // vector_bits)
        self.w_regs = self.acc_regs
        self.layout = RecordLayout("dot4", group.bits)

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        a = self.acc_regs
        return best_tile(self, expected_rows, lambda mt, nt: mt * nt * a + nt * a + 1,
                         lambda mt, nt: mt * nt / (mt + nt))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc, 16, "int32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for j in range(WORD_K):
                w = T.Bind(dot4_codes_k(t, t.W, nb, kw, self.g.bits, j))
                for mi in range(t.mtc):
                    a = T.Cast("int32", aload(0, t.rows[mi], 1, j))
                    self.acc_add(t, acc, mi * t.ntc + nt, 16, w * T.broadcast(a, 16))

    def result(self, t, mi, nt):
        return self.acc_get(t, t.state["acc"], mi * t.ntc + nt, 16)


class PortableFloat(PortableInt):
    """Float-unpack: codes converted to float in registers times the dequantized activations
    (``free`` activation scales, weight-only quantized layers)."""

    def __init__(self, op, group, regs: int = 16, vector_bits: int = 128):
        super().__init__(op, group, regs, vector_bits)
        self.fmt = ActFormat("f32")

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc, 16, "float32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for j in range(WORD_K):
                w = T.Bind(T.Cast("float32x16", dot4_codes_k(t, t.W, nb, kw, self.g.bits, j)))
                for mi in range(t.mtc):
                    self.acc_add(t, acc, mi * t.ntc + nt, 16, w * T.broadcast(aload(0, t.rows[mi], 1, j), 16))


class Fp32(Strategy):
    """fp32 weights ``[NB, Kp, 16]``: acc[16 ch] += w[16 ch, k] * x[k] (FMA), row-major tiles."""

    k_step = 1

    def __init__(self, op, group, regs: int = 16, vector_bits: int = 256, max_mt: int = 6):
        super().__init__(op, group)
        self.fmt = ActFormat("f32")
        self.regs = regs
        self.acc_regs = max(1, 512 // vector_bits)
        self.max_mt = max_mt

    def pack(self, kp):
        return pack_float_weight(self.g.float_w, kp)

    def tile(self, expected_rows):
        # score: FMAs per load (a weight block is ``a`` vector loads, a row one broadcast); on AVX2
        # this picks 6 rows x 1 block over 2 x 2 (measured 1.41 vs 1.55 ms, 3x3 conv 64ch 56x56, Zen 3)
        a = self.acc_regs
        return best_tile(self, expected_rows, lambda mt, nt: mt * nt * a + nt * a + 1,
                         lambda mt, nt: mt * nt * a / (mt + nt * a))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc, 16, "float32")

    def word(self, t, k, aload):
        T = t.T
        acc = t.state["acc"]
        ws = [T.Bind(t.W.vload([t.block(nt), k, c64(0)], "float32x16")) for nt in range(t.ntc)]
        for mi in range(t.mtc):
            a = T.Bind(T.broadcast(aload(0, t.rows[mi], 1), 16))
            for nt in range(t.ntc):
                self.acc_add(t, acc, mi * t.ntc + nt, 16, ws[nt] * a)

    def result(self, t, mi, nt):
        return self.acc_get(t, t.state["acc"], mi * t.ntc + nt, 16)


def portable_strategies(op, regs: int = 16, vector_bits: int = 128, fp32_mt: int = 6):
    mode = op.mode
    if mode == "fp32":
        return [Fp32(op, g, regs, max(vector_bits, 128), fp32_mt) for g in op.groups]
    if mode == "float":
        return [PortableFloat(op, g, regs, vector_bits) for g in op.groups]
    return [PortableInt(op, g, regs, vector_bits) for g in op.groups]


def code_abs_max(group) -> int:
    q = group.codes
    return int(np.abs(q.astype(np.int64)).max()) if q.size else 0
