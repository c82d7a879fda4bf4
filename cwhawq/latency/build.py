"""Building a latency table (compile every cell, then measure them here or on boards behind a
tracker, through the cache) and measuring whole models and plans in the same rounds."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..backends.targets import resolve_target
from ..backends.tvm import compile_model
from ..bench import BoardPool, Remote, make_job, summarize
from ..checks import check_outputs, check_plan_model, data_file, require_data
from ..errors import PlanError
from ..evaluate import check_input_shape
from ..export import export_onnx
from ..graph import qmodel_from_loaded
from ..models import load_model
from ..plan import Plan, load_plan, uniform_plan
from ..quantize import calibrate_ranges
from ..quantizers import BIT_CHOICES
from ..simulate import calibration_set
from .cache import LatencyCache, tool_version
from .model import (BIT_CLASSES, DEFAULT_GRID, TABLE_FORMAT, TABLE_VERSION, LatencyError, grid_points,
                    point_counts)
from .probes import LayerShape, OneLayerExporter, fp32_onnx
from .table import LatencyTable

WHOLE_MODEL_ROUNDS = 3  # whole models: the least-contended of this many medians (package docstring)


# ===================================================================================== building
def _model_fingerprint(qm) -> str:
    h = hashlib.sha256(qm.gm.code.encode())
    for k, v in sorted(qm.gm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass
class _Cell:
    key: str
    fields: dict
    label: str
    shape_id: str | None = None
    digits: int | None = None
    point: tuple | None = None     # None: fp32
    shape: LayerShape | None = None
    result: dict | None = None
    cached: bool = False


def _check_plan_spec(spec, infos):
    """A plan file, a Plan, or ``uniform:W`` (every weight at W bits, activations 8)."""
    if isinstance(spec, Plan):
        return spec, spec.method or "plan"
    s = str(spec)
    if s.startswith("uniform:"):
        try:
            w = int(s.split(":", 1)[1])
        except ValueError:
            raise PlanError(f"--check {s!r}: use uniform:W (W in {','.join(map(str, BIT_CHOICES))}) "
                             "or a plan file") from None

        if w not in BIT_CHOICES:
            raise PlanError(f"--check {s!r}: weight bits must come from {list(BIT_CHOICES)}")
        p = uniform_plan(infos, w, 8)
        p.method = s
        return p, f"uniform W{w}A8"
    return load_plan(s), Path(s).name


def _layer_shapes(qm, ranges) -> tuple[dict[str, LayerShape], list[dict]]:
    """The distinct layer shapes (by id) and the table's per-layer entries (shape, calibrated ranges)."""
    shapes: dict[str, LayerShape] = {}
    layers = []
    for info in qm.layer_infos:
        signed = bool((ranges[info.name]["min"] < 0).any())
        shp = LayerShape.of_layer(info, qm.layer(info.name), signed)
        shapes.setdefault(shp.id, shp)
        layers.append({"name": info.name, "shape": shp.id, "a_signed": signed,
                       "a_ranges": [float(v) for v in ranges[info.name]["range"]]})
    return shapes, layers


def _cells(shapes: dict[str, LayerShape], base: dict, grid: int, qm, model) -> tuple[list[_Cell], _Cell]:
    """Every measurement of the table: per shape fp32 and each grid point at each digit count, and the
    whole fp32 model (the last cell, also returned)."""
    cells: list[_Cell] = []
    for sid, shp in shapes.items():
        f = {**base, "layer": shp.to_dict(), "bits": None}
        cells.append(_Cell(LatencyCache.key(f), f, f"{shp.describe()} fp32", sid, None, None, shp))
        for d in shp.digit_variants():
            for pt in grid_points(grid):
                counts = point_counts(pt, grid, shp.out_channels)
                f = {**base, "layer": shp.to_dict(), "bits": {str(k): v for k, v in counts.items()}, "digits": d}
                mix = "/".join(f"{b}:{counts[b]}" for b in BIT_CLASSES if counts[b])
                cells.append(_Cell(LatencyCache.key(f), f, f"{shp.describe()} w[{mix}] D{d}", sid, d, pt, shp))
    f = {**base, "model": _model_fingerprint(qm), "bits": None}
    model_cell = _Cell(LatencyCache.key(f), f, f"{model} fp32 (whole model)")
    cells.append(model_cell)
    return cells, model_cell


def _from_cache(cells: list[_Cell], cache: LatencyCache) -> tuple[dict[str, list[_Cell]], list[_Cell]]:
    """Cells grouped by key (one measurement per distinct key: equal grid counts on small layers
    collapse), cached results filled in; and one cell per key still to measure."""
    by_key: dict[str, list[_Cell]] = {}
    for c in cells:
        by_key.setdefault(c.key, []).append(c)
    todo = []
    for key, group in by_key.items():
        rec = cache.get(key)
        if rec is not None:
            for c in group:
                c.result, c.cached = rec, True
        else:
            todo.append(group[0])
    return by_key, todo


def _measurement_order(todo: list[_Cell], arts: list[Path], model_cell: _Cell) -> list[tuple[_Cell, Path]]:
    """The cells in measuring order, the whole model's WHOLE_MODEL_ROUNDS rounds spread over them
    (first, middle, last)."""
    seq = [(c, art) for c, art in zip(todo, arts) if c is not model_cell]
    if model_cell in todo:
        m = (model_cell, arts[todo.index(model_cell)])
        n = len(seq)
        at = sorted({round(r * n / max(1, WHOLE_MODEL_ROUNDS - 1)) for r in range(WHOLE_MODEL_ROUNDS)},
                    reverse=True) if WHOLE_MODEL_ROUNDS > 1 else [0]
        for pos in at:
            seq.insert(pos, m)
        seq += [m] * (WHOLE_MODEL_ROUNDS - len(at))
    return seq


def _record(c: _Cell, runs: list, group: list[_Cell], cache: LatencyCache) -> None:
    """Cache one cell's measurement (the least-contended round of a whole model) and give it to every
    cell of the same key."""
    rs = sorted(runs, key=lambda r: summarize(r["results_s"])["median_s"])
    res = rs[0]
    rec = {**summarize(res["results_s"]), "results_s": res["results_s"], "board": res.get("board"),
           "label": c.label, "digits": c.fields.get("digits"), "lowered": c.fields.get("_lowered"),
           "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "key": {k: v for k, v in c.fields.items() if not k.startswith("_")}}
    if len(rs) > 1:
        rec["round_medians_s"] = [summarize(r["results_s"])["median_s"] for r in runs]
    cache.put(c.key, rec)
    for cc in group:
        cc.result = rec


def build_table(model: str, target: str = "llvm", out: str | Path | None = None, batch: int = 1,
                remote: Remote | None = None, grid: int = DEFAULT_GRID, data=None,
                data_dir: str | None = None, calib_batches: int = 4, cache_dir: str | Path | None = None,
                checks=(), repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10,
                timeout: float = 60.0, max_boards: int | None = None, jobs: int | None = None,
                log=None) -> LatencyTable:
    """Build (or complete from the cache) the latency table of ``model`` for ``target``.

    ``checks``: plans (files, Plans or ``uniform:W``) compiled whole and measured to check the
    prediction (``table.data["checks"]``). Everything is compiled first (``jobs`` processes, default
    two), then measured: on this machine (``remote=None``, one measurement at a time) or on every
    free board behind the tracker, in parallel.
    """
    log = log or (lambda m: None)
    t_start = time.time()
    check_outputs([("--out", out)], [("MODEL", None if str(model).startswith("zoo:") else str(model)),
                                     ("--data", data_file(data))]
                  + [("--check", c) for c in checks
                     if isinstance(c, (str, Path)) and not str(c).startswith("uniform:")])
    if grid < 1 or grid > 8:
        raise LatencyError("--grid must be in 1..8")
    if batch < 1:
        raise LatencyError("--batch must be >= 1")
    ts = resolve_target(target)
    loaded = load_model(model)
    data = require_data(loaded, data, "calibrate it on")
    qm = qmodel_from_loaded(loaded)
    infos = qm.layer_infos
    check_plans = [_check_plan_spec(c, infos) for c in checks]
    for (p, name), c in zip(check_plans, checks):
        if not isinstance(c, str) or not c.startswith("uniform:"):
            check_plan_model(p, loaded, f"--check {name}")
        p.validate(infos)
    calib = calibration_set(data, data_dir, calib_batches)
    check_input_shape(loaded.input_shape, calib)
    ranges = calibrate_ranges(qm, calib)
    tool = tool_version()
    where = f"rpc:{remote.key}" if remote else "local"
    base = {"batch": int(batch), "target": ts.config, "device": ts.device, "where": where, "tool": tool}
    cache = LatencyCache(cache_dir)

    shapes, layers = _layer_shapes(qm, ranges)
    cells, model_cell = _cells(shapes, base, grid, qm, model)

    by_key, todo = _from_cache(cells, cache)
    n_cached = len(by_key) - len(todo)
    log(f"{len(infos)} layers, {len(shapes)} distinct shapes, {len(by_key)} measurements: {n_cached} cached, "
        f"{len(todo)} to measure ({'local' if remote is None else str(remote)}); cache {cache.root}")

    meas = {"warmup": int(warmup), "repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms)}
    tmp = Path(tempfile.mkdtemp(prefix="cwhawq-latency-"))
    pool = BoardPool(remote, timeout=timeout, max_boards=max_boards, log=log)
    by_id: dict[str, _Cell] = {}
    runs: dict[str, list] = {}

    def finish(job_id, res):
        c = by_id.pop(job_id)
        runs.setdefault(c.key, []).append(res)
        log(f"  {c.label}: {summarize(res['results_s'])['median_s'] * 1e6:.1f} us ({res.get('board')})")

    try:
        with pool:
            # 1. compile everything (in ``jobs`` processes), 2. measure everything: a measurement
            # never shares the CPU with a compilation. The whole model is measured in
            # WHOLE_MODEL_ROUNDS rounds spread over the measurements (first, middle, last).
            t0 = time.time()
            if todo:
                pool.start()  # the boards connect while this machine compiles
            arts = _compile_all(todo, model_cell, loaded, target, batch, grid, tmp, jobs, log, pool.poll)
            if todo:
                pool.start(wait=True)
            if todo:
                log(f"compiled {len(todo)} models in {time.time() - t0:.0f} s; measuring")
            seq = _measurement_order(todo, arts, model_cell)
            for k, (c, art) in enumerate(seq, 1):
                job = make_job(art, ts.device, batch, remote=remote, label=f"[{k}/{len(seq)}] {c.label}", **meas)
                jid = f"{art}#{k}"
                by_id[jid] = c
                pool.submit(jid, job)
                for j, r in pool.collect():
                    finish(j, r)
            for j, r in pool.drain():
                finish(j, r)
            for c in todo:
                _record(c, runs[c.key], by_key[c.key], cache)
            table = _assemble(model, ts, batch, remote, grid, tool, meas, shapes, layers, cells, model_cell)
            stats = {"measurements": len(by_key), "cached": n_cached, "measured": len(todo),
                     "boards": len({r.get("board") for rs in runs.values() for r in rs})}
            table.data["checks"] = _checks(table, loaded, check_plans, target, ts, batch, remote, pool, tmp, data,
                                           data_dir, calib_batches, meas, log)
            stats["seconds"] = round(time.time() - t_start, 1)
            table.data["stats"] = stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out:
        table.save(out)
    return table


def _compile_shape(target: str, batch: int, shape: dict, items: list) -> list:
    """Export and compile the cells of one layer shape (runs in a compile process).

    ``items``: ``(counts or None, digits, onnx path, artifact path)``; returns ``(lowered, digits)``
    per item, the digits the compiled kernel actually uses (0: float path, None: not lowered)."""
    ex = OneLayerExporter(LayerShape.from_dict(shape))
    out = []
    for counts, digits, onnx_path, art in items:
        ex.write(counts, digits, Path(onnx_path))
        res = compile_model(onnx_path, target, art, batch=batch)
        Path(onnx_path).unlink(missing_ok=True)
        lowered = res.report["lowered"]
        act = (lowered[0].get("act") or {}) if lowered else {}
        out.append((bool(lowered), (act.get("digits") if act.get("integer") else 0) if lowered else None))
    return out


def _compile_all(todo, model_cell, loaded, target, batch, grid, tmp: Path, jobs, log, poll=None) -> list[Path]:
    """Compile every cell to be measured; returns the artifacts in ``todo`` order. ``poll()`` is
    called after each shape (the board pool: a tracker that cannot be reached fails early)."""
    arts = [tmp / f"{k}.so" for k in range(len(todo))]
    groups: dict[str, list[int]] = {}
    for k, c in enumerate(todo):
        if c is not model_cell:
            groups.setdefault(c.shape_id, []).append(k)
    tasks = []
    for sid, ks in groups.items():
        shape = todo[ks[0]].shape
        items = [(None if todo[k].point is None else point_counts(todo[k].point, grid, shape.out_channels),
                  todo[k].digits or 1, str(tmp / f"{k}.onnx"), str(arts[k])) for k in ks]
        tasks.append((sid, ks, shape, items))

    def record(ks, shape, outs):
        for k, (lowered, got) in zip(ks, outs):
            c = todo[k]
            c.fields["_lowered"] = lowered
            if c.digits is not None and lowered and got != c.digits:
                raise LatencyError(f"internal: the one-layer model of {shape.describe()} compiled with {got} "
                                   f"activation digit(s), expected {c.digits}")
        log(f"compiled {shape.describe()}: {len(ks)} model(s)")
        if poll is not None:
            poll()

    jobs = max(1, int(jobs if jobs else min(2, os.cpu_count() or 1)))
    if jobs == 1 or len(tasks) <= 1:
        for sid, ks, shape, items in tasks:
            record(ks, shape, _compile_shape(target, batch, shape.to_dict(), items))
    else:
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = {ex.submit(_compile_shape, target, batch, shape.to_dict(), items): (ks, shape)
                    for sid, ks, shape, items in tasks}
            try:
                for fut in cf.as_completed(futs):
                    ks, shape = futs[fut]
                    record(ks, shape, fut.result())
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    if model_cell in todo:
        k = todo.index(model_cell)
        fp32_onnx(loaded, tmp / f"{k}.onnx")
        compile_model(tmp / f"{k}.onnx", target, arts[k], batch=batch)
        log("compiled the whole fp32 model")
    return arts


def _assemble(model, ts, batch, remote, grid, tool, meas, shapes, layers, cells, model_cell) -> LatencyTable:
    shape_out = {}
    for sid, shp in shapes.items():
        shape_out[sid] = {"shape": shp.to_dict(), "describe": shp.describe(), "fp32_s": None, "lowered": None,
                          "cells": {}}
    for c in cells:
        if c is model_cell:
            continue
        s = shape_out[c.shape_id]
        if c.point is None:
            s["fp32_s"] = c.result["median_s"]
        else:
            s["cells"].setdefault(str(c.digits), []).append([c.point[0], c.point[1], c.result["median_s"]])
            if c.result.get("lowered") is not None:
                s["lowered"] = c.result["lowered"]
    layers_fp32 = sum(shape_out[e["shape"]]["fp32_s"] for e in layers)
    t_model = model_cell.result["median_s"]
    data = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "model": model, "target": ts.summary(),
        "batch": int(batch), "where": str(remote) if remote else "local", "tool": tool,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "grid": int(grid), "bit_classes": list(BIT_CLASSES), "measure": meas,
        "fp32": {"model_s": t_model, "layers_s": layers_fp32, "overhead_s": t_model - layers_fp32},
        "shapes": shape_out, "layers": layers,
    }
    return LatencyTable(data)


def _measure_whole(pool, jobs: list[dict]) -> tuple[list[list[float]], list]:
    """Median of every job in each of WHOLE_MODEL_ROUNDS rounds (all jobs once per round, one after
    another), and the board that measured it: whole models keep their least-contended round."""
    medians: list[list[float]] = [[] for _ in jobs]
    boards: list = [None] * len(jobs)
    for _ in range(WHOLE_MODEL_ROUNDS if jobs else 0):
        for k, job in enumerate(jobs):
            res = pool.run(job)
            medians[k].append(summarize(res["results_s"])["median_s"])
            boards[k] = res.get("board")
    return medians, boards


def _compile_plan(loaded, plan, target, batch, onnx_path: Path, art: Path, data, data_dir, calib_batches,
                  rounding="nearest") -> None:
    """Export and compile a plan to time it. The weight codes do not change the latency, so nearest
    rounding (fast) unless ``rounding`` asks otherwise (an artifact that is kept)."""
    export_onnx(loaded, plan, onnx_path, data=data, data_dir=data_dir, calib_batches=calib_batches, verify=0,
                rounding=rounding)
    compile_model(onnx_path, target, art, batch=batch)


def _checks(table: LatencyTable, loaded, plans, target, ts, batch, remote, pool, tmp, data, data_dir, calib_batches,
            meas, log) -> list[dict]:
    """Compile whole plans, measure them (WHOLE_MODEL_ROUNDS rounds over all of them, keeping each
    plan's least-contended round, as for the fp32 model) and compare with the table's prediction."""
    jobs = []
    for k, (plan, name) in enumerate(plans):
        onnx_path, art = tmp / f"check{k}.onnx", tmp / f"check{k}.so"
        _compile_plan(loaded, plan, target, batch, onnx_path, art, data, data_dir, calib_batches)
        jobs.append(make_job(art, ts.device, batch, remote=remote, label=f"check {name}", **meas))
    medians, boards = _measure_whole(pool, jobs)
    out = []
    for (plan, name), ms, board in zip(plans, medians, boards):
        measured = min(ms)
        predicted = table.predict(plan)
        out.append({"plan": name, "predicted_s": predicted, "measured_s": measured, "round_medians_s": ms,
                    "rel_error": predicted / measured - 1.0, "predicted_ratio": predicted / table.fp32_seconds,
                    "measured_ratio": measured / table.fp32_seconds, "board": board})
        log(f"check {name}: predicted {predicted * 1e3:.3f} ms, measured {measured * 1e3:.3f} ms "
            f"({out[-1]['rel_error'] * 100:+.1f}%)")
    return out


def measure_artifacts(artifacts, device: str | None = None, batch: int = 1, remote: Remote | None = None,
                      repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10, timeout: float = 60.0,
                      log=None) -> list[dict]:
    """Measure compiled artifacts (``[(path, name)]``; an ``.onnx`` file runs in onnxruntime) in the
    same WHOLE_MODEL_ROUNDS rounds, each round a median of ``repeat`` short runs (``cwhawq bench``'s
    statistics), and keep each one's least-contended round: ``[{name, measured_s, round_medians_s,
    board}]`` in the order given."""
    meas = {"warmup": int(warmup), "repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms)}
    jobs = [make_job(p, None if str(p).endswith(".onnx") else device, batch, remote=remote, label=name, **meas)
            for p, name in artifacts]
    if log:
        log(f"measuring {len(jobs)} model(s), {WHOLE_MODEL_ROUNDS} rounds ({'local' if remote is None else remote})")
    with BoardPool(remote, timeout=timeout, max_boards=1, log=log) as pool:
        medians, boards = _measure_whole(pool, jobs)
    return [{"name": name, "measured_s": min(ms), "round_medians_s": ms, "board": board}
            for (_, name), ms, board in zip(artifacts, medians, boards)]


def measure_plans(model: str, plans, target: str = "llvm", batch: int = 1, remote: Remote | None = None,
                  table: LatencyTable | None = None, data=None, data_dir: str | None = None,
                  calib_batches: int = 4, repeat: int = 100, min_repeat_ms: int = 1, warmup: int = 10,
                  timeout: float = 60.0, artifacts_dir: str | Path | None = None, log=None,
                  rounding="nearest") -> dict:
    """Compile ``plans`` (``[(Plan, name)]``) and the fp32 model for ``target`` and measure them all in
    the same rounds (:func:`measure_artifacts`, here or on a board behind a tracker), so that the
    measured ratio to fp32 compares numbers taken under the same conditions.

    Returns ``{"fp32_s", "fp32_round_medians_s", "plans": [{plan, measured_s, round_medians_s,
    measured_ratio, predicted_s?, predicted_ratio?, rel_error?, board, artifact?}], target, batch,
    where}``; the prediction fields when ``table`` is given. ``artifacts_dir``: keep the compiled
    plans there (``<name>.so``, their weights rounded as ``rounding`` says: ``nearest``, ``learned`` or a
    :class:`cwhawq.rounding.RoundingConfig`); otherwise they live in a temporary directory (nearest
    rounding: the codes do not change the latency)."""
    log = log or (lambda m: None)
    ts = resolve_target(target)
    loaded = load_model(model)
    data = require_data(loaded, data, "calibrate it on")
    tmp = Path(tempfile.mkdtemp(prefix="cwhawq-measure-"))
    keep = Path(artifacts_dir) if artifacts_dir else None
    try:
        fp32_onnx(loaded, tmp / "fp32.onnx")
        compile_model(tmp / "fp32.onnx", target, tmp / "fp32.so", batch=batch)
        arts = [(tmp / "fp32.so", "fp32")]
        for k, (plan, name) in enumerate(plans):
            art = (keep / f"{name}.so") if keep else tmp / f"plan{k}.so"
            log(f"compiling {name} for {ts.name}")
            _compile_plan(loaded, plan, target, batch, tmp / f"plan{k}.onnx", art, data, data_dir, calib_batches,
                          rounding if artifacts_dir is not None else "nearest")
            arts.append((art, name))
        res = measure_artifacts(arts, ts.device, batch, remote, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                warmup=warmup, timeout=timeout, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fp32_s = res[0]["measured_s"]
    out = {"target": ts.name, "batch": int(batch), "where": str(remote) if remote else "local",
           "fp32_s": fp32_s, "fp32_round_medians_s": res[0]["round_medians_s"], "plans": []}
    for (plan, name), m, (art, _) in zip(plans, res[1:], arts[1:]):
        rec = {"plan": name, "measured_s": m["measured_s"], "round_medians_s": m["round_medians_s"],
               "measured_ratio": m["measured_s"] / fp32_s, "board": m["board"]}
        if keep:
            rec["artifact"] = str(art)
        if table is not None:
            pred = table.predict(plan)
            rec.update(predicted_s=pred, predicted_ratio=pred / table.fp32_seconds,
                       rel_error=pred / m["measured_s"] - 1.0)
        out["plans"].append(rec)
        log(f"{name}: measured {m['measured_s'] * 1e3:.3f} ms ({rec['measured_ratio']:.3f} x fp32 "
            f"{fp32_s * 1e3:.3f} ms)" + (f", predicted {rec['predicted_s'] * 1e3:.3f} ms "
                                          f"({rec['rel_error'] * 100:+.1f}%)" if table else ""))
    return out
