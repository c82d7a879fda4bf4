"""`cwhawq demo` end to end on a tiny model (issue 9): every stage runs, the report holds the table with
numbers measured in the run (the CW-HAWQ accuracy is what `cwhawq eval --plan` gives), the plots and the
commands, and each command it lists reproduces its step."""
import re
import shlex

import pytest
import torch
from click.testing import CliRunner

from cwhawq import api
from cwhawq.cli import cli
from cwhawq.models import save_pt2

from conftest import TinyNet, write_npz

SHAPE = (1, 8, 8)
ROWS = ("fp32", "uniform W8A8", "uniform W4A8", "hawq-v3", "cw-greedy", "CW-HAWQ (DDPG)")


@pytest.mark.timeout(600)
def test_demo_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = str(tmp_path / "tiny.pt2")
    save_pt2(TinyNet(cin=1, c=8, hw=8, classes=3).eval(), SHAPE, model)
    data = str(write_npz(tmp_path / "data.npz", n=240, shape=SHAPE, classes=3))
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--model", model, "--data", data, "--episodes", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for stage in ("fp32 accuracy", "Hessian analysis", "DDPG search", "export to ONNX", "compile", "measure latency"):
        assert stage in r.output, stage

    report = (out / "report.md").read_text()
    table = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ROWS:
            table[cells[0]] = cells
    assert set(table) == set(ROWS), report
    for name, cells in table.items():
        assert re.fullmatch(r"\d+\.\d\d%", cells[1]), cells
        assert float(cells[6]) > 0 and cells[7].endswith("x"), cells   # a full run compiles and times all
    assert table["fp32"][7] == "1.00x"
    for png in ("pareto.png", "bits.png", "sens.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report

    # the CW-HAWQ accuracy in the report is the one `cwhawq eval --plan` measures on the same split
    rep = api.evaluate(model, data, split="test", plan=str(out / "plans" / "cw-hawq.json"))
    assert table["CW-HAWQ (DDPG)"][1] == f"{rep['accuracy'] * 100:.2f}%"

    # the listed commands reproduce their steps: run the plan and compile ones here
    cmds = re.findall(r"^- ([^:]+): `cwhawq (.+)`$", report, flags=re.M)
    kinds = {c.split()[0] for _, c in cmds}
    assert len([c for _, c in cmds if c.startswith("eval") and "--plan" in c]) == len(ROWS) - 1
    assert {"eval", "analyze", "plan", "search", "export", "compile", "bench"} <= kinds, kinds
    for what, cmd in cmds:
        argv = shlex.split(cmd)
        if argv[0] == "plan" and argv[1] == "hawq-v3":
            argv[argv.index("--out") + 1] = str(tmp_path / "again.json")
            res = CliRunner().invoke(cli, argv)
            assert res.exit_code == 0, (cmd, res.output)
            assert (tmp_path / "again.json").read_text() == (out / "plans" / "hawq-v3.json").read_text()
        if argv[0] == "export" and "--fp32" in argv:
            argv[argv.index("--out") + 1] = str(tmp_path / "fp32.onnx")
            res = CliRunner().invoke(cli, argv)
            assert res.exit_code == 0, (cmd, res.output)
