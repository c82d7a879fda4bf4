"""Plans, metrics, ratio assignment, simulated quantization and the baselines."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwhawq import baselines as B
from cwhawq import quantizers as Q
from cwhawq.data import Dataset
from cwhawq.errors import PlanError
from cwhawq.graph import canonicalize
from cwhawq.hessian import analyze
from cwhawq.plan import (Plan, LayerPlan, assign_bits, largest_remainder, load_plan, parse_budget, plan_from_dict,
                         plan_metrics, uniform_plan)
from cwhawq.quantize import Quantizer, finetune
from conftest import cli_env


@pytest.fixture
def setup(tiny):
    m, x, y = tiny
    qm = canonicalize(m, (2, 5, 5))
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((96, 2, 5, 5)).astype(np.float32)
    ys = rng.integers(0, 4, 96)
    ds = Dataset(xs, ys, "tiny", "train")
    return qm, ds


def test_largest_remainder_and_assignment():
    assert largest_remainder([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]
    assert largest_remainder([1, 1, 1], 10).sum() == 10
    sens = [0.1, 5.0, 0.3, 2.0, 0.0]
    bits = assign_bits(sens, {8: 0.4, 4: 0.2, 2: 0.4})
    assert bits == [2, 8, 4, 8, 2]
    assert sorted(assign_bits(np.arange(10), {8: 0.25, 2: 0.75})) == [2] * 7 + [8] * 3


def test_plan_validation_names_the_field(setup, tmp_path):
    qm, _ = setup
    infos = qm.layer_infos
    p = uniform_plan(infos, 4, 8)
    p.validate(infos)
    d = p.to_dict()
    d["layers"][0]["w_bits"] = d["layers"][0]["w_bits"][:-1]
    with pytest.raises(PlanError, match=r"layers\[conv\].w_bits has 2 channels"):
        plan_from_dict(d).validate(infos)
    d = p.to_dict()
    d["layers"][1]["a_bits"][0] = 5
    with pytest.raises(PlanError, match=r"layers\[dw\].a_bits\[0\] = 5 is outside"):
        plan_from_dict(d)
    d = p.to_dict()
    d["layers"][0]["name"] = "nope"
    with pytest.raises(PlanError, match="'nope' is not a quantizable layer"):
        plan_from_dict(d).validate(infos)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    for bad in ("size", "size:2", "speed:0.5", "bits:x", "bits:-1"):
        with pytest.raises(PlanError):
            parse_budget(bad)


def test_metrics(setup):
    qm, _ = setup
    infos = qm.layer_infos
    m8 = plan_metrics(uniform_plan(infos, 8, 8), infos)
    assert m8["avg_w_bits"] == 8 and m8["avg_a_bits"] == 8
    n = sum(i.params for i in infos)
    scales = sum(4 * i.out_channels for i in infos)
    assert m8["weight_bytes"] == pytest.approx(n + scales)
    assert m8["compression"] == pytest.approx(4 * n / (n + scales))
    assert m8["bops"] == pytest.approx(sum(i.macs for i in infos) * 64)
    # depthwise: BOPs pair each output channel with its own input channel only
    dw = next(i for i in infos if i.kind == "depthwise")
    p = uniform_plan(infos, 8, 8)
    p[dw.name].w_bits = [8, 2, 2]
    p[dw.name].a_bits = [2, 8, 8]
    got = plan_metrics(p, infos)["bops"] - plan_metrics(uniform_plan(infos, 8, 8), infos)["bops"]
    per = dw.macs / 3
    assert got == pytest.approx(per * (8 * 2 + 2 * 8 + 2 * 8) - per * 3 * 64)


def test_simulation_matches_integer_arithmetic(setup):
    """The simulated layer equals an integer dot product with the pow2 activation grid, rescaled."""
    qm, ds = setup
    qz = Quantizer(qm, ds)
    infos = qm.layer_infos
    p = uniform_plan(infos, 4, 8)
    p["conv"].w_bits = [8, 4, 2]
    p["fc"].a_bits = [8, 4, 2] * (len(p["fc"].a_bits) // 3)
    sim = qz.apply(p)
    st = sim.states["fc"]
    assert st.a_params["mode"] == "pow2"
    k = np.asarray(st.a_params["exponents"])
    assert (k >= 0).all()
    np.testing.assert_array_equal(st.a_scales, np.float32(st.a_params["base_scale"]) * np.exp2(k).astype(np.float32))
    # capture fc's input, compare float simulation with integer accumulation
    captured = {}
    fc = qm.layer("fc")
    act = fc.act
    fc.act = lambda x: captured.setdefault("x", x) if False else (captured.__setitem__("x", x) or act(x))
    x = torch.from_numpy(ds.x[:16])
    with torch.no_grad():
        out = qm(x)
    fc.act = act
    xin = captured["x"].numpy().astype(np.float64)
    q = np.clip(np.round(xin / st.a_scales), st.a_qmin, st.a_qmax).astype(np.int64)
    acc = (st.w_codes.astype(np.int64) @ (q << k).T).T      # exact integer accumulation
    ref = acc * st.w_scales.astype(np.float64) * st.a_params["base_scale"] + st.bias
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    # weights are the dequantized codes, codes within each channel's range
    for name, s in sim.states.items():
        for c, b in enumerate(s.w_bits):
            assert np.abs(s.w_codes[c]).max() <= Q.qrange(int(b))[1]


def test_act_fake_quant_equals_numpy_reference(setup):
    qm, ds = setup
    qz = Quantizer(qm, ds)
    sim = qz.apply(uniform_plan(qm.layer_infos, 8, 4))
    st = sim.states["dw"]
    layer = qm.layer("dw")
    x = torch.relu(torch.randn(4, 3, 5, 5)) * 3
    ref = Q.fake_quant_act(x.numpy(), st.a_scales, st.a_qmin, st.a_qmax)
    np.testing.assert_array_equal(layer.act(x).numpy(), ref)


def test_migrated_exponents_simulation(setup):
    """act_scale="migrate": the same activation codes as pow2; the weight codes quantize w * 2^k_c
    per output channel, the layer computes S * sum_c q_w'[o, c] q_c (one 8-bit integer per input);
    depthwise layers are unchanged; fine-tuning and learned rounding keep the migrated codes."""
    qm, ds = setup
    p = uniform_plan(qm.layer_infos, 4, 8)
    p["conv"].w_bits = [8, 4, 2]
    pow2 = Quantizer(qm, ds).apply(p)
    ref_states = {n: (st.a_scales.copy(), st.w_codes.copy()) for n, st in pow2.states.items()}
    sim = Quantizer(qm, ds, act_scale="migrate").apply(p)
    st = sim.states["fc"]
    k = np.asarray(st.a_params["exponents"])
    assert st.a_params["mode"] == "migrate" and k.any() and np.array_equal(st.w_exponents, k)
    np.testing.assert_array_equal(st.a_scales, ref_states["fc"][0])
    assert sim.states["dw"].w_exponents is None
    np.testing.assert_array_equal(sim.states["dw"].w_codes, ref_states["dw"][1])
    w = qm.layer("fc").weight.detach().numpy()
    np.testing.assert_array_equal(st.w_codes, Q.quantize_weight(w * np.exp2(k)[None, :], st.w_bits, st.w_scales))
    captured = {}
    fc = qm.layer("fc")
    act = fc.act
    fc.act = lambda x: (captured.__setitem__("x", x) or act(x))
    with torch.no_grad():
        out = qm(torch.from_numpy(ds.x[:16]))
    fc.act = act
    xin = captured["x"].numpy().astype(np.float64)
    q = np.clip(np.round(xin / st.a_scales), st.a_qmin, st.a_qmax).astype(np.int64)
    assert np.abs(q).max() <= 255          # the integers are the codes, no shift
    acc = (st.w_codes.astype(np.int64) @ q.T).T
    ref = acc * st.w_scales.astype(np.float64) * st.a_params["base_scale"] + st.bias
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    finetune(sim, ds, epochs=1, max_steps=2)
    w = qm.layer("fc").weight.detach().numpy()
    np.testing.assert_array_equal(st.w_codes, Q.quantize_weight(w * np.exp2(k)[None, :], st.w_bits, st.w_scales))


def test_free_scales_option(setup):
    qm, ds = setup
    sim = Quantizer(qm, ds, act_scale="free").apply(uniform_plan(qm.layer_infos, 8, 8))
    assert sim.states["fc"].a_params == {"mode": "free"}


def test_baselines_meet_budgets(setup):
    qm, ds = setup
    infos = qm.layer_infos
    sens = analyze(qm, ds, batch_size=32, batches=2)
    for budget in ("bits:4", "bits:3", "size:0.1", "bops:0.02"):
        b = parse_budget(budget)
        for fn in (B.hawq_v3, B.cw_greedy):
            p = fn(infos, sens, b)
            p.validate(infos)
            assert p.metrics["meets_budget"], (fn.__name__, budget, p.metrics)
    mixed = B.cw_greedy(infos, sens, parse_budget("bops:0.01"), a_bits="mixed")
    assert mixed.metrics["meets_budget"] and mixed.metrics["avg_a_bits"] < 8
    with pytest.raises(PlanError, match="cannot be met"):
        B.cw_greedy(infos, sens, parse_budget("bits:1.5"))
    with pytest.raises(PlanError, match="no layer-wise plan"):
        B.hawq_v3(infos, sens, parse_budget("bits:1.5"))
    u = B.uniform(infos, 4, 8, parse_budget("bits:3"))
    assert not u.metrics["meets_budget"]


def test_cw_greedy_fills_budget_in_sensitivity_order(setup):
    qm, ds = setup
    infos = qm.layer_infos
    sens = analyze(qm, ds, batch_size=32, batches=1)
    p = B.cw_greedy(infos, sens, parse_budget("bits:5"))
    assert 4.5 < p.metrics["avg_w_bits"] <= 5.0


def test_finetune_keeps_plan(setup):
    qm, ds = setup
    qz = Quantizer(qm, ds)
    p = uniform_plan(qm.layer_infos, 2, 8)
    sim = qz.apply(p)
    info = finetune(sim, ds, epochs=1, batch_size=32)
    assert info["steps"] == 3
    for name, st in sim.states.items():
        assert st.w_bits.tolist() == p[name].w_bits
        assert np.abs(st.w_codes).max() <= 1
    with torch.no_grad():
        ref = qm(torch.from_numpy(ds.x[:4]))
    assert torch.isfinite(ref).all()


def test_cli_plan_and_eval(tmp_path):
    cmd = [sys.executable, "-m", "cwhawq.cli"]
    sens = tmp_path / "s.json"
    r = subprocess.run(cmd + ["analyze", "zoo:lenet-fmnist", "--out", str(sens), "--batch-size", "64"],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["plan", "cw-greedy", "zoo:lenet-fmnist", "--sens", str(sens), "--budget", "bits:4",
                              "--out", str(tmp_path / "p.json"), "--json"], capture_output=True, text=True, timeout=300,
                       env=cli_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["meets_budget"]
    r = subprocess.run(cmd + ["eval", "zoo:lenet-fmnist", "--plan", str(tmp_path / "p.json"), "--limit", "500",
                              "--json"], capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.8
    r = subprocess.run(cmd + ["eval", "zoo:resnet20-fmnist", "--plan", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 2 and "was made for zoo:lenet-fmnist, not for zoo:resnet20-fmnist" in r.stderr, r.stderr
