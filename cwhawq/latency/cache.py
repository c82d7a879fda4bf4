"""The measurement cache: one JSON file per measurement, keyed by everything it depends on."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from ..io import write_json
from .model import LatencyError

# ===================================================================================== cache
def default_cache_dir() -> Path:
    env = os.environ.get("CWHAWQ_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cwhawq" / "latency"


_CODE_FILES = ("export.py", "onnx_graph.py", "simulate.py", "quantizers.py", "kernels", "backends")


def tool_version() -> dict:
    """cwhawq and TVM versions plus a hash of the sources that decide what a layer compiles to."""
    import tvm

    root = Path(__file__).resolve().parent.parent   # the cwhawq package
    h = hashlib.sha256()
    for name in _CODE_FILES:
        p = root / name
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return {"cwhawq": __version__, "tvm": str(tvm.__version__), "code": h.hexdigest()[:16]}


class LatencyCache:
    """One JSON file per measurement, named by the SHA-256 of its key (written atomically)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    @staticmethod
    def key(fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec if isinstance(rec, dict) and "median_s" in rec else None

    def put(self, key: str, record: dict) -> None:
        try:
            write_json(self.path(key), record)
        except OSError as exc:
            raise LatencyError(f"cannot write the latency cache {self.root}: {exc.strerror}") from None
