"""Latency-aware search on this CPU (issue 9): at equal latency, the latency-aware DDPG plan against the
size-budget DDPG plan and the baselines, on zoo:resnet20-fmnist, batch 1, target llvm (this machine).

    .venv/bin/python benchmarks/latency_search_results.py [--episodes 200] [--seed 0]
        [--workdir runs/latency_search] [--doc docs/results.md]

1. Sensitivity (``cwhawq analyze``) and the model's latency table for ``llvm`` (``cwhawq
   latency-table``, cached measurements reused).
2. The size-budget plan: ``cwhawq search --budget bits:3`` (accuracy reward, no latency).
3. R = the table's predicted latency ratio of that plan, rounded up: the common latency budget.
4. At ``latency:R``: ``cwhawq search --latency-table`` with latency weight 0 (accuracy reward, latency
   only as the budget) and 1 (the default reward term), and ``cwhawq plan hawq-v3`` (layer-wise ILP
   under the same latency constraint, as HAWQ-V3); the search again with activations chosen per
   channel from {6, 8} (``--a-bits 6,8 --action-margin 0.05``): 6-bit activations let the kernels store one int8 digit
   per value instead of two, the largest latency lever on this CPU. For reference: hawq-v3 and
   cw-greedy at bits:3, uniform W8A8 and W4A8.
5. A tighter budget ``--tight`` (default latency:0.7), out of reach with 8-bit activations: the search
   with activations from {6, 8}, hawq-v3 with 6-bit activations, uniform W8A6 and W4A6.
6. Every plan: test accuracy on the full test split (the simulation of ``cwhawq eval --plan``), size,
   predicted latency, and measured latency: all plans and the fp32 model compiled for this CPU and
   measured in the same three rounds (``cwhawq.latency.measure_plans``; each round a median of 100
   short runs, the lowest median kept).

Writes the section between <!-- latency-search:begin --> and <!-- latency-search:end --> of ``--doc``
and docs/results-latency-search.json.

``--tight-seeds 0,1,2`` instead runs only the tight-budget search (activations from {6, 8}) with those
seeds, on the sensitivity file and latency table of an earlier run in ``--workdir``, and writes the
test accuracies (mean +- std) between <!-- latency-seeds:begin --> and <!-- latency-seeds:end -->.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "zoo:resnet20-fmnist"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size-budget", default="bits:3")
    ap.add_argument("--tight", default="latency:0.7")
    ap.add_argument("--tight-seeds", default=None, help="Only the tight-budget act 6/8 search, these seeds.")
    ap.add_argument("--workdir", default="runs/latency_search")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "results-latency-search.json"))
    args = ap.parse_args()

    from cwhawq import api
    from cwhawq.evaluate import accuracy
    from cwhawq.graph import qmodel_from_loaded
    from cwhawq.io import replace_marked_section, write_json
    from cwhawq.latency import measure_plans
    from cwhawq.models import load_model
    from cwhawq import data as D
    from cwhawq.quantize import Quantizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.tight_seeds:
        return tight_seeds(args, work)
    t_start = time.time()
    load0 = os.getloadavg()[0]

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    sens = str(work / "sens.json")
    api.analyze(MODEL, out=sens)
    log("sensitivity done")
    table = api.latency_table(MODEL, "llvm", str(work / "table.json"), log=log)
    log(f"latency table: fp32 model {table.fp32_seconds * 1e3:.3f} ms")

    common = dict(sens=sens, episodes=args.episodes, seed=args.seed)
    plans = {}
    t0 = time.time()
    plans["CW-HAWQ DDPG, size budget"] = api.search(MODEL, budget=args.size_budget, out=str(work / "size.json"),
                                                    **common)
    times = {"CW-HAWQ DDPG, size budget": time.time() - t0}
    R = math.ceil(table.ratio(plans["CW-HAWQ DDPG, size budget"]) * 1e4) / 1e4
    lat_budget = f"latency:{R:.4f}"
    log(f"size-budget plan: predicted latency ratio {R:.4f}: common budget {lat_budget}")
    for w in (0.0, 1.0):
        name = f"CW-HAWQ DDPG, latency budget, weight {w:g}"
        t0 = time.time()
        plans[name] = api.search(MODEL, budget=lat_budget, latency_table=table, latency_weight=w,
                                 out=str(work / f"lat_w{w:g}.json"), **common)
        times[name] = time.time() - t0
        log(f"{name}: done in {times[name]:.0f} s")
    plans["hawq-v3, latency budget"] = api.make_plan("hawq-v3", MODEL, sens=sens, budget=lat_budget,
                                                     latency_table=table)
    for budget, tag in ((lat_budget, "latency budget"), (args.tight, "tight latency budget")):
        name = f"CW-HAWQ DDPG, {tag}, act 6/8"
        t0 = time.time()
        plans[name] = api.search(MODEL, budget=budget, latency_table=table, latency_weight=1.0, a_bits="6,8",
                                 action_margin=0.05, out=str(work / f"lat_a68_{budget.replace(':', '')}.json"),
                                 **common)
        times[name] = time.time() - t0
        log(f"{name}: done in {times[name]:.0f} s")
    plans["hawq-v3, tight latency budget, A6"] = api.make_plan("hawq-v3", MODEL, sens=sens, budget=args.tight,
                                                               a_bits="6", latency_table=table)
    plans["uniform W8A6"] = api.make_plan("uniform", MODEL, w_bits=8, a_bits="6")
    plans["uniform W4A6"] = api.make_plan("uniform", MODEL, w_bits=4, a_bits="6")
    plans[f"hawq-v3, {args.size_budget}"] = api.make_plan("hawq-v3", MODEL, sens=sens, budget=args.size_budget)
    plans[f"cw-greedy, {args.size_budget}"] = api.make_plan("cw-greedy", MODEL, sens=sens, budget=args.size_budget)
    plans["uniform W8A8"] = api.make_plan("uniform", MODEL, w_bits=8, a_bits="8")
    plans["uniform W4A8"] = api.make_plan("uniform", MODEL, w_bits=4, a_bits="8")

    loaded = load_model(MODEL)
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    test = D.load("fashion-mnist", "test")
    qz = Quantizer(qm, api.calibration_set())
    fp32_acc = accuracy(qm, test)
    rows = []
    for name, plan in plans.items():
        acc = accuracy(qz.apply(plan).module, test)
        qm.reset()
        m = plan.compute_metrics(infos)
        rows.append({"method": name, "budget": plan.budget or "-", "accuracy": acc, "avg_w_bits": m["avg_w_bits"],
                     "avg_a_bits": m["avg_a_bits"],
                     "size_kib": m["weight_bytes"] / 1024, "size_ratio": m["size_ratio"],
                     "predicted_ratio": table.ratio(plan),
                     "search_seconds": times.get(name),
                     "val_accuracy": (plan.meta or {}).get("search", {}).get("val_accuracy")})
        log(f"{name}: test {acc * 100:.2f}%, predicted latency ratio {rows[-1]['predicted_ratio']:.4f}")

    names = list(plans)
    slug = {n: f"p{k}" for k, n in enumerate(names)}
    res = measure_plans(MODEL, [(plans[n], slug[n]) for n in names], "llvm", table=table, log=log)
    for row, r in zip(rows, res["plans"]):
        row.update(measured_ms=r["measured_s"] * 1e3, measured_ratio=r["measured_ratio"],
                   round_medians_ms=[v * 1e3 for v in r["round_medians_s"]], rel_error=r["rel_error"])
    load1 = os.getloadavg()[0]
    total = time.time() - t_start

    out = {"model": MODEL, "target": "llvm", "batch": 1, "episodes": args.episodes, "seed": args.seed,
           "size_budget": args.size_budget, "latency_budget": lat_budget, "tight_budget": args.tight, "fp32_accuracy": fp32_acc,
           "fp32_ms": res["fp32_s"] * 1e3, "fp32_round_medians_ms": [v * 1e3 for v in res["fp32_round_medians_s"]],
           "table_fp32_ms": table.fp32_seconds * 1e3, "rows": rows, "seconds": total,
           "load_average": [load0, load1], "cpu": platform.processor() or platform.machine()}
    write_json(args.json, out)

    lines = [f"Measured by `.venv/bin/python benchmarks/latency_search_results.py --episodes {args.episodes} "
             f"--seed {args.seed}` in one run ({total / 60:.0f} min, load average {load0:.1f} at the start, "
             f"{load1:.1f} at the end, {os.cpu_count()} cores), zoo:resnet20-fmnist, target `llvm` (this CPU), "
             f"batch 1. fp32: test accuracy {fp32_acc * 100:.2f}%, compiled (our fp32 kernels) "
             f"{res['fp32_s'] * 1e3:.3f} ms in this run's measurement rounds ({table.fp32_seconds * 1e3:.3f} ms "
             f"when the latency table was measured).",
             "",
             f"The common latency budget `{lat_budget}` is the predicted latency ratio of the size-budget "
             f"(`{args.size_budget}`) DDPG plan, so every latency-budget plan is at most as slow as it, by "
             f"the table. Test accuracy: full test split (10,000 images), simulated quantization as "
             f"`cwhawq eval --plan`. Measured: all plans and the fp32 model compiled for this CPU and timed "
             f"in the same three rounds (median of 100 short runs per round, lowest round kept); ratio = "
             f"measured latency / measured fp32 latency.",
             "",
             "| method | budget | test accuracy | avg W bits | avg A bits | size (KiB) | predicted latency ratio | "
             "measured ms | measured ratio | prediction error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | `{r['budget']}` | {r['accuracy'] * 100:.2f}% | {r['avg_w_bits']:.2f} | "
                     f"{r['avg_a_bits']:.2f} | "
                     f"{r['size_kib']:.1f} | {r['predicted_ratio']:.4f} | {r['measured_ms']:.3f} | "
                     f"{r['measured_ratio']:.3f} | {r['rel_error'] * 100:+.1f}% |")
    search_s = [v for v in times.values() if v]
    lines += ["", f"Searches: {args.episodes} episodes each, seed {args.seed}, "
                  f"{min(search_s):.0f}-{max(search_s):.0f} s each; the `act 6/8` ones with `--a-bits 6,8 "
                  f"--action-margin 0.05 --latency-weight 1`, the others with the defaults."]
    replace_marked_section(args.doc, "<!-- latency-search:begin -->", "<!-- latency-search:end -->",
                           "\n".join(lines), header="## Latency-aware search\n")
    log(f"written {args.doc} and {args.json}")


def tight_seeds(args, work: Path) -> None:
    import numpy as np

    from cwhawq import api
    from cwhawq.io import replace_marked_section
    from cwhawq.latency import LatencyTable

    t_start = time.time()
    table = LatencyTable.load(work / "table.json")
    sens = str(work / "sens.json")
    seeds = [int(x) for x in args.tight_seeds.split(",")]
    rows = []
    for seed in seeds:
        out = work / f"tight_a68_s{seed}.json"
        plan = api.search(MODEL, sens=sens, budget=args.tight, latency_table=table, latency_weight=1.0, a_bits="6,8",
                          action_margin=0.05, episodes=args.episodes, seed=seed, out=str(out))
        acc = api.evaluate(MODEL, split="test", plan=str(out))["accuracy"]
        rows.append({"seed": seed, "accuracy": acc, "predicted_ratio": table.ratio(plan),
                     "avg_w_bits": plan.metrics["avg_w_bits"], "avg_a_bits": plan.metrics["avg_a_bits"]})
        print(rows[-1], flush=True)
    a = np.array([r["accuracy"] for r in rows]) * 100
    body = (f"`benchmarks/latency_search_results.py --tight-seeds {args.tight_seeds} --episodes {args.episodes}` "
            f"({(time.time() - t_start) / 60:.0f} min): the `{args.tight}` search with activations from {{6, 8}} "
            f"(`--a-bits 6,8 --action-margin 0.05 --latency-weight 1`), seeds {args.tight_seeds}: test accuracy "
            f"{a.mean():.2f} +- {a.std(ddof=1) if len(a) > 1 else 0:.2f}% ("
            + ", ".join(f"seed {r['seed']}: {r['accuracy'] * 100:.2f}% at predicted {r['predicted_ratio']:.3f}, "
                        f"W {r['avg_w_bits']:.2f} / A {r['avg_a_bits']:.2f} bits" for r in rows) + ").")
    replace_marked_section(args.doc, "<!-- latency-seeds:begin -->", "<!-- latency-seeds:end -->", body)
    print(body)


if __name__ == "__main__":
    main()
