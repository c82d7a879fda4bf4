"""Nearest against learned weight rounding on zoo:resnet20-fmnist (issue 17).

    PYTHONPATH=. .venv/bin/python benchmarks/rounding_results.py --phase searches   # DDPG + random plans
    PYTHONPATH=. .venv/bin/python benchmarks/rounding_results.py --phase eval       # both roundings, table

Phase ``searches``: for bits:3 and bits:2.5 (8-bit activations, bit set {2, 4, 8}) and seeds 0,1,2, a
DDPG search (``cwhawq search`` defaults) and a random search over the same action space with the same
budget enforcement and the same number of evaluated plans (``warmup`` = episodes: every episode takes
uniform random actions and the agent never learns), plus DDPG at bits:4. Plans already in the work
directory are kept (delete them to search again).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "zoo:resnet20-fmnist"


def search_jobs(budgets, seeds, kinds):
    for seed in seeds:
        for budget in budgets:
            for kind in kinds:
                if kind == "random" and budget == "bits:4":
                    continue
                yield kind, budget, seed


def plan_path(work: Path, kind: str, budget: str, seed: int) -> Path:
    return work / f"{kind}_{budget.replace(':', '')}_s{seed}.json"


def run_searches(args, work: Path, sens: str):
    from cwhawq import api

    for kind, budget, seed in search_jobs(args.budgets.split(","), [int(s) for s in args.seeds.split(",")],
                                          args.kinds.split(",")):
        out = plan_path(work, kind, budget, seed)
        if out.exists():
            continue
        t0 = time.time()
        opts = {"warmup": args.episodes} if kind == "random" else {}
        plan = api.search(MODEL, sens=sens, budget=budget, episodes=args.episodes, seed=seed, out=str(out),
                          resume=True, **opts)
        s = plan.meta["search"]
        print(json.dumps({"kind": kind, "budget": budget, "seed": seed, "val_accuracy": s["val_accuracy"],
                          "best_episode": s["best_episode"], "seconds": time.time() - t0}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["searches", "eval"], required=True)
    ap.add_argument("--workdir", default="runs/rounding")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--budgets", default="bits:3,bits:2.5,bits:4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="ddpg,random")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from cwhawq import api

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sens = str(work / "sens.json")
    if not Path(sens).exists():
        api.analyze(MODEL, out=sens)
    if args.phase == "searches":
        run_searches(args, work, sens)


if __name__ == "__main__":
    main()
