"""A Python-free runner for artifacts: a small C++ program over TVM's runtime libraries.

Boards (and GPU machines) that hold no Python TVM can still run an artifact: build the runner
with the board's compiler against the runtime libraries of the board's TVM wheel
(``libtvm_runtime.so``, ``libtvm_ffi.so``, ``libtvm_runtime_extra.so`` and, for CUDA,
``libtvm_runtime_cuda.so``) and call::

    cwhawq_run ARTIFACT.so cpu|cuda OUT.bin IN0.bin 1x3x28x28 [IN1.bin SHAPE ...] [--repeat N]

Inputs are raw float32 (C order) with their shapes; outputs are written as raw float32 to
``OUT.bin`` (``OUT.bin.1``, ... for further outputs) and their shapes printed as JSON, followed by
the median milliseconds per call when ``--repeat`` is given. :func:`build_runner` compiles it (also
with a cross compiler, e.g. for qemu-user checks of aarch64 artifacts).

:func:`fetch_runtime_libs` provides a board's runtime libraries: it downloads the registry's wheels
of the installed (pinned) ``apache-tvm`` and ``apache-tvm-ffi`` for the board's platform and
unpacks their runtime ``.so`` files into :func:`runtime_dir` (``make install`` does this for
aarch64, so the qemu-user test runs on every machine).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import CwhawqError

RUNNER_CC = r"""
// cwhawq_run: load a cwhawq/TVM artifact (Relax VM executable) and run its "main" function.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using tvm::ffi::Any;
using tvm::ffi::Function;
using tvm::ffi::Module;
using tvm::ffi::Tensor;

static Function Global(const char* name) {
  auto f = Function::GetGlobal(name);
  if (!f.has_value()) throw std::runtime_error(std::string("TVM runtime function missing: ") + name);
  return f.value();
}

static Tensor Alloc(const std::vector<int64_t>& shape, DLDevice dev) {
  static Function alloc = Global("runtime.TVMTensorAllocWithScope");
  return alloc(tvm::ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, dev, tvm::ffi::Optional<tvm::ffi::String>())
      .cast<Tensor>();
}

static void CopyFrom(const Tensor& t, const void* data, size_t n) {
  static Function f = Global("runtime.TVMTensorCopyFromBytes");
  f(t, const_cast<void*>(data), static_cast<int64_t>(n));
}

static void CopyTo(const Tensor& t, void* data, size_t n) {
  static Function f = Global("runtime.TVMTensorCopyToBytes");
  f(t, data, static_cast<int64_t>(n));
}

static std::vector<int64_t> ParseShape(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, 'x')) out.push_back(std::stoll(item));
  return out;
}

static std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

int main(int argc, char** argv) {
  if (argc < 6) {
    std::cerr << "usage: cwhawq_run ARTIFACT cpu|cuda OUT.bin IN.bin SHAPE [IN.bin SHAPE ...] [--repeat N]\n";
    return 2;
  }
  try {
    std::string artifact = argv[1], devname = argv[2], out_path = argv[3];
    int repeat = 0;
    std::vector<std::pair<std::string, std::string>> ins;
    for (int i = 4; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--repeat" && i + 1 < argc) { repeat = std::stoi(argv[++i]); continue; }
      if (i + 1 >= argc) throw std::runtime_error("input " + a + " has no shape");
      ins.emplace_back(a, argv[++i]);
    }
    DLDevice dev{devname == "cuda" ? kDLCUDA : kDLCPU, 0};
    Module lib = Module::LoadFromFile(artifact);
    Module vm = lib->GetFunction("vm_load_executable").value()().cast<Module>();
    const int pooled = 2;
    if (dev.device_type == kDLCPU) {
      vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, pooled);
    } else {
      vm->GetFunction("vm_initialization").value()(static_cast<int>(dev.device_type), 0, pooled,
                                                   static_cast<int>(kDLCPU), 0, pooled);
    }
    Function fmain = vm->GetFunction("main").value();
    std::vector<Any> args;
    for (auto& in : ins) {
      auto shape = ParseShape(in.second);
      int64_t n = 1;
      for (auto d : shape) n *= d;
      auto bytes = ReadFile(in.first);
      if (static_cast<int64_t>(bytes.size()) != n * 4) throw std::runtime_error("size mismatch for " + in.first);
      Tensor t = Alloc(shape, dev);
      CopyFrom(t, bytes.data(), bytes.size());
      args.push_back(t);
    }
    std::vector<tvm::ffi::AnyView> views(args.begin(), args.end());
    Any ret;
    fmain.CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
    std::vector<Tensor> outs;
    if (auto arr = ret.try_cast<tvm::ffi::Array<Any>>()) {
      for (auto v : arr.value()) outs.push_back(v.cast<Tensor>());
    } else {
      outs.push_back(ret.cast<Tensor>());
    }
    std::cout << "[";
    for (size_t i = 0; i < outs.size(); ++i) {
      const DLTensor* t = outs[i].GetDLTensorPtr();
      int64_t n = 1;
      std::cout << (i ? ", " : "") << "[";
      for (int d = 0; d < t->ndim; ++d) { n *= t->shape[d]; std::cout << (d ? ", " : "") << t->shape[d]; }
      std::cout << "]";
      std::vector<char> buf(n * 4);
      CopyTo(outs[i], buf.data(), buf.size());
      std::string p = i ? out_path + "." + std::to_string(i) : out_path;
      std::ofstream f(p, std::ios::binary);
      f.write(buf.data(), static_cast<std::streamsize>(buf.size()));
    }
    std::cout << "]" << std::endl;
    if (repeat > 0) {
      std::vector<double> ms;
      for (int r = 0; r < repeat; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        Any rr;
        fmain.CallPacked(views.data(), static_cast<int32_t>(views.size()), &rr);
        Tensor first = rr.try_cast<tvm::ffi::Array<Any>>() ? rr.cast<tvm::ffi::Array<Any>>()[0].cast<Tensor>()
                                                            : rr.cast<Tensor>();
        std::vector<char> sink(first.numel() * 4);
        CopyTo(first, sink.data(), sink.size());  // waits for the device
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::cout << "{\"median_ms\": " << ms[ms.size() / 2] << "}" << std::endl;
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
"""


def tvm_include_dirs() -> list[str]:
    """Header directories of the installed TVM (runtime) and tvm-ffi packages."""
    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415

    tvm_root = Path(tvm.__file__).parent
    ffi_root = Path(tvm_ffi.__file__).parent
    dirs = [tvm_root / "include", ffi_root / "include"]
    dl = list(ffi_root.glob("3rdparty/**/dlpack/include")) + list(tvm_root.glob("3rdparty/**/dlpack/include"))
    dirs += dl[:1]
    return [str(d) for d in dirs if d.is_dir()]


def host_runtime_lib_dirs() -> list[str]:
    """Directories of the installed (host) TVM runtime libraries."""
    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415

    return [str(Path(tvm.__file__).parent / "lib"), str(Path(tvm_ffi.__file__).parent / "lib")]


def build_runner(out: str | Path, runtime_lib_dirs: list[str] | None = None, cxx: str = "g++",
                 include_dirs: list[str] | None = None, cuda: bool = False) -> Path:
    """Compile ``cwhawq_run`` against the TVM runtime libraries in ``runtime_lib_dirs`` (default:
    the installed host TVM). The runner gets rpaths to those directories and ``$ORIGIN``."""
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"C++ compiler {cxx} not found")
    out = Path(out)
    dirs = [Path(d) for d in (runtime_lib_dirs or host_runtime_lib_dirs())]

    def have(lib):
        return any((d / f"lib{lib}.so").exists() for d in dirs)

    libs = [lib for lib in ("tvm_runtime", "tvm_ffi", "tvm_runtime_extra") if have(lib)]
    if cuda:
        libs.append("tvm_runtime_cuda")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cwhawq_run.cc"
        src.write_text(RUNNER_CC)
        cmd = [cxx, "-std=c++17", "-O2", str(src), "-o", str(out)]
        cmd += [f"-I{d}" for d in (include_dirs or tvm_include_dirs())]
        cmd += [f"-L{d}" for d in dirs] + ["-Wl,--no-as-needed"] + [f"-l{lib}" for lib in libs]
        cmd += [f"-Wl,-rpath,{d.resolve()}" for d in dirs] + ["-Wl,-rpath,$ORIGIN", "-Wl,--allow-shlib-undefined"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


# ===================================================================================== board runtimes
#: runtime libraries unpacked from the wheels (``libtvm_compiler.so`` is not needed to run artifacts)
RUNTIME_LIBS = {"tvm/lib/": ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"),
                "tvm_ffi/lib/": ("libtvm_ffi.so",)}
REQUIRED_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
#: the platform tag of the aarch64 wheels (0.27.0.post1 and 0.1.14.post1 exist only as manylinux_2_28)
PLATFORMS = {"aarch64": "manylinux_2_28_aarch64"}
_ELF_MACHINE = {"aarch64": 183, "x86_64": 62}
STAMP = "versions.json"


class RuntimeFetchError(CwhawqError):
    """The runtime libraries of a board could not be provided."""


def pinned_versions() -> dict:
    """Versions of the installed apache-tvm and apache-tvm-ffi (the ones pyproject.toml pins):
    an artifact must run on the runtime of the TVM that compiled it."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return {"apache-tvm": version("apache-tvm"), "apache-tvm-ffi": version("apache-tvm-ffi")}
    except PackageNotFoundError as exc:
        raise RuntimeFetchError(f"{exc.name} is not installed (pip install -e '.[tvm]')") from None


def runtime_dir(arch: str = "aarch64") -> Path:
    """Where the runtime libraries of ``arch`` live: ``$CWHAWQ_AARCH64_TVM_RUNTIME`` for aarch64, else
    ``$XDG_CACHE_HOME/cwhawq/<arch>-runtime`` (default ``~/.cache/cwhawq/<arch>-runtime``)."""
    env = os.environ.get(f"CWHAWQ_{arch.upper()}_TVM_RUNTIME")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "cwhawq" / f"{arch}-runtime"


def runtime_ready(dest: str | Path, arch: str = "aarch64") -> bool:
    """True when ``dest`` holds the required libraries unpacked from the installed TVM versions."""
    dest = Path(dest)
    try:
        stamp = json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return False
    want = dict(pinned_versions(), platform=PLATFORMS.get(arch, arch))
    return stamp == want and all((dest / lib).is_file() for lib in REQUIRED_LIBS)


def _elf_machine(path: Path) -> int | None:
    head = path.read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def fetch_runtime_libs(arch: str = "aarch64", dest: str | Path | None = None, force: bool = False,
                       log=None) -> Path:
    """Download the ``arch`` wheels of the installed apache-tvm and apache-tvm-ffi from the package
    index (``pip download --platform ... --only-binary=:all: --no-deps``) and unpack their runtime
    libraries into ``dest`` (default :func:`runtime_dir`). Idempotent: nothing is downloaded when
    ``dest`` already holds the libraries of these versions. The directory is replaced atomically."""
    if arch not in PLATFORMS:
        raise RuntimeFetchError(f"no wheel platform known for {arch!r} (known: {', '.join(PLATFORMS)})")
    dest = Path(dest) if dest is not None else runtime_dir(arch)
    versions = pinned_versions()
    if not force and runtime_ready(dest, arch):
        if log:
            log(f"{arch} TVM runtime libraries already in {dest}")
        return dest
    platform = PLATFORMS[arch]
    reqs = [f"{name}=={v}" for name, v in versions.items()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cwhawq-wheels-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--platform", platform, "-d", str(tmp / "wheels"), *reqs]
        if log:
            log(f"downloading the {platform} wheels of {', '.join(reqs)}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            err = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip().startswith("ERROR")]
            raise RuntimeFetchError(f"pip download of the {platform} wheels ({', '.join(reqs)}) failed: "
                                    f"{err[0] if err else (r.stderr.strip().splitlines() or ['?'])[-1]}")
        stage = tmp / "libs"
        stage.mkdir()
        for whl in sorted((tmp / "wheels").glob("*.whl")):
            with zipfile.ZipFile(whl) as zf:
                for member in zf.namelist():
                    folder, _, base = member.rpartition("/")
                    if base in RUNTIME_LIBS.get(folder + "/", ()):
                        (stage / base).write_bytes(zf.read(member))
        missing = [lib for lib in REQUIRED_LIBS if not (stage / lib).is_file()]
        if missing:
            raise RuntimeFetchError(f"the {platform} wheels of {', '.join(reqs)} hold no {', '.join(missing)}")
        for lib in stage.iterdir():
            if _elf_machine(lib) != _ELF_MACHINE[arch]:
                raise RuntimeFetchError(f"{lib.name} from the {platform} wheel is not an {arch} library")
        (stage / STAMP).write_text(json.dumps(dict(versions, platform=platform), indent=2) + "\n")
        old = tmp / "old"
        if dest.exists():
            dest.rename(old)
        stage.rename(dest)
    if log:
        log(f"{arch} TVM runtime libraries ({', '.join(sorted(p.name for p in dest.glob('*.so')))}) in {dest}")
    return dest
