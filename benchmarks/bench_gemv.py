"""GEMV / small-batch GEMM with packed weights: our TVM kernels against TVM fp32 dense and
onnxruntime (fp32 MatMul and MatMulNBits int4), K = N = 4096 by default, batch 1 and 16.

Every runtime runs in its own process, one after the other (TVM's thread pool spins after a call
and slows anything else in the process), with the same number of threads (all cores by default).
Within a process the variants are timed in interleaved rounds and each reports its fastest round,
which keeps the ratios meaningful on a machine shared with other work. The
achieved bandwidth (weight bytes / time) is compared with a read-bandwidth measurement of a buffer
the size of the weights, taken in the same run by a TVM kernel (parallel, vectorised loads).

Our kernels quantize the float input on the fly with a static per-tensor int8 scale (the plan's
activation quantizer; onnxruntime's MatMulNBits with accuracy_level=4 quantizes to int8 too, with
dynamic per-block scales) and accumulate in int32 with AVX-512 VNNI where available.

Usage::

    python benchmarks/bench_gemv.py [--k 4096] [--n 4096] [--batches 1,16] [--threads N] [--json out.json] [--md out.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ===================================================================================== workers
def _tvm_target():
    import tvm

    from cwhawq.backends.targets import host_cpu_config

    return tvm.target.Target(host_cpu_config())


def _linear_op(k, n, bits, seed=0):
    from cwhawq.kernels import packing
    from cwhawq.kernels.gemm import ActQuant, LinearOp, WeightGroup

    rng = np.random.default_rng(seed)
    idx = np.arange(n, dtype=np.int32)
    if bits == 32:
        w = rng.normal(size=(n, k)).astype(np.float32)
        grp = WeightGroup(out_index=idx, scale=np.ones(n, np.float32), float_data=packing.pack_float_weight(w))
        return LinearOp(k=k, n_out=n, groups=[grp], bias=np.zeros(n, np.float32))
    qm = (1 << (bits - 1)) - 1
    q = rng.integers(-qm, qm + 1, (n, k))
    grp = WeightGroup(out_index=idx, scale=np.full(n, 0.01, np.float32), packed=packing.pack_weight(q, bits=bits))
    act = ActQuant.build(np.float32(0.05), 0, -127, 127, k)
    return LinearOp(k=k, n_out=n, groups=[grp], bias=np.zeros(n, np.float32), act=act)


from _interleave import interleaved as _interleaved  # noqa: E402


def _vm_timer(mod, args, number):
    import tvm
    from tvm import relax

    from cwhawq.backends.tvm import cpu_pipeline

    target = _tvm_target()
    ex = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    targs = [tvm.runtime.tensor(a) for a in args]
    vm["main"](*targs)
    f = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=3)
    return lambda: float(min(f(*targs).results))


def worker_tvm(args):
    """Our packed kernels (int8/int4/int2), our fp32 kernel, TVM's own fp32 matmul."""
    from tvm import relax

    from cwhawq.kernels import gemm

    target = _tvm_target()
    isa = gemm.isa_for_target(target)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.batch, args.k)).astype(np.float32)
    timers, nbytes = {}, {}
    for bits in (8, 4, 2, 32):
        op = _linear_op(args.k, args.n, bits)
        name = f"tvm_ours_int{bits}" if bits != 32 else "tvm_ours_fp32"
        timers[name] = _vm_timer(gemm.linear_module(op, isa, batch=args.batch), [x], number=20)
        nbytes[name] = op.weight_bytes
    out = {"isa": isa}
    for k, sec in _interleaved(timers).items():
        out[k] = {"us": sec * 1e6, "weight_bytes": nbytes[k]}
    # TVM's own fp32 dense (relax matmul, legalised; our generic CPU rules schedule the rest): slow,
    # timed once
    w = rng.normal(size=(args.k, args.n)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([args.batch, args.k], "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(xv, relax.const(w))))
        bb.emit_func_output(y)
    out["tvm_fp32_matmul"] = {"us": _vm_timer(bb.get(), [x], number=1)() * 1e6, "weight_bytes": w.nbytes}
    print(json.dumps(out))


def worker_bandwidth(args):
    """Read bandwidth of buffers the size of the packed weights (parallel vector loads)."""
    import tvm
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    target = _tvm_target()
    out, timers, sizes = {}, {}, {}
    for bits in (8, 4, 2, 32):
        nbytes = args.k * args.n * bits // 8
        chunks = nbytes // 4096  # 64 x 64-byte lines per task
        with IRBuilder() as ib:
            with T.prim_func():
                T.func_name("bw")
                T.func_attr({"global_symbol": "bw", "tirx.noalias": True})
                B = T.arg("B", T.buffer((chunks, 64, 16), "int32"))
                O = T.arg("O", T.buffer((chunks * 16,), "int32"))
                with T.parallel(0, chunks) as c:
                    acc = T.alloc_buffer((64,), "int32", scope="local")
                    for u in range(4):
                        T.buffer_store(acc, T.broadcast(T.int32(0), 16), [T.ramp(u * 16, 1, 16)])
                    with T.serial(0, 16) as i:
                        for u in range(4):
                            T.buffer_store(acc, tirx.bitwise_xor(acc[T.ramp(u * 16, 1, 16)], B[c, i * 4 + u, T.ramp(0, 1, 16)]),
                                           [T.ramp(u * 16, 1, 16)])
                    T.buffer_store(O, acc[T.ramp(0, 1, 16)] ^ acc[T.ramp(16, 1, 16)] ^ acc[T.ramp(32, 1, 16)]
                                   ^ acc[T.ramp(48, 1, 16)], [T.ramp(c * 16, 1, 16)])
        lib = tvm.compile(tvm.IRModule({"bw": ib.get()}), target=target)
        b = tvm.runtime.tensor(np.ones((chunks, 64, 16), np.int32))
        o = tvm.runtime.tensor(np.zeros(chunks * 16, np.int32))
        f = lib.mod.time_evaluator("bw", tvm.cpu(), number=20, repeat=3)
        timers[bits] = (lambda f=f, b=b, o=o: float(min(f(b, o).results)))
        sizes[bits] = nbytes
    for bits, sec in _interleaved(timers).items():
        out[f"read_{bits}bit_weights"] = {"bytes": sizes[bits], "us": sec * 1e6, "GBps": sizes[bits] / sec / 1e9}
    print(json.dumps(out))


def worker_ort(args):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(2)
    w = rng.normal(size=(args.k, args.n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [args.batch, args.k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [args.batch, args.n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    a = rng.normal(size=(args.batch, args.k)).astype(np.float32)
    out = {}

    def timer(model):
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(10):
            s.run(None, {"a": a})

        def run():
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(20):
                    s.run(None, {"a": a})
                best = min(best, (time.perf_counter() - t0) / 20)
            return best
        return run

    timers = {"ort_fp32_matmul": timer(m)}
    nbytes = {"ort_fp32_matmul": w.nbytes}
    for bs in (32, 128):
        q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(m.SerializeToString()), bits=4, block_size=bs,
                                 is_symmetric=True, accuracy_level=4)
        q.process()
        name = f"ort_matmulnbits_int4_bs{bs}"
        timers[name] = timer(q.model.model)
        nbytes[name] = sum(len(t.raw_data) for t in q.model.model.graph.initializer)
    for k, sec in _interleaved(timers).items():
        out[k] = {"us": sec * 1e6, "weight_bytes": nbytes[k]}
    print(json.dumps(out))


WORKERS = {"tvm": worker_tvm, "bandwidth": worker_bandwidth, "ort": worker_ort}


def _sub(mode, a, batch):
    cmd = [sys.executable, __file__, "--worker", mode, "--k", str(a.k), "--n", str(a.n), "--batch", str(batch)]
    env = dict(os.environ, TVM_NUM_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every runtime")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--md", help="write a markdown table here")
    args = ap.parse_args()
    if args.worker:
        return WORKERS[args.worker](args)
    results = {"k": args.k, "n": args.n, "threads": args.threads, "batches": {}}
    lines = []
    for batch in (int(b) for b in args.batches.split(",")):
        bw = _sub("bandwidth", args, batch)
        ortr = _sub("ort", args, batch)
        tvmr = _sub("tvm", args, batch)
        rows = {**tvmr, **ortr}
        isa = rows.pop("isa")
        results["batches"][batch] = {"isa": isa, "runtimes": rows, "bandwidth": bw}
        fp32 = min(rows["tvm_ours_fp32"]["us"], rows["tvm_fp32_matmul"]["us"])
        nbits = min(v["us"] for k, v in rows.items() if k.startswith("ort_matmulnbits"))
        lines.append(f"\nK={args.k} N={args.n} batch {batch} ({args.threads} thread(s), isa {isa})")
        lines.append("| runtime | us | weight MB | GB/s | vs best TVM fp32 | vs ORT MatMulNBits int4 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, v in sorted(rows.items(), key=lambda kv: kv[1]["us"]):
            gbs = v["weight_bytes"] / (v["us"] * 1e-6) / 1e9
            lines.append(f"| {name} | {v['us']:.1f} | {v['weight_bytes'] / 2**20:.1f} | {gbs:.1f} | "
                         f"{fp32 / v['us']:.2f}x | {nbits / v['us']:.2f}x |")
        lines.append("| read bandwidth (same bytes) | | | " + ", ".join(
            f"{k.split('_')[1]}: {v['GBps']:.1f}" for k, v in bw.items()) + " | | |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
