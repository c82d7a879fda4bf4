"""CUDA kernels: one thread per (row, output channel), signed ``__dp4a`` on 4-byte words.

Weights in the ``dot4`` layout (:mod:`..packing`): a thread reads its channel's 4 codes of a word
as one 32-bit load from the record (plane ``i // (16 / P)``, byte ``4 * (i % (16 / P))``),
shifts/masks the plane and, for 4/2-bit offset codes, turns them into signed bytes
(``((u | 0x80808080) - z * 0x01010101) ^ 0x80808080``, no borrow between bytes). Activations are
signed int8 digits with an offset (as ``sdot``), the offset's ``c * sum_k q`` folded into ``corr``.
The grid is (groups of four 16-channel blocks, rows); 64 threads per CUDA block. Correctness first:
not tuned (docs/kernels.md).
"""
from __future__ import annotations

import numpy as np

from ..core import ActFormat, Layout, Strategy, c64, ib, tir_activate
from . import Isa, register
from ..problem import INT32_MAX
from ..packing import BLOCK_N, WORD_K, RecordLayout, pack_float_weight, pack_records


class CudaStrategy(Strategy):
    """Formats and packing for the CUDA core (its TIR is :func:`core_func`)."""

    def __init__(self, op, group):
        super().__init__(op, group)
        mode = op.mode
        if mode == "int":
            nd, off = op.act.digits()
            self.fmt = ActFormat("s8", nd, off)
        else:
            self.fmt = ActFormat("f32")
        self.k_step = 1 if mode == "fp32" else WORD_K
        self.layout = RecordLayout("dot4", group.bits) if group.quantized else None

    def pack(self, kp):
        if self.g.quantized:
            return pack_records(self.g.codes, self.layout, kp)
        return pack_float_weight(self.g.float_w, kp)


register(Isa("cuda", "NVIDIA CUDA (dp4a)", "cuda", (), priority=0, vector_bits=32,
             strategies_fn=lambda isa, op: [CudaStrategy(op, g) for g in op.groups]))


def core_func(op, strategies: list[CudaStrategy], name: str):
    """The CUDA core: same arguments as the CPU core (:func:`cwhawq.kernels.core.core_func`)."""
    from tvm import tirx  # noqa: PLC0415

    IRBuilder, T = ib()
    mode = op.mode
    fmt = strategies[0].fmt
    lay = Layout(op, fmt, direct_fp32=(mode == "fp32" and op.geom is None))
    bpb = 4
    gblocks = [-(-g.n_blocks // bpb) for g in op.groups]
    gstart = np.concatenate([[0], np.cumsum(gblocks)]).astype(int)
    row_start = np.concatenate([[0], np.cumsum([g.n_blocks * BLOCK_N for g in op.groups])]).astype(int)
    np_total = int(row_start[-1])
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
            lay.declare(T)
            W = []
            for gi, s in enumerate(strategies):
                shape, dt = s.weight_shape()
                W.append(T.arg(f"W{gi}", T.buffer(tuple(c64(v) for v in shape), dt)))
            epi = T.arg("epi", T.buffer((c64(2), c64(np_total)), "float32"))
            corr = T.arg("corr", T.buffer((c64(np_total),), "int32")) if mode == "int" else None
            oidx = T.arg("oidx", T.buffer((c64(np_total),), "int32"))
            T.arg("obase", T.buffer((c64(np_total // BLOCK_N),), "int32"))
            res = T.arg("residual", T.buffer(lay.res_shape(), "float32")) if op.residual else None
            Y = T.arg("Y", T.buffer(lay.out_shape(), "float32"))
            bx = T.env_thread("blockIdx.x")
            by = T.env_thread("blockIdx.y")
            tx = T.env_thread("threadIdx.x")
            with T.launch_thread(bx, int(gstart[-1])):
                with T.launch_thread(by, lay.m):
                    with T.launch_thread(tx, bpb * BLOCK_N):
                        row = lay.row(T, tirx, T.Cast("int64", by))
                        lane = T.Bind(T.Cast("int64", tx % BLOCK_N))
                        for gi, g in enumerate(op.groups):
                            with T.If(tirx.all(bx >= int(gstart[gi]), bx < int(gstart[gi + 1]))):
                                with T.Then():
                                    nb = T.Bind(T.Cast("int64", (bx - int(gstart[gi])) * bpb + tx // BLOCK_N))
                                    with T.If(nb < c64(g.n_blocks)):
                                        with T.Then():
                                            _thread(T, tirx, op, g, mode, fmt, lay, W[gi], row, lane, nb,
                                                    epi, corr, oidx, res, Y, int(row_start[gi]))
    return builder.get()


def _for_words(T, tirx, lay, op, step, body):
    """``body(kw, aload)`` over the reduction (dense: words; conv: taps x words)."""
    if lay.kind == "dense":
        n = (op.k if lay.direct else op.k_padded) // step
        with T.serial(c64(0), c64(n)) as kw:
            body(kw, lay.act_loader(T, tirx, kw * c64(step)))
        return
    g = lay.geom
    per_tap = g.cp // step
    with T.serial(c64(0), c64(g.taps)) as tap:
        ti = T.Bind(tirx.floordiv(tap, c64(g.kw)) * c64(g.dilation[0]))
        tj = T.Bind(tirx.floormod(tap, c64(g.kw)) * c64(g.dilation[1]))
        with T.serial(c64(0), c64(per_tap)) as wi:
            body(T.Bind(tap * c64(per_tap) + wi), lay.act_loader(T, tirx, (ti, tj, wi * c64(step))))


def _signed_word(T, W, nb, kw, lane, bits: int):
    """Channel ``lane``'s 4 codes of word ``kw`` as a packed int32 of signed bytes."""
    p = 8 // bits
    per = BLOCK_N // p
    plane = T.Bind(lane // c64(per))
    inner = T.Bind(lane % c64(per))
    word = T.Bind(T.reinterpret("uint32", W.vload([nb, kw, inner * c64(4)], "uint8x4")))
    if bits == 8:
        return T.reinterpret("int32", word)
    mask = sum(((1 << bits) - 1) << (8 * i) for i in range(4))
    u = T.bitwise_and(T.shift_right(word, T.Cast("uint32", plane * c64(bits))), T.uint32(mask))
    z = (1 << (bits - 1)) * 0x01010101
    s = T.bitwise_xor(T.bitwise_or(u, T.uint32(0x80808080)) - T.uint32(z), T.uint32(0x80808080))
    return T.reinterpret("int32", s)


def _thread(T, tirx, op, g, mode, fmt, lay, W, row, lane, nb, epi, corr, oidx, res, Y, row0):
    pos = T.Bind(c64(row0) + nb * c64(BLOCK_N) + lane)
    if mode == "int":
        nd = fmt.digits
        # the exact sum may leave int32 (wide activation exponents x long reductions): then each
        # word's exact dp4a is added into a float accumulator instead (the CPU cores spill chunks)
        spill = op.acc_bound() > INT32_MAX
        acc_t = "float32" if spill else "int32"
        accs = [T.alloc_buffer((1,), acc_t, scope="local") for _ in range(nd)]
        for a in accs:
            T.buffer_store(a, tirx.const(0, acc_t), [0])

        def body(kw, aload):
            w = T.Bind(_signed_word(T, W, nb, kw, lane, g.bits))
            for d in range(nd):
                aw = T.reinterpret("int32", aload(d, row, WORD_K))
                if spill:
                    dot = T.call_pure_extern("int32", "__dp4a", w, aw, T.int32(0))
                    T.buffer_store(accs[d], accs[d][0] + T.Cast("float32", dot), [0])
                else:
                    T.buffer_store(accs[d], T.call_pure_extern("int32", "__dp4a", w, aw, accs[d][0]), [0])

        _for_words(T, tirx, lay, op, WORD_K, body)
        r = None
        for d in range(nd):
            v = accs[d][0]
            if d:
                v = v * T.float32(2.0 ** (8 * d)) if spill else T.shift_left(v, T.int32(8 * d))
            r = v if r is None else r + v
        f = r + T.Cast("float32", corr[pos]) if spill else T.Cast("float32", r + corr[pos])
    else:
        acc = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(acc, T.float32(0), [0])
        if mode == "fp32":
            _for_words(T, tirx, lay, op, 1, lambda k, aload: T.buffer_store(
                acc, acc[0] + W[nb, k, lane] * aload(0, row, 1), [0]))
        else:
            def body(kw, aload):
                word = T.Bind(_signed_word(T, W, nb, kw, lane, g.bits))
                for j in range(WORD_K):
                    byte = T.Cast("float32", T.shift_right(T.shift_left(word, T.int32(24 - 8 * j)), T.int32(24)))
                    T.buffer_store(acc, acc[0] + byte * aload(0, row, 1, j), [0])

            _for_words(T, tirx, lay, op, WORD_K, body)
        f = acc[0]
    f = f * epi[c64(0), pos] + epi[c64(1), pos]
    o = T.Bind(T.Cast("int64", oidx[pos]))
    with T.If(o >= c64(0)):
        with T.Then():
            if lay.kind == "dense":
                idx = [row.m, o]
                ridx = idx
            else:
                idx = [row.b, row.h_out, row.w_out, o] if lay.geom.out_layout == "NHWC" else [row.b, o, row.h_out, row.w_out]
                ridx = [row.b, row.h_out, row.w_out, o] if lay.geom.res_layout == "NHWC" else [row.b, o, row.h_out, row.w_out]
            val = f
            if res is not None:
                val = val + res[tuple(ridx)]
            T.buffer_store(Y, tir_activate(T, tirx, op, val, 1), idx)
