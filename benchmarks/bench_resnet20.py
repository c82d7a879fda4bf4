"""Latency of the zoo resnet20 (batch 1) compiled for llvm with a mixed plan, against onnxruntime
fp32 on the same model and TVM fp32 without our kernels.

The mixed-plan ONNX is the exported format of docs/onnx-format.md. Pass one with ``--onnx`` (from
``cwhawq export``); otherwise this script builds it from the zoo weights: BatchNorm folded, a
seeded random plan (weights 8/4/2 bits per output channel, activations 8/4 bits per input channel,
power-of-two activation scales calibrated on Fashion-MNIST test images, or on random images when
the dataset is missing), quantized with cwhawq/quantizers.py.

Each runtime is timed in its own process (TVM's spinning thread pool slows anything sharing the
process); within a process the variants are timed in interleaved rounds and each reports its
fastest round. Usage::

    python benchmarks/bench_resnet20.py [--onnx MODEL.onnx] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP_ORDER = (8, 6, 4, 3, 2)


# ===================================================================================== models
def fp32_resnet_onnx(batch="N"):
    """The zoo resnet20 as fp32 ONNX (BatchNorm folded into the convolutions)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from cwhawq.zoo import nets

    sd = torch.load(nets.weights_path("resnet20-fmnist"), map_location="cpu", weights_only=False)
    sd = {k: v.detach().cpu().numpy().astype(np.float32) if hasattr(v, "numpy") else v for k, v in sd.items()}
    nodes, inits = [], []

    def const(arr, name):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def conv_bn(x, conv, bn, name, stride, pad):
        w = sd[f"{conv}.weight"]
        g, b, mu, var = (sd[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        s = g / np.sqrt(var + 1e-5)
        wf = w * s[:, None, None, None]
        bf = b - mu * s
        out = f"{name}_out"
        nodes.append(helper.make_node("Conv", [x, const(wf, f"{name}.weight"), const(bf, f"{name}.bias")], [out],
                                      name=name, pads=[pad] * 4, strides=[stride, stride]))
        return out

    def relu(x, name):
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    nodes.append(helper.make_node("Sub", ["x", const(sd["norm.mean"].reshape(1, -1, 1, 1), "norm.mean")], ["xs"],
                                  name="norm.sub"))
    nodes.append(helper.make_node("Div", ["xs", const(sd["norm.std"].reshape(1, -1, 1, 1), "norm.std")], ["xn"],
                                  name="norm.div"))
    t = relu(conv_bn("xn", "conv1", "bn1", "conv1", 1, 1), "relu")
    for li, cout in enumerate((16, 32, 64), start=1):
        for j in range(3):
            p = f"layer{li}.{j}"
            stride = 2 if (j == 0 and li > 1) else 1
            h = relu(conv_bn(t, f"{p}.conv1", f"{p}.bn1", f"{p}.conv1", stride, 1), f"{p}.relu1")
            h = conv_bn(h, f"{p}.conv2", f"{p}.bn2", f"{p}.conv2", 1, 1)
            sc = t
            if f"{p}.downsample.0.weight" in sd:
                sc = conv_bn(t, f"{p}.downsample.0", f"{p}.downsample.1", f"{p}.downsample.0", stride, 0)
            nodes.append(helper.make_node("Add", [h, sc], [f"{p}.add_out"], name=f"{p}.add"))
            t = relu(f"{p}.add_out", f"{p}.relu2")
    nodes.append(helper.make_node("GlobalAveragePool", [t], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", const(sd["fc.weight"], "fc.weight"), const(sd["fc.bias"], "fc.bias")],
                                  ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "resnet20", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 28, 28])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)], producer_name="cwhawq-bench")
    m.ir_version = 11
    onnx.checker.check_model(m)
    return m


def calibration_images(n=64, seed=0):
    try:
        from cwhawq.data import read_idx

        d = Path(os.environ.get("CWHAWQ_DATA", "/usr/share/datasets/fashion-mnist"))
        x = read_idx(d / "t10k-images-idx3-ubyte.gz")[:n].astype(np.float32) / 255.0
        return x.reshape(-1, 1, 28, 28), "fashion-mnist"
    except Exception:  # noqa: BLE001 - any problem: random images
        return np.random.default_rng(seed).uniform(0, 1, (n, 1, 28, 28)).astype(np.float32), "random"


def mixed_plan_onnx(fp32, calib, seed=0, w_choices=(8, 4, 2), w_probs=(0.25, 0.5, 0.25), a_choices=(8, 4)):
    """Rewrite an fp32 ONNX into the exported mixed-precision format (docs/onnx-format.md)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from cwhawq import quantizers as qz

    rng = np.random.default_rng(seed)
    m = onnx.ModelProto.FromString(fp32.SerializeToString())
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    # calibration: per-channel max |x| of every layer input
    probe = onnx.ModelProto.FromString(fp32.SerializeToString())
    for n in layers:
        probe.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": calib})
    stats = {}
    for n, a in zip(layers, outs[1:]):
        axes = (0, 2, 3) if a.ndim == 4 else (0,)
        stats[n.name] = (np.abs(a).max(axis=axes), bool(a.min() >= 0))
    new_nodes, new_inits = [], list(g.initializer)
    wtype = {8: TensorProto.INT8, 6: TensorProto.INT8, 4: TensorProto.INT4, 3: TensorProto.INT4, 2: TensorProto.INT2}

    def t(arr, name, dtype=None, meta=None):
        if dtype is None:
            ten = numpy_helper.from_array(np.asarray(arr), name)
        else:
            ten = helper.make_tensor(name, dtype, list(np.shape(arr)), np.asarray(arr).reshape(-1).tolist())
        for k, v in (meta or {}).items():
            e = ten.metadata_props.add()
            e.key, e.value = k, v
        new_inits.append(ten)
        return name

    plan = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm"):
            new_nodes.append(n)
            continue
        L = n.name
        kind = "linear" if n.op_type == "Gemm" else "conv"
        w = inits[n.input[1]]
        b = inits[n.input[2]] if len(n.input) > 2 else np.zeros(w.shape[0], np.float32)
        ranges, unsigned = stats[L]
        cin = ranges.shape[0]
        a_bits = rng.choice(a_choices, cin)
        signed = not unsigned
        S, k = qz.act_pow2_scales(np.maximum(ranges, 1e-6), a_bits, signed)
        s = (np.float32(S) * np.exp2(k).astype(np.float32)).astype(np.float32)
        qlo, qhi = qz.act_bounds(s, a_bits, signed)
        shp = (1, -1, 1, 1) if kind == "conv" else (1, -1)
        lo = t((s * qlo).reshape(shp).astype(np.float32), f"{L}.act_lo")
        hi = t((s * qhi).reshape(shp).astype(np.float32), f"{L}.act_hi")
        sc = t(s, f"{L}.act_scale")
        zp = t(np.zeros(cin, np.int8 if signed else np.uint8), f"{L}.act_zp")
        new_nodes += [helper.make_node("Max", [n.input[0], lo], [f"{L}/act_max_out"], name=f"{L}/act_max"),
                      helper.make_node("Min", [f"{L}/act_max_out", hi], [f"{L}/act_min_out"], name=f"{L}/act_min"),
                      helper.make_node("QuantizeLinear", [f"{L}/act_min_out", sc, zp], [f"{L}/act_q_out"],
                                       name=f"{L}/act_q", axis=1),
                      helper.make_node("DequantizeLinear", [f"{L}/act_q_out", sc, zp], [f"{L}/act_dq_out"],
                                       name=f"{L}/act_dq", axis=1)]
        w_bits = rng.choice(w_choices, w.shape[0], p=w_probs)
        ws = qz.weight_scales(w, w_bits)
        codes = qz.quantize_weight(w, w_bits, ws)
        perm = np.concatenate([np.nonzero(w_bits == gb)[0] for gb in GROUP_ORDER])
        dqs = []
        for gb in GROUP_ORDER:
            idx = np.nonzero(w_bits == gb)[0]
            if not len(idx):
                continue
            wn = t(codes[idx], f"{L}.weight.w{gb}", wtype[gb], {"cwhawq.bits": str(gb),
                                                                "cwhawq.channels": json.dumps(idx.tolist())})
            sn = t(ws[idx], f"{L}.weight.w{gb}.scale")
            new_nodes.append(helper.make_node("DequantizeLinear", [wn, sn], [f"{L}/dq_w{gb}_out"], name=f"{L}/dq_w{gb}",
                                              axis=0))
            dqs.append(f"{L}/dq_w{gb}_out")
        if len(dqs) > 1:
            new_nodes.append(helper.make_node("Concat", dqs, [f"{L}/concat_w_out"], name=f"{L}/concat_w", axis=0))
        wt = dqs[0] if len(dqs) == 1 else f"{L}/concat_w_out"
        bn = t(b[perm].astype(np.float32), f"{L}.bias.q")
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        core_out = f"{L}/core_out"
        core = helper.make_node(n.op_type, [f"{L}/act_dq_out", wt, bn], [core_out], name=L, **attrs)
        meta = {"cwhawq.layer": L, "cwhawq.kind": kind, "cwhawq.w_bits": json.dumps(w_bits.tolist()),
                "cwhawq.perm": json.dumps(perm.tolist()), "cwhawq.a_bits": json.dumps(a_bits.tolist()),
                "cwhawq.a_signed": "true" if signed else "false", "cwhawq.a_scale_mode": "pow2",
                "cwhawq.a_base_scale": repr(float(S)), "cwhawq.a_exponents": json.dumps(k.tolist())}
        for kk, v in meta.items():
            e = core.metadata_props.add()
            e.key, e.value = kk, v
        new_nodes.append(core)
        inv = np.argsort(perm).astype(np.int64)
        new_nodes.append(helper.make_node("Gather", [core_out, t(inv, f"{L}.inv_perm")], [n.output[0]],
                                          name=f"{L}/unperm", axis=1))
        plan[L] = {"w_bits": np.bincount(w_bits, minlength=9)[[8, 4, 2]].tolist(), "a_bits_mean": float(a_bits.mean())}
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for nd in new_nodes for i in nd.input}
    keep = [x for x in new_inits if x.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for k, v in {"cwhawq.version": "bench", "cwhawq.format": "qdq",
                 "cwhawq.plan": json.dumps({"seed": seed, "w_choices": list(w_choices), "w_probs": list(w_probs),
                                            "a_choices": list(a_choices)})}.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(m)
    return m, plan


# ===================================================================================== workers
from _interleave import interleaved as _interleaved  # noqa: E402


def worker_tvm(args):
    from cwhawq.backends import tvm as btvm

    x = np.load(args.x)
    res, timers = {}, {}
    variants = [("tvm_ours_mixed", args.mixed, True), ("tvm_ours_fp32_kernels", args.fp32, True),
                ("tvm_fp32_no_kernels", args.fp32, False)]
    for name, path, kernels in variants:
        out = Path(args.tmp) / f"{name}.so"
        t0 = time.perf_counter()
        btvm.compile_model(path, "llvm", out, batch=1, kernels=kernels)
        res[name] = {"compile_s": time.perf_counter() - t0, "size_bytes": out.stat().st_size}
        art = btvm.load_artifact(out)
        number = 1 if not kernels else 50
        timers[name] = (lambda art=art, number=number: art.time({"x": x}, number=number, repeat=3))
    for name, sec in _interleaved(timers).items():
        res[name]["ms"] = sec * 1e3
    print(json.dumps(res))


def worker_ort(args):
    import onnxruntime as ort

    x = np.load(args.x)
    timers = {}
    for name, path in (("ort_fp32", args.fp32), ("ort_mixed_qdq", args.mixed)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for _ in range(20):
            s.run(None, {"x": x})

        def run(s=s):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(50):
                    s.run(None, {"x": x})
                best = min(best, (time.perf_counter() - t0) / 50)
            return best
        timers[name] = run
    print(json.dumps({k: {"ms": v * 1e3} for k, v in _interleaved(timers).items()}))


def _sub(mode, args_list, threads):
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--worker", mode] + args_list, capture_output=True, text=True,
                       check=False, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", help="mixed-plan ONNX (exported format); default: built from the zoo weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every runtime")
    ap.add_argument("--worker", choices=["tvm", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--mixed", help=argparse.SUPPRESS)
    ap.add_argument("--fp32", help=argparse.SUPPRESS)
    ap.add_argument("--x", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "tvm":
        return worker_tvm(args)
    if args.worker == "ort":
        return worker_ort(args)
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = fp32_resnet_onnx()
        fp = Path(tmp) / "resnet20_fp32.onnx"
        onnx.save(fp32, str(fp))
        calib, src = calibration_images()
        if args.onnx:
            mp, plan = Path(args.onnx), None
        else:
            mixed, plan = mixed_plan_onnx(fp32, calib, seed=args.seed)
            mp = Path(tmp) / "resnet20_mixed.onnx"
            onnx.save(mixed, str(mp))
        xp = Path(tmp) / "x.npy"
        np.save(xp, calib[:1])
        common = ["--mixed", str(mp), "--fp32", str(fp), "--x", str(xp), "--tmp", tmp]
        ort_res = _sub("ort", common, args.threads)
        tvm_res = _sub("tvm", common, args.threads)
    res = {**ort_res, **tvm_res}
    base = res["ort_fp32"]["ms"]
    print(f"resnet20 batch 1, llvm, {args.threads} thread(s); calibration: {src}")
    print(f"{'runtime':<24}{'ms':>10}{'vs ORT fp32':>14}")
    for k, v in res.items():
        print(f"{k:<24}{v['ms']:>10.3f}{v['ms'] / base:>13.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": res, "plan": plan, "calibration": src,
                                               "threads": args.threads, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
