"""Data-parallel runs under ``torchrun``: the process group, this process's rank, reductions, shards.

``torchrun --nproc-per-node N -m cwhawq analyze|eval|search ...`` starts N processes with the
standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init` joins them into one ``torch.distributed`` process group (gloo for CPU tensors, and
nccl for CUDA tensors when CUDA is there), with a timeout on every collective, so that a rank that
dies or stops answering ends the job with :class:`DistError` instead of a hang. Started any other
way (no ``WORLD_SIZE``, or 1) everything here is a no-op: rank 0 of 1, reductions return their
input, the shard is the whole range.

Every reduction is a collective: all ranks must call the same ones in the same order. The callers
keep that by making the same decisions on every rank (the same data, the same seeds, decisions taken
from reduced or broadcast values only).

``CWHAWQ_DIST_TIMEOUT`` (seconds, default 300): how long a collective, or the rendezvous, waits for
the other ranks.
"""
from __future__ import annotations

import atexit
import os
import re
from datetime import timedelta

import numpy as np

from .errors import CwhawqError

DEFAULT_TIMEOUT = 300.0
_STATE = {"on": False, "rank": 0, "world": 1}


class DistError(CwhawqError):
    """Another process of a distributed job failed or did not answer in time (not an input error)."""

    exit_code = 1


def launched() -> bool:
    """Whether this process was started as one of several by torchrun (no torch import)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def timeout_seconds() -> float:
    raw = os.environ.get("CWHAWQ_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        t = float(raw)
    except ValueError:
        raise CwhawqError(f"CWHAWQ_DIST_TIMEOUT={raw!r}: give seconds, e.g. 300") from None
    if not t > 0:
        raise CwhawqError(f"CWHAWQ_DIST_TIMEOUT={raw!r}: must be > 0")
    return t


def init() -> bool:
    """Join the process group torchrun describes (idempotent); False when not launched by torchrun."""
    if _STATE["on"]:
        return True
    if not launched():
        return False
    import torch
    import torch.distributed as td

    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in os.environ:
            raise CwhawqError(f"WORLD_SIZE is set but {k} is not: start distributed runs with torchrun")
    t = timeout_seconds()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        td.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=t))
    except Exception as e:   # the rendezvous failed or timed out
        raise DistError(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']} as rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
                        f"({_first_line(e)})") from None
    _STATE.update(on=True, rank=td.get_rank(), world=td.get_world_size())
    # Leave the group before the interpreter tears down: a gloo group whose peer stopped answering
    # aborts the process ("terminate called without an active exception") when left to its destructor.
    atexit.register(finish)
    return True


def finish(sync: bool = False) -> None:
    """Leave the process group (no-op when not in one). ``sync`` (a command that ended normally):
    wait for every rank first, so that all ranks destroy the group together and none tears its
    connections down while a peer still writes its output or uses them. Not after an error: a rank
    that died or stopped answering would hold the others here for the group's timeout. (The barrier
    alone did not stop a rank aborting in PyTorch's teardown after this; see ``cli._leave_group``.)"""
    if _STATE["on"]:
        import torch.distributed as td

        _STATE.update(on=False, rank=0, world=1)
        try:
            if sync:
                td.barrier()
            td.destroy_process_group()
        except Exception:   # the group is already broken: nothing left to release
            pass


def active() -> bool:
    return _STATE["on"]


def rank() -> int:
    return _STATE["rank"]


def world() -> int:
    return _STATE["world"]


def is_main() -> bool:
    return _STATE["rank"] == 0


def _first_line(e: BaseException) -> str:
    """The gist of a (gloo) error: its first line, without the source location and the advice."""
    s = str(e).strip()
    s = s.splitlines()[0] if s else type(e).__name__
    s = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", s)
    return s.split(" This is typically")[0].strip()


def _collective(what: str, fn):
    try:
        return fn()
    except RuntimeError as e:   # gloo: a closed connection (a dead rank) or a timeout
        raise DistError(f"rank {rank()}: {what} across {world()} processes failed: another process of the job "
                        f"died or did not answer within {timeout_seconds():g} s (CWHAWQ_DIST_TIMEOUT) "
                        f"[{_first_line(e)}]") from None


def all_sum(x) -> np.ndarray:
    """Elementwise sum over the ranks of a float array (float64; the input itself when alone)."""
    a = np.asarray(x, dtype=np.float64)
    if not _STATE["on"]:
        return a
    import torch
    import torch.distributed as td

    t = torch.from_numpy(np.ascontiguousarray(a).copy())
    _collective("a sum", lambda: td.all_reduce(t, op=td.ReduceOp.SUM))
    return t.numpy().reshape(a.shape)


def all_max(x) -> np.ndarray:
    """Elementwise maximum over the ranks (float64)."""
    a = np.asarray(x, dtype=np.float64)
    if not _STATE["on"]:
        return a
    import torch
    import torch.distributed as td

    t = torch.from_numpy(np.ascontiguousarray(a).copy())
    _collective("a maximum", lambda: td.all_reduce(t, op=td.ReduceOp.MAX))
    return t.numpy().reshape(a.shape)


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable object; other ranks' arguments are ignored)."""
    if not _STATE["on"]:
        return obj
    import torch.distributed as td

    box = [obj if is_main() else None]
    _collective("a broadcast from rank 0", lambda: td.broadcast_object_list(box, src=0))
    return box[0]


def barrier() -> None:
    if _STATE["on"]:
        import torch.distributed as td

        _collective("a barrier", lambda: td.barrier())


def shard_range(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items (sizes differ by at most one)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return n * r // w, n * (r + 1) // w


def shard_dataset(ds):
    """This rank's contiguous share of a :class:`cwhawq.data.Dataset` (the dataset itself when alone)."""
    if not _STATE["on"]:
        return ds
    lo, hi = shard_range(len(ds))
    return type(ds)(ds.x[lo:hi], ds.y[lo:hi], ds.name, f"{ds.split}[rank {rank()}: {lo}:{hi}]")
