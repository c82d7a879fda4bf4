"""DDPG search (issue 5): action mapping, exact budget enforcement, agent state, search, resume, CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cwhawq import api
from cwhawq.cli import cli
from cwhawq.errors import CwhawqError
from cwhawq.graph import canonicalize
from cwhawq.models import save_pt2
from cwhawq.plan import assign_bits, parse_budget, plan_metrics
from cwhawq.search import (DDPG, BudgetError, DDPGConfig, QuantSearchEnv, SearchError, SensitivityError,
                           make_cost_model, search, stick_action, stick_ratios)
from cwhawq.search.costs import PlanLatencyCost
from cwhawq.search.ddpg import truncated_normal

from conftest import TinyNet, write_npz

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A TinyNet .pt2 (conv 8 ch + BN, depthwise, linear), a small .npz dataset and its sensitivity file."""
    d = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    m = TinyNet(cin=1, c=8, hw=8, classes=3).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    model = str(d / "tiny.pt2")
    save_pt2(m, SHAPE, model)
    data = str(write_npz(d / "data.npz", n=240, shape=SHAPE, classes=3))
    sens_path = str(d / "sens.json")
    sens = api.analyze(model, data, out=sens_path, batch_size=64, max_probes=16)
    qm = canonicalize(m, SHAPE)
    return {"dir": d, "model": model, "data": data, "sens": sens_path, "sens_d": sens, "infos": qm.layer_infos}


def _env(setup, budget, a_bits=(8,), enforce="omega", latency=None, margin=0.0):
    bud = parse_budget(budget)
    cost = make_cost_model(bud, setup["infos"], latency)
    return QuantSearchEnv(setup["infos"], setup["sens_d"], bud, cost, (2, 4, 8), a_bits, enforce=enforce,
                          action_margin=margin)


def _rollout(env, actions):
    s = env.reset()
    states = [s]
    for a in actions:
        s = env.step(a)
        if s is not None:
            states.append(s)
    return states


# ------------------------------------------------------------------------------ action mapping
def test_stick_breaking_mapping():
    assert stick_ratios([1.0, 1.0], (2, 4, 8)) == {2: 0.0, 4: 0.0, 8: 1.0}
    assert stick_ratios([0.0, 0.7], (2, 4, 8)) == {2: 1.0, 4: 0.0, 8: 0.0}
    r = stick_ratios([0.5, 0.5], (2, 4, 8))
    assert r == pytest.approx({2: 0.5, 4: 0.25, 8: 0.25})
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.uniform(size=2)
        r = stick_ratios(a, (2, 4, 8))
        assert sum(r.values()) == pytest.approx(1.0)
        # raising an action never lowers the average bits
        a2 = a.copy()
        a2[rng.integers(2)] += 0.1
        avg = lambda rr: sum(b * v for b, v in rr.items())  # noqa: E731
        assert avg(stick_ratios(a2, (2, 4, 8))) >= avg(r) - 1e-12
        # counts -> action -> ratios reproduces the counts
        counts = rng.integers(0, 5, size=3)
        if counts.sum() == 0:
            continue
        back = stick_ratios(stick_action(counts, (2, 4, 8)), (2, 4, 8))
        assert [back[b] for b in (2, 4, 8)] == pytest.approx(list(counts / counts.sum()))


# ------------------------------------------------------------------------------ budget enforcement
@pytest.mark.parametrize("budget,a_bits,enforce,margin", [
    ("bits:3", (8,), "omega", 0.0), ("bits:2.5", (8,), "layers", 0.0), ("size:0.1", (8,), "omega", 0.0),
    ("bops:0.02", (2, 4, 8), "omega", 0.0), ("bops:0.02", (2, 4, 8), "layers", 0.0),
    ("size:0.09", (4, 8), "omega", 0.0), ("bops:0.02", (2, 4, 8), "omega", 0.05)])
def test_every_plan_meets_the_budget(setup, budget, a_bits, enforce, margin):
    env = _env(setup, budget, a_bits, enforce, margin=margin)
    bud = parse_budget(budget)
    rng = np.random.default_rng(1)
    for trial in range(25):
        actions = [rng.uniform(size=env.action_dim) if trial else np.ones(env.action_dim) for _ in range(env.L)]
        _rollout(env, actions)
        plan, info = env.finish()
        m = plan_metrics(plan, setup["infos"])
        assert bud.satisfied(m), (trial, m[bud.metric])
        assert info["cost"] == pytest.approx(m[bud.metric])
        plan.validate(setup["infos"])
        # channels take their bits in Hessian-trace order (assign_bits of the plan's own ratios)
        for k, lp in enumerate(plan.layers):
            ratios = {b: float(np.mean(np.asarray(lp.w_bits) == b)) for b in (2, 4, 8)}
            assert lp.w_bits == assign_bits(env.w_sens[k], ratios)
        # the effective actions give back the same plan, without demotions
        eff = env.effective_actions()
        _rollout(env, eff)
        plan2, info2 = env.finish()
        assert info2["demotions"] == 0
        assert [lp.to_dict() for lp in plan2.layers] == [lp.to_dict() for lp in plan.layers]
        if trial == 0 and enforce == "omega":
            assert info["demotions"] > 0   # all-8 plans are over these budgets


def test_under_budget_plans_are_kept(setup):
    env = _env(setup, "bits:8")
    _rollout(env, [np.ones(env.action_dim)] * env.L)
    plan, info = env.finish()
    assert info["demotions"] == 0
    assert all(set(lp.w_bits) == {8} for lp in plan.layers)
    # with an end margin, actions near the ends give pure levels
    env = _env(setup, "bits:8", margin=0.05)
    _rollout(env, [np.full(env.action_dim, 0.96)] * env.L)
    plan, _ = env.finish()
    assert all(set(lp.w_bits) == {8} for lp in plan.layers)
    _rollout(env, [np.full(env.action_dim, 0.04)] * env.L)
    plan, _ = env.finish()
    assert all(set(lp.w_bits) == {2} for lp in plan.layers)


def test_states_are_normalised(setup):
    env = _env(setup, "bops:0.02", (2, 4, 8))
    states = _rollout(env, [np.full(env.action_dim, 0.5)] * env.L)
    assert len(states) == env.L
    for s in states:
        assert s.shape == (env.state_dim,) and s.dtype == np.float32
        assert np.all(np.isfinite(s)) and np.all(s > -1.5) and np.all(s < 2.5)
    # previous action is in the state
    assert np.allclose(states[1][env.static.shape[1]:env.static.shape[1] + env.action_dim], 0.5)


def test_budget_errors(setup):
    with pytest.raises(BudgetError, match="latency"):
        _env(setup, "latency:0.5")
    with pytest.raises(BudgetError, match="cannot be met"):
        _env(setup, "bits:1.5")
    bad = json.loads(json.dumps(setup["sens_d"]))
    bad["layers"][0]["weight"]["trace"] = bad["layers"][0]["weight"]["trace"][:-1]
    with pytest.raises(SensitivityError, match="another model"):
        bud = parse_budget("bits:3")
        QuantSearchEnv(setup["infos"], bad, bud, make_cost_model(bud, setup["infos"]))


def test_latency_model_can_be_plugged_in(setup):
    infos = setup["infos"]
    fake = lambda plan: plan_metrics(plan, infos)["bops_ratio"] * 10  # noqa: E731  (a stand-in latency table)
    env = _env(setup, "latency:0.2", (4, 8), latency=fake)
    assert isinstance(env.cost, PlanLatencyCost) and not env.cost.separable
    rng = np.random.default_rng(0)
    for _ in range(5):
        _rollout(env, [rng.uniform(size=env.action_dim) for _ in range(env.L)])
        plan, _ = env.finish()
        assert fake(plan) <= 0.2 * (1 + 1e-9)


def test_latency_that_does_not_fall_with_the_bits(setup):
    """A separable latency where 2-bit weights are slower than 4-bit ones (as on this CPU for some
    layers): the cheapest plan is 4-bit, budgets between it and the all-2-bit plan can be met, every
    enforced plan meets the budget, and a budget below the cheapest plan names it."""
    from cwhawq.search.costs import LayerLatencyCost

    infos = setup["infos"]
    per_bit = {2: 1.0, 4: 0.6, 8: 0.9}   # share of a layer's fp32 time per output channel at these bits
    n = sum(i.out_channels for i in infos)

    def layer_fn(info, w, a):
        return float(sum(per_bit[int(b)] for b in w)) / n

    def cost():
        return LayerLatencyCost(infos, layer_fn, const=0.05)

    env = _env(setup, "latency:0.7", latency=cost())
    assert env.min_total == pytest.approx(0.05 + 0.6) and env.max_total == pytest.approx(0.05 + 0.9)
    rng = np.random.default_rng(0)
    for trial in range(12):
        acts = [rng.uniform(size=env.action_dim) * (0.2 if trial % 2 else 1.0) for _ in range(env.L)]
        _rollout(env, acts)
        plan, info = env.finish()
        assert info["cost"] <= 0.7 * (1 + 1e-9)
        assert cost().exact(plan) == pytest.approx(info["cost"])
    with pytest.raises(BudgetError, match="cheapest bit levels"):
        _env(setup, "latency:0.6", latency=cost())


# ------------------------------------------------------------------------------ agent
def test_truncated_normal_and_agent_state_roundtrip():
    rng = np.random.default_rng(0)
    x = truncated_normal(rng, np.array([0.0, 0.5, 1.0] * 200), 0.3)
    assert x.min() >= 0 and x.max() <= 1 and abs(x[1::3].mean() - 0.5) < 0.05
    cfg = DDPGConfig(hidden=16, batch_size=8, warmup=1)
    a = DDPG(5, 2, cfg, seed=3)
    for i in range(20):
        a.observe(np.full(5, i / 20, np.float32), np.array([0.2, 0.8]), -0.1 * i, np.zeros(5), i % 5 == 4)
    a.update_baseline(-1.0)
    a.update()
    b = DDPG(5, 2, cfg, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        la, lb = a.update(), b.update()
        assert la == lb
    s = np.full(5, 0.3, np.float32)
    assert np.array_equal(a.act(s, 5), b.act(s, 5))
    assert np.allclose(DDPG(5, 2, DDPGConfig(hidden=16), seed=0).policy(s), 0.95, atol=0.02)


# ------------------------------------------------------------------------------ search, resume
FAST = dict(episodes=6, warmup=2, hidden=32, batch_size=16, val_samples=200, checkpoint_every=2)


def _lines(path):
    out = []
    for line in open(path).read().splitlines():
        d = json.loads(line)
        d.pop("time")
        d.pop("cached")   # the evaluation cache lives in the process: a resumed run starts it empty
        out.append(d)
    return out


def test_search_is_deterministic_and_meets_budget(setup):
    d = setup["dir"]
    p1 = search(setup["model"], setup["data"], sens=setup["sens"], budget="bits:3", out=str(d / "a.json"), seed=5,
                **FAST)
    p2 = search(setup["model"], setup["data"], sens=setup["sens"], budget="bits:3", out=str(d / "b.json"), seed=5,
                **FAST)
    assert p1.method == "ddpg" and p1.budget == "bits:3"
    assert p1.metrics["avg_w_bits"] <= 3 + 1e-9 and p1.metrics["meets_budget"]
    assert [lp.to_dict() for lp in p1.layers] == [lp.to_dict() for lp in p2.layers]
    assert _lines(d / "a.jsonl") == _lines(d / "b.jsonl")
    lines = _lines(d / "a.jsonl")
    assert [r["episode"] for r in lines] == list(range(6))
    assert {"reward", "accuracy", "loss", "cost", "w_ratios", "metrics"} <= set(lines[0])
    saved = json.loads((d / "a.json").read_text())
    assert saved["method"] == "ddpg" and saved["meta"]["search"]["episodes"] == 6
    assert (d / "a.ckpt").exists()


def test_resume_after_a_crash_gives_the_same_plan(setup):
    d = setup["dir"]
    common = dict(sens=setup["sens"], budget="bops:0.03", a_bits="mixed", seed=2, greedy_every=3, **FAST)
    ref = search(setup["model"], setup["data"], out=str(d / "ref.json"), **common)

    class Crash(Exception):
        pass

    def crash(rec):
        if rec["episode"] == 4:   # after episode 4: checkpoint holds 4 episodes, the log 5
            raise Crash

    with pytest.raises(Crash):
        search(setup["model"], setup["data"], out=str(d / "r.json"), on_episode=crash, **common)
    assert len(_lines(d / "r.jsonl")) == 5 and not (d / "r.json").exists()
    res = search(setup["model"], setup["data"], out=str(d / "r.json"), resume=True, **common)
    assert [lp.to_dict() for lp in res.layers] == [lp.to_dict() for lp in ref.layers]
    assert _lines(d / "r.jsonl") == _lines(d / "ref.jsonl")
    assert [r["explore"] for r in _lines(d / "r.jsonl")] == ["random"] * 2 + ["greedy", "noise", "noise", "greedy"]
    assert res.meta["search"]["resumed_at"] == 4
    # a finished search can be extended: 6 + 2 episodes == 8 from scratch
    more = dict(common, episodes=8)
    ext = search(setup["model"], setup["data"], out=str(d / "r.json"), resume=True, **more)
    full = search(setup["model"], setup["data"], out=str(d / "f.json"), **more)
    assert [lp.to_dict() for lp in ext.layers] == [lp.to_dict() for lp in full.layers]
    # resuming with other settings is refused
    with pytest.raises(SearchError, match="another search"):
        search(setup["model"], setup["data"], out=str(d / "r.json"), resume=True, **dict(common, seed=3))


def test_search_errors(setup):
    with pytest.raises(CwhawqError, match="not found"):
        search(setup["model"], setup["data"], sens=str(setup["dir"] / "nope.json"), budget="bits:3", episodes=1)
    with pytest.raises(CwhawqError, match="does not parse"):
        search(setup["model"], setup["data"], sens=setup["sens"], budget="3bits", episodes=1)
    with pytest.raises(SearchError, match="unknown agent option"):
        search(setup["model"], setup["data"], sens=setup["sens"], budget="bits:3", episodes=1, warmpu=3)


def test_cli_search(setup):
    d = setup["dir"]
    r = CliRunner().invoke(cli, ["search", setup["model"], "--data", setup["data"], "--sens", setup["sens"],
                                 "--budget", "size:0.1", "--episodes", "3", "--warmup", "1", "--hidden", "16",
                                 "--val-samples", "100", "--out", str(d / "c.json"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["episodes"] == 3 and rep["size_ratio"] <= 0.1 + 1e-12
    assert len(_lines(d / "c.jsonl")) == 3
    for args, msg in ((["--budget", "latency:0.5"], "latency"), (["--budget", "bits:1"], "cannot be met"),
                      (["--budget", "bits:3", "--sens", str(d / "missing.json")], "not found")):
        base = ["search", setup["model"], "--data", setup["data"], "--sens", setup["sens"], "--out",
                str(d / "e.json")]
        r = CliRunner().invoke(cli, base + args)
        assert r.exit_code == 2, r.output
        assert msg in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.timeout(400)
def test_latency_aware_search_measures_the_final_plan(setup, tmp_path):
    """--target: the latency table is measured (cached), the reward carries the latency term, the final
    plan is compiled and measured with the fp32 model, and both numbers go into the plan and the log;
    then latency:R with that table, and the errors."""
    from cwhawq.latency import LatencyTable
    from cwhawq.plan import load_plan, uniform_plan

    d, cache = tmp_path, tmp_path / "cache"
    base = ["search", setup["model"], "--data", setup["data"], "--sens", setup["sens"], "--episodes", "3",
            "--warmup", "1", "--hidden", "16", "--val-samples", "100", "--latency-grid", "1", "--cache", str(cache)]
    r = CliRunner().invoke(cli, base + ["--budget", "size:0.2", "--target", "llvm", "--out", str(d / "s.json"),
                                        "--json"])
    assert r.exit_code == 0, r.output
    lat = json.loads(r.output.strip().splitlines()[-1])["latency"]
    assert lat["target"] == "llvm" and lat["where"] == "local" and lat["batch"] == 1
    for k in ("predicted_s", "measured_s", "measured_fp32_s", "table_fp32_s"):
        assert lat[k] > 0, k
    assert lat["measured_ratio"] == pytest.approx(lat["measured_s"] / lat["measured_fp32_s"])
    assert lat["rel_error"] == pytest.approx(lat["predicted_s"] / lat["measured_s"] - 1)
    assert lat["table_ratio"] == pytest.approx(lat["predicted_s"] / lat["table_fp32_s"])
    assert lat["predicted_ratio"] <= lat["table_ratio"] + 1e-12   # the floor only raises the sum
    plan = load_plan(str(d / "s.json"))
    assert plan.meta["latency"] == lat and plan.metrics["size_ratio"] <= 0.2 + 1e-12
    assert (d / "s.so").is_file() and (d / "s.manifest.json").is_file() and (d / "s.latency.json").is_file()
    lines = [json.loads(x) for x in open(d / "s.jsonl").read().splitlines()]
    assert len(lines) == 4 and lines[-1]["final"] and lines[-1]["latency"] == lat
    fp32 = plan.meta["search"]["fp32_val_accuracy"]
    for rec in lines[:-1]:   # default weight 1: R = 10 (acc - fp32) + (1 - predicted ratio)
        assert rec["reward"] == pytest.approx(10 * (rec["accuracy"] - fp32) + 1 - rec["latency_ratio"], abs=1e-6)

    table = LatencyTable.load(d / "s.latency.json")
    w8 = table.ratio(uniform_plan(setup["infos"], 8, 8))
    cheapest = min(table.ratio(uniform_plan(setup["infos"], w, 8)) for w in (2, 4, 8))
    budget = f"latency:{max(w8, cheapest) + 1e-3:.6f}"
    r = CliRunner().invoke(cli, base + ["--budget", budget, "--latency-table", str(d / "s.latency.json"),
                                        "--latency-weight", "0", "--out", str(d / "l.json"), "--json"])
    assert r.exit_code == 0, r.output
    lp = load_plan(str(d / "l.json"))
    assert lp.meta["latency"]["predicted_ratio"] <= float(budget.split(":")[1]) * (1 + 1e-9)
    assert "measured_s" not in lp.meta["latency"]   # no --target: nothing compiled
    for args, msg in ((["--budget", "latency:0.9"], "needs a latency table"),
                      (["--budget", "latency:0.001", "--latency-table", str(d / "s.latency.json")], "cannot be met"),
                      (["--budget", "size:0.2", "--latency-table", str(d / "s.latency.json"), "--target", "cuda"],
                       "is for target llvm"),
                      (["--budget", "size:0.2", "--latency-table", str(d / "missing.json")], "not found")):
        r = CliRunner().invoke(cli, base + args + ["--out", str(d / "e.json")])
        assert r.exit_code == 2, r.output
        assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
