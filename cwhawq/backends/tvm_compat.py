"""Every use of TVM's private API, in one place, behind a version check.

cwhawq relies on a few TVM internals that no public API offers:

- the Relax ONNX frontend's table of operator converters (``_get_convert_map``), to refuse an
  unsupported operator in one line before importing;
- the frontend's importer class (``ONNXGraphImporter``) with two methods overridden: the
  unsupported-operator check (done beforehand) and the converter dispatch
  (``_convert_operator``), through which our custom layer node becomes calls of the packed kernels;
- the table of loaded runtime libraries (``tvm.base._LOADED_LIBS``), to load the CUDA runtime on
  demand (and its library path, ``_name``).

They are tested with TVM ``TESTED_TVM`` (the version ``pyproject.toml`` pins). Another TVM fails here
with one line naming both versions, instead of somewhere inside the frontend; ``CWHAWQ_TVM_ANY=1``
skips the check (to try a newer TVM).
"""
from __future__ import annotations

import os

from ..errors import CompileError

TESTED_TVM = ("0.27",)   # major.minor versions whose internals these shims were written against


def tvm_version() -> str:
    import tvm  # noqa: PLC0415 - TVM loads only when a backend needs it

    return str(tvm.__version__)


def check_version() -> None:
    """CompileError unless the installed TVM is one these shims were written for."""
    v = tvm_version()
    if os.environ.get("CWHAWQ_TVM_ANY") == "1":
        return
    if ".".join(v.split(".")[:2]) not in TESTED_TVM:
        raise CompileError(f"TVM {v} is not supported: cwhawq uses TVM internals tested with "
                           f"{', '.join(TESTED_TVM)} (install apache-tvm {TESTED_TVM[-1]}, or set CWHAWQ_TVM_ANY=1 "
                           f"to try anyway)")


def onnx_converter_ops() -> set[str]:
    """The ONNX operator names TVM's Relax ONNX frontend converts."""
    check_version()
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map  # noqa: PLC0415

    return set(_get_convert_map())


def onnx_importer(custom_ops: dict):
    """TVM's Relax ONNX importer class with ``custom_ops`` (op name -> ``convert(bb, inputs, attrs)``)
    converted by us and the unsupported-operator check switched off (callers check beforehand)."""
    check_version()
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter  # noqa: PLC0415

    class Importer(ONNXGraphImporter):
        def _check_for_unsupported_ops(self, graph):
            return None

        def _convert_operator(self, op_name, inputs, attrs, opset):
            conv = custom_ops.get(op_name)
            if conv is not None:
                return conv(self.bb, inputs, attrs)
            return super()._convert_operator(op_name, inputs, attrs, opset)

    return Importer


def loaded_libs() -> dict:
    """TVM's table of loaded runtime libraries (name -> ctypes library; writable)."""
    check_version()
    from tvm.base import _LOADED_LIBS  # noqa: PLC0415

    return _LOADED_LIBS


def lib_path(lib) -> str:
    """The file a library of :func:`loaded_libs` was loaded from."""
    return lib._name
