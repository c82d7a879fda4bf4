"""Accuracy of a model (float, simulated-quantized, or ONNX through onnxruntime) on a dataset split."""
from __future__ import annotations

import numpy as np
import torch

from . import dist
from .data import Dataset
from .errors import DataError, ModelError


def check_input_shape(input_shape, ds: Dataset) -> None:
    if tuple(ds.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"data {ds.name} has images of shape {tuple(ds.x.shape[1:])} but the model expects "
                        f"{tuple(input_shape)} (C,H,W)")


@torch.no_grad()
def predict(model: torch.nn.Module, ds: Dataset, batch_size: int = 500) -> np.ndarray:
    """Logits of ``model`` over ``ds`` (float32, N x classes)."""
    outs = []
    for xb, _ in ds.batches(batch_size):
        out = model(xb)
        if not torch.isfinite(out).all():
            raise ModelError("model produced NaN or inf outputs")
        outs.append(out.float().numpy())
    return np.concatenate(outs)


def accuracy(model: torch.nn.Module, ds: Dataset, batch_size: int = 500) -> float:
    logits = predict(model, ds, batch_size)
    return float((logits.argmax(1) == ds.y).mean())


def sharded_accuracy(ds: Dataset, predict_fn) -> float:
    """Accuracy over ``ds`` where every torchrun rank (:mod:`cwhawq.dist`) predicts its contiguous share
    (``predict_fn(share) -> logits``) and the correct counts are summed: the same number as one process
    (which predicts all of ``ds``) gives."""
    part = dist.shard_dataset(ds)
    correct = int((predict_fn(part).argmax(1) == part.y).sum()) if len(part) else 0
    total = float(dist.all_sum([correct])[0])
    return float(total / len(ds)) if len(ds) else float("nan")


def onnx_predict(path: str, ds: Dataset, batch_size: int = 500, optimize: bool = True) -> np.ndarray:
    """Logits of an ONNX model through onnxruntime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: ds.x[i:i + batch_size]})[0] for i in range(0, len(ds), batch_size)]
    return np.concatenate(outs)

