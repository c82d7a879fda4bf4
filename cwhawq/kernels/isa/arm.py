"""aarch64 instruction sets: NEON with the ARMv8.2 dot product (``sdot``) and plain NEON.

``Sdot``: signed activation digits (offset ``c``) times signed codes in the ``dot4`` layout, four
``sdot`` per 16 channels and word (4 channels x 4 k each), int32 accumulation.
``arm_neon`` (Cortex-A72 and other cores without dotprod): the portable formulation compiled for
NEON's 32 registers: the four k of a word come de-interleaved from the record (``ld4``), widened and
multiplied-accumulated into int32 (``smlal``), activations as int16.
"""
from __future__ import annotations

from ..core import ActFormat, Strategy
from ..packing import WORD_K, RecordLayout, pack_records
from . import Isa, register
from .common import (intrin, Fp32, PortableFloat, PortableInt, best_tile, bcast_word, dot4_half_s8,
                     panel_record8)


class Sdot(Strategy):
    regs = 32
    vector_bits = 128
    record8 = panel_record8

    def __init__(self, op, group, fmt: ActFormat):
        super().__init__(op, group)
        self.fmt = fmt
        self.acc_regs = 4 * fmt.digits
        self.layout = RecordLayout("dot4", group.bits)

    def pack(self, kp):
        return pack_records(self.kernel_codes(), self.layout, kp)

    def tile(self, expected_rows):
        return best_tile(self, expected_rows, lambda mt, nt: self.acc_regs * mt * nt + 4 * nt + mt + 1,
                         lambda mt, nt: mt * nt / (mt + nt))

    def begin(self, t):
        t.state["acc"] = self.zero_acc(t, t.mtc * t.ntc * self.fmt.digits * 4, 4, "int32")

    def word(self, t, kw, aload):
        T = t.T
        acc = t.state["acc"]
        nd = self.fmt.digits
        a = [[T.Bind(bcast_word(T, aload(d, r, WORD_K), "int8", 16)) for d in range(nd)] for r in t.rows]
        for nt in range(t.ntc):
            nb = t.block(nt)
            for q in range(4):
                w = T.Bind(dot4_half_s8(t, t.W, nb, kw, t.wbits, 4 * q, 16))
                for mi in range(t.mtc):
                    for d in range(nd):
                        i = ((mi * t.ntc + nt) * nd + d) * 4 + q
                        self.acc_set(t, acc, i, 4, intrin(T, 
                            "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", self.acc_get(t, acc, i, 4), w, a[mi][d]))

    def shift(self, t, bits):
        T = t.T
        for i in range(len(t.state["acc"])):
            self.acc_set(t, t.state["acc"], i, 4, T.shift_left(self.acc_get(t, t.state["acc"], i, 4),
                                                                 T.broadcast(T.int32(bits), 4)))

    def result(self, t, mi, nt):
        T = t.T
        acc = t.state["acc"]
        nd = self.fmt.digits
        r = None
        for d in range(nd):
            v = self.acc_cat(t, acc, ((mi * t.ntc + nt) * nd + d) * 4, 4, 4)
            if d:
                v = T.shift_left(v, T.broadcast(T.int32(8 * d), 16))
            r = v if r is None else r + v
        return r


def _neon_common(op):
    if op.mode == "fp32":
        return [Fp32(op, g, 32, 128, 6) for g in op.groups]
    if op.mode == "float":
        return [PortableFloat(op, g, 32, 128) for g in op.groups]
    return None


def _sdot(isa, op):
    other = _neon_common(op)
    if other is not None:
        return other
    nd, off = op.act.digits()
    fmt = ActFormat("s8", nd, off)
    if nd > 1:
        seg = op.act.segments(unsigned=False)
        if seg is not None and seg.width <= 1.8 * op.channels:
            fmt = ActFormat("s8", 1, 0, seg)
    return [Sdot(op, g, fmt) for g in op.groups]


def _neon(isa, op):
    other = _neon_common(op)
    if other is not None:
        return other
    return [PortableInt(op, g, 32, 128) for g in op.groups]


register(Isa("arm_dot", "aarch64 NEON + dot product (sdot)", "aarch64", ("neon", "dotprod"), priority=20,
             vector_bits=128, strategies_fn=_sdot))
register(Isa("arm_neon", "aarch64 NEON (ld4 + smlal, no dot product)", "aarch64", ("neon",), priority=10,
             vector_bits=128, strategies_fn=_neon))
