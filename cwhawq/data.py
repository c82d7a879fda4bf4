"""Datasets from a spec string.

Specs:
  ``fashion-mnist``        IDX files in /usr/share/datasets/fashion-mnist (Debian package
                           ``dataset-fashion-mnist``), overridable with ``data_dir`` / ``CWHAWQ_DATA``;
  ``/path/to/dir``         a directory of MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ...);
  ``/path/to/file.npz``    ``x``/``y`` (one pool of samples) or ``x_train``/``y_train``/``x_test``/``y_test``.

Splits: ``train`` (train minus the validation hold-out), ``val`` (a fixed, seeded subset of train),
``test`` and ``all`` (every sample, in file order). Images come back as float32 N,C,H,W; uint8 data is
scaled to [0, 1], float data is taken as is. Any further normalisation belongs to the model.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "val", "test", "all")
VAL_SIZE = 5000          # samples held out of train for validation (fixed)
VAL_SEED = 20240917      # seed of that hold-out
NPZ_VAL_FRACTION = 0.1   # for .npz sources smaller than 10 * VAL_SIZE

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Dataset:
    """Images (float32 N,C,H,W) and labels (int64 N) of one split."""

    x: np.ndarray
    y: np.ndarray
    name: str
    split: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """The first ``n`` samples of a fixed seeded permutation (all when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        idx.sort()
        return Dataset(self.x[idx], self.y[idx], self.name, f"{self.split}[{n}]")

    def batches(self, batch_size: int):
        """Yield (x, y) torch tensors in order."""
        import torch

        for i in range(0, len(self), batch_size):
            yield torch.from_numpy(self.x[i:i + batch_size]), torch.from_numpy(self.y[i:i + batch_size])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(f"{path}: truncated IDX data (expected {count} items of shape {dims})")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = directory / name
        if p.exists():
            return p
    return None


def _load_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    out = {}
    for key, stem in (("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
                      ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte")):
        p = _find_idx(directory, stem)
        if p is None:
            raise DataError(f"{directory} has no {stem}[.gz] (expected MNIST-format IDX files)")
        out[key] = read_idx(p)
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError: a corrupt or foreign file
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        return {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    if {"x", "y"} <= arrays.keys():
        return {"x": arrays["x"], "y": arrays["y"]}
    raise DataError(f"{path} must hold arrays 'x' and 'y' (or x_train, y_train, x_test, y_test); "
                    f"found {sorted(arrays)}")


def to_nchw(x: np.ndarray, where: str = "x") -> np.ndarray:
    """N,H,W / N,H,W,C / N,C,H,W (uint8 or float) -> float32 N,C,H,W; uint8 scaled to [0, 1]."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        xf = x.astype(np.float32)
    else:
        raise DataError(f"{where}: unsupported dtype {x.dtype}")
    if xf.ndim == 3:
        xf = xf[:, None]
    elif xf.ndim == 4:
        # channels-last when the last axis is small and the second is not
        if xf.shape[-1] in (1, 3, 4) and xf.shape[1] not in (1, 3, 4):
            xf = np.transpose(xf, (0, 3, 1, 2))
    else:
        raise DataError(f"{where}: expected images of shape N,H,W / N,H,W,C / N,C,H,W, got {x.shape}")
    if not np.isfinite(xf).all():
        raise DataError(f"{where}: contains NaN or inf")
    return np.ascontiguousarray(xf)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: expected {n} labels of shape (N,), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    if n and y.min() < 0:
        raise DataError(f"{where}: negative labels")
    return y.astype(np.int64)


def resolve_spec(spec: str, data_dir: str | None = None) -> tuple[str, Path]:
    """(kind, path) for a spec: kind is 'idx' or 'npz'."""
    if not spec or not isinstance(spec, str):
        raise DataError("empty data spec")
    if spec in ("fashion-mnist", "fmnist", "fashion_mnist"):
        d = data_dir or os.environ.get("CWHAWQ_DATA") or DEFAULT_FMNIST_DIR
        p = Path(d)
        if not p.is_dir():
            raise DataError(f"Fashion-MNIST not found in {p}: install the Debian package "
                            f"dataset-fashion-mnist or pass --data-dir / set CWHAWQ_DATA")
        return "idx", p
    p = Path(spec).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"data file not found: {p}")
        return "npz", p
    if p.is_dir():
        return "idx", p
    if p.exists():
        raise DataError(f"data spec {spec!r}: expected 'fashion-mnist', a directory of IDX files or an .npz file")
    raise DataError(f"data spec {spec!r} does not parse: not 'fashion-mnist', an existing directory "
                    f"of IDX files, nor an .npz file")


_CACHE: dict[tuple, dict[str, np.ndarray]] = {}


def _pools(spec: str, data_dir: str | None) -> dict[str, np.ndarray]:
    kind, path = resolve_spec(spec, data_dir)
    key = (kind, str(path.resolve()), path.stat().st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    raw = _load_idx_dir(path) if kind == "idx" else _load_npz(path)
    pools: dict[str, np.ndarray] = {}
    for prefix in ("", "_train", "_test"):
        if "x" + prefix in raw:
            x = to_nchw(raw["x" + prefix], f"{path.name}:x{prefix}")
            pools["x" + prefix] = x
            pools["y" + prefix] = _labels(raw["y" + prefix], x.shape[0], f"{path.name}:y{prefix}")
    if "x" in pools:
        # a single pool: the last 1/6 (at least one sample) is the test split, in file order
        n = pools["x"].shape[0]
        if n == 0:
            raise DataError(f"{path} holds no samples")
        n_test = max(1, n // 6) if n > 1 else 0
        pools["x_train"], pools["x_test"] = pools["x"][: n - n_test], pools["x"][n - n_test:]
        pools["y_train"], pools["y_test"] = pools["y"][: n - n_test], pools["y"][n - n_test:]
    if pools["x_train"].shape[1:] != pools["x_test"].shape[1:]:
        raise DataError(f"{path}: train images {pools['x_train'].shape[1:]} and test images "
                        f"{pools['x_test'].shape[1:]} differ in shape")
    _CACHE[key] = pools
    return pools


def _val_indices(n_train: int) -> np.ndarray:
    n_val = VAL_SIZE if n_train >= 10 * VAL_SIZE else max(1, int(round(n_train * NPZ_VAL_FRACTION)))
    n_val = min(n_val, max(0, n_train - 1))
    return np.sort(np.random.default_rng(VAL_SEED).permutation(n_train)[:n_val])


def load(spec: str, split: str = "test", data_dir: str | None = None) -> Dataset:
    """Load one split of a dataset spec (see the module docstring)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    pools = _pools(spec, data_dir)
    name = spec if spec in ("fashion-mnist",) else Path(spec).name
    if split == "test":
        x, y = pools["x_test"], pools["y_test"]
    elif split == "all":
        x = np.concatenate([pools["x_train"], pools["x_test"]])
        y = np.concatenate([pools["y_train"], pools["y_test"]])
    else:
        n = pools["x_train"].shape[0]
        vidx = _val_indices(n)
        if split == "val":
            x, y = pools["x_train"][vidx], pools["y_train"][vidx]
        else:
            mask = np.ones(n, dtype=bool)
            mask[vidx] = False
            x, y = pools["x_train"][mask], pools["y_train"][mask]
    if x.shape[0] == 0:
        raise DataError(f"{spec}: split {split!r} is empty")
    return Dataset(x, y, name, split)
