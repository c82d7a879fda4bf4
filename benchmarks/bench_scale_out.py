"""Scale-out measurements (issue 16), written into docs/scale-out.md between markers.

- ``analyze``: ``cwhawq analyze zoo:resnet20-fmnist`` at its defaults (128 samples, auto -> exact),
  one process against ``torchrun --nproc-per-node 2``, ``--threads 1`` each;
- ``search``: a 20-episode ``cwhawq search`` of resnet20-fmnist (size:0.125, 1000 validation samples,
  nearest rounding of the final plan), one process against two, ``--threads 1`` each;
- ``resnet18``: ``cwhawq analyze`` at its defaults of a 1000-class ResNet-18 at 1x3x224x224 with
  random weights on 16 random images (benchmarks/_archs.py; a .pt2 and an .npz made here), one
  process with torch's default threads.

Each command is timed from the outside (wall clock, process start-up included); the table also
gives what the command reports of itself (trace seconds, search loop seconds) and the load average
of the machine around the run (other people's work shares the cores). Usage:

    python benchmarks/bench_scale_out.py [--what analyze,search,resnet18] [--work DIR] [--no-write]

With ``--work DIR`` reused, the rows measured there before stay in the table unless measured again
(``--what ""`` only rewrites the table from them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cwhawq.io import replace_marked_section  # noqa: E402

DOC = ROOT / "docs" / "scale-out.md"
BEGIN, END = "<!-- bench_scale_out: begin -->", "<!-- bench_scale_out: end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


def cwhawq(args, procs: int) -> tuple[float, str, str]:
    """Run ``cwhawq ARGS`` in ``procs`` processes (torchrun on 127.0.0.1 when > 1): wall seconds, stdout, stderr."""
    if procs == 1:
        argv = [sys.executable, "-m", "cwhawq", *args]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "cwhawq", *args]
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(argv)}\n{p.stderr[-3000:]}")
    return wall, p.stdout, p.stderr


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench_analyze(work: Path) -> list[dict]:
    rows = []
    for n in (1, 2):
        out = work / f"r20-sens-{n}.json"
        la = load()
        wall, _, _ = cwhawq(["analyze", "zoo:resnet20-fmnist", "--out", str(out), "--threads", "1"], n)
        s = json.loads(out.read_text())
        rows.append({"what": "analyze resnet20-fmnist (defaults)", "procs": n, "wall_s": wall,
                     "own_s": s["trace_seconds"], "own": "trace seconds", "detail": f"{s['scheme']}, {s['probes']} probe(s)",
                     "load": f"{la} -> {load()}"})
    return rows


def bench_search(work: Path) -> list[dict]:
    sens = work / "r20-sens-1.json"
    if not sens.exists():
        cwhawq(["analyze", "zoo:resnet20-fmnist", "--out", str(sens)], 1)
    rows = []
    for n in (1, 2):
        out = work / f"r20-plan-{n}.json"
        la = load()
        wall, _, _ = cwhawq(["search", "zoo:resnet20-fmnist", "--sens", str(sens), "--budget", "size:0.125",
                             "--episodes", "20", "--out", str(out), "--rounding", "nearest", "--threads", "1"], n)
        m = json.loads(out.read_text())["meta"]["search"]
        rows.append({"what": "search resnet20-fmnist, 20 episodes", "procs": n, "wall_s": wall, "own_s": m["seconds"],
                     "own": "search loop seconds",
                     "detail": f"best reward {m['best_reward']:+.3f} (episode {m['best_episode']})",
                     "load": f"{la} -> {load()}"})
    return rows


def bench_resnet18(work: Path) -> list[dict]:
    import numpy as np
    import torch

    from _archs import ResNet18

    model, data = work / "resnet18-1000.pt2", work / "imagenet-like-16.npz"
    if not model.exists():
        from cwhawq.models import save_pt2

        torch.manual_seed(0)
        save_pt2(ResNet18(1000).eval(), (3, 224, 224), str(model))
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.standard_normal((16, 3, 224, 224)).astype(np.float32), y=rng.integers(0, 1000, 16))
    out = work / "resnet18-sens.json"
    la = load()
    wall, _, err = cwhawq(["analyze", str(model), "--data", str(data), "--split", "all", "--out", str(out)], 1)
    s = json.loads(out.read_text())
    (work / "resnet18-analyze.log").write_text(err)
    return [{"what": "analyze ResNet-18 224, 1000 classes, 16 images (defaults)", "procs": 1, "wall_s": wall,
             "own_s": s["trace_seconds"], "own": "trace seconds",
             "detail": f"{s['scheme']}, {s['probes']} probes, {'converged' if s['converged'] else 'NOT converged'} "
                       f"(worst layer rel. stderr {s['worst_rel_stderr']:.3g}, tol {s['tol']})",
             "load": f"{la} -> {load()}"}]


def table(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {os.cpu_count()} cores (shared: the load average is "
             f"the machine's, 1/5/15 min, before -> after each run), by `python benchmarks/bench_scale_out.py`.", "",
             "| run | processes | wall s | own s | 1 / 2 processes (wall) | detail | load average |",
             "|---|---:|---:|---:|---:|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["what"], {})[r["procs"]] = r
    for what, d in by.items():
        for n, r in sorted(d.items()):
            ratio = f"{d[1]['wall_s'] / r['wall_s']:.2f} x" if n == 2 and 1 in d else ""
            lines.append(f"| {what} | {n} | {r['wall_s']:.1f} | {r['own_s']:.1f} ({r['own']}) | {ratio} | "
                         f"{r['detail']} | {r['load']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="analyze,search,resnet18")
    ap.add_argument("--work", default=None, help="Directory for the models, data and outputs (default: a temporary one).")
    ap.add_argument("--no-write", action="store_true", help="Print the table only.")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    work.mkdir(parents=True, exist_ok=True)
    # rows of earlier runs in the same --work directory stay in the table unless measured again
    saved = work / "rows.json"
    rows = json.loads(saved.read_text()) if saved.exists() else []
    for what in filter(None, args.what.split(",")):   # --what "": rewrite the table from the saved rows
        new = {"analyze": bench_analyze, "search": bench_search, "resnet18": bench_resnet18}[what](work)
        rows = [r for r in rows if r["what"] not in {n["what"] for n in new}] + new
        saved.write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)
    if not args.no_write:
        replace_marked_section(DOC, BEGIN, END, table(rows))
        print(f"-> {DOC}")


if __name__ == "__main__":
    main()
