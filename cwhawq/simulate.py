"""The shared simulation of a plan: the calibration set, a plan checked against its model and
simulated (optionally fine-tuned, or with learned weight rounding), the rounding options, and
bit-set parsing.

Every stage that simulates a plan (``cwhawq eval --plan``, the search's reward, the exporter, the
latency probes) goes through these functions, so that they all calibrate on the same samples. They
sit below the stages that use them (:mod:`cwhawq.search`, :mod:`cwhawq.export`,
:mod:`cwhawq.latency`, :mod:`cwhawq.api`); docs/architecture.md has the layer map.
"""
from __future__ import annotations

from . import data as D, rounding as R
from .checks import check_labels, check_plan_model, model_classes, require_data
from .errors import ModelError, PlanError
from .graph import qmodel_from_loaded
from .plan import load_plan
from .quantize import finetune, quantize_model
from .quantizers import BIT_CHOICES


def calibration_set(data="fashion-mnist", data_dir: str | None = None, calib_batches: int = 4) -> "D.Dataset":
    """The samples that calibrate activation ranges whenever a plan is simulated (eval --plan, export):
    ``calib_batches`` x 128 samples of the train split (seeded subset, seed 1). A Dataset is used as is."""
    if isinstance(data, D.Dataset):
        return data
    return D.load(data, "train", data_dir).subset(calib_batches * 128, seed=1)


def rounding_config(rounding: str | None = None, iters: int | None = None, seed: int = 0,
                    finetune_epochs: int = 0):
    """The weight rounding of a simulated plan: a :class:`cwhawq.rounding.RoundingConfig` (learned) or
    None (nearest). ``rounding`` None: learned, except with a fine-tune (QAT trains for nearest
    rounding, so its codes are the nearest ones of the fine-tuned weights); ``iters`` None: the
    default number of steps per block."""
    if rounding is None:
        rounding = "nearest" if finetune_epochs else "learned"
    if isinstance(rounding, R.RoundingConfig):
        cfg = rounding
    else:
        if R.check_rounding(rounding) == "nearest":
            return None
        cfg = R.RoundingConfig(seed=int(seed), iters=int(iters) if iters is not None else R.DEFAULT_ITERS)
    if finetune_epochs:
        raise R.RoundingError("learned rounding and a fine-tune do not combine: the fine-tune's codes are the "
                              "nearest ones of its weights (use --rounding nearest, or no fine-tune)")
    return cfg.check()


def rounding_summary(sim) -> dict:
    """What a report says about the weight rounding of a simulated plan."""
    r = getattr(sim, "rounding", None)
    if not r:
        return {"method": "nearest"}
    return {"method": "learned", "seconds": r["seconds"], "iters": r["iters"], "seed": r["seed"], "mode": r["mode"],
            "inputs": r["inputs"], "samples": r["samples"], "cached": r.get("cached", False)}


def simulate_plan(loaded, plan, data=None, data_dir: str | None = None, calib_batches: int = 4,
                  act_scale: str = "pow2", finetune_epochs: int = 0, rounding=None, progress: bool = False,
                  log=None):
    """(QModel, Plan, QuantizedModel): ``plan`` (path or Plan) checked against a LoadedModel (the model it
    was made for, its layers) and simulated with the shared calibration (:func:`calibration_set`; ``data``
    None: a zoo model's own dataset), optionally fine-tuned (QAT). ``rounding``: a
    :class:`cwhawq.rounding.RoundingConfig` (learned rounding on the same calibration samples), None
    (nearest), or a string for :func:`rounding_config`."""
    p = load_plan(plan) if not hasattr(plan, "layers") else plan
    check_plan_model(p, loaded, f"plan {plan}" if not hasattr(plan, "layers") else "the plan")
    data = require_data(loaded, data, "calibrate it on")
    qm = qmodel_from_loaded(loaded)
    p.validate(qm.layer_infos)
    if finetune_epochs and isinstance(data, D.Dataset):
        raise ModelError("fine-tuning needs a dataset spec (its train split), not a Dataset object")
    train = D.load(data, "train", data_dir) if finetune_epochs else None
    if train is not None:
        check_labels(train, model_classes(loaded))
    if isinstance(rounding, str):
        rounding = rounding_config(rounding, finetune_epochs=finetune_epochs)
    elif rounding is not None and finetune_epochs:
        rounding_config(rounding, finetune_epochs=finetune_epochs)   # refuses the combination
    calib = calibration_set(data, data_dir, calib_batches)
    sim = quantize_model(qm, p, calib, act_scale=act_scale)
    if train is not None:
        finetune(sim, train, epochs=finetune_epochs)
    if rounding is not None:
        R.learn_rounding(sim, calib, rounding, progress=progress, log=log)
    return qm, p, sim


def parse_bits(s) -> tuple[int, ...]:
    """A bit set (``"2,4,8"`` or a sequence) as a sorted tuple of distinct bit-widths from BIT_CHOICES."""
    if isinstance(s, (tuple, list)):
        vals = list(s)
    else:
        try:
            vals = [int(v) for v in str(s).split(",") if v.strip()]
        except ValueError:
            raise PlanError(f"bit set {s!r} does not parse: use e.g. 2,4,8") from None
    if not vals or any(v not in BIT_CHOICES for v in vals):
        raise PlanError(f"bit set {s!r}: bit-widths must come from {list(BIT_CHOICES)}")
    return tuple(sorted(set(vals)))
