"""What a kernel computes, independent of any instruction set (numpy only).

A quantized linear layer (:class:`LinearOp`, a dense layer or a convolution as implicit GEMM
with :class:`ConvGeom`) is one or more weight groups (:class:`WeightGroup`: the integer codes of
the rows stored at one width, or fp32 rows), per-row weight scales, a bias, the destination
channel of every row (the plan's output-channel permutation, applied when the result is stored,
so it costs nothing at run time), the per-input-channel activation quantizer (:class:`ActQuant`)
and a fused epilogue (residual add, ReLU). Every instruction-set module
(:mod:`cwhawq.kernels.isa`) packs the codes in its own layout and computes exactly
:meth:`LinearOp.reference` (the integer paths bit-exactly up to the final float rescale), which is
what onnxruntime computes for the exported QDQ graph.

Integer semantics
    ``q = clip(nearbyint(x / s_c) + zp_c, qmin_c, qmax_c)`` per input channel (ONNX
    QuantizeLinear after the exporter's clipping Max/Min), ``v = (q - zp_c) << k_c`` on the layer's
    grid ``s_c = S * 2^k_c``, ``y[m, o] = S * s_w[o] * sum_k q_w[o, k] v[m, k] + b[o]``. The sum is
    exact in int32 when its bound (``Strategy.int_bound``) is below 2^31; otherwise the kernels add
    exact int32 partial sums of bounded chunks of the reduction into float accumulators.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import packing
from .packing import BLOCK_N, WORD_K

INT32_MAX = 2**31 - 1


# ===================================================================================== activations
@dataclass
class ActQuant:
    """Per-input-channel activation quantizer (ONNX QuantizeLinear + DequantizeLinear, axis 1).

    ``q = clip(nearbyint(x / scale) + zero_point, qmin, qmax)``, dequantized ``(q - zero_point) * scale``.
    When every scale is ``base_scale * 2^shift`` (``shift`` >= 0 integers) the layer has a common
    integer grid and the integer kernels apply; otherwise ``shift`` is None.

    ``dq_scale`` (None: the same as ``scale``) is the DequantizeLinear's scale when it differs from
    the QuantizeLinear's: the codes come from ``scale``, the layer reads ``(q - zero_point) *
    dq_scale``. The exporter's ``migrate`` activation scales write ``dq_scale = S`` for every channel
    (the exponents of ``scale = S * 2^k`` moved into the consumer's weights), so the integer grid is
    that of ``dq_scale`` and 8-bit codes stay one 8-bit digit. Only integer grids are accepted then.
    """

    scale: np.ndarray       # float32 [C]
    zero_point: np.ndarray  # int32 [C]
    qmin: np.ndarray        # int32 [C]
    qmax: np.ndarray        # int32 [C]
    shift: np.ndarray | None = None
    base_scale: float | None = None
    dq_scale: np.ndarray | None = None   # float32 [C], when the dequantization scale differs

    @classmethod
    def build(cls, scale, zero_point, qmin, qmax, channels: int, dq_scale=None) -> "ActQuant":
        """Broadcast per-tensor values to ``channels`` and detect the power-of-two grid (of the
        dequantization scale)."""
        def bc(a, dtype):
            return np.ascontiguousarray(np.broadcast_to(np.asarray(a).astype(dtype), (channels,)))

        s = bc(scale, np.float32)
        sd = s if dq_scale is None else bc(dq_scale, np.float32)
        if not np.all(np.isfinite(s)) or np.any(s <= 0) or not np.all(np.isfinite(sd)) or np.any(sd <= 0):
            raise ValueError("activation scales must be positive and finite")
        zp, lo, hi = bc(zero_point, np.int64), bc(qmin, np.int64), bc(qmax, np.int64)
        if np.any(lo > hi):
            raise ValueError("empty activation code range")
        base = np.float32(sd.min())
        ratio = sd.astype(np.float64) / float(base)
        k = np.round(np.log2(ratio)).astype(np.int64)
        exact = np.all(k >= 0) and np.all(k <= 15) and np.array_equal(
            (base * np.exp2(k).astype(np.float32)).astype(np.float32), sd)
        act = cls(s, zp.astype(np.int32), lo.astype(np.int32), hi.astype(np.int32))
        if dq_scale is not None and not np.array_equal(sd, s):
            act.dq_scale = sd
        if exact:
            act.shift = k.astype(np.int32)
            act.base_scale = float(base)
            vmin, vmax = act.value_range()
            if vmin < -32768 or vmax > 32767:  # not an int16: float path
                act.shift, act.base_scale = None, None
        if act.dq_scale is not None and act.shift is None:
            raise ValueError("a dequantization scale other than the quantization scale needs a power-of-two grid")
        return act

    @property
    def dequant_scale(self) -> np.ndarray:
        """The scale the layer's input is dequantized with (float32 [C])."""
        return self.scale if self.dq_scale is None else self.dq_scale

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def integer(self) -> bool:
        return self.shift is not None

    def channel_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (min, max) of the integers ``v = (q - zp) << k`` (int64 [C] each)."""
        sh = self.shift.astype(np.int64)
        lo = (self.qmin.astype(np.int64) - self.zero_point) << sh
        hi = (self.qmax.astype(np.int64) - self.zero_point) << sh
        return np.minimum(lo, hi), np.maximum(lo, hi)

    def value_range(self) -> tuple[int, int]:
        """Range of the integers ``v = (q - zp) << k`` over all channels, and 0 (the padding)."""
        lo, hi = self.channel_ranges()
        return min(int(lo.min()), 0), max(int(hi.max()), 0)

    def digits(self) -> tuple[int, int]:
        """(number of signed int8 digits D, offset c) of the activation integers (see
        :func:`cwhawq.kernels.packing.digits_needed`)."""
        return packing.digits_needed(*self.value_range())

    def unsigned_digits(self) -> tuple[int, int]:
        """(number of uint8 digits D, offset c): ``v - c = sum_j 256^j d_j`` with ``d_j`` in
        0..255, ``c = vmin`` (for instructions whose activation operand is unsigned)."""
        vmin, vmax = self.value_range()
        return (1 if vmax - vmin <= 255 else 2), vmin

    def segments(self, unsigned: bool) -> Segments | None:
        """The exponent classes (see :class:`Segments`) with one digit each (``unsigned``: uint8
        digits ``0..255``; else int8), or None when a class's codes span more than 256 values or
        there is only one class (nothing to gain)."""
        if not self.integer:
            return None
        sh = self.shift.astype(np.int64)
        lo_c = self.qmin.astype(np.int64) - self.zero_point
        hi_c = self.qmax.astype(np.int64) - self.zero_point
        classes = sorted(set(sh.tolist()), reverse=True)
        if len(classes) < 2:
            return None
        chans, offs = [], []
        for e in classes:
            idx = np.nonzero(sh == e)[0]
            lo = min(int(lo_c[idx].min()), 0)
            hi = max(int(hi_c[idx].max()), 0)
            if hi - lo > 255:
                return None
            if unsigned:
                off = lo
            else:
                off = 0 if (lo >= -128 and hi <= 127) else lo + 128
            chans.append(tuple(int(i) for i in idx))
            offs.append(off)
        return Segments(tuple(classes), tuple(chans), tuple(offs))

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
        return (q.astype(np.float32) * self.dequant_scale.reshape(shape)).astype(np.float32)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel tables: float32 [1, C] (scale) and int32 [4, C] (zp, qmin, qmax, shift)."""
        sh = self.shift if self.shift is not None else np.zeros_like(self.zero_point)
        ints = np.stack([self.zero_point, self.qmin, self.qmax, sh]).astype(np.int32)
        return self.scale.reshape(1, -1).astype(np.float32), np.ascontiguousarray(ints)


@dataclass(frozen=True)
class Segments:
    """Input channels grouped by activation exponent, so that an 8-bit code needs one 8-bit digit.

    On the pow2 grid ``v_c = (q_c - zp_c) << k_c`` needs up to 15 bits although each code has 8.
    Grouping the channels by ``k`` (descending), the reduction becomes
    ``sum_e 2^e sum_{c in e} q_w[o, c] (q_c - zp_c)``: each class is a dot product of the 8-bit codes
    (stored as one digit ``d = q - zp - offset_e``), and the classes are combined Horner-style
    (``acc = (acc << (k_e - k_next)) + dot_next``) in int32; the last class's ``2^k`` goes into the
    output scale, the offsets into a per-row constant. Each class is padded to whole words, so the
    reduction grows by at most 3 channels per class (:attr:`width`).
    """

    shifts: tuple[int, ...]              # exponent of each class, descending
    chans: tuple[tuple[int, ...], ...]   # input channels of each class
    offsets: tuple[int, ...]             # digit offset of each class

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(-(-len(c) // WORD_K) * WORD_K for c in self.chans)

    @property
    def starts(self) -> tuple[int, ...]:
        out, pos = [], 0
        for sz in self.sizes:
            out.append(pos)
            pos += sz
        return tuple(out)

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def position(self, channels: int) -> np.ndarray:
        """int64 [channels]: where each input channel sits on the segmented axis."""
        pos = np.full(channels, -1, np.int64)
        for st, ch in zip(self.starts, self.chans):
            pos[list(ch)] = st + np.arange(len(ch))
        return pos

    def table(self) -> np.ndarray:
        """int32 [2, width]: channel at each position (-1: padding) and the position's offset."""
        chan = np.full(self.width, -1, np.int32)
        off = np.zeros(self.width, np.int32)
        for st, sz, ch, o in zip(self.starts, self.sizes, self.chans, self.offsets):
            chan[st:st + len(ch)] = ch
            off[st:st + sz] = o
        return np.stack([chan, off]).astype(np.int32)

    def channel_table(self, channels: int) -> np.ndarray:
        """int32 [2, channels]: each channel's offset and position (for producers writing it)."""
        off = np.zeros(channels, np.int32)
        for ch, o in zip(self.chans, self.offsets):
            off[list(ch)] = o
        return np.stack([off, self.position(channels).astype(np.int32)]).astype(np.int32)


# ===================================================================================== weights
@dataclass
class WeightGroup:
    """Rows stored at one width (integer codes) or in fp32, with their scales and destination channels.

    ``codes`` / ``float_w`` are ``[n, k]`` in the op's reduction order (see :class:`LinearOp`).
    """

    out_index: np.ndarray                 # int32 [n]: output channel of each row
    scale: np.ndarray                     # float32 [n]: per-row weight scale (1 for fp32 rows)
    codes: np.ndarray | None = None       # int8 [n, k]
    float_w: np.ndarray | None = None     # float32 [n, k]
    plan_bits: int | None = None          # bits the plan asked for (reporting)
    bits: int = 0                         # storage bits (2/4/8; 32 for fp32), derived

    def __post_init__(self):
        self.out_index = np.ascontiguousarray(np.asarray(self.out_index, np.int32))
        self.scale = np.ascontiguousarray(np.asarray(self.scale, np.float32).reshape(-1))
        if (self.codes is None) == (self.float_w is None):
            raise ValueError("a weight group holds either integer codes or fp32 weights")
        if self.codes is not None:
            q = np.asarray(self.codes)
            if q.ndim != 2:
                raise ValueError(f"codes must be 2-D [n, k], got {q.shape}")
            if q.size and (q.min() < -128 or q.max() > 127):
                raise ValueError("weight codes must fit in int8")
            self.codes = np.ascontiguousarray(q.astype(np.int8))
            need = packing.storage_bits_for_range(int(q.min()), int(q.max())) if q.size else 2
            self.bits = max(int(self.bits or 0), need) if self.bits in (2, 4, 8) else need
        else:
            self.float_w = np.ascontiguousarray(np.asarray(self.float_w, np.float32))
            self.bits = 32
        rows = self.codes if self.codes is not None else self.float_w
        if rows.shape[0] != self.out_index.shape[0] or self.scale.shape[0] != rows.shape[0]:
            raise ValueError("rows, scales and output channels differ in number")

    @property
    def n(self) -> int:
        return int(self.out_index.shape[0])

    @property
    def k(self) -> int:
        return int((self.codes if self.codes is not None else self.float_w).shape[1])

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def n_blocks(self) -> int:
        return -(-max(self.n, 1) // BLOCK_N)

    @property
    def storage_bits(self) -> int:
        return self.bits

    @property
    def nbytes(self) -> int:
        """Bytes of the packed rows (16-row blocks, whole words)."""
        kp = packing.padded_k(self.k)
        return self.n_blocks * BLOCK_N * kp * self.bits // 8

    def code_sum(self) -> np.ndarray:
        """int64 [n]: sum_k q[o, k]."""
        return self.codes.astype(np.int64).sum(axis=1)

    def dequantized(self) -> np.ndarray:
        """Float weights [n, k] of this group (reference)."""
        if self.codes is not None:
            return self.codes.astype(np.float32) * self.scale[:, None]
        return self.float_w


# ===================================================================================== conv geometry
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
        if len(stride) != 2 or len(dil) != 2:
            raise ValueError("only 2-D convolutions are supported")
        if auto_pad in ("NOTSET", ""):
            p = tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0)))
            if len(p) != 4:
                raise ValueError("only 2-D convolutions are supported")
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


# ===================================================================================== the op
@dataclass
class LinearOp:
    """A (possibly quantized) linear map ``[M, k] -> [M, n_out]`` with its epilogue.

    Reduction order: a dense layer's ``k`` is its input feature; a convolution's (``geom``) is
    ``k = tap * cp + c`` (tap-major, ``tap = i * kw + j``, channels zero-padded to ``geom.cp``).
    """

    k: int
    n_out: int
    groups: list[WeightGroup]
    bias: np.ndarray | None = None   # float32 [n_out]
    act: ActQuant | None = None      # None: fp32 input
    relu: bool = False               # fused ReLU after the (optional) residual add
    clip_hi: float | None = None     # fused upper clip after the ReLU (ReLU6 = relu + clip_hi 6)
    residual: bool = False           # fused add of a tensor shaped like the output
    name: str = "linear"
    geom: ConvGeom | None = None
    cin: int | None = None           # input channels of a convolution (before its geometry is known)
    conv_kind: str | None = None     # "conv" | "depthwise" before the geometry is known
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.groups:
            raise ValueError("a linear op needs at least one weight group")
        kinds = {g.quantized for g in self.groups}
        if len(kinds) != 1:
            raise ValueError("weight groups must be all integer or all fp32")
        idx = np.concatenate([g.out_index for g in self.groups])
        if sorted(idx.tolist()) != list(range(self.n_out)):
            raise ValueError("group output channels must cover 0..n_out-1 exactly once")
        if any(g.k != self.k for g in self.groups):
            raise ValueError("weight groups must have the op's reduction length")
        if self.bias is not None:
            self.bias = np.ascontiguousarray(np.asarray(self.bias, np.float32).reshape(-1))
        if self.act is not None and self.act.channels != self.channels:
            raise ValueError(f"activation quantizer has {self.act.channels} channels, the layer {self.channels}")

    @property
    def channels(self) -> int:
        """Input channels (the activation quantizer's axis)."""
        if self.geom is not None:
            return self.geom.cin
        return self.cin if self.cin is not None else self.k

    @property
    def k_padded(self) -> int:
        return packing.padded_k(self.k)

    @property
    def kind(self) -> str:
        """``dense``, ``conv`` or ``depthwise``."""
        if self.geom is not None:
            return "depthwise" if self.geom.depthwise else "conv"
        return self.conv_kind or "dense"

    def k_channel(self) -> np.ndarray:
        """Input channel read at each k (-1 for padding), int64 [k] (not for depthwise)."""
        kind = self.kind
        if kind == "dense":
            return np.arange(self.k, dtype=np.int64)
        cin = self.channels
        cp = self.geom.cp if self.geom is not None else channel_pad(cin, self.quantized)
        c = np.arange(self.k, dtype=np.int64) % cp
        return np.where(c < cin, c, -1)

    @property
    def quantized(self) -> bool:
        return self.groups[0].quantized

    @property
    def mode(self) -> str:
        """``int`` (integer kernels), ``float`` (codes dequantized to float in registers) or ``fp32``."""
        if not self.quantized:
            return "fp32"
        if self.act is not None and self.act.integer:
            return "int"
        return "float"

    def acc_bound(self) -> int:
        """Largest possible |sum_k q[o, k] v[k]| over rows and inputs (needs an integer act)."""
        if self.act is None or not self.act.integer:
            return 0
        if self.kind == "depthwise":
            lo, hi = self.act.channel_ranges()
            vmax = float(np.maximum(np.abs(lo), np.abs(hi)).max())
            return int(max(float(np.abs(g.codes.astype(np.int64)).sum(axis=1).max()) for g in self.groups) * vmax)
        lo, hi = self.act.channel_ranges()
        vabs = np.maximum(np.abs(lo), np.abs(hi))
        kc = self.k_channel()
        per_k = np.where(kc >= 0, vabs[np.maximum(kc, 0)], 0).astype(np.float64)
        return int(max(float((np.abs(g.codes.astype(np.float64)) @ per_k).max()) for g in self.groups))

    def activate(self, y: np.ndarray) -> np.ndarray:
        """The fused activation (ReLU, then the upper clip) on the reference's output."""
        if self.relu:
            y = np.maximum(y, 0)
        if self.clip_hi is not None:
            y = np.minimum(y, np.float32(self.clip_hi))
        return y

    def fused_ops(self) -> list[str]:
        return [f for f, on in (("add", self.residual), ("relu", self.relu),
                                (f"clip<={self.clip_hi:g}" if self.clip_hi is not None else "", self.clip_hi is not None)) if on]

    @property
    def weight_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def dense_weight(self) -> np.ndarray:
        """The float weight [n_out, k] in original channel order (reference)."""
        w = np.zeros((self.n_out, self.k), dtype=np.float32)
        for g in self.groups:
            w[g.out_index] = g.dequantized()
        return w

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """What onnxruntime computes for a dense layer on ``x [M, k]`` (float64 accumulation)."""
        xq = x if self.act is None else self.act.fake_quant(x, axis=1)
        y = xq.astype(np.float64) @ self.dense_weight().T.astype(np.float64)
        if self.bias is not None:
            y = y + self.bias
        if residual is not None:
            y = y + residual
        return self.activate(y).astype(np.float32)

    def bias_or_zero(self) -> np.ndarray:
        return np.zeros(self.n_out, np.float32) if self.bias is None else self.bias.astype(np.float32)


# ===================================================================================== convolutions
def channel_pad(cin: int, quantized: bool) -> int:
    """Channels per tap as stored: whole words (4) for integer codes, ``cin`` for fp32 rows."""
    return -(-cin // WORD_K) * WORD_K if quantized else cin


def conv_weight_matrix(codes_or_w: np.ndarray, cp: int) -> np.ndarray:
    """ONNX conv weights ``[n, C, kh, kw]`` as the implicit-GEMM matrix ``[n, kh * kw * cp]``
    (k ordered tap-major, channels zero-padded to ``cp``)."""
    w = np.asarray(codes_or_w)
    n, c, kh, kw = w.shape
    t = np.zeros((n, kh, kw, cp), dtype=w.dtype)
    t[..., :c] = w.transpose(0, 2, 3, 1)
    return t.reshape(n, kh * kw * cp)


def conv_op_from_codes(name: str, geom: ConvGeom, groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       bias: np.ndarray | None, act, relu: bool = False, residual: bool = False,
                       plan_bits: list[int | None] | None = None, bits: list[int] | None = None) -> tuple[LinearOp, ConvGeom]:
    """A quantized conv op from per-group ``(codes [n_b, C/g, kh, kw], scales [n_b], out_index [n_b])``.

    ``bits`` optionally forces each group's storage width. Returns the op and the geometry with its
    stored channel padding (depthwise: rows ``[n, kh * kw]``, ``cp = 1``).
    """
    if geom.groups != 1 and not geom.depthwise:
        raise ValueError("grouped convolutions other than depthwise are not supported by the kernels")
    cp = 1 if geom.depthwise else channel_pad(geom.cin, True)
    g2 = geom.with_channel_pad(cp)
    g_list = []
    for i, (q, s, idx) in enumerate(groups):
        q = np.asarray(q)
        mat = q.reshape(q.shape[0], -1) if geom.depthwise else conv_weight_matrix(q, cp)
        g_list.append(WeightGroup(out_index=idx, scale=s, codes=mat,
                                  plan_bits=plan_bits[i] if plan_bits else None,
                                  bits=bits[i] if bits else 0))
    k = geom.taps if geom.depthwise else geom.taps * cp
    return LinearOp(k=k, n_out=geom.cout, groups=g_list, bias=bias, act=act, relu=relu, residual=residual,
                    name=name, geom=g2), g2


def conv_op_fp32(name: str, geom: ConvGeom, weight: np.ndarray, bias: np.ndarray | None,
                 relu: bool = False, residual: bool = False) -> tuple[LinearOp, ConvGeom]:
    """An fp32 conv op (weights ``[cout, C/g, kh, kw]``) for the fp32 kernels."""
    w = np.asarray(weight, np.float32)
    if geom.depthwise:
        g2 = geom.with_channel_pad(1)
        mat = w.reshape(w.shape[0], -1)
    else:
        if geom.groups != 1:
            raise ValueError("grouped convolutions other than depthwise are not supported by the kernels")
        g2 = geom.with_channel_pad(channel_pad(geom.cin, False))
        mat = conv_weight_matrix(w, g2.cp)
    grp = WeightGroup(out_index=np.arange(geom.cout, dtype=np.int32), scale=np.ones(geom.cout, np.float32),
                      float_w=mat, plan_bits=32)
    return LinearOp(k=mat.shape[1], n_out=geom.cout, groups=[grp], bias=bias, act=None, relu=relu,
                    residual=residual, name=name, geom=g2), g2


def reference_conv(op: LinearOp, geom: ConvGeom, x: np.ndarray, weight_rows: np.ndarray,
                   residual: np.ndarray | None = None) -> np.ndarray:
    """What onnxruntime computes for ``Conv -> Gather(out_index)`` (float64 accumulation).

    ``x`` is NCHW; ``weight_rows`` is the float weight ``[n, C/groups, kh, kw]`` in row order (the
    groups of ``op`` concatenated, as the ONNX Conv sees them); row ``p`` goes to channel
    ``out_index[p]``.
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
    return op.activate(y).astype(np.float32)
