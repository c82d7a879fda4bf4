"""The whole pipeline as one command (``cwhawq demo``, which ``make demo`` runs).

On a model (default ``zoo:resnet20-fmnist``) and dataset (default Fashion-MNIST):

1. fp32 accuracy;
2. channel-wise Hessian analysis (``analyze``);
3. plans on one budget: uniform W8A8 and W4A8, layer-wise ``hawq-v3`` (ILP), channel-wise
   ``cw-greedy`` and the CW-HAWQ DDPG search;
4. simulated test accuracy of each plan;
5. export of the CW-HAWQ plan (and fp32) to ONNX, checked with onnxruntime;
6. compilation for the host CPU with TVM and our kernels, and latency measured on this machine;
7. ``report.md`` in DIR with the table, the Pareto plot, a per-layer chart of channel bits, and the
   commands that reproduce each step.

Every number in the report is measured in the run that writes it.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__


@dataclass
class DemoConfig:
    out: str = "demo_out"
    model: str = "zoo:resnet20-fmnist"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    budget: str = "bits:3"
    episodes: int = 120
    quick: bool = False
    seed: int = 0
    test_limit: int | None = None
    compile: bool = True


@dataclass
class Row:
    name: str
    plan: str | None
    accuracy: float
    size_kib: float
    avg_w_bits: float
    avg_a_bits: float
    bops_ratio: float
    latency_ms: float | None = None
    extra: dict = field(default_factory=dict)


class Log:
    def __init__(self, echo):
        self.echo = echo
        self.t0 = time.time()
        self.commands: list[tuple[str, str]] = []

    def stage(self, msg: str) -> None:
        self.echo(f"[{time.time() - self.t0:6.1f}s] {msg}")

    def cmd(self, what: str, *argv) -> None:
        self.commands.append((what, "cwhawq " + " ".join(shlex.quote(str(a)) for a in argv)))


def _time_in_subprocess(code: str, timeout: float = 600) -> dict:
    """Run a timing snippet in a fresh process (TVM's spinning thread pool must not disturb others)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "timing failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_onnxruntime(onnx_path: str, shape, repeat: int = 200) -> float:
    code = f"""
import json, time, numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(onnx_path)!r}, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random({tuple(shape)!r}, dtype=np.float32)
n = s.get_inputs()[0].name
for _ in range(20): s.run(None, {{n: x}})
ts = []
for _ in range({repeat}):
    t = time.perf_counter(); s.run(None, {{n: x}}); ts.append(time.perf_counter() - t)
print(json.dumps({{"median": float(np.median(ts))}}))
"""
    return _time_in_subprocess(code)["median"]


def time_artifact(path: str, shape) -> float:
    code = f"""
import json, numpy as np
from cwhawq.backends.tvm import load_artifact
a = load_artifact({str(path)!r})
x = np.random.default_rng(0).random({tuple(shape)!r}, dtype=np.float32)
print(json.dumps({{"median": a.time([x], number=20, repeat=7)}}))
"""
    return _time_in_subprocess(code)["median"]


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    from . import api, baselines as B, data as D
    from .evaluate import accuracy
    from .graph import qmodel_from_loaded
    from .hessian import analyze, plot_sensitivity
    from .io import write_json
    from .models import load_model
    from .plan import parse_budget
    from .quantize import Quantizer

    out = Path(cfg.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    log = Log(echo)
    budget = parse_budget(cfg.budget)
    test_limit = cfg.test_limit or (2000 if cfg.quick else None)
    episodes = min(cfg.episodes, 20) if cfg.quick else cfg.episodes

    log.stage(f"loading {cfg.model} and {cfg.data}")
    loaded = load_model(cfg.model)
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    test = D.load(cfg.data, "test", cfg.data_dir).subset(test_limit)
    train = D.load(cfg.data, "train", cfg.data_dir)
    fp32_acc = accuracy(qm, test)
    log.stage(f"fp32 accuracy {fp32_acc * 100:.2f}% on {len(test)} test images")
    log.cmd("fp32 accuracy", "eval", cfg.model, "--data", cfg.data, "--json")

    log.stage("channel-wise Hessian analysis")
    sens = analyze(qm, train, model_name=cfg.model, batch_size=128 if not cfg.quick else 64)
    write_json(out / "sens.json", sens, indent=None)
    plot_sensitivity(sens, out / "sens.png")
    log.stage(f"  {len(sens['layers'])} layers, scheme {sens['scheme']}, {sens['seconds']:.1f} s")
    log.cmd("sensitivity", "analyze", cfg.model, "--data", cfg.data, "--out", out / "sens.json", "--plot",
            out / "sens.png")

    plans = {"uniform W8A8": B.uniform(infos, 8, 8), "uniform W4A8": B.uniform(infos, 4, 8),
             "hawq-v3": B.hawq_v3(infos, sens, budget), "cw-greedy": B.cw_greedy(infos, sens, budget)}
    for key, argv in (("uniform W8A8", ("uniform", "--w-bits", 8, "--a-bits", 8)),
                      ("uniform W4A8", ("uniform", "--w-bits", 4, "--a-bits", 8)),
                      ("hawq-v3", ("hawq-v3", "--sens", out / "sens.json", "--budget", cfg.budget)),
                      ("cw-greedy", ("cw-greedy", "--sens", out / "sens.json", "--budget", cfg.budget))):
        fname = out / "plans" / (key.replace(" ", "_").lower() + ".json")
        plans[key].model = cfg.model
        plans[key].save(fname)
        log.cmd(f"plan {key}", "plan", argv[0], cfg.model, *argv[1:], "--out", fname)

    log.stage(f"CW-HAWQ DDPG search: {episodes} episodes, budget {cfg.budget}")
    from .search import search as ddpg_search

    search_dir = out / "search"
    search_dir.mkdir(exist_ok=True)
    plans["CW-HAWQ (DDPG)"] = ddpg_search(cfg.model, data=cfg.data, sens=sens, budget=cfg.budget, episodes=episodes,
                                          out=str(out / "plans" / "cw-hawq.json"), seed=cfg.seed,
                                          data_dir=cfg.data_dir, log=str(search_dir / "log.jsonl"),
                                          checkpoint=str(search_dir / "checkpoint.pt"), progress=True,
                                          warmup=min(20, max(2, episodes // 4)))
    log.cmd("plan CW-HAWQ (DDPG search)", "search", cfg.model, "--data", cfg.data, "--sens", out / "sens.json",
            "--budget", cfg.budget, "--episodes", episodes, "--warmup", min(20, max(2, episodes // 4)), "--seed", cfg.seed,
            "--out", out / "plans" / "cw-hawq.json")

    log.stage("simulated accuracy of every plan")
    qz = Quantizer(qm, api.calibration_set(cfg.data, cfg.data_dir))
    rows = [Row("fp32", None, fp32_acc, 4 * sum(i.params for i in infos) / 1024, 32, 32, 1.0)]
    for key, plan in plans.items():
        acc = accuracy(qz.apply(plan).module, test)
        m = plan.compute_metrics(infos)
        rows.append(Row(key, str(out / "plans" / (key.replace(" ", "_").lower() + ".json"))
                        if "DDPG" not in key else str(out / "plans" / "cw-hawq.json"),
                        acc, m["weight_bytes"] / 1024, m["avg_w_bits"], m["avg_a_bits"], m["bops_ratio"]))
        log.stage(f"  {key:<16} {acc * 100:6.2f}%  W {m['avg_w_bits']:.2f} bits  {m['weight_bytes'] / 1024:.1f} KiB")
    qm.reset()

    # which plans go all the way to a compiled artifact: every one in a full run, CW-HAWQ in --quick
    deployed = ["CW-HAWQ (DDPG)"] if cfg.quick else [k for k in plans if k != "cw-greedy"]
    log.stage(f"export to ONNX: fp32 and {', '.join(deployed)}")
    from .export import export_fp32, export_onnx

    rows_by = {r.name: r for r in rows}
    onnx_files = {"fp32": out / "fp32.onnx"}
    export_fp32(loaded, str(onnx_files["fp32"]))
    for key in deployed:
        slug = key.split(" (")[0].replace(" ", "_").lower()
        onnx_files[key] = out / f"{slug}.onnx"
        summ = export_onnx(loaded, plans[key], str(onnx_files[key]), data=cfg.data, data_dir=cfg.data_dir,
                           eval_split="test", eval_limit=test_limit,
                           meta={"method": plans[key].method or key, "budget": cfg.budget})
        if summ.get("accuracy"):
            rows_by[key].extra["onnxruntime_accuracy"] = summ["accuracy"].get("onnxruntime")
        log.cmd(f"export {key}", "export", cfg.model, "--plan", rows_by[key].plan, "--out", onnx_files[key])
        log.stage(f"  {key}: {onnx_files[key]} ({onnx_files[key].stat().st_size / 1024:.0f} KiB)")

    shape = (1, *loaded.input_shape)
    if cfg.compile:
        from .backends.tvm import compile_model

        log.stage("compile for the host CPU (TVM + packed kernels) and measure latency, batch 1")
        rows_by["fp32"].extra["onnxruntime_ms"] = time_onnxruntime(str(onnx_files["fp32"]), shape) * 1e3
        for name, src in onnx_files.items():
            art = out / (Path(src).stem + ".so")
            compile_model(src, target="llvm", out=art)
            rows_by[name].latency_ms = time_artifact(str(art), shape) * 1e3
            log.cmd(f"compile {name}", "compile", src, "--target", "llvm", "--out", art)
            log.cmd(f"bench {name}", "bench", art)
            log.stage(f"  {name}: TVM {rows_by[name].latency_ms:.3f} ms")

    report = write_report(cfg, out, rows, sens, plans["CW-HAWQ (DDPG)"], infos, log)
    log.stage(f"report: {report}")
    return {"report": str(report), "rows": [r.__dict__ for r in rows]}


def write_report(cfg, out: Path, rows, sens, plan, infos, log) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_text

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.scatter(r.size_kib, r.accuracy * 100, s=40)
        ax.annotate(r.name, (r.size_kib, r.accuracy * 100), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("weight size (KiB, packed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.model}, budget {cfg.budget}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)

    names = [i.name for i in infos]
    bits = sorted({b for lp in plan.layers for b in lp.w_bits})
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names)), 4))
    bottom = np.zeros(len(names))
    for b in bits:
        frac = np.array([np.mean(np.asarray(plan[n].w_bits) == b) for n in names])
        ax.bar(range(len(names)), frac, bottom=bottom, label=f"{b}-bit")
        bottom += frac
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("share of output channels")
    ax.set_title("CW-HAWQ plan: weight bits per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bits.png", dpi=110)
    plt.close(fig)

    ort = next((r.extra.get("onnxruntime_ms") for r in rows if r.name == "fp32"), None)
    lines = [f"# cwhawq demo report", "",
             f"cwhawq {__version__}, {cfg.model} on {cfg.data}, budget `{cfg.budget}`, "
             f"{'quick' if cfg.quick else 'full'} run of {time.time() - log.t0:.0f} s on {os.cpu_count()} cores. "
             f"All numbers below were measured in this run.", "",
             "| method | test accuracy | avg W bits | avg A bits | weight size (KiB) | BOPs ratio | latency batch 1, TVM llvm (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
        lines.append(f"| {r.name} | {r.accuracy * 100:.2f}% | {r.avg_w_bits:.2f} | {r.avg_a_bits:.2f} | "
                     f"{r.size_kib:.1f} | {r.bops_ratio:.4f} | {lat} |")
    if ort is not None:
        lines += ["", f"- onnxruntime fp32 on the same CPU, batch 1: {ort:.3f} ms (a separate process). The TVM "
                      f"latencies are of the compiled artifacts (our packed kernels; fp32 layers on our fp32 kernels), "
                      f"median of TVM's time evaluator."]
    for r in rows:
        if r.extra.get("onnxruntime_accuracy") is not None:
            lines += [f"- exported {r.name} ONNX in onnxruntime: {r.extra['onnxruntime_accuracy'] * 100:.2f}% "
                      f"(simulation {r.accuracy * 100:.2f}%)."]
    lines += ["", "![accuracy against size](pareto.png)", "", "![channel bits per layer](bits.png)", "",
              "![channel-wise Hessian traces](sens.png)", "", "## Reproduce each step", ""]
    lines += [f"- {what}: `{cmd}`" for what, cmd in log.commands]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
