#!/usr/bin/env python3
"""Provide the aarch64 TVM runtime libraries that the qemu-user test (tests/test_tvm_backend.py)
and cross-built ``cwhawq_run`` runners link against; ``make install`` runs this.

    python tools/fetch_tvm_runtime.py [--arch aarch64] [--dest DIR] [--force]

Downloads the aarch64 wheels of the installed (pyproject.toml-pinned) apache-tvm and apache-tvm-ffi
from the package index and unpacks libtvm_runtime.so, libtvm_runtime_extra.so,
libtvm_runtime_cuda.so and libtvm_ffi.so into DIR (default ``$CWHAWQ_AARCH64_TVM_RUNTIME`` or
``~/.cache/cwhawq/aarch64-runtime``). Does nothing when DIR already holds those versions.
Errors are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cwhawq.backends.native import PLATFORMS, fetch_runtime_libs  # noqa: E402
from cwhawq.errors import CwhawqError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="aarch64", choices=sorted(PLATFORMS))
    ap.add_argument("--dest", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="download again even when up to date")
    a = ap.parse_args()
    try:
        fetch_runtime_libs(a.arch, a.dest, force=a.force, log=print)
    except CwhawqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
