"""Compile an ONNX model with TVM into an artifact (library + manifest), load it and run it.

:func:`compile_model` is ``cwhawq compile``: load and check the ONNX file, resolve the target,
lower the quantized (and fp32) Conv/Gemm/MatMul layers to the packed kernels
(:mod:`cwhawq.backends.onnx_import`), import the rest with TVM's Relax ONNX frontend, build with
our CPU schedules (or TVM's GPU rules for CUDA, optionally MetaSchedule with a cached database)
and write, atomically:

``<out>`` (``.so``, or ``.tar`` of objects for boards that link on-device)
    the Relax VM executable with its constants: the packed weights, so its size follows the plan;
``<out stem>.manifest.json``
    inputs and outputs (names, shapes with symbolic dimensions as names, dtypes), target, the
    plan summary, what was lowered and what fell back to fp32, tool and TVM versions, and the
    artifact's SHA-256.

:func:`load_artifact` / :func:`run_artifact` are ``cwhawq run``: check the manifest and checksum,
load the library and execute it on the local CPU or GPU.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CompileError, CwhawqError
from . import onnx_import
from .targets import TargetSpec, check_toolchain, cross_fcompile, ensure_cuda_runtime, resolve_target

MANIFEST_FORMAT = 1


class RunError(CwhawqError):
    """A problem running an artifact (bad inputs, wrong machine)."""


def manifest_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".manifest.json")


def _sha256(path: Path) -> str:
    from ..io import sha256_file

    return sha256_file(path)


def _artifact_format(out: Path) -> str:
    suf = out.suffix.lower()
    if suf == ".so":
        return "so"
    if suf == ".tar":
        return "tar"
    raise CompileError(f"output must end in .so (shared library) or .tar (objects to link on-device): {out}")


# ===================================================================================== build
def cpu_pipeline(target, database_dir: str | None = None, tune_trials: int = 0, log=None,
                 schedule_fallbacks: list | None = None):
    """Relax CPU pipeline: TVM's default passes plus schedules for every unscheduled operator;
    with ``database_dir``, MetaSchedule records (tuned first when ``tune_trials`` > 0) override
    our rules for the operators they cover. Schedule rules that could not apply to an operator
    are appended to ``schedule_fallbacks``."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    from .schedule_rules import apply_cpu_schedules  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="CwhawqCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            # exp / erf / tanh (softmax, GELU) as TVM's vectorizable polynomial approximations
            # (float32 rounding-level error) instead of scalar libm calls
            passes = [relax.transform.FastMathTransform()]
            passes += cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            if database_dir:
                if tune_trials > 0:
                    passes.append(_tune_pass(target, database_dir, tune_trials, log))
                passes.append(relax.transform.MetaScheduleApplyDatabase(database_dir))
            passes.append(apply_cpu_schedules(schedule_fallbacks))
            passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def tune_database_dir(ts: TargetSpec) -> Path:
    """The persistent tuning database of a target (``$CWHAWQ_TUNE_DIR`` or the user cache)."""
    base = os.environ.get("CWHAWQ_TUNE_DIR")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) if base else Path(cache) / "cwhawq" / "tune"
    key = hashlib.sha256(json.dumps(ts.config, sort_keys=True).encode()).hexdigest()[:16]
    return root / key


def _tune_pass(target, work_dir: str, trials: int, log=None):
    """MetaSchedule the operators our kernels do not cover (ours are already scheduled), skipping
    those already in the database, so recompiling reuses earlier tuning."""
    import tvm  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="CwhawqTune")
    def _tune(mod, _ctx):
        db = ms.database.JSONDatabase(work_dir=work_dir)
        tasks = ms.relax_integration.extract_tasks(mod, target)
        todo, cached = [], 0
        for t in tasks:
            f = t.dispatched[0]["main"]
            if f.attrs is not None and f.attrs.get("tirx.is_scheduled", False):
                continue
            if db.has_workload(t.dispatched[0]):
                cached += 1
                continue
            todo.append(t)
        if log:
            log(f"tuning {len(todo)} operator(s) x {trials} trials ({cached} cached) in {work_dir}")
        if todo:
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir)
            timeout = float(os.environ.get("CWHAWQ_TUNE_TIMEOUT", "120"))
            ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=work_dir,
                               max_trials_global=trials * len(todo), max_trials_per_task=trials,
                               num_trials_per_iter=min(trials, 64), database=db,
                               builder=ms.builder.LocalBuilder(timeout_sec=timeout),
                               runner=ms.runner.LocalRunner(timeout_sec=timeout))
        return mod

    return _tune


def build(mod, ts: TargetSpec, tune_trials: int = 0, log=None, schedule_fallbacks: list | None = None):
    """Compile a Relax IRModule for the target; returns the VM executable. CPU schedule rules that
    could not apply (the operator went to the next rule or stayed unscheduled) are appended to
    ``schedule_fallbacks``.

    With ``tune_trials`` > 0 the operators outside our kernels are tuned (those already in the
    target's database are reused) and the database is applied; tuning measures on this machine,
    so it needs the target's hardware here.
    """
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    target = ts.tvm_target()
    db_dir = tune_database_dir(ts)
    if tune_trials > 0:
        if ts.is_cross:
            raise CompileError(f"--tune measures on this machine; it cannot tune for {ts.name} (cross target)")
        if ts.device == "cuda":
            from .targets import has_cuda_driver  # noqa: PLC0415

            if not has_cuda_driver():
                raise CompileError("--tune for CUDA needs a GPU on this machine")
        db_dir.mkdir(parents=True, exist_ok=True)
    use_db = str(db_dir) if tune_trials > 0 else None
    try:
        if ts.device == "cuda":
            with _env("TVM_CUDA_COMPILE_MODE", "nvcc"), target:
                pipeline = relax.get_default_pipeline(target)
                if use_db:
                    pre = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                           relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
                    if tune_trials > 0:
                        pre.append(_tune_pass(target, use_db, tune_trials, log))
                    pre.append(relax.transform.MetaScheduleApplyDatabase(use_db))
                    pipeline = tvm.transform.Sequential(pre + [pipeline])
                return tvm.compile(mod, target=target, relax_pipeline=pipeline)
        return tvm.compile(mod, target=target,
                           relax_pipeline=cpu_pipeline(target, use_db, tune_trials, log, schedule_fallbacks))
    except CwhawqError:
        raise
    except Exception as exc:  # noqa: BLE001 - TVM build errors
        raise CompileError(f"TVM build failed for target {ts.name}: {onnx_import._line(exc)}") from None


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _shape_str(shape) -> list:
    out = []
    for d in shape:
        try:
            out.append(int(d))
        except TypeError:
            out.append(str(d))
    return out


def _relax_io(mod) -> list[dict] | None:
    """Output shapes/dtypes from the Relax main function (symbolic dims as names)."""
    from tvm import relax  # noqa: PLC0415

    try:
        ret = mod["main"].ret_type if hasattr(mod["main"], "ret_type") else None
        ty = ret if ret is not None else mod["main"].body.ty
    except Exception:  # noqa: BLE001
        return None
    tys = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
    out = []
    for t in tys:
        if not hasattr(t, "shape") or t.shape is None:
            return None
        out.append({"shape": _shape_str(list(t.shape)), "dtype": str(t.dtype)})
    return out


@dataclass
class CompileResult:
    artifact: Path
    manifest_path: Path
    manifest: dict
    report: dict


def compile_model(onnx_path: str | Path, target: str = "llvm", out: str | Path | None = None,
                  arch: str | None = None, batch: int | None = None, tune_trials: int = 0,
                  kernels: bool = True, log=None) -> CompileResult:
    """``cwhawq compile``: ONNX -> artifact + manifest (see the module docstring)."""
    onnx_path = Path(onnx_path)
    out = Path(out) if out is not None else onnx_path.with_suffix(".so")
    fmt = _artifact_format(out)
    if batch is not None and int(batch) < 1:
        raise CompileError("--batch must be a positive integer")
    ts = resolve_target(target, arch)
    check_toolchain(ts, fmt)
    if not out.parent.exists():
        raise CompileError(f"output directory does not exist: {out.parent}")
    model = onnx_import.load_onnx(onnx_path)
    if ts.device == "cuda":
        ensure_cuda_runtime()
    from ..kernels.isa import select as select_isa  # noqa: PLC0415

    tvm_target = ts.tvm_target()
    isa_obj = select_isa(tvm_target)
    isa = isa_obj.name
    if kernels and isa_obj.portable and log is not None:
        log(f"warning: no dedicated kernels for this target's instruction set ({ts.name}): using the portable "
            f"'{isa}' kernels, which are slow (known: {', '.join(n for n in _isa_names() if n != isa)})")
    result = onnx_import.analyze(model, kernels=kernels)
    mod = onnx_import.to_relax(result, isa, batch)
    sched_fallbacks: list[dict] = []
    ex = build(mod, ts, tune_trials, log, sched_fallbacks)
    report = result.report(isa if kernels else None)
    report["schedule_fallbacks"] = sched_fallbacks
    outputs = result.outputs
    rio = _relax_io(mod)
    if rio is not None and len(rio) == len(outputs):
        outputs = [{"name": o["name"], "shape": r["shape"], "dtype": r["dtype"]} for o, r in zip(outputs, rio)]
    inputs = result.inputs
    if batch is not None:
        inputs = [dict(i, shape=[int(batch) if (j == 0 and not isinstance(d, int)) else d
                                 for j, d in enumerate(i["shape"])]) for i in inputs]
    manifest = {
        "format": MANIFEST_FORMAT,
        "tool": {"name": "cwhawq", "version": __version__},
        "tvm": _tvm_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": out.name,
        "artifact_format": fmt,
        "target": dict(ts.summary(), isa=isa if kernels else None),
        "inputs": inputs,
        "outputs": outputs,
        "source": {"file": onnx_path.name, "sha256": _sha256(onnx_path)},
        "plan": _plan_summary(result.metadata),
        "lowering": report,
        "tuning": {"trials_per_operator": tune_trials, "database": str(tune_database_dir(ts))}
        if tune_trials else None,
    }
    _write_atomically(ex, ts, fmt, out, manifest)
    return CompileResult(out, manifest_path(out), manifest, report)


def _isa_names() -> list[str]:
    from ..kernels.isa import names  # noqa: PLC0415

    return names()


def _tvm_version() -> str:
    import tvm  # noqa: PLC0415

    return str(tvm.__version__)


def _plan_summary(meta: dict) -> dict | None:
    keys = {k: v for k, v in meta.items() if k.startswith("cwhawq.")}
    if not keys:
        return None
    out = {}
    for k, v in keys.items():
        short = k.split(".", 1)[1]
        if short == "plan":
            out["plan_sha256"] = hashlib.sha256(v.encode()).hexdigest()
            try:
                plan = json.loads(v)
            except json.JSONDecodeError:
                continue
            if isinstance(plan, dict):
                for pk in ("budget", "avg_bits", "avg_w_bits", "avg_a_bits", "method", "bit_choices"):
                    if pk in plan:
                        out[f"plan_{pk}"] = plan[pk]
            continue
        try:
            out[short] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[short] = v
    return out


def _write_atomically(ex, ts: TargetSpec, fmt: str, out: Path, manifest: dict) -> None:
    """Write library then manifest through temporary files in the same directory; on any error
    nothing is left behind."""
    mpath = manifest_path(out)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".cwhawq-", dir=out.parent))
    try:
        tmp_lib = tmp_dir / out.name
        try:
            if fmt == "so":
                fcompile = cross_fcompile(ts)
                if fcompile is not None:
                    ex.export_library(str(tmp_lib), fcompile=fcompile)
                else:
                    ex.export_library(str(tmp_lib))
            else:
                ex.export_library(str(tmp_lib))
        except Exception as exc:  # noqa: BLE001 - linker errors
            raise CompileError(f"exporting the library failed: {onnx_import._line(exc)}") from None
        manifest["sha256"] = _sha256(tmp_lib)
        manifest["size_bytes"] = tmp_lib.stat().st_size
        tmp_man = tmp_dir / mpath.name
        tmp_man.write_text(json.dumps(manifest, indent=2) + "\n")
        for f in (tmp_lib, tmp_man):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_lib, out)
        os.replace(tmp_man, mpath)
    finally:
        for f in tmp_dir.glob("*"):
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()


# ===================================================================================== run
def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (what onnxruntime uses by default)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
            cores.add(sib)
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def configure_threads(threads: int | None = None) -> int:
    """Set the number of threads TVM's runtime uses in this process (before it creates its pool).

    Default: ``$TVM_NUM_THREADS`` if set, else :func:`physical_cores`. TVM's own default halves the
    hardware threads on x86 (assuming SMT), which on a machine without SMT leaves half the cores
    idle, and it then queries the CPU count from /sys on every parallel launch; with the variable
    set it reads the variable instead. Returns the thread count.
    """
    if threads is None:
        env = os.environ.get("TVM_NUM_THREADS")
        threads = int(env) if env and env.strip().isdigit() and int(env) > 0 else physical_cores()
    threads = max(1, int(threads))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


def _host_arch() -> str:
    m = os.uname().machine
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


class Artifact:
    """A loaded artifact: ``run(inputs)`` returns the outputs as numpy arrays."""

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        self.path = Path(path)
        self.threads = configure_threads(threads)
        if not self.path.is_file():
            raise RunError(f"artifact not found: {self.path}")
        mp = manifest_path(self.path)
        if not mp.is_file():
            raise RunError(f"manifest not found next to the artifact: {mp}")
        try:
            self.manifest = json.loads(mp.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"cannot read manifest {mp}: {exc}") from None
        if self.manifest.get("sha256") != _sha256(self.path):
            raise RunError(f"{self.path} does not match its manifest checksum (modified or truncated)")
        tgt = self.manifest.get("target", {})
        tcfg = tgt.get("tvm", {})
        host = tcfg.get("host", tcfg) if tcfg.get("kind") == "cuda" else tcfg
        triple = str(host.get("mtriple", ""))
        if triple and not triple.startswith(_host_arch()):
            raise RunError(f"artifact was built for {triple}; run it on that machine")
        self.device_kind = device or tgt.get("device", "cpu")
        import tvm  # noqa: PLC0415
        from tvm import relax  # noqa: PLC0415

        if self.device_kind == "cuda":
            from .targets import has_cuda_driver  # noqa: PLC0415

            if not has_cuda_driver():
                raise RunError("this artifact runs on a CUDA GPU, and no NVIDIA driver is present")
            ensure_cuda_runtime()
            self.dev = tvm.cuda(0)
            if not self.dev.exist:
                raise RunError("no CUDA GPU found")
        else:
            self.dev = tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise RunError(f"cannot load {self.path}: {onnx_import._line(exc)}") from None
        self.vm = relax.VirtualMachine(lib, self.dev)

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    def _check(self, spec: dict, arr: np.ndarray) -> np.ndarray:
        want = spec["shape"]
        if arr.ndim != len(want) or any(isinstance(w, int) and w != a for w, a in zip(want, arr.shape)):
            raise RunError(f"input {spec['name']!r} has shape {list(arr.shape)}, the artifact expects {want}")
        dt = np.dtype(spec.get("dtype", "float32"))
        if arr.dtype != dt:
            if not np.can_cast(arr.dtype, dt, casting="same_kind"):
                raise RunError(f"input {spec['name']!r} has dtype {arr.dtype}, the artifact expects {dt}")
            arr = arr.astype(dt)
        return np.ascontiguousarray(arr)

    def run(self, inputs) -> list[np.ndarray]:
        import tvm  # noqa: PLC0415

        specs = self.inputs
        if isinstance(inputs, dict):
            missing = [s["name"] for s in specs if s["name"] not in inputs]
            if missing:
                raise RunError(f"missing input(s): {', '.join(missing)}")
            arrs = [inputs[s["name"]] for s in specs]
        else:
            arrs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(arrs) != len(specs):
                raise RunError(f"the artifact takes {len(specs)} input(s), got {len(arrs)}")
        args = [tvm.runtime.tensor(self._check(s, np.asarray(a)), self.dev) for s, a in zip(specs, arrs)]
        res = self.vm["main"](*args)
        outs = list(res) if not hasattr(res, "numpy") else [res]
        return [o.numpy() for o in outs]

    def time(self, inputs, number: int = 20, repeat: int = 5) -> float:
        """Median seconds per call (TVM's time evaluator)."""
        import tvm  # noqa: PLC0415

        arrs = [inputs[s["name"]] for s in self.inputs] if isinstance(inputs, dict) else list(inputs)
        args = [tvm.runtime.tensor(self._check(s, np.asarray(a)), self.dev) for s, a in zip(self.inputs, arrs)]
        f = self.vm.time_evaluator("main", self.dev, number=number, repeat=repeat)
        return float(np.median(f(*args).results))


def load_artifact(path: str | Path, device: str | None = None, threads: int | None = None) -> Artifact:
    return Artifact(path, device, threads)


def run_artifact(path: str | Path, inputs) -> list[np.ndarray]:
    """``cwhawq run``: execute an artifact on the local CPU or GPU."""
    return load_artifact(path).run(inputs)
