"""Latency of zoo:resnet20-fmnist on this CPU (issue 8) -> docs/latency.md and docs/latency.json.

    .venv/bin/python benchmarks/bench_latency.py [--sens sens.json] [--rounds 3] [--batches 1,32]

Everything in one run: plans (uniform W8A8 and W4A8; cw-greedy and hawq-v3 mixed plans from a
sensitivity analysis, run here unless --sens is given), their ONNX exports, compilation for this
CPU at every batch size, fp32 in onnxruntime and in TVM (our fp32 kernels, and TVM's default
schedules), a latency table per batch size (fresh cache unless --cache), and ``rounds`` rounds of
measurements in which every row is measured once, one after the other (cwhawq.bench: TVM's time
evaluator; by default 100 results of ~1 ms each and their median). A row's number is the median
over the rounds. TVM and onnxruntime are timed in two separate worker processes, never while
anything else of this script runs. The table's prediction of every quantized plan is compared with
its measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODEL = "zoo:resnet20-fmnist"
PLANS = [  # (row label, method, options)
    ("W8A8 uniform", "uniform", {"w_bits": 8}),
    ("W4A8 uniform", "uniform", {"w_bits": 4}),
    ("cw-greedy bits:4 (channel-wise 8/4/2, A8)", "cw-greedy", {"budget": "bits:4"}),
    ("cw-greedy bits:3 (channel-wise 8/4/2, A8)", "cw-greedy", {"budget": "bits:3"}),
    ("hawq-v3 bits:3 (layer-wise 8/4/2, A8)", "hawq-v3", {"budget": "bits:3"}),
]
TARGET_S = 2.0   # measuring time per row and round: repeats = clamp(TARGET_S / per call, 5, 100)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(pool, art, batch, probe_cache):
    """Median (and stats) of one row: repeats sized so that a row takes about TARGET_S."""
    from cwhawq.bench import make_job, summarize

    key = (str(art), batch)
    if key not in probe_cache:
        probe = pool.run(make_job(art, batch=batch, warmup=1, repeat=3))
        probe_cache[key] = min(probe["results_s"])
    per_call = probe_cache[key]
    repeat = int(min(100, max(5, TARGET_S / max(per_call, 1e-6))))
    warmup = int(min(10, max(1, 0.5 / max(per_call, 1e-6))))
    res = pool.run(make_job(art, batch=batch, warmup=warmup, repeat=repeat))
    return {**summarize(res["results_s"]), "repeat": repeat, "warmup": warmup}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sens", help="sensitivity JSON (default: run cwhawq analyze here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--cache", help="latency cache directory (default: a fresh one: everything measured now)")
    ap.add_argument("--out", default="docs/latency.md")
    ap.add_argument("--json", dest="json_out", default="docs/latency.json")
    args = ap.parse_args()

    from cwhawq import api
    from cwhawq.backends.tvm import compile_model
    from cwhawq.bench import BoardPool
    from cwhawq.export import export_onnx
    from cwhawq.graph import qmodel_from_loaded
    from cwhawq.latency import build_table, fp32_onnx, tool_version
    from cwhawq.models import load_model

    t_start = time.time()
    load_start = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    cache = args.cache or str(work / "cache")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    loaded = load_model(MODEL)
    infos = qmodel_from_loaded(loaded).layer_infos
    sens = args.sens
    if sens is None and any(m != "uniform" for _, m, _ in PLANS):
        sens = str(work / "sens.json")
        t0 = time.time()
        api.analyze(MODEL, out=sens)
        log(f"sensitivity analysis: {time.time() - t0:.0f} s")
    plans = []
    for label, method, opts in PLANS:
        p = api.make_plan(method, MODEL, sens=sens if method != "uniform" else None, **opts)
        plans.append((label, p, p.compute_metrics(infos)))

    # ---------------------------------------------------------------- ONNX, artifacts
    fp32_path = work / "fp32.onnx"
    fp32_onnx(loaded, fp32_path)
    onnx_paths = {}
    for label, p, _ in plans:
        onnx_paths[label] = work / f"plan{len(onnx_paths)}.onnx"
        export_onnx(MODEL, p, onnx_paths[label], verify=0, rounding="nearest")   # codes do not change latency
    rows = [("fp32, onnxruntime", "ort", None)]
    rows += [("fp32, TVM default schedules (--no-kernels)", "tvm-nokernels", None),
             ("fp32, TVM + cwhawq fp32 kernels", "tvm-fp32", None)]
    rows += [(label, "plan", p) for label, p, _ in plans]
    arts: dict[tuple, Path] = {}
    for b in batches:
        arts[("fp32, onnxruntime", b)] = fp32_path
        for label, kind, p in rows[1:]:
            out = work / f"{kind}-{len(arts)}-b{b}.so"
            src = fp32_path if kind != "plan" else onnx_paths[label]
            t0 = time.time()
            compile_model(src, "llvm", out, batch=b, kernels=kind != "tvm-nokernels")
            log(f"compiled {label} at batch {b}: {time.time() - t0:.0f} s")
            arts[(label, b)] = out

    # ---------------------------------------------------------------- latency tables (compile, then measure)
    tables = {}
    for b in batches:
        t0 = time.time()
        tables[b] = build_table(MODEL, "llvm", work / f"table-b{b}.json", batch=b, grid=args.grid, cache_dir=cache,
                                log=log)
        tables[b].data["build_seconds"] = round(time.time() - t0, 1)

    # ---------------------------------------------------------------- measurements
    results: dict[tuple, list] = {}
    probes: dict = {}
    with BoardPool() as tvm_pool, BoardPool() as ort_pool:
        for r in range(args.rounds):
            for b in batches:
                for label, kind, _ in rows:
                    pool = ort_pool if kind == "ort" else tvm_pool
                    m = measure(pool, arts[(label, b)], b, probes)
                    results.setdefault((label, b), []).append(m)
                    log(f"round {r + 1} batch {b} {label}: {m['median_s'] * 1e3:.3f} ms")
    load_end = os.getloadavg()

    import numpy as np

    def med(label, b):
        return float(np.median([m["median_s"] for m in results[(label, b)]]))

    def ratio(label, b, ref="fp32, onnxruntime"):
        """Median over rounds of the per-round ratio: rows of one round ran under the same load."""
        return float(np.median([m["median_s"] / r["median_s"] for m, r in zip(results[(label, b)],
                                                                               results[(ref, b)])]))

    def quietest(label, b):
        return float(min(m["median_s"] for m in results[(label, b)]))

    # ---------------------------------------------------------------- report
    shown, skip = [], False
    for a in sys.argv[1:]:  # where the report goes is not part of the measurement
        if skip or a in ("--out", "--json") or a.startswith(("--out=", "--json=")):
            skip = a in ("--out", "--json") and not skip
            continue
        shown.append(a)
    cmd = " ".join([".venv/bin/python benchmarks/bench_latency.py", *shown])
    tv = tool_version()
    lines = ["# Latency on this CPU: zoo:resnet20-fmnist", "",
             f"Measured by `{cmd.strip()}` in one run ({(time.time() - t_start) / 60:.0f} min), "
             f"on {cpu_name()}, {os.cpu_count()} logical CPUs shared with other jobs (load average "
             f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end), TVM {tv['tvm']}, target `llvm` "
             f"(this CPU), Python {platform.python_version()}.", "",
             "Each number is the median over "
             f"{args.rounds} rounds of the median of up to 100 short runs (`cwhawq bench`: TVM's time evaluator, "
             "or onnxruntime with its default threads, each in its own worker process; every row measured once per "
             "round, rows one after another). Latency per call of the whole batch; ratio = latency / "
             "onnxruntime fp32 latency at the same batch and round (below 1: faster than onnxruntime), median over "
             "the rounds. The CPU is shared: a call that lasts longer than other processes' time slices (batch 32) "
             "cannot avoid them, and its latency follows their load (the per-round medians are in "
             "docs/latency.json; the quietest round is the last column).", ""]
    hdr = ("| model | " + " | ".join(f"batch {b}: median ms | ratio to ORT fp32" for b in batches)
           + " | " + " | ".join(f"batch {b} quietest round ms" for b in batches) + " |")
    lines += [hdr, "|---|" + "---:|---:|" * len(batches) + "---:|" * len(batches)]
    for label, kind, _ in rows:
        cells = []
        for b in batches:
            cells += [f"{med(label, b) * 1e3:.3f}", f"{ratio(label, b):.2f}"]
        cells += [f"{quietest(label, b) * 1e3:.3f}" for b in batches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Plans (weights of the 22 quantized layers; activations 8 bits everywhere):", ""]
    lines += ["| plan | avg weight bits | weights by bits (8/4/2) | size vs fp32 |", "|---|---:|---|---:|"]
    for label, p, m in plans:
        h = m["w_bits_hist"]
        lines.append(f"| {label} | {m['avg_w_bits']:.2f} | "
                     f"{' / '.join(f'{h.get(str(k), 0) * 100:.0f}%' for k in (8, 4, 2))} | {m['size_ratio']:.3f} |")

    lines += ["", "## Prediction check", "",
              "The latency table (`cwhawq latency-table zoo:resnet20-fmnist --target llvm --batch B`, grid "
              f"{args.grid}, built in this run) predicts each plan's latency from its layers measured alone "
              "(`docs/latency-tables.md`). Measured: the plan's quietest round above (the table likewise keeps the "
              "least-contended of three medians for whole models, and single layers, shorter than a time slice, "
              "mostly dodge the other processes). Goal: within 15%.", "",
              "| plan | batch | predicted ms | measured ms | error | predicted / measured ratio to TVM fp32 |",
              "|---|---:|---:|---:|---:|---:|"]
    checks = []
    for b in batches:
        t = tables[b]
        tvm_fp32 = quietest("fp32, TVM + cwhawq fp32 kernels", b)
        for label, p, _ in plans:
            pred, meas = t.predict(p), quietest(label, b)
            checks.append({"plan": label, "batch": b, "predicted_s": pred, "measured_s": meas,
                           "rel_error": pred / meas - 1, "predicted_ratio": t.ratio(p),
                           "measured_ratio": meas / tvm_fp32})
            lines.append(f"| {label} | {b} | {pred * 1e3:.3f} | {meas * 1e3:.3f} | {(pred / meas - 1) * 100:+.1f}% | "
                         f"{t.ratio(p):.3f} / {meas / tvm_fp32:.3f} |")
    worst = max(abs(c["rel_error"]) for c in checks)
    lines += ["", f"Largest error: {worst * 100:.1f}%. The table's own fp32 model measurement (its denominator): "
              + ", ".join(f"batch {b} {tables[b].fp32_seconds * 1e3:.3f} ms" for b in batches) + "."]

    lines += ["", "## Per-layer latency table", "",
              "Each distinct layer shape of resnet20 compiled alone for this CPU (us per call; W8/W4/W2: every "
              "output channel at that weight width, activations 8-bit with the digit count D the model's calibrated "
              "ranges give: one int8 digit per activation value, or two). Build time and cache: "
              + ", ".join(f"batch {b}: {tables[b].data['build_seconds']:.0f} s, {tables[b].data['stats']['measurements']}"
                          f" measurements" for b in batches) + ".", ""]
    lines += ["| layer shape | layers | D | " + " | ".join(f"b{b} fp32 | b{b} W8 | b{b} W4 | b{b} W2" for b in batches)
              + " |", "|---|---:|---:|" + "---:|" * (4 * len(batches))]
    t1 = tables[batches[0]]
    for sid, s in t1.data["shapes"].items():
        members = [e["name"] for e in t1.data["layers"] if e["shape"] == sid]
        first = members[0]
        info = next(i for i in infos if i.name == first)
        a8 = [8] * info.in_channels
        cells = []
        for b in batches:
            t = tables[b]
            cells.append(f"{t.layer_fp32_seconds(first) * 1e6:.1f}")
            for w in (8, 4, 2):
                cells.append(f"{t.layer_seconds(first, [w] * info.out_channels, a8) * 1e6:.1f}")
        lines.append(f"| {s['describe']} | {len(members)} | {t1.digits(first, a8)} | " + " | ".join(cells) + " |")
    lines += ["", "Overhead term (fp32 model minus its layers alone): "
              + ", ".join(f"batch {b} {tables[b].overhead_seconds * 1e3:+.3f} ms" for b in batches) + "."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.json_out).write_text(json.dumps({
        "command": cmd.strip(), "cpu": cpu_name(), "load": [load_start, load_end], "tool": tv,
        "rows": {f"{label}@{b}": results[(label, b)] for label, _, _ in rows for b in batches},
        "checks": checks, "plans": {label: m for label, _, m in plans},
        "tables": {str(b): tables[b].data for b in batches}}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
