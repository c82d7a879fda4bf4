"""The whole pipeline as one command (``cwhawq demo``, which ``make demo`` runs).

On a model (default ``zoo:resnet20-fmnist``) and dataset (default Fashion-MNIST):

1. fp32 accuracy;
2. channel-wise Hessian analysis (``analyze``);
3. plans on one budget: uniform W8A8 and W4A8, layer-wise ``hawq-v3`` (ILP), channel-wise
   ``cw-greedy`` and the CW-HAWQ DDPG search;
4. simulated test accuracy of each plan;
5. export of the CW-HAWQ plan (and fp32) to ONNX, checked with onnxruntime;
6. compilation for the host CPU with TVM and our kernels, and latency measured on this machine: every
   artifact and the fp32 ONNX file in onnxruntime, in the same three rounds of 100 short runs
   (:func:`cwhawq.latency.measure_artifacts`, the statistics of ``cwhawq bench``). A model the
   compiler refuses (a :class:`cwhawq.errors.CompileError`, e.g. an operator it cannot lower yet) ends
   this step with a warning: the report is written without latencies and says why;
7. ``report.md`` in DIR with the table, the Pareto plots (accuracy against size and against measured
   latency), a per-layer chart of channel bits, and the commands that reproduce each step.

Every number in the report is measured in the run that writes it.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CompileError


@dataclass
class DemoConfig:
    out: str = "demo_out"
    model: str = "zoo:resnet20-fmnist"
    data: str | None = None          # None: the zoo model's own dataset (required for a .pt2)
    data_dir: str | None = None
    budget: str = "bits:3"
    episodes: int = 200
    quick: bool = False
    seed: int = 0
    test_limit: int | None = None
    compile: bool = True
    resume: bool = False
    rounding: str = "learned"         # weight rounding of every plan: learned | nearest
    rounding_iters: int | None = None  # None: the default (fewer steps with --quick)


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
    nearest_accuracy: float | None = None   # the same plan with nearest rounding
    rounding_s: float | None = None         # seconds of learned rounding
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


QUICK_EPISODES = 60
QUICK_TEST_IMAGES = 2000
QUICK_ROUNDING_ITERS = 100
QUICK_MAX_PROBES = 32    # Hutchinson probes at most with --quick (networks that are not piecewise linear)


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    from . import baselines as B, data as D
    from .evaluate import accuracy
    from .graph import qmodel_from_loaded
    from .hessian import analyze, plot_sensitivity
    from .io import write_json
    from .models import load_model
    from .plan import parse_budget
    from .quantize import Quantizer
    from .simulate import calibration_set, rounding_config

    from .checks import check_labels, check_outputs, data_file, model_classes, model_identity, require_data
    from .evaluate import check_input_shape

    out = Path(cfg.out)
    budget = parse_budget(cfg.budget)
    check_outputs([("--out", out)], [("--data", data_file(cfg.data))], directory=True)
    cfg.data = require_data(cfg.model, cfg.data, "run the demo on")
    log = Log(echo)
    test_limit = cfg.test_limit or (QUICK_TEST_IMAGES if cfg.quick else None)
    episodes = min(cfg.episodes, QUICK_EPISODES) if cfg.quick else cfg.episodes
    riters = cfg.rounding_iters if cfg.rounding_iters is not None else (QUICK_ROUNDING_ITERS if cfg.quick else None)
    rcfg = rounding_config(cfg.rounding, riters, cfg.seed)
    rargs = (["--rounding", "nearest"] if rcfg is None else
             (["--rounding-iters", riters] if riters is not None else []) + (["--rounding-seed", cfg.seed] if cfg.seed else []))

    log.stage(f"loading {cfg.model} and {cfg.data}")
    loaded = load_model(cfg.model)
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    test = D.load(cfg.data, "test", cfg.data_dir).subset(test_limit)
    train = D.load(cfg.data, "train", cfg.data_dir)
    for ds in (test, train):
        check_input_shape(loaded.input_shape, ds)
        check_labels(ds, model_classes(loaded))
    (out / "plans").mkdir(parents=True, exist_ok=True)   # nothing is written before the input is checked
    fp32_acc = accuracy(qm, test)
    log.stage(f"fp32 accuracy {fp32_acc * 100:.2f}% on {len(test)} test images")
    dargs = ["--data", cfg.data] + (["--data-dir", cfg.data_dir] if cfg.data_dir else [])
    limit = ["--limit", test_limit] if test_limit else []
    log.cmd("fp32 accuracy", "eval", cfg.model, *dargs, *limit)

    log.stage("channel-wise Hessian analysis")
    sens_batch = 64 if cfg.quick else 128
    probes = ["--max-probes", QUICK_MAX_PROBES] if cfg.quick else []
    sens = analyze(qm, train, model_name=cfg.model, batch_size=sens_batch,
                   **({"max_probes": QUICK_MAX_PROBES} if cfg.quick else {}))
    sens["model_sha256"] = model_identity(loaded)[1]
    write_json(out / "sens.json", sens, indent=None)
    plot_sensitivity(sens, out / "sens.png")
    log.stage(f"  {len(sens['layers'])} layers, scheme {sens['scheme']}, {sens['seconds']:.1f} s")
    log.cmd("sensitivity", "analyze", cfg.model, *dargs, "--batch-size", sens_batch, *probes, "--out", out / "sens.json",
            "--plot", out / "sens.png")

    plans = {"uniform W8A8": B.uniform(infos, 8, 8), "uniform W4A8": B.uniform(infos, 4, 8),
             "hawq-v3": B.hawq_v3(infos, sens, budget), "cw-greedy": B.cw_greedy(infos, sens, budget)}
    for key, argv in (("uniform W8A8", ("uniform", "--w-bits", 8, "--a-bits", 8)),
                      ("uniform W4A8", ("uniform", "--w-bits", 4, "--a-bits", 8)),
                      ("hawq-v3", ("hawq-v3", "--sens", out / "sens.json", "--budget", cfg.budget)),
                      ("cw-greedy", ("cw-greedy", "--sens", out / "sens.json", "--budget", cfg.budget))):
        fname = out / "plans" / (key.replace(" ", "_").lower() + ".json")
        plans[key].model, plans[key].model_sha256 = model_identity(loaded)
        plans[key].save(fname)
        log.cmd(f"plan {key}", "plan", argv[0], cfg.model, *argv[1:], "--out", fname)

    log.stage(f"CW-HAWQ DDPG search: {episodes} episodes, budget {cfg.budget}")
    from .search import search as ddpg_search

    search_dir = out / "search"
    search_dir.mkdir(exist_ok=True)
    tty = sys.stderr.isatty()
    every = max(1, episodes // 10)
    warmup = min(20, max(2, episodes // 4))

    def on_episode(rec):   # without a terminal (make demo > log) a line every tenth of the search
        if not tty and ((rec["episode"] + 1) % every == 0 or rec["episode"] + 1 == episodes):
            log.stage(f"  episode {rec['episode'] + 1}/{episodes}: best so far episode {rec['best_episode']}, "
                      f"val accuracy {rec['best_reward'] * 10:+.2f} points from fp32")
    plans["CW-HAWQ (DDPG)"] = ddpg_search(cfg.model, data=cfg.data, sens=sens, budget=cfg.budget, episodes=episodes,
                                          out=str(out / "plans" / "cw-hawq.json"), seed=cfg.seed,
                                          data_dir=cfg.data_dir, log=str(search_dir / "log.jsonl"),
                                          checkpoint=str(search_dir / "checkpoint.pt"), progress=tty,
                                          resume=cfg.resume, on_episode=on_episode,
                                          warmup=warmup, rounding=rcfg,
                                          log_line=lambda m: log.stage("  " + m))
    log.cmd("plan CW-HAWQ (DDPG search)", "search", cfg.model, *dargs, "--sens", out / "sens.json",
            "--budget", cfg.budget, "--episodes", episodes, "--warmup", warmup, "--seed", cfg.seed, *rargs,
            "--out", out / "plans" / "cw-hawq.json")

    from .rounding import learn_rounding

    log.stage("simulated accuracy of every plan"
              + (", nearest and learned weight rounding" if rcfg is not None else " (nearest rounding)"))
    calib = calibration_set(cfg.data, cfg.data_dir)
    log.calib_n = len(calib)
    qz = Quantizer(qm, calib)
    rows = [Row("fp32", None, fp32_acc, 4 * sum(i.params for i in infos) / 1024, 32, 32, 1.0)]
    for key, plan in plans.items():
        sim = qz.apply(plan)
        near = accuracy(sim.module, test)
        acc, secs = near, None
        if rcfg is not None:
            rep = learn_rounding(sim, calib, rcfg, progress=tty, log=None if tty else lambda m: log.stage("    " + m))
            acc, secs = accuracy(sim.module, test), rep["seconds"]
        m = plan.compute_metrics(infos)
        rows.append(Row(key, str(out / "plans" / (key.replace(" ", "_").lower() + ".json"))
                        if "DDPG" not in key else str(out / "plans" / "cw-hawq.json"),
                        acc, m["weight_bytes"] / 1024, m["avg_w_bits"], m["avg_a_bits"], m["bops_ratio"],
                        nearest_accuracy=near, rounding_s=secs))
        log.stage(f"  {key:<16} {acc * 100:6.2f}%" + (f" (nearest rounding {near * 100:.2f}%, learned in {secs:.0f} s)"
                                                     if secs is not None else "")
                  + f"  W {m['avg_w_bits']:.2f} bits  {m['weight_bytes'] / 1024:.1f} KiB")
        log.cmd(f"accuracy {key}", "eval", cfg.model, *dargs, *limit, "--plan", rows[-1].plan, *rargs)
    qm.reset()

    # which plans go all the way to a compiled artifact: every one in a full run, CW-HAWQ in --quick
    deployed = ["CW-HAWQ (DDPG)"] if cfg.quick else list(plans)
    log.stage(f"export to ONNX: fp32 and {', '.join(deployed)}")
    from .export import export_fp32, export_onnx

    rows_by = {r.name: r for r in rows}
    onnx_files = {"fp32": out / "fp32.onnx"}
    export_fp32(loaded, str(onnx_files["fp32"]))
    log.cmd("export fp32", "export", cfg.model, "--fp32", "--out", onnx_files["fp32"])
    for key in deployed:
        slug = key.split(" (")[0].replace(" ", "_").lower()
        onnx_files[key] = out / f"{slug}.onnx"
        summ = export_onnx(loaded, plans[key], str(onnx_files[key]), data=cfg.data, data_dir=cfg.data_dir,
                           eval_split="test", eval_limit=test_limit, rounding=rcfg if rcfg is not None else "nearest",
                           meta={"method": plans[key].method or key, "budget": cfg.budget})
        if summ.get("accuracy"):
            rows_by[key].extra["onnxruntime_accuracy"] = summ["accuracy"].get("onnxruntime")
        log.cmd(f"export {key}", "export", cfg.model, *dargs, "--plan", rows_by[key].plan, "--out", onnx_files[key],
                "--eval", "test", *rargs)
        log.stage(f"  {key}: {onnx_files[key]} ({onnx_files[key].stat().st_size / 1024:.0f} KiB)")

    if cfg.compile:
        try:
            _compile_and_measure(out, onnx_files, rows_by, log)
        except CompileError as exc:
            log.compile_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.stage(f"warning: compile failed, no latency measured: {log.compile_error}")

    report = write_report(cfg, out, rows, sens, plans["CW-HAWQ (DDPG)"], infos, log)
    log.stage(f"report: {report}")
    return {"report": str(report), "rows": [r.__dict__ for r in rows],
            "compile_error": getattr(log, "compile_error", None)}


def _compile_and_measure(out: Path, onnx_files: dict, rows_by: dict, log) -> None:
    """Compile every ONNX file for the host CPU and measure the artifacts and fp32 in onnxruntime."""
    from .backends.tvm import compile_model
    from .latency import measure_artifacts

    log.stage("compile for the host CPU (TVM + packed kernels)")
    arts = []
    for name, src in onnx_files.items():
        art = out / (Path(src).stem + ".so")
        compile_model(src, target="llvm", out=art, batch=1)
        arts.append((art, name))
        log.cmd(f"compile {name}", "compile", src, "--target", "llvm", "--batch", 1, "--out", art)
        log.cmd(f"bench {name}", "bench", art)
        log.stage(f"  {name}: {art} ({art.stat().st_size / 1024:.0f} KiB)")
    log.cmd("bench fp32 in onnxruntime", "bench", onnx_files["fp32"])
    log.stage("measure latency, batch 1: every artifact and fp32 in onnxruntime, 3 rounds")
    res = measure_artifacts(arts + [(onnx_files["fp32"], "fp32 onnxruntime")], "cpu", 1)
    for r in res[:-1]:
        rows_by[r["name"]].latency_ms = r["measured_s"] * 1e3
        log.stage(f"  {r['name']:<16} {r['measured_s'] * 1e3:.3f} ms")
    rows_by["fp32"].extra["onnxruntime_ms"] = res[-1]["measured_s"] * 1e3
    log.stage(f"  fp32 onnxruntime {res[-1]['measured_s'] * 1e3:.3f} ms")


def write_report(cfg, out: Path, rows, sens, plan, infos, log) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_text

    timed = [r for r in rows if r.latency_ms is not None]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 6.5, 4.2), squeeze=False)
    panels = [(axes[0][0], rows, lambda r: r.size_kib, "weight size (KiB, packed)", True)]
    if timed:
        panels.append((axes[0][1], timed, lambda r: r.latency_ms, "measured latency, batch 1, this CPU (ms)", False))
    for ax, rs, x, xlabel, logx in panels:
        for r in rs:
            ax.scatter(x(r), r.accuracy * 100, s=40)
            ax.annotate(r.name, (x(r), r.accuracy * 100), fontsize=8, xytext=(4, 2), textcoords="offset points")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.model}, budget {cfg.budget}")
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
    fp32_ms = next((r.latency_ms for r in rows if r.name == "fp32"), None)
    lines = [f"# cwhawq demo report", "",
             f"cwhawq {__version__}, {cfg.model} on {cfg.data}, budget `{cfg.budget}`, "
             f"{'quick' if cfg.quick else 'full'} run of {time.time() - log.t0:.0f} s on {os.cpu_count()} cores. "
             f"All numbers below were measured in this run.", "",
             "| method | test accuracy | avg W bits | avg A bits | weight size (KiB) | BOPs ratio | "
             "latency batch 1, TVM llvm (ms) | latency vs fp32 | test accuracy, nearest rounding | "
             "learned rounding (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
        rel = f"{r.latency_ms / fp32_ms:.2f}x" if r.latency_ms is not None and fp32_ms else "-"
        near = f"{r.nearest_accuracy * 100:.2f}%" if r.nearest_accuracy is not None else "-"
        secs = f"{r.rounding_s:.1f}" if r.rounding_s is not None else "-"
        lines.append(f"| {r.name} | {r.accuracy * 100:.2f}% | {r.avg_w_bits:.2f} | {r.avg_a_bits:.2f} | "
                     f"{r.size_kib:.1f} | {r.bops_ratio:.4f} | {lat} | {rel} | {near} | {secs} |")
    if any(r.rounding_s is not None for r in rows):
        lines += ["", f"- Weights: every plan's rounding is learned (post-training, no labels: AdaRound-style "
                      f"reconstruction on the {getattr(log, 'calib_n', '')} calibration samples, docs/rounding.md); "
                      f"the column 'nearest rounding' is the same plan with every weight rounded to the nearest code. "
                      f"The DDPG search's rewards use nearest rounding."]
    if ort is not None:
        lines += ["", f"- Latency: the compiled artifacts (our packed integer kernels; fp32 on our fp32 kernels) and, "
                      f"for reference, the fp32 ONNX file in onnxruntime ({ort:.3f} ms), all measured on this CPU in "
                      f"the same three rounds, each a median of 100 short runs in a separate worker process "
                      f"(`cwhawq bench` statistics), lowest round kept."
                      + (" --quick compiles only the CW-HAWQ plan." if cfg.quick else "")]
        q = [r.latency_ms for r in rows if r.name != "fp32" and r.latency_ms is not None]
        if q:
            lines += [f"- On this CPU the quantized artifacts take {min(q):.3f}-{max(q):.3f} ms: the weight bits "
                      f"barely move latency here (the kernels are bound by the activations' int8 digits and the "
                      f"per-layer call overhead, not by weight bytes), and repeated measurements of one artifact "
                      f"differ by up to about 8% on a shared machine, so smaller differences are noise. "
                      + (f"onnxruntime's fp32 is {min(q) / ort:.2f}x faster than the fastest of them: the measured "
                         f"gap and its cause are in docs/kernels.md. " if ort < min(q) else "")
                      + "For latency, search under a measured latency budget (`cwhawq search --target llvm "
                        "--budget latency:R`, docs/search.md)."]
    if getattr(log, "compile_error", None):
        lines += ["", f"- Latency: not measured: compiling for the host CPU failed ({log.compile_error}). Every "
                      f"step before it ran; `--no-compile` skips the step."]
    for r in rows:
        if r.extra.get("onnxruntime_accuracy") is not None:
            lines += [f"- exported {r.name} ONNX in onnxruntime: {r.extra['onnxruntime_accuracy'] * 100:.2f}% "
                      f"(simulation {r.accuracy * 100:.2f}%)."]
    lines += ["", "![accuracy against size and latency](pareto.png)", "", "![channel bits per layer](bits.png)", "",
              "![channel-wise Hessian traces](sens.png)", "", "## Reproduce each step", ""]
    lines += [f"- {what}: `{cmd}`" for what, cmd in log.commands]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
