"""Standard ImageNet-size architectures for latency benchmarks (random seeded weights and BatchNorm
statistics; written here because PyPI's torchvision does not import beside this project's torch).

``resnet18``: He et al. 2016 (torchvision's layout: 7x7/2 stem, max pool, 4 stages of 2 basic blocks,
1x1 projection shortcuts, global average pool, fc). ``mobilenet_v2``: Sandler et al. 2018 (width 1.0,
inverted residuals with ReLU6, 1280-channel head). Both take 1x3x224x224 and give 1000 logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, c in enumerate((64, 128, 256, 512)):
            layers += [Basic(cin, c, 1 if i == 0 else 2), Basic(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _cbr(cin, cout, k, stride, groups=1, act=True):
    mods = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        mods.append(nn.ReLU6())
    return nn.Sequential(*mods)


class Inverted(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        mods = [] if expand == 1 else [_cbr(cin, hidden, 1, 1)]
        mods += [_cbr(hidden, hidden, 3, stride, groups=hidden), _cbr(hidden, cout, 1, 1, act=False)]
        self.body = nn.Sequential(*mods)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, classes=1000):
        super().__init__()
        mods, cin = [_cbr(3, 32, 3, 2)], 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                mods.append(Inverted(cin, c, s if i == 0 else 1, t))
                cin = c
        mods.append(_cbr(cin, 1280, 1, 1))
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


ARCHS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def build(name: str, seed: int = 0) -> nn.Module:
    """The architecture with seeded random weights and random (but sane) BatchNorm statistics."""
    torch.manual_seed(seed)
    m = ARCHS[name]()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.0)
                mod.bias.uniform_(-0.1, 0.1)
    return m.eval()


def export_pt2(name: str, path, seed: int = 0) -> None:
    m = build(name, seed)
    ep = torch.export.export(m, (torch.rand(1, 3, 224, 224),))
    torch.export.save(ep, str(path))
