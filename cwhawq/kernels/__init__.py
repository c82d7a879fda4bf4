"""Packed 2/4/8-bit kernels for TVM.

* :mod:`.problem` — what a layer computes (codes, scales, activation quantizer, conv geometry) and
  its numpy reference; :mod:`.packing` — the weight layouts (numpy only);
* :mod:`.core` — the CPU GEMM core shared by every CPU instruction set (tasks, register tiles,
  reduction loop, epilogue), :mod:`.prologue` — activation quantization, :mod:`.depthwise`;
* :mod:`.isa` — one module per instruction-set family (x86: AVX2, AVX-VNNI, AVX-512, AVX-512 VNNI;
  aarch64: NEON, dot product; portable), each a :class:`~cwhawq.kernels.core.Strategy` per layer,
  and :mod:`.cuda`;
* :mod:`.emit` — Relax emission of a layer.

Only the numpy modules are imported eagerly; the TVM-dependent ones load on first use.
"""
from .packing import BLOCK_N, WORD_K, RecordLayout, pack_records, unpack_records  # noqa: F401
from .problem import ActQuant, ConvGeom, LinearOp, WeightGroup  # noqa: F401

__all__ = ["BLOCK_N", "WORD_K", "ActQuant", "ConvGeom", "LinearOp", "RecordLayout", "WeightGroup",
           "pack_records", "unpack_records"]
