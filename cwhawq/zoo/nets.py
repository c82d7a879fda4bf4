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


class Attention(nn.Module):
    """Multi-head self-attention written out, so its Linears are layers of their own.

    The query/key/value projection is one packed ``nn.Linear(width, 3 * width)`` (as in
    ``nn.MultiheadAttention``'s ``in_proj_weight``): the three projections read the same tokens, so
    one layer means one activation quantizer and one MatMul for them, and a ``.pt2`` user model with
    ``nn.MultiheadAttention`` is handled the same way (one layer with 3 * width output channels).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, e = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                  # b, heads, t, e/heads
        att = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, e))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021) for 1x28x28 inputs: 4x4 patches embedded
    by a stride-4 conv (49 tokens), a class token, learned positions, pre-LN blocks, a final
    LayerNorm and a linear head on the class token."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1, image: int = 28, patch: int = 4,
                 width: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128):
        super().__init__()
        self.norm = Normalize(FMNIST_MEAN, FMNIST_STD)
        self.patch = nn.Conv2d(in_ch, width, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.blocks = nn.Sequential(*(Block(width, heads, mlp) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the training script keeps out of weight decay (besides biases and norms)."""
        return {"cls", "pos"}

    def forward(self, x):
        x = self.patch(self.norm(x)).flatten(2).transpose(1, 2)          # b, 49, width
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


# zoo name -> (constructor, weights file, input shape (C,H,W), dataset it was trained on)
ZOO = {
    "resnet20-fmnist": (lambda: ResNetCifar(20), "resnet20-fmnist.pt", (1, 28, 28), "fashion-mnist"),
    "lenet-fmnist": (LeNet, "lenet-fmnist.pt", (1, 28, 28), "fashion-mnist"),
    "vit-fmnist": (ViT, "vit-fmnist.pt", (1, 28, 28), "fashion-mnist"),
}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / ZOO[name][1]


def build(name: str) -> nn.Module:
    """Untrained architecture of a zoo model."""
    return ZOO[name][0]()
