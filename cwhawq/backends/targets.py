"""Compilation targets: names, board presets and TVM target JSON -> a resolved :class:`TargetSpec`.

Accepted by :func:`resolve_target`:

``llvm`` (aliases ``host``, ``cpu``)
    the machine compiling, with its real CPU (``-mcpu`` from LLVM's host detection; TVM's
    ``"mcpu": "native"`` silently means generic).
``aarch64``
    64-bit ARM Linux (ARMv8-A + NEON), cross-linked with Debian's ``aarch64-linux-gnu-g++``.
``aarch64-dotprod``
    the same with the ARMv8.2 dot-product extension (``sdot`` kernels).
``cuda``
    NVIDIA GPU (``--arch sm_80`` by default) with the compiling machine as host.
``jetson-orin``
    CUDA ``sm_87`` with a Cortex-A78AE (aarch64 + dotprod) host, cross-linked.
``raspberry-pi-4``
    Cortex-A72 (aarch64, NEON, no dot product), cross-linked.
a TVM target JSON
    ``{"kind": "llvm", "mtriple": ..., ...}`` given inline (starts with ``{``) or as a ``.json`` file.

An artifact is a shared library (``.so``, linked here: a cross target needs its cross compiler)
or a ``.tar`` of object files for boards that link on-device (no cross compiler needed).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompileError
from . import tvm_compat

AARCH64_CXX = "aarch64-linux-gnu-g++"
DEFAULT_CUDA_ARCH = "sm_80"

_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
PRESETS: dict[str, dict] = {
    "aarch64": {"target": _AARCH64, "cross": AARCH64_CXX,
                "doc": "64-bit ARM Linux (ARMv8-A, NEON)"},
    "aarch64-dotprod": {"target": {**_AARCH64, "mattr": ["+neon", "+dotprod"]}, "cross": AARCH64_CXX,
                        "doc": "64-bit ARM Linux with the ARMv8.2 dot product (sdot)"},
    "raspberry-pi-4": {"target": {**_AARCH64, "mcpu": "cortex-a72"}, "cross": AARCH64_CXX,
                       "doc": "Raspberry Pi 4 (Cortex-A72, aarch64 Linux)"},
    "jetson-orin": {"target": {"kind": "cuda", "arch": "sm_87",
                               "host": {**_AARCH64, "mcpu": "cortex-a78", "mattr": ["+neon", "+dotprod"]}},
                    "cross": AARCH64_CXX, "doc": "NVIDIA Jetson Orin (CUDA sm_87, Cortex-A78AE host)"},
}
ALIASES = {"host": "llvm", "cpu": "llvm", "x86_64": "llvm", "arm64": "aarch64", "rpi4": "raspberry-pi-4",
           "orin": "jetson-orin"}


@dataclass
class TargetSpec:
    """A resolved target: the TVM target config plus how to link and run its artifact."""

    name: str
    config: dict
    cross_compiler: str | None = None

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def host_config(self) -> dict:
        return self.config.get("host", self.config) if self.kind == "cuda" else self.config

    @property
    def is_cross(self) -> bool:
        return self.cross_compiler is not None

    def tvm_target(self):
        import tvm  # noqa: PLC0415

        try:
            return tvm.target.Target(self.config)
        except Exception as exc:  # noqa: BLE001 - TVM raises ValueError/TVMError variants
            raise CompileError(f"invalid TVM target {json.dumps(self.config)}: {_first_line(exc)}") from None

    def summary(self) -> dict:
        return {"name": self.name, "tvm": self.config, "device": self.device,
                "cross_compiler": self.cross_compiler}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def host_cpu_config() -> dict:
    """The compiling machine's CPU as a TVM llvm target config."""
    from tvm.target import codegen  # noqa: PLC0415

    cfg = {"kind": "llvm", "num-cores": max(1, os.cpu_count() or 1)}
    try:
        cpu = codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic":
            cfg["mcpu"] = cpu
        triple = codegen.llvm_get_system_triple()
        if triple:
            cfg["mtriple"] = triple
    except Exception:  # noqa: BLE001 - detection is best effort; the generic target still works
        pass
    return cfg


def known_targets() -> list[str]:
    return ["llvm", "cuda"] + list(PRESETS)


def resolve_target(spec: str, arch: str | None = None) -> TargetSpec:
    """Resolve a target name, preset or TVM target JSON (see the module docstring)."""
    if spec is None or not str(spec).strip():
        raise CompileError("empty target")
    text = str(spec).strip()
    if text.startswith("{") or (text.endswith(".json") and Path(text).is_file()):
        try:
            cfg = json.loads(Path(text).read_text() if not text.startswith("{") else text)
        except (OSError, json.JSONDecodeError) as exc:
            raise CompileError(f"target JSON does not parse: {exc}") from None
        if not isinstance(cfg, dict) or "kind" not in cfg:
            raise CompileError('a target JSON must be an object with a "kind", e.g. {"kind": "llvm"}')
        if arch and cfg.get("kind") == "cuda":
            cfg["arch"] = arch
        host = cfg.get("host", cfg) if cfg.get("kind") == "cuda" else cfg
        cross = AARCH64_CXX if str(host.get("mtriple", "")).startswith("aarch64") and not _host_is_aarch64() else None
        if cfg.get("kind") == "cuda" and "host" not in cfg:
            cfg["host"] = host_cpu_config()
        ts = TargetSpec("json", cfg, cross)
        ts.tvm_target()  # validate now: an unknown kind or attribute is a user error
        return ts
    name = ALIASES.get(text.lower(), text.lower())
    if name == "llvm":
        if arch:
            raise CompileError("--arch applies to CUDA targets only")
        return TargetSpec("llvm", host_cpu_config())
    if name == "cuda":
        a = arch or DEFAULT_CUDA_ARCH
        _check_arch(a)
        return TargetSpec("cuda", {"kind": "cuda", "arch": a, "host": host_cpu_config()})
    if name in PRESETS:
        p = PRESETS[name]
        cfg = json.loads(json.dumps(p["target"]))
        if arch:
            if cfg["kind"] != "cuda":
                raise CompileError(f"--arch applies to CUDA targets only, not {name}")
            _check_arch(arch)
            cfg["arch"] = arch
        cross = p["cross"] if not _host_is_aarch64() else None
        return TargetSpec(name, cfg, cross)
    raise CompileError(f"unknown target {spec!r} (known: {', '.join(known_targets())}, or a TVM target JSON)")


def _check_arch(arch: str) -> None:
    if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
        raise CompileError(f"invalid CUDA arch {arch!r} (expected e.g. sm_80, sm_87, sm_90)")


def _host_is_aarch64() -> bool:
    return os.uname().machine in ("aarch64", "arm64")


def check_toolchain(ts: TargetSpec, artifact_format: str) -> None:
    """Fail early (CompileError) when a tool the artifact needs is missing."""
    if ts.is_cross and artifact_format == "so" and shutil.which(ts.cross_compiler) is None:
        raise CompileError(
            f"cross compiler {ts.cross_compiler} not found (needed to link a .so for {ts.name}; "
            "install g++-aarch64-linux-gnu, or write a .tar to link on the board)")
    if ts.kind == "cuda" and shutil.which("nvcc") is None:
        # the artifact must hold a GPU binary: TVM compiles CUDA with nvcc here (its NVRTC path
        # needs a driver)
        raise CompileError("CUDA target needs nvcc (CUDA toolkit) on PATH to build GPU binaries")


def cross_fcompile(ts: TargetSpec):
    """The ``fcompile`` for ``export_library`` (None: the host compiler)."""
    if not ts.is_cross:
        return None
    from tvm.support import cc  # noqa: PLC0415

    return cc.cross_compiler(ts.cross_compiler)


# ------------------------------------------------------------------------------ CUDA without driver
_CUDA_STUB_C = r"""
/* Minimal libcuda.so.1 for compiling on machines without an NVIDIA driver: lets TVM load its CUDA
 * runtime library (and so embed real GPU binaries); every call fails with CUDA_ERROR_NO_DEVICE. */
typedef int CUresult;
#define NO_DEVICE 100
CUresult cuDeviceGetName(char *n, int l, int d) { return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { return NO_DEVICE; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "no NVIDIA driver on this machine"; return 0; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { return NO_DEVICE; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { return NO_DEVICE; }
CUresult cuModuleLoadData(void **m, const void *i) { return NO_DEVICE; }
CUresult cuModuleUnload(void *m) { return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *t, int a, unsigned r, void *g, const void *d, const void *s,
                                const void *b, const void *e, int i, int sw, int l2, int f) { return NO_DEVICE; }
"""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cwhawq"


def has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def ensure_cuda_runtime() -> bool:
    """Make TVM's CUDA runtime library available so CUDA modules are built as GPU binaries.

    With a driver this just loads it; without one a stub ``libcuda.so.1`` is built (once, in the
    user cache) and loaded first. Returns True when a real driver is present.
    """
    _LOADED_LIBS = tvm_compat.loaded_libs()
    driver = has_cuda_driver()
    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return driver
    if not driver:
        stub = _cache_dir() / "cuda-stub" / "libcuda.so.1"
        if not stub.exists():
            cc_bin = shutil.which("cc") or shutil.which("gcc")
            if cc_bin is None:
                raise CompileError("no NVIDIA driver and no C compiler to build the CUDA stub library")
            stub.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "stub.c"
                src.write_text(_CUDA_STUB_C)
                out = Path(tmp) / "libcuda.so.1"
                subprocess.run([cc_bin, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(out),
                                str(src)], check=True, capture_output=True)
                os.replace(out, stub)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    runtime_dir = Path(tvm_compat.lib_path(_LOADED_LIBS["tvm_runtime"])).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        raise CompileError(f"cannot load TVM's CUDA runtime library: {_first_line(exc)}") from None
    return driver
