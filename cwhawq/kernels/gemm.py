"""Packed low-bit dense kernels (TIR) and their schedules: y[m, o] = sum_k W[o, k] x[m, k] + b[o].

A quantized linear layer (:class:`LinearOp`) is one or more weight groups (one per storage
bit-width, packed by :mod:`cwhawq.kernels.packing`), per-row weight scales, a bias, the
destination channel of every row (the output-channel permutation, applied when the result is
stored, so it costs nothing at run time) and optionally the per-input-channel activation
quantizer (:class:`ActQuant`). It runs as two TIR functions:

``prologue``
    quantizes the input: ``q = clip(nearbyint(x / s_c) + zp_c, qmin_c, qmax_c)`` (what ONNX
    QuantizeLinear after the clipping Max/Min computes), forms the integer ``v = (q - zp_c) << k_c``
    on the layer's common grid ``s_c = S * 2^k_c`` and writes it as one or two int8 digits
    (``int8 [D, M, Kp]``) plus the row sums the packed arithmetic needs (see packing.py).
    Without a power-of-two grid (``free`` scales) it writes the dequantized floats instead.

``core``
    one kernel that walks all weight groups: a parallel loop over (row chunk, n-tile) tasks, each
    holding an ``MT x NT`` register tile of 16-lane int32 accumulators; the weights are unpacked in
    registers (one shift + one mask per 64 codes) and multiplied with int8 dot-product instructions,
    then rescaled once per output channel (``y = R * S * s_w[o] + b[o]``), optionally with a fused
    residual add and ReLU, and stored at the row's original channel.

Instruction sets (``isa``):

* ``x86_vnni``: AVX-512 VNNI ``vpdpbusd`` (u8 weights x s8 activation digits, 64 MACs per op);
* ``arm_dot``: aarch64 ``sdot`` (ARMv8.2 dotprod), four per 16x4 tile;
* ``generic``: portable int32 vector code (any LLVM target, e.g. Cortex-A72 / x86 without VNNI);
* ``cuda``: one thread per output channel and row, ``dp4a`` on 4-byte words.

Modes (:attr:`LinearOp.mode`): ``int`` (the fast path above), ``float`` (the fallback: packed
weights unpacked to float in registers, dequantized float activations; used for ``free``
activation scales or weight-only quantized layers) and ``fp32`` (plain float weights in a blocked
layout, for layers the plan keeps in fp32 and for fp32 models).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import packing
from .packing import BLOCK_N, WORD_K, PackedWeight

ISA_X86_VNNI = "x86_vnni"
ISA_ARM_DOT = "arm_dot"
ISA_GENERIC = "generic"
ISA_CUDA = "cuda"
ISAS = (ISA_X86_VNNI, ISA_ARM_DOT, ISA_GENERIC, ISA_CUDA)


def isa_for_target(target) -> str:
    """The kernel instruction set for a ``tvm.target.Target``."""
    from tvm.target import codegen  # noqa: PLC0415

    kind = target.kind.name
    if kind == "cuda":
        return ISA_CUDA
    if kind != "llvm":
        raise ValueError(f"no kernels for target kind {kind!r}")
    triple = str(target.attrs.get("mtriple", "") or "")
    try:
        if triple.startswith("aarch64"):
            return ISA_ARM_DOT if codegen.target_has_features("dotprod", target) else ISA_GENERIC
        if codegen.target_has_features("avx512vnni", target) and codegen.target_has_features("avx512bw", target):
            return ISA_X86_VNNI
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe gets the portable kernels
        return ISA_GENERIC
    return ISA_GENERIC


# ===================================================================================== problem
@dataclass
class ActQuant:
    """Per-input-channel activation quantizer (ONNX QuantizeLinear + DequantizeLinear, axis 1).

    ``q = clip(nearbyint(x / scale) + zero_point, qmin, qmax)``, dequantized ``(q - zero_point) * scale``.
    When every scale is ``base_scale * 2^shift`` (``shift`` >= 0 integers) the layer has a common
    integer grid and the integer kernels apply; otherwise ``shift`` is None.
    """

    scale: np.ndarray       # float32 [C]
    zero_point: np.ndarray  # int32 [C]
    qmin: np.ndarray        # int32 [C]
    qmax: np.ndarray        # int32 [C]
    shift: np.ndarray | None = None
    base_scale: float | None = None

    @classmethod
    def build(cls, scale, zero_point, qmin, qmax, channels: int) -> "ActQuant":
        """Broadcast per-tensor values to ``channels`` and detect the power-of-two grid."""
        def bc(a, dtype):
            return np.ascontiguousarray(np.broadcast_to(np.asarray(a).astype(dtype), (channels,)))

        s = bc(scale, np.float32)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError("activation scales must be positive and finite")
        zp, lo, hi = bc(zero_point, np.int64), bc(qmin, np.int64), bc(qmax, np.int64)
        if np.any(lo > hi):
            raise ValueError("empty activation code range")
        base = np.float32(s.min())
        ratio = s.astype(np.float64) / float(base)
        k = np.round(np.log2(ratio)).astype(np.int64)
        exact = np.all(k >= 0) and np.all(k <= 15) and np.array_equal(
            (base * np.exp2(k).astype(np.float32)).astype(np.float32), s)
        act = cls(s, zp.astype(np.int32), lo.astype(np.int32), hi.astype(np.int32))
        if exact:
            act.shift = k.astype(np.int32)
            act.base_scale = float(base)
            vmin, vmax = act.value_range()
            if vmin < -32768 or vmax > 32767:  # too wide for two digits: float path
                act.shift, act.base_scale = None, None
        return act

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def integer(self) -> bool:
        return self.shift is not None

    def value_range(self) -> tuple[int, int]:
        """Range of the integers ``v = (q - zp) << k`` over all channels."""
        sh = self.shift.astype(np.int64)
        lo = (self.qmin.astype(np.int64) - self.zero_point) << sh
        hi = (self.qmax.astype(np.int64) - self.zero_point) << sh
        return int(min(lo.min(), hi.min())), int(max(lo.max(), hi.max()))

    def digits(self) -> tuple[int, int]:
        """(number of int8 digits D, offset c) of the stored activation integers."""
        return packing.digits_needed(*self.value_range())

    def codes(self, x: np.ndarray, axis: int = 1) -> np.ndarray:
        """Reference integer codes q (int64) for float ``x`` with channels on ``axis``."""
        shape = [1] * x.ndim
        shape[axis] = -1
        q = np.rint(np.asarray(x, np.float32) / self.scale.reshape(shape)) + self.zero_point.reshape(shape)
        return np.clip(q, self.qmin.reshape(shape), self.qmax.reshape(shape)).astype(np.int64)

    def fake_quant(self, x: np.ndarray, axis: int = 1) -> np.ndarray:
        shape = [1] * x.ndim
        shape[axis] = -1
        q = self.codes(x, axis) - self.zero_point.reshape(shape)
        return (q.astype(np.float32) * self.scale.reshape(shape)).astype(np.float32)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel tables: float32 [1, C] (scale) and int32 [4, C] (zp, qmin, qmax, shift)."""
        sh = self.shift if self.shift is not None else np.zeros_like(self.zero_point)
        ints = np.stack([self.zero_point, self.qmin, self.qmax, sh]).astype(np.int32)
        return self.scale.reshape(1, -1).astype(np.float32), np.ascontiguousarray(ints)


@dataclass
class WeightGroup:
    """Rows of one storage width (or fp32 rows) with their scales and destination channels."""

    out_index: np.ndarray                 # int32 [n]: output channel of each row
    scale: np.ndarray                     # float32 [n]: per-row weight scale (1 for fp32 rows)
    packed: PackedWeight | None = None    # low-bit codes
    float_data: np.ndarray | None = None  # fp32 [NB, Kp, 16] (pack_float_weight)
    plan_bits: int | None = None          # bits the plan asked for (reporting)

    @property
    def n(self) -> int:
        return int(self.out_index.shape[0])

    @property
    def n_blocks(self) -> int:
        return self.packed.n_blocks if self.packed is not None else int(self.float_data.shape[0])

    @property
    def storage_bits(self) -> int:
        return self.packed.bits if self.packed is not None else 32

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes if self.packed is not None else int(self.float_data.nbytes)

    def dequantized(self) -> np.ndarray:
        """Float weights [n, k] of this group (reference)."""
        if self.packed is not None:
            return packing.unpack_weight(self.packed).astype(np.float32) * self.scale[:, None]
        kp = self.float_data.shape[1]
        return packing.unpack_float_weight(self.float_data, self.n, kp)


@dataclass
class LinearOp:
    """A (possibly quantized) linear map ``[M, k] -> [M, n_out]`` with its epilogue."""

    k: int
    n_out: int
    groups: list[WeightGroup]
    bias: np.ndarray | None = None   # float32 [n_out]
    act: ActQuant | None = None      # None: fp32 input
    relu: bool = False               # fused ReLU after the (optional) residual add
    residual: bool = False           # fused add of a tensor shaped like the output
    name: str = "linear"

    def __post_init__(self):
        if not self.groups:
            raise ValueError("a linear op needs at least one weight group")
        kinds = {g.packed is None for g in self.groups}
        if len(kinds) != 1:
            raise ValueError("weight groups must be all packed or all fp32")
        idx = np.concatenate([g.out_index for g in self.groups])
        if sorted(idx.tolist()) != list(range(self.n_out)):
            raise ValueError("group output channels must cover 0..n_out-1 exactly once")
        kps = {self.k_padded_of(g) for g in self.groups}
        if len(kps) != 1:
            raise ValueError("weight groups of one layer must share the padded k")

    @staticmethod
    def k_padded_of(g: WeightGroup) -> int:
        return g.packed.k_padded if g.packed is not None else int(g.float_data.shape[1])

    @property
    def k_padded(self) -> int:
        return self.k_padded_of(self.groups[0])

    @property
    def mode(self) -> str:
        if self.groups[0].packed is None:
            return "fp32"
        if self.act is not None and self.act.integer:
            return "int"
        return "float"

    @property
    def digits(self) -> tuple[int, int]:
        return self.act.digits() if self.mode == "int" else (0, 0)

    @property
    def weight_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def dense_weight(self) -> np.ndarray:
        """The float weight [n_out, k] in original channel order (reference)."""
        w = np.zeros((self.n_out, self.k), dtype=np.float32)
        for g in self.groups:
            w[g.out_index] = g.dequantized()[:, : self.k]
        return w

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """What onnxruntime computes for a dense layer on ``x [M, k]`` (float64 accumulation)."""
        xq = x if self.act is None else self.act.fake_quant(x, axis=1)
        y = xq.astype(np.float64) @ self.dense_weight().T.astype(np.float64)
        if self.bias is not None:
            y = y + self.bias
        if residual is not None:
            y = y + residual
        if self.relu:
            y = np.maximum(y, 0)
        return y.astype(np.float32)

    # ---- kernel tables
    def row_tables(self) -> dict[str, np.ndarray]:
        """Concatenated per-row tables over the groups' padded rows (see :func:`core_func`)."""
        bias = np.zeros(self.n_out, np.float32) if self.bias is None else self.bias.astype(np.float32)
        mode = self.mode
        d, c = self.digits
        scales, biases, corr, oidx = [], [], [], []
        for g in self.groups:
            npad = g.n_blocks * BLOCK_N
            s = np.zeros(npad, np.float32)
            b = np.zeros(npad, np.float32)
            o = np.full(npad, -1, np.int32)
            cs = np.zeros(npad, np.int64)
            s[: g.n] = g.scale * (np.float32(self.act.base_scale) if mode == "int" else np.float32(1))
            b[: g.n] = bias[g.out_index]
            o[: g.n] = g.out_index
            if mode == "int":
                cs = c * g.packed.code_sum.astype(np.int64)
            scales.append(s)
            biases.append(b)
            oidx.append(o)
            corr.append(cs)
        epi = np.stack([np.concatenate(scales), np.concatenate(biases)]).astype(np.float32)
        corr_all = np.concatenate(corr)
        corr_all = ((corr_all + 2**31) % 2**32 - 2**31).astype(np.int32)  # int32 wraparound
        oidx_all = np.concatenate(oidx).astype(np.int32)
        blocks = oidx_all.reshape(-1, BLOCK_N)
        contiguous = np.all(blocks[:, 1:] - blocks[:, :1] == np.arange(1, BLOCK_N), axis=1) & (blocks[:, 0] >= 0)
        obase = np.where(contiguous, blocks[:, 0], -1).astype(np.int32)
        return {"epi": np.ascontiguousarray(epi), "corr": corr_all, "oidx": oidx_all, "obase": obase}

    def cuda_corr(self) -> np.ndarray:
        """CUDA's unsigned dp4a sees digits + 128: its extra term per row, folded into corr."""
        d, _ = self.digits
        base = self.row_tables()["corr"].astype(np.int64)
        usum = []
        for g in self.groups:
            usum.append(g.packed.code_sum.astype(np.int64) + g.packed.zero * g.packed.k_padded)
        usum = np.concatenate(usum)
        scale = sum(256**j for j in range(d)) * 128
        out = base - scale * usum
        return ((out + 2**31) % 2**32 - 2**31).astype(np.int32)


# ===================================================================================== tiling
@dataclass(frozen=True)
class Tile:
    nt: int          # 16-channel blocks per register tile
    mt: int          # rows per register tile
    split: bool      # separate accumulators per packed sub-tile (breaks dependency chains)
    rows_per_task: int


def choose_tile(isa: str, mode: str, digits: int, pack: int, n_blocks: int, expected_rows: int,
                row_multiple: int | None = None) -> Tile:
    """Register tile and task size for a group (heuristics for 32 vector registers).

    ``row_multiple``: a number of rows every row count is a multiple of (``OH*OW`` for a conv,
    ``M`` for a fixed batch): a tile height dividing it needs no remainder code, and a conv tile
    then never straddles two images.
    """
    d = max(digits, 1)
    budget = 6 if isa == ISA_ARM_DOT else 16  # 16-lane accumulators (four NEON registers each on ARM)
    if mode == "fp32":
        pack = 1
    rows = max(1, int(expected_rows))
    if rows <= 2 and n_blocks >= 8 and isa != ISA_ARM_DOT:  # GEMV: wide n-tiles, split chains
        nt = 8 if pack == 1 else 4
        mt = 1 if rows == 1 or (row_multiple and row_multiple % 2) else rows
    else:
        best = (0, 0, 1, 1)
        for nt_ in range(1, min(n_blocks, 8) + 1):
            for mt_ in range(1, 9):
                if nt_ * mt_ * d > budget or mt_ > rows:
                    continue
                if row_multiple and row_multiple % mt_:
                    continue
                key = (nt_ * mt_, mt_)
                if key > best[:2]:
                    best = (nt_ * mt_, mt_, nt_, mt_)
        nt, mt = best[2], best[3]
    split = mode == "int" and pack > 1 and nt * mt * d * pack <= budget
    n_tiles = -(-n_blocks // nt)
    want_tasks = 8
    if n_tiles >= want_tasks:
        rpt = -(-rows // mt) * mt
        rpt = min(rpt, max(mt, 64 // mt * mt))
    else:
        chunks = -(-want_tasks // n_tiles)
        rpt = -(-rows // (mt * chunks)) * mt
    return Tile(nt=nt, mt=mt, split=split, rows_per_task=max(mt, rpt))


# ===================================================================================== prologue
def _te_act_value(x, c, fscale, itab):
    """TE expression of the activation integer v = (clip(rint(x / s) + zp, lo, hi) - zp) << k."""
    from tvm import te, tirx  # noqa: PLC0415

    q = tirx.nearbyint(x / fscale[0, c]) + itab[0, c].astype("float32")
    q = te.max(te.min(q, itab[2, c].astype("float32")), itab[1, c].astype("float32"))
    return (q.astype("int32") - itab[0, c]) << itab[3, c]


def _te_act_fake(x, c, fscale, itab):
    """Dequantized value of x (float path)."""
    from tvm import te, tirx  # noqa: PLC0415

    q = tirx.nearbyint(x / fscale[0, c]) + itab[0, c].astype("float32")
    q = te.max(te.min(q, itab[2, c].astype("float32")), itab[1, c].astype("float32"))
    return (q - itab[0, c].astype("float32")) * fscale[0, c]


def _te_digits(r, d: int, ndigits: int):
    """Digit d (int8) of the offset value r (int32) in the D-digit representation."""
    if ndigits == 1:
        return r.astype("int8")
    lo = ((r + 128) & 255) - 128
    if d == 0:
        return lo.astype("int8")
    return ((r - lo) >> 8).astype("int8")


def emit_digits(v_of, rows, op: LinearOp, name: str):
    """TE stages turning an int32 value function ``v_of(m, k)`` into (A digits, rowsum)."""
    from tvm import te, tirx  # noqa: PLC0415

    ndig, c = op.digits
    kp, k = op.k_padded, op.k
    r = te.compute((rows, kp), lambda m, kk: tirx.if_then_else(kk < k, v_of(m, kk) - c, 0), name=f"{name}_v")
    if ndig == 1:
        a = te.compute((1, rows, kp), lambda d, m, kk: r[m, kk].astype("int8"), name=f"{name}_a")
    else:
        a = te.compute((2, rows, kp), lambda d, m, kk: tirx.if_then_else(
            d == 0, _te_digits(r[m, kk], 0, 2), _te_digits(r[m, kk], 1, 2)), name=f"{name}_a")
    rk = te.reduce_axis((0, kp), name="rk")
    rowsum = te.compute((rows,), lambda m: te.sum(r[m, rk], axis=rk), name=f"{name}_rowsum")
    return a, rowsum


def schedule_prologue_cpu(func, parallel_rows: bool, vector: int = 16, inline: tuple[str, ...] = ()):
    """CPU schedule for a prologue PrimFunc: the blocks named in ``inline`` are inlined into their
    consumers, every other block gets its outer loops fused and parallel (when ``parallel_rows``)
    and its innermost loop vectorized; reductions are parallel over their spatial loops."""
    import tvm  # noqa: PLC0415
    from tvm import s_tir  # noqa: PLC0415

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for nm in inline:
        sch.compute_inline(sch.get_sblock(nm))
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        blk = sch.get(b)
        loops = sch.get_loops(b)
        if not loops:
            continue
        is_reduce = any(iv.iter_type == 2 for iv in blk.iter_vars)
        if is_reduce:
            spatial = [lp for lp, iv in zip(loops, blk.iter_vars) if iv.iter_type == 0]
            if parallel_rows and spatial:
                sch.parallel(spatial[0])
            continue
        if len(loops) > 1:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            inner = loops[-1]
        else:
            outer, inner = None, loops[0]
        ext = sch.get(inner).extent
        if isinstance(ext, tvm.tirx.IntImm):
            lanes = next((v for v in (vector, 8, 4) if v <= vector and ext.value % v == 0), None)
            if lanes is not None:
                _, vi = sch.split(inner, factors=[None, lanes])
                sch.vectorize(vi)
        if parallel_rows and outer is not None:
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


def dense_prologue_func(op: LinearOp, isa: str, expected_rows: int = 1):
    """TE prologue of a dense layer: x float32 [m, k] -> A (+ rowsum in int mode).

    Returns None when the core can read x directly (fp32 mode).
    """
    import tvm  # noqa: PLC0415
    from tvm import te, tirx  # noqa: PLC0415

    mode = op.mode
    if mode == "fp32":
        return None
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, op.k), "float32", name="x")
    kp, k = op.k_padded, op.k
    args = [x]
    if op.act is not None:
        fs = te.placeholder((1, op.k), "float32", name="act_scale")
        it = te.placeholder((4, op.k), "int32", name="act_int")
        args += [fs, it]
    if mode == "int":
        a, rowsum = emit_digits(lambda i, kk: _te_act_value(x[i, kk], kk, fs, it), m, op, "pro")
        outs = [a, rowsum]
    else:
        if op.act is not None:
            val = lambda i, kk: _te_act_fake(x[i, kk], kk, fs, it)  # noqa: E731
        else:
            val = lambda i, kk: x[i, kk]  # noqa: E731
        a = te.compute((m, kp), lambda i, kk: tirx.if_then_else(kk < k, val(i, kk), tvm.tirx.const(0, "float32")),
                       name="pro_a")
        outs = [a]
    func = te.create_prim_func(args + outs, index_dtype_override="int64")
    if isa == ISA_CUDA:
        return schedule_gpu_simple(func)
    return schedule_prologue_cpu(func, parallel_rows=expected_rows * kp >= 32768)


# ===================================================================================== core
def _ib():
    from tvm.script.ir_builder import IRBuilder  # noqa: PLC0415
    from tvm.script.ir_builder import tirx as T  # noqa: PLC0415

    return IRBuilder, T


def _c64(v):
    from tvm import tirx  # noqa: PLC0415

    return tirx.const(int(v), "int64")


class _Row:
    """Coordinates of one output row of a register tile."""

    def __init__(self, m, b=None, h=None, w=None):
        self.m, self.b, self.h, self.w = m, b, h, w


class _Layout:
    """How the core addresses activations, row sums and outputs.

    ``dense``: A ``[D, m, Kp]`` (int8 digits) or ``[m, Kp]`` / ``[m, k]`` (float), rowsum ``[m]``,
    Y ``[m, n_out]``. ``conv`` (implicit GEMM, no im2col): A ``[D, n, Hp, Wp, Cp]`` or
    ``[n, Hp, Wp, Cp]``: the input quantized to channels-last with its spatial padding applied;
    k runs over (tap, channel) with the channels padded to ``Cp`` per tap; the row sums come from
    per-pixel channel sums ``S [n, Hp, Wp]`` added over the taps; Y is NCHW ``[n, n_out, OH, OW]``.
    """

    def __init__(self, op, geom=None):
        self.op, self.geom = op, geom
        self.kind = "dense" if geom is None else "conv"

    # ---- arguments
    def declare(self, T, mode, ndig):
        op, g = self.op, self.geom
        from tvm import tirx  # noqa: PLC0415

        i64 = "int64"
        if self.kind == "dense":
            self.m = m = tirx.Var("m", i64)
            self.nbatch = None
            if mode == "int":
                self.A = T.arg("A", T.buffer((_c64(ndig), m, _c64(op.k_padded)), "int8"))
                self.S = T.arg("rowsum", T.buffer((m,), "int32"))
            else:
                kd = op.k if mode == "fp32" else op.k_padded
                self.A = T.arg("A", T.buffer((m, _c64(kd)), "float32"))
                self.S = None
        else:
            self.nbatch = nb = tirx.Var("n", i64)
            self.m = nb * _c64(g.out_h * g.out_w)
            sp = (_c64(g.hp), _c64(g.wp), _c64(g.cp))
            if mode == "int":
                self.A = T.arg("A", T.buffer((_c64(ndig), nb) + sp, "int8"))
                self.S = T.arg("rowsum", T.buffer((nb, _c64(g.out_h), _c64(g.out_w)), "int32"))
            else:
                self.A = T.arg("A", T.buffer((nb,) + sp, "float32"))
                self.S = None

    @property
    def channels_last(self) -> bool:
        """Rows of the output are contiguous 16-channel vectors (dense, or an NHWC conv)."""
        return self.kind == "dense" or self.geom.out_layout == "NHWC"

    def out_shape(self):
        if self.kind == "dense":
            return (self.m, _c64(self.op.n_out))
        return tuple(_c64(v) if isinstance(v, int) else v for v in self.geom.out_shape(self.nbatch))

    def res_index(self, row, o):
        if self.kind == "dense" or self.geom.res_layout == "NHWC":
            return self.out_index(row, o) if self.kind == "dense" else [row.b, row.h_out, row.w_out, o]
        return [row.b, o, row.h_out, row.w_out]

    def res_shape(self):
        if self.kind == "dense":
            return self.out_shape()
        return tuple(_c64(v) if isinstance(v, int) else v for v in self.geom.res_shape(self.nbatch))

    def out_index(self, row, o):
        if self.kind == "dense":
            return [row.m, o]
        if self.geom.out_layout == "NHWC":
            return [row.b, row.h_out, row.w_out, o]
        return [row.b, o, row.h_out, row.w_out]

    # ---- rows
    def row(self, T, tirx, m):
        if self.kind == "dense":
            return _Row(m)
        g = self.geom
        hw = g.out_h * g.out_w
        b = T.Bind(tirx.floordiv(m, _c64(hw)))
        pix = T.Bind(tirx.floormod(m, _c64(hw)))
        oh = T.Bind(tirx.floordiv(pix, _c64(g.out_w)))
        ow = T.Bind(tirx.floormod(pix, _c64(g.out_w)))
        r = _Row(m, b, oh * _c64(g.stride[0]), ow * _c64(g.stride[1]))
        r.h_out, r.w_out, r.pix = oh, ow, pix
        return r

    def rowsum(self, T, tirx, row):
        if self.kind == "dense":
            return self.S[row.m]
        return self.Sf[row.m]

    # ---- k loops
    def for_records(self, T, tirx, kg_n, pack, body):
        """Loop over packed records; ``body(kg, aload)`` with
        ``aload(d, row, p, j, lanes)`` loading activation word ``p`` (+ element j) of record kg."""
        if self.kind == "dense":
            with T.serial(_c64(0), _c64(kg_n)) as kg:
                def aload(d, row, p, j=0, lanes=4, kg=kg):
                    kk = (kg * _c64(pack) + _c64(p)) * _c64(WORD_K) + _c64(j)
                    idx = [row.m, kk] if d is None else [_c64(d), row.m, kk]
                    return self.A.vload(idx, f"int8x{lanes}") if lanes > 1 else self.A[tuple(idx)]
                body(kg, aload)
            return
        g = self.geom
        rpt = g.cp // (WORD_K * pack)
        with T.serial(_c64(0), _c64(g.kh * g.kw)) as t:
            ti = T.Bind(tirx.floordiv(t, _c64(g.kw)) * _c64(g.dilation[0]))
            tj = T.Bind(tirx.floormod(t, _c64(g.kw)) * _c64(g.dilation[1]))
            with T.serial(_c64(0), _c64(rpt)) as rc:
                kg = T.Bind(t * _c64(rpt) + rc)

                def aload(d, row, p, j=0, lanes=4, rc=rc, ti=ti, tj=tj):
                    c = (rc * _c64(pack) + _c64(p)) * _c64(WORD_K) + _c64(j)
                    idx = [row.b, row.h + ti, row.w + tj, c]
                    if d is not None:
                        idx = [_c64(d)] + idx
                    return self.A.vload(idx, f"int8x{lanes}") if lanes > 1 else self.A[tuple(idx)]
                body(kg, aload)

    def for_elems(self, T, tirx, body):
        """fp32 mode: loop over k elements; ``body(kidx, aload(row))``."""
        if self.kind == "dense":
            with T.serial(_c64(0), _c64(self.op.k)) as kk:
                body(kk, lambda row, kk=kk: self.A[row.m, kk])
            return
        g = self.geom
        with T.serial(_c64(0), _c64(g.kh * g.kw)) as t:
            ti = T.Bind(tirx.floordiv(t, _c64(g.kw)) * _c64(g.dilation[0]))
            tj = T.Bind(tirx.floormod(t, _c64(g.kw)) * _c64(g.dilation[1]))
            with T.serial(_c64(0), _c64(g.cp)) as c:
                body(t * _c64(g.cp) + c, lambda row, c=c, ti=ti, tj=tj: self.A[row.b, row.h + ti, row.w + tj, c])


def _declare_common(T, op, isa, lay, mode, ndig):
    lay.declare(T, mode, ndig)
    W = []
    for gi, g in enumerate(op.groups):
        arr = g.packed.data if g.packed is not None else g.float_data
        W.append(T.arg(f"W{gi}", T.buffer(tuple(_c64(s) for s in arr.shape), str(arr.dtype))))
    np_total = sum(g.n_blocks * BLOCK_N for g in op.groups)
    epi = T.arg("epi", T.buffer((_c64(2), _c64(np_total)), "float32"))
    corr = T.arg("corr", T.buffer((_c64(np_total),), "int32")) if mode == "int" else None
    oidx = T.arg("oidx", T.buffer((_c64(np_total),), "int32"))
    if isa != ISA_CUDA:
        lay.obase = T.arg("obase", T.buffer((_c64(np_total // BLOCK_N),), "int32"))
    res = T.arg("residual", T.buffer(lay.res_shape(), "float32")) if op.residual else None
    Y = T.arg("Y", T.buffer(lay.out_shape(), "float32"))
    size = None
    for dim in lay.out_shape():
        size = dim if size is None else size * dim
    # flat views (declared after every argument)
    if lay.kind == "conv" and lay.S is not None:
        lay.Sf = T.decl_buffer((lay.m,), "int32", data=lay.S.data)
    lay.Yf = T.decl_buffer((size,), "float32", data=Y.data)
    lay.Rf = T.decl_buffer((size,), "float32", data=res.data) if res is not None else None
    return W, epi, corr, oidx, res, Y


def core_func(op: LinearOp, isa: str, expected_rows: int, name: str, geom=None, rows_static: bool = False):
    """The GEMM core PrimFunc (see the module docstring and :class:`_Layout` for the arguments:
    activations, row sums (int mode), one weight array per group, ``epi`` float32 [2, NP] (row
    scale, row bias), ``corr`` int32 [NP] (int mode), ``oidx`` int32 [NP], the residual if fused,
    and the output)."""
    if isa == ISA_CUDA:
        return _core_func_cuda(op, name, geom)
    from tvm import tirx  # noqa: PLC0415

    IRBuilder, T = _ib()
    mode = op.mode
    ndig, _ = op.digits
    lay = _Layout(op, geom)
    row_multiple = geom.out_h * geom.out_w if geom is not None else (int(expected_rows) if rows_static else None)
    tiles = []
    for g in op.groups:
        pack = g.packed.pack if g.packed is not None else 1
        tiles.append(choose_tile(isa, mode, ndig, pack, g.n_blocks, expected_rows, row_multiple))
    # one task = one n-tile of one group over a chunk of rows; all groups share the row chunking
    lcm = int(np.lcm.reduce([t.mt for t in tiles]))
    rpt = max(t.rows_per_task for t in tiles)
    rpt = -(-rpt // lcm) * lcm
    n_tiles = [-(-g.n_blocks // t.nt) for g, t in zip(op.groups, tiles)]
    tile_start = np.concatenate([[0], np.cumsum(n_tiles)]).astype(int)
    ntt = int(tile_start[-1])
    row_start = np.concatenate([[0], np.cumsum([g.n_blocks * BLOCK_N for g in op.groups])]).astype(int)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
            W, epi, corr, oidx, res, Y = _declare_common(T, op, isa, lay, mode, ndig)
            m = lay.m
            n_chunks = tirx.floordiv(m + _c64(rpt - 1), _c64(rpt))
            with T.parallel(_c64(0), n_chunks * _c64(ntt)) as task:
                chunk = T.Bind(tirx.floordiv(task, _c64(ntt)))
                j = T.Bind(tirx.floormod(task, _c64(ntt)))
                r0 = T.Bind(chunk * _c64(rpt))
                nrows = T.Bind(tirx.min(m - r0, _c64(rpt)))
                for gi, g in enumerate(op.groups):
                    t = tiles[gi]
                    with T.If(tirx.all(j >= _c64(tile_start[gi]), j < _c64(tile_start[gi + 1]))):
                        with T.Then():
                            jt = T.Bind(j - _c64(tile_start[gi]))
                            nb0 = T.Bind(jt * _c64(t.nt))
                            full_tiles = g.n_blocks // t.nt
                            tail = g.n_blocks % t.nt
                            ctx = _CoreCtx(T, tirx, isa, mode, op, g, lay, W[gi], epi, corr, oidx, res, Y,
                                           int(row_start[gi]), ndig)

                            exact = row_multiple is not None and row_multiple % t.mt == 0

                            def rows_loop(ntc, ctx=ctx, t=t, nb0=nb0, exact=exact):
                                nfull = T.Bind(tirx.floordiv(nrows, _c64(t.mt)))
                                with T.serial(_c64(0), nfull) as it:
                                    ctx.tile(nb0, ntc, r0 + it * _c64(t.mt), t.mt, t.split)
                                if t.mt > 1 and not exact:  # rows left over when M % mt != 0
                                    with T.serial(_c64(0), tirx.floormod(nrows, _c64(t.mt))) as ir:
                                        ctx.tile(nb0, ntc, r0 + nfull * _c64(t.mt) + ir, 1, t.split)

                            if tail == 0:
                                rows_loop(t.nt)
                            elif full_tiles == 0:
                                rows_loop(tail)
                            else:
                                with T.If(jt < _c64(full_tiles)):
                                    with T.Then():
                                        rows_loop(t.nt)
                                    with T.Else():
                                        rows_loop(tail)
    return ib.get()


class _CoreCtx:
    """Emits one register tile of the CPU core (accumulate over k, then the epilogue)."""

    def __init__(self, T, tirx, isa, mode, op, g, lay, W, epi, corr, oidx, res, Y, row0, ndig):
        self.T, self.tirx, self.isa, self.mode, self.op, self.g, self.lay = T, tirx, isa, mode, op, g, lay
        self.W, self.epi, self.corr, self.oidx = W, epi, corr, oidx
        self.res, self.Y, self.row0, self.ndig = res, Y, row0, max(ndig, 1)

    def _unpack(self, wb, p: int, lanes: int):
        """Sub-tile p of a packed byte vector: one shift and one mask (none for the top field)."""
        T = self.T
        b, pack = self.g.packed.bits, self.g.packed.pack
        if pack == 1:
            return wb
        v = wb
        if p:
            v = T.shift_right(v, T.broadcast(T.uint8(p * b), lanes))
        if p != pack - 1:
            v = T.bitwise_and(v, T.broadcast(T.uint8((1 << b) - 1), lanes))
        return v

    def tile(self, nb0, ntc: int, m0, mtc: int, split: bool):
        rows = [self.lay.row(self.T, self.tirx, m0 + _c64(mi)) for mi in range(mtc)]
        if self.mode == "fp32":
            return self._tile_fp32(nb0, ntc, rows)
        return self._tile_packed(nb0, ntc, rows, split)

    def _tile_packed(self, nb0, ntc, rows, split):
        T, tirx = self.T, self.tirx
        g, isa, mode = self.g, self.isa, self.mode
        mtc = len(rows)
        pack = g.packed.pack
        kg_n = g.packed.data.shape[1]
        nd = self.ndig if mode == "int" else 1
        sp = pack if split else 1
        acc_dt = "int32" if mode == "int" else "float32"
        nacc = mtc * ntc * nd * sp
        acc = T.alloc_buffer((nacc * 16,), acc_dt, scope="local")

        def aidx(mi, nt, d, s):
            return (((mi * ntc + nt) * nd + d) * sp + s) * 16

        zero = T.broadcast(tirx.const(0, acc_dt), 16)
        for i in range(nacc):
            T.buffer_store(acc, zero, [T.ramp(i * 16, 1, 16)])

        def body(kg, aload):
            for nt in range(ntc):
                nb = nb0 + _c64(nt)
                if isa == ISA_X86_VNNI and mode == "int":
                    wb = T.Bind(self.W.vload([nb, kg, _c64(0)], "uint8x64"))
                    for p in range(pack):
                        w = T.Bind(self._unpack(wb, p, 64))
                        for mi in range(mtc):
                            for d in range(nd):
                                a4 = T.reinterpret("int32", aload(d, rows[mi], p))
                                a = T.reinterpret("int8x64", T.broadcast(a4, 16))
                                ix = aidx(mi, nt, d, p if split else 0)
                                T.buffer_store(acc, T.call_llvm_pure_intrin(
                                    "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[T.ramp(ix, 1, 16)], w, a),
                                    [T.ramp(ix, 1, 16)])
                elif isa == ISA_ARM_DOT and mode == "int":
                    for q4 in range(4):  # four sub-tiles of 4 channels x 4 k (16 bytes each)
                        wb = T.Bind(self.W.vload([nb, kg, _c64(16 * q4)], "uint8x16"))
                        for p in range(pack):
                            w = self._unpack(wb, p, 16)
                            if g.packed.bits == 8:  # u = q + 128: flipping the sign bit gives q as s8
                                w = T.bitwise_xor(w, T.broadcast(T.uint8(128), 16))
                            w = T.Bind(T.reinterpret("int8x16", w))
                            for mi in range(mtc):
                                for d in range(nd):
                                    a4 = T.reinterpret("int32", aload(d, rows[mi], p))
                                    a = T.reinterpret("int8x16", T.broadcast(a4, 4))
                                    ix = aidx(mi, nt, d, p if split else 0) + 4 * q4
                                    T.buffer_store(acc, T.call_llvm_pure_intrin(
                                        "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc[T.ramp(ix, 1, 4)], w, a),
                                        [T.ramp(ix, 1, 4)])
                else:  # portable int32 / float-unpack: one k of the word at a time over 16 lanes
                    for jj in range(WORD_K):
                        wb = T.Bind(self.W[nb, kg, T.ramp(_c64(jj), _c64(WORD_K), 16)])
                        for p in range(pack):
                            w8 = self._unpack(wb, p, 16)
                            if mode == "int":
                                w = T.Bind(T.Cast("int32x16", w8))
                            else:
                                w = T.Bind(T.Cast("float32x16", T.Cast("int32x16", w8)
                                                  - T.broadcast(T.int32(g.packed.zero), 16)))
                            for mi in range(mtc):
                                for d in range(nd):
                                    if mode == "int":
                                        av = T.Cast("int32", aload(d, rows[mi], p, jj, 1))
                                    else:
                                        av = aload(None, rows[mi], p, jj, 1)
                                    ix = aidx(mi, nt, d, p if split else 0)
                                    T.buffer_store(acc, acc[T.ramp(ix, 1, 16)] + w * T.broadcast(av, 16),
                                                   [T.ramp(ix, 1, 16)])

        self.lay.for_records(T, tirx, kg_n, pack, body)
        # ---- epilogue
        zeff = 0
        if mode == "int":
            zeff = g.packed.zero
            if isa == ISA_ARM_DOT and g.packed.bits == 8:
                zeff = 0
        vals = []
        for mi in range(mtc):
            rs = None
            if zeff:
                rs = T.Bind(self.lay.rowsum(T, tirx, rows[mi]) * T.int32(zeff))
            vals.append([])
            for nt in range(ntc):
                r = None
                for d in range(nd):
                    part = None
                    for s in range(sp):
                        v = acc[T.ramp(aidx(mi, nt, d, s), 1, 16)]
                        part = v if part is None else part + v
                    if d:
                        part = T.shift_left(part, T.broadcast(T.int32(8 * d), 16))
                    r = part if r is None else r + part
                pos = _c64(self.row0) + (nb0 + _c64(nt)) * _c64(BLOCK_N)
                if mode == "int":
                    if zeff:
                        r = r - T.broadcast(rs, 16)
                    r = T.Cast("float32x16", r + self.corr[T.ramp(pos, _c64(1), 16)])
                vals[mi].append(r)
        self._epilogue(vals, rows, nb0)

    def _tile_fp32(self, nb0, ntc, rows):
        T, tirx = self.T, self.tirx
        mtc = len(rows)
        acc = T.alloc_buffer((mtc * ntc * 16,), "float32", scope="local")
        zero = T.broadcast(T.float32(0), 16)
        for i in range(mtc * ntc):
            T.buffer_store(acc, zero, [T.ramp(i * 16, 1, 16)])

        def body(kidx, aload):
            for nt in range(ntc):
                w = T.Bind(self.W.vload([nb0 + _c64(nt), kidx, _c64(0)], "float32x16"))
                for mi in range(mtc):
                    ix = (mi * ntc + nt) * 16
                    T.buffer_store(acc, acc[T.ramp(ix, 1, 16)] + w * T.broadcast(aload(rows[mi]), 16),
                                   [T.ramp(ix, 1, 16)])

        self.lay.for_elems(T, tirx, body)
        self._epilogue([[acc[T.ramp((mi * ntc + nt) * 16, 1, 16)] for nt in range(ntc)] for mi in range(mtc)],
                       rows, nb0)

    def _res_index(self, row, o, lanes: int, along: str):
        """Flat index of the fused residual for ``lanes`` consecutive channels (``along="c"``) or
        pixels (``along="pix"``) starting at (row, channel o), in the residual's own layout."""
        T, lay = self.T, self.lay
        n_out = _c64(self.op.n_out)
        if lay.kind == "dense" or lay.geom.res_layout == "NHWC":
            base, step_c, step_pix = row.m * n_out + o, _c64(1), n_out
        else:
            hw = _c64(lay.geom.out_h * lay.geom.out_w)
            base, step_c, step_pix = (row.b * n_out + o) * hw + row.pix, hw, _c64(1)
        if lanes == 1:
            return base
        return T.ramp(base, step_c if along == "c" else step_pix, lanes)

    def _finish(self, v, lanes: int, res_idx=None):
        """Residual add (read at ``res_idx``) and ReLU of an output value or vector."""
        if self.res is not None:
            v = v + self.lay.Rf[res_idx]
        if self.op.relu:
            zero = self.T.float32(0) if lanes == 1 else self.T.broadcast(self.T.float32(0), lanes)
            v = self.tirx.max(v, zero)
        return v

    def _epilogue(self, vals, rows, nb0):
        """Scale + bias per channel, then the stores at the rows' original channels.

        NCHW conv output: the tile's rows are consecutive pixels of one image, so the tile is
        transposed in registers and each channel's ``mt`` pixels go out as one vector. Dense and
        NHWC conv output (channels contiguous per row): a block whose 16 rows are consecutive
        channels (``obase``) is one vector store; otherwise 16 scalar stores.
        """
        T, tirx, lay = self.T, self.tirx, self.lay
        mtc, ntc = len(vals), len(vals[0])
        for nt in range(ntc):
            pos = T.Bind(_c64(self.row0) + (nb0 + _c64(nt)) * _c64(BLOCK_N))
            sc = self.epi[_c64(0), T.ramp(pos, _c64(1), 16)]
            bi = self.epi[_c64(1), T.ramp(pos, _c64(1), 16)]
            if not lay.channels_last:
                g = lay.geom
                hw = g.out_h * g.out_w
                fb = T.alloc_buffer((mtc * 16,), "float32", scope="local")
                for mi in range(mtc):
                    T.buffer_store(fb, vals[mi][nt] * sc + bi, [T.ramp(mi * 16, 1, 16)])
                img = T.Bind(rows[0].b * _c64(self.op.n_out))
                with T.serial(_c64(0), _c64(BLOCK_N)) as i:
                    o = T.Bind(T.Cast("int64", self.oidx[pos + i]))
                    with T.If(o >= _c64(0)):
                        with T.Then():
                            base = (img + o) * _c64(hw) + rows[0].pix
                            if mtc == 1:
                                idx = base
                                v = fb[i]
                            else:
                                idx = T.ramp(base, _c64(1), mtc)
                                v = fb[T.ramp(i, _c64(16), mtc)]
                            ridx = self._res_index(rows[0], o, mtc, "pix") if self.res is not None else None
                            T.buffer_store(lay.Yf, self._finish(v, mtc, ridx), [idx])
                continue
            blk = T.Bind(pos // _c64(BLOCK_N))
            ob = T.Bind(T.Cast("int64", lay.obase[blk]))
            for mi in range(mtc):
                f = T.Bind(vals[mi][nt] * sc + bi)
                rowbase = rows[mi].m * _c64(self.op.n_out)
                with T.If(ob >= _c64(0)):
                    with T.Then():
                        idx = T.ramp(rowbase + ob, _c64(1), 16)
                        ridx = self._res_index(rows[mi], ob, 16, "c") if self.res is not None else None
                        T.buffer_store(lay.Yf, self._finish(f, 16, ridx), [idx])
                    with T.Else():
                        fb = T.alloc_buffer((16,), "float32", scope="local")
                        T.buffer_store(fb, f, [T.ramp(0, 1, 16)])

                        def scatter(guard, fb=fb, rowbase=rowbase, row=rows[mi], pos=pos):
                            with T.serial(_c64(0), _c64(BLOCK_N)) as i:
                                o = T.Bind(T.Cast("int64", self.oidx[pos + i]))

                                def store():
                                    ridx = self._res_index(row, o, 1, "c") if self.res is not None else None
                                    T.buffer_store(lay.Yf, self._finish(fb[i], 1, ridx), [rowbase + o])
                                if guard:
                                    with T.If(o >= _c64(0)):
                                        with T.Then():
                                            store()
                                else:
                                    store()

                        full_blocks = self.g.n // BLOCK_N  # only a group's last block has padded rows
                        if full_blocks == 0:
                            scatter(True)
                        elif self.g.n % BLOCK_N == 0:
                            scatter(False)
                        else:
                            with T.If(nb0 + _c64(nt) < _c64(full_blocks)):
                                with T.Then():
                                    scatter(False)
                                with T.Else():
                                    scatter(True)


# ===================================================================================== core (CUDA)
def _core_func_cuda(op: LinearOp, name: str, geom=None):
    """CUDA core: a thread per (row, channel); 64 threads = four 16-channel blocks of one group;
    grid (block groups, rows). Packed weights: ``dp4a`` on 4-byte words (unsigned: the activation
    digits are biased by 128 with one XOR and the bias folded into ``corr``)."""
    from tvm import tirx  # noqa: PLC0415

    IRBuilder, T = _ib()
    mode = op.mode
    ndig, _ = op.digits
    lay = _Layout(op, geom)
    bpb = 4
    gblocks = [-(-g.n_blocks // bpb) for g in op.groups]
    gstart = np.concatenate([[0], np.cumsum(gblocks)]).astype(int)
    row_start = np.concatenate([[0], np.cumsum([g.n_blocks * BLOCK_N for g in op.groups])]).astype(int)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
            W, epi, corr, oidx, res, Y = _declare_common(T, op, ISA_CUDA, lay, mode, ndig)
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
                                    with T.If(nb < _c64(g.n_blocks)):
                                        with T.Then():
                                            _cuda_thread(T, tirx, op, g, mode, ndig, lay, W[gi], row, lane, nb,
                                                         epi, corr, oidx, res, Y, int(row_start[gi]))
    return ib.get()


def _cuda_thread(T, tirx, op, g, mode, ndig, lay, W, row, lane, nb, epi, corr, oidx, res, Y, row0):
    pos = T.Bind(_c64(row0) + nb * _c64(BLOCK_N) + lane)
    if mode == "int":
        accs = [T.alloc_buffer((1,), "uint32", scope="local") for _ in range(ndig)]
        for a in accs:
            T.buffer_store(a, T.uint32(0), [0])
        pack, b = g.packed.pack, g.packed.bits
        mask = (1 << b) - 1
        maskw = sum(mask << (8 * i) for i in range(4))

        def body(kg, aload):
            word = T.Bind(T.reinterpret("uint32", W.vload([nb, kg, lane * _c64(4)], "uint8x4")))
            for p in range(pack):
                u = word
                if p:
                    u = T.shift_right(u, T.uint32(p * b))
                if pack > 1:
                    u = T.bitwise_and(u, T.uint32(maskw))
                u = T.Bind(u)
                for d in range(ndig):
                    aw = T.bitwise_xor(T.reinterpret("uint32", aload(d, row, p)), T.uint32(0x80808080))
                    T.buffer_store(accs[d], T.call_pure_extern("uint32", "__dp4a", u, aw, accs[d][0]), [0])

        lay.for_records(T, tirx, g.packed.data.shape[1], pack, body)
        r = None
        for d in range(ndig):
            v = T.reinterpret("int32", accs[d][0])
            if d:
                v = T.shift_left(v, T.int32(8 * d))
            r = v if r is None else r + v
        r = r - lay.rowsum(T, tirx, row) * T.int32(g.packed.zero) + corr[pos]
        f = T.Cast("float32", r)
    else:
        acc = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(acc, T.float32(0), [0])
        if mode == "fp32":
            lay.for_elems(T, tirx, lambda kidx, aload: T.buffer_store(
                acc, acc[0] + W[nb, kidx, lane] * aload(row), [0]))
        else:
            pack, b = g.packed.pack, g.packed.bits

            def body(kg, aload):
                for jj in range(WORD_K):
                    byte = T.Bind(W[nb, kg, lane * _c64(4) + _c64(jj)])
                    for p in range(pack):
                        u = byte
                        if p:
                            u = T.shift_right(u, T.uint8(p * b))
                        if pack > 1:
                            u = T.bitwise_and(u, T.uint8((1 << b) - 1))
                        wv = T.Cast("float32", T.Cast("int32", u) - T.int32(g.packed.zero))
                        T.buffer_store(acc, acc[0] + wv * aload(None, row, p, jj, 1), [0])

            lay.for_records(T, tirx, g.packed.data.shape[1], pack, body)
        f = acc[0]
    f = f * epi[_c64(0), pos] + epi[_c64(1), pos]
    o = T.Bind(T.Cast("int64", oidx[pos]))
    with T.If(o >= _c64(0)):
        with T.Then():
            idx = lay.out_index(row, o)
            val = f
            if res is not None:
                val = val + res[tuple(lay.res_index(row, o))]
            if op.relu:
                val = tirx.max(val, T.float32(0))
            T.buffer_store(Y, val, idx)


# ===================================================================================== relax
def weight_args(op: LinearOp, isa: str) -> list[np.ndarray]:
    """The constant arrays the core takes after A (and rowsum): weights, epi, corr, oidx."""
    tabs = op.row_tables()
    arrs = [g.packed.data if g.packed is not None else g.float_data for g in op.groups]
    arrs.append(tabs["epi"])
    if op.mode == "int":
        arrs.append(op.cuda_corr() if isa == ISA_CUDA else tabs["corr"])
    arrs.append(tabs["oidx"])
    if isa != ISA_CUDA:
        arrs.append(tabs["obase"])
    return arrs


def emit_core(bb, op: LinearOp, isa: str, a_args: list, out_shape, expected_rows: int, name: str,
              residual=None, geom=None, rows_static: bool = False):
    """Add the core PrimFunc to ``bb`` and emit its call; returns the output Relax var."""
    from tvm import relax  # noqa: PLC0415

    gv = add_func(bb, core_func(op, isa, expected_rows, name, geom, rows_static), name)
    args = list(a_args) + [relax.const(a) for a in weight_args(op, isa)]
    if op.residual:
        if residual is None:
            raise ValueError("fused residual requested but no residual tensor given")
        args.append(residual)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def emit_linear(bb, x, op: LinearOp, isa: str, expected_rows: int = 1, residual=None, name: str | None = None):
    """Emit a dense layer on the Relax var ``x`` (float32 [M, k]); returns the output var."""
    from tvm import relax  # noqa: PLC0415

    name = name or _sym(op.name)
    rows = list(x.ty.shape)[0]
    mode = op.mode
    if mode == "fp32":
        a_args = [x]
    else:
        gv = add_func(bb, dense_prologue_func(op, isa, expected_rows), f"{name}_pro")
        args = [x]
        if op.act is not None:
            fs, it = op.act.tables()
            args += [relax.const(fs), relax.const(it)]
        if mode == "int":
            ndig, _ = op.digits
            outs = [relax.TensorType([ndig, rows, op.k_padded], "int8"), relax.TensorType([rows], "int32")]
            t = bb.emit(relax.call_tir(gv, args, outs))
            a_args = [bb.emit(relax.TupleGetItem(t, 0)), bb.emit(relax.TupleGetItem(t, 1))]
        else:
            a_args = [bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, op.k_padded], "float32")))]
    from tvm import tirx  # noqa: PLC0415

    static = isinstance(rows, (int, tirx.IntImm))
    return emit_core(bb, op, isa, a_args, [rows, op.n_out], int(rows) if static else expected_rows,
                     f"{name}_core", residual, rows_static=static)


OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque: our kernels are never fused with other ops


def add_func(bb, func, name: str):
    """Add a PrimFunc to the BlockBuilder under its own global symbol, marked opaque so Relax's
    operator fusion leaves it alone; returns the GlobalVar."""
    func = func.with_attr("global_symbol", name).with_attr("op_pattern", OPAQUE_PATTERN)
    return bb.add_func(func, name)


def _sym(name: str) -> str:
    out = "".join(ch if ch.isalnum() else "_" for ch in name)
    return ("k_" + out) if not out[:1].isalpha() else out


def linear_module(op: LinearOp, isa: str, batch: int | str = "n", residual: bool = False):
    """A Relax IRModule ``main(x[, residual]) -> y`` running one dense layer (tests, benchmarks)."""
    from tvm import relax, tirx  # noqa: PLC0415

    rows = tirx.Var(batch, "int64") if isinstance(batch, str) else batch
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([rows, op.k], "float32"))
    params = [x]
    res = None
    if residual:
        res = relax.Var("residual", relax.TensorType([rows, op.n_out], "float32"))
        params.append(res)
    with bb.function("main", params):
        with bb.dataflow():
            y = emit_linear(bb, x, op, isa, expected_rows=rows if isinstance(rows, int) else 1, residual=res)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()
