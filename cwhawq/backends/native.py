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
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

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
