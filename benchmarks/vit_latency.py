"""Latency of the zoo:vit-fmnist plans of docs/results.md's ViT table (issue 15), batch 1.

Takes the exports that ``benchmarks/vit_results.py`` wrote (``--workdir``, default runs/vit_results:
uniform_W8A8.onnx, hawq-v3_bits3.onnx, ...), compiles each for this machine (``cwhawq compile``,
symbolic batch), adds onnxruntime fp32 (``cwhawq export --fp32``), its int8 ``quantize_static``
model (QDQ, per-channel, U8S8, 32 train images) and cwhawq's fp32 artifact, and times them all with
benchmarks/bench_vs_onnxruntime.py's timer (each runtime in its own process, interleaved rounds,
fastest round's median). The table goes between the ``vit-latency`` markers of docs/results.md.

    python benchmarks/vit_latency.py [--workdir runs/vit_results] [--rounds 5] [--repeat 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_vs_onnxruntime as bvo  # noqa: E402

BEGIN, END = "<!-- vit-latency:begin -->", "<!-- vit-latency:end -->"
ROWS = [("uniform W8A8", "uniform_W8A8"), ("uniform W4A8", "uniform_W4A8"),
        ("hawq-v3 bits:4", "hawq-v3_bits4"), ("cw-greedy bits:4", "cw-greedy_bits4"), ("DDPG bits:4", "DDPG_bits4"),
        ("hawq-v3 bits:3", "hawq-v3_bits3"), ("cw-greedy bits:3", "cw-greedy_bits3"), ("DDPG bits:3", "DDPG_bits3")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "vit_results"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    a = ap.parse_args()
    work = Path(a.workdir)
    if not work.is_dir():
        raise SystemExit(f"{work}: no such directory (run benchmarks/vit_results.py first)")
    from cwhawq import data as D

    fp32 = work / "vit.fp32.onnx"
    if not fp32.exists():
        bvo.sh("export", "zoo:vit-fmnist", "--fp32", "--out", fp32)
    int8 = work / "vit.ort_int8.onnx"
    bvo.ort_int8(fp32, int8, D.load("fashion-mnist", "train").x[:32].astype("float32"))
    variants = [{"model": "vit", "name": "onnxruntime fp32", "runtime": "onnxruntime", "path": str(fp32)},
                {"model": "vit", "name": "onnxruntime int8 (quantize_static)", "runtime": "onnxruntime",
                 "path": str(int8)}]
    for label, stem in [("cwhawq fp32", "vit.fp32")] + [(f"cwhawq {lbl}", s) for lbl, s in ROWS]:
        src = work / f"{stem}.onnx"
        if not src.exists():
            print(f"  (no {src.name}: row skipped)")
            continue
        art = work / f"{stem}.host.so"
        if not art.exists():
            bvo.sh("compile", src, "--out", art)
        man = json.loads(art.with_name(art.name[:-3] + ".manifest.json").read_text())
        variants.append({"model": "vit", "name": label, "runtime": "tvm", "path": str(art),
                         "isa": man["target"].get("isa")})
    info = bvo.cpu_info()
    info["load"] = f"{os.getloadavg()[0]:.2f}"
    results = bvo.time_all(variants, {"vit": [1]}, a.rounds, a.repeat, work)
    text = bvo.table(variants, results, {"vit": [1]}, info)
    text = ("Measured by `benchmarks/vit_latency.py` (compiled with `cwhawq compile --target llvm`, symbolic "
            "batch, timed at batch 1).\n\n" + text)
    print(text)
    from cwhawq.io import replace_marked_section

    replace_marked_section(a.doc, BEGIN, END, text)


if __name__ == "__main__":
    main()
