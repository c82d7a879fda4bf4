"""Accuracy of fp32, uniform, hawq-v3 and cw-greedy plans on zoo:resnet20-fmnist (issue 4).

    .venv/bin/python benchmarks/plan_results.py [--finetune-epochs 1] [--out docs/results.md]

Everything in one run: analysis (default scheme), plans at average weight bits 4, 3 and 2.5 with 8-bit
activations, one BOPs budget with mixed activations, test accuracy on the full test split with and
without a 1-epoch quantization-aware fine-tune, the cost of pow2 activation scales against free ones
and of migrating the pow2 exponents into the weights (``--act-scale migrate``, one 8-bit digit per
8-bit activation in the kernels),
and a Pareto plot (accuracy against model size). Rows go between the markers
<!-- baselines:begin --> / <!-- baselines:end --> of docs/results.md; a JSON copy goes to
docs/results-baselines.json (the Pareto plot also draws DDPG rows from docs/results-search.json if present).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from cwhawq import api, baselines as B, data as D  # noqa: E402
from cwhawq.evaluate import accuracy  # noqa: E402
from cwhawq.graph import qmodel_from_loaded  # noqa: E402
from cwhawq.hessian import analyze  # noqa: E402
from cwhawq.models import load_model  # noqa: E402
from cwhawq.plan import parse_budget  # noqa: E402
from cwhawq.quantize import Quantizer, finetune  # noqa: E402

MODEL = "zoo:resnet20-fmnist"


def replace_section(path, begin, end, body):
    from cwhawq.io import replace_marked_section

    replace_marked_section(path, begin, end, body, header="# Results\n")


def pareto_plot(rows, search_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by = {}
    for r in rows + search_rows:
        if r.get("setting", "").startswith("bops") or r.get("finetuned"):
            continue
        by.setdefault(r["method"], []).append((r["size_kib"], r["accuracy"] * 100))
    for m, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=m)
    ax.set_xlabel("weight size (KiB, packed, scales included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{MODEL}: accuracy against size (8-bit activations, no fine-tune)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--limit", type=int, default=None, help="evaluate a subset of the test split (default: all)")
    ap.add_argument("--finetune-only", default=None,
                    help="comma list of settings (e.g. bits:3,bits:2.5): keep the rows of docs/results-baselines.json "
                         "and add the fine-tuned accuracy of those plans only")
    args = ap.parse_args()
    previous = {}
    if args.finetune_only:
        previous = {(r["method"], r["setting"]): r for r in json.load(open("docs/results-baselines.json"))}
        args.finetune_epochs = args.finetune_epochs or 1
    t_start = time.time()
    loaded = load_model(MODEL)
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    train = D.load("fashion-mnist", "train")
    test = D.load("fashion-mnist", "test").subset(args.limit)
    sens = analyze(qm, train, model_name=MODEL)
    calib = api.calibration_set("fashion-mnist")
    qz = Quantizer(qm, calib)
    qz_free = Quantizer(qm, ranges=qz.ranges, act_scale="free")
    qz_mig = Quantizer(qm, ranges=qz.ranges, act_scale="migrate")
    fp32 = accuracy(qm, test) if not args.finetune_only else previous[("fp32", "-")]["accuracy"]
    plans = [("uniform", "W8A8", B.uniform(infos, 8, 8)), ("uniform", "W4A8", B.uniform(infos, 4, 8))]
    for bits in ("4", "3", "2.5"):
        b = parse_budget(f"bits:{bits}")
        plans.append(("hawq-v3", f"bits:{bits}", B.hawq_v3(infos, sens, b)))
        plans.append(("cw-greedy", f"bits:{bits}", B.cw_greedy(infos, sens, b)))
    bops = parse_budget("bops:0.02")
    plans.append(("hawq-v3", "bops:0.02 mixed act", B.hawq_v3(infos, sens, bops, a_bits="mixed")))
    plans.append(("cw-greedy", "bops:0.02 mixed act", B.cw_greedy(infos, sens, bops, a_bits="mixed")))
    rows = [{"method": "fp32", "setting": "-", "accuracy": fp32, "size_kib": 4 * sum(i.params for i in infos) / 1024,
             "avg_w_bits": 32, "avg_a_bits": 32, "bops_ratio": 1.0}]
    state0 = copy.deepcopy({n: (q.weight.detach().clone(), None if q.bias is None else q.bias.detach().clone())
                            for n, q in qm.qlayers.items()})
    only = set(args.finetune_only.split(",")) if args.finetune_only else None
    for method, setting, plan in plans:
        m = plan.metrics
        if only is not None:
            row = previous[(method, setting)]
            if setting not in only:
                rows.append(row)
                continue
        else:
            sim = qz.apply(plan)
            acc = accuracy(sim.module, test)
            acc_free = accuracy(qz_free.apply(plan).module, test)
            acc_mig = accuracy(qz_mig.apply(plan).module, test)
            row = {"method": method, "setting": setting, "accuracy": acc, "accuracy_free_scales": acc_free,
                   "accuracy_migrate": acc_mig,
                   "size_kib": m["weight_bytes"] / 1024, "avg_w_bits": m["avg_w_bits"], "avg_a_bits": m["avg_a_bits"],
                   "bops_ratio": m["bops_ratio"]}
        if args.finetune_epochs:
            sim = qz.apply(plan)
            finetune(sim, train, epochs=args.finetune_epochs)
            row["accuracy_finetuned"] = accuracy(sim.module, test)
            with torch.no_grad():   # back to the float weights for the next plan
                for n, q in qm.qlayers.items():
                    q.weight.copy_(state0[n][0])
                    if q.bias is not None:
                        q.bias.copy_(state0[n][1])
            qz._wcache.clear()
            qm.reset()
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs("docs", exist_ok=True)
    with open("docs/results-baselines.json", "w") as f:
        json.dump(rows, f, indent=1)
    search_rows = []
    if os.path.exists("docs/results-search.json"):
        search_rows = [dict(r, method=r.get("method", "cw-hawq (ddpg)")) for r in json.load(open("docs/results-search.json"))
                       if "size_kib" in r and "accuracy" in r]
    pareto_plot(rows, search_rows, "docs/pareto.png")
    ft = args.finetune_epochs
    how = (f"`.venv/bin/python benchmarks/plan_results.py --finetune-epochs 0`, then the fine-tuned column for "
           f"{args.finetune_only} by `... --finetune-only {args.finetune_only}`" if args.finetune_only else
           f"`.venv/bin/python benchmarks/plan_results.py --finetune-epochs {ft}` in one run")
    lines = [f"Measured by {how} "
             f"(last run {(time.time() - t_start) / 60:.0f} min on {os.cpu_count()} cores); {MODEL}, "
             f"test split ({len(test)} images); sensitivities from `cwhawq analyze` defaults "
             f"({sens['scheme']}, {sens['samples']} samples); activation ranges from 512 train samples; "
             f"weight scales by MSE.", "",
             "| method | setting | avg W bits | avg A bits | size (KiB) | BOPs ratio | accuracy (pow2 act. scales) | "
             "accuracy (free act. scales) | accuracy (migrate) |" + (f" after {ft}-epoch fine-tune |" if ft else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if ft else "")]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['avg_w_bits']:.2f} | {r['avg_a_bits']:.2f} | "
                     f"{r['size_kib']:.1f} | {r['bops_ratio']:.4f} | {r['accuracy'] * 100:.2f} | "
                     f"{r.get('accuracy_free_scales', r['accuracy']) * 100:.2f} | "
                     + (f"{r['accuracy_migrate'] * 100:.2f} |" if "accuracy_migrate" in r else
                        (f"{r['accuracy'] * 100:.2f} |" if r["method"] == "fp32" else "- |"))
                     + (f" {r['accuracy_finetuned'] * 100:.2f} |" if ft and 'accuracy_finetuned' in r else (" - |" if ft else "")))
    lines += ["", "![Pareto: accuracy against size](pareto.png)"]
    replace_section(args.out, "<!-- baselines:begin -->", "<!-- baselines:end -->", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
