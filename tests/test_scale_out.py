"""Scale-out (issue 16): torchrun's process group on 127.0.0.1 (gloo) against one process for analyze,
eval and a resumed search; a killed or stopped rank ends the job with an error, not a hang; the
cost rule of ``--scheme auto``; the helpers of cwhawq.dist alone."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cwhawq import api, dist
from cwhawq.errors import CwhawqError
from cwhawq.graph import canonicalize
from cwhawq.hessian import GGN_PROBE_REL_SD, MIN_PROBES, resolve_scheme
from cwhawq.models import save_pt2

from conftest import TinyNet, cli_env, write_npz

SHAPE = (1, 8, 8)
WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A TinyNet .pt2, a small .npz dataset, its sensitivity file and a uniform 4-bit plan."""
    d = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    m = TinyNet(cin=1, c=8, hw=8, classes=3).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    save_pt2(m, SHAPE, str(d / "tiny.pt2"))
    write_npz(d / "data.npz", n=300, shape=SHAPE, classes=3)
    api.analyze(str(d / "tiny.pt2"), str(d / "data.npz"), out=str(d / "sens.json"), batch_size=64)
    api.make_plan("uniform", str(d / "tiny.pt2"), w_bits=4, bits="2,4,8", out=str(d / "uniform4.json"))
    return d


def launch(argv, world, port, timeout_env="60", cwd=None, **popen):
    """``world`` processes of ``argv`` with the environment torchrun gives its workers."""
    procs = []
    for r in range(world):
        env = cli_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CWHAWQ_DIST_TIMEOUT=timeout_env, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, **popen))
    return procs


def wait_all(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a distributed run hung") from None
        outs.append((p.returncode, out, err))
    return outs


def _traces(path):
    s = json.loads(Path(path).read_text())
    return {(l["name"], k): (np.array(l[k]["trace"]), np.array(l[k]["stderr"]))
            for l in s["layers"] for k in ("weight", "activation")}, s


def test_two_processes_equal_one(setup):
    """torchrun --nproc-per-node 2 (tests/dist_worker.py): analyze (exact, ggn), eval (float, under a plan),
    a search stopped after 2 episodes and resumed to 3, and ``cwhawq analyze``: the 2-process runs (each rank
    on its share of the samples) give one process's numbers; only rank 0 prints and writes."""
    d = setup
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(WORKER), str(d)]
    p = subprocess.run(argv, env=cli_env(CWHAWQ_DIST_TIMEOUT="60"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # the command line: rank 0 alone prints the summary and the progress lines (no terminal here)
    assert p.stdout.count("analyzed ") == 1 and str(d / "cli.json") in p.stdout
    assert p.stderr.count("2 processes, each on its share of every batch") == 1
    assert p.stderr.count("sensitivities (Omega") == 1   # the command's, from rank 0 only
    assert not list(d.glob(".cli.json.*"))                 # nothing half-written left beside it
    res = json.loads((d / "results.json").read_text())
    assert res["world"] == 2
    model, data = str(d / "tiny.pt2"), str(d / "data.npz")
    for scheme in ("exact", "ggn"):
        one = api.analyze(model, data, out=str(d / f"one-{scheme}.json"), batch_size=25, batches=2, scheme=scheme,
                          max_probes=10, tol=0.0, seed=3)
        assert res[scheme]["processes"] == 2 and res[scheme]["probes"] == one["probes"]
        assert res[scheme]["loss"] == pytest.approx(one["loss"], rel=1e-6)
        t1, _ = _traces(d / f"one-{scheme}.json")
        t2, s2 = _traces(d / f"dist-{scheme}.json")
        assert s2["scheme"] == scheme
        for key, (tr, se) in t1.items():
            tr2, se2 = t2[key]
            # the ranks draw the same probes at the whole batch's shape: the pooled estimate is one
            # process's up to float summation order (well within the reported stderr for ggn)
            assert np.allclose(tr2, tr, rtol=1e-4, atol=1e-9), key
            assert np.allclose(se2, se, rtol=1e-3, atol=1e-9), key
            if scheme == "ggn":
                assert np.all(np.abs(tr2 - tr) <= se + 1e-12), key
    one_cli = api.analyze(model, data, out=str(d / "one-cli.json"), batch_size=30, scheme="exact")
    assert one_cli["scheme"] == "exact"
    t1, _ = _traces(d / "one-cli.json")
    t2, _ = _traces(d / "cli.json")
    for key, (tr, _) in t1.items():
        assert np.allclose(t2[key][0], tr, rtol=1e-4, atol=1e-9), key
    acc = api.evaluate(model, data, split="val", batch_size=16, limit=101)["accuracy"]
    assert res["eval"] == acc
    acc_p = api.evaluate(model, data, split="val", batch_size=16, limit=101, plan=str(d / "uniform4.json"),
                         rounding="nearest")["accuracy"]
    assert res["eval_plan"] == acc_p
    kw = dict(sens=str(d / "sens.json"), budget="size:0.2", seed=5, warmup=1, val_samples=90,
              out=str(d / "one-plan.json"), rounding="nearest", batch_size=4, checkpoint_every=1)
    one = api.search(model, data, episodes=3, **kw)
    two = json.loads((d / "dist-plan.json").read_text())
    assert two["meta"]["search"]["resumed_at"] == 2 and two["meta"]["search"]["episodes"] == 3
    assert res["search"] == one.meta["search"]["best_reward"]
    assert [lp["w_bits"] for lp in two["layers"]] == [list(lp.w_bits) for lp in one.layers]
    log2 = [json.loads(line) for line in (d / "dist-plan.jsonl").read_text().splitlines()]
    log1 = [json.loads(line) for line in (d / "one-plan.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in log2] == [0, 1, 2]
    assert [(r["reward"], r["w_ratios"]) for r in log2] == [(r["reward"], r["w_ratios"]) for r in log1]


def test_a_killed_rank_is_an_error_not_a_hang(setup, tmp_path):
    """Rank 1 of a running ``cwhawq search`` is killed: rank 0 ends with one clear line and exit code 1 (its
    connection closes), and the last checkpoint is whole."""
    d = setup
    argv = [sys.executable, "-m", "cwhawq", "search", str(d / "tiny.pt2"), "--data", str(d / "data.npz"),
            "--sens", str(d / "sens.json"), "--budget", "size:0.2", "--episodes", "100000", "--warmup", "1",
            "--val-samples", "90", "--out", str(tmp_path / "p.json"), "--rounding", "nearest", "--threads", "1",
            "--checkpoint-every", "1"]
    # the timeout is for the set-up: long enough for a loaded machine's ranks to keep up with each other
    procs = launch(argv, 2, free_port(), timeout_env="60")
    try:
        log = tmp_path / "p.jsonl"
        t0 = time.time()
        while not (log.exists() and log.read_text().count("\n") >= 2):   # both ranks are in the episode loop
            assert procs[0].poll() is None and time.time() - t0 < 240, procs[0].communicate()[1][-2000:]
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL)
        try:
            _, err = procs[0].communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("rank 0 hung after rank 1 was killed") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 0: ") and "another process of the job died or did not answer" in lines[-1]
    assert "Traceback" not in err
    assert (tmp_path / "p.ckpt").is_file() and not list(tmp_path.glob(".p.ckpt.*"))


SILENT = """
import os, signal
from cwhawq import dist
dist.init()
dist.barrier()                          # both ranks are in the group
if dist.rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)   # alive, but never answers again
try:
    dist.all_sum([1.0])
except dist.DistError as e:
    print(e)
"""


def test_a_silent_rank_times_out():
    """A rank that stops answering (stopped, not dead): the other's collective fails after the process
    group's timeout (CWHAWQ_DIST_TIMEOUT) with DistError, not a hang."""
    procs = launch([sys.executable, "-c", SILENT], 2, free_port(), timeout_env="20")
    try:
        out, err = procs[0].communicate(timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("rank 0 hung waiting for a stopped rank") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 0, err[-2000:]
    assert out.startswith("rank 0: a sum across 2 processes failed") and "within 20 s" in out


def test_one_process_commands_are_refused_under_torchrun(setup):
    p = subprocess.run([sys.executable, "-m", "cwhawq", "plan", "uniform", str(setup / "tiny.pt2"), "--out",
                        str(setup / "x.json")], env=cli_env(WORLD_SIZE="2", RANK="1"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: cwhawq plan runs in one process; torchrun runs analyze, eval, search"


def test_search_target_is_refused_with_several_processes(setup, monkeypatch):
    monkeypatch.setitem(dist._STATE, "on", True)
    monkeypatch.setitem(dist._STATE, "world", 2)
    with pytest.raises(CwhawqError, match="--target measures latencies in one process"):
        api.search(str(setup / "tiny.pt2"), str(setup / "data.npz"), sens=str(setup / "sens.json"), target="llvm")


def test_dist_alone_is_a_no_op():
    assert not dist.active() and dist.rank() == 0 and dist.world() == 1 and dist.is_main()
    a = np.arange(3.0)
    assert dist.all_sum(a) is not None and np.array_equal(dist.all_sum(a), a)
    assert dist.broadcast({"x": 1}) == {"x": 1}
    assert dist.shard_range(10) == (0, 10)
    parts = [dist.shard_range(10, r, 3) for r in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]
    assert [dist.shard_range(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


def test_dist_timeout_setting(monkeypatch):
    monkeypatch.setenv("CWHAWQ_DIST_TIMEOUT", "2.5")
    assert dist.timeout_seconds() == 2.5
    monkeypatch.setenv("CWHAWQ_DIST_TIMEOUT", "soon")
    with pytest.raises(dist.CwhawqError, match="give seconds"):
        dist.timeout_seconds()


class _Wide(nn.Module):
    """Piecewise linear, with many classes."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_auto_prices_exact_against_ggn():
    """auto: exact while its passes (one per class) are no more than the ggn probes expected at tol."""
    expected = max(MIN_PROBES, int(np.ceil((GGN_PROBE_REL_SD / 0.01) ** 2)))
    few = canonicalize(_Wide(expected).eval(), SHAPE)
    many = canonicalize(_Wide(expected + 1).eval(), SHAPE)
    assert resolve_scheme("auto", few) == "exact"
    assert resolve_scheme("auto", many) == "ggn"
    assert resolve_scheme("auto", many, tol=0.0, max_probes=10 * expected) == "exact"   # tol 0: every probe
    assert resolve_scheme("auto", few, tol=0.5) == "ggn"   # a loose tolerance needs only MIN_PROBES probes
    assert resolve_scheme("layer", many) == "layer"


@pytest.mark.parametrize("cin,cout,hw,groups", [(16, 32, 2, 1), (8, 8, 3, 2), (2, 3, 6, 1), (4, 4, 5, 4)])
def test_per_sample_weight_squares(cin, cout, hw, groups):
    """The per-channel sums of squared per-sample weight gradients, by per-sample gradients (many positions)
    or by the positions' Gram matrix (few positions, many channels: the first case), against autograd
    sample by sample."""
    from cwhawq.hessian import _per_sample_weight_sq

    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, 3, padding=1, stride=1, groups=groups, bias=False)
    conv.is_conv = True
    x = torch.randn(5, cin, hw, hw)
    delta = torch.randn(5, cout, hw, hw)
    want = np.zeros(cout)
    for n in range(5):
        w = conv.weight.detach().clone().requires_grad_(True)
        out = torch.nn.functional.conv2d(x[n:n + 1], w, padding=1, groups=groups)
        (gw,) = torch.autograd.grad((out * delta[n:n + 1]).sum(), w)
        want += (gw.double() ** 2).reshape(cout, -1).sum(1).numpy()
    got = _per_sample_weight_sq(conv, x, delta)
    assert np.allclose(got, want, rtol=1e-5)
