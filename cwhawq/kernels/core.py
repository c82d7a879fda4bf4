"""The CPU GEMM core every CPU instruction set shares (TIR, written with TVM's IRBuilder).

``y[m, o] = epilogue(sum_k W[o, k] a[m, k])`` for a dense layer or a convolution as implicit GEMM
(no im2col: the activations are read at each tap's offset). One PrimFunc walks all weight groups
of a layer:

* a parallel loop over tasks = (image, chunk of rows) x (n-tile of one group); a convolution's
  tasks never straddle two images;
* in a task, register tiles of ``mt`` rows x ``nt`` 16-channel blocks (the shape comes from the
  instruction set's register budget, :meth:`Strategy.tile`), the rows left over when ``mt`` does
  not divide the chunk in a one-row tile;
* in a tile, the reduction as words of 4 ``k`` (taps x words for a convolution), each handed to the
  instruction set's :class:`Strategy`, which loads and unpacks the weight record and accumulates
  (``vpmaddwd``, ``vpdpbusd``, ``sdot``, FMA, ...), with a periodic ``flush`` where narrow
  accumulators must be widened;
* the epilogue: the strategy's accumulators as one 16-lane vector per (row, block), the static
  integer correction (``c * sum_k q``, activation offsets), one rescale per output channel
  (``S * s_w[o]``), bias, fused residual add and ReLU, and the stores at the rows' original
  channels (a block of 16 consecutive channels is one vector store; NCHW output is transposed in
  registers).

The activation operand comes from a prologue (:mod:`cwhawq.kernels.prologue`) in the
:class:`ActFormat` the strategy asks for: dense ``A [D, m, Kp]``, conv ``A [D, n, Hp, Wp, Cp]``
(channels-last, spatial padding applied), or, for fp32 dense layers, the input itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .packing import BLOCK_N, WORD_K
from .problem import LinearOp

ACT_DTYPES = {"i16": "int16", "u8": "uint8", "s8": "int8", "f32": "float32"}
INT32_MAX_SAFE = 2**31 - 1


def tir_activate(T, tirx, op: LinearOp, v, lanes: int):
    """The op's fused activation on ``v`` (``lanes`` float32 lanes): ReLU, then the upper clip."""
    def const(x):
        return T.float32(x) if lanes == 1 else T.broadcast(T.float32(x), lanes)

    if op.relu:
        v = tirx.max(v, const(0))
    if op.clip_hi is not None:
        v = tirx.min(v, const(float(op.clip_hi)))
    return v


@dataclass(frozen=True)
class ActFormat:
    """How the prologue stores a layer's activation operand.

    ``i16``: the integers ``v`` as int16; ``u8``: unsigned digits of ``v - offset`` (``digits``
    of them, base 256); ``s8``: signed digits of ``v - offset`` (:func:`~.packing.act_digits`);
    ``f32``: floats (the dequantized value, or the input of an fp32 layer).
    """

    kind: str
    digits: int = 1
    offset: int = 0
    segments: object = None  # problem.Segments: channels grouped by exponent (one digit each)

    @property
    def dtype(self) -> str:
        return ACT_DTYPES[self.kind]

    def channels(self, cp: int) -> int:
        """Channel positions of the stored operand (segmented: the padded classes)."""
        return self.segments.width if self.segments is not None else cp


@dataclass(frozen=True)
class TileShape:
    mt: int  # rows per register tile
    nt: int  # 16-channel blocks per register tile


@dataclass
class FusedOut:
    """A consumer layer's activation operand, written by this layer's epilogue (the consumer then
    has no prologue): the consumer's quantizer over this layer's output channels (``act``; None
    for an fp32 consumer) in the consumer's format, at the consumer's padded position.

    ``kind`` ``conv``: ``[D, n, hp, wp, cp]`` (offset ``top``, ``left``); ``depthwise``:
    ``[n, hp, wp, cp]`` float; ``dense``: ``[D, m, cp]``. Padding (spatial halo, channels
    ``>= channels``) holds the integer 0 (``-offset`` in digits; 0.0 in float).
    """

    fmt: ActFormat
    act: object
    kind: str
    channels: int
    cp: int
    hp: int = 0
    wp: int = 0
    top: int = 0
    left: int = 0
    in_h: int = 0
    in_w: int = 0

    def shape(self, nbatch, m=None):
        if self.kind == "dense":
            return [self.fmt.digits, m, self.cp]
        if self.kind == "depthwise":
            return [nbatch, self.hp, self.wp, self.cp]
        return [self.fmt.digits, nbatch, self.hp, self.wp, self.cp]

    def zero_digits(self) -> list[int]:
        """The stored digit(s) of the integer 0 (float formats: [0])."""
        if self.fmt.kind == "f32":
            return [0]
        r = -self.fmt.offset
        if self.fmt.kind == "i16":
            return [r]
        if self.fmt.digits == 1:
            return [r]
        if self.fmt.kind == "u8":
            return [r & 255, r >> 8]
        lo = ((r + 128) & 255) - 128
        return [lo, (r - lo) >> 8]

    def tables(self):
        if self.act is None:
            return None
        return self.act.tables()

    def seg_table(self):
        """int32 [2, channels] (offset, position) of a segmented consumer operand, else None."""
        seg = self.fmt.segments
        return None if seg is None else seg.channel_table(self.channels)


def dtype_of(expr) -> str:
    """The dtype string of a TIR expression (e.g. ``"int32x16"``)."""
    return str(expr.ty.dtype)


def lanes_of(expr) -> int:
    d = dtype_of(expr)
    return int(d.split("x")[1]) if "x" in d else 1


def concat(vectors):
    """Concatenate equal-width vectors into one (a TIR Shuffle)."""
    from tvm import tirx  # noqa: PLC0415

    if len(vectors) == 1:
        return vectors[0]
    lanes = lanes_of(vectors[0])
    idx = [tirx.const(i, "int32") for i in range(lanes * len(vectors))]
    return tirx.Shuffle(list(vectors), idx)


def digit_expr(T, r, d: int, fmt: "ActFormat", lanes: int = 1):
    """TIR (IRBuilder) expression of digit ``d`` of ``r = v - offset`` (int32 scalar or vector)."""
    from tvm import tirx  # noqa: PLC0415

    def c(v):
        return T.broadcast(T.int32(v), lanes) if lanes > 1 else T.int32(v)

    dt = fmt.dtype if lanes == 1 else f"{fmt.dtype}x{lanes}"
    if fmt.kind == "i16" or fmt.digits == 1:
        return T.Cast(dt, r)
    if fmt.kind == "u8":
        return T.Cast(dt, tirx.bitwise_and(r, c(255)) if d == 0 else T.shift_right(r, c(8)))
    lo = tirx.bitwise_and(r + c(128), c(255)) - c(128)
    return T.Cast(dt, lo if d == 0 else T.shift_right(r - lo, c(8)))


def c64(v):
    from tvm import tirx  # noqa: PLC0415

    return tirx.const(int(v), "int64")


def ib():
    from tvm.script.ir_builder import IRBuilder  # noqa: PLC0415
    from tvm.script.ir_builder import tirx as T  # noqa: PLC0415

    return IRBuilder, T


# ===================================================================================== strategy
class Strategy:
    """One instruction set's inner loop for one weight group (subclassed in :mod:`.isa`).

    Attributes set by subclasses: ``fmt`` (:class:`ActFormat`), ``k_step`` (4: words; 1: fp32
    elements), ``flush_every`` (words between :meth:`flush` calls, None: never), ``regs``
    (vector registers of the machine), ``acc_regs`` (registers one (row, block) accumulator needs),
    ``w_regs`` (registers of one block's unpacked weights), ``a_regs`` (registers of one row's
    activation operand), ``note`` (None, or one line for the user on what would make this layer
    faster on this instruction set; ``compile`` prints it).
    """

    fmt: ActFormat = ActFormat("f32")
    k_step: int = WORD_K
    flush_every: int | None = None
    regs: int = 16
    acc_regs: int = 2
    w_regs: int = 2
    a_regs: int = 1
    max_mt: int = 8
    max_nt: int = 4
    note: str | None = None

    def __init__(self, op: LinearOp, group):
        self.op, self.g = op, group

    def kernel_k(self) -> int:
        """Reduction length of the packed weights (segmented: ``taps * width``)."""
        seg = self.fmt.segments
        if seg is None:
            return self.op.k_padded
        taps, _ = _taps_and_cp(self.op)
        return taps * seg.width

    def weight_shape(self) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of :meth:`pack`'s array."""
        a = self.pack(self.kernel_k())
        return a.shape, str(a.dtype)

    # ---- compile-time side
    def pack(self, kp: int) -> np.ndarray:
        """The group's weights in this strategy's layout."""
        raise NotImplementedError

    def kernel_codes(self) -> np.ndarray:
        """The group's codes in the kernel's reduction order (segmented: class-major)."""
        seg = self.fmt.segments
        if seg is None:
            return self.g.codes
        return segment_codes(self.op, self.g.codes, seg)

    def correction(self) -> np.ndarray | None:
        """Static int32 correction per row (``offset * sum_k q``; segmented: the classes' offsets
        weighted by ``2^(k_e - k_last)``), None when zero."""
        if self.op.mode != "int":
            return None
        seg = self.fmt.segments
        if seg is None:
            off = self.fmt.offset
            return off * self.g.code_sum() if off else None
        q = self.kernel_codes().astype(np.int64)
        out = np.zeros(q.shape[0], np.int64)
        last = seg.shifts[-1]
        for (w0, w1), e, off in zip(segment_k_ranges(self.op, seg), seg.shifts, seg.offsets):
            out += (off << (e - last)) * q[:, w0:w1].sum(axis=1)
        return out

    def shift(self, t, bits: int) -> None:
        """Multiply every int32 accumulator by ``2^bits`` (segmented reductions)."""
        raise NotImplementedError(f"{type(self).__name__} has no segmented reduction")

    # ---- int32 overflow: exact partial sums spilled into float accumulators
    def int_buffers(self, t) -> list:
        """The integer accumulator buffers (zeroed after a spill)."""
        out = []
        for key in ("acc", "a16", "a32"):
            out += t.state.get(key, [])
        return out

    def _digit_max(self) -> int:
        fmt, act = self.fmt, self.op.act
        if fmt.segments is not None:
            return 255
        vmin, vmax = act.value_range()
        return max(abs(vmin - fmt.offset), abs(vmax - fmt.offset))

    def int_bound(self) -> int:
        """Largest |int32 accumulator| over the reduction (before the offset correction)."""
        if self.op.mode != "int" or not self.g.quantized:
            return 0
        q = np.abs(self.kernel_codes().astype(np.float64))
        seg = self.fmt.segments
        if seg is None:
            return int(q.sum(axis=1).max() * self._digit_max())
        w = np.zeros(q.shape[1])
        for (k0, k1), e in zip(segment_k_ranges(self.op, seg), seg.shifts):
            w[k0:k1] = 255.0 * 2.0 ** (e - seg.shifts[-1])
        return int((q @ w).max())

    @property
    def spill_every(self) -> int | None:
        """Words between spills (None: the whole reduction fits int32)."""
        if not hasattr(self, "_spill"):
            self._spill = None
            if self.int_bound() > INT32_MAX_SAFE:
                qmax = int(np.abs(self.kernel_codes().astype(np.int64)).max()) or 1
                per_word = WORD_K * qmax * self._digit_max()
                self._spill = max(1, INT32_MAX_SAFE // per_word)
        return self._spill

    def flush_interval(self) -> int | None:
        vals = [v for v in (self.flush_every, self.spill_every) if v]
        return min(vals) if vals else None

    def flush_point(self, t) -> None:
        if self.flush_every:
            self.flush(t)
        if self.spill_every:
            self.spill(t)

    def begin_all(self, t) -> None:
        self.begin(t)
        if self.spill_every:
            t.state["facc"] = self.zero_acc(t, t.mtc * t.ntc, 16, "float32")

    def spill(self, t) -> None:
        T = t.T
        for mi in range(t.mtc):
            for nt in range(t.ntc):
                self.acc_add(t, t.state["facc"], mi * t.ntc + nt, 16, T.Cast("float32x16", self.result(t, mi, nt)))
        for b in self.int_buffers(t):
            lanes = int(b.shape[0])
            T.buffer_store(b, T.broadcast(t.tirx.const(0, str(b.dtype)), lanes), [T.ramp(0, 1, lanes)])

    def shift_all(self, t, bits: int) -> None:
        if not self.spill_every:
            self.shift(t, bits)
            return
        self.spill(t)  # the int32 accumulators are zero now: scale the float partial sums (exact)
        T = t.T
        for i in range(t.mtc * t.ntc):
            self.acc_set(t, t.state["facc"], i, 16, self.acc_get(t, t.state["facc"], i, 16)
                         * T.broadcast(T.float32(2.0 ** bits), 16))

    def final(self, t, mi: int, nt: int):
        r = self.result(t, mi, nt)
        if not self.spill_every:
            return r
        return self.acc_get(t, t.state["facc"], mi * t.ntc + nt, 16) + t.T.Cast("float32x16", r)

    def record8(self, t, W, nb, kw):
        """Record (block ``nb``, word ``kw``) of packed weights ``W`` as the 8-bit record of the same
        layout (a uint8 vector of the record's 64 codes), for the task's weight panel (see
        :func:`core_func`); None where this strategy's inner loop cannot run on such a panel. A
        strategy that supports it reads its records' storage bits from ``t.wbits``."""
        return None

    def tile(self, expected_rows: int) -> TileShape:
        """The largest register tile that fits (accumulators + live weights + activations),
        preferring more rows (weights are reused across rows)."""
        nb = self.g.n_blocks
        rows = max(1, int(expected_rows))
        best = None
        for nt in range(1, min(nb, self.max_nt) + 1):
            for mt in range(1, min(rows, self.max_mt) + 1):
                need = mt * nt * self.acc_regs + min(nt * self.w_regs, self.w_regs * 2) + mt * self.a_regs
                if need > self.regs - 1:
                    continue
                key = (mt * nt, mt)
                if best is None or key > best[0]:
                    best = (key, TileShape(mt, nt))
        return best[1] if best else TileShape(1, 1)

    # ---- TIR side (``t`` is a :class:`TileCtx`)
    def begin(self, t) -> None:
        raise NotImplementedError

    def word(self, t, kw, aload) -> None:
        raise NotImplementedError

    def flush(self, t) -> None:
        return None

    def result(self, t, mi: int, nt: int):
        raise NotImplementedError

    # helpers for subclasses: accumulators are one small stack buffer per vector (TVM lowers
    # "global" CPU allocations under 1 KiB to allocas, which LLVM keeps in registers; "local" ones
    # go to the heap through TVMBackendAllocWorkspace)
    @staticmethod
    def zero_acc(t, n_vectors: int, lanes: int, dtype: str):
        T, tirx = t.T, t.tirx
        z = T.broadcast(tirx.const(0, dtype), lanes)
        bufs = []
        for _ in range(n_vectors):
            b = T.alloc_buffer((lanes,), dtype, scope="global")
            T.buffer_store(b, z, [T.ramp(0, 1, lanes)])
            bufs.append(b)
        return bufs

    @staticmethod
    def acc_set(t, bufs, index: int, lanes: int, value):
        t.T.buffer_store(bufs[index], value, [t.T.ramp(0, 1, lanes)])

    @staticmethod
    def acc_add(t, bufs, index: int, lanes: int, value):
        T = t.T
        T.buffer_store(bufs[index], bufs[index][T.ramp(0, 1, lanes)] + value, [T.ramp(0, 1, lanes)])

    @staticmethod
    def acc_get(t, bufs, index: int, lanes: int):
        return bufs[index][t.T.ramp(0, 1, lanes)]

    @staticmethod
    def acc_cat(t, bufs, first: int, count: int, lanes: int):
        """``count`` consecutive accumulator vectors as one vector."""

        return concat([bufs[first + i][t.T.ramp(0, 1, lanes)] for i in range(count)])


# ===================================================================================== segments
def _taps_and_cp(op: LinearOp) -> tuple[int, int]:
    if op.kind == "dense":
        return 1, op.k
    cp = op.geom.cp if op.geom is not None else None
    if cp is None:
        from .problem import channel_pad  # noqa: PLC0415

        cp = channel_pad(op.channels, op.quantized)
    return op.k // cp, cp


def segment_codes(op: LinearOp, codes: np.ndarray, seg) -> np.ndarray:
    """Codes ``[n, taps * cp]`` (tap-major) reordered to ``[n, taps * width]``: class-major, then
    tap, then the class's channels padded to whole words."""
    taps, cp = _taps_and_cp(op)
    q = np.asarray(codes).reshape(codes.shape[0], taps, cp)
    parts = []
    for ch, sz in zip(seg.chans, seg.sizes):
        blk = np.zeros((q.shape[0], taps, sz), q.dtype)
        blk[:, :, :len(ch)] = q[:, :, list(ch)]
        parts.append(blk.reshape(q.shape[0], taps * sz))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def segment_k_ranges(op: LinearOp, seg) -> list[tuple[int, int]]:
    """[k0, k1) of each class in :func:`segment_codes`' order."""
    taps, _ = _taps_and_cp(op)
    out, k0 = [], 0
    for sz in seg.sizes:
        out.append((k0, k0 + taps * sz))
        k0 += taps * sz
    return out


# ===================================================================================== rows / layout
class Row:
    """Coordinates of one output row of a register tile."""

    def __init__(self, m, b=None, h=None, w=None, pix=None, h_out=None, w_out=None):
        self.m, self.b, self.h, self.w = m, b, h, w
        self.pix, self.h_out, self.w_out = pix, h_out, w_out


class Layout:
    """How the core addresses activations and outputs (see the module docstring)."""

    def __init__(self, op: LinearOp, fmt: ActFormat, direct_fp32: bool):
        self.op, self.geom, self.fmt = op, op.geom, fmt
        self.kind = "dense" if op.geom is None else "conv"
        self.direct = direct_fp32  # dense fp32: the core reads the layer input [m, k] itself

    def declare(self, T):
        from tvm import tirx  # noqa: PLC0415

        op, g = self.op, self.geom
        if self.kind == "dense":
            self.m = m = tirx.Var("m", "int64")
            self.nbatch = None
            if self.direct:
                self.A = T.arg("A", T.buffer((m, c64(op.k)), "float32"))
            else:
                self.A = T.arg("A", T.buffer((c64(self.fmt.digits), m, c64(self.fmt.channels(op.k_padded))),
                                             self.fmt.dtype))
        else:
            self.nbatch = nb = tirx.Var("n", "int64")
            self.m = nb * c64(g.out_h * g.out_w)
            sp = (c64(g.hp), c64(g.wp), c64(self.fmt.channels(g.cp)))
            self.A = T.arg("A", T.buffer((c64(self.fmt.digits), nb) + sp, self.fmt.dtype))

    @property
    def channels_last(self) -> bool:
        """Rows of the output are contiguous channel vectors (dense, or an NHWC conv)."""
        return self.kind == "dense" or self.geom.out_layout == "NHWC"

    def out_shape(self):
        if self.kind == "dense":
            return (self.m, c64(self.op.n_out))
        return tuple(c64(v) if isinstance(v, int) else v for v in self.geom.out_shape(self.nbatch))

    def res_shape(self):
        if self.kind == "dense":
            return self.out_shape()
        return tuple(c64(v) if isinstance(v, int) else v for v in self.geom.res_shape(self.nbatch))

    def row(self, T, tirx, m, b=None, pix=None):
        if self.kind == "dense":
            return Row(m)
        g = self.geom
        hw = g.out_h * g.out_w
        if b is None:
            b = T.Bind(tirx.floordiv(m, c64(hw)))
            pix = T.Bind(tirx.floormod(m, c64(hw)))
        oh = T.Bind(tirx.floordiv(pix, c64(g.out_w)))
        ow = T.Bind(tirx.floormod(pix, c64(g.out_w)))
        return Row(m, b, oh * c64(g.stride[0]), ow * c64(g.stride[1]), pix, oh, ow)

    def act_loader(self, T, tirx, kidx):
        """``aload(d, row, lanes=4, elem=0)`` for the word (or element) ``kidx``: dense ``kidx`` is
        the element offset; conv ``kidx = (ti, tj, c)`` (tap offsets, channel)."""
        dt = self.fmt.dtype

        def load(idx, lanes):
            return self.A.vload(idx, f"{dt}x{lanes}") if lanes > 1 else self.A[tuple(idx)]

        if self.kind == "dense":
            def aload(d, row, lanes=WORD_K, elem=0):
                if self.direct:
                    return load([row.m, kidx + c64(elem)], lanes)
                return load([c64(d), row.m, kidx + c64(elem)], lanes)
            return aload
        ti, tj, c = kidx

        def aload(d, row, lanes=WORD_K, elem=0):
            return load([c64(d), row.b, row.h + ti, row.w + tj, c + c64(elem)], lanes)
        return aload


# ===================================================================================== tile context
class TileCtx:
    """What a strategy sees while emitting one register tile."""

    def __init__(self, T, tirx, W, rows, nb0, ntc, strategy, panel=None):
        self.T, self.tirx, self.rows, self.nb0, self.ntc = T, tirx, rows, nb0, ntc
        self.mtc = len(rows)
        self.s = strategy
        # the weights the tile reads: the group's packed records (blocks nb0 ..), or the task's panel
        # of them unpacked to 8 bits (blocks 0 ..; ``wbits``: storage bits of the records read)
        self.W, self.wb0, self.wbits = (W, nb0, strategy.g.bits) if panel is None else (panel, c64(0), 8)
        self.state: dict = {}

    def block(self, nt):
        """Weight block of the tile's ``nt``-th 16 channels (in ``W``; the output block is ``nb0 + nt``)."""
        return self.wb0 + c64(nt)


# ===================================================================================== the core
def _task_plan(op: LinearOp, strategies, expected_rows: int):
    tiles = [s.tile(expected_rows) for s in strategies]
    n_tiles = [-(-g.n_blocks // t.nt) for g, t in zip(op.groups, tiles)]
    total_tiles = int(sum(n_tiles))
    rows = max(1, int(expected_rows))
    lcm = int(np.lcm.reduce([t.mt for t in tiles]))
    want_tasks = 8
    chunks = max(1, -(-want_tasks // total_tiles))
    rpt = -(-rows // chunks)
    rpt = max(lcm, -(-rpt // lcm) * lcm)
    rpt = min(rpt, max(lcm, (256 // lcm) * lcm))
    return tiles, n_tiles, rpt


# A task unpacks a group's sub-8-bit weights once into an 8-bit panel (nt blocks x all words) when
# its rows make at least this many register tiles (each tile otherwise unpacks every record again),
# and the panel is at most PANEL_MAX_BYTES. Measured (Intel Xeon, AVX-512 VNNI, 2 threads, 4-bit
# weights, 3x3 convs): 64 ch at 56x56 265 -> 204 us (8-bit: 198), 256 ch at 14x14 223 -> 190 us
# (8-bit: 182), the AVX2 build 610 -> 472 us; 64 ch at 8x8 (2 tiles a task) 8.5 -> 10.1 us: the
# panel's stores are not repaid below 3 tiles.
PANEL_MIN_TILES = 3
PANEL_MAX_BYTES = 512 * 1024


def panel_words(s: "Strategy", tile: TileShape, task_rows: int) -> int:
    """Words of the task's unpacked weight panel for strategy ``s`` (0: none, unpack in the tile)."""
    if s.g.bits >= 8 or not s.k_step == WORD_K or task_rows // tile.mt < PANEL_MIN_TILES:
        return 0
    if type(s).record8 is Strategy.record8:
        return 0
    words = s.kernel_k() // WORD_K
    if tile.nt * words * 4 * BLOCK_N > PANEL_MAX_BYTES:
        return 0
    return int(words)


def core_func(op: LinearOp, strategies: list[Strategy], expected_rows: int, name: str,
              fused: list[FusedOut] = (), emit_y: bool = True):
    """The GEMM core PrimFunc. Arguments: ``A`` (see :class:`Layout`), one weight array per group
    (each strategy's layout), ``epi`` float32 [2, NP] (row scale, row bias), ``corr`` int32 [NP]
    (int mode), ``oidx`` int32 [NP], ``obase`` int32 [NP / 16], the residual if fused, ``Y``.
    ``expected_rows``: rows of one call (a convolution: of one image) the tiling is chosen for."""
    from tvm import tirx  # noqa: PLC0415

    IRBuilder, T = ib()
    mode = op.mode
    fmt = strategies[0].fmt
    lay = Layout(op, fmt, direct_fp32=(mode == "fp32" and op.geom is None))
    per_image = op.geom.out_h * op.geom.out_w if op.geom is not None else None
    tiles, n_tiles, rpt = _task_plan(op, strategies, per_image or expected_rows)
    panels = [panel_words(s, t, min(rpt, per_image or expected_rows)) for s, t in zip(strategies, tiles)]
    tile_start = np.concatenate([[0], np.cumsum(n_tiles)]).astype(int)
    ntt = int(tile_start[-1])
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
            obase = T.arg("obase", T.buffer((c64(np_total // BLOCK_N),), "int32"))
            res = T.arg("residual", T.buffer(lay.res_shape(), "float32")) if op.residual else None
            ftabs, fouts = declare_fused(T, fused, lay.nbatch, lay.m)
            Y = T.arg("Y", T.buffer(lay.out_shape(), "float32")) if emit_y else None
            fbufs = fouts()
            size = None
            for dim in lay.out_shape():
                size = dim if size is None else size * dim
            Yf = T.decl_buffer((size,), "float32", data=Y.data) if Y is not None else None
            Rf = T.decl_buffer((size,), "float32", data=res.data) if res is not None else None
            epi_ctx = _Epilogue(T, tirx, op, lay, epi, corr, oidx, obase, Yf, Rf,
                                list(zip(fused, ftabs, fbufs)))
            fill_padding(T, tirx, fused, fbufs, lay.nbatch, lay.m)

            if per_image is None:
                m = lay.m
                n_chunks = tirx.floordiv(m + c64(rpt - 1), c64(rpt))
                n_tasks = n_chunks * c64(ntt)
            else:
                n_chunks_img = -(-per_image // rpt)
                n_tasks = lay.nbatch * c64(n_chunks_img * ntt)
            with T.parallel(c64(0), n_tasks) as task:
                chunk = T.Bind(tirx.floordiv(task, c64(ntt)))
                j = T.Bind(tirx.floormod(task, c64(ntt)))
                if per_image is None:
                    r0 = T.Bind(chunk * c64(rpt))
                    nrows = T.Bind(tirx.min(lay.m - r0, c64(rpt)))
                    img = None
                    p0 = None
                else:
                    img = T.Bind(tirx.floordiv(chunk, c64(n_chunks_img)))
                    p0 = T.Bind(tirx.floormod(chunk, c64(n_chunks_img)) * c64(rpt))
                    nrows = T.Bind(tirx.min(c64(per_image) - p0, c64(rpt)))
                    r0 = T.Bind(img * c64(per_image) + p0)
                for gi, s in enumerate(strategies):
                    t = tiles[gi]
                    g = op.groups[gi]
                    with T.If(tirx.all(j >= c64(tile_start[gi]), j < c64(tile_start[gi + 1]))):
                        with T.Then():
                            jt = T.Bind(j - c64(tile_start[gi]))
                            nb0 = T.Bind(jt * c64(t.nt))
                            full_tiles = g.n_blocks // t.nt
                            tail = g.n_blocks % t.nt
                            words = panels[gi]
                            P = T.alloc_buffer((t.nt, words, 4 * BLOCK_N), "uint8", scope="global") \
                                if words else None

                            def rows_loop(ntc, s=s, t=t, nb0=nb0, gi=gi, P=P, words=words):
                                if P is not None:
                                    # the task's weights unpacked once to 8-bit records, read by every row tile
                                    fill = TileCtx(T, tirx, W[gi], [], nb0, ntc, s)
                                    with T.serial(c64(0), c64(ntc)) as b:
                                        with T.serial(c64(0), c64(words)) as kw:
                                            T.buffer_store(P, s.record8(fill, W[gi], nb0 + b, kw),
                                                           [b, kw, T.ramp(c64(0), 1, 4 * BLOCK_N)])
                                nfull = T.Bind(tirx.floordiv(nrows, c64(t.mt)))

                                def one(off, mtc):
                                    rows = []
                                    for mi in range(mtc):
                                        mm = r0 + off + c64(mi)
                                        if img is None:
                                            rows.append(lay.row(T, tirx, mm))
                                        else:
                                            rows.append(lay.row(T, tirx, mm, img, p0 + off + c64(mi)))
                                    ctx = TileCtx(T, tirx, W[gi], rows, nb0, ntc, s, panel=P)
                                    _emit_tile(ctx, lay, op)
                                    epi_ctx.store(ctx, int(row_start[gi]), s)

                                with T.serial(c64(0), nfull) as it:
                                    one(it * c64(t.mt), t.mt)
                                # rows left over: chunks are multiples of mt except an image's (or
                                # the call's) last one
                                if t.mt > 1 and (per_image is None or (per_image % rpt) % t.mt):
                                    with T.serial(c64(0), tirx.floormod(nrows, c64(t.mt))) as ir:
                                        one(nfull * c64(t.mt) + ir, 1)

                            if tail == 0:
                                rows_loop(t.nt)
                            elif full_tiles == 0:
                                rows_loop(tail)
                            else:
                                with T.If(jt < c64(full_tiles)):
                                    with T.Then():
                                        rows_loop(t.nt)
                                    with T.Else():
                                        rows_loop(tail)
    return builder.get()


def _emit_tile(t: TileCtx, lay: Layout, op: LinearOp) -> None:
    """Accumulate one register tile over the whole reduction (segment by segment)."""
    s = t.s
    s.begin_all(t)
    step = s.k_step
    seg = s.fmt.segments
    if lay.kind == "dense":
        n = (op.k if lay.direct else op.k_padded) // step
        plan = [(0, n, 0)] if seg is None else \
            [(st // step, sz // step, st) for st, sz in zip(seg.starts, seg.sizes)]
    else:
        per_tap = lay.geom.cp // step
        plan = [(0, per_tap, 0)] if seg is None else \
            [(lay.geom.taps * st // step, sz // step, st) for st, sz in zip(seg.starts, seg.sizes)]
    for i, (w0, words, c0) in enumerate(plan):
        _emit_segment(t, lay, op, w0, words, c0)
        if s.flush_interval():
            s.flush_point(t)
        if seg is not None and i + 1 < len(plan):
            s.shift_all(t, seg.shifts[i] - seg.shifts[i + 1])


# A tap's flush chunks unrolled up to this many (resnet20's 64-channel convs at fe = 1: 16), a loop beyond
UNROLLED_CHUNKS = 16


def _emit_segment(t: TileCtx, lay: Layout, op: LinearOp, w0: int, words: int, c0: int) -> None:
    """Words ``w0 ..`` of the weights against activation channels from ``c0``: dense ``words``
    words; conv ``words`` words per tap. Flushes every ``flush_every`` words (the caller flushes
    after the segment)."""
    T, tirx, s = t.T, t.tirx, t.s
    step = s.k_step
    fe = s.flush_interval()

    def dense_words(first, count):
        with T.serial(c64(0), c64(count)) as wi:
            w = T.Bind(c64(first) + wi)
            s.word(t, T.Bind(c64(w0) + w), lay.act_loader(T, tirx, c64(c0) + w * c64(step)))

    if lay.kind == "dense":
        if fe and words > fe:
            full, rest = divmod(words, fe)
            with T.serial(c64(0), c64(full)) as ch:
                with T.serial(c64(0), c64(fe)) as wi:
                    w = T.Bind(ch * c64(fe) + wi)
                    s.word(t, T.Bind(c64(w0) + w), lay.act_loader(T, tirx, c64(c0) + w * c64(step)))
                s.flush_point(t)
            if rest:
                dense_words(full * fe, rest)
        else:
            dense_words(0, words)
        return
    g = lay.geom

    def tap_offsets(tap):
        ti = T.Bind(tirx.floordiv(tap, c64(g.kw)) * c64(g.dilation[0]))
        tj = T.Bind(tirx.floormod(tap, c64(g.kw)) * c64(g.dilation[1]))
        return ti, tj

    def tap_words(tap, first, count):
        ti, tj = tap_offsets(tap)
        with T.serial(c64(0), c64(count)) as wi:
            w = T.Bind(c64(first) + wi)
            kw = T.Bind(c64(w0) + tap * c64(words) + w)
            s.word(t, kw, lay.act_loader(T, tirx, (ti, tj, c64(c0) + w * c64(step))))

    if not fe:
        with T.serial(c64(0), c64(g.taps)) as tap:
            tap_words(tap, 0, words)
        return
    if words > fe and -(-words // fe) <= UNROLLED_CHUNKS:
        # flush inside a tap: the tap's words in chunks of ``fe``, unrolled
        with T.serial(c64(0), c64(g.taps)) as tap:
            for first in range(0, words, fe):
                tap_words(tap, first, min(fe, words - first))
                s.flush_point(t)
        return
    if words > fe:
        # more chunks: a loop over them (unrolled, the 240 chunks of MobileNetV2's 960-channel 1x1
        # convs at fe = 1 took 8 minutes to compile, and the model ran 1.3x slower, Zen 3)
        full, rest = divmod(words, fe)
        with T.serial(c64(0), c64(g.taps)) as tap:
            ti, tj = tap_offsets(tap)
            with T.serial(c64(0), c64(full)) as ch:
                with T.serial(c64(0), c64(fe)) as wi:
                    w = T.Bind(ch * c64(fe) + wi)
                    kw = T.Bind(c64(w0) + tap * c64(words) + w)
                    s.word(t, kw, lay.act_loader(T, tirx, (ti, tj, c64(c0) + w * c64(step))))
                s.flush_point(t)
            if rest:
                tap_words(tap, full * fe, rest)
                s.flush_point(t)
        return
    tpf = max(1, fe // words)  # taps between flushes
    full, rest = divmod(g.taps, tpf)
    if full:
        with T.serial(c64(0), c64(full)) as to:
            with T.serial(c64(0), c64(tpf)) as tin:
                tap_words(T.Bind(to * c64(tpf) + tin), 0, words)
            s.flush_point(t)
    if rest:
        with T.serial(c64(0), c64(rest)) as tin:
            tap_words(T.Bind(c64(full * tpf) + tin), 0, words)


class _Epilogue:
    """Scale + bias per channel, residual, ReLU, and the stores at the rows' original channels."""

    def __init__(self, T, tirx, op, lay, epi, corr, oidx, obase, Yf, Rf, fused=()):
        self.T, self.tirx, self.op, self.lay = T, tirx, op, lay
        self.epi, self.corr, self.oidx, self.obase, self.Yf, self.Rf = epi, corr, oidx, obase, Yf, Rf
        self.fused = list(fused)

    def _put(self, yidx, v, row, ch, lanes: int, along: str):
        """Store the final value(s) ``v``: ``lanes`` channels from ``ch`` (``along="c"``) or
        ``lanes`` consecutive pixels from ``row`` (``along="pix"``, NCHW tiles), to Y and to every
        fused output."""
        T, tirx = self.T, self.tirx
        if self.Yf is not None:
            T.buffer_store(self.Yf, v, [yidx])
        if not self.fused:
            return
        if along == "pix" and lanes > 1:
            tmp = T.alloc_buffer((lanes,), "float32", scope="global")
            T.buffer_store(tmp, v, [T.ramp(0, 1, lanes)])
            g = self.lay.geom
            for ln in range(lanes):
                pix = T.Bind(row.pix + c64(ln))
                r = Row(row.m + c64(ln), row.b, None, None, pix,
                        T.Bind(tirx.floordiv(pix, c64(g.out_w))), T.Bind(tirx.floormod(pix, c64(g.out_w))))
                for fo, tabs, buf in self.fused:
                    for d, val in enumerate(_quantize(T, tirx, fo, tabs, tmp[ln], ch, 1, "c")):
                        T.buffer_store(buf, val, _fused_index(T, fo, d, r, ch, 1, tabs))
            return
        put_fused(T, tirx, self.fused, v, row, ch, lanes)

    def _res_index(self, row, o, lanes: int, along: str):
        T, lay = self.T, self.lay
        n_out = c64(self.op.n_out)
        if lay.kind == "dense" or lay.geom.res_layout == "NHWC":
            base, step_c, step_pix = row.m * n_out + o, c64(1), n_out
        else:
            hw = c64(lay.geom.out_h * lay.geom.out_w)
            base, step_c, step_pix = (row.b * n_out + o) * hw + row.pix, hw, c64(1)
        if lanes == 1:
            return base
        return T.ramp(base, step_c if along == "c" else step_pix, lanes)

    def _finish(self, v, lanes: int, res_idx=None):
        if self.Rf is not None:
            v = v + self.Rf[res_idx]
        return tir_activate(self.T, self.tirx, self.op, v, lanes)

    def store(self, t: TileCtx, row0: int, s: Strategy) -> None:
        T, tirx, lay = self.T, self.tirx, self.lay
        rows, mtc, ntc = t.rows, t.mtc, t.ntc
        g = s.g
        for nt in range(ntc):
            pos = T.Bind(c64(row0) + (t.nb0 + c64(nt)) * c64(BLOCK_N))
            sc = self.epi[c64(0), T.ramp(pos, c64(1), 16)]
            bi = self.epi[c64(1), T.ramp(pos, c64(1), 16)]
            vals = []
            for mi in range(mtc):
                r = s.final(t, mi, nt)
                if self.corr is not None:
                    if dtype_of(r) == "float32x16":  # spilled partial sums: add the correction in float
                        r = r + T.Cast("float32x16", self.corr[T.ramp(pos, c64(1), 16)])
                    else:
                        r = T.Cast("float32x16", r + self.corr[T.ramp(pos, c64(1), 16)])
                elif dtype_of(r) != "float32x16":
                    r = T.Cast("float32x16", r)
                vals.append(r)
            if not lay.channels_last:
                geo = lay.geom
                hw = geo.out_h * geo.out_w
                fb = T.alloc_buffer((mtc * 16,), "float32", scope="global")
                for mi in range(mtc):
                    T.buffer_store(fb, vals[mi] * sc + bi, [T.ramp(mi * 16, 1, 16)])
                img = T.Bind(rows[0].b * c64(self.op.n_out))
                with T.serial(c64(0), c64(BLOCK_N)) as i:
                    o = T.Bind(T.Cast("int64", self.oidx[pos + i]))
                    with T.If(o >= c64(0)):
                        with T.Then():
                            base = (img + o) * c64(hw) + rows[0].pix
                            if mtc == 1:
                                idx, v = base, fb[i]
                            else:
                                idx, v = T.ramp(base, c64(1), mtc), fb[T.ramp(i, c64(16), mtc)]
                            ridx = self._res_index(rows[0], o, mtc, "pix") if self.Rf is not None else None
                            self._put(idx, T.Bind(self._finish(v, mtc, ridx)), rows[0], o, mtc, "pix")
                continue
            blk = T.Bind(pos // c64(BLOCK_N))
            ob = T.Bind(T.Cast("int64", self.obase[blk]))
            full_blocks = g.n // BLOCK_N  # only a group's last block has padded rows
            for mi in range(mtc):
                f = T.Bind(vals[mi] * sc + bi)
                rowbase = rows[mi].m * c64(self.op.n_out)
                with T.If(ob >= c64(0)):
                    with T.Then():
                        idx = T.ramp(rowbase + ob, c64(1), 16)
                        ridx = self._res_index(rows[mi], ob, 16, "c") if self.Rf is not None else None
                        self._put(idx, T.Bind(self._finish(f, 16, ridx)), rows[mi], ob, 16, "c")
                    with T.Else():
                        fb = T.alloc_buffer((16,), "float32", scope="global")
                        T.buffer_store(fb, f, [T.ramp(0, 1, 16)])

                        def scatter(guard, fb=fb, rowbase=rowbase, row=rows[mi], pos=pos):
                            with T.serial(c64(0), c64(BLOCK_N)) as i:
                                o = T.Bind(T.Cast("int64", self.oidx[pos + i]))

                                def put():
                                    ridx = self._res_index(row, o, 1, "c") if self.Rf is not None else None
                                    self._put(rowbase + o, T.Bind(self._finish(fb[i], 1, ridx)), row, o, 1, "c")
                                if guard:
                                    with T.If(o >= c64(0)):
                                        with T.Then():
                                            put()
                                else:
                                    put()

                        if full_blocks == 0:
                            scatter(True)
                        elif g.n % BLOCK_N == 0:
                            scatter(False)
                        else:
                            with T.If(t.nb0 + c64(nt) < c64(full_blocks)):
                                with T.Then():
                                    scatter(False)
                                with T.Else():
                                    scatter(True)


# ===================================================================================== fused outputs
def _quantize(T, tirx, fo: FusedOut, tabs, v, ch, lanes: int, along: str):
    """The consumer's stored digit(s) of final value(s) ``v`` (exactly the prologue's math)."""

    if tabs is None:
        return [v]
    fs, fi = tabs[0], tabs[1]

    def tab(buf, row_i, dtype):
        if lanes == 1 or along == "pix":  # one channel
            x = buf[c64(row_i), ch]
            return T.broadcast(x, lanes) if lanes > 1 else x
        return buf[c64(row_i), T.ramp(ch, c64(1), lanes)]

    fl = "float32" if lanes == 1 else f"float32x{lanes}"
    il = "int32" if lanes == 1 else f"int32x{lanes}"
    sc = tab(fs, 0, "float32")
    zp = tab(fi, 0, "int32")
    q = tirx.nearbyint(v / sc) + T.Cast(fl, zp)
    q = tirx.max(tirx.min(q, T.Cast(fl, tab(fi, 2, "int32"))), T.Cast(fl, tab(fi, 1, "int32")))
    if fo.fmt.kind == "f32":
        return [(q - T.Cast(fl, zp)) * sc]
    if fo.fmt.segments is not None:  # code relative to zp, minus the class offset
        r = T.Bind(T.Cast(il, q) - zp - tab(tabs[2], 0, "int32"))
        return [digit_expr(T, r, d, fo.fmt, lanes) for d in range(fo.fmt.digits)]
    r = T.shift_left(T.Cast(il, q) - zp, tab(fi, 3, "int32"))
    if fo.fmt.offset:
        off = T.int32(fo.fmt.offset)
        r = r - (T.broadcast(off, lanes) if lanes > 1 else off)
    r = T.Bind(r)
    return [digit_expr(T, r, d, fo.fmt, lanes) for d in range(fo.fmt.digits)]


def put_fused(T, tirx, fused, v, row, ch, lanes: int) -> None:
    """Quantize final values ``v`` (``lanes`` channels from ``ch`` of output row ``row``) into every
    fused output ``(FusedOut, tables, buffer)``; a segmented operand is written channel by channel
    (its channels are permuted by class)."""
    for fo, tabs, buf in fused:
        if fo.fmt.segments is None or lanes == 1:
            for d, val in enumerate(_quantize(T, tirx, fo, tabs, v, ch, lanes, "c")):
                T.buffer_store(buf, val, _fused_index(T, fo, d, row, ch, lanes, tabs))
            continue
        # quantize the whole vector, then put each lane at its channel's position
        for d, val in enumerate(_quantize(T, tirx, fo, tabs, v, ch, lanes, "c")):
            dig = T.alloc_buffer((lanes,), fo.fmt.dtype, scope="global")
            T.buffer_store(dig, val, [T.ramp(0, 1, lanes)])
            for ln in range(lanes):
                c = ch + c64(ln)
                T.buffer_store(buf, dig[ln], _fused_index(T, fo, d, row, c, 1, tabs))


def declare_fused(T, fused, nbatch, m=None):
    """Declare the fused outputs' table arguments (before the outputs) and return a function that
    declares the output buffers: ``tables = declare_fused(...)``, ``bufs = tables.outputs()``."""
    tabs = []
    for fi, fo in enumerate(fused):
        if fo.act is not None:
            t = (T.arg(f"F{fi}_scale", T.buffer((c64(1), c64(fo.channels)), "float32")),
                 T.arg(f"F{fi}_int", T.buffer((c64(4), c64(fo.channels)), "int32")))
            if fo.fmt.segments is not None:
                t = t + (T.arg(f"F{fi}_seg", T.buffer((c64(2), c64(fo.channels)), "int32")),)
            tabs.append(t)
        else:
            tabs.append(None)

    def outputs():
        return [T.arg(f"F{fi}", T.buffer(tuple(c64(d) if isinstance(d, int) else d for d in fo.shape(nbatch, m)),
                                         fo.fmt.dtype)) for fi, fo in enumerate(fused)]
    return tabs, outputs


def fill_padding(T, tirx, fused, bufs, nbatch, m=None) -> None:
    for fo, buf in zip(fused, bufs):
        _fill_padding(T, tirx, fo, buf, nbatch, m)


def _fused_index(T, fo: FusedOut, d: int, row, ch, lanes: int, tabs=None):
    """Index of ``lanes`` consecutive channels from ``ch`` of one output row in a fused output."""
    if fo.fmt.segments is not None:
        cidx = T.Cast("int64", tabs[2][c64(1), ch])  # the channel's position (lanes == 1)
    else:
        cidx = T.ramp(ch, c64(1), lanes) if lanes > 1 else ch
    if fo.kind == "dense":
        return [c64(d), row.m, cidx]
    h = row.h_out + c64(fo.top)
    w = row.w_out + c64(fo.left)
    if fo.kind == "depthwise":
        return [row.b, h, w, cidx]
    return [c64(d), row.b, h, w, cidx]


def _fill_padding(T, tirx, fo: FusedOut, buf, nbatch, rows) -> None:
    """Write the integer 0 into a fused output's halo and padded channels (serial; small)."""
    seg = fo.fmt.segments
    if seg is None:
        runs = [(0, fo.cp, fo.zero_digits(), fo.channels)]  # (start, end, zero digits, first pad)
    else:
        runs = []
        for st, sz, ch, off in zip(seg.starts, seg.sizes, seg.chans, seg.offsets):
            runs.append((st, st + sz, _digits_of(-off, fo.fmt), st + len(ch)))
    if fo.kind == "dense":
        for _, c1, zs, pad0 in runs:
            if c1 <= pad0:
                continue
            with T.serial(c64(0), rows) as m:
                with T.serial(c64(pad0), c64(c1)) as c:
                    for d, z in enumerate(zs):
                        T.buffer_store(buf, tirx.const(z, fo.fmt.dtype), [c64(d), m, c])
        return
    bottom = fo.top + fo.in_h
    right = fo.left + fo.in_w

    def put(b, h, w, interior: bool):
        for c0, c1, zs, pad0 in runs:
            lo = pad0 if interior else c0
            if c1 <= lo:
                continue
            with T.serial(c64(lo), c64(c1)) as c:
                for d, z in enumerate(zs):
                    idx = [b, h, w, c] if fo.kind == "depthwise" else [c64(d), b, h, w, c]
                    T.buffer_store(buf, tirx.const(z, fo.fmt.dtype), idx)

    padded_channels = any(c1 > pad0 for _, c1, _, pad0 in runs)
    with T.serial(c64(0), nbatch) as b:
        for h0, h1 in ((0, fo.top), (bottom, fo.hp)):
            if h1 > h0:
                with T.serial(c64(h0), c64(h1)) as h:
                    with T.serial(c64(0), c64(fo.wp)) as w:
                        put(b, h, w, False)
        if fo.left or right < fo.wp or padded_channels:
            with T.serial(c64(fo.top), c64(bottom)) as h:
                for w0, w1 in ((0, fo.left), (right, fo.wp)):
                    if w1 > w0:
                        with T.serial(c64(w0), c64(w1)) as w:
                            put(b, h, w, False)
                if padded_channels:
                    with T.serial(c64(fo.left), c64(right)) as w:
                        put(b, h, w, True)


def _digits_of(r: int, fmt: ActFormat) -> list[int]:
    if fmt.kind in ("i16", "f32") or fmt.digits == 1:
        return [r]
    if fmt.kind == "u8":
        return [r & 255, r >> 8]
    lo = ((r + 128) & 255) - 128
    return [lo, (r - lo) >> 8]


# ===================================================================================== row tables
def row_tables(op: LinearOp, strategies: list[Strategy]) -> dict[str, np.ndarray]:
    """Per padded row over the groups: ``epi`` (scale, bias), ``corr`` (int mode), ``oidx``,
    and per block ``obase`` (first channel of a block of 16 consecutive channels, else -1)."""
    bias = op.bias_or_zero()
    mode = op.mode
    s_act = np.float32(op.act.base_scale) if mode == "int" else np.float32(1)
    seg = strategies[0].fmt.segments
    if seg is not None:  # the last class's 2^k (exact: a power of two)
        s_act = np.float32(s_act * np.float32(2.0 ** seg.shifts[-1]))
    scales, biases, corr, oidx = [], [], [], []
    for g, s in zip(op.groups, strategies):
        npad = g.n_blocks * BLOCK_N
        sc = np.zeros(npad, np.float32)
        b = np.zeros(npad, np.float32)
        o = np.full(npad, -1, np.int32)
        cs = np.zeros(npad, np.int64)
        sc[: g.n] = g.scale * s_act
        b[: g.n] = bias[g.out_index]
        o[: g.n] = g.out_index
        c = s.correction()
        if c is not None:
            cs[: g.n] = c
        scales.append(sc)
        biases.append(b)
        oidx.append(o)
        corr.append(cs)
    epi = np.stack([np.concatenate(scales), np.concatenate(biases)]).astype(np.float32)
    corr_all = np.concatenate(corr)
    if any(s.spill_every for s in strategies) and corr_all.size and np.abs(corr_all).max() > INT32_MAX_SAFE:
        raise ValueError("the activation offset correction of a spilling layer exceeds int32")
    corr_all = ((corr_all + 2**31) % 2**32 - 2**31).astype(np.int32)  # int32 wraparound (exact mod 2^32)
    oidx_all = np.concatenate(oidx).astype(np.int32)
    blocks = oidx_all.reshape(-1, BLOCK_N)
    contiguous = np.all(blocks[:, 1:] - blocks[:, :1] == np.arange(1, BLOCK_N), axis=1) & (blocks[:, 0] >= 0)
    obase = np.where(contiguous, blocks[:, 0], -1).astype(np.int32)
    out = {"epi": np.ascontiguousarray(epi), "oidx": oidx_all, "obase": obase}
    if mode == "int":
        out["corr"] = corr_all
    return out


def core_args(op: LinearOp, strategies: list[Strategy]) -> list[np.ndarray]:
    """The constant arrays the core takes after ``A``: weights, epi, corr (int), oidx, obase."""
    arrs = [s.pack(s.kernel_k()) for s in strategies]
    tabs = row_tables(op, strategies)
    arrs.append(tabs["epi"])
    if "corr" in tabs:
        arrs.append(tabs["corr"])
    arrs += [tabs["oidx"], tabs["obase"]]
    return arrs
