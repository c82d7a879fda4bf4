"""TVM backend: ONNX import with the packed kernels, targets, compilation to an artifact, running it.

``compile_model`` / ``load_artifact`` / ``run_artifact`` (:mod:`.tvm`), ``resolve_target``
(:mod:`.targets`), ``analyze`` / ``to_relax`` (:mod:`.onnx_import`). TVM is imported lazily.
"""
from __future__ import annotations

__all__ = ["compile_model", "load_artifact", "run_artifact", "resolve_target"]


def __getattr__(name):
    if name in ("compile_model", "load_artifact", "run_artifact"):
        from . import tvm as _tvm  # noqa: PLC0415

        return getattr(_tvm, name)
    if name == "resolve_target":
        from .targets import resolve_target  # noqa: PLC0415

        return resolve_target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
