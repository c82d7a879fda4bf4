"""The reward of a plan: simulated-quantized accuracy (or loss) on a fixed validation subset, relative
to fp32 on the same samples.

- The plan is installed with the shared :class:`cwhawq.quantize.Quantizer` (activation ranges
  calibrated once, exactly as ``cwhawq eval --plan`` does: :func:`cwhawq.simulate.calibration_set`,
  4 x 128 train samples, seed 1; per-bit weights cached, so a plan installs in a few ms).
- It is evaluated on a fixed subset of the ``val`` split (default the first 1000 samples of its
  seeded permutation: ``data.load(spec, 'val').subset(1000)``), in batches of 250.
- ``reward='acc'`` (default, as HAQ): R = 10 x (acc_q - acc_fp32), i.e. 0.1 per percentage point.
  ``reward='loss'``: R = -(CE_q - CE_fp32), the mean cross-entropy on the same samples.
  Both accuracy and loss are always measured and logged; the best plan is the one of highest reward,
  ties broken by lower loss, then by the earlier episode.
- Optional ``finetune_steps`` > 0: a very short quantization-aware fine-tune (that many SGD steps of
  batch 128 on the train split, fixed seed) before evaluating; the float weights are restored after.
- Identical plans (the same bits everywhere) are evaluated once and cached.
- Under torchrun (:mod:`cwhawq.dist`) the evaluator holds this rank's contiguous share of the subset
  and the correct counts and loss sums are summed across ranks, so every rank gets the same accuracy,
  loss and reward as one process on the whole subset.

For speed the activation fake-quantizers are swapped, for evaluation only, for an in-place version
computing bit-for-bit the same values (divide, round half to even, clamp to the channel's codes,
multiply).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..data import Dataset
from ..graph import QModel
from ..plan import Plan
from ..quantize import ActQuant, Quantizer, finetune



@dataclass(frozen=True)
class Reward:
    """A reward (``reward=NAME``): ``fn(accuracy, loss, fp32_accuracy, fp32_loss) -> R`` on the validation subset."""

    name: str
    fn: Callable[[float, float, float, float], float]


REWARDS: dict[str, Reward] = {}


def register_reward(name: str):
    """Decorator: register ``fn(accuracy, loss, fp32_accuracy, fp32_loss) -> reward`` as ``name``."""
    def deco(fn):
        REWARDS[name] = Reward(name, fn)
        return fn
    return deco


@register_reward("acc")
def _accuracy_reward(acc: float, loss: float, acc0: float, loss0: float) -> float:
    return 10.0 * (acc - acc0)


@register_reward("loss")
def _loss_reward(acc: float, loss: float, acc0: float, loss0: float) -> float:
    return -(loss - loss0)


class _FastActQuant:
    """ActQuant's inference path with in-place ops (same result, fewer temporaries)."""

    __slots__ = ("s", "lo", "hi")

    def __init__(self, aq: ActQuant):
        self.s, self.lo, self.hi = aq.s, aq.lo, aq.hi

    def __call__(self, x):
        v = torch.div(x, self.s)
        torch.round(v, out=v)
        v.clamp_(self.lo, self.hi)
        return v.mul_(self.s)


def plan_key(plan: Plan) -> str:
    h = hashlib.sha1()
    for lp in plan.layers:
        h.update(lp.name.encode())
        h.update(np.asarray(lp.w_bits, np.int8).tobytes())
        h.update(b"|")
        h.update(np.asarray(lp.a_bits, np.int8).tobytes())
    return h.hexdigest()


class PlanEvaluator:
    """Callable plan -> {accuracy, loss, reward, seconds}; holds the fp32 reference."""

    def __init__(self, qm: QModel, quantizer: Quantizer, val: Dataset, reward: str = "acc",
                 batch_size: int = 250, finetune_steps: int = 0, train: Dataset | None = None,
                 finetune_lr: float = 1e-3, w_bits=(2, 4, 8)):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {tuple(REWARDS)}, got {reward!r}")
        if finetune_steps and train is None:
            raise ValueError("finetune_steps needs the train split")
        self.qm, self.quantizer, self.val = qm, quantizer, val
        self.reward_kind, self.batch_size = reward, int(batch_size)
        self.finetune_steps, self.train, self.finetune_lr = int(finetune_steps), train, finetune_lr
        self._x = torch.from_numpy(val.x)
        self._y = torch.from_numpy(val.y.astype(np.int64))
        self._cache: dict[str, tuple[float, float]] = {}
        for info in qm.layer_infos:          # fill the per-bit weight cache once
            for b in w_bits:
                quantizer.weight_for(info.name, int(b))
        if self.finetune_steps:
            self._float = {n: (q.weight.detach().clone(), None if q.bias is None else q.bias.detach().clone())
                           for n, q in qm.qlayers.items()}
        qm.reset()
        self.fp32_accuracy, self.fp32_loss = self._measure()

    @torch.no_grad()
    def _measure(self) -> tuple[float, float]:
        correct, loss_sum = 0, 0.0
        for i in range(0, len(self._y), self.batch_size):
            out = self.qm(self._x[i:i + self.batch_size])
            y = self._y[i:i + self.batch_size]
            correct += int((out.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(out.double(), y, reduction="sum"))
        # under torchrun every rank holds its share of the subset: the sums are the subset's
        correct, loss_sum, n = (float(v) for v in dist.all_sum([correct, loss_sum, len(self._y)]))
        n = max(1.0, n)
        loss = loss_sum / n
        return correct / n, (loss if np.isfinite(loss) else 1e3)

    def reward_of(self, accuracy: float, loss: float) -> float:
        return REWARDS[self.reward_kind].fn(accuracy, loss, self.fp32_accuracy, self.fp32_loss)

    def __call__(self, plan: Plan) -> dict:
        key = plan_key(plan)
        t0 = time.perf_counter()
        cached = key in self._cache
        t1 = t0
        if cached:
            acc, loss = self._cache[key]
        else:
            sim = self.quantizer.apply(plan)
            if self.finetune_steps:
                finetune(sim, self.train, epochs=1, lr=self.finetune_lr, max_steps=self.finetune_steps, seed=0)
            for q in self.qm.qlayers.values():
                q.act = _FastActQuant(q.act)
            t1 = time.perf_counter()
            try:
                acc, loss = self._measure()
            finally:
                self.qm.reset()
                if self.finetune_steps:
                    self._restore()
            self._cache[key] = (acc, loss)
        t2 = time.perf_counter()
        return {"accuracy": acc, "loss": loss, "reward": self.reward_of(acc, loss), "cached": cached,
                "t_quantize": t1 - t0, "t_evaluate": t2 - t1}

    def _restore(self) -> None:
        with torch.no_grad():
            for n, q in self.qm.qlayers.items():
                w, b = self._float[n]
                q.weight.copy_(w)
                if b is not None:
                    q.bias.copy_(b)
