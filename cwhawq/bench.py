"""Benchmarking: compiled artifacts on this machine or on boards behind a TVM RPC tracker.

``cwhawq bench ARTIFACT`` measures an artifact (``.so``/``.tar`` + manifest from ``cwhawq compile``)
with TVM's time evaluator, either here (``--device cpu|cuda``) or on a board reached through a
tracker (``--rpc HOST:PORT --key KEY``: the real ``python -m tvm.exec.rpc_tracker`` and
``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` processes). An ``.onnx`` file is
timed with onnxruntime instead (this machine only), with the same statistics.

Every measurement runs in a worker process (:class:`BoardPool`), never in the caller: the caller
keeps a deadline on every step (connect to the tracker, wait for a free board, upload, load, make
the inputs, warm up, measure) and kills the worker when one passes, so a board that dies or hangs
mid-run becomes a one-line :class:`BenchError` within ``timeout`` seconds instead of a hang. The
measuring step's deadline is ``timeout + 2 x`` the time the measurement should take (estimated
from the warm-up calls). A separate process also keeps TVM's spinning thread pool away from
whatever else the caller times.

Statistics: ``repeat`` results, each the mean of ``number`` back-to-back calls (``number=0``:
TVM picks it so that one result takes at least ``min_repeat_ms``, 1 ms by default); reported are
the median, 90th percentile, min, max, mean and standard deviation of the ``repeat`` results, in
seconds per call. Many short results (100 of ~1 ms by default) rather than a few long ones: on a
CPU shared with other processes a long result almost always contains a time slice lost to them
(measured on 2 shared cores: resnet20 W8 median 0.49 ms with 1 ms results, 0.77-1.1 ms with 20 ms
results), while most short ones contain none, so their median is the latency of the model itself.

The pool measures jobs on several boards in parallel (one worker, one RPC session per board),
re-queues the job of a board that fails on another board, and fails only when no board is left;
:mod:`cwhawq.latency` uses it to measure latency tables.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as _wait_conns
from pathlib import Path

import numpy as np

from .errors import CwhawqError

DEFAULT_TIMEOUT = 60.0      # seconds allowed for any one remote step
DEFAULT_MIN_REPEAT_MS = 1   # with number=0 (auto): short repeats, see the module docstring
STARTUP_S = 60.0            # for a worker process to start and import TVM (local, not a remote step)


class BenchError(CwhawqError):
    """A measurement that could not be made (bad artifact, unreachable or failing board)."""


# ===================================================================================== specs
@dataclass(frozen=True)
class Remote:
    """A board type behind an RPC tracker: ``key`` at tracker ``host:port``."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"rpc://{self.key}@{self.host}:{self.port}"


def parse_rpc(spec: str | None, key: str | None) -> Remote | None:
    """``HOST:PORT`` (+ key) -> :class:`Remote`; None when ``spec`` is empty."""
    if not spec:
        if key:
            raise BenchError("--key needs --rpc HOST:PORT (the tracker)")
        return None
    host, sep, port = str(spec).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"--rpc {spec!r}: expected HOST:PORT of an RPC tracker, e.g. 127.0.0.1:9190")
    if not key:
        raise BenchError("--rpc needs --key KEY (the device key the boards registered with)")
    return Remote(host, int(port), str(key))


def summarize(results) -> dict:
    """Median, p90, min, max, mean and standard deviation (seconds) of per-repeat results."""
    r = np.asarray(results, dtype=np.float64)
    if r.size == 0:
        raise BenchError("no measurement results")
    return {"median_s": float(np.median(r)), "p90_s": float(np.percentile(r, 90)), "min_s": float(r.min()),
            "max_s": float(r.max()), "mean_s": float(r.mean()), "stddev_s": float(r.std(ddof=1)) if r.size > 1 else 0.0}


def _sha256(path: Path) -> str:
    from .io import sha256_file

    return sha256_file(path)


def read_manifest(artifact: str | Path) -> dict:
    """The manifest next to a compiled artifact, checked against the artifact's SHA-256."""
    from .backends.tvm import manifest_path

    p = Path(artifact)
    if p.is_dir():
        raise BenchError(f"artifact {p} is a directory")
    if not p.is_file():
        raise BenchError(f"artifact not found: {p}")
    mp = manifest_path(p)
    if not mp.is_file():
        raise BenchError(f"manifest not found next to the artifact: {mp} (compile with cwhawq compile)")
    try:
        man = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read manifest {mp}: {exc}") from None
    if not isinstance(man, dict) or not isinstance(man.get("inputs"), list):
        raise BenchError(f"{mp} is not a cwhawq manifest (no 'inputs' list)")
    if man.get("sha256") and man["sha256"] != _sha256(p):
        raise BenchError(f"{p} does not match its manifest checksum (modified or truncated)")
    return man


def input_specs(specs: list[dict], batch: int = 1) -> list[dict]:
    """Concrete input shapes: a symbolic leading (batch) dimension becomes ``batch``."""
    out = []
    for s in specs:
        shape = []
        for j, d in enumerate(s["shape"]):
            if isinstance(d, int) and d >= 0:
                shape.append(int(d))
            elif j == 0:
                shape.append(int(batch))
            else:
                raise BenchError(f"input {s['name']!r} has a symbolic dimension {d!r} other than the batch: "
                                 f"compile with a fixed shape")
        out.append({"name": s["name"], "shape": shape, "dtype": str(s.get("dtype", "float32"))})
    return out


def make_inputs(specs: list[dict], seed: int = 0) -> list[np.ndarray]:
    """Random inputs: floats uniform in [0, 1) (images), integers zero."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        dt = np.dtype(s["dtype"])
        if np.issubdtype(dt, np.floating):
            out.append(rng.random(s["shape"], dtype=np.float32).astype(dt))
        else:
            out.append(np.zeros(s["shape"], dtype=dt))
    return out


# ===================================================================================== worker process
def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # TVM errors end with the useful line; the first lines are a traceback header
    for ln in reversed(lines):
        if "Error" in ln or "Check failed" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _worker_main(conn, remote, session_timeout):  # pragma: no cover - runs in the worker process
    """One board (or this machine): connect, then run jobs until told to stop or the pipe closes."""
    step = "start"
    try:
        import logging

        logging.disable(logging.WARNING)  # TVM's RPC retries log warnings; failures are reported to the caller
        sess = None
        import tvm  # noqa: F401 - the import is the slow part of starting
        from tvm import relax, rpc  # noqa: F401

        if remote is not None:
            conn.send(("ok", "start", {}, "connect"))
            step = "connect"
            host, port, key = remote
            tracker = rpc.connect_tracker(host, port)
            summary = tracker.summary()
            conn.send(("ok", "connect", {"summary": summary}, "request"))
            step = "request"
            sess = tracker.request(key, priority=1, session_timeout=session_timeout, max_retry=2)
        conn.send(("ok", step, {}, None))
        modules: dict = {}  # artifacts this session has loaded (uploading over a loaded library crashes it)
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "stop":
                return
            job_id, job = msg[1], msg[2]
            step = "load"
            result = _run_job(conn, sess, job, modules)
            conn.send(("result", job_id, result))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the caller
        try:
            conn.send(("err", step, _line(exc)))
        except (OSError, EOFError):
            pass


def _run_job(conn, sess, job: dict, modules: dict) -> dict:  # pragma: no cover - runs in the worker process
    if job["runtime"] == "onnxruntime":
        return _run_ort(conn, job)
    import tvm
    from tvm import relax

    path = Path(job["artifact"])
    if sess is not None:
        name = f"{job['sha256'][:16]}-{path.name}"
        if name not in modules:
            sess.upload(str(path), target=name)
        conn.send(("ok", "upload", {}, "load"))
        if name not in modules:
            modules[name] = sess.load_module(name)
        lib = modules[name]
        dev = sess.cuda(0) if job["device"] == "cuda" else sess.cpu(0)
        vm = relax.VirtualMachine(lib, dev)
    else:
        from .backends.tvm import load_artifact

        art = load_artifact(path, job["device"], threads=job.get("threads"))
        vm, dev = art.vm, art.dev
    conn.send(("ok", "load", {}, "inputs"))
    args = [tvm.runtime.tensor(a, dev) for a in make_inputs(job["inputs"], job.get("seed", 0))]
    conn.send(("ok", "inputs", {}, "warmup"))
    if int(job["warmup"]):
        vm.time_evaluator("main", dev, number=int(job["warmup"]), repeat=1)(*args)
    per_call = float(vm.time_evaluator("main", dev, number=3, repeat=1)(*args).mean)  # sizes the deadline
    conn.send(("ok", "warmup", {"per_call_s": per_call}, "measure"))
    f = vm.time_evaluator("main", dev, number=max(1, int(job["number"]) or 1), repeat=int(job["repeat"]),
                          min_repeat_ms=0 if job["number"] else int(job["min_repeat_ms"]))
    res = f(*args)
    return {"results_s": [float(v) for v in res.results], "warmup_per_call_s": per_call}


def _run_ort(conn, job: dict) -> dict:  # pragma: no cover - runs in the worker process
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if job.get("threads"):
        opts.intra_op_num_threads = int(job["threads"])
    sess = ort.InferenceSession(job["artifact"], opts, providers=["CPUExecutionProvider"])
    conn.send(("ok", "load", {}, "inputs"))
    feeds = {s["name"]: a for s, a in zip(job["inputs"], make_inputs(job["inputs"], job.get("seed", 0)))}
    conn.send(("ok", "inputs", {}, "warmup"))
    t0 = time.perf_counter()
    for _ in range(max(1, int(job["warmup"]))):
        sess.run(None, feeds)
    per_call = (time.perf_counter() - t0) / max(1, int(job["warmup"]))
    conn.send(("ok", "warmup", {"per_call_s": per_call}, "measure"))
    number = int(job["number"]) or max(1, int(np.ceil(job["min_repeat_ms"] / 1e3 / max(per_call, 1e-7))))
    results = []
    for _ in range(int(job["repeat"])):
        t0 = time.perf_counter()
        for _ in range(number):
            sess.run(None, feeds)
        results.append((time.perf_counter() - t0) / number)
    return {"results_s": results, "warmup_per_call_s": per_call, "number": number}


# ===================================================================================== the pool
class _Worker:
    def __init__(self, ctx, remote: Remote | None, index: int, timeout: float, session_timeout: float):
        self.remote = remote
        self.label = f"{remote.key}@{remote.host}:{remote.port} #{index}" if remote else "local"
        self.conn, child = ctx.Pipe()
        rem = (remote.host, remote.port, remote.key) if remote else None
        self.proc = ctx.Process(target=_worker_main, args=(child, rem, session_timeout), daemon=True,
                                name=f"cwhawq-bench-{index}")
        self.proc.start()
        child.close()
        self.timeout = timeout
        self.step = "start"
        self.deadline = time.monotonic() + max(timeout, STARTUP_S)  # a local process importing TVM
        self.ready = False
        self.job_id = None
        self.job: dict | None = None
        self.summary: dict | None = None
        self.jobs_done = 0

    def send_job(self, job_id, job: dict) -> None:
        self.job_id, self.job = job_id, job
        self.step = "upload" if self.remote else "load"
        self.deadline = time.monotonic() + self.timeout + job.get("size_bytes", 0) / 1e6  # >= 1 MB/s
        self.conn.send(("job", job_id, job))

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, EOFError, ValueError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


_STEP_TEXT = {"connect": "connecting to the tracker", "request": "waiting for a free board",
              "start": "starting", "upload": "uploading", "load": "loading the artifact",
              "inputs": "copying the inputs", "warmup": "warming up", "measure": "measuring"}


class BoardPool:
    """Measures jobs on this machine (``remote=None``, one worker) or on every free board of a key.

    ``submit(job_id, job)`` queues a job; ``collect()`` returns finished ``(job_id, result)``;
    ``drain()`` waits for all. Workers start at the first submit. A failed board's job is re-queued
    on another board (at most ``retries`` times); the pool raises :class:`BenchError` only when no
    board is left or a job failed on ``retries + 1`` boards. Use as a context manager.
    """

    def __init__(self, remote: Remote | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_boards: int | None = None, session_timeout: float = 0.0, retries: int = 1, log=None,
                 on_step=None):
        if timeout <= 0:
            raise BenchError("--timeout must be positive")
        self.remote, self.timeout = remote, float(timeout)
        self.max_boards = max(1, int(max_boards)) if max_boards else None
        self.session_timeout, self.retries = float(session_timeout), int(retries)
        self.log = log or (lambda m: None)
        self.on_step = on_step  # on_step(board label, step): progress hook (tests, progress bars)
        self.workers: list[_Worker] = []
        self.pending: list[tuple] = []   # (job_id, job)
        self.done: list[tuple] = []
        self.failures: list[str] = []
        self._started = False
        self._n = 0
        self._attempts: dict = {}
        self._step_budget: dict = {}
        self._ctx = multiprocessing.get_context("spawn")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for w in self.workers:
            if w.ready and w.job_id is None:
                w.stop()
            else:
                w.kill()
        self.workers = []

    @property
    def boards(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    def _spawn(self) -> _Worker:
        self._n += 1
        w = _Worker(self._ctx, self.remote, self._n, self.timeout, self.session_timeout)
        self.workers.append(w)
        return w

    def _start(self) -> None:
        self._started = True
        self._spawn()

    def poll(self) -> None:
        """Handle what the boards reported so far without waiting (raises as ``collect`` does)."""
        if self._started:
            self._pump(0.0)

    def start(self, wait: bool = False) -> None:
        """Connect to the boards now (e.g. while compiling) rather than at the first submit; with
        ``wait``, until every board that can be had is ready."""
        if not self._started:
            self._start()
        while wait and any(not w.ready for w in self.workers):
            self._pump(None)

    # ------------------------------------------------------------------ jobs
    def submit(self, job_id, job: dict) -> None:
        if not self._started:
            self._start()
        self._attempts.setdefault(job_id, 0)
        self.pending.append((job_id, job))
        self._dispatch()

    def collect(self, block: bool = False) -> list[tuple]:
        """Finished (job_id, result) pairs; with ``block`` wait until at least one (or none left)."""
        while True:
            self._pump(0.0 if not block or self.done else None)
            if self.done or not block or not self._busy():
                out, self.done = self.done, []
                return out

    def drain(self) -> list[tuple]:
        out = []
        while self._busy():
            out += self.collect(block=True)
        out += self.collect()
        return out

    def run(self, job: dict) -> dict:
        """Measure one job and return its result."""
        key = ("run", time.monotonic_ns())
        self.submit(key, job)
        for jid, res in self.drain():
            if jid == key:
                return res
        raise BenchError("internal: measurement lost")  # pragma: no cover

    def _busy(self) -> bool:
        return bool(self.pending) or any(w.job_id is not None for w in self.workers)

    def _dispatch(self) -> None:
        while self.pending:
            idle = [w for w in self.workers if w.ready and w.job_id is None]
            if not idle:
                return
            w = min(idle, key=lambda x: x.jobs_done)  # spread the jobs over the boards
            job_id, job = self.pending.pop(0)
            w.send_job(job_id, job)
            self._step(w)

    def _step(self, w: _Worker) -> None:
        if self.on_step is not None:
            self.on_step(w.label, w.step)

    def _fail(self, w: _Worker, msg: str) -> None:
        """A worker is gone: re-queue its job or give up."""
        w.kill()
        self.workers.remove(w)
        self.failures.append(msg)
        if w.job_id is not None:
            self._attempts[w.job_id] += 1
            if self._attempts[w.job_id] > self.retries:
                raise BenchError(msg)
            self.pending.insert(0, (w.job_id, w.job))
        if not self.workers and (self.pending or not self.done):
            raise BenchError(msg if len(self.failures) == 1 else f"{msg} (and {len(self.failures) - 1} more "
                             f"board failure(s): {'; '.join(self.failures[:-1])[:400]})")
        self.log(f"{msg}; going on with {len(self.workers)} board(s)")

    def _timeout_text(self, w: _Worker) -> str:
        waited = self._step_budget.get(id(w), self.timeout)
        where = f"tracker {self.remote.host}:{self.remote.port}" if self.remote else "this machine"
        if w.step == "connect":
            return f"cannot reach the RPC tracker at {self.remote.host}:{self.remote.port} within {waited:.0f} s"
        if w.step == "request":
            q = ((w.summary or {}).get("queue_info") or {}).get(self.remote.key, {})
            return (f"no board with key {self.remote.key!r} answered at {where} within {waited:.0f} s (the tracker "
                    f"listed {q.get('free', '?')} free, {q.get('pending', '?')} pending request(s); a board may be "
                    f"hung or busy)")
        what = f" ({Path(w.job['artifact']).name})" if w.job else ""
        return (f"board {w.label} did not answer within {waited:.0f} s while {_STEP_TEXT.get(w.step, w.step)}"
                f"{what}: it died or hangs")

    def _pump(self, wait_s: float | None) -> None:
        """Handle worker messages and deadlines; wait at most ``wait_s`` (None: until the next event)."""
        if not self.workers:
            if self.pending:
                raise BenchError("no board left to measure on")
            return
        now = time.monotonic()
        nearest = min((w.deadline for w in self.workers if w.deadline is not None), default=None)
        t = wait_s
        if nearest is not None:
            t = max(0.0, nearest - now) if t is None else min(t, max(0.0, nearest - now))
        ready = _wait_conns([w.conn for w in self.workers], timeout=t)
        by_conn = {id(w.conn): w for w in self.workers}
        for c in ready:
            w = by_conn.get(id(c))
            if w is None or w not in self.workers:
                continue
            try:
                msg = c.recv()
            except (EOFError, OSError):
                self._fail(w, f"board {w.label}: its worker process exited (code {w.proc.exitcode}) while "
                              f"{_STEP_TEXT.get(w.step, w.step)}")
                continue
            self._handle(w, msg)
        now = time.monotonic()
        for w in list(self.workers):
            if w.deadline is not None and now > w.deadline and w in self.workers:
                self._fail(w, self._timeout_text(w))
        self._dispatch()

    def _handle(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ok":
            _, step, payload, nxt = msg
            if step == "connect":
                w.summary = payload.get("summary")
                queues = (w.summary or {}).get("queue_info") or {}
                if self.remote.key not in queues:
                    keys = ", ".join(sorted(queues)) or "none"
                    w.kill()
                    self.workers.remove(w)
                    raise BenchError(f"the tracker at {self.remote.host}:{self.remote.port} has no board registered "
                                     f"under key {self.remote.key!r} (keys: {keys})")
                if w is self.workers[0] and self._n == 1:
                    free = int(queues[self.remote.key].get("free", 1))
                    extra = max(0, free - 1)
                    if self.max_boards is not None:
                        extra = min(extra, self.max_boards - 1)
                    for _ in range(extra):
                        self._spawn()
            if nxt is None:
                if not w.ready:
                    w.ready = True
                    if self.remote is not None:
                        self.log(f"{w.label}: ready")
                w.step, w.deadline = "idle", None
                return
            w.step = nxt
            self._step(w)
            budget = self.timeout
            if nxt == "measure" and w.job is not None:
                budget = self.timeout + 2.0 * _expected_measure_s(w.job, payload.get("per_call_s", 0.0))
            self._step_budget[id(w)] = budget
            w.deadline = time.monotonic() + budget
        elif kind == "result":
            _, job_id, result = msg
            w.job_id, w.job, w.step, w.deadline = None, None, "idle", None
            w.jobs_done += 1
            result["board"] = w.label
            self.done.append((job_id, result))
        elif kind == "err":
            _, step, text = msg
            hint = ""
            if any(s in text for s in ("kShutdown", "Connection", "connection", "Broken pipe", "socket")):
                hint = " (the board closed the connection: did it die?)"
            if step == "connect":
                raise_now = f"cannot connect to the RPC tracker at {self.remote.host}:{self.remote.port}: {text}"
            elif step == "request":
                raise_now = f"could not get a board with key {self.remote.key!r} from the tracker: {text}"
            else:
                what = f" ({Path(w.job['artifact']).name})" if w.job else ""
                raise_now = f"board {w.label} failed while {_STEP_TEXT.get(w.step, w.step)}{what}: {text}{hint}"
            if not w.ready and w is not self.workers[0] and any(x.ready for x in self.workers):
                # an extra board that could not be had: measure on the others
                w.kill()
                self.workers.remove(w)
                self.log(raise_now)
                return
            self._fail(w, raise_now)


def _expected_measure_s(job: dict, per_call: float) -> float:
    repeat = int(job["repeat"])
    if int(job["number"]):
        return per_call * int(job["number"]) * repeat
    # TVM grows ``number`` until one repeat lasts min_repeat_ms: the trial rounds cost up to ~2.6x
    return repeat * (3.0 * job["min_repeat_ms"] / 1e3 + per_call)


# ===================================================================================== entry point
def make_job(artifact: str | Path, device: str | None = None, batch: int = 1, warmup: int = 10, repeat: int = 100,
             number: int = 0, min_repeat_ms: int = DEFAULT_MIN_REPEAT_MS, remote: Remote | None = None,
             label: str | None = None, threads: int | None = None) -> dict:
    """A measurement job for :class:`BoardPool` (checks the artifact and its manifest here)."""
    p = Path(artifact)
    if warmup < 0 or repeat < 1 or number < 0 or min_repeat_ms < 0:
        raise BenchError("--warmup and --number must be >= 0, --repeat >= 1")
    if batch < 1:
        raise BenchError("--batch must be >= 1")
    if p.suffix.lower() == ".onnx":
        if remote is not None:
            raise BenchError("ONNX files are timed with onnxruntime on this machine; compile them for --rpc")
        if device not in (None, "cpu"):
            raise BenchError("ONNX files are timed with onnxruntime on the CPU")
        from .backends.onnx_import import load_onnx  # noqa: PLC0415 - checks the file (one-line errors)

        try:
            model = load_onnx(p)
        except CwhawqError as exc:
            raise BenchError(str(exc)) from None
        inits = {t.name for t in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            from onnx import helper  # noqa: PLC0415

            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            specs.append({"name": vi.name, "shape": shape,
                          "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type))})
        return {"runtime": "onnxruntime", "artifact": str(p.resolve()), "device": "cpu",
                "inputs": input_specs(specs, batch), "warmup": int(warmup), "repeat": int(repeat),
                "number": int(number), "min_repeat_ms": int(min_repeat_ms), "threads": threads,
                "target": "onnxruntime", "label": label or p.name, "size_bytes": p.stat().st_size, "sha256": ""}
    man = read_manifest(p)
    tgt = man.get("target", {})
    dev = device or tgt.get("device", "cpu")
    if dev not in ("cpu", "cuda"):
        raise BenchError(f"--device {dev!r}: use cpu or cuda")
    if dev != tgt.get("device", "cpu"):
        raise BenchError(f"{p.name} was compiled for {tgt.get('device', 'cpu')} ({tgt.get('name')}), not {dev}")
    if remote is None:
        tcfg = tgt.get("tvm", {})
        host = tcfg.get("host", tcfg) if tcfg.get("kind") == "cuda" else tcfg
        triple = str(host.get("mtriple", ""))
        m = os.uname().machine
        m = {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)
        if triple and not triple.startswith(m):
            raise BenchError(f"{p.name} was built for {triple}: measure it on such a board (--rpc HOST:PORT --key KEY)")
        if man.get("artifact_format") == "tar":
            raise BenchError(f"{p.name} is a .tar of objects for linking on a board: measure it there (--rpc)")
    return {"runtime": "tvm", "artifact": str(p.resolve()), "device": dev, "inputs": input_specs(man["inputs"], batch),
            "warmup": int(warmup), "repeat": int(repeat), "number": int(number), "min_repeat_ms": int(min_repeat_ms),
            "target": tgt.get("name"), "label": label or p.name, "size_bytes": p.stat().st_size,
            "sha256": man.get("sha256") or _sha256(p), "threads": threads}


def report(job: dict, result: dict, remote: Remote | None) -> dict:
    """The bench report of one finished job."""
    rep = {"artifact": job["artifact"], "runtime": job["runtime"], "target": job.get("target"),
           "where": str(remote) if remote else "local", "board": result.get("board"), "device": job["device"],
           "inputs": job["inputs"], "warmup": job["warmup"], "repeat": job["repeat"],
           "number": result.get("number", job["number"] or "auto"),
           **summarize(result["results_s"]), "results_s": result["results_s"]}
    return rep


def bench(artifact: str | Path, device: str | None = None, remote: Remote | None = None, warmup: int = 10,
          repeat: int = 100, number: int = 0, batch: int = 1, timeout: float = DEFAULT_TIMEOUT,
          min_repeat_ms: int = DEFAULT_MIN_REPEAT_MS, threads: int | None = None, log=None, on_step=None) -> dict:
    """``cwhawq bench``: time an artifact here or on a board behind a tracker (module docstring)."""
    job = make_job(artifact, device, batch, warmup, repeat, number, min_repeat_ms, remote, threads=threads)
    with BoardPool(remote, timeout=timeout, max_boards=1, log=log, on_step=on_step) as pool:
        res = pool.run(job)
    return report(job, res, remote)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def bench_text(rep: dict) -> str:
    shapes = ", ".join(f"{i['name']}{i['shape']} {i['dtype']}" for i in rep["inputs"])
    where = rep["where"] if rep["where"] == "local" else f"{rep['board']} via {rep['where']}"
    return (f"{Path(rep['artifact']).name} ({rep['runtime']}, {rep['device']}, {where}); inputs {shapes}\n"
            f"median {_ms(rep['median_s'])}  p90 {_ms(rep['p90_s'])}  min {_ms(rep['min_s'])}  "
            f"stddev {_ms(rep['stddev_s'])}  ({rep['repeat']} repeats of {rep['number']} call(s), "
            f"{rep['warmup']} warm-up)")
