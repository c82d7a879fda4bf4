"""Models the tool cannot handle yet fail cleanly: one line naming the operator, exit code 2, nothing
written. Built here: a tiny vision transformer (patch conv, nn.MultiheadAttention called with
need_weights=False, LayerNorm, GELU MLP; ~500 parameters) and a conv-only attention net, both with a
scaled_dot_product_attention, which has no second derivative in PyTorch (the Hessian needs one), so
`analyze` refuses them. Everything that needs no Hessian (plans, simulation, export) works on them, and
where the input is valid the result is right (tests/test_transformer.py has the transformers that can
be analyzed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import write_npz

from cwhawq.cli import cli
from cwhawq.models import save_pt2

REPO = Path(__file__).resolve().parents[1]
VIT_ERROR = "aten::_scaled_dot_product_flash_attention_for_cpu_backward has no derivative"


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, hw=8, patch=4, d=6, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(1, d, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (hw // patch) ** 2, d) * 0.02)
        self.blocks = nn.Sequential(_Block(d, 2))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class ConvAttention(nn.Module):
    """Self-attention over positions with 1x1-conv projections: every layer sees [N, C, H, W]."""

    def __init__(self, c=4, heads=2, classes=3):
        super().__init__()
        self.stem, self.qkv, self.proj = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        self.head, self.heads = nn.Linear(c, classes), heads

    def forward(self, x):
        x = F.relu(self.stem(x))
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.head((x + self.proj(a.transpose(-1, -2).reshape(n, c, h, w))).mean((2, 3)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("unsupported")
    torch.manual_seed(0)
    vit = TinyViT().eval()
    assert 300 <= sum(p.numel() for p in vit.parameters()) <= 1000
    save_pt2(vit, (1, 8, 8), d / "vit.pt2")
    save_pt2(ConvAttention().eval(), (1, 8, 8), d / "cattn.pt2")
    write_npz(d / "data.npz", n=60, shape=(1, 8, 8), classes=3)
    r = CliRunner().invoke(cli, ["plan", "uniform", str(d / "cattn.pt2"), "--w-bits", "4", "--out",
                                 str(d / "cattn_plan.json")])
    assert r.exit_code == 0, r.output
    return d


def _one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit)  # handled, not a traceback
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _vit_commands(d):
    vit, data = str(d / "vit.pt2"), str(d / "data.npz")
    return {
        "analyze": ["analyze", vit, "--data", data, "--out", str(d / "o_sens.json"), "--max-probes", "2"],
    }


def test_sdpa_transformer_analyze_refused_in_one_line(files):
    before = set(files.iterdir())
    r = CliRunner().invoke(cli, _vit_commands(files)["analyze"])
    _one_line_error(r, VIT_ERROR, "scaled_dot_product_attention", "cannot be analyzed yet")
    assert set(files.iterdir()) == before  # nothing written


def test_sdpa_transformer_plans_and_simulates(files):
    """No Hessian needed: a uniform plan of its Linears on [tokens, batch, E] is made and simulated."""
    vit, data = str(files / "vit.pt2"), str(files / "data.npz")
    r = CliRunner().invoke(cli, ["plan", "uniform", vit, "--w-bits", "4", "--out", str(files / "vit_u4.json")])
    assert r.exit_code == 0, r.output
    names = [lp["name"] for lp in json.loads((files / "vit_u4.json").read_text())["layers"]]
    assert names == ["patch", "blocks.0.attn.in_proj", "blocks.0.attn.out_proj", "blocks.0.mlp.0",
                     "blocks.0.mlp.2", "head"]
    r = CliRunner().invoke(cli, ["eval", vit, "--data", data, "--plan", str(files / "vit_u4.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert 0.0 <= json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] <= 1.0


def test_transformer_float_eval_still_runs(files):
    """Evaluating the float model needs none of the quantization machinery: a valid result."""
    r = CliRunner().invoke(cli, ["eval", str(files / "vit.pt2"), "--data", str(files / "data.npz"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["n"] > 0


def test_real_cli_prints_one_line(files):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "cwhawq.cli", *_vit_commands(files)["analyze"]], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and VIT_ERROR in errors[0] and r.stderr.strip().endswith(errors[0]), r.stderr


def test_no_second_derivative_named_in_analyze(files):
    """The conv-only attention net quantizes and evaluates, but its Hessian cannot be computed."""
    cattn, data = str(files / "cattn.pt2"), str(files / "data.npz")
    r = CliRunner().invoke(cli, ["analyze", cattn, "--data", data, "--out", str(files / "o_cattn_sens.json"),
                                 "--max-probes", "2"])
    _one_line_error(r, "aten::_scaled_dot_product_flash_attention_for_cpu_backward has no derivative",
                    "scaled_dot_product_attention")
    assert not (files / "o_cattn_sens.json").exists()
    r = CliRunner().invoke(cli, ["eval", cattn, "--data", data, "--plan", str(files / "cattn_plan.json"), "--json"])
    assert r.exit_code == 0, r.output


def test_transformer_fp32_export_and_compile(files):
    """Valid input for a transformer: `export --fp32` (no quantization) matches the model, and
    `cwhawq compile` of that ONNX matches onnxruntime."""
    pytest.importorskip("tvm")
    ort = pytest.importorskip("onnxruntime")
    from cwhawq.backends.tvm import load_artifact

    p = files / "vit_fp32.onnx"
    r = CliRunner().invoke(cli, ["export", str(files / "vit.pt2"), "--fp32", "--out", str(p)])
    assert r.exit_code == 0, (r.output, r.exception)
    r = CliRunner().invoke(cli, ["compile", str(p), "--target", "llvm", "--out", str(files / "vit_fp32.so")])
    assert r.exit_code == 0, (r.output, r.exception)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    art = load_artifact(files / "vit_fp32.so")
    model = torch.export.load(str(files / "vit.pt2")).module()
    for scale in (1.0, 100.0):
        x = (np.random.default_rng(3).normal(size=(3, 1, 8, 8)) * scale).astype(np.float32)
        (ref,) = sess.run(None, {name: x})
        with torch.no_grad():
            torch_y = model(torch.from_numpy(x)).numpy()
        assert float(np.abs(ref - torch_y).max() / np.abs(torch_y).max()) <= 1e-4
        (y,) = art.run({name: x})
        assert float(np.abs(y - ref).max() / np.abs(ref).max()) <= 1e-3
