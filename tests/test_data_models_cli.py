"""Foundation: data specs, model specs, the CLI's eval and its errors."""
import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from cwhawq import data as D
from cwhawq.errors import DataError, ModelError
from cwhawq.models import load_model, save_pt2
from conftest import cli_env, needs_fmnist, write_npz

CLI = [sys.executable, "-m", "cwhawq.cli"]


def run_cli(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300, env=cli_env(), **kw)


def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_npz_layouts_and_splits(tmp_path):
    for layout in ("nhw", "nhwc", "nchw"):
        p = write_npz(tmp_path / f"d_{layout}.npz", n=120, layout=layout)
        tr, va, te, al = (D.load(str(p), s) for s in ("train", "val", "test", "all"))
        assert tr.x.shape[1:] == (1, 8, 8) and tr.x.dtype == np.float32
        assert 0.0 <= tr.x.min() and tr.x.max() <= 1.0
        assert len(tr) + len(va) + len(te) == len(al) == 120
    # val is a fixed subset of train
    a = D.load(str(tmp_path / "d_nhw.npz"), "val").x
    D._CACHE.clear()
    assert np.array_equal(a, D.load(str(tmp_path / "d_nhw.npz"), "val").x)


def test_npz_train_test_keys(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tt.npz", x_train=rng.random((50, 6, 6)).astype(np.float32), y_train=rng.integers(0, 2, 50),
             x_test=rng.random((10, 6, 6)).astype(np.float32), y_test=rng.integers(0, 2, 10))
    assert len(D.load(str(tmp_path / "tt.npz"), "test")) == 10
    assert len(D.load(str(tmp_path / "tt.npz"), "all")) == 60


def test_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (7, 4, 4)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 7))
    ds = D.load(str(tmp_path), "test")
    assert ds.x.shape == (7, 1, 4, 4)


@pytest.mark.parametrize("bad,match", [
    ("nope-dataset", "does not parse"),
    ("/nonexistent/file.npz", "not found"),
])
def test_bad_data_specs(bad, match):
    with pytest.raises(DataError, match=match):
        D.load(bad)


def test_corrupt_and_wrong_shape_data(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        D.load(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "s.npz", x=np.zeros((5, 2, 3, 4, 5)), y=np.zeros(5))
    with pytest.raises(DataError, match="expected images"):
        D.load(str(tmp_path / "s.npz"))
    np.savez(tmp_path / "y.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4))
    with pytest.raises(DataError, match="labels"):
        D.load(str(tmp_path / "y.npz"))
    (tmp_path / "trunc").mkdir()
    write_idx(tmp_path / "trunc" / "train-images-idx3-ubyte.gz", np.zeros((4, 2, 2)))
    raw = gzip.open(tmp_path / "trunc" / "train-images-idx3-ubyte.gz").read()[:-3]
    with gzip.open(tmp_path / "trunc" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    with pytest.raises(DataError):
        D.load(str(tmp_path / "trunc"))


def test_model_spec_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown zoo model"):
        load_model("zoo:nope")
    (tmp_path / "bad.pt2").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a torch.export archive"):
        load_model(str(tmp_path / "bad.pt2"))
    with pytest.raises(ModelError, match="not understood"):
        load_model("model.h5")


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args in (["eval", "zoo:nope"], ["eval", "zoo:lenet-fmnist", "--data", str(tmp_path / "x.npz")],
                 ["eval", str(tmp_path / "m.pt2")]):
        r = run_cli(*args)
        assert r.returncode == 2, r
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and "cwhawq" in r.stdout


def test_pt2_and_npz_evaluated_the_same_way(tmp_path, tiny):
    """A user's own model as .pt2 and own data as .npz, end to end through the CLI."""
    m, _, _ = tiny
    save_pt2(m, (2, 5, 5), tmp_path / "tiny.pt2")
    rng = np.random.default_rng(0)
    x = rng.random((64, 2, 5, 5)).astype(np.float32)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    r = run_cli("eval", str(tmp_path / "tiny.pt2"), "--data", str(tmp_path / "d.npz"), "--split", "all", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["n"] == 64 and rep["accuracy"] == 1.0
    assert set(rep) >= {"model", "data", "split", "n", "accuracy", "seconds"}
    # wrong input shape: clear error
    np.savez(tmp_path / "w.npz", x=rng.random((8, 3, 5, 5)).astype(np.float32), y=np.zeros(8, int))
    r = run_cli("eval", str(tmp_path / "tiny.pt2"), "--data", str(tmp_path / "w.npz"))
    assert r.returncode == 2 and "expects" in r.stderr


@needs_fmnist
def test_zoo_accuracy_on_fashion_mnist():
    r = run_cli("eval", "zoo:resnet20-fmnist", "--data", "fashion-mnist", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] >= 0.925
    r = run_cli("eval", "zoo:lenet-fmnist", "--json")
    assert json.loads(r.stdout)["accuracy"] >= 0.89


def test_analyze_split_and_export_records_its_calibration(tmp_path, tiny):
    """analyze --split picks the samples (all of an x,y .npz, not its 75% train part); export records the
    data that calibrated it, and the model's sha256, in the ONNX metadata; plan from-onnx gives both back."""
    import onnx
    from click.testing import CliRunner

    from cwhawq.cli import cli
    from cwhawq.io import sha256_file

    m, _, _ = tiny
    save_pt2(m, (2, 5, 5), tmp_path / "tiny.pt2")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((60, 2, 5, 5)).astype(np.float32), y=rng.integers(0, 4, 60))
    n_train = len(D.load(str(tmp_path / "d.npz"), "train"))
    assert n_train < 60
    base = ["analyze", str(tmp_path / "tiny.pt2"), "--data", str(tmp_path / "d.npz"), "--batch-size", "100",
            "--max-probes", "8", "--json"]
    for split, n in (("train", n_train), ("all", 60), ("test", 10)):
        out = tmp_path / f"s_{split}.json"
        r = CliRunner().invoke(cli, base + ["--split", split, "--out", str(out)])
        assert r.exit_code == 0, r.output
        sens = json.loads(out.read_text())
        assert sens["split"] == split and sens["samples"] == n
        assert sens["model_sha256"] == sha256_file(tmp_path / "tiny.pt2")
    r = CliRunner().invoke(cli, ["plan", "uniform", str(tmp_path / "tiny.pt2"), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "tiny.pt2"), "--plan", str(tmp_path / "p.json"), "--data",
                                 str(tmp_path / "d.npz"), "--calib-batches", "1", "--verify", "0", "--out",
                                 str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    calib = json.loads(meta["cwhawq.calibration"])
    assert calib["data"] == str(tmp_path / "d.npz") and calib["split"] == "train"
    assert calib["samples"] == min(128, n_train) and calib["calib_batches"] == 1
    assert meta["cwhawq.model_sha256"] == sha256_file(tmp_path / "tiny.pt2")
    r = CliRunner().invoke(cli, ["plan", "from-onnx", str(tmp_path / "q.onnx"), "--out", str(tmp_path / "back.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "back.json").read_text())["model_sha256"] == meta["cwhawq.model_sha256"]


def test_which_data_a_model_gets(tmp_path):
    """A zoo model (or an ONNX file exported from one) brings its dataset; any other model must be given
    one: the error names --data."""
    import onnx
    from onnx import TensorProto, helper

    from cwhawq.checks import require_data

    assert require_data("zoo:lenet-fmnist", None) == "fashion-mnist"
    assert require_data("zoo:lenet-fmnist", "my.npz") == "my.npz"
    with pytest.raises(ModelError, match="unknown zoo model"):
        require_data("zoo:nope", None)
    with pytest.raises(DataError, match="m.pt2 is not a zoo model: give the data to calibrate it on with --data"):
        require_data(str(tmp_path / "m.pt2"), None, "calibrate it on")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    for src, want in (("zoo:lenet-fmnist", "fashion-mnist"), (str(tmp_path / "m.pt2"), None)):
        m = helper.make_model(graph)
        helper.set_model_props(m, {"cwhawq.model": src})
        onnx.save(m, str(tmp_path / "e.onnx"))
        if want:
            assert require_data(str(tmp_path / "e.onnx"), None) == want
        else:
            with pytest.raises(DataError, match="--data"):
                require_data(str(tmp_path / "e.onnx"), None)
