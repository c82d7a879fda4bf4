"""Instruction sets: one module per family over the shared core (:mod:`cwhawq.kernels.core`).

An :class:`Isa` names a CPU (or GPU) instruction set, says which targets have it, and gives, for a
layer, the :class:`~cwhawq.kernels.core.Strategy` of each weight group (the inner loop and the
weight layout it reads). Instruction sets are registered by name (:func:`register`);
:func:`select` picks the best one a TVM target has, :func:`get` one by name (tests, benchmarks).

============================  ================================================================
``x86_avx512_vnni_vbmi``      AVX-512 VNNI with VBMI (Ice Lake and later, Zen 4): 4/2-bit records
                              unpacked by ``vpmultishiftqb`` + ``vpermb``
``x86_avx512_vnni``           AVX-512 VNNI ``vpdpbusd`` on zmm (u8 x s8, int32 accumulation)
``x86_avx512``                AVX-512BW without VNNI: ``vpmaddwd`` on zmm (int16 x int16)
``x86_avxvnni``               AVX-VNNI ``vpdpbusd`` on ymm (e.g. Alder Lake and later)
``x86_avx2``                  AVX2 + FMA: ``vpmaddwd`` (int16), ``vpmaddubsw`` with int16
                              accumulation for <= 4-bit weights on one-digit activations
``arm_dot``                   aarch64 ARMv8.2 dot product ``sdot`` (Cortex-A55/A76/A78, ...)
``arm_neon``                  aarch64 NEON without dot product (Cortex-A72, Raspberry Pi 4):
                              ``ld4`` + widening multiply-accumulate (``smlal``)
``generic``                   portable vector code for any LLVM target (slow; a warning)
``cuda``                      NVIDIA GPUs: ``dp4a`` (see :mod:`cwhawq.kernels.isa.cuda`)
============================  ================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..problem import LinearOp

_REGISTRY: dict[str, "Isa"] = {}


@dataclass
class Isa:
    """An instruction set the kernels target."""

    name: str
    doc: str
    arch: str                           # x86_64 | aarch64 | any | cuda
    features: tuple[str, ...] = ()      # LLVM target features it needs
    priority: int = 0                   # higher wins among those a target has
    portable: bool = False              # slow fallback: compile warns
    vector_bits: int = 128
    strategies_fn: object = field(default=None, repr=False)

    def strategies(self, op: LinearOp) -> list:
        """The strategy of every weight group of ``op`` (one activation format for the layer)."""
        return self.strategies_fn(self, op)

    def matches(self, target) -> bool:
        from tvm.target import codegen  # noqa: PLC0415

        kind = target.kind.name
        if self.arch == "cuda":
            return kind == "cuda"
        if kind != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", "") or "")
        arch = "aarch64" if triple.startswith("aarch64") else "x86_64"
        if self.arch not in ("any", arch):
            return False
        try:
            return all(codegen.target_has_features(f, target) for f in self.features)
        except Exception:  # noqa: BLE001 - a target LLVM cannot describe has none
            return not self.features


def register(isa: Isa) -> Isa:
    if isa.name in _REGISTRY:
        raise ValueError(f"instruction set {isa.name!r} registered twice")
    _REGISTRY[isa.name] = isa
    return isa


def get(name: str) -> Isa:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown instruction set {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)


def select(target) -> Isa:
    """The best registered instruction set the (TVM) target has."""
    _load()
    best = None
    for isa in _REGISTRY.values():
        if isa.matches(target) and (best is None or isa.priority > best.priority):
            best = isa
    if best is None:
        raise ValueError(f"no kernels for target kind {target.kind.name!r}")
    return best


def isa_for_target(target) -> str:
    """Name of :func:`select`'s instruction set."""
    return select(target).name


_LOADED = []


def _load() -> None:
    if _LOADED:
        return
    _LOADED.append(True)
    from . import arm, cuda, generic, x86  # noqa: F401, PLC0415
