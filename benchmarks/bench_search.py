"""Speed of the DDPG search (issue 5): wall time of a full search and time per episode, by phase.

    .venv/bin/python benchmarks/bench_search.py [--episodes 300] [--budget bits:3] [--threads 2]
        [--json out.json] [--doc docs/search.md]

Runs ``cwhawq.search.search`` on zoo:resnet20-fmnist (sensitivities from ``cwhawq analyze`` defaults,
computed first unless ``--sens`` is given) and breaks each episode down into
- plan: the agent's actions layer by layer, ratios -> channel bits, budget enforcement, effective states;
- quantize: installing the plan (cached per-bit weights, activation scales);
- evaluate: the simulated model on the 1000 fixed validation images;
- update: storing the transitions and the agent's gradient updates (one per layer after warm-up);
- io: the JSONL log line and the checkpoint.
The phase times come from the search's own JSONL log (per episode) and the checkpoint-free totals.
With ``--doc`` the table replaces the section between <!-- bench:begin --> and <!-- bench:end -->.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL = "zoo:resnet20-fmnist"
PHASES = ("plan", "quantize", "evaluate", "update")


def replace_section(path, begin, end, body):
    from cwhawq.io import replace_marked_section

    replace_marked_section(path, begin, end, body, header="")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--budget", default="bits:3")
    ap.add_argument("--a-bits", default="8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the evaluation")
    ap.add_argument("--sens", default=None, help="sensitivity JSON (default: computed with analyze defaults)")
    ap.add_argument("--workdir", default=None, help="where the plan, log and checkpoint go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--doc", default=None, help="markdown file whose bench section is replaced")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from cwhawq import api
    from cwhawq.search import search

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    sens = args.sens
    t_an = 0.0
    if sens is None:
        sens = str(work / "sens.json")
        t0 = time.perf_counter()
        api.analyze(MODEL, out=sens)
        t_an = time.perf_counter() - t0
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    plan = search(MODEL, sens=sens, budget=args.budget, a_bits=args.a_bits, episodes=args.episodes,
                  out=str(work / "plan.json"), seed=args.seed)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    recs = [json.loads(line) for line in open(work / "plan.jsonl")]
    s = plan.meta["search"]
    per = {p: np.array([r["time"][p] for r in recs]) for p in PHASES}
    io = s["seconds_per_episode"]["io"]
    warm = s["agent"]["warmup"]
    after = [i for i, r in enumerate(recs) if r["episode"] >= warm]
    res = {
        "model": MODEL, "budget": args.budget, "a_bits": args.a_bits, "episodes": len(recs), "seed": args.seed,
        "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": load1,
        "wall_seconds": wall, "setup_seconds": s["setup_seconds"], "analyze_seconds": t_an,
        "loop_seconds": s["seconds"],
        "per_episode_ms": {p: 1e3 * float(per[p].mean()) for p in PHASES} | {"io": 1e3 * io},
        "per_episode_ms_after_warmup": {p: 1e3 * float(per[p][after].mean()) if after else None for p in PHASES},
        "cached_evaluations": int(sum(r["cached"] for r in recs)),
        "best_episode": s["best_episode"], "val_accuracy": s["val_accuracy"],
        "fp32_val_accuracy": s["fp32_val_accuracy"], "avg_w_bits": plan.metrics["avg_w_bits"],
    }
    tot = sum(res["per_episode_ms"].values())
    lines = [
        f"Measured with `.venv/bin/python benchmarks/bench_search.py --episodes {args.episodes} --budget "
        f"{args.budget} --threads {args.threads}` ({MODEL}, seed {args.seed}; torch {torch.__version__}, "
        f"{os.cpu_count()} cores, load average {load0[0]:.1f} before / {load1[0]:.1f} after).",
        "",
        f"Wall time of the search: **{wall:.0f} s** for {len(recs)} episodes ({wall / 60:.1f} min; setup "
        f"{s['setup_seconds']:.1f} s: model, data, calibration, fp32 reference), "
        f"{res['cached_evaluations']} evaluations answered from the plan cache.",
        "",
        "| phase | ms / episode (all) | ms / episode (after warm-up) | share |",
        "|---|---|---|---|",
    ]
    for p in PHASES + ("io",):
        a = res["per_episode_ms"][p]
        b = res["per_episode_ms_after_warmup"].get(p)
        lines.append(f"| {p} | {a:.1f} | {'-' if b is None else f'{b:.1f}'} | {100 * a / tot:.1f} % |")
    lines.append(f"| **total** | **{tot:.1f}** | | |")
    lines += ["", f"Best plan: episode {s['best_episode']}, val accuracy {s['val_accuracy'] * 100:.2f} % "
              f"(fp32 {s['fp32_val_accuracy'] * 100:.2f} %) at {plan.metrics['avg_w_bits']:.3f} average weight bits."]
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.doc:
        replace_section(args.doc, "<!-- bench:begin -->", "<!-- bench:end -->", text)


if __name__ == "__main__":
    main()
