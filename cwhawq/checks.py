"""Checks every command makes on its input before doing any work, shared by the API functions.

- :func:`require_data`: which data a command calibrates, analyses or evaluates a model on. A zoo model
  (``zoo:NAME``, or an ONNX file that ``cwhawq export`` made from one) carries its dataset; any other
  model needs ``--data``: nothing falls back to Fashion-MNIST silently.
- :func:`check_outputs`: output paths are writable (no regular file in their parent path, no directory
  where a file goes) and none of them is one of the command's input files, so a run never overwrites
  its own input; checked before anything is computed or written.
- :func:`check_same_model`: a plan or sensitivity file records the model it was made for (``model``:
  the zoo name or the ``.pt2`` spec, ``model_sha256``: the archive's SHA-256); it must be the model given.
- :func:`check_sensitivity`: a sensitivity file's format, version and finite numbers.
- :func:`check_labels`: labels inside the model's classes.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

from .errors import CwhawqError, DataError, ModelError

DATA_KINDS = "an .npz file, a directory of IDX files, or fashion-mnist"


# ===================================================================================== data
def _onnx_zoo_source(path: str) -> str | None:
    """The zoo model an ONNX file was exported from (its ``cwhawq.model`` annotation), if any."""
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the command that loads it
        return None
    src = {p.key: p.value for p in m.metadata_props}.get("cwhawq.model", "")
    return src if src.startswith("zoo:") else None


def require_data(model, data, purpose: str = "calibrate it on"):
    """The dataset spec (or Dataset) a command uses for ``model``: ``data`` when given, else the zoo
    model's own dataset; a DataError naming ``--data`` for any other model."""
    if data is not None:
        return data
    from .models import LoadedModel, zoo_dataset

    spec = model.spec if isinstance(model, LoadedModel) else str(model)
    if spec.endswith(".onnx"):
        zoo = _onnx_zoo_source(spec) if Path(spec).is_file() else None
        if zoo is not None:
            return zoo_dataset(zoo)
    else:
        ds = zoo_dataset(spec)
        if ds is not None:
            return ds
    raise DataError(f"{spec} is not a zoo model: give the data to {purpose} with --data ({DATA_KINDS})")


def data_file(data) -> str | None:
    """The file behind a data spec, if it is one (an .npz), for :func:`check_outputs`."""
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".npz"):
        return str(data)
    return None


def check_labels(ds, n_classes: int) -> None:
    """Every label of ``ds`` must be a class of a model with ``n_classes`` outputs."""
    if len(ds) and int(ds.y.max()) >= n_classes:
        raise DataError(f"data {ds.name} ({ds.split}) has labels up to {int(ds.y.max())}, but the model has "
                        f"{n_classes} outputs (classes 0..{n_classes - 1}): data for another model?")


def model_classes(loaded) -> int:
    """Number of outputs (classes) of a loaded model, from one forward pass of zeros (cached)."""
    if "classes" not in loaded.info:
        import torch

        with torch.no_grad():
            out = loaded.module(torch.zeros((1, *loaded.input_shape)))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ModelError(f"{loaded.spec}: expected logits of shape (N, classes), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        loaded.info["classes"] = int(out.shape[1])
    return loaded.info["classes"]


# ===================================================================================== outputs
def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_outputs(outputs, inputs=(), directory: bool = False) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input.

    ``outputs`` and ``inputs``: (label, path) pairs (paths may be None: skipped), e.g.
    ``[("--out", "plan.json")]`` and ``[("--plan", "p.json"), ("MODEL", "m.pt2")]``. ``directory``: the
    outputs are directories (created if missing) rather than files.
    """
    outs = [(label, Path(p)) for label, p in outputs if p is not None]
    ins = [(label, Path(p)) for label, p in inputs if p is not None]
    for label, p in outs:
        if str(p) in ("", "."):
            if directory:
                continue
            raise CwhawqError(f"{label}: empty path")
        if p.is_dir() and not directory:
            raise CwhawqError(f"{label} {p} is a directory; give a file name")
        if directory and p.exists() and not p.is_dir():
            raise CwhawqError(f"{label} {p} is a file, not a directory")
        parent = p.parent
        anc = _nearest_existing(parent)
        if not anc.is_dir():
            raise CwhawqError(f"{label} {p}: {anc} is a file, not a directory")
        try:   # a real probe: os.access says yes to root on read-only or virtual file systems
            fd, tmp = tempfile.mkstemp(prefix=".cwhawq-probe.", dir=anc)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise CwhawqError(f"{label} {p}: cannot write in {anc} ({e.strerror})") from None
        for in_label, q in ins:
            if _same_file(p, q):
                raise CwhawqError(f"{label} {p} is also an input ({in_label} {q}): choose another output "
                                  f"(nothing was written)")
    for i, (la, a) in enumerate(outs):
        for lb, b in outs[i + 1:]:
            if _same_file(a, b):
                raise CwhawqError(f"{la} and {lb} are the same file ({a})")


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


# ===================================================================================== model identity
def model_identity(loaded) -> tuple[str, str | None]:
    """(spec, sha256 or None): what plans and sensitivity files record about the model they were made for."""
    return loaded.spec, loaded.info.get("sha256")


def _describe(spec, sha) -> str:
    return f"{spec} (sha256 {sha[:12]}...)" if sha else str(spec)


def check_same_model(recorded, recorded_sha, loaded, what: str) -> None:
    """``what`` (e.g. "plan p.json") was made for ``recorded`` (spec, optional ``recorded_sha``): it must be
    the model ``loaded``. The same model: the same zoo name; for a ``.pt2``, the same SHA-256 when both
    are known (a renamed or moved copy is the same model, a retrained one with the same name is not),
    else the same file name. A file recording no model (``"model": null``) is not compared."""
    if not recorded:
        return
    spec, sha = model_identity(loaded)
    recorded = str(recorded)
    if recorded.startswith("zoo:") or spec.startswith("zoo:"):
        same = recorded == spec
    elif recorded_sha and sha:
        same = recorded_sha == sha
    else:
        same = Path(recorded).name == Path(spec).name
    if not same:
        raise ModelError(f"{what} was made for {_describe(recorded, recorded_sha)}, not for {_describe(spec, sha)}: "
                         f"make it for this model (or set its \"model\" field to null to skip this check)")


# ===================================================================================== sensitivity files
SENS_FORMAT, SENS_VERSION = "cwhawq-sensitivity", 1


def _finite_list(v, where: str) -> None:
    if not isinstance(v, list):
        raise CwhawqError(f"{where} must be a list of numbers")
    for j, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise CwhawqError(f"{where}[{j}] = {x!r} is not a number")
        if not math.isfinite(x):
            raise CwhawqError(f"{where}[{j}] is {x}: the analysis diverged or the file is damaged; "
                              f"run cwhawq analyze again")


def check_sensitivity(d: dict, src: str = "sensitivity file", loaded=None) -> dict:
    """Validate a sensitivity dict (format, version, finite traces and Omega; the model when ``loaded``)."""
    if d.get("format", SENS_FORMAT) != SENS_FORMAT:
        raise CwhawqError(f"{src}: format {d.get('format')!r} is not a cwhawq sensitivity file")
    if d.get("version", SENS_VERSION) != SENS_VERSION:
        raise CwhawqError(f"{src}: sensitivity file version {d.get('version')!r} is not supported (this cwhawq "
                          f"reads version {SENS_VERSION})")
    layers = d.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CwhawqError(f"{src}: 'layers' must be a non-empty list")
    for i, rec in enumerate(layers):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise CwhawqError(f"{src}: layers[{i}] needs a 'name'")
        for side in ("weight", "activation"):
            part = rec.get(side)
            if part is None and side == "activation":
                continue
            where = f"{src}: layers[{rec['name']}].{side}"
            if not isinstance(part, dict):
                raise CwhawqError(f"{where} is missing")
            _finite_list(part.get("trace"), f"{where}.trace")
            om = part.get("omega", {})
            if not isinstance(om, dict):
                raise CwhawqError(f"{where}.omega must be an object of bit-width -> list")
            for b, v in om.items():
                _finite_list(v, f"{where}.omega[{b}]")
    if loaded is not None:
        check_same_model(d.get("model"), d.get("model_sha256"), loaded, src)
    return d


def load_sensitivity(sens, loaded=None) -> dict:
    """A sensitivity file (path) or dict, validated (:func:`check_sensitivity`)."""
    if isinstance(sens, dict):
        return check_sensitivity(sens, "sensitivity", loaded)
    if Path(sens).is_dir():
        raise CwhawqError(f"sensitivity file {sens} is a directory")
    from .hessian import load_sensitivity as _load

    return check_sensitivity(_load(sens), f"sensitivity file {sens}", loaded)


def check_plan_model(plan, loaded, src: str = "plan") -> None:
    check_same_model(plan.model, getattr(plan, "model_sha256", None), loaded, src)
