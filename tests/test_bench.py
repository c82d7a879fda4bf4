"""Benchmarking through a real TVM RPC tracker and servers on 127.0.0.1, and latency tables.

A module fixture starts ``python -m tvm.exec.rpc_tracker`` and two ``python -m tvm.exec.rpc_server
--tracker ... --key board`` processes on random free ports (each server in its own process group,
so that killing it kills its session process too), and tears them down afterwards. Boards that
die or hang mid-measurement get servers of their own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # the tracker needs it

from cwhawq.bench import BenchError, Remote, bench, parse_rpc, summarize  # noqa: E402
from cwhawq.latency import (LatencyError, LatencyTable, act_digits, build_table, class_fractions,  # noqa: E402
                            grid_points, interpolate, point_counts)

pytestmark = pytest.mark.tvm
HOST = "127.0.0.1"


# ===================================================================================== cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.tracker = self._spawn(["-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(self.port),
                                    "--port-end", str(self.port + 1), "--silent"], "tracker")
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.tracker.poll() is not None:
                    raise RuntimeError("the RPC tracker did not start")
                time.sleep(0.1)

    def _spawn(self, args, name) -> subprocess.Popen:
        log = open(self.logdir / f"{name}-{len(self.procs)}.log", "w")
        p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def free(self, key: str) -> int:
        from tvm import rpc

        try:
            return int(rpc.connect_tracker(HOST, self.port).summary()["queue_info"].get(key, {}).get("free", 0))
        except Exception:  # noqa: BLE001
            return 0

    def server(self, key: str) -> subprocess.Popen:
        before = self.free(key)
        port = _free_port()
        p = self._spawn(["-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port), "--port-end",
                         str(port + 1), "--tracker", f"{HOST}:{self.port}", "--key", key], f"server-{key}")
        deadline = time.time() + 120  # a server imports TVM first: slow on a loaded 2-core machine
        while self.free(key) <= before:
            if time.time() > deadline or p.poll() is not None:
                raise RuntimeError(f"RPC server {key} did not register")
            time.sleep(0.2)
        return p

    @staticmethod
    def signal(p: subprocess.Popen, sig) -> None:
        try:
            os.killpg(p.pid, sig)  # the server and its forked session process
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for p in reversed(self.procs):
            self.signal(p, signal.SIGCONT)
            self.signal(p, signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("rpc"))
    try:
        c.server("board")
        c.server("board")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A two-layer model (.pt2), calibration data and its fp32 artifact (batch 1)."""
    import torch
    import torch.nn as nn

    from cwhawq.backends.tvm import compile_model
    from cwhawq.latency import fp32_onnx
    from cwhawq.models import load_model, save_pt2

    from conftest import write_npz

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    d = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    save_pt2(Small().eval(), (1, 8, 8), d / "small.pt2")
    write_npz(d / "data.npz", n=64, shape=(1, 8, 8))
    fp32_onnx(load_model(str(d / "small.pt2")), d / "small.onnx")
    compile_model(d / "small.onnx", "llvm", d / "small.so", batch=1)
    return d


# ===================================================================================== pure functions
def test_stats_and_rpc_spec():
    s = summarize([3.0, 1.0, 2.0, 4.0])
    assert s["median_s"] == 2.5 and s["min_s"] == 1.0 and s["max_s"] == 4.0
    assert 3.0 < s["p90_s"] <= 4.0 and s["stddev_s"] > 0
    assert parse_rpc("10.0.0.1:9190", "rpi") == Remote("10.0.0.1", 9190, "rpi")
    assert parse_rpc(None, None) is None
    for spec, key in (("10.0.0.1", "k"), ("host:port", "k"), ("h:9190", None), (None, "k")):
        with pytest.raises(BenchError):
            parse_rpc(spec, key)


def test_interpolation_is_exact_on_linear_costs():
    grid = 2
    f = lambda r8, r4: 3.0 * r8 + 2.0 * r4 + 1.0 * (1 - r8 - r4)  # noqa: E731
    vals = {(i, j): f(i / grid, j / grid) for i, j in grid_points(grid)}
    assert len(vals) == 6
    for r8, r4 in ((1, 0), (0, 0), (0.3, 0.3), (0.75, 0.25), (0.1, 0.8), (1 / 3, 1 / 3)):
        assert interpolate(vals, grid, r8, r4) == pytest.approx(f(r8, r4))
    assert class_fractions([8, 6, 4, 3, 2, 2]) == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    assert point_counts((1, 0), 2, 5) == {8: 3, 4: 0, 2: 2} or point_counts((1, 0), 2, 5) == {8: 2, 4: 0, 2: 3}
    assert sum(point_counts((1, 1), 2, 7).values()) == 7


def test_mix_cost_is_linear_plus_a_step_per_set_of_classes():
    from cwhawq.latency import face_extras, mix_cost

    lin = lambda r8, r4: 3.0 * r8 + 2.0 * r4 + 1.0 * (1 - r8 - r4)  # noqa: E731
    step = {(8,): 0.0, (4,): 0.0, (2,): 0.0, (8, 4): 0.5, (8, 2): 0.3, (4, 2): 0.4, (8, 4, 2): 0.7}

    def f(r8, r4):
        r = (r8, r4, 1 - r8 - r4)
        return lin(r8, r4) + step[tuple(c for c, x in zip((8, 4, 2), r) if x > 1e-12)]

    for grid in (2, 4):
        vals = {(i, j): f(i / grid, j / grid) for i, j in grid_points(grid)}
        ex = face_extras(vals, grid)
        assert ex[(8, 4)] == pytest.approx(0.5) and ex[(4, 2)] == pytest.approx(0.4)
        # grid 2 has no inner point of the 8+4+2 face: twice the mean pair extra; grid 4 measures it
        assert ex[(8, 4, 2)] == pytest.approx(0.8 if grid == 2 else 0.7)
        for r8, r4 in ((1, 0), (0, 1), (0, 0), (0.9, 0.1), (1 / 64, 0), (0, 0.3), (0.5, 0.5)):
            assert mix_cost(vals, grid, r8, r4) == pytest.approx(f(r8, r4)), (grid, r8, r4)
        assert mix_cost(vals, grid, 0.3, 0.3) == pytest.approx(lin(0.3, 0.3) + ex[(8, 4, 2)])
    vals = {(i, j): lin(i, j) for i, j in grid_points(1)}   # grid 1: pure points only, linear
    assert mix_cost(vals, 1, 0.25, 0.5) == pytest.approx(lin(0.25, 0.5))


def test_act_digits_follow_the_kernels_rule():
    # equal ranges, 8-bit unsigned: codes 0..255 fit one digit (offset 128)
    assert act_digits([1.0, 1.0], False, [8, 8]) == 1
    # ranges 1 and 1/2: exponent 1 on the wide channel, 255 << 1 needs two digits
    assert act_digits([1.0, 0.5], False, [8, 8]) == 2
    # the same ranges at 4 bits: 15 << 1 fits one digit
    assert act_digits([1.0, 0.5], False, [4, 4]) == 1
    assert act_digits([1.0], True, [8]) == 1


def _toy_table() -> dict:
    cells = {"1": [[i, j, 10.0 + 5 * i + 2 * j] for i, j in grid_points(1)],
             "2": [[i, j, 20.0 + 5 * i + 2 * j] for i, j in grid_points(1)]}
    return {"format": "cwhawq-latency-table", "version": 1, "model": "toy", "target": {"name": "llvm"},
            "batch": 1, "where": "local", "grid": 1,
            "fp32": {"model_s": 50.0, "layers_s": 40.0, "overhead_s": 10.0},
            "shapes": {"s": {"fp32_s": 20.0, "cells": cells}},
            "layers": [{"name": "a", "shape": "s", "a_signed": False, "a_ranges": [1.0, 1.0]},
                       {"name": "b", "shape": "s", "a_signed": False, "a_ranges": [1.0, 0.5]}]}


def test_latency_table_predict_ratio_and_cost_model():
    from cwhawq.graph import LayerInfo
    from cwhawq.plan import LayerPlan, Plan
    from cwhawq.search.costs import make_cost_model
    from cwhawq.plan import parse_budget

    t = LatencyTable(_toy_table())
    plan = Plan([LayerPlan("a", [8, 8, 8, 8], [8, 8]), LayerPlan("b", [2, 2, 4, 4], [8, 8])])
    # a: D1 pure 8 -> 15; b: D2 half 4 / half 2 -> 20 + 0.5 * 2 = 21; + overhead 10
    assert t.predict(plan) == pytest.approx(46.0)
    assert t.ratio(plan) == pytest.approx(46.0 / 50.0)
    infos = [LayerInfo(k, n, "conv", 2, 4, (3, 3), (1, 1), 1, (4, 2, 3, 3), 72, (2, 4, 4), (4, 4, 4), 1152)
             for k, n in enumerate("ab")]
    cm = make_cost_model(parse_budget("latency:0.9"), infos, latency=t.cost_model(infos))
    assert cm.exact(plan) == pytest.approx(t.ratio(plan))
    with pytest.raises(Exception, match="no entry"):
        t.predict(Plan([LayerPlan("a", [8] * 4, [8, 8])]))
    with pytest.raises(LatencyError):
        LatencyTable({"format": "something else"})


def test_latency_table_negative_overhead_never_predicts_below_zero():
    """Layers alone summing to more than the model (a call's cost in each): c = -overhead / layers comes
    off each layer, so a plan's prediction is the model's, but a layer never goes below its proportional
    share; the search's separable sum is that prediction before the slowest-layer floor, and positive."""
    from cwhawq.graph import LayerInfo
    from cwhawq.plan import LayerPlan, Plan, parse_budget
    from cwhawq.search.costs import make_cost_model

    d = _toy_table()
    d["fp32"] = {"model_s": 30.0, "layers_s": 40.0, "overhead_s": -10.0}   # c = 5 per layer
    t = LatencyTable(d)
    plan = Plan([LayerPlan("a", [8, 8, 8, 8], [8, 8]), LayerPlan("b", [2, 2, 4, 4], [8, 8])])
    # a: 15 - 5 = 10 (its proportional share 15 * 30/40 = 11.25 is larger); b: 21 - 5 = 16 (> 15.75)
    assert t.predict(plan) == pytest.approx(11.25 + 16.0)
    infos = [LayerInfo(k, n, "conv", 2, 4, (3, 3), (1, 1), 1, (4, 2, 3, 3), 72, (2, 4, 4), (4, 4, 4), 1152)
             for k, n in enumerate("ab")]
    cm = make_cost_model(parse_budget("latency:0.9"), infos, latency=t.cost_model(infos))
    assert cm.exact(plan) == pytest.approx(t.ratio(plan))
    # noise: the whole model measured far below its layers alone (the -220 x fp32 of a CI run before)
    d["fp32"] = {"model_s": 1.0, "layers_s": 40.0, "overhead_s": -39.0}
    t = LatencyTable(d)
    cm = make_cost_model(parse_budget("latency:0.9"), infos, latency=t.cost_model(infos))
    assert 0 < cm.exact(plan) <= t.ratio(plan)
    assert t.predict(plan) == pytest.approx(21.0)   # floored at the slowest layer alone


# ===================================================================================== through the tracker
@pytest.mark.timeout(120)
def test_bench_local_and_through_tracker(cluster, small):
    from click.testing import CliRunner

    from cwhawq.cli import cli

    r = CliRunner().invoke(cli, ["bench", str(small / "small.so"), "--rpc", f"{HOST}:{cluster.port}", "--key",
                                 "board", "--warmup", "2", "--repeat", "5", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["where"] == str(Remote(HOST, cluster.port, "board")) and rep["board"].startswith("board@")
    assert rep["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert 0 < rep["min_s"] <= rep["median_s"] <= rep["p90_s"] <= rep["max_s"] < 0.1
    assert len(rep["results_s"]) == 5 and rep["stddev_s"] >= 0
    # locally, and an .onnx file in onnxruntime, with the same statistics
    for f in ("small.so", "small.onnx"):
        r = CliRunner().invoke(cli, ["bench", str(small / f), "--repeat", "3", "--batch", "2", "--json"])
        assert r.exit_code == 0, r.output
        rep = json.loads(r.output.strip().splitlines()[-1])
        assert rep["where"] == "local" and rep["median_s"] > 0
    # a key no board registered with: a clear error from the tracker's summary, without waiting for
    # the request's deadline (held to the deadline, not to a number of seconds of this CPU)
    t0 = time.time()
    with pytest.raises(BenchError, match="no board registered under key 'nokey'"):
        bench(small / "small.so", remote=Remote(HOST, cluster.port, "nokey"), timeout=300)
    assert time.time() - t0 < 300


def _bench_and_signal(cluster, small, key, sig, number, timeout):
    """Bench on a fresh server; ``sig`` its process group one second into the measurement.
    Returns (error message, seconds from the signal to the error, seconds from the start of the
    measuring step to the error)."""
    victim = cluster.server(key)
    hit = {}

    def on_step(label, step):
        if step == "measure" and "t" not in hit:
            hit["t0"] = time.time()

            def fire():
                time.sleep(1.0)
                hit["t"] = time.time()
                cluster.signal(victim, sig)
            threading.Thread(target=fire, daemon=True).start()

    with pytest.raises(BenchError) as ei:
        bench(small / "small.so", remote=Remote(HOST, cluster.port, key), warmup=5, repeat=10, number=number,
              timeout=timeout, on_step=on_step)
    t_err = time.time()
    assert "t" in hit, f"failed before the measurement: {ei.value}"
    print(f"\n{key}: {t_err - hit['t']:.1f} s after the signal, {t_err - hit['t0']:.1f} s into the "
          f"measurement: {ei.value}")
    return str(ei.value), t_err - hit["t"], t_err - hit["t0"]


@pytest.mark.timeout(90)
def test_server_killed_mid_measurement(cluster, small):
    # the board is killed 1 s into the measurement: its closed connection is the error, not a deadline
    # (which would be at least --timeout = 20 s after the measurement began)
    msg, after, _ = _bench_and_signal(cluster, small, "victim", signal.SIGKILL, number=100000, timeout=20)
    assert "victim@" in msg and "measuring" in msg, msg
    assert "did not answer" not in msg, f"the kill was noticed only by the deadline: {msg}"
    assert after < 20, f"error came {after:.1f} s after the kill, past the shortest possible deadline"


@pytest.mark.timeout(240)
def test_server_hung_mid_measurement(cluster, small):
    # a board that stops answering (SIGSTOP) is given up once the measuring step's deadline passes:
    # --timeout + 2 x the measurement the warm-up calls predict (cwhawq/bench.py), so it depends on the
    # speed of this CPU. The error names that deadline; the test holds the error to the deadline it
    # names, not to a number of seconds.
    msg, _, since_start = _bench_and_signal(cluster, small, "frozen", signal.SIGSTOP, number=30000, timeout=3)
    assert "did not answer" in msg and "frozen@" in msg and "while measuring" in msg, msg
    m = re.search(r"did not answer within (\d+) s", msg)
    assert m, msg
    deadline = float(m.group(1))            # printed rounded to the second
    assert deadline >= 3, msg               # never below --timeout
    assert since_start >= deadline - 0.5 - 0.1, f"given up {since_start:.1f} s into the measurement, before " \
                                            f"its deadline: {msg}"
    assert since_start <= 1.5 * deadline + 0.5, f"given up {since_start:.1f} s into the measurement, " \
                                               f"long after its deadline: {msg}"


@pytest.mark.timeout(240)
def test_latency_table_on_two_boards_then_from_cache(cluster, small, tmp_path):
    from click.testing import CliRunner

    from cwhawq.cli import cli

    cache = tmp_path / "cache"
    remote = Remote(HOST, cluster.port, "board")
    t = build_table(str(small / "small.pt2"), "llvm", tmp_path / "t.json", remote=remote, grid=1,
                    data=str(small / "data.npz"), cache_dir=cache, repeat=3, min_repeat_ms=5, timeout=30)
    st = t.data["stats"]
    # conv (1 input channel: one digit variant) 3 points + fp32; linear 2 x 3 + fp32; whole fp32 model
    assert st["measurements"] == 12 and st["measured"] == 12 and st["cached"] == 0
    assert st["boards"] == 2, "both boards should have measured"
    assert len(t.data["layers"]) == 2 and len(t.data["shapes"]) == 2
    assert t.fp32_seconds > 0
    from cwhawq.plan import LayerPlan, Plan

    plan = Plan([LayerPlan("conv", [8, 8, 4, 2], [8]), LayerPlan("fc", [4, 4, 2], [8] * 256)])
    assert 0 < t.predict(plan) < 1 and t.ratio(plan) > 0
    assert LatencyTable.load(tmp_path / "t.json").predict(plan) == pytest.approx(t.predict(plan))
    # second run (CLI), same model and target: everything from the cache, no board contacted
    r = CliRunner().invoke(cli, ["latency-table", str(small / "small.pt2"), "--rpc", f"{HOST}:{cluster.port}",
                                 "--key", "board", "--grid", "1", "--data", str(small / "data.npz"), "--cache",
                                 str(cache), "--out", str(tmp_path / "t2.json"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["measured"] == 0 and summary["cached"] == 12
    t2 = LatencyTable.load(tmp_path / "t2.json")
    assert t2.predict(plan) == pytest.approx(t.predict(plan))


@pytest.mark.timeout(300)
def test_latency_aware_search_on_the_boards(cluster, small, tmp_path):
    """cwhawq search --target llvm --rpc: table measured on the boards, final plan measured there too."""
    from click.testing import CliRunner

    from cwhawq import api
    from cwhawq.cli import cli
    from cwhawq.plan import load_plan

    data = str(small / "data.npz")
    api.analyze(str(small / "small.pt2"), data, out=str(tmp_path / "sens.json"), batch_size=32, max_probes=8)
    r = CliRunner().invoke(cli, ["search", str(small / "small.pt2"), "--data", data, "--sens",
                                 str(tmp_path / "sens.json"), "--budget", "size:0.3", "--episodes", "2",
                                 "--warmup", "1", "--hidden", "8", "--val-samples", "30", "--target", "llvm",
                                 "--rpc", f"{HOST}:{cluster.port}", "--key", "board", "--latency-grid", "1",
                                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "p.json"), "--json"])
    assert r.exit_code == 0, r.output
    lat = load_plan(str(tmp_path / "p.json")).meta["latency"]
    assert lat["where"].startswith("rpc:") or "board" in lat["where"], lat
    assert lat["measured_where"] != "local" and lat["board"] and lat["measured_s"] > 0 and lat["predicted_s"] > 0


def test_one_layer_models_are_what_export_onnx_writes(tmp_path):
    import onnx
    from onnx import numpy_helper

    from cwhawq.export import export_onnx
    from cwhawq.latency import BIT_CLASSES, LayerShape, OneLayerExporter, _calibration
    from cwhawq.plan import LayerPlan, Plan

    shp = LayerShape("conv", (4, 6, 6), 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, False)
    counts = {8: 4, 4: 2, 2: 2}
    ex = OneLayerExporter(shp)
    ex.write(counts, 2, tmp_path / "fast.onnx")
    plan = Plan([LayerPlan("0", [b for b in BIT_CLASSES for _ in range(counts[b])], [8] * 4)], (2, 4, 8))
    # the latency probes keep nearest codes (they do not change the latency): compare with a nearest export
    export_onnx(ex.loaded, plan, tmp_path / "ref.onnx", data=_calibration(shp, 2), verify=0, rounding="nearest")
    a, b = onnx.load(str(tmp_path / "fast.onnx")), onnx.load(str(tmp_path / "ref.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert a.opset_import[0].version == b.opset_import[0].version
