"""DDPG search results against the baselines (issue 5), on zoo:resnet20-fmnist, several seeds.

    .venv/bin/python benchmarks/search_results.py [--episodes 300] [--seeds 0,1,2] [--jobs 1]
        [--threads 2] [--workdir runs/search_results] [--doc docs/results.md]

Settings (those of benchmarks/plan_results.py): average weight bits 4, 3 and 2.5 with 8-bit
activations, and bops:0.02 with mixed activations; bit set {2, 4, 8}. For each setting and seed:
``cwhawq search`` (defaults otherwise), then the plan's accuracy on the full test split with the same
simulation as ``cwhawq eval --plan`` (pow2 activation scales, no fine-tune). The baselines (uniform,
hawq-v3, cw-greedy, deterministic) are planned from the same sensitivity file and evaluated the same
way, in the same run. ``--jobs N`` runs N searches at once (each with ``--threads`` torch threads).

Writes the section between <!-- search:begin --> and <!-- search:end --> of ``--doc`` (the rest of
the file is left alone), docs/results-search.json (rows that benchmarks/plan_results.py adds to the
Pareto plot), and redraws docs/pareto.png when docs/results-baselines.json exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "zoo:resnet20-fmnist"
SETTINGS = [("bits:4", "8"), ("bits:3", "8"), ("bits:2.5", "8"), ("bops:0.02", "mixed")]
METHOD = "cw-hawq (ddpg)"


def _label(budget, a_bits):
    return budget if a_bits == "8" else f"{budget} mixed act"


def replace_section(path, begin, end, body):
    from cwhawq.io import replace_marked_section

    replace_marked_section(path, begin, end, body, header="")


def run_one(job: dict) -> dict:
    """One search + its test accuracy (runs in a worker process)."""
    import torch

    torch.set_num_threads(job["threads"])
    from cwhawq import api

    out = Path(job["workdir"]) / f"ddpg_{job['budget'].replace(':', '')}_{job['a_bits']}_s{job['seed']}.json"
    t0 = time.time()
    plan = api.search(MODEL, sens=job["sens"], budget=job["budget"], a_bits=job["a_bits"], episodes=job["episodes"],
                      seed=job["seed"], out=str(out), resume=job["resume"])
    t_search = time.time() - t0
    rep = api.evaluate(MODEL, split="test", plan=str(out))
    s, m = plan.meta["search"], plan.metrics
    row = {"budget": job["budget"], "a_bits": job["a_bits"], "seed": job["seed"], "accuracy": rep["accuracy"],
           "val_accuracy": s["val_accuracy"], "best_episode": s["best_episode"], "episodes": s["episodes"],
           "search_seconds": t_search, "size_kib": m["weight_bytes"] / 1024, "avg_w_bits": m["avg_w_bits"],
           "avg_a_bits": m["avg_a_bits"], "bops_ratio": m["bops_ratio"], "plan": str(out),
           "threads": job["threads"], "jobs": job["jobs"]}
    print(json.dumps(row), flush=True)
    return row


def baselines(sens_path: str, workdir: Path) -> list[dict]:
    from cwhawq import api

    rows = []
    todo = [("uniform", "W8A8", None, "8", 8), ("uniform", "W4A8", None, "8", 4)]
    for budget, a_bits in SETTINGS:
        for method in ("hawq-v3", "cw-greedy"):
            todo.append((method, _label(budget, a_bits), budget, a_bits, None))
    for method, label, budget, a_bits, w_bits in todo:
        path = workdir / f"{method}_{label.replace(':', '').replace(' ', '_')}.json"
        if method == "uniform":
            plan = api.make_plan("uniform", MODEL, w_bits=w_bits, a_bits=a_bits, out=str(path))
        else:
            plan = api.make_plan(method, MODEL, sens=sens_path, budget=budget, a_bits=a_bits, out=str(path))
        rep = api.evaluate(MODEL, split="test", plan=str(path))
        m = plan.metrics
        rows.append({"method": method, "setting": label, "accuracy": rep["accuracy"],
                     "size_kib": m["weight_bytes"] / 1024,
                     "avg_w_bits": m["avg_w_bits"], "avg_a_bits": m["avg_a_bits"], "bops_ratio": m["bops_ratio"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default=None, help="subset, e.g. 'bits:3/8,bops:0.02/mixed'")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per search")
    ap.add_argument("--workdir", default="runs/search_results")
    ap.add_argument("--sens", default=None, help="sensitivity JSON (default: analyze defaults, computed here)")
    ap.add_argument("--resume", action="store_true", help="resume interrupted searches from their checkpoints")
    ap.add_argument("--runs-only", default=None, metavar="RUNS.json",
                    help="only run the searches (and their test accuracy); write their rows to RUNS.json")
    ap.add_argument("--from-runs", default=None, metavar="RUNS.json",
                    help="skip the searches: take their rows from RUNS.json (e.g. measured on another machine)")
    ap.add_argument("--note", default="", help="where/how the searches ran (added to the doc)")
    ap.add_argument("--doc", default="docs/results.md")
    ap.add_argument("--json", default="docs/results-search.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cwhawq import api

    t_start = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sens = args.sens or str(work / "sens.json")
    if args.sens is None and not Path(sens).exists():
        api.analyze(MODEL, out=sens)
    settings = SETTINGS if not args.settings else [tuple(s.split("/")) for s in args.settings.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [{"budget": b, "a_bits": a, "seed": s, "episodes": args.episodes, "sens": sens, "workdir": str(work),
             "threads": args.threads, "jobs": args.jobs, "resume": args.resume} for b, a in settings for s in seeds]
    if args.from_runs:
        runs = json.load(open(args.from_runs))
        runs = [r for r in runs if (r["budget"], r["a_bits"]) in settings and r["seed"] in seeds]
    elif args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            runs = list(ex.map(run_one, jobs))
    else:
        runs = [run_one(j) for j in jobs]
    if args.runs_only:
        Path(args.runs_only).write_text(json.dumps(runs, indent=1) + "\n")
        return
    base = baselines(sens, work)
    write_outputs(runs, base, args, settings, seeds, time.time() - t_start)


def _mean_std(xs):
    import numpy as np

    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def write_outputs(runs, base, args, settings, seeds, seconds):
    import torch

    rows_json, lines = [], []
    r0 = runs[0]
    ne = sorted({int(r["episodes"]) for r in runs})
    eps = str(ne[0]) if len(ne) == 1 else f"{ne[0]} to {ne[-1]}"
    how = (f"searches from {args.from_runs}" if args.from_runs else
           f"`.venv/bin/python benchmarks/search_results.py --episodes {args.episodes} --seeds {args.seeds} "
           f"--jobs {args.jobs} --threads {args.threads}` ({seconds / 60:.0f} min in all, {os.cpu_count()} cores, "
           f"torch {torch.__version__})")
    lines += [f"Measured by {how}. {MODEL}, bit set {{2, 4, 8}}, "
              f"full test split (10000 images), simulated as `cwhawq eval --plan` does (pow2 activation scales, "
              f"no fine-tune). DDPG: {eps} episodes per search, default options, reward on 1000 "
              f"validation images; mean +- sample std over seeds {args.seeds}. Baselines from the same "
              f"sensitivity file (`cwhawq analyze` defaults). {args.note}", "",
              "| setting | uniform W4A8 | hawq-v3 | cw-greedy | DDPG mean +- std | DDPG per seed | "
              "DDPG avg W / A bits | DDPG val acc. (search) |",
              "|---|---|---|---|---|---|---|---|"]
    bmap = {(r["method"], r["setting"]): r for r in base}
    uni4 = bmap.get(("uniform", "W4A8"))
    for budget, a_bits in settings:
        label = _label(budget, a_bits)
        rs = [r for r in runs if r["budget"] == budget and r["a_bits"] == a_bits]
        mean, std = _mean_std([r["accuracy"] for r in rs])
        vmean, _ = _mean_std([r["val_accuracy"] for r in rs])
        hv, cg = bmap.get(("hawq-v3", label)), bmap.get(("cw-greedy", label))
        best_base = max(x["accuracy"] for x in (hv, cg) if x)
        mark = " **(best)**" if mean > best_base else ""
        uni = f"{uni4['accuracy'] * 100:.2f}" if (uni4 and budget == "bits:4") else "-"
        per_seed = ", ".join(f"{r['accuracy'] * 100:.2f}" for r in rs)
        wb = _mean_std([r["avg_w_bits"] for r in rs])[0]
        ab = _mean_std([r["avg_a_bits"] for r in rs])[0]
        lines.append(f"| {label} | {uni} | {hv['accuracy'] * 100:.2f} | {cg['accuracy'] * 100:.2f} | "
                     f"{mean * 100:.2f} +- {std * 100:.2f}{mark} | "
                     f"{per_seed} | {wb:.2f} / {ab:.2f} | "
                     f"{vmean * 100:.2f} |")
        rows_json.append({"method": METHOD, "setting": label, "accuracy": mean, "accuracy_std": std,
                          "accuracy_per_seed": [r["accuracy"] for r in rs], "seeds": seeds,
                          "size_kib": _mean_std([r["size_kib"] for r in rs])[0],
                          "avg_w_bits": _mean_std([r["avg_w_bits"] for r in rs])[0],
                          "avg_a_bits": _mean_std([r["avg_a_bits"] for r in rs])[0],
                          "bops_ratio": _mean_std([r["bops_ratio"] for r in rs])[0],
                          "episodes": [r["episodes"] for r in rs], "search_seconds": [r["search_seconds"] for r in rs]})
    walls = [_mean_std([r["search_seconds"] for r in runs if r["budget"] == b and r["a_bits"] == a])[0]
             for b, a in settings]
    lines += ["", "Search wall time per run: " + ", ".join(
        f"{_label(b, a)} {w / 60:.1f} min" for (b, a), w in zip(settings, walls))
        + f" (mean over seeds, {r0.get('jobs')} searches at once, {r0.get('threads')} "
        f"torch thread(s) each)."]
    text = "\n".join(lines)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows_json, indent=1) + "\n")
    replace_section(args.doc, "<!-- search:begin -->", "<!-- search:end -->", text)
    if os.path.exists(ROOT / "docs" / "results-baselines.json"):
        try:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from plan_results import pareto_plot

            pareto_plot(json.load(open(ROOT / "docs" / "results-baselines.json")), rows_json,
                        str(ROOT / "docs" / "pareto.png"))
        except Exception as e:  # the plot is a convenience; the table is the result
            print(f"pareto plot not redrawn: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
