"""Accuracy and size of fp32, uniform, hawq-v3, cw-greedy and DDPG plans on zoo:vit-fmnist (issue 15).

    .venv/bin/python benchmarks/vit_results.py [--episodes 60] [--max-probes 64] [--out docs/results.md]

One run: the analysis (`cwhawq analyze` defaults except ``--max-probes``: the ViT is not piecewise
linear, so `auto` takes the Hutchinson `layer` scheme, whose stopping rule would otherwise run up to
512 probes), uniform W8A8 / W4A8, hawq-v3 and cw-greedy at average weight bits 4 and 3 (8-bit
activations, bit set {2, 4, 8}), one DDPG search per budget (seed 0), and every plan exported to
ONNX with ``--eval test`` (learned weight rounding, the default): the simulated accuracy and the
onnxruntime accuracy of the exported file, both on the full test split. Rows go between the markers
<!-- vit:begin --> / <!-- vit:end --> of docs/results.md; a JSON copy goes to docs/results-vit.json.
Latency columns are left to the compile side (issue 15's TVM part).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from cwhawq import api, data as D  # noqa: E402
from cwhawq.evaluate import accuracy  # noqa: E402
from cwhawq.export import export_onnx  # noqa: E402
from cwhawq.graph import qmodel_from_loaded  # noqa: E402
from cwhawq.models import load_model  # noqa: E402

MODEL = "zoo:vit-fmnist"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=60, help="DDPG episodes per budget")
    ap.add_argument("--max-probes", type=int, default=64)
    ap.add_argument("--budgets", default="bits:4,bits:3")
    ap.add_argument("--workdir", default="runs/vit_results")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--json", default="docs/results-vit.json")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    wd = args.workdir
    t_all = time.time()
    loaded = load_model(MODEL)
    test = D.load("fashion-mnist", "test")
    qm = qmodel_from_loaded(loaded)
    fp32 = accuracy(qm, test)
    n_params = sum(i.params for i in qm.layer_infos)
    print(f"fp32 {fp32 * 100:.2f}% ({n_params} quantizable weights)", flush=True)

    t0 = time.time()
    sens_path = f"{wd}/sens.json"
    sens = api.analyze(MODEL, out=sens_path, max_probes=args.max_probes)
    sens_info = {k: sens[k] for k in ("scheme", "probes", "hvps", "converged", "worst_rel_stderr", "samples")}
    sens_info["seconds"] = round(time.time() - t0, 1)
    print(f"analyze: {sens_info}", flush=True)

    plans = [("uniform", "W8A8", api.make_plan("uniform", MODEL, w_bits=8, a_bits="8")),
             ("uniform", "W4A8", api.make_plan("uniform", MODEL, w_bits=4, a_bits="8"))]
    for budget in args.budgets.split(","):
        for method in ("hawq-v3", "cw-greedy"):
            plans.append((method, budget, api.make_plan(method, MODEL, sens=sens_path, budget=budget)))
        t0 = time.time()
        p = api.search(MODEL, sens=sens_path, budget=budget, episodes=args.episodes, seed=0,
                       out=f"{wd}/ddpg_{budget.replace(':', '')}.json", log=f"{wd}/ddpg_{budget.replace(':', '')}.jsonl",
                       warmup=min(20, max(2, args.episodes // 4)))
        p.meta = dict(p.meta or {}, bench_search_seconds=round(time.time() - t0, 1))
        plans.append(("DDPG", budget, p))
        print(f"DDPG {budget}: {time.time() - t0:.0f} s", flush=True)

    rows = [{"method": "fp32", "setting": "-", "avg_w_bits": 32.0, "avg_a_bits": 32.0,
             "size_kib": 4 * n_params / 1024, "accuracy": fp32, "onnxruntime": None}]
    for method, setting, plan in plans:
        t0 = time.time()
        m = plan.compute_metrics(qm.layer_infos)
        fname = f"{wd}/{method}_{setting.replace(':', '')}.onnx"
        rep = export_onnx(loaded, plan, fname, eval_split="test")
        acc = rep["accuracy"]
        rows.append({"method": method, "setting": setting, "avg_w_bits": m["avg_w_bits"], "avg_a_bits": m["avg_a_bits"],
                     "size_kib": m["weight_bytes"] / 1024, "accuracy": acc["simulated"],
                     "onnxruntime": acc["onnxruntime"], "argmax_agreement": acc["argmax_agreement"],
                     "search_seconds": (plan.meta or {}).get("bench_search_seconds")})
        print(f"{method} {setting}: simulated {acc['simulated'] * 100:.2f}%, onnxruntime {acc['onnxruntime'] * 100:.2f}%, "
              f"W {m['avg_w_bits']:.2f} bits, {m['weight_bytes'] / 1024:.1f} KiB ({time.time() - t0:.0f} s)", flush=True)

    lines = [f"Measured by `.venv/bin/python benchmarks/vit_results.py --episodes {args.episodes} --max-probes "
             f"{args.max_probes}` (last run {(time.time() - t_all) / 60:.0f} min on the 2-core development machine, "
             f"shared); {MODEL}, full test split (10000 images). Sensitivities: `cwhawq analyze` defaults with "
             f"`--max-probes {args.max_probes}` (scheme {sens_info['scheme']}, {sens_info['probes']} probes on "
             f"{sens_info['samples']} samples, worst layer trace relative standard error "
             f"{sens_info['worst_rel_stderr']:.3f}). Plans: bit set {{2, 4, 8}}, 8-bit activations; DDPG one search per "
             f"budget, seed 0, {args.episodes} episodes, other options default. Every plan simulated with learned "
             f"weight rounding (the default) and exported (`cwhawq export --eval test`): 'onnxruntime' is the "
             f"exported file's accuracy. Latency columns come with the compile side.", "",
             "| method | setting | avg W bits | avg A bits | size (KiB) | accuracy (simulated) | accuracy (onnxruntime) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ort = f"{r['onnxruntime'] * 100:.2f}" if r["onnxruntime"] is not None else "-"
        lines.append(f"| {r['method']} | {r['setting']} | {r['avg_w_bits']:.2f} | {r['avg_a_bits']:.2f} | "
                     f"{r['size_kib']:.1f} | {r['accuracy'] * 100:.2f} | {ort} |")
    body = "\n".join(lines)
    from cwhawq.io import replace_marked_section, write_json

    replace_marked_section(args.out, "<!-- vit:begin -->", "<!-- vit:end -->", body, header="# Results\n")
    write_json(args.json, {"model": MODEL, "analysis": sens_info, "episodes": args.episodes, "rows": rows})
    print(body)


if __name__ == "__main__":
    main()
