"""x86-64 instruction sets: AVX2 (+FMA), AVX-VNNI, AVX-512BW, AVX-512 VNNI.

AVX2 has no saturation-free 8-bit dot product, so two strategies:

``Avx2I16`` (every integer layer)
    Activations as int16 (the pow2-grid integers ``v``, up to 15 bits: one operand whatever the
    activation bits), weights in the ``quads`` layout sign-extended to int16 (``vpmovsxbw`` for
    8-bit codes, zero-extend + shift pair for 4/2-bit), ``vpmaddwd`` (16 MACs, exact: products of
    16-bit operands, pairs summed in int32) into four int32x8 accumulators per 16 channels whose
    adjacent lanes are summed in the epilogue. The same multiply count per MAC as onnxruntime's
    u8s8 ``vpmaddubsw`` + ``vpmaddwd`` pair, without its int16 saturation.
``Avx2U8`` (the activations one unsigned digit and no group's codes able to saturate a pair:
    2 * span * max|q| <= 32767, i.e. weights of at most 7 bits on 8-bit activations)
    ``vpmaddubsw`` (32 MACs) of the uint8 activation digit and the signed weight codes, summed in
    int16 for ``J`` words (``J * 2 * span * max|q| <= 32767``, so never saturating: J = 1 for
    7-bit, 2 for 6-bit, 8 for 4-bit weights on 8-bit activations) and widened with one
    ``vpmaddwd`` by ones per J words: 3 vector instructions per 32 MACs at J = 1 (onnxruntime's
    u8s8 count, which saturates at 8 bits), about 2 at J = 8, against 4 for ``Avx2I16``.

AVX-512 VNNI / AVX-VNNI: ``vpdpbusd`` (u8 activation digits x s8 codes, int32 accumulation, no
saturation) on zmm / ymm; activations needing more than 256 levels take two unsigned digits. With
AVX-512 VBMI too (Ice Lake and later, Zen 4) 4/2-bit records are unpacked by ``vpmultishiftqb`` +
``vpermb`` (``x86_avx512_vnni_vbmi``).
AVX-512BW without VNNI: ``vpmaddwd`` on zmm, as ``Avx2I16``.
"""
from __future__ import annotations

from ..core import ActFormat, Strategy
from ..packing import WORD_K, RecordLayout, pack_records
from . import Isa, register
from .common import (intrin, Fp32, PortableFloat, best_tile, bcast_word, code_abs_max, concat, dot4_half_s8,
                     panel_record8, quad_i16)


# ===================================================================================== AVX2 int16
class Avx2I16(Strategy):
    """``pairs`` layout: per k pair, two int16x16 weight vectors (channels 0-7, 8-15) and one
    broadcast of the row's two int16 activations; int32x8 results are 8 channels each."""
    regs = 16
    vector_bits = 256
    acc_regs = 2
    max_mt = int(__import__("os").environ.get("I16MT", "4"))

    def __init__(self, op, group):
        super().__init__(op, group)
        self.fmt = ActFormat("i16")
        self.layout = RecordLayout("pairs", group.bits)

    record8 = panel_record8

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        return best_tile(self, expected_rows, lambda mt, nt: 2 * mt * nt + 2 * nt + 1,
                         lambda mt, nt: mt * nt / (mt + 2 * nt))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc * 2, 8, "int32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        for pp in range(2):
            a = [T.Bind(T.reinterpret("int16x16", T.broadcast(T.reinterpret("int32", aload(0, r, 2, 2 * pp)), 8)))
                 for r in t.rows]
            for nt in range(t.ntc):
                nb = t.block(nt)
                for h in range(2):
                    w = T.Bind(quad_i16(t, t.W, nb, kw, t.wbits, 2 * pp + h))
                    for mi in range(t.mtc):
                        self.acc_add(t, acc, (mi * t.ntc + nt) * 2 + h, 8,
                                     intrin(T, "int32x8", "llvm.x86.avx2.pmadd.wd", w, a[mi]))

    def result(self, t, mi, nt):
        return self.acc_cat(t, t.state["acc"], (mi * t.ntc + nt) * 2, 2, 8)


# ===================================================================================== AVX2 u8
def act_span(op, fmt: ActFormat) -> int:
    """Largest stored activation digit of a one-digit unsigned operand (``max v - offset``)."""
    act = op.act
    seg = fmt.segments
    if seg is None:
        vmin, vmax = act.value_range()
        return vmax - fmt.offset
    hi = (act.qmax.astype(int) - act.zero_point.astype(int))
    return max(max(int(hi[list(ch)].max()), 0) - off for ch, off in zip(seg.chans, seg.offsets))


def u8_flush_words(op, group, fmt: ActFormat) -> int:
    """Words of ``vpmaddubsw`` pairs (each at most 2 * span * max|q| in magnitude) an int16 sum
    can hold without saturating; 0 when a single pair could saturate."""
    qa = max(1, code_abs_max(group))
    return 32767 // (2 * max(1, act_span(op, fmt)) * qa)


def one_digit_unsigned(op, max_growth: float):
    """The uint8 one-digit format of ``op``'s activations (plain, or segmented by exponent when the
    padded classes grow the reduction by at most ``max_growth``), or None."""
    nd, off = op.act.unsigned_digits()
    if nd == 1:
        return ActFormat("u8", 1, off)
    seg = op.act.segments(unsigned=True)
    if seg is not None and seg.width <= max_growth * op.channels:
        return ActFormat("u8", 1, 0, seg)
    return None


class Avx2U8(Strategy):
    """``flush_every`` = J words summed in int16 between widenings; at J = 1 (7-bit codes) every
    ``vpmaddubsw`` result is widened at once (``direct``: no int16 accumulators, whose registers the
    tile then gives to a fourth row, and no per-word flush points)."""
    regs = 16
    vector_bits = 256

    def __init__(self, op, group, fmt: ActFormat):
        super().__init__(op, group)
        self.fmt = fmt
        self.layout = RecordLayout("dot4", group.bits)
        fe = u8_flush_words(op, group, fmt)
        self.direct = fe == 1
        self.flush_every = None if self.direct else fe
        self.acc_regs = 2 if self.direct else 3  # the int32 totals (+ two int16 sums)

    record8 = panel_record8

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        # accumulators, 2 weight vectors, the rows' broadcasts, ones (+ the product direct widens)
        extra = 2 if self.direct else 1
        return best_tile(self, expected_rows, lambda mt, nt: self.acc_regs * mt * nt + 2 * nt + mt + extra,
                         lambda mt, nt: mt * nt / (mt + 2 * nt))

    def begin(self, t):
        n = t.mtc * t.ntc
        if not self.direct:
            t.state["a16"] = self.zero_acc(t, n * 2, 16, "int16")
        t.state["a32"] = self.zero_acc(t, n * 2, 8, "int32")

    def word(self, t, kw, aload):
        T = t.T
        a16, a32 = t.state.get("a16"), t.state["a32"]
        ones = T.broadcast(T.int16(1), 16) if self.direct else None
        a = [T.Bind(T.reinterpret("int8x32", bcast_word(T, aload(0, r, WORD_K), "uint8", 32))) for r in t.rows]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for h in range(2):
                w = T.Bind(dot4_half_s8(t, t.W, nb, kw, t.wbits, 8 * h, 32))
                for mi in range(t.mtc):
                    i = (mi * t.ntc + nt) * 2 + h
                    p = intrin(T, "int16x16", "llvm.x86.avx2.pmadd.ub.sw", a[mi], w)
                    if self.direct:
                        self.acc_add(t, a32, i, 8, intrin(T, "int32x8", "llvm.x86.avx2.pmadd.wd", p, ones))
                    else:
                        self.acc_add(t, a16, i, 16, p)

    def flush(self, t):  # never called when direct (flush_every is None)
        T = t.T
        a16, a32 = t.state["a16"], t.state["a32"]
        ones = T.broadcast(T.int16(1), 16)
        for i in range(t.mtc * t.ntc * 2):
            v = self.acc_get(t, a16, i, 16)
            self.acc_add(t, a32, i, 8, intrin(T, "int32x8", "llvm.x86.avx2.pmadd.wd", v, ones))
            self.acc_set(t, a16, i, 16, T.broadcast(T.int16(0), 16))

    def shift(self, t, bits):
        T = t.T
        for i, b in enumerate(t.state["a32"]):
            self.acc_set(t, t.state["a32"], i, 8, T.shift_left(self.acc_get(t, t.state["a32"], i, 8),
                                                                 T.broadcast(T.int32(bits), 8)))

    def result(self, t, mi, nt):
        return self.acc_cat(t, t.state["a32"], (mi * t.ntc + nt) * 2, 2, 8)


# ===================================================================================== VNNI
class Vnni(Strategy):
    """``vpdpbusd`` on ``lanes`` = 16 (zmm) or 8 (ymm) int32 lanes; D unsigned activation digits."""

    def __init__(self, op, group, fmt: ActFormat, lanes: int, vbmi: bool = False):
        super().__init__(op, group)
        self.fmt = fmt
        self.lanes = lanes
        self.vbmi = vbmi and lanes == 16   # 4/2-bit records unpacked by vpmultishiftqb + vpermb
        self.regs = 32 if lanes == 16 else 16
        self.vector_bits = 32 * lanes
        self.acc_regs = fmt.digits * (16 // lanes)
        self.layout = RecordLayout("dot4", group.bits)
        self.intrin = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"

    record8 = panel_record8

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        h = 16 // self.lanes
        return best_tile(self, expected_rows, lambda mt, nt: self.acc_regs * mt * nt + h * nt + mt + 1,
                         lambda mt, nt: mt * nt / (mt + nt))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc * self.fmt.digits * (16 // self.lanes), self.lanes, "int32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        ln, nd, h = self.lanes, self.fmt.digits, 16 // self.lanes
        a = [[T.Bind(T.reinterpret(f"int8x{4 * ln}", bcast_word(T, aload(d, r, WORD_K), "uint8", 4 * ln)))
              for d in range(nd)] for r in t.rows]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for hh in range(h):
                w = T.Bind(dot4_half_s8(t, t.W, nb, kw, t.wbits, 16 // h * hh, 4 * ln, self.vbmi))
                for mi in range(t.mtc):
                    for d in range(nd):
                        i = ((mi * t.ntc + nt) * nd + d) * h + hh
                        self.acc_set(t, acc, i, ln, intrin(T, 
                            f"int32x{ln}", self.intrin, self.acc_get(t, acc, i, ln), a[mi][d], w))

    def shift(self, t, bits):
        T, ln = t.T, self.lanes
        for i in range(len(t.state["acc"])):
            self.acc_set(t, t.state["acc"], i, ln, T.shift_left(self.acc_get(t, t.state["acc"], i, ln),
                                                                  T.broadcast(T.int32(bits), ln)))

    def result(self, t, mi, nt):
        T = t.T
        acc = t.state["acc"]
        nd, h, ln = self.fmt.digits, 16 // self.lanes, self.lanes
        r = None
        for d in range(nd):
            base = ((mi * t.ntc + nt) * nd + d) * h
            v = concat([self.acc_get(t, acc, base + hh, ln) for hh in range(h)])
            if d:
                v = T.shift_left(v, T.broadcast(T.int32(8 * d), 16))
            r = v if r is None else r + v
        return r


# ===================================================================================== AVX-512 int16
class Avx512I16(Strategy):
    regs = 32
    vector_bits = 512
    acc_regs = 2

    def __init__(self, op, group):
        super().__init__(op, group)
        self.fmt = ActFormat("i16")
        self.layout = RecordLayout("quads", group.bits)

    record8 = panel_record8

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        return best_tile(self, expected_rows, lambda mt, nt: 2 * mt * nt + mt + 2,
                         lambda mt, nt: mt * nt / (mt + 2 * nt))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc * 2, 16, "int32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        a = [T.Bind(bcast_word(T, aload(0, r, WORD_K), "int16", 32)) for r in t.rows]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for o in range(2):
                w = T.Bind(concat([quad_i16(t, t.W, nb, kw, t.wbits, 2 * o + i) for i in range(2)]))
                for mi in range(t.mtc):
                    self.acc_add(t, acc, (mi * t.ntc + nt) * 2 + o, 16,
                                 intrin(T, "int32x16", "llvm.x86.avx512.pmaddw.d.512", w, a[mi]))

    def result(self, t, mi, nt):
        from tvm import tirx  # noqa: PLC0415

        v = self.acc_cat(t, t.state["acc"], (mi * t.ntc + nt) * 2, 2, 16)  # 16 channels x 2 partial sums
        even = tirx.Shuffle([v], [tirx.const(2 * i, "int32") for i in range(16)])
        odd = tirx.Shuffle([v], [tirx.const(2 * i + 1, "int32") for i in range(16)])
        return even + odd


# ===================================================================================== registration
def _float_or_fp32(op, regs, bits):
    if op.mode == "fp32":
        return [Fp32(op, g, regs, bits, 6 if regs == 16 else 8) for g in op.groups]
    return [PortableFloat(op, g, regs, bits) for g in op.groups]


# Exponent classes on AVX2 only when they do not grow the reduction: measured on Zen 3
# (2026-12-02, interleaved, batch 1) the vpmaddwd path was faster than classes at 1.25 growth on
# MobileNetV2 W4A8 (9.2 vs 11.6 ms) and ResNet-18 W4A8 (25.9 vs 28.5 ms) and equal on resnet20
# (0.594 vs 0.605 ms): a class operand is written by scattered scalar stores (depthwise producers
# doubled their time) and every class pads its words.
AVX2_CLASS_GROWTH = 1.0


# What compile tells the user when one-digit activations stay on vpmaddwd because of wide codes.
AVX2_WIDE_CODES_NOTE = ("8-bit weight codes run vpmaddwd on AVX2 (a pair of 255 x 127 products overflows "
                        "vpmaddubsw's int16); 7-bit weights (`--w-bits 7`, or `--bits 2,4,7`) run "
                        "vpmaddubsw, exactly (docs/kernels.md)")


def _avx2(isa, op):
    if op.mode != "int":
        return _float_or_fp32(op, 16, 256)
    fmt = one_digit_unsigned(op, AVX2_CLASS_GROWTH)
    if fmt is not None and all(u8_flush_words(op, g, fmt) >= 1 for g in op.groups):
        return [Avx2U8(op, g, fmt) for g in op.groups]
    ss = [Avx2I16(op, g) for g in op.groups]
    if fmt is not None and fmt.segments is None:  # one digit, but a group's codes could saturate
        for s in ss:
            s.note = AVX2_WIDE_CODES_NOTE
    return ss


def _avx512(isa, op):
    if op.mode != "int":
        return _float_or_fp32(op, 32, 512)
    return [Avx512I16(op, g) for g in op.groups]


def _vnni(lanes, vbmi=False):
    def make(isa, op):
        if op.mode != "int":
            return _float_or_fp32(op, 32 if lanes == 16 else 16, 512 if lanes == 16 else 256)
        fmt = one_digit_unsigned(op, 1.8)
        if fmt is None:
            nd, off = op.act.unsigned_digits()
            fmt = ActFormat("u8", nd, off)
        return [Vnni(op, g, fmt, lanes, vbmi) for g in op.groups]
    return make


register(Isa("x86_avx512_vnni_vbmi", "AVX-512 VNNI vpdpbusd (zmm), VBMI unpacking", "x86_64",
             ("avx512bw", "avx512vnni", "avx512vbmi"), priority=45, vector_bits=512, strategies_fn=_vnni(16, True)))
register(Isa("x86_avx512_vnni", "AVX-512 VNNI vpdpbusd (zmm)", "x86_64", ("avx512bw", "avx512vnni"),
             priority=40, vector_bits=512, strategies_fn=_vnni(16)))
register(Isa("x86_avx512", "AVX-512BW vpmaddwd (zmm)", "x86_64", ("avx512bw",), priority=30, vector_bits=512,
             strategies_fn=_avx512))
register(Isa("x86_avxvnni", "AVX-VNNI vpdpbusd (ymm)", "x86_64", ("avx2", "avxvnni"), priority=25,
             vector_bits=256, strategies_fn=_vnni(8)))
register(Isa("x86_avx2", "AVX2 vpmaddwd / vpmaddubsw (ymm), FMA", "x86_64", ("avx2", "fma"), priority=20,
             vector_bits=256, strategies_fn=_avx2))
