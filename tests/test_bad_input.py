"""Bad input through every CLI command, table-driven.

Every row is a command line (run in a fresh copy of a directory of small input files), the exit code
(2) and a piece of the one-line message it must print. For every row the test also asserts: stderr is
exactly one line starting ``error:``, no traceback (and no exception other than the exit), and no file
of the directory is created, modified or removed (so no input is overwritten and an existing output is
never destroyed by a failing run: every base command line writes over an existing ``old.*`` file).

The rows come from two places:

- generic rows, derived by click introspection from each command's parameters and its BASE command
  line: every command with ``--out`` gets "parent is a regular file", "out is a directory", "out is
  unwritable" and "out is one of the command's input files" (one row per input file of its BASE);
  every MODEL argument gets missing / directory / garbage / unknown-zoo / non-PyTorch files; every
  ``--data`` gets missing / corrupt / wrong-shape / not-given data; every plan and sensitivity file
  (``plan.json`` / ``sens.json`` in BASE) gets missing, truncated, wrong-schema, wrong-version, NaN and
  other-model files; every numeric option with a range gets a value below (or above) it, every
  ``--bits`` / ``--budget`` bad values, every required option is dropped once, and an unknown option
  is added. A new command inherits all of this by adding its BASE line (the test fails without one);
- the explicit ROWS below (the cases of issue 13 and more of the same kind).

The files are tiny (a TinyNet .pt2, 60 samples); no TVM compilation happens here (the ``run`` input
rows use an artifact whose inputs are checked before it is loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cwhawq.cli import cli
from conftest import TinyNet, cli_env, write_npz

SHAPE = (1, 8, 8)

# A valid command line per command, in the fixture directory. Never run as is (except the cheap
# ones in test_bases_are_valid): the rows are derived from it. Outputs point at existing files (old.*).
BASE = {
    "eval": "eval tiny.pt2 --data data.npz --plan plan.json",
    "compile": "compile q.onnx --out old.so",
    "run": "run art.so --input x.npy --out old.npy",
    "analyze": "analyze tiny.pt2 --data data.npz --out old.json --max-probes 8",
    "plan hawq-v3": "plan hawq-v3 tiny.pt2 --sens sens.json --budget bits:4 --out old.json",
    "plan cw-greedy": "plan cw-greedy tiny.pt2 --sens sens.json --budget bits:4 --out old.json",
    "plan uniform": "plan uniform tiny.pt2 --w-bits 4 --out old.json",
    "plan from-onnx": "plan from-onnx q.onnx --out old.json",
    "export": "export tiny.pt2 --plan plan.json --data data.npz --sens sens.json --out old.onnx --verify 0",
    "demo": "demo --model tiny.pt2 --data data.npz --out olddemo --quick --episodes 1 --no-compile",
    "search": "search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --episodes 1 --warmup 1 "
              "--hidden 4 --val-samples 8 --no-measure --out old.json",
    "bench": "bench art.so --repeat 1 --warmup 0",
    "latency-table": "latency-table tiny.pt2 --data data.npz --check plan.json --grid 1 --repeat 1 --out old.json",
}
CHEAP_BASES = ("eval", "analyze", "plan hawq-v3", "plan cw-greedy", "plan uniform", "plan from-onnx")


def _leaf_commands(group=cli, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _leaf_commands(cmd, prefix + (name,))
        else:
            yield " ".join(prefix + (name,)), cmd


COMMANDS = dict(_leaf_commands())


# ===================================================================================== the files
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = TinyNet(cin=1, c=3, hw=8, classes=3).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _unwritable_dir() -> str | None:
    """A directory nobody can create files in, even root (sysfs), when this machine has one."""
    for d in ("/sys", "/proc/1"):
        try:
            fd, tmp = tempfile.mkstemp(dir=d)
        except OSError:
            return d
        os.close(fd)
        os.unlink(tmp)
    return None


UNWRITABLE = _unwritable_dir()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from cwhawq import api
    from cwhawq.export import export_onnx
    from cwhawq.models import save_pt2

    d = tmp_path_factory.mktemp("bad-input")
    save_pt2(_tiny(0), SHAPE, d / "tiny.pt2")
    shutil.copy(d / "tiny.pt2", d / "copy.pt2")                  # the same model under another name
    (d / "other").mkdir()
    save_pt2(_tiny(1), SHAPE, d / "other" / "tiny.pt2")          # another model under the same name
    write_npz(d / "data.npz", n=60, shape=SHAPE, classes=3)
    write_npz(d / "labels7.npz", n=60, shape=SHAPE, classes=7)   # labels outside the model's 3 classes
    write_npz(d / "shape.npz", n=60, shape=(1, 6, 6), classes=3)
    (d / "garbage.npz").write_bytes(b"this is not a zip file")
    (d / "garbage.pt2").write_bytes(b"this is not a torch.export archive")
    (d / "garbage.onnx").write_bytes(b"\x08\x07this is not an ONNX model")
    (d / "adir").mkdir()
    (d / "adir.pt2").mkdir()
    (d / "adir.onnx").mkdir()
    (d / "model.h5").write_bytes(b"keras")

    sens = api.analyze(str(d / "tiny.pt2"), str(d / "data.npz"), out=str(d / "sens.json"), max_probes=8)
    plan = api.make_plan("uniform", str(d / "tiny.pt2"), w_bits=4, out=str(d / "plan.json"))
    export_onnx(str(d / "tiny.pt2"), str(d / "plan.json"), d / "q.onnx", data=str(d / "data.npz"), verify=0)

    pd = plan.to_dict()
    (d / "trunc.json").write_text(json.dumps(pd)[:40])
    (d / "list.json").write_text("[1, 2, 3]")
    (d / "schema.json").write_text(json.dumps({"format": "cwhawq-plan", "layers": "conv"}))
    (d / "pv2.json").write_text(json.dumps(dict(pd, version=2)))
    (d / "pzoo.json").write_text(json.dumps(dict(pd, model="zoo:lenet-fmnist", model_sha256=None)))
    bad_bits = json.loads(json.dumps(pd))
    bad_bits["layers"][0]["w_bits"][0] = 5
    (d / "pbits.json").write_text(json.dumps(bad_bits))
    few = json.loads(json.dumps(pd))
    few["layers"][0]["w_bits"] = few["layers"][0]["w_bits"][:1]
    (d / "pchan.json").write_text(json.dumps(few))
    nan = json.loads(json.dumps(sens))
    nan["layers"][0]["weight"]["trace"][0] = float("nan")
    (d / "snan.json").write_text(json.dumps(nan))                 # json writes NaN, and reads it back
    inf = json.loads(json.dumps(sens))
    inf["layers"][-1]["activation"]["omega"]["4"][0] = float("inf")
    (d / "sinf.json").write_text(json.dumps(inf))
    (d / "sv2.json").write_text(json.dumps(dict(sens, version=2)))
    (d / "szoo.json").write_text(json.dumps(dict(sens, model="zoo:lenet-fmnist", model_sha256=None)))
    (d / "sschema.json").write_text(json.dumps({"layers": [{"name": "conv", "weight": {"trace": "x"}}]}))
    (d / "table.json").write_text("{\"format\": \"cwhawq-latency-table\"")

    # an artifact whose manifest is read (and its inputs checked) before the library is loaded
    (d / "art.so").write_bytes(b"not a shared library")
    man = {"format": "cwhawq-artifact", "artifact": "art.so", "sha256": _sha(d / "art.so"),
           "target": {"name": "llvm", "device": "cpu", "tvm": {"kind": "llvm"}},
           "inputs": [{"name": "input", "shape": ["batch", *SHAPE], "dtype": "float32"}],
           "outputs": [{"name": "logits", "shape": ["batch", 3], "dtype": "float32"}]}
    (d / "art.manifest.json").write_text(json.dumps(man))
    (d / "bad.so").write_bytes(b"modified after compilation")
    (d / "bad.manifest.json").write_text(json.dumps(man))          # checksum of art.so: mismatch
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.random((2, *SHAPE), dtype=np.float32))
    np.save(d / "x_u8.npy", rng.integers(0, 256, (2, *SHAPE), dtype=np.uint8))
    np.save(d / "x_shape.npy", rng.random((2, 1, 6, 6), dtype=np.float32))
    np.save(d / "x_nan.npy", np.full((2, *SHAPE), np.nan, dtype=np.float32))
    np.save(d / "x_zero.npy", np.zeros((0, *SHAPE), dtype=np.float32))
    np.savez(d / "x.npz", input=rng.random((2, *SHAPE), dtype=np.float32))
    np.savez(d / "x_other.npz", image=rng.random((2, *SHAPE), dtype=np.float32))
    (d / "empty.npy").write_bytes(b"")
    (d / "obj.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
                                b"'shape': (1,), }" + b" " * 60 + b"\n" + b"\x80\x04N.")

    # existing outputs that a failing run must leave alone
    for name in ("old.json", "old.onnx", "old.so", "old.npy", "old.jsonl", "old.ckpt", "old.manifest.json"):
        (d / name).write_bytes(b"previous output " + name.encode())
    (d / "olddemo").mkdir()
    (d / "olddemo" / "report.md").write_text("previous report")
    return d


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.is_dir(), None if p.is_dir() else _sha(p)) for p in sorted(d.rglob("*"))}


# ===================================================================================== rows
@dataclass
class Row:
    cmd: str                 # shell words, run in a copy of the fixture directory
    msg: str                 # a piece of the one-line error
    code: int = 2

    @property
    def id(self) -> str:
        return self.cmd[:110]


def _argv(cmd: str) -> list[str]:
    return shlex.split(cmd)


def _opt_value(argv: list[str], opt: str) -> str | None:
    return argv[argv.index(opt) + 1] if opt in argv else None


def _replace(argv: list[str], opt: str, value: str) -> list[str]:
    a = list(argv)
    if opt in a:
        a[a.index(opt) + 1] = value
    else:
        a += [opt, value]
    return a


def _drop(argv: list[str], opt: str, flag: bool = False) -> list[str]:
    a = list(argv)
    i = a.index(opt)
    del a[i:i + (1 if flag else 2)]
    return a


def _swap(argv: list[str], old: str, new: str) -> list[str]:
    return [new if t == old else t for t in argv]


def _join(argv) -> str:
    return shlex.join(argv)


def _input_files(argv: list[str], files: set[str]) -> list[str]:
    """Tokens of a command line that name input files of the fixture (not its outputs)."""
    out = _opt_value(argv, "--out")
    return [t for t in argv if t in files and t != out and not t.startswith("old")]


def _range_rows(name: str, argv: list[str], cmd: click.Command) -> list[Row]:
    rows = []
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.is_flag or not p.opts[-1].startswith("--"):
            continue
        opt = max(p.opts, key=len)
        t = p.type
        if isinstance(t, click.IntRange) and t.min is not None:
            rows.append(Row(_join(_replace(argv, opt, str(t.min - 1 if not t.min_open else t.min))), "Invalid value"))
        if isinstance(t, click.FloatRange) and t.min is not None:
            rows.append(Row(_join(_replace(argv, opt, str(t.min if t.min_open else t.min - 1))), "Invalid value"))
        if isinstance(t, (click.IntRange, click.FloatRange)) and t.max is not None:
            over = t.max if t.max_open else t.max + 1
            rows.append(Row(_join(_replace(argv, opt, str(over))), "Invalid value"))
        if isinstance(t, (click.types.IntParamType, click.types.FloatParamType)):
            rows.append(Row(_join(_replace(argv, opt, "abc")), "is not a valid"))
        if isinstance(t, click.Choice):
            rows.append(Row(_join(_replace(argv, opt, "bogus")), "is not one of"))
    return rows


def generic_rows(files: set[str]) -> list[Row]:
    rows: list[Row] = []
    for name, cmd in COMMANDS.items():
        argv = _argv(BASE[name])
        opts = {o: p for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        out = opts.get("--out")
        if out is not None:
            if out.name == "out_dir":   # a directory of outputs
                rows += [Row(_join(_replace(argv, "--out", "data.npz/sub")), "is a file, not a directory"),
                         Row(_join(_replace(argv, "--out", "data.npz")), "is a file, not a directory")]
                if UNWRITABLE:
                    rows.append(Row(_join(_replace(argv, "--out", f"{UNWRITABLE}/cwhawq-demo")), "cannot write in"))
            else:
                suffix = Path(_opt_value(argv, "--out")).suffix
                rows += [Row(_join(_replace(argv, "--out", f"data.npz/out{suffix}")), "is a file, not a directory"),
                         Row(_join(_replace(argv, "--out", f"data.npz/sub/out{suffix}")), "is a file, not a directory"),
                         Row(_join(_replace(argv, "--out", "adir")), "is a directory")]
                if UNWRITABLE:
                    rows.append(Row(_join(_replace(argv, "--out", f"{UNWRITABLE}/cwhawq-out{suffix}")),
                                    "cannot write in"))
                for f in _input_files(argv, files):
                    rows.append(Row(_join(_replace(argv, "--out", f)), "is also an input"))
        for p in cmd.params:   # every required option missing once
            if isinstance(p, click.Option) and p.required:
                rows.append(Row(_join(_drop(argv, max(p.opts, key=len))), "Missing option"))
        rows.append(Row(_join(argv + ["--no-such-option"]), "No such option"))
        rows += _range_rows(name, argv, cmd)
        if "tiny.pt2" in argv:   # the model
            for bad, msg in (("nope.pt2", "not found"), ("adir.pt2", "is a directory"),
                             ("garbage.pt2", "not a torch.export archive"), ("zoo:nope", "unknown zoo model"),
                             ("model.h5", "not understood"), ("q.onnx", "PyTorch")):
                if bad == "q.onnx" and name == "eval":
                    bad, msg = "q.onnx", "--plan applies to PyTorch models"
                rows.append(Row(_join(_swap(argv, "tiny.pt2", bad)), msg))
            if "plan.json" in argv or "sens.json" in argv:
                rows.append(Row(_join(_swap(argv, "tiny.pt2", "other/tiny.pt2")), "was made for"))
        if "q.onnx" in argv:   # an ONNX input
            for bad, msg in (("nope.onnx", "not found"), ("garbage.onnx", "not a valid ONNX file"),
                             ("adir.onnx", "directory")):
                rows.append(Row(_join(_swap(argv, "q.onnx", bad)), msg))
        if "art.so" in argv:   # a compiled artifact
            for bad, msg in (("nope.so", "not found"), ("adir", "directory"),
                             ("bad.so", "does not match its manifest checksum" if name == "bench" else "checksum")):
                if name == "run" and bad == "bad.so":
                    continue   # run checks the inputs first, then loads (and checksums) the artifact: ROWS
                rows.append(Row(_join(_swap(argv, "art.so", bad)), msg))
        if "--data" in argv:
            for bad, msg in (("missing.npz", "not found"), ("garbage.npz", "cannot read"), ("adir", "has no"),
                             ("nonsense", "does not parse"), ("shape.npz", "the model expects")):
                rows.append(Row(_join(_replace(argv, "--data", bad)), msg))
            if "tiny.pt2" in argv:   # not a zoo model: the data must be given
                rows.append(Row(_join(_drop(argv, "--data")), "is not a zoo model: give the data"))
        for opt in ("--plan", "--check"):
            if _opt_value(argv, opt) == "plan.json":
                for bad, msg in (("missing.json", "not found"), ("adir", "is a directory"),
                                 ("trunc.json", "not valid JSON"), ("list.json", "a plan is a JSON object"),
                                 ("schema.json", "'layers' must be a non-empty list"),
                                 ("pv2.json", "plan version 2 is not supported"),
                                 ("pzoo.json", "was made for zoo:lenet-fmnist"),
                                 ("pbits.json", "outside the plan's bit set"),
                                 ("pchan.json", "channels"), ("sens.json", "is not a cwhawq plan")):
                    rows.append(Row(_join(_replace(argv, opt, bad)), msg))
        if _opt_value(argv, "--sens") == "sens.json":
            for bad, msg in (("missing.json", "not found"), ("adir", "is a directory"),
                             ("trunc.json", "not valid JSON"), ("snan.json", "is nan"), ("sinf.json", "is inf"),
                             ("sv2.json", "version 2 is not supported"), ("szoo.json", "was made for zoo:lenet-fmnist"),
                             ("sschema.json", "must be a list of numbers"),
                             ("plan.json", "not a cwhawq sensitivity file")):
                rows.append(Row(_join(_replace(argv, "--sens", bad)), msg))
        if "--bits" in opts:
            for bad, msg in (("2,5", "bit-widths must come from"), ("two", "does not parse"),
                             (",", "bit-widths must come from")):
                rows.append(Row(_join(_replace(argv, "--bits", bad)), msg))
        if "--a-bits" in opts:
            rows.append(Row(_join(_replace(argv, "--a-bits", "5")), "must come from"))
        if "--budget" in opts:
            for bad, msg in (("size:2", "fraction of fp32"), ("size:0", "must be positive"),
                             ("bits:-1", "must be positive"), ("bits:40", "average weight bit-width"),
                             ("bops:nan", "must be positive"), ("latency:9", "ratio to the fp32 latency"),
                             ("speed:1", "unknown"), ("size:abc", "is not a number"), ("3bits", "does not parse")):
                rows.append(Row(_join(_replace(argv, "--budget", bad)), msg))
    return rows


ROWS = [
    # run: the inputs (issue 13: empty .npy "Aborted!", non-zip .npz traceback, uint8 cast silently)
    Row("run art.so --input empty.npy --out y.npy", "is empty (not an .npy file)"),
    Row("run art.so --input garbage.npz --out y.npy", "is not an .npz archive"),
    Row("run art.so --input x_u8.npy --out y.npy", "is uint8, the artifact takes float32"),
    Row("run art.so --input x_shape.npy --out y.npy", "has shape [2, 1, 6, 6]"),
    Row("run art.so --input x_nan.npy --out y.npy", "NaN"),
    Row("run art.so --input x_zero.npy --out y.npy", "is empty"),
    Row("run art.so --input obj.npy --out y.npy", "cannot read input"),
    Row("run art.so --input missing.npy --out y.npy", "file not found"),
    Row("run art.so --input adir --out y.npy", "is a directory"),
    Row("run art.so --input x.npz --out y.npy --input x.npy", "too many inputs"),
    Row("run art.so --input x_other.npz --out y.npy", "has no input 'image'"),
    Row("run art.so --input image=x.npy --out y.npy", "has no input 'image'"),
    Row("run art.so --input x.npy --out y.txt", "write the outputs to an .npy"),
    Row("run art.so --input x.npy --out x.npy", "is also an input (--input x.npy)"),
    Row("run art.so --input input=x.npy --out x.npy", "is also an input (--input x.npy)"),
    Row("run bad.so --input x.npy --out y.npy", "does not match its manifest checksum"),
    Row("run art.so --input x.npy --out y.npy", "cannot load"),      # valid input, an artifact that is not one
    # a directory without IDX files, or an .npz named as a directory of IDX files
    Row("eval tiny.pt2 --data adir", "has no train-images"),
    # labels outside the model's classes (issue 13: accuracy 0.0, exit 0), wherever labels are used
    Row("eval tiny.pt2 --data labels7.npz", "has labels up to 6, but the model has 3 outputs"),
    Row("eval q.onnx --data labels7.npz", "has labels up to 6, but the model has 3 outputs"),
    Row("eval tiny.pt2 --data labels7.npz --plan plan.json", "has labels up to 6"),
    Row("analyze tiny.pt2 --data labels7.npz --out s.json", "has labels up to 6"),
    Row("search tiny.pt2 --data labels7.npz --sens sens.json --budget bits:4 --episodes 1 --out s.json",
        "has labels up to 6"),
    Row("export tiny.pt2 --plan plan.json --data labels7.npz --eval test --out e.onnx", "has labels up to 6"),
    Row("eval tiny.pt2 --data labels7.npz --plan plan.json --finetune-epochs 1", "has labels up to 6"),
    Row("demo --model tiny.pt2 --data labels7.npz --out d --quick --no-compile", "has labels up to 6"),
    # the model's data: an .onnx not exported from a zoo model needs --data too
    Row("eval q.onnx", "q.onnx is not a zoo model: give the data"),
    Row("eval tiny.pt2", "tiny.pt2 is not a zoo model: give the data to evaluate it on with --data"),
    Row("export tiny.pt2 --plan plan.json --out e.onnx", "give the data to calibrate it on with --data"),
    Row("demo --model tiny.pt2 --out d", "give the data to run the demo on with --data"),
    # plans and sensitivity files of another model (same file name, other weights: the sha256 differs)
    Row("eval other/tiny.pt2 --data data.npz --plan plan.json", "not for other/tiny.pt2 (sha256"),
    Row("plan cw-greedy zoo:lenet-fmnist --sens sens.json --budget bits:4 --out p.json", "not for zoo:lenet-fmnist"),
    Row("eval zoo:lenet-fmnist --plan plan.json", "not for zoo:lenet-fmnist"),
    # commands and options that contradict each other
    Row("export tiny.pt2 --out e.onnx", "give either --plan PLAN or --fp32"),
    Row("export tiny.pt2 --fp32 --plan plan.json --out e.onnx", "give either --plan PLAN or --fp32"),
    Row("export q.onnx --plan plan.json --data data.npz --out e.onnx", "takes a PyTorch model"),
    Row("export q.onnx --fp32 --out e.onnx", "takes a PyTorch model"),
    Row("export tiny.pt2 --plan plan.json --data data.npz --opset 12 --out e.onnx", "--opset 12 is not supported"),
    Row("export tiny.pt2 --fp32 --out old.onnx/x.onnx", "is a file, not a directory"),
    Row("export tiny.pt2 --fp32 --out tiny.pt2", "is also an input (MODEL tiny.pt2)"),
    Row("plan uniform tiny.pt2 --w-bits 5 --out p.json", "--w-bits 5: weight bits must come from"),
    Row("plan uniform tiny.pt2 --a-bits mixed --out p.json", "one activation bit-width"),
    Row("plan uniform tiny.pt2 --budget latency:0.5 --out p.json", "needs a latency table"),
    Row("plan uniform tiny.pt2 --budget latency:0.5 --latency-table table.json --out p.json", "table.json"),
    Row("plan uniform tiny.pt2 --budget latency:0.5 --latency-table missing.json --out p.json", "not found"),
    Row("plan cw-greedy tiny.pt2 --sens sens.json --out p.json", "needs --budget"),
    Row("analyze tiny.pt2 --data data.npz --scheme nope --out s.json", "unknown probing scheme"),
    Row("analyze tiny.pt2 --data data.npz --scheme interleave:0 --out s.json", "K >= 1"),
    Row("analyze tiny.pt2 --data data.npz --out s.json --plot s.json", "are the same file"),
    Row("analyze tiny.pt2 --data data.npz --out s.json --plot data.npz", "is also an input (--data data.npz)"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget latency:0.9 --out s.json", "needs a latency table"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --rpc 127.0.0.1:9 --key k --out s.json",
        "--rpc needs --target"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --rpc nohost --key k --out s.json",
        "expected HOST:PORT"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --target nosuch --out s.json",
        "unknown target"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --out s.json --log sens.json",
        "is also an input (--sens sens.json)"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --out s.json --checkpoint s.json",
        "are the same file"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --out s.jsonl", "are the same file"),
    Row("search tiny.pt2 --data data.npz --sens sens.json --budget bits:4 --out s.json --latency-table table.json",
        "table.json"),
    Row("latency-table tiny.pt2 --data data.npz --target nosuch --out t.json", "unknown target"),
    Row("latency-table tiny.pt2 --data data.npz --check uniform:5 --out t.json", "weight bits must come from"),
    Row("latency-table tiny.pt2 --data data.npz --check uniform:x --out t.json", "use uniform:W"),
    Row("latency-table tiny.pt2 --data data.npz --rpc nohost --key k --out t.json", "expected HOST:PORT"),
    Row("compile q.onnx --target nosuch --out a.so", "unknown target"),
    Row("compile q.onnx --out a.txt", "must end in .so"),
    Row("bench art.so --device cuda", "compiled for cpu"),
    Row("bench q.onnx --device cuda", "on the CPU"),
    Row("bench art.so --rpc nohost --key k", "expected HOST:PORT"),
    Row("demo --model tiny.pt2 --data data.npz --out d --budget size:2", "fraction of fp32"),
]


def _all_rows():
    files = {"tiny.pt2", "copy.pt2", "data.npz", "sens.json", "plan.json", "q.onnx", "art.so", "x.npy"}
    return generic_rows(files) + ROWS


ALL_ROWS = _all_rows()


# ===================================================================================== the tests
def test_every_command_has_a_base_line():
    assert set(COMMANDS) == set(BASE), (f"commands without a BASE line (add one: they then get the generic "
                                        f"bad-input rows): {sorted(set(COMMANDS) - set(BASE))}; BASE lines of "
                                        f"no command: {sorted(set(BASE) - set(COMMANDS))}")


def _invoke(src: Path, tmp_path: Path, monkeypatch, argv: list[str]):
    work = tmp_path / "w"
    shutil.copytree(src, work)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    r = CliRunner().invoke(cli, argv)
    return r, before, _snapshot(work)


@pytest.mark.parametrize("row", ALL_ROWS, ids=lambda r: r.id)
def test_bad_input(row, src, tmp_path, monkeypatch):
    r, before, after = _invoke(src, tmp_path, monkeypatch, _argv(row.cmd))
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        pytest.fail(f"{row.cmd}: raised {type(r.exception).__name__} instead of a one-line error:\n{tb}")
    assert r.exit_code == row.code, f"{row.cmd}: exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, f"{row.cmd}: not one line: {err!r}"
    assert row.msg in err, f"{row.cmd}: expected {row.msg!r} in {err!r}"
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{row.cmd}: files created, modified or removed: {changed}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory(src, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(src, work)
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    monkeypatch.chdir(work)
    try:
        r = CliRunner().invoke(cli, ["plan", "uniform", "tiny.pt2", "--out", "ro/p.json"])
    finally:
        (work / "ro").chmod(0o755)
    assert r.exit_code == 2 and "cannot write in ro" in r.stderr, r.stderr
    assert not (work / "ro" / "p.json").exists()


@pytest.mark.parametrize("name", CHEAP_BASES)
def test_bases_are_valid(name, src, tmp_path, monkeypatch):
    """The cheap BASE lines run (so the rows above fail for the reason they name, not a broken base),
    and overwrite their existing output (old.json) atomically: no temporary file stays behind."""
    r, before, after = _invoke(src, tmp_path, monkeypatch, _argv(BASE[name]))
    assert r.exit_code == 0, r.output
    assert "error" not in r.stderr
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == (["old.json"] if "--out" in BASE[name] else []), changed


def test_same_model_under_another_name_is_accepted(src, tmp_path, monkeypatch):
    """copy.pt2 is tiny.pt2 renamed (same sha256): its plan applies; other/tiny.pt2 has tiny.pt2's name
    but other weights: refused (a row above)."""
    r, _, _ = _invoke(src, tmp_path, monkeypatch, ["eval", "copy.pt2", "--data", "data.npz", "--plan", "plan.json",
                                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 10


def test_plans_and_sensitivities_record_the_model(src):
    plan = json.loads((src / "plan.json").read_text())
    sens = json.loads((src / "sens.json").read_text())
    for d in (plan, sens):
        assert d["model"].endswith("tiny.pt2") and d["model_sha256"] == _sha(src / "tiny.pt2")
    assert sens["split"] == "train"


def _subprocess(src: Path, tmp_path: Path, *args):
    work = tmp_path / "w"
    shutil.copytree(src, work)
    return subprocess.run([sys.executable, "-m", "cwhawq.cli", *args], capture_output=True, text=True,
                          cwd=work, env=cli_env(), timeout=300)


def test_real_process_no_traceback_no_future_warning(src, tmp_path):
    """Through a real ``python -m cwhawq.cli`` process: stderr holds no torch FutureWarning (LeafSpec) on
    a command loading a .pt2, and a bad input is one line."""
    r = _subprocess(src, tmp_path, "analyze", "tiny.pt2", "--data", "data.npz", "--out", "s.json",
                    "--max-probes", "8")
    assert r.returncode == 0, r.stderr
    assert "FutureWarning" not in r.stderr and "Warning" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "cwhawq.cli", "run", "art.so", "--input", "empty.npy", "--out",
                        "y.npy"], capture_output=True, text=True, cwd=tmp_path / "w", env=cli_env(), timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "Aborted" not in r.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_command(name):
    r = CliRunner().invoke(cli, name.split() + ["--help"])
    assert r.exit_code == 0 and r.stdout.startswith("Usage:"), r.output


def test_a_group_without_command_shows_its_help():
    for argv in ([], ["plan"]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 2 and "Usage:" in r.output and "Commands:" in r.output, r.output
