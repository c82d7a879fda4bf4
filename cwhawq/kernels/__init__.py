"""Packed 2/4/8-bit kernels for TVM: the weight layout (:mod:`.packing`, numpy only), dense/GEMV
kernels (:mod:`.gemm`) and conv2d / depthwise kernels (:mod:`.conv`), written as TIR with their own
schedules (AVX-512 VNNI, aarch64 sdot, CUDA dp4a, a portable integer path and a float-unpacking
fallback). :mod:`cwhawq.backends` wires them into the compiled model.

Only :mod:`.packing` is imported eagerly; the TVM-dependent modules load on first use.
"""
from .packing import (BLOCK_N, K_ALIGN, WORD_K, PackedWeight, act_digits, digits_needed,  # noqa: F401
                      pack_float_weight, pack_weight, reference_packed_matmul, storage_bits_for_plan,
                      storage_bits_for_range, unpack_weight)

__all__ = [
    "BLOCK_N", "K_ALIGN", "WORD_K", "PackedWeight", "act_digits", "digits_needed", "pack_float_weight",
    "pack_weight", "reference_packed_matmul", "storage_bits_for_plan", "storage_bits_for_range", "unpack_weight",
]
