"""The packed weight layout: the one place that defines how low-bit weight codes are stored (numpy only).

Every kernel in :mod:`cwhawq.kernels` reads weights in this layout and every importer writes it
through :func:`pack_weight`, so the layout is defined here and nowhere else.

Codes and storage
    A weight group holds the integer codes ``q[n, k]`` of ``n`` output channels over a reduction of
    length ``k`` (for a convolution ``k = Cin/groups * kh * kw`` in ONNX order ``(c, kh, kw)``).
    Codes are stored with an offset as unsigned ``u = q + z`` with ``z = 2^(b-1)`` in ``b`` storage
    bits, ``b`` in {8, 4, 2}: 8 bits hold codes -128..127, 4 bits -8..7 (3- and 4-bit plans),
    2 bits -2..1 (the 2-bit narrow range {-1, 0, 1}). 6-bit codes are stored in 8 bits.

Blocks
    Output channels are cut into blocks of ``BLOCK_N = 16`` and the reduction into words of
    ``WORD_K = 4`` consecutive ``k``: a *tile* is 16 x 4 codes stored as 64 bytes, byte ``4 * i + j``
    holding output channel ``16 * nb + i`` at ``k = 4 * w + j`` (the operand shape of the x86
    ``vpdpbusd`` instruction, of four aarch64 ``sdot`` and of sixteen CUDA ``dp4a``).
    With ``P = 8 / b`` codes per byte, ``P`` consecutive tiles along k share one 64-byte record:
    tile ``p`` of record ``g`` (k-words ``g * P + p``) sits in bits ``[p * b, (p + 1) * b)`` of each
    byte. The array is ``uint8 [NB, KG, 64]`` with ``NB = ceil(n / 16)`` and
    ``KG = k_padded / (4 * P)``; 2-bit codes are four per byte, 4-bit two per byte, 8-bit one per
    byte, so the bytes are ``NB * 16 * k_padded * b / 8``. Unpacking tile ``p`` is one shift and one
    mask of a whole 64-byte vector.

Padding
    ``k`` is padded to a multiple of ``K_ALIGN = 16`` (a whole record at every bit-width) and ``n``
    to a multiple of 16, with code 0 (``u = z``). Padded channels are dropped by the kernels'
    epilogues; padded ``k`` meet zero activations.

Integer arithmetic
    With activation integers ``v_k`` (stored as int8 digits ``d_j`` with ``v = c + sum_j 256^j d_j``,
    see :func:`act_digits`), a kernel computes ``acc_j = sum_k u * d_j`` (u8 x s8 dot products) and
    recovers ``sum_k q * v = sum_j 256^j acc_j - z * rowsum + c * code_sum`` where
    ``rowsum = sum_k (v_k - c)`` is per activation row and ``code_sum = sum_k q`` per output channel
    (stored in :class:`PackedWeight`). All of it is exact in (wrapping) int32 arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_N = 16
WORD_K = 4
RECORD_BYTES = BLOCK_N * WORD_K
K_ALIGN = 16
STORAGE_BITS = (2, 4, 8)


def storage_bits_for_range(qmin: int, qmax: int) -> int:
    """The smallest storage width (2, 4 or 8 bits) whose offset codes hold [qmin, qmax]."""
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
    return -(-int(k) // K_ALIGN) * K_ALIGN


def padded_n(n: int) -> int:
    return -(-int(n) // BLOCK_N) * BLOCK_N


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight group (see the module docstring for the layout)."""

    data: np.ndarray      # uint8 [NB, KG, 64]
    bits: int             # storage bits: 2, 4 or 8
    n: int                # output channels (rows) actually present
    k: int                # reduction length before padding
    code_sum: np.ndarray  # int32 [NB * 16]: sum_k q[o, k] (0 on padded rows)

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def pack(self) -> int:
        return pack_factor(self.bits)

    @property
    def k_padded(self) -> int:
        return self.data.shape[1] * WORD_K * self.pack

    @property
    def n_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def n_padded(self) -> int:
        return self.data.shape[0] * BLOCK_N

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def pack_weight(codes: np.ndarray, bits: int | None = None, k_padded: int | None = None) -> PackedWeight:
    """Pack integer codes ``[n, k]`` (any integer dtype) into the blocked layout.

    ``bits`` is the storage width; by default the smallest that holds the codes. ``k_padded``
    (a multiple of 16, at least k) lets groups of one layer share a padded length.
    """
    q = np.asarray(codes)
    if q.ndim != 2:
        raise ValueError(f"codes must be 2-D [n, k], got shape {q.shape}")
    if not np.issubdtype(q.dtype, np.integer):
        if not np.all(np.isfinite(q)) or not np.array_equal(q, np.round(q)):
            raise ValueError("codes must be integers")
    q = q.astype(np.int64)
    n, k = q.shape
    qmin = int(q.min()) if q.size else 0
    qmax = int(q.max()) if q.size else 0
    need = storage_bits_for_range(qmin, qmax)
    if bits is None:
        bits = need
    elif bits not in STORAGE_BITS:
        raise ValueError(f"storage bits must be one of {STORAGE_BITS}, got {bits}")
    elif need > bits:
        raise ValueError(f"codes in [{qmin}, {qmax}] do not fit in {bits} storage bits")
    kp = padded_k(k) if k_padded is None else int(k_padded)
    if kp < k or kp % K_ALIGN:
        raise ValueError(f"k_padded={kp} must be a multiple of {K_ALIGN} and >= k={k}")
    z = 1 << (bits - 1)
    p = 8 // bits
    npad = padded_n(max(n, 1))
    u = np.full((npad, kp), z, dtype=np.uint8)
    u[:n, :k] = (q + z).astype(np.uint8)
    # [NB, 16, KW, 4] -> [NB, KW, 16, 4]: one 16 x 4 tile per (block, k-word)
    tiles = u.reshape(npad // BLOCK_N, BLOCK_N, kp // WORD_K, WORD_K).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(npad // BLOCK_N, kp // (WORD_K * p), p, RECORD_BYTES)
    data = np.zeros((npad // BLOCK_N, kp // (WORD_K * p), RECORD_BYTES), dtype=np.uint8)
    for i in range(p):
        data |= (tiles[:, :, i, :] << np.uint8(i * bits)).astype(np.uint8)
    code_sum = np.zeros(npad, dtype=np.int64)
    code_sum[:n] = q.sum(axis=1)
    return PackedWeight(np.ascontiguousarray(data), int(bits), int(n), int(k), code_sum.astype(np.int32))


def unpack_offset_codes(pw: PackedWeight) -> np.ndarray:
    """The stored offset codes ``u`` as uint8 ``[n_padded, k_padded]`` (padding included)."""
    p, b = pw.pack, pw.bits
    mask = np.uint8((1 << b) - 1)
    nb, kg, _ = pw.data.shape
    tiles = np.empty((nb, kg, p, RECORD_BYTES), dtype=np.uint8)
    for i in range(p):
        tiles[:, :, i, :] = (pw.data >> np.uint8(i * b)) & mask
    tiles = tiles.reshape(nb, kg * p, BLOCK_N, WORD_K).transpose(0, 2, 1, 3)
    return tiles.reshape(nb * BLOCK_N, kg * p * WORD_K)


def unpack_weight(pw: PackedWeight) -> np.ndarray:
    """The codes ``q`` as int8 ``[n, k]`` (inverse of :func:`pack_weight`)."""
    u = unpack_offset_codes(pw)[: pw.n, : pw.k].astype(np.int16)
    return (u - pw.zero).astype(np.int8)


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
    """(number of int8 digits, offset c) to store activation integers in [vmin, vmax].

    One digit when the range spans at most 256 values (``d = v - c`` with ``c = vmin + 128``, or
    ``c = 0`` when the range already fits in int8); otherwise two digits with ``c = 0`` (int16).
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


def reference_packed_matmul(digits: np.ndarray, offset: int, pw: PackedWeight) -> np.ndarray:
    """Exact ``sum_k q[o, k] * v[m, k]`` (int64 [M, n]) computed the way the kernels do.

    ``digits`` is int8 ``[D, M, k_padded]`` (zero beyond k). Used by the tests as the reference for
    the packed-arithmetic identity (see the module docstring).
    """
    d = np.asarray(digits).astype(np.int64)
    u = unpack_offset_codes(pw).astype(np.int64)  # [n_pad, kp]
    acc = sum((256 ** j) * (d[j] @ u.T) for j in range(d.shape[0]))
    rowsum = sum((256 ** j) * d[j].sum(axis=1) for j in range(d.shape[0]))
    r = acc - pw.zero * rowsum[:, None] + offset * pw.code_sum.astype(np.int64)[None, :]
    return r[:, : pw.n]
