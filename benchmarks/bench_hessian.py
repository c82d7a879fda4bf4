"""Benchmark of the channel-wise Hessian traces on zoo:resnet20-fmnist (issue 3).

    .venv/bin/python benchmarks/bench_hessian.py [--seconds 40] [--out docs/hessian-bench.md]

Measured in one run on this machine:
1. error against compute for each probing scheme: relative error of the per-channel traces against
   the reference (the exact GGN diagonal-block traces, which equal the Hessian's for this piecewise-linear
   network; tests/test_hessian.py checks that equality against full Hessians on tiny models), after
   each probe, until a time limit;
2. channels one at a time (one HVP per channel): cost per probe measured on the first layers;
3. per-channel traces against layer-wise traces from the same products (the only extra work is the
   per-channel reduction);
4. a full analysis at the default settings (cwhawq analyze), with its peak memory (in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cwhawq import data as D  # noqa: E402
from cwhawq.graph import qmodel_from_loaded  # noqa: E402
from cwhawq.hessian import _BatchGraph, _rademacher, channel_traces  # noqa: E402
from cwhawq.models import load_model  # noqa: E402


def rel_errors(res, ref):
    ew = np.concatenate([np.abs(res.weight_trace[n] - ref.weight_trace[n]) / np.abs(ref.weight_trace[n]) for n in ref.names])
    ea = np.concatenate([np.abs(res.act_trace[n] - ref.act_trace[n]) / np.abs(ref.act_trace[n]) for n in ref.names])
    lw = [abs(res.weight_trace[n].sum() - ref.weight_trace[n].sum()) / ref.weight_trace[n].sum() for n in ref.names]
    la = [abs(res.act_trace[n].sum() - ref.act_trace[n].sum()) / ref.act_trace[n].sum() for n in ref.names]
    return float(np.median(ew)), float(np.median(ea)), float(max(lw + la))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0, help="time per Hutchinson scheme")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="docs/hessian-bench.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    qm = qmodel_from_loaded(load_model("zoo:resnet20-fmnist"))
    ds = D.load("fashion-mnist", "train").subset(args.batch_size, seed=0)
    batch = [(torch.from_numpy(ds.x), torch.from_numpy(ds.y))]
    rows = []
    t = time.time()
    ref = channel_traces(qm, batch, scheme="exact")
    rows.append({"scheme": "exact (GGN blocks, per-sample gradients)", "seconds": ref.seconds, "probes": 1,
                 "products": ref.hvps, "w_err": 0.0, "a_err": 0.0, "layer_err": 0.0})
    print("reference", round(time.time() - t, 2), "s", flush=True)
    for scheme in ("ggn", "network", "interleave:4", "layer"):
        r = channel_traces(qm, batch, scheme=scheme, max_probes=100000, tol=0.0, seed=1, time_limit=args.seconds)
        w, a, l = rel_errors(r, ref)
        rows.append({"scheme": scheme, "seconds": r.seconds, "probes": r.probes, "products": r.hvps,
                     "w_err": w, "a_err": a, "layer_err": l})
        print(rows[-1], flush=True)
    # channels one at a time: cost of one probe on the first layer's weights (16 channels)
    g = _BatchGraph(qm, *batch[0])
    gen = torch.Generator().manual_seed(0)
    _ = g.grads
    t = time.time()
    leaf = g.leaves[1]
    n_ch = leaf.shape[0]
    for c in range(n_ch):
        v = torch.zeros_like(leaf)
        v[c] = _rademacher(leaf[c].shape, gen)
        g.hvp([1], [v])
    per_hvp = (time.time() - t) / n_ch
    total_ch = sum(i.out_channels + i.in_channels for i in qm.layer_infos)
    # per-channel vs layer-wise reduction from the same products (layer scheme, 3 probes)
    idx = list(range(len(g.leaves)))
    vs = [_rademacher(g.leaves[i].shape, gen) for i in idx]
    hv = g.hvp(idx, vs)
    reps = 20
    t = time.time()
    for _ in range(reps):
        [(v * h).sum() for v, h in zip(vs, hv)]
    t_layer = (time.time() - t) / reps
    t = time.time()
    for _ in range(reps):
        [(v * h).reshape(v.shape[0], -1).sum(1) if i < len(qm.names) else (v * h).transpose(0, 1).reshape(v.shape[1], -1).sum(1)
         for i, (v, h) in enumerate(zip(vs, hv))]
    t_chan = (time.time() - t) / reps
    t = time.time()
    for _ in range(3):
        g.hvp(idx, [_rademacher(g.leaves[i].shape, gen) for i in idx])
    t_prod = (time.time() - t) / 3
    ratio = (t_prod + t_chan) / (t_prod + t_layer)
    # full analysis at the default tol, in a subprocess for its peak memory
    cmd = [sys.executable, "-m", "cwhawq.cli", "analyze", "zoo:resnet20-fmnist", "--out", "/tmp/bench_sens.json", "--json"]
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    wall = time.time() - t
    peak = next((int(l.split()[-1]) for l in r.stderr.splitlines() if "Maximum resident" in l), None)
    summary = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}
    lines = [
        "# Channel-wise Hessian traces: benchmark", "",
        f"Measured by `.venv/bin/python benchmarks/bench_hessian.py --seconds {args.seconds:g}` on this machine "
        f"({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads), zoo:resnet20-fmnist, "
        f"one batch of {args.batch_size} train samples, {len(qm.names)} layers, {total_ch} weight + activation channels.",
        "", "Reference: the exact traces of the Hessian's diagonal blocks (GGN blocks from per-sample gradients; equal to the "
        "Hessian's for this piecewise-linear network, checked against full Hessians in tests/test_hessian.py).",
        "Errors: median over channels of |estimate - reference| / reference (weights, activations), and the worst "
        "layer-trace relative error, after the time limit per scheme.", "",
        "| scheme | seconds | probes | products (HVPs / backward passes) | median channel rel. err (weights) | "
        "median channel rel. err (activations) | worst layer-trace rel. err |",
        "|---|---|---|---|---|---|---|"]
    for r_ in rows:
        lines.append(f"| {r_['scheme']} | {r_['seconds']:.1f} | {r_['probes']} | {r_['products']} | {r_['w_err']:.4f} | "
                     f"{r_['a_err']:.4f} | {r_['layer_err']:.4f} |")
    lines += ["", f"Channels one at a time (one HVP per channel, the alternative to sharing products): one HVP on "
                  f"layer1.0.conv1 costs {per_hvp * 1000:.0f} ms, so one probe of all {total_ch} channels costs about "
                  f"{per_hvp * total_ch:.0f} s (extrapolated from that layer's measured cost) - "
                  f"{per_hvp * total_ch / max(rows[-1]['seconds'] / max(rows[-1]['probes'], 1), 1e-9):.0f}x a probe of the "
                  f"`layer` scheme, for the same variance per channel.",
              "", f"Per-channel against layer-wise traces from the same products: one all-leaf product {t_prod * 1000:.0f} ms, "
                  f"layer-wise reduction {t_layer * 1000:.2f} ms, per-channel reduction {t_chan * 1000:.2f} ms: "
                  f"ratio {ratio:.3f}x (goal <= 1.1x).",
              "", f"Full analysis at the defaults (`cwhawq analyze zoo:resnet20-fmnist --out sens.json`: scheme "
                  f"{summary.get('scheme')}, tol 0.01): {wall:.1f} s wall including start-up "
                  f"({summary.get('seconds', float('nan')):.1f} s inside), peak memory {peak / 1024 if peak else float('nan'):.0f} MiB "
                  f"(goal: under 2 minutes)."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    if args.json:
        json.dump({"rows": rows, "per_hvp": per_hvp, "ratio": ratio, "analysis_wall": wall, "peak_kib": peak},
                  open(args.json, "w"))


if __name__ == "__main__":
    main()
