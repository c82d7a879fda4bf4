"""Packed weight layouts: the one place that defines how low-bit weight codes are stored (numpy only).

Every integer kernel reads its weights in one of the layouts defined here and every caller packs
through :func:`pack_records`, so the byte and bit positions live here and nowhere else.

Codes and storage widths
    A weight group holds the integer codes ``q[n, k]`` of ``n`` output channels over a reduction of
    length ``k`` (for a convolution ``k = kh * kw * Cp``, tap-major, see :mod:`.problem`). Codes
    are stored in ``b`` storage bits, ``b`` in {8, 4, 2}: 8 bits hold -128..127, 4 bits -8..7
    (3- and 4-bit plans), 2 bits -2..1 (the 2-bit narrow range {-1, 0, 1}); 6-bit codes use 8.

Records
    Output channels are cut into blocks of ``BLOCK_N = 16`` and the reduction into words of
    ``WORD_K = 4`` consecutive ``k``. A *record* holds the 16 x 4 codes of one block and one word
    in ``64 * b / 8`` bytes (64, 32 or 16), so every storage width has the same k granularity and
    the packed bytes are ``NB * KW * 64 * b / 8`` with ``NB = ceil(n / 16)``, ``KW = ceil(k / 4)``:
    the artifact's size follows the plan's bits. The array is ``uint8 [NB, KW, record bytes]``.
    ``n`` and ``k`` are padded with code 0.

    Where code ``(i, j)`` (channel ``16 * nb + i``, ``k = 4 * w + j``) sits inside its record is the
    layout's business; each instruction set picks the layout its unpacking is cheapest for
    (:class:`RecordLayout`):

    ``dot4`` (int8 dot-product instructions: x86 ``vpmaddubsw`` / ``vpdpbusd``, aarch64 ``sdot``,
    CUDA ``dp4a``, the portable kernels)
        With ``P = 8 / b`` codes per byte, the 16 channels form ``P`` planes of ``16 / P``
        channels: code ``(i, j)`` is in byte ``4 * (i % (16 / P)) + j``, bits
        ``[b * (i // (16 / P)), + b)``. So one shift and one mask of the record give the 4-byte
        words of ``16 / P`` consecutive channels (8-bit: byte ``4 i + j``, the ``vpdpbusd`` operand).
        Storage: 8-bit codes two's complement (used as they are); 4/2-bit codes offset,
        ``u = q + 2^(b-1)`` (unpack = shift, mask, subtract).

    ``quads`` / ``pairs`` (16-bit multiply-add instructions: x86 ``vpmaddwd``)
        The record is four *vectors* of 16 codes: ``quads``: vector ``v = i // 4`` holds channels
        ``4 v .. 4 v + 3`` x 4 k at lane ``L = 4 * (i % 4) + j``; ``pairs``: vector
        ``v = 2 * (j // 2) + i // 8`` holds channels ``8 (v % 2) ..`` + 7 x the k pair ``j // 2`` at
        lane ``L = 2 * (i % 8) + j % 2`` (a ``vpmaddwd`` operand whose int32 results are 8
        channels). ``P = 8 / b`` vectors share 16 bytes: code ``(i, j)`` is in byte
        ``16 * (v // P) + L``, bits ``[b * (v % P), + b)``, two's complement. Zero-extending 16
        bytes to 16-bit lanes and one shift pair (``(x << (16 - b - s)) >> (16 - b)``, arithmetic)
        gives a vector as 16 signed int16.

Integer arithmetic
    The kernels take signed codes (no weight offset), so ``sum_k q[o, k] v[m, k]`` needs no row
    sums of the activations; an activation offset ``c`` (activations stored as ``v - c``) is
    corrected with ``c * sum_k q[o, k]``, a constant per output channel. See :func:`act_digits`
    for how activation integers are split into int8 digits where an instruction needs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_N = 16
WORD_K = 4
STORAGE_BITS = (2, 4, 8)
LAYOUTS = ("dot4", "quads", "pairs")


def storage_bits_for_range(qmin: int, qmax: int) -> int:
    """The smallest storage width (2, 4 or 8 bits) whose codes hold [qmin, qmax]."""
    for b in STORAGE_BITS:
        z = 1 << (b - 1)
        if qmin >= -z and qmax <= z - 1:
            return b
    raise ValueError(f"weight codes in [{qmin}, {qmax}] do not fit in 8 bits")


def storage_bits_for_plan(bits: int) -> int:
    """Storage width of a plan bit-width: 2 -> 2, 3/4 -> 4, 5..8 -> 8."""
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    if bits <= 8:
        return 8
    raise ValueError(f"no packed storage for {bits}-bit weights")


def pack_factor(bits: int) -> int:
    """Codes per byte for a storage width."""
    if bits not in STORAGE_BITS:
        raise ValueError(f"storage bits must be one of {STORAGE_BITS}, got {bits}")
    return 8 // bits


def padded_k(k: int) -> int:
    """Reduction length rounded up to whole words."""
    return -(-int(k) // WORD_K) * WORD_K


def padded_n(n: int) -> int:
    return -(-int(n) // BLOCK_N) * BLOCK_N


def record_bytes(bits: int) -> int:
    return BLOCK_N * WORD_K * bits // 8


@dataclass(frozen=True)
class RecordLayout:
    """Where each code of a 16 x 4 record sits (see the module docstring)."""

    kind: str   # dot4 | quads
    bits: int   # storage bits

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown record layout {self.kind!r} (one of {LAYOUTS})")
        pack_factor(self.bits)

    @property
    def signed(self) -> bool:
        """Two's complement fields (else offset codes ``q + 2^(b-1)``)."""
        return self.kind in ("quads", "pairs") or self.bits == 8

    @property
    def zero(self) -> int:
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def nbytes(self) -> int:
        return record_bytes(self.bits)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(byte, shift) of code (i, j) as two int arrays [16, 4]."""
        b = self.bits
        p = 8 // b
        i = np.arange(BLOCK_N)[:, None]
        j = np.arange(WORD_K)[None, :]
        if self.kind == "dot4":
            per = BLOCK_N // p
            byte = 4 * (i % per) + j
            shift = b * (i // per) + 0 * j
        else:
            if self.kind == "quads":
                v = i // 4 + 0 * j
                lane = 4 * (i % 4) + j
            else:
                v = 2 * (j // 2) + i // 8
                lane = 2 * (i % 8) + j % 2
            byte = 16 * (v // p) + lane
            shift = b * (v % p)
        return byte.astype(np.int64), shift.astype(np.int64)


def pack_records(codes: np.ndarray, layout: RecordLayout, k_padded: int | None = None) -> np.ndarray:
    """Pack integer codes ``[n, k]`` into ``uint8 [NB, KW, record bytes]`` (see the module docstring)."""
    q = np.asarray(codes)
    if q.ndim != 2:
        raise ValueError(f"codes must be 2-D [n, k], got shape {q.shape}")
    if not np.issubdtype(q.dtype, np.integer):
        if not np.all(np.isfinite(q)) or not np.array_equal(q, np.round(q)):
            raise ValueError("codes must be integers")
    q = q.astype(np.int64)
    n, k = q.shape
    b = layout.bits
    if q.size:
        need = storage_bits_for_range(int(q.min()), int(q.max()))
        if need > b:
            raise ValueError(f"codes in [{int(q.min())}, {int(q.max())}] do not fit in {b} storage bits")
    kp = padded_k(k) if k_padded is None else int(k_padded)
    if kp < k or kp % WORD_K:
        raise ValueError(f"k_padded={kp} must be a multiple of {WORD_K} and >= k={k}")
    npad = padded_n(max(n, 1))
    full = np.zeros((npad, kp), np.int64)
    full[:n, :k] = q
    mask = (1 << b) - 1
    field = (full + layout.zero) & mask  # offset codes, or two's complement in b bits
    tiles = field.reshape(npad // BLOCK_N, BLOCK_N, kp // WORD_K, WORD_K).transpose(0, 2, 1, 3)  # [NB, KW, 16, 4]
    byte, shift = layout.positions()
    out = np.zeros((npad // BLOCK_N, kp // WORD_K, layout.nbytes), np.int64)
    for i in range(BLOCK_N):
        for j in range(WORD_K):
            out[:, :, byte[i, j]] |= tiles[:, :, i, j] << shift[i, j]
    return np.ascontiguousarray(out.astype(np.uint8))


def unpack_records(data: np.ndarray, layout: RecordLayout, n: int, k: int) -> np.ndarray:
    """The codes ``q`` as int8 ``[n, k]`` (inverse of :func:`pack_records`)."""
    d = np.asarray(data).astype(np.int64)
    nb, kw, _ = d.shape
    b = layout.bits
    mask = (1 << b) - 1
    byte, shift = layout.positions()
    tiles = np.zeros((nb, kw, BLOCK_N, WORD_K), np.int64)
    for i in range(BLOCK_N):
        for j in range(WORD_K):
            f = (d[:, :, byte[i, j]] >> shift[i, j]) & mask
            if layout.signed:
                f = np.where(f >= 1 << (b - 1), f - (1 << b), f)
            else:
                f = f - layout.zero
            tiles[:, :, i, j] = f
    full = tiles.transpose(0, 2, 1, 3).reshape(nb * BLOCK_N, kw * WORD_K)
    return full[:n, :k].astype(np.int8)


def merge_groups(sizes: list[int], bits: list[int], k_padded: int) -> list[list[int]]:
    """Which weight groups to store together: a partition of the groups (in their order) into runs
    stored at the run's widest bit-width, minimising the packed bytes (rows are padded to 16 per
    group, so a handful of channels at 2 bits can cost more than storing them at 4 or 8 bits, and
    every extra group is an extra block of rows to compute). Ties go to fewer groups."""
    g = len(sizes)
    if g != len(bits):
        raise ValueError("sizes and bits differ in length")
    best: tuple[int, int, list[list[int]]] | None = None
    for mask in range(1 << max(g - 1, 0)):
        runs, cur = [], [0]
        for i in range(1, g):
            if mask >> (i - 1) & 1:
                runs.append(cur)
                cur = [i]
            else:
                cur.append(i)
        runs.append(cur)
        nbytes = sum(padded_n(sum(sizes[i] for i in r)) * k_padded * max(bits[i] for i in r) // 8 for r in runs)
        key = (nbytes, len(runs))
        if best is None or key < best[:2]:
            best = (nbytes, len(runs), runs)
    return best[2] if best else []


# ------------------------------------------------------------------------------------ fp32 weights
def pack_float_weight(w: np.ndarray, k_padded: int | None = None) -> np.ndarray:
    """fp32 weights ``[n, k]`` in the kernels' float layout ``float32 [NB, k_padded, 16]``.

    Element ``[nb, k, i]`` is ``w[16 * nb + i, k]`` (zero padded), so one k step of a block is one
    16-lane vector.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    kp = padded_k(k) if k_padded is None else int(k_padded)
    npad = padded_n(max(n, 1))
    out = np.zeros((npad, kp), dtype=np.float32)
    out[:n, :k] = w
    return np.ascontiguousarray(out.reshape(npad // BLOCK_N, BLOCK_N, kp).transpose(0, 2, 1))


def unpack_float_weight(data: np.ndarray, n: int, k: int) -> np.ndarray:
    nb, kp, _ = data.shape
    return data.transpose(0, 2, 1).reshape(nb * BLOCK_N, kp)[:n, :k]


# ------------------------------------------------------------------------------ activation digits
def digits_needed(vmin: int, vmax: int) -> tuple[int, int]:
    """(number of int8 digits, offset c) to store activation integers in [vmin, vmax] as signed
    digits ``d`` with ``v = c + sum_j 256^j d_j``.

    One digit when the range spans at most 256 values (``c = 0`` when it already fits in int8,
    else ``c = vmin + 128``); otherwise two digits with ``c = 0`` (int16).
    """
    if vmin > vmax:
        raise ValueError("empty activation range")
    if -128 <= vmin and vmax <= 127:
        return 1, 0
    if vmax - vmin <= 255:
        return 1, int(vmin) + 128
    if -32768 <= vmin and vmax <= 32767:
        return 2, 0
    raise ValueError(f"activation integers in [{vmin}, {vmax}] exceed 16 bits")


def act_digits(v: np.ndarray, ndigits: int, offset: int) -> np.ndarray:
    """Split activation integers into int8 digits: ``v = offset + sum_j 256^j d_j`` (shape [D, ...])."""
    r = np.asarray(v, dtype=np.int64) - int(offset)
    if ndigits == 1:
        if r.size and (r.min() < -128 or r.max() > 127):
            raise ValueError("values do not fit one int8 digit")
        return r.astype(np.int8)[None]
    if ndigits == 2:
        lo = ((r + 128) & 255) - 128
        hi = (r - lo) >> 8
        if hi.size and (hi.min() < -128 or hi.max() > 127):
            raise ValueError("values do not fit two int8 digits")
        return np.stack([lo, hi]).astype(np.int8)
    raise ValueError("ndigits must be 1 or 2")
