"""Model specs: ``zoo:NAME``, a ``torch.export`` archive (``.pt2``) or, for graph commands, ``.onnx``.

``load_model`` returns a :class:`LoadedModel` holding an eval-mode ``nn.Module`` (for ``.pt2``, the
``ExportedProgram``'s module: users need not ship their class) and its input shape (C, H, W).
"""
from __future__ import annotations

import contextlib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ModelError
from .zoo import nets


@dataclass
class LoadedModel:
    spec: str
    module: nn.Module
    input_shape: tuple[int, ...]          # (C, H, W), without batch
    exported: object | None = None        # the ExportedProgram for .pt2 inputs
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec


def zoo_names() -> list[str]:
    return sorted(nets.ZOO)


def zoo_dataset(spec: str) -> str | None:
    """The dataset spec a zoo model was trained on (``zoo:NAME``), None for any other spec."""
    if not str(spec).startswith("zoo:"):
        return None
    name = str(spec)[4:]
    if name not in nets.ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join('zoo:' + n for n in zoo_names())}")
    return nets.ZOO[name][3]


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's FutureWarning about ``LeafSpec`` (torch 2.13), which loading a ``.pt2`` archive
    and copying its graph module print on every run; nothing else is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        yield


def _load_zoo(name: str) -> LoadedModel:
    if name not in nets.ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join('zoo:' + n for n in zoo_names())}")
    _, _, shape, dataset = nets.ZOO[name]
    path = nets.weights_path(name)
    if not path.exists():
        raise ModelError(f"weights of zoo:{name} missing ({path}); train them with "
                         f"`python -m cwhawq.zoo.train {name}`")
    model = nets.build(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise ModelError(f"cannot load weights of zoo:{name} from {path}: {e}") from None
    return LoadedModel(f"zoo:{name}", model.eval(), shape, None, {"dataset": dataset})


def _load_pt2(path: Path) -> LoadedModel:
    if path.is_dir():
        raise ModelError(f"model {path} is a directory, not a .pt2 archive")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a torch.export archive (not a zip file; truncated or corrupt?)")
    try:
        with quiet_torch():
            ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelError(f"cannot load {path} with torch.export.load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    inputs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected a model with one tensor input, found {len(inputs)}")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    val = node.meta.get("val")
    if val is None or len(val.shape) != 4:
        raise ModelError(f"{path}: expected an image input N,C,H,W, got {getattr(val, 'shape', None)}")
    shape = tuple(int(d) for d in val.shape[1:])
    with quiet_torch():
        module = ep.module()
    from .io import sha256_file

    return LoadedModel(str(path), module, shape, ep, {"sha256": sha256_file(path)})


def load_model(spec: str) -> LoadedModel:
    """Load a model from a spec (``zoo:NAME`` or a ``.pt2`` archive)."""
    if not spec:
        raise ModelError("empty model spec")
    if spec.startswith("zoo:"):
        return _load_zoo(spec[4:])
    p = Path(spec).expanduser()
    if p.suffix == ".pt2":
        return _load_pt2(p)
    if p.suffix == ".onnx":
        raise ModelError(f"{spec}: this command needs a PyTorch model (zoo:NAME or .pt2), not ONNX")
    if spec in nets.ZOO:
        raise ModelError(f"model spec {spec!r}: zoo models are named zoo:{spec}")
    raise ModelError(f"model spec {spec!r} not understood: use zoo:NAME ({', '.join(zoo_names())}) or a .pt2 file")


def save_pt2(model: nn.Module, input_shape, path: str | Path, dynamic_batch: bool = True) -> None:
    """Export an nn.Module with torch.export and save it (atomically) as a .pt2 archive."""
    from .io import atomic_path

    example = torch.zeros((2, *input_shape))
    dyn = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes=dyn)
    with atomic_path(path) as tmp:
        torch.export.save(ep, str(tmp))
