"""Zoo architectures. Each carries its own input normalisation (data arrives in [0, 1])."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
WEIGHTS_DIR = Path(__file__).parent / "weights"


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor([mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([std]).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(out + sc)


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): 6n+2 layers, 16/32/64 channels, for 1x28x28 inputs."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.norm = Normalize(FMNIST_MEAN, FMNIST_STD)
        self.conv1 = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.norm(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class LeNet(nn.Module):
    """A small LeNet-style conv net (conv-bn-relu-pool x2, two fully connected layers)."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        self.norm = Normalize(FMNIST_MEAN, FMNIST_STD)
        self.conv1 = nn.Conv2d(in_ch, 16, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.norm(x)))), 2)   # 16x14x14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)              # 32x5x5
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


# zoo name -> (constructor, weights file, input shape (C,H,W), dataset it was trained on)
ZOO = {
    "resnet20-fmnist": (lambda: ResNetCifar(20), "resnet20-fmnist.pt", (1, 28, 28), "fashion-mnist"),
    "lenet-fmnist": (LeNet, "lenet-fmnist.pt", (1, 28, 28), "fashion-mnist"),
}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / ZOO[name][1]


def build(name: str) -> nn.Module:
    """Untrained architecture of a zoo model."""
    return ZOO[name][0]()
