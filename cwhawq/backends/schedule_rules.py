"""CPU schedules for the operators TVM's importer produces around our kernels.

TVM's default CPU pipeline leaves every operator as unscheduled serial loops. The packed kernels
schedule themselves (``tirx.is_scheduled``); these rules cover the rest of the graph (element-wise
adds and activations, padding, pooling, reductions, layout ops, and fp32 operators when our
kernels are disabled):

* :class:`CpuInjective`: inline element-wise producers into their consumer, fuse the spatial loops
  of the result, run the outer part in parallel and vectorize the inner part;
* :class:`CpuFallback`: every remaining block gets its leading spatial loops fused and parallel,
  and its innermost spatial loop vectorized when it is a static power-of-two multiple;
* dlight's CPU ``Reduction`` rule (softmax/norm shapes) is tried first.

A rule that cannot schedule an operator must never fail the build: :func:`apply_cpu_schedules`
tries the rules in order and a rule that raises (e.g. dlight's ``Reduction`` on a function whose
reduction blocks also write function outputs, such as ``batch_norm`` in training mode: its
``compute_at`` of an output block is a ``ScheduleError``) counts as not applying, so the next rule
gets the operator; when none applies the operator stays unscheduled (serial loops, correct).
Each such fallback is recorded (function, rule, first line of the error) for the compile report.

Small operators (under ``PARALLEL_MIN`` elements) stay single-threaded: a fork/join of TVM's
thread pool costs more than they do.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline

PARALLEL_MIN = 16384
VECTOR = 16


def _static(v) -> int | None:
    return int(v.value) if isinstance(v, tirx.IntImm) else None


def _work(sch, loops) -> int | None:
    total = 1
    for lp in loops:
        e = _static(sch.get(lp).extent)
        if e is None:
            return None
        total *= e
    return total


def _static_work(sch, loops) -> int:
    """Iterations with every symbolic extent (a batch) counted as 1."""
    total = 1
    for lp in loops:
        total *= _static(sch.get(lp).extent) or 1
    return total


def _schedule_spatial(sch, block, loops, parallel_ok: bool = True) -> None:
    """Fuse spatial loops -> [parallel outer, vector inner] (best effort). With a symbolic
    (batch) extent the static trailing loops are vectorized on their own, and the nest runs in
    parallel only when it is large at batch 1: a fork/join per element-wise operator of a
    batch-1 transformer costs more than the operator."""
    if not loops:
        return
    work = _work(sch, loops)
    if work is None:
        big = _static_work(sch, loops) >= PARALLEL_MIN
        tail = len(loops)
        while tail > 0 and _static(sch.get(loops[tail - 1]).extent) is not None:
            tail -= 1
        inner = loops[tail:]
        outer_loops = list(loops[:tail])
        if inner:
            fi = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            ext = _static(sch.get(fi).extent)
            if ext is not None and ext >= 2 * VECTOR and ext % VECTOR == 0:
                fo, fv = sch.split(fi, factors=[None, VECTOR])
                sch.vectorize(fv)
                outer_loops.append(fo)
            else:
                outer_loops.append(fi)
        fused = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
        if parallel_ok and big:
            sch.parallel(fused)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = _static(sch.get(fused).extent)
    if ext is not None and ext >= 2 * VECTOR and ext % VECTOR == 0:
        outer, inner = sch.split(fused, factors=[None, VECTOR])
        sch.vectorize(inner)
    else:
        outer = fused
    if parallel_ok and (work is None or work >= PARALLEL_MIN):
        sch.parallel(outer)


def _cpu_blocks(func, target):
    """A schedule of ``func`` and its normalised blocks; ``(None, None)`` when the function is not
    a PrimFunc for a CPU target or its blocks cannot be normalised (the rule does not apply)."""
    if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
        return None, None
    sch = s_tir.Schedule(func)
    return sch, normalize_prim_func(sch)


class CpuInjective(ScheduleRule):
    """Element-wise / injective functions: inline, fuse, parallel + vectorize."""

    def apply(self, func, target, _tunable):
        sch, infos = _cpu_blocks(func, target)
        if infos is None or any(not bi.is_injective() for bi in infos):
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1:
            return None
        block = infos[0].block_rv
        _schedule_spatial(sch, block, sch.get_loops(block))
        return sch


class CpuFallback(ScheduleRule):
    """Anything else (reductions, pooling, multi-block functions): parallel spatial loops."""

    def apply(self, func, target, _tunable):
        sch, infos = _cpu_blocks(func, target)
        if infos is None:
            return None
        try:
            infos = try_inline(sch, infos)
        except Exception:  # noqa: BLE001 - inlining is an optimisation only
            infos = normalize_prim_func(sch)
        for bi in infos:
            loops = sch.get_loops(bi.block_rv)
            kinds = bi.dom_kind()
            lead = []
            for lp, k in zip(loops, kinds):
                if k != "S":
                    break
                lead.append(lp)
            if not lead:
                continue
            work = _work(sch, lead)
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            if work is None or work >= 64:
                try:
                    sch.parallel(fused)
                except Exception:  # noqa: BLE001 - e.g. a dependent block shares the loop
                    pass
        return sch


def _vector_bits(target) -> int:
    """Vector register width of the target's best instruction set (LLVM's own figure says 512
    on AVX2-only CPUs)."""
    from ..kernels.isa import select  # noqa: PLC0415

    try:
        return int(select(target).vector_bits)
    except Exception:  # noqa: BLE001 - an unknown target: assume 128-bit vectors
        return 128


class CpuMatmul(ScheduleRule):
    """Float matrix products of activations (attention's ``Q K^T`` and ``A V``, any batch of
    leading axes) with element-wise epilogues: a block ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
    is tiled into a few rows by a vector of columns, the reduction outside the tile (the
    accumulators stay in registers / L1), the leading axes and row tiles in parallel when the
    product is large enough; epilogue blocks are computed per tile and vectorized."""

    MAX_VEC = 64       # columns of one tile (LLVM splits a wider vector into registers)
    PARALLEL_MACS = 1 << 15

    def apply(self, func, target, _tunable):
        sch, infos = _cpu_blocks(func, target)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        red = [bi for bi in infos if not bi.is_injective()]
        if len(red) != 1 or infos[0] is not red[0]:
            return None
        mm = red[0]
        kinds = mm.dom_kind()
        if len(kinds) < 3 or kinds[-1] != "R" or kinds.count("R") != 1 or kinds[-3:-1] != "SS":
            return None
        stmt = sch.get(mm.block_rv)
        if len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "float32":
            return None
        loops = sch.get_loops(mm.block_rv)
        if len(loops) != len(kinds):
            return None
        lead, li, lj, lk = loops[:-3], loops[-3], loops[-2], loops[-1]
        ni, nj, nk = (_static(sch.get(lp).extent) for lp in (li, lj, lk))
        if None in (ni, nj, nk):
            return None
        if nj <= self.MAX_VEC:
            cols = nj
        else:
            cols = next((c for c in (64, 32, 16, 8) if nj % c == 0), None)
        # rows x column-vectors accumulators within about 12 of the 16 vector registers
        lanes = _vector_bits(target) // 32
        vecs = -(-(cols or 1) // lanes)
        rows = next(r for r in (4, 3, 2, 1) if ni % r == 0 and (r * vecs <= 12 or r == 1))
        macs = _static_work(sch, lead) * ni * nj * nk
        io, ii = sch.split(li, factors=[None, rows])
        if cols is not None:
            jo, ji = sch.split(lj, factors=[None, cols])
        else:
            jo, ji = lj, None
        order = [io, jo, lk, ii] + ([ji] if ji is not None else [])
        sch.reorder(*order)
        outer = sch.fuse(*lead, io) if lead else io
        if macs >= self.PARALLEL_MACS:
            sch.parallel(outer)
        sch.unroll(ii)
        if ji is not None:
            sch.vectorize(ji)
        init = sch.decompose_reduction(mm.block_rv, lk)
        iloops = sch.get_loops(init)
        if ji is not None:
            sch.vectorize(iloops[-1])
        for bi in infos[1:]:
            sch.reverse_compute_at(bi.block_rv, jo)
            el = sch.get_loops(bi.block_rv)
            if el:
                e = _static(sch.get(el[-1]).extent)
                if e is not None and e > 1:
                    sch.vectorize(el[-1])
        return sch


def cpu_rules() -> list[ScheduleRule]:
    return [CpuInjective(), CpuMatmul(), dl.cpu.Reduction(), CpuFallback()]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def schedule_func(func, target, rules=None, fallbacks: list | None = None, name: str = ""):
    """The first schedule one of ``rules`` (default :func:`cpu_rules`) gives ``func``, or None.
    A rule that raises is skipped (recorded in ``fallbacks``): rules only optimise, and the
    unscheduled function is correct."""
    for rule in (cpu_rules() if rules is None else rules):
        try:
            sch = rule.apply(func, target, False)
        except Exception as exc:  # noqa: BLE001 - any failure of an optimisation means "does not apply"
            if fallbacks is not None:
                fallbacks.append({"function": name, "rule": type(rule).__name__, "error": _first_line(exc)})
            continue
        if sch is None:
            continue
        if isinstance(sch, (list, tuple)):
            if not sch:
                continue
            sch = sch[0]
        return sch
    return None


def apply_cpu_schedules(fallbacks: list | None = None):
    """The module pass scheduling every unscheduled PrimFunc for CPU (see the module docstring);
    rules that raise are recorded in ``fallbacks``."""
    import tvm  # noqa: PLC0415
    from tvm.target import Target  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="CwhawqApplyCpuSchedules")
    def _apply(mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue
            tgt = (func.attrs.get("target") if func.attrs is not None else None) or Target.current(allow_none=False)
            sch = schedule_func(func, tgt, fallbacks=fallbacks, name=gv.name_hint)
            if sch is not None:
                updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _apply
