"""Train a zoo model from scratch, seeded, and save its weights (state_dict, fp32).

    python -m cwhawq.zoo.train resnet20-fmnist --epochs 20 --seed 0
    python -m cwhawq.zoo.train lenet-fmnist --epochs 10 --seed 0
    python -m cwhawq.zoo.train vit-fmnist --opt adamw --epochs 20 --seed 0

``--device cuda`` trains on a GPU when one is there (same script and seed; cuDNN kernels make the
result differ slightly from a CPU run).

SGD (momentum 0.9, nesterov, weight decay 5e-4, learning rate 0.1) or, with ``--opt adamw``, AdamW
(weight decay 0.05, learning rate 1e-3; betas 0.9, 0.999), batch 128, cosine learning rate with a
one-epoch linear warm-up, random-crop (pad 2) + horizontal-flip augmentation, on the train split
(train minus the validation hold-out). Biases, norm parameters and what a model lists in its
``no_weight_decay()`` (the ViT's class token and positions) get no weight decay. Prints val accuracy
per epoch and test accuracy at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as D
from .nets import ZOO, build, weights_path


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    # gather crops with unfold-free indexing
    rows = (dy.view(n, 1) + torch.arange(h, device=dev).view(1, h))            # n,h
    cols = (dx.view(n, 1) + torch.arange(w, device=dev).view(1, w))            # n,w
    idx_n = torch.arange(n, device=dev).view(n, 1, 1)
    out = xp[idx_n, 0, rows.view(n, h, 1), cols.view(n, 1, w)].unsqueeze(1)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model, ds: D.Dataset, device="cpu", batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for xb, yb in ds.batches(batch_size):
        correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
    return correct / len(ds)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cwhawq.zoo.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(ZOO))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 for sgd, 1e-3 for adamw)")
    ap.add_argument("--wd", type=float, default=None, help="weight decay (default: 5e-4 for sgd, 0.05 for adamw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default=None, help="weights file (default: the zoo's weights path)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init", default=None, help="start from these weights (a state_dict file) instead of a "
                                                 "random initialisation, e.g. a second, lower-learning-rate stage")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--augment", choices=("crop-flip", "none"), default="crop-flip",
                    help="training-batch augmentation: random crop (pad 2) + horizontal flip, or none "
                         "(small models that underfit, e.g. vit-fmnist)")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 if args.opt == "sgd" else 1e-3
    if args.wd is None:
        args.wd = 5e-4 if args.opt == "sgd" else 0.05

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)
    train, val, test = (D.load(args.data, s) for s in ("train", "val", "test"))
    xtr, ytr = torch.from_numpy(train.x).to(dev), torch.from_numpy(train.y).to(dev)
    model = build(args.model)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    model = model.to(dev)
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n_ in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0}]
    if args.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warm = steps_per_epoch

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    step = 0
    history = []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            idx = idx.to(dev)
            xb = augment(xtr[idx], gen) if args.augment == "crop-flip" else xtr[idx]
            yb = ytr[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        va = accuracy(model, val, dev)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "val_acc": va,
                        "seconds": time.time() - t0})
        print(json.dumps(history[-1]), flush=True)
    te = accuracy(model, test, dev)
    out = args.out or str(weights_path(args.model))
    tmp = out + ".tmp"
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    print(json.dumps({"model": args.model, "test_acc": te, "val_acc": history[-1]["val_acc"],
                      "epochs": args.epochs, "seed": args.seed, "opt": args.opt, "lr": args.lr, "augment": args.augment,
                      "wd": args.wd, "init": args.init, "weights": out}), flush=True)


if __name__ == "__main__":
    main()
