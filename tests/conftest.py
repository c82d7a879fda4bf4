import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(min(2, os.cpu_count() or 1))

FMNIST = Path(os.environ.get("CWHAWQ_DATA", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (dataset-fashion-mnist)")


class TinyNet(nn.Module):
    """A few hundred parameters: conv (+BN) -> relu -> depthwise conv -> relu -> linear."""

    def __init__(self, cin=2, c=3, hw=5, classes=4, depthwise=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c) if depthwise else None
        self.fc = nn.Linear(c * hw * hw, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.dw is not None:
            x = F.relu(self.dw(x)) + x
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    m = TinyNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(8, 2, 5, 5)
    y = torch.randint(0, 4, (8,))
    return m, x, y


def write_npz(path, n=60, shape=(1, 8, 8), classes=3, seed=0, layout="nhw"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 256, (n, *shape[1:]), dtype=np.uint8)
    if layout == "nhwc":
        x = x[..., None]
    elif layout == "nchw":
        x = x[:, None]
    np.savez(path, x=x, y=y)
    return path


REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra) -> dict:
    """Environment for a ``python -m cwhawq.cli`` subprocess that runs this checkout's code (not an
    installed copy): PYTHONPATH starts with the repository root."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture(autouse=True)
def _few_rounding_steps(monkeypatch):
    """Learned rounding is the default of eval --plan, export, search and demo; tests that are not about
    it get 8 steps per block instead of the default (tests/test_rounding.py sets its own)."""
    from cwhawq import rounding

    monkeypatch.setattr(rounding, "DEFAULT_ITERS", 8)
