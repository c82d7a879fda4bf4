"""cwhawq's compiled models against onnxruntime on this machine (issue 14's table).

Models: zoo:resnet20-fmnist (batch 1 and 16): onnxruntime fp32 and int8, cwhawq fp32 (our fp32
kernels), uniform W8A8, W4A8, W8A6, the cw-greedy and the DDPG (CW-HAWQ search) plans at bits:3;
ResNet-18 and MobileNetV2 at 1x3x224x224 (benchmarks/_archs.py, seeded random weights and BatchNorm
statistics), batch 1: onnxruntime fp32 and int8, cwhawq fp32, W8A8, W4A8; zoo:vit-fmnist (batch 1):
the same rows and the cw-greedy plans at bits:4 and bits:3. Every plan with 8-bit activations is also
exported with ``--act-scale migrate`` (rows "... migrate": the activation exponents in the weights,
one 8-bit digit per activation in the kernels). Rows for AVX2's exact ``vpmaddubsw`` path, exported
migrated only: W7A8 (7-bit weights) on every model, and on resnet20 the cw-greedy bits:3 plan over
the bit set {2, 4, 7}.

* onnxruntime int8: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, U8S8) of the fp32
  export (``cwhawq export --fp32``), calibrated on the same images as the cwhawq plans;
* cwhawq: ``cwhawq plan`` / ``analyze`` / ``search`` / ``export`` / ``compile --target T`` (symbolic
  batch), every step through the command line as a user runs it;
* timing: each runtime in its own process (onnxruntime with default session options through its
  Python API; TVM through its C++ time evaluator with ``TVM_NUM_THREADS`` = physical cores); within a
  process the variants are timed in interleaved rounds, each round takes the median of ``--repeat``
  measurements, each variant reports its fastest round.

On an AVX-512 machine ``--also-avx2`` adds the same cwhawq rows compiled with ``-mcpu=haswell``
(the AVX2 kernels; most deployed x86 machines have no AVX-512).

Intermediate files (exports, artifacts, plans) go to ``--work`` (default ``runs/bench_vs_ort``)
and are reused when present, so a rerun only re-times. Results: ``docs/kernels-vs-ort.json`` and
the marked table in ``docs/kernels.md``.

    python benchmarks/bench_vs_onnxruntime.py [--quick] [--models resnet20,resnet18,mobilenetv2,vit]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent / "cwhawq"
BEGIN, END = "<!-- bench_vs_onnxruntime: begin -->", "<!-- bench_vs_onnxruntime: end -->"
ZOO = {"resnet20": "zoo:resnet20-fmnist", "vit": "zoo:vit-fmnist"}


def sh(*args, log=True):
    cmd = [str(BIN)] + [str(a) for a in args]
    if log:
        print("  $ cwhawq " + " ".join(str(a) for a in args), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def cpu_info() -> dict:
    info = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa_flags"] = sorted(f for f in flags if f in {
                    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                    "amx_int8", "sse4_2"})
                break
    except OSError:
        pass
    try:
        from tvm.target import codegen

        info["llvm_cpu"] = codegen.llvm_get_system_cpu()
    except Exception:  # noqa: BLE001
        pass
    info["cpus"] = len(os.sched_getaffinity(0))
    return info


# ===================================================================================== building
def calib_npz(work: Path, name: str) -> Path:
    p = work / f"{name}.calib.npz"
    if not p.exists():
        rng = np.random.default_rng(0)
        np.savez(p, x=rng.integers(0, 256, (64, 3, 224, 224), dtype=np.uint8), y=rng.integers(0, 1000, 64))
    return p


def ort_int8(fp32: Path, out: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if out.exists():
        return
    import onnx

    name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(str(fp32), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.replace(tmp, out)


# 7-bit weights exist for AVX2 (vpmaddubsw, exact) and run one-digit activations: migrated rows only
MIGRATED_ONLY = {"W7A8", "cw-greedy bits:3 {2,4,7}"}


def _has_omega(sens: Path, bits: int) -> bool:
    """Whether a sensitivity file has Omega at ``bits`` (files from before 7-bit weights lack it)."""
    return str(bits) in json.loads(sens.read_text())["layers"][0]["weight"]["omega"]


def build_model(model: str, work: Path, quick: bool, targets: dict, episodes: int) -> list[dict]:
    """Exports, plans and artifacts of one model; returns the variants to time."""
    zoo = model in ZOO
    if zoo:
        spec = ZOO[model]
        data = ["--data", "fashion-mnist"]
        from cwhawq import data as D

        ds = D.load("fashion-mnist", "train")
        calib = ds.x[:64].astype(np.float32)
    else:
        import _archs

        spec = work / f"{model}.pt2"
        if not spec.exists():
            _archs.export_pt2(model, spec)
        npz = calib_npz(work, model)
        data = ["--data", npz]
        calib = np.load(npz)["x"].astype(np.float32) / 255.0
    fp32 = work / f"{model}.fp32.onnx"
    if not fp32.exists():
        sh("export", spec, "--fp32", "--out", fp32)
    int8 = work / f"{model}.ort_int8.onnx"
    ort_int8(fp32, int8, calib[:32])
    variants = [{"model": model, "name": "onnxruntime fp32", "runtime": "onnxruntime", "path": str(fp32)},
                {"model": model, "name": "onnxruntime int8 (quantize_static)", "runtime": "onnxruntime",
                 "path": str(int8)}]
    plans = {"W8A8": ("uniform", ["--w-bits", "8", "--a-bits", "8"]),
             "W4A8": ("uniform", ["--w-bits", "4", "--a-bits", "8"])}
    if not quick:  # 7-bit weights: the exact vpmaddubsw path on AVX2 (exported migrated only)
        plans["W7A8"] = ("uniform", ["--w-bits", "7", "--a-bits", "8"])
    if model == "vit" and not quick:
        plans["cw-greedy bits:4"] = ("cw-greedy", ["--budget", "bits:4"])
        plans["cw-greedy bits:3"] = ("cw-greedy", ["--budget", "bits:3"])
    if model == "resnet20" and not quick:
        plans["W8A6"] = ("uniform", ["--w-bits", "8", "--a-bits", "6"])
        plans["cw-greedy bits:3"] = ("cw-greedy", ["--budget", "bits:3"])
        plans["CW-HAWQ (DDPG) bits:3"] = ("search", ["--budget", "bits:3", "--episodes", str(episodes), "--seed", "0"])
        plans["cw-greedy bits:3 {2,4,7}"] = ("cw-greedy", ["--budget", "bits:3", "--bits", "2,4,7"])
    onnxs = {"fp32": fp32}
    sens = work / f"{model}.sens.json"
    for label, (method, args) in plans.items():
        slug = label.split()[0].replace(":", "").replace("(", "").replace(")", "").lower()
        if "{" in label:
            slug += "." + label.split("{")[1].rstrip("}").replace(",", "")
        plan = work / f"{model}.{slug}.plan.json"
        if not plan.exists():
            if method in ("cw-greedy", "search") and (not sens.exists() or not _has_omega(sens, 7)):
                sh("analyze", spec, *data, "--out", sens)
            if method == "search":
                sh("search", spec, *data, "--sens", sens, *args, "--out", plan)
            elif method == "cw-greedy":
                sh("plan", method, spec, "--sens", sens, *args, "--out", plan)
            else:
                sh("plan", method, spec, *args, "--out", plan)
        # the 224x224 models have random weights: their codes' rounding changes no kernel, and a
        # learned-rounding reconstruction of ResNet-18 at 224 costs many CPU minutes
        rounding = [] if zoo else ["--rounding", "nearest"]
        onnx_path = work / f"{model}.{slug}.onnx"
        if label not in MIGRATED_ONLY:
            if not onnx_path.exists():
                sh("export", spec, "--plan", plan, *data, *rounding, "--out", onnx_path)
            onnxs[label] = onnx_path
        if method != "uniform" or "A8" in label:
            # the same plan with the activation exponents migrated into the weights (one 8-bit digit)
            mig = work / f"{model}.{slug}.migrate.onnx"
            if not mig.exists():
                sh("export", spec, "--plan", plan, *data, *rounding, "--act-scale", "migrate", "--out", mig)
            onnxs[f"{label} migrate"] = mig
    for tname, tspec in targets.items():
        for label, onnx_path in onnxs.items():
            art = work / f"{onnx_path.stem}.{tname}.so"
            if not art.exists():
                sh("compile", onnx_path, "--target", tspec, "--out", art)
            man = json.loads(art.with_name(art.name[:-3] + ".manifest.json").read_text())
            suffix = "" if tname == "host" else f" [{tname}]"
            variants.append({"model": model, "name": f"cwhawq {label}{suffix}", "runtime": "tvm", "path": str(art),
                             "isa": man["target"].get("isa")})
    return variants


# ===================================================================================== timing
def _input(shape, batch):
    shp = [batch if not isinstance(d, int) else d for d in shape]
    shp[0] = batch
    return np.random.default_rng(0).random(shp, dtype=np.float32)


def worker(runtime: str, jobs: list[dict], rounds: int, repeat: int, out: Path) -> None:  # pragma: no cover
    timers = {}
    if runtime == "onnxruntime":
        import onnxruntime as ort

        for j in jobs:
            # a session per measurement: every session owns a spinning thread pool, and idle pools of
            # the other variants would compete with the one being timed
            def t(path=j["path"], batch=j["batch"]):
                sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                inp = sess.get_inputs()[0]
                feeds = {inp.name: _input(inp.shape, batch)}
                for _ in range(3):
                    sess.run(None, feeds)
                t0 = time.perf_counter()
                n = 0
                while True:
                    sess.run(None, feeds)
                    n += 1
                    if time.perf_counter() - t0 > 0.002 and n >= 3:
                        break
                number = n
                res = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    for _ in range(number):
                        sess.run(None, feeds)
                    res.append((time.perf_counter() - t0) / number)
                return float(np.median(res))
            timers[j["key"]] = t
    else:
        import tvm

        from cwhawq.backends.tvm import load_artifact

        for j in jobs:
            art = load_artifact(j["path"])
            dev = art.dev
            args = [tvm.runtime.tensor(_input(i["shape"], j["batch"]), dev) for i in art.inputs]
            f = art.vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=2)

            def t(f=f, args=args, art=art, dev=dev):
                fe = art.vm.time_evaluator("main", dev, number=0 or 1, repeat=repeat, min_repeat_ms=2)
                return float(np.median(fe(*args).results))
            f(*args)
            timers[j["key"]] = t
    best = {k: float("inf") for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            best[k] = min(best[k], t())
    out.write_text(json.dumps(best))


def time_all(variants: list[dict], batches: dict, rounds: int, repeat: int, work: Path) -> dict:
    results = {}
    for runtime in ("onnxruntime", "tvm"):
        jobs = []
        for v in variants:
            if v["runtime"] != runtime:
                continue
            for b in batches[v["model"]]:
                jobs.append({**v, "batch": b, "key": f"{v['model']}|{v['name']}|{b}"})
        if not jobs:
            continue
        jf, rf = work / f"jobs.{runtime}.json", work / f"res.{runtime}.json"
        jf.write_text(json.dumps(jobs))
        print(f"timing {len(jobs)} {runtime} variants ({rounds} interleaved rounds)...", flush=True)
        subprocess.run([sys.executable, __file__, "--worker", runtime, "--jobs", str(jf), "--rounds", str(rounds),
                        "--repeat", str(repeat), "--result", str(rf)], check=True)
        results.update(json.loads(rf.read_text()))
    return results


# ===================================================================================== report
def table(variants, results, batches, info) -> str:
    lines = [f"Machine: {info.get('model', '?')} ({info.get('llvm_cpu', '?')}; "
             f"{', '.join(info.get('isa_flags', []))}), {info['cpus']} CPUs; load average "
             f"{info.get('load', '?')} at the start. Each row: the fastest round's median.", ""]
    for model in dict.fromkeys(v["model"] for v in variants):
        bs = batches[model]
        head = "| variant | isa | " + " | ".join(f"batch {b} | vs ORT fp32 | vs ORT int8" for b in bs) + " |"
        lines += [f"**{model}**", "", head, "|---|---|" + "---:|---:|---:|" * len(bs)]
        rows = [v for v in variants if v["model"] == model]
        for v in rows:
            cells = []
            for b in bs:
                t = results.get(f"{model}|{v['name']}|{b}")
                f = results.get(f"{model}|onnxruntime fp32|{b}")
                i8 = results.get(f"{model}|onnxruntime int8 (quantize_static)|{b}")
                if t is None:
                    cells += ["-", "-", "-"]
                    continue
                cells += [f"{t * 1e3:.3f} ms", f"{t / f:.2f}x" if f else "-", f"{t / i8:.2f}x" if i8 else "-"]
            lines.append(f"| {v['name']} | {v.get('isa') or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet18,mobilenetv2,vit")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_vs_ort"))
    ap.add_argument("--quick", action="store_true", help="resnet20 batch 1 only, uniform plans, 2 rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=120, help="DDPG episodes for the bits:3 search plan")
    ap.add_argument("--also-avx2", action="store_true", help="also compile for -mcpu=haswell (AVX2)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "kernels-vs-ort.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "kernels.md"))
    ap.add_argument("--build-only", action="store_true", help="build the exports and artifacts, time nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, json.loads(Path(a.jobs).read_text()), a.rounds, a.repeat, Path(a.result))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    info = cpu_info()
    info["load"] = f"{os.getloadavg()[0]:.2f}"
    targets = {"host": "llvm"}
    if a.also_avx2:
        targets["avx2"] = json.dumps({"kind": "llvm", "mcpu": "haswell", "num-cores": info["cpus"]})
    models = a.models.split(",") if not a.quick else ["resnet20"]
    variants, batches = [], {}
    for m in models:
        print(f"[{m}] building", flush=True)
        variants += build_model(m, work, a.quick, targets, a.episodes)
        batches[m] = [1] if (a.quick or m != "resnet20") else [1, 16]
    if a.build_only:
        print(f"built {len(variants)} variants in {work}")
        return
    results = time_all(variants, batches, 2 if a.quick else a.rounds, a.repeat, work)
    text = table(variants, results, batches, info)
    print(text)
    if not a.quick:
        from cwhawq.io import replace_marked_section, write_json

        write_json(a.json, {"machine": info, "variants": variants, "batches": batches, "seconds": results})
        replace_marked_section(a.doc, BEGIN, END, text)


if __name__ == "__main__":
    main()
