"""Learned weight rounding (issue 17, cwhawq/rounding.py): reconstruction lowers the output error of
every block against nearest rounding, keeps every channel's codes in its own bit-width's range, is
reproducible from its seed, and the exported ONNX carries the learned codes (onnxruntime = simulation)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TinyNet, write_npz

from cwhawq import api, quantizers as Q, rounding as R
from cwhawq.cli import cli
from cwhawq.data import Dataset, load as load_data
from cwhawq.graph import canonicalize
from cwhawq.models import LoadedModel, save_pt2
from cwhawq.plan import LayerPlan, Plan
from cwhawq.quantize import Quantizer

SHAPE = (1, 8, 8)


def _model():
    torch.manual_seed(0)
    m = TinyNet(cin=1, c=8, hw=8, classes=3).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _calib(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.uniform(0, 1, (n, *SHAPE)).astype(np.float32), rng.integers(0, 3, n), "rand", "train")


def _plan(infos, w_cycle=(8, 4, 2, 3), model=None):
    layers = [LayerPlan(i.name, [w_cycle[c % len(w_cycle)] for c in range(i.out_channels)], [8] * i.in_channels)
              for i in infos]
    return Plan(layers, (2, 3, 4, 8), model, "test", "bits:4")


def _learn(qm, plan, calib, **kw):
    R._CACHE.clear()
    sim = Quantizer(qm, calib).apply(plan)
    rep = R.learn_rounding(sim, calib, R.RoundingConfig(**kw))
    return sim, rep


@pytest.mark.parametrize("mode", ["block", "layer"])
def test_reconstruction_lowers_the_error_and_keeps_each_channels_range(mode):
    qm = canonicalize(_model(), SHAPE)
    plan = _plan(qm.layer_infos)
    calib = _calib()
    x = torch.from_numpy(calib.x)
    with torch.no_grad():
        ref = qm(x)
    sim0 = Quantizer(qm, calib).apply(plan)
    with torch.no_grad():
        err_near = float((qm(x) - ref).pow(2).mean())
    near_codes = {n: st.w_codes.copy() for n, st in sim0.states.items()}
    sim, rep = _learn(qm, plan, calib, iters=150, batch_size=32, mode=mode)
    assert rep["mode"] == mode and rep["units"]
    for u in rep["units"]:   # every unit's output error goes down against nearest rounding
        assert u["loss_learned"] < u["loss_nearest"], u
    with torch.no_grad():
        err_learned = float((qm(x) - ref).pow(2).mean())
    assert err_learned < 0.8 * err_near, (err_learned, err_near)
    changed = 0
    for name, st in sim.states.items():
        bits = np.asarray(plan[name].w_bits)
        assert st.w_bits.tolist() == bits.tolist()
        c2 = st.w_codes.reshape(len(bits), -1).astype(np.int64)
        qmax = np.array([Q.qrange(int(b), True)[1] for b in bits])
        assert (np.abs(c2) <= qmax[:, None]).all(), name          # each channel inside its own range
        for b in (2, 3):                                          # the low-bit channels use their codes
            if (bits == b).any():
                assert np.abs(c2[bits == b]).max() <= (1 if b == 2 else 3)
        n2 = near_codes[name].reshape(len(bits), -1).astype(np.int64)
        assert np.abs(c2 - n2).max() <= 1                         # down or up from the float weight only
        changed += int((c2 != n2).sum())
        # the installed weight is exactly the codes times the channel scales
        fq = Q.dequantize_weight(st.w_codes, st.w_scales)
        assert np.array_equal(qm.layer(name).wq.fq.numpy(), fq)
    assert changed > 0


def test_seeded_and_reproducible():
    qm = canonicalize(_model(), SHAPE)
    plan = _plan(qm.layer_infos)
    calib = _calib()
    a, _ = _learn(qm, plan, calib, iters=60, batch_size=16, seed=3)
    ca = {n: st.w_codes.copy() for n, st in a.states.items()}
    b, _ = _learn(qm, plan, calib, iters=60, batch_size=16, seed=3)
    assert all(np.array_equal(ca[n], st.w_codes) for n, st in b.states.items())
    c, _ = _learn(qm, plan, calib, iters=60, batch_size=16, seed=4)
    assert any(not np.array_equal(ca[n], st.w_codes) for n, st in c.states.items())
    # the in-process cache gives the same codes without learning again
    sim = Quantizer(qm, calib).apply(plan)
    rep = R.learn_rounding(sim, calib, R.RoundingConfig(iters=60, batch_size=16, seed=4))
    assert rep["cached"] and all(np.array_equal(c.states[n].w_codes, st.w_codes) for n, st in sim.states.items())


def _onnx_codes(path, infos):
    """{layer: codes [out, ...]} in the original channel order, from the exported weight groups."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    out = {i.name: np.zeros(i.weight_shape, np.int64) for i in infos}
    perm_in = {}
    for n in m.graph.node:
        meta = {e.key: e.value for e in n.metadata_props}
        if "cwhawq.in_perm" in meta and meta.get("cwhawq.kind") != "depthwise":
            perm_in[meta["cwhawq.layer"]] = np.asarray(json.loads(meta["cwhawq.in_perm"]))
    for t in m.graph.initializer:
        meta = {e.key: e.value for e in t.metadata_props}
        if "cwhawq.channels" not in meta:
            continue
        layer = t.name.split(".weight.w")[0]
        codes = numpy_helper.to_array(t).astype(np.int64)
        if layer in perm_in:   # the input channels follow the producer's order: undo it
            inv = np.empty_like(perm_in[layer])
            inv[perm_in[layer]] = np.arange(len(inv))
            codes = codes[:, inv]
        out[layer][np.asarray(json.loads(meta["cwhawq.channels"]))] = codes
    return out


def test_export_carries_the_learned_codes_and_onnxruntime_agrees(tmp_path):
    pytest.importorskip("onnxruntime")
    from cwhawq.export import export_onnx

    m = _model()
    model = str(tmp_path / "tiny.pt2")
    save_pt2(m, SHAPE, model)
    data = str(write_npz(tmp_path / "data.npz", n=400, shape=SHAPE, classes=3))
    from cwhawq.models import load_model

    loaded = load_model(model)
    infos = canonicalize(loaded.module, loaded.input_shape).layer_infos
    plan = _plan(infos, w_cycle=(4, 2, 8, 3))
    plan.model = model
    plan.model_sha256 = loaded.info.get("sha256")
    cfg = R.RoundingConfig(iters=80, batch_size=32)
    R._CACHE.clear()
    rep = export_onnx(loaded, plan, tmp_path / "q.onnx", data=data, rounding=cfg, verify=32, eval_split="test")
    assert rep["rounding"]["method"] == "learned" and not rep["rounding"]["cached"]
    acc = rep["accuracy"]
    assert abs(acc["simulated"] - acc["onnxruntime"]) <= 0.001 and acc["argmax_agreement"] >= 0.999
    assert rep["verify"]["rel_diff"] <= 1e-4
    # the file holds the learned codes: those of the simulation, not the nearest ones
    _, _, sim = api.simulate_plan(loaded, plan, data, rounding=cfg)
    assert sim.rounding["cached"]
    got = _onnx_codes(tmp_path / "q.onnx", infos)
    _, _, near = api.simulate_plan(loaded, plan, data, rounding="nearest")
    differs = 0
    for i in infos:
        assert np.array_equal(got[i.name], sim.states[i.name].w_codes.astype(np.int64)), i.name
        differs += int((got[i.name] != near.states[i.name].w_codes).sum())
    assert differs > 0
    import onnx

    meta = {e.key: e.value for e in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    r = json.loads(meta["cwhawq.rounding"])
    assert r["method"] == "learned" and r["iters"] == 80 and r["seed"] == 0 and r["samples"] == len(api.calibration_set(data))
    # onnxruntime's accuracy on the whole split equals the simulation's (learned codes)
    test = load_data(data, "test")
    from cwhawq.evaluate import accuracy, onnx_predict

    assert abs(float((onnx_predict(str(tmp_path / "q.onnx"), test).argmax(1) == test.y).mean())
               - accuracy(sim.module, test)) <= 0.001


def test_cli_rounding_options(tmp_path):
    torch.manual_seed(0)
    model = str(tmp_path / "tiny.pt2")
    save_pt2(_model(), SHAPE, model)
    data = str(write_npz(tmp_path / "data.npz", n=200, shape=SHAPE, classes=3))
    from cwhawq.models import load_model

    loaded = load_model(model)
    plan = _plan(canonicalize(loaded.module, loaded.input_shape).layer_infos)
    plan.model, plan.model_sha256 = model, loaded.info.get("sha256")
    plan.save(tmp_path / "p.json")
    base = ["eval", model, "--data", data, "--plan", str(tmp_path / "p.json"), "--json"]
    r = CliRunner().invoke(cli, base + ["--rounding-iters", "20"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["rounding"]["method"] == "learned" and rep["rounding"]["iters"] == 20
    r = CliRunner().invoke(cli, base + ["--rounding", "nearest"])
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["rounding"] == {"method": "nearest"}
    # bad input: one line, exit 2
    for extra, msg in ((["--rounding", "learned", "--finetune-epochs", "1"], "do not combine"),
                       (["--rounding", "sometimes"], "sometimes"), (["--rounding-iters", "-1"], "-1")):
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    # a fine-tune alone rounds to nearest (QAT trains for it)
    assert api.rounding_config(None, finetune_epochs=1) is None
    with pytest.raises(R.RoundingError):
        R.RoundingConfig(mode="net").check()
