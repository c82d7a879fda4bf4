"""The Python API: one function per command, mirroring the CLI's options."""
from __future__ import annotations

from pathlib import Path

from . import data as D
from .errors import ModelError


def evaluate(model: str, data: str = "fashion-mnist", split: str = "test", data_dir: str | None = None,
             batch_size: int = 500, limit: int | None = None, plan=None, calib_batches: int = 4,
             act_scale: str = "pow2", finetune_epochs: int = 0) -> dict:
    """Accuracy of a model spec (zoo:NAME, .pt2, .onnx) on a dataset split, optionally under a plan."""
    from .evaluate import accuracy, check_input_shape, onnx_predict

    ds = D.load(data, split, data_dir).subset(limit)
    rep = {"model": model, "data": data, "split": split, "n": len(ds)}
    if str(model).endswith(".onnx"):
        if plan is not None:
            raise ModelError("--plan applies to PyTorch models; an exported .onnx already holds its plan")
        if not Path(model).is_file():
            raise ModelError(f"model file not found: {model}")
        logits = onnx_predict(model, ds, batch_size)
        rep["accuracy"] = float((logits.argmax(1) == ds.y).mean())
        return rep
    from .models import load_model

    loaded = load_model(model)
    check_input_shape(loaded.input_shape, ds)
    if plan is None:
        rep["accuracy"] = accuracy(loaded.module, ds, batch_size)
        return rep
    from .graph import qmodel_from_loaded
    from .plan import load_plan
    from .quantize import quantize_model, finetune

    qm = qmodel_from_loaded(loaded)
    p = load_plan(plan) if not hasattr(plan, "layers") else plan
    p.validate(qm.layer_infos)
    calib = D.load(data, "train", data_dir).subset(calib_batches * 128, seed=1)
    sim = quantize_model(qm, p, calib, act_scale=act_scale)
    if finetune_epochs:
        train = D.load(data, "train", data_dir)
        finetune(sim, train, epochs=finetune_epochs)
        rep["finetune_epochs"] = finetune_epochs
    rep["accuracy"] = accuracy(sim.module, ds, batch_size)
    rep["plan"] = str(plan) if not hasattr(plan, "layers") else "<plan>"
    rep.update({k: v for k, v in p.metrics(qm.layer_infos).items() if k in ("avg_w_bits", "avg_a_bits", "size_ratio")})
    return rep


def analyze(model: str, data: str = "fashion-mnist", out: str | None = None, data_dir: str | None = None,
            batch_size: int = 128, batches: int = 1, max_probes: int = 512, tol: float = 0.01, seed: int = 0,
            scheme: str = "auto", plot: str | None = None, progress: bool = False) -> dict:
    """Channel-wise Hessian traces and Omega of a model on ``batches`` x ``batch_size`` train samples."""
    from .evaluate import check_input_shape
    from .graph import qmodel_from_loaded
    from .hessian import analyze as _analyze, plot_sensitivity
    from .models import load_model

    loaded = load_model(model)
    ds = D.load(data, "train", data_dir)
    check_input_shape(loaded.input_shape, ds)
    qm = qmodel_from_loaded(loaded)
    bar = None
    cb = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_probes, desc="hessian probes", unit="probe", leave=False)

        def cb(p, worst):
            bar.update(p - bar.n)
            bar.set_postfix(rel_stderr=f"{worst:.3g}")
    try:
        sens = _analyze(qm, ds, batch_size=batch_size, batches=batches, max_probes=max_probes, tol=tol,
                        seed=seed, scheme=scheme, progress=cb, model_name=model)
    finally:
        if bar is not None:
            bar.close()
    if out:
        from .io import write_json

        write_json(out, sens, indent=None)
    if plot:
        plot_sensitivity(sens, plot)
    return sens
