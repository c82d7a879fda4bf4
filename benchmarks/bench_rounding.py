"""Nearest against learned weight rounding (issue 17), post-training, no labels.

    nice -n 10 .venv/bin/python benchmarks/bench_rounding.py searches [--budgets bits:3,bits:2.5] [--seeds 0,1,2]
    nice -n 10 .venv/bin/python benchmarks/bench_rounding.py eval --ort [--models resnet20,lenet] [--iters N]
    nice -n 10 .venv/bin/python benchmarks/bench_rounding.py ort          # the export check alone (reconstructs again)
    .venv/bin/python benchmarks/bench_rounding.py table [--out docs/results.md]

``searches``: for each budget (8-bit activations, weight bits {2, 4, 8}) and seed, a DDPG search
(``cwhawq search`` defaults, ``--episodes``, nearest rounding in every episode) and a random search
over the same action space with the same budget enforcement and the same number of evaluated plans
(``warmup`` = episodes: every episode takes uniform random actions, the agent never acts). Plans
already in the work directory are kept; an interrupted search resumes from its checkpoint.

``eval``: for every plan (uniform W4A8, hawq-v3 and cw-greedy at each budget, the budget enforcement
alone applied to the all-8-bit request, and the DDPG / random plans found in the work directory):
test accuracy on the full test split with nearest and with learned rounding (the default
:class:`cwhawq.rounding.RoundingConfig`, or ``--iters``), the reconstruction's wall and CPU seconds,
and the weight part of Omega (trace-weighted squared weight error) of the nearest and the learned
codes. One JSON line per (model, setting, plan, options) in ``WORKDIR/eval.jsonl``; rows already there
are skipped, so an interrupted run resumes, and several eval processes (``--only``) can share the work
directory. Plans run in the order ddpg, hawq-v3, cw-greedy, random, enforce-only, uniform. ``--ort``:
the seed-0 DDPG plans are also exported (reusing the reconstruction) and onnxruntime's test accuracy
is compared with the simulation's (``WORKDIR/ort.jsonl``). ``--threads`` (default 1): torch threads;
on shared cores one thread per process costs a fraction of the CPU time of two.

``ort``: exports the seed-0 DDPG plan at bits:3 and bits:2.5 with learned rounding
(``cwhawq export --eval test``) and records onnxruntime's and the simulation's test accuracy.

``table``: the markdown tables between ``<!-- rounding:begin -->`` / ``<!-- rounding:end -->`` of
docs/results.md and a JSON copy (docs/results-rounding.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"resnet20": "zoo:resnet20-fmnist", "lenet": "zoo:lenet-fmnist"}
BOPS = "bops:0.02"


def plan_path(work: Path, model: str, kind: str, budget: str, seed: int) -> Path:
    pre = "" if model == "resnet20" else f"{model}_"
    return work / f"{pre}{kind}_{budget.replace(':', '')}_s{seed}.json"


def sens_path(work: Path, model: str) -> Path:
    return work / ("sens.json" if model == "resnet20" else f"{model}_sens.json")


def ensure_sens(work: Path, model: str) -> str:
    from cwhawq import api

    p = sens_path(work, model)
    if not p.exists():
        api.analyze(MODELS[model], out=str(p))
    return str(p)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_searches(args, work: Path) -> None:
    from cwhawq import api

    for model in args.models.split(","):
        sens = ensure_sens(work, model)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for budget in args.budgets.split(","):
                for kind in args.kinds.split(","):
                    out = plan_path(work, model, kind, budget, seed)
                    if out.exists():
                        continue
                    t0 = time.time()
                    opts = {"warmup": args.episodes} if kind == "random" else {}
                    plan = api.search(MODELS[model], sens=sens, budget=budget, episodes=args.episodes, seed=seed,
                                      out=str(out), resume=True, rounding="nearest", **opts)
                    s = plan.meta["search"]
                    row = {"model": model, "kind": kind, "budget": budget, "seed": seed,
                           "val_accuracy": s["val_accuracy"], "best_episode": s["best_episode"],
                           "episodes": s["episodes"], "seconds": round(time.time() - t0, 1)}
                    _append(work / "searches.jsonl", row)
                    print(json.dumps(row), flush=True)


def enforcement_only_plan(infos, sens: dict, budget: str):
    """The plan the search's budget enforcement makes of the all-8-bit request (action 1 everywhere)."""
    import numpy as np

    from cwhawq.plan import parse_budget
    from cwhawq.search.costs import make_cost_model
    from cwhawq.search.env import QuantSearchEnv

    bud = parse_budget(budget)
    env = QuantSearchEnv(infos, sens, bud, make_cost_model(bud, infos), w_bits=(2, 4, 8), a_bits=(8,))
    env.reset()
    s = 0
    while s is not None:
        s = env.step(np.ones(env.action_dim))
    plan, _ = env.finish()
    plan.method = "enforce-only"
    return plan


def weight_omega(sim, sens: dict) -> float:
    """sum over channels of trace_c / n_w * ||W_c - s_c q_c||^2 for the codes installed in ``sim``."""
    import numpy as np

    from cwhawq import quantizers as Q

    by = {l["name"]: l for l in sens["layers"]}
    tot = 0.0
    for name, st in sim.states.items():
        w = sim.module.layer(name).weight.detach().numpy().astype(np.float64)
        fq = Q.dequantize_weight(st.w_codes, st.w_scales).astype(np.float64)
        err = ((fq - w) ** 2).reshape(w.shape[0], -1).sum(1)
        tr = np.asarray(by[name]["weight"]["trace"], np.float64)
        tot += float((tr / w[0].size * err).sum())
    return tot


def plans_for(model: str, work: Path, infos, sens: dict, budgets: list[str], bops: bool):
    """(setting, method, seed, Plan) for every plan of the table."""
    from cwhawq import baselines as B
    from cwhawq.plan import load_plan, parse_budget

    out = []
    for budget in budgets:
        bud = parse_budget(budget)
        if budget == "bits:4":
            out.append((budget, "uniform W4A8", None, B.uniform(infos, 4, 8)))
        out.append((budget, "hawq-v3", None, B.hawq_v3(infos, sens, bud)))
        out.append((budget, "cw-greedy", None, B.cw_greedy(infos, sens, bud)))
        if budget != "bits:4":
            out.append((budget, "enforce-only", None, enforcement_only_plan(infos, sens, budget)))
        for kind in ("ddpg", "random"):
            for seed in range(10):
                p = plan_path(work, model, kind, budget, seed)
                if p.exists():
                    out.append((budget, kind, seed, load_plan(p)))
    if bops:
        bud = parse_budget(BOPS)
        out.append((BOPS + " mixed act", "hawq-v3", None, B.hawq_v3(infos, sens, bud, a_bits="mixed")))
        out.append((BOPS + " mixed act", "cw-greedy", None, B.cw_greedy(infos, sens, bud, a_bits="mixed")))
    return out


def run_eval(args, work: Path) -> None:
    import torch

    from cwhawq import api, data as D
    from cwhawq.evaluate import accuracy
    from cwhawq.graph import qmodel_from_loaded
    from cwhawq.models import load_model
    from cwhawq.quantize import Quantizer
    from cwhawq.rounding import RoundingConfig, learn_rounding

    res = work / "eval.jsonl"

    def done_keys() -> set:   # read again before every plan: several eval processes can share a work dir
        return {json.loads(line)["key"] for line in res.read_text().splitlines() if line.strip()} if res.exists() else set()
    cfg = RoundingConfig()
    for k, v in json.loads(args.config or "{}").items():
        setattr(cfg, k, tuple(v) if k == "beta" else v)
    if args.iters is not None:
        cfg.iters = args.iters
    cfg.check()
    for model in args.models.split(","):
        sens_file = ensure_sens(work, model)
        sens = json.loads(Path(sens_file).read_text())
        loaded = load_model(MODELS[model])
        qm = qmodel_from_loaded(loaded)
        infos = qm.layer_infos
        calib = api.calibration_set("fashion-mnist")
        test = D.load("fashion-mnist", "test").subset(args.limit)
        qz = Quantizer(qm, calib)
        fp32 = None
        todo = plans_for(model, work, infos, sens, args.budgets.split(","), args.bops and model == "resnet20")
        # the plans the 'done when' targets name first, so that a run cut short has them
        prio = {"ddpg": 0, "hawq-v3": 1, "cw-greedy": 2, "random": 3, "enforce-only": 4}
        todo.sort(key=lambda t: (prio.get(t[1], 5), t[2] or 0))
        for setting, method, seed, plan in todo:
            if args.only and not any(o in f"{setting} {method}" for o in args.only.split(",")):
                continue
            key = json.dumps([model, setting, method, seed, cfg.to_dict(), args.limit, torch.get_num_threads()])
            if key in done_keys():
                continue
            if fp32 is None:
                qm.reset()
                fp32 = accuracy(qm, test)
            sim = qz.apply(plan)
            acc_n = accuracy(sim.module, test)
            om_n = weight_omega(sim, sens)
            rep = learn_rounding(sim, calib, cfg, log=lambda m: print("  " + m, flush=True))
            acc_l = accuracy(sim.module, test)
            om_l = weight_omega(sim, sens)
            m = plan.compute_metrics(infos)
            row = {"key": key, "model": model, "setting": setting, "method": method, "seed": seed,
                   "fp32": fp32, "nearest": acc_n, "learned": acc_l, "omega_w_nearest": om_n,
                   "omega_w_learned": om_l, "seconds": rep["seconds"], "cpu_seconds": rep["cpu_seconds"],
                   "threads": rep["threads"], "rounding": {k: rep[k] for k in ("iters", "mode", "inputs", "samples", "seed")},
                   "avg_w_bits": m["avg_w_bits"], "avg_a_bits": m["avg_a_bits"], "test_samples": len(test),
                   "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "units": [{k: u[k] for k in ("unit", "loss_nearest", "loss_learned", "seconds")} for u in rep["units"]]}
            if args.ort and method == "ddpg" and seed == 0 and model == "resnet20":
                # the export reuses this process's reconstruction (same plan, samples, options, threads)
                from cwhawq.export import export_onnx

                onnx_out = work / f"ddpg_{setting.replace(':', '')}_s0.q.onnx"
                t0 = time.time()
                erep = export_onnx(loaded, plan, str(onnx_out), rounding=cfg, eval_split="test")
                a = erep["accuracy"]
                orow = {"budget": setting, "plan": plan_path(work, model, "ddpg", setting, 0).name,
                        "simulation": a["simulated"], "onnxruntime": a["onnxruntime"],
                        "argmax_agreement": a["argmax_agreement"], "rounding": erep["rounding"],
                        "eval_learned": acc_l, "seconds": round(time.time() - t0, 1)}
                _append(work / "ort.jsonl", orow)
                print("  export: " + json.dumps(orow), flush=True)
            _append(res, row)
            print(f"{model} {setting} {method}{'' if seed is None else f' s{seed}'}: nearest {acc_n * 100:.2f} "
                  f"learned {acc_l * 100:.2f} ({rep['seconds']:.0f} s, Omega_w {om_n:.4g} -> {om_l:.4g})", flush=True)
            qm.reset()


def run_ort(args, work: Path) -> None:
    from cwhawq.export import export_onnx

    for budget in args.budgets.split(","):
        p = plan_path(work, "resnet20", "ddpg", budget, 0)
        if not p.exists():
            continue
        out = work / f"ddpg_{budget.replace(':', '')}_s0.q.onnx"
        t0 = time.time()
        rep = export_onnx(MODELS["resnet20"], str(p), str(out), eval_split="test")
        a = rep["accuracy"]
        row = {"budget": budget, "plan": p.name, "simulation": a["simulated"], "onnxruntime": a["onnxruntime"],
               "argmax_agreement": a["argmax_agreement"], "rounding": rep["rounding"],
               "seconds": round(time.time() - t0, 1)}
        _append(work / "ort.jsonl", row)
        print(json.dumps(row), flush=True)


def _rows(work: Path) -> list[dict]:
    p = work / "eval.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def _mean_std(v):
    import numpy as np

    v = np.asarray(v, float) * 100
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))


def _kendall(a, b) -> float | None:
    n, s, m = len(a), 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = a[i] - a[j], b[i] - b[j]
            if x == 0 or y == 0:
                continue
            m += 1
            s += 1 if (x > 0) == (y > 0) else -1
    return s / m if m else None


def make_table(args, work: Path) -> None:
    rows = _rows(work)
    if not rows:
        sys.exit("no rows in the work directory's eval.jsonl: run the eval phase first")
    # one row per (model, setting, method, seed): the latest options win
    last = {}
    for r in rows:
        last[(r["model"], r["setting"], r["method"], r["seed"])] = r
    rows = list(last.values())
    lines = []
    ex = rows[0]
    secs = [r["seconds"] for r in rows if r["model"] == "resnet20"]
    from collections import Counter

    cfg = dict(ex["rounding"], iters=Counter(r["rounding"]["iters"] for r in rows).most_common(1)[0][0])
    lines.append(f"Measured by `benchmarks/bench_rounding.py eval --ort` then `table` (test accuracy on the full test split, "
                 f"{ex['test_samples']} images, pow2 activation scales, 8-bit activations unless noted, no labels, "
                 f"no fine-tune). Learned rounding: {cfg['mode']}-wise reconstruction, {cfg['iters']} Adam steps per "
                 f"{cfg['mode']} (the default; other counts marked in the last column), inputs from the quantized model ({cfg['inputs']}), {cfg['samples']} unlabelled "
                 f"calibration samples (the train-split samples that calibrate the activations), seed {cfg['seed']}; "
                 f"torch threads as in the last column, on the development machine's 2 cores (AMD EPYC, Zen 3, AVX2; "
                 f"torch {ex['torch']}), cores shared with other work (two eval processes at once, and other "
                 f"engineers' jobs: wall seconds are upper bounds).")
    lines.append("")
    for model in ("resnet20", "lenet"):
        mr = [r for r in rows if r["model"] == model]
        if not mr:
            continue
        lines.append(f"**{MODELS[model]}** (fp32 {mr[0]['fp32'] * 100:.2f}%)")
        lines.append("")
        lines.append("| setting | plan | seeds | nearest | learned | learned - fp32 | reconstruction (s) | steps per block, threads |")
        lines.append("|---|---|---|---|---|---|---|---|")
        order = {"uniform W4A8": 0, "hawq-v3": 1, "cw-greedy": 2, "ddpg": 3, "random": 4, "enforce-only": 5}
        settings = sorted({r["setting"] for r in mr}, key=lambda st: (st.startswith("bops"), -float(st.split(":")[1].split()[0])))
        for st in settings:
            by = {}
            for r in mr:
                if r["setting"] == st:
                    by.setdefault(r["method"], []).append(r)
            for meth in sorted(by, key=lambda m: order.get(m, 9)):
                rs = sorted(by[meth], key=lambda r: r["seed"] or 0)
                n_m, n_s, n = _mean_std([r["nearest"] for r in rs])
                l_m, l_s, _ = _mean_std([r["learned"] for r in rs])
                if n > 1:
                    per_n = ", ".join("%.2f" % (r["nearest"] * 100) for r in rs)
                    near = f"{n_m:.2f} +- {n_s:.2f} ({per_n})"
                    per_l = ", ".join("%.2f" % (r["learned"] * 100) for r in rs)
                    lrn = f"{l_m:.2f} +- {l_s:.2f} ({per_l})"
                else:
                    near, lrn = f"{n_m:.2f}", f"{l_m:.2f}"
                seeds = ",".join(str(r["seed"]) for r in rs) if rs[0]["seed"] is not None else "-"
                name = {"ddpg": "CW-HAWQ (DDPG)", "random": "random search (same enforcement, same plan count)",
                        "enforce-only": "enforcement alone (all-8-bit request)"}.get(meth, meth)
                sec = sum(r["seconds"] for r in rs) / len(rs)
                how = ", ".join(sorted({f"{r['rounding']['iters']}, {r['threads']}" for r in rs}))
                lines.append(f"| {st} | {name} | {seeds} | {near} | {lrn} | {l_m - rs[0]['fp32'] * 100:+.2f} | {sec:.0f} | {how} |")
        lines.append("")
    if secs:
        one = sorted(r["seconds"] for r in rows if r["model"] == "resnet20" and r["threads"] == 1
                     and r["rounding"]["iters"] == cfg["iters"])
        if one:
            lines.append(f"Reconstruction of one resnet20 plan ({cfg['iters']} steps per block, 1 thread): {one[0]:.0f} to "
                         f"{one[-1]:.0f} s wall (median {one[len(one) // 2]:.0f} s) on the shared cores.")
        lines.append("")
    # order of the plans: nearest vs learned, and Omega (nearest codes, learned codes) vs accuracy
    lines.append("Order of the plans (Kendall tau over the plans of one setting, resnet20):")
    lines.append("")
    lines.append("| setting | plans | accuracy nearest vs learned | Omega_w (nearest codes) vs nearest acc. | "
                 "Omega_w (learned codes) vs learned acc. | Omega_w (nearest codes) vs learned acc. |")
    lines.append("|---|---|---|---|---|---|")
    for st in sorted({r["setting"] for r in rows if r["model"] == "resnet20"}):
        rs = [r for r in rows if r["model"] == "resnet20" and r["setting"] == st]
        if len(rs) < 3:
            continue
        an = [r["nearest"] for r in rs]
        al = [r["learned"] for r in rs]
        on = [-r["omega_w_nearest"] for r in rs]
        ol = [-r["omega_w_learned"] for r in rs]
        f = lambda t: "-" if t is None else f"{t:+.2f}"  # noqa: E731
        lines.append(f"| {st} | {len(rs)} | {f(_kendall(an, al))} | {f(_kendall(on, an))} | {f(_kendall(ol, al))} | "
                     f"{f(_kendall(on, al))} |")
    lines.append("")
    ort = work / "ort.jsonl"
    if ort.exists():
        lines.append("| export (learned rounding) | simulation | onnxruntime | argmax agreement |")
        lines.append("|---|---|---|---|")
        for l in ort.read_text().splitlines():
            if l.strip():
                o = json.loads(l)
                lines.append(f"| DDPG seed 0, {o['budget']} | {o['simulation'] * 100:.2f} | {o['onnxruntime'] * 100:.2f} | "
                             f"{o['argmax_agreement'] * 100:.2f}% |")
        lines.append("")
    body = "\n".join(lines)
    from cwhawq.io import replace_marked_section, write_text

    replace_marked_section(args.out, "<!-- rounding:begin -->", "<!-- rounding:end -->", body, header="# Results\n")
    write_text(ROOT / "docs" / "results-rounding.json", json.dumps(rows, indent=1) + "\n")
    print(body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["searches", "eval", "ort", "table"])
    ap.add_argument("--workdir", default="runs/rounding")
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--budgets", default=None, help="default: bits:3,bits:2.5 (searches, ort), bits:4,bits:3,bits:2.5 (eval)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="ddpg,random")
    ap.add_argument("--bops", action="store_true", help="eval: also the bops:0.02 mixed-activation setting")
    ap.add_argument("--iters", type=int, default=None, help="eval: reconstruction steps per unit")
    ap.add_argument("--config", default=None, help="eval: JSON of RoundingConfig fields")
    ap.add_argument("--only", default=None, help="eval: comma list of substrings of 'SETTING METHOD'")
    ap.add_argument("--limit", type=int, default=None, help="eval: test images (default: all)")
    ap.add_argument("--ort", action="store_true", help="eval: also export the seed-0 DDPG plans and compare "
                    "onnxruntime's test accuracy with the simulation's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    if args.budgets is None:
        args.budgets = "bits:4,bits:3,bits:2.5" if args.phase == "eval" else "bits:3,bits:2.5"
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    {"searches": run_searches, "eval": run_eval, "ort": run_ort, "table": make_table}[args.phase](args, work)


if __name__ == "__main__":
    main()
