"""The Python API: one function per command, mirroring the CLI's options."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import data as D
from .errors import ModelError, PlanError


_SIMULATE = ("calibration_set", "simulate_plan", "parse_bits", "rounding_config", "rounding_summary")


def __getattr__(name):
    """``api.calibration_set``, ``api.simulate_plan``, ``api.parse_bits``, ``api.rounding_config``,
    ``api.rounding_summary``: re-exported from
    :mod:`cwhawq.simulate`, imported on first use (it loads torch; ``cwhawq bench``/``run`` do not need it)."""
    if name in _SIMULATE:
        from . import simulate

        return getattr(simulate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _file(spec) -> str | None:
    """The file behind a model spec (a .pt2 or .onnx path; None for zoo:NAME), for output checks."""
    s = str(spec) if spec is not None else ""
    return s if s and not s.startswith("zoo:") and not hasattr(spec, "module") else None


def evaluate(model: str, data: str | None = None, split: str = "test", data_dir: str | None = None,
             batch_size: int = 500, limit: int | None = None, plan=None, calib_batches: int = 4,
             act_scale: str = "pow2", finetune_epochs: int = 0, rounding: str | None = None,
             rounding_iters: int | None = None, rounding_seed: int = 0, progress: bool = False, log=None) -> dict:
    """Accuracy of a model spec (zoo:NAME, .pt2, .onnx) on a dataset split, optionally under a plan.

    ``data``: a dataset spec; None takes a zoo model's own dataset (:func:`cwhawq.checks.require_data`).
    ``rounding``: how a plan's weights are rounded (:func:`simulate_plan`). Under torchrun
    (:mod:`cwhawq.dist`) every rank predicts its share of the split and the correct counts are summed
    (a plan is simulated, calibrated and rounded on every rank alike)."""
    from . import dist
    from .checks import check_labels, model_classes, require_data
    from .evaluate import check_input_shape, onnx_predict, predict, sharded_accuracy
    from .simulate import rounding_config, rounding_summary, simulate_plan

    if not dist.is_main():
        progress, log = False, None

    rcfg = rounding_config(rounding, rounding_iters, rounding_seed, finetune_epochs)
    if str(model).endswith(".onnx"):
        if plan is not None:
            raise ModelError("--plan applies to PyTorch models; an exported .onnx already holds its plan")
        if Path(model).is_dir():
            raise ModelError(f"model {model} is a directory, not an ONNX file")
        if not Path(model).is_file():
            raise ModelError(f"model file not found: {model}")
        data = require_data(model, data, "evaluate it on")
        ds = D.load(data, split, data_dir).subset(limit)
        part = dist.shard_dataset(ds)
        logits = onnx_predict(model, part if len(part) else ds.subset(1), batch_size)
        check_labels(ds, logits.shape[1])   # all of the split's labels, on every rank alike
        return {"model": model, "data": data, "split": split, "n": len(ds),
                "accuracy": sharded_accuracy(ds, lambda p: logits if p is part else onnx_predict(model, p, batch_size))}
    from .models import load_model

    loaded = load_model(model)
    data = require_data(loaded, data, "evaluate it on")
    ds = D.load(data, split, data_dir).subset(limit)
    rep = {"model": model, "data": data, "split": split, "n": len(ds)}
    check_input_shape(loaded.input_shape, ds)
    check_labels(ds, model_classes(loaded))
    if plan is None:
        rep["accuracy"] = sharded_accuracy(ds, lambda part: predict(loaded.module, part, batch_size))
        return rep
    qm, p, sim = simulate_plan(loaded, plan, data, data_dir, calib_batches, act_scale, finetune_epochs,
                               rounding=rcfg, progress=progress, log=log)
    if finetune_epochs:
        rep["finetune_epochs"] = finetune_epochs
    rep["rounding"] = rounding_summary(sim)
    rep["accuracy"] = sharded_accuracy(ds, lambda part: predict(sim.module, part, batch_size))
    rep["plan"] = str(plan) if not hasattr(plan, "layers") else "<plan>"
    rep.update({k: v for k, v in p.compute_metrics(qm.layer_infos).items() if k in ("avg_w_bits", "avg_a_bits", "size_ratio")})
    return rep


def analyze(model: str, data: str | None = None, out: str | None = None, data_dir: str | None = None,
            batch_size: int = 128, batches: int = 1, max_probes: int = 512, tol: float = 0.01, seed: int = 0,
            scheme: str = "auto", plot: str | None = None, progress: bool = False, split: str = "train",
            log=None) -> dict | None:
    """Channel-wise Hessian traces and Omega of a model on ``batches`` x ``batch_size`` samples of the
    ``split`` of ``data`` (None: a zoo model's own dataset).

    ``log(line)``: a line per stage and per tenth of the probes (for runs without a terminal).
    Under torchrun (:mod:`cwhawq.dist`) the ranks share every batch's samples and sum their estimates;
    rank 0 writes ``out`` and ``plot`` and returns the sensitivities, the other ranks return None."""
    import time

    from . import dist
    from .checks import check_labels, check_outputs, data_file, model_classes, model_identity, require_data
    from .evaluate import check_input_shape
    from .graph import qmodel_from_loaded
    from .hessian import analyze as _analyze, parse_scheme, plot_sensitivity
    from .models import load_model

    t0 = time.time()
    say = _HeldLines(log) if log is not None and dist.is_main() else None
    if dist.is_main():
        check_outputs([("--out", out), ("--plot", plot)], [("MODEL", _file(model)), ("--data", data_file(data))])
    if scheme != "auto":
        parse_scheme(scheme)
    loaded = load_model(model)
    data = require_data(loaded, data, "analyze it on")
    ds = D.load(data, split, data_dir)
    check_input_shape(loaded.input_shape, ds)
    check_labels(ds, model_classes(loaded))
    qm = qmodel_from_loaded(loaded)
    if say is not None:
        say(f"loaded {model} ({len(qm.names)} quantizable layers) and {data}:{split} ({len(ds)} samples) "
            f"in {time.time() - t0:.1f} s")
    bar = None
    cb = None
    if progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=max_probes, desc="hessian probes", unit="probe", leave=False)

        def cb(p, worst):
            bar.update(p - bar.n)
            bar.set_postfix(rel_stderr=f"{worst:.3g}")
    elif say is not None:
        def cb(p, worst):
            say.release()
    try:
        sens = _analyze(qm, ds, batch_size=batch_size, batches=batches, max_probes=max_probes, tol=tol,
                        seed=seed, scheme=scheme, progress=cb, model_name=model, log=say)
    finally:
        if bar is not None:
            bar.close()
    if sens is None:   # not rank 0
        return None
    if dist.active():
        sens["processes"] = dist.world()
    sha = model_identity(loaded)[1]
    sens = {**{k: v for k, v in sens.items() if k != "layers"}, "model_sha256": sha, "split": split,
            "layers": sens["layers"]}
    if out:
        from .io import write_json

        write_json(out, sens, indent=None)
    if plot:
        plot_sensitivity(sens, plot)
    if say is not None and (out or plot):
        say(f"wrote {', '.join(str(p) for p in (out, plot) if p)}")
    return sens


class _HeldLines:
    """Progress lines that are held back until the first probe (or class pass of ``exact``) is done, so
    that input the first products reject (an operator without a second derivative, NaN data) ends in
    the error line alone; from then on every line goes out as it comes."""

    def __init__(self, log):
        self.log, self.held = log, []

    def release(self):
        if self.held is not None:
            for line in self.held:
                self.log(line)
            self.held = None

    def __call__(self, line: str):
        if self.held is not None and line.startswith(("  exact:", "  traces:", "sensitivities")):
            self.release()   # work has been done: what came before it is worth showing
        if self.held is None:
            self.log(line)
        else:
            self.held.append(line)


def _latency_table(t):
    """None, a :class:`cwhawq.latency.LatencyTable`, or a table file to load."""
    from .latency import LatencyTable

    return t if t is None or isinstance(t, LatencyTable) else LatencyTable.load(t)


def make_plan(method: str, model: str, sens=None, budget: str | None = None, bits="2,4,8", w_bits: int = 8,
              a_bits="8", out: str | None = None, latency_table=None) -> "Plan":
    """A baseline plan (uniform, hawq-v3, cw-greedy: any planner of :data:`cwhawq.baselines.PLANNERS`) for a
    model under a budget (``latency:R`` with ``latency_table``, a file or :class:`cwhawq.latency.LatencyTable`:
    uniform and hawq-v3)."""
    from . import baselines as B
    from .checks import check_outputs, load_sensitivity, model_identity
    from .graph import qmodel_from_loaded
    from .models import load_model
    from .plan import parse_budget
    from .simulate import parse_bits

    planner = B.get_planner(method)
    check_outputs([("--out", out)],
                  [("MODEL", _file(model)), ("--sens", sens if isinstance(sens, (str, Path)) else None),
                   ("--latency-table", latency_table if isinstance(latency_table, (str, Path)) else None)])
    bit_set = parse_bits(bits)
    bud = parse_budget(budget) if budget else None
    cfg = B.PlanConfig(budget=bud, bit_set=bit_set, a_bits=_parse_a_bits(a_bits), w_bits=w_bits)
    if planner.check is not None:
        planner.check(cfg)
    loaded = load_model(model)
    infos = qmodel_from_loaded(loaded).layer_infos
    table = _latency_table(latency_table)
    if planner.needs_budget and bud is None:
        raise PlanError(f"{method} needs --budget")
    if planner.needs_sens and sens is None:
        raise PlanError(f"{method} needs --sens (from cwhawq analyze)")
    s = load_sensitivity(sens, loaded) if planner.needs_sens else None
    plan = planner.make(infos, s, dataclasses.replace(cfg, latency=table))
    plan.model, plan.model_sha256 = model_identity(loaded)
    if out:
        plan.save(out)
    return plan


def _bit_choices():
    from .quantizers import BIT_CHOICES

    return BIT_CHOICES


def _parse_a_bits(a_bits):
    """--a-bits of the baselines: 'mixed' or one bit-width from the bit choices."""
    if str(a_bits) == "mixed":
        return "mixed"
    try:
        a = int(a_bits)
    except (TypeError, ValueError):
        raise PlanError(f"--a-bits {a_bits!r}: use N (one of {list(_bit_choices())}) or 'mixed'") from None
    if a not in _bit_choices():
        raise PlanError(f"--a-bits {a}: activation bits must come from {list(_bit_choices())}")
    return a


def search(model: str, data: str | None = None, sens=None, budget: str = "size:0.125", episodes: int = 300,
           out: str | None = None, seed: int = 0, resume: bool = False, bits="2,4,8", a_bits="8",
           data_dir: str | None = None, log: str | None = None, checkpoint: str | None = None,
           checkpoint_every: int = 5, val_samples: int = 1000, reward: str = "acc", finetune_steps: int = 0,
           calib_batches: int = 4, act_scale: str = "pow2", progress: bool = False, target: str | None = None,
           rpc: str | None = None, key: str | None = None, latency_table=None, latency_batch: int = 1,
           latency_grid: int = 2, latency_weight: float | None = None, measure: bool = True, cache_dir: str | None = None,
           timeout: float = 60.0, echo=None, rounding: str | None = None, rounding_iters: int | None = None,
           rounding_seed: int = 0, **options) -> "Plan":
    """DDPG search (``cwhawq search``): the best plan found under ``budget``, written to ``out``.

    Latency (docs/search.md, "Latency-aware search"): with ``target`` (and ``rpc``/``key`` for a board
    behind a tracker) the per-layer latency table of ``model`` is built for that target (cached
    measurements; written beside ``out`` as ``.latency.json``), or ``latency_table`` (a file or a
    :class:`cwhawq.latency.LatencyTable`) is used as it is. The table prices ``latency:R`` budgets and,
    with ``latency_weight`` > 0 (default: 1 with a table, else 0), the reward term
    ``latency_weight * (1 - T/T_fp32)``. With a target and
    ``measure``, the final plan and the fp32 model are then compiled and measured for real, and both
    the predicted and the measured latency go into ``plan.meta["latency"]`` and, as a last
    ``{"final": true, ...}`` line, into the JSONL log.

    ``rounding`` (``learned``, the default, or ``nearest``), ``rounding_iters``, ``rounding_seed``: the
    final plan's weight rounding, measured on the validation subset after the search
    (``plan.meta["search"]["rounding"]``); every episode's reward uses nearest rounding.

    Under torchrun (:mod:`cwhawq.dist`) every episode's plan is measured on the ranks' shares of the
    validation subset (the agent acts on rank 0); rank 0 writes the files. A latency table is then given
    as ``latency_table`` (``target`` measures on one process only).

    ``options``: ``enforce``, ``action_margin``, agent hyperparameters (warmup, hidden, lr_actor, lr_critic,
    tau, discount, batch_size, buffer_size, sigma, sigma_decay, sigma_min, init_action, baseline_alpha,
    updates_per_step, greedy_every), ``latency`` (a latency cost model) and ``on_episode`` (callback per
    episode record). See docs/search.md.
    """
    from .bench import parse_rpc
    from .latency import LatencyError
    from .plan import parse_budget
    from .search import search as _search
    from .simulate import rounding_config

    from . import dist
    from .checks import check_outputs, data_file, load_sensitivity, require_data
    from .errors import CwhawqError

    echo = echo if echo is not None and dist.is_main() else (lambda m: None)
    progress = progress and dist.is_main()
    if dist.active() and target is not None:
        raise CwhawqError(f"--target measures latencies in one process: build the table first (cwhawq latency-table "
                          f"MODEL --target {target} --out T.json) and give --latency-table T.json to the "
                          f"{dist.world()}-process search")
    out_p = Path(out) if out else None
    if dist.is_main():
        check_outputs([("--out", out), ("--log", log or (out_p.with_suffix(".jsonl") if out_p else None)),
                       ("--checkpoint", checkpoint or (out_p.with_suffix(".ckpt") if out_p else None)),
                       ("the latency table", out_p.with_suffix(".latency.json")
                        if out_p and target is not None and latency_table is None else None)],
                      [("MODEL", _file(model)), ("--data", data_file(data)),
                       ("--sens", sens if isinstance(sens, (str, Path)) else None),
                       ("--latency-table", latency_table if isinstance(latency_table, (str, Path)) else None)])
    remote = parse_rpc(rpc, key)
    rcfg = rounding_config(rounding, rounding_iters, rounding_seed)
    bud = parse_budget(budget)
    data = require_data(model, data, "search on")
    if sens is None:
        raise CwhawqError("the search needs a sensitivity file (--sens, from cwhawq analyze)")
    load_sensitivity(sens)   # a bad file fails here, before any latency is measured
    want = None
    if target is not None:   # a bad target fails here, before anything is measured
        from .backends.targets import resolve_target

        want = resolve_target(target).name
    table = _search_table(model, target, want, latency_table, rpc, remote, out,
                          latency_batch, latency_grid, data, data_dir, calib_batches, cache_dir, timeout, echo)
    if bud.kind == "latency" and table is None and options.get("latency") is None:
        raise LatencyError(f"budget {bud} needs a latency table: give --target T (measured here, or on boards "
                           f"with --rpc HOST:PORT --key K) or --latency-table FILE (cwhawq latency-table)")
    if table is not None:
        options["latency"] = table
    if latency_weight is None:
        latency_weight = 1.0 if table is not None else 0.0
    plan = _search(model, data, sens=sens, budget=budget, episodes=episodes, out=out, seed=seed, resume=resume,
                   bits=bits, a_bits=a_bits, data_dir=data_dir, log=log, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, val_samples=val_samples, reward=reward,
                   finetune_steps=finetune_steps, calib_batches=calib_batches, act_scale=act_scale,
                   progress=progress, latency_weight=latency_weight, rounding=rcfg, log_line=echo, **options)
    if table is None or target is None or not measure:
        return plan
    _measure_final(plan, model, table, target, remote, out, data, data_dir, calib_batches, timeout, echo, rcfg)
    return plan


def _search_table(model, target, want, latency_table, rpc, remote, out, latency_batch, latency_grid, data,
                  data_dir, calib_batches, cache_dir, timeout, echo):
    """The latency table of a search: ``latency_table`` as given (checked against the target), or built
    for ``target`` (beside ``out`` as ``.latency.json``), or None."""
    from .latency import LatencyError, build_table

    table = None
    if latency_table is not None:
        table = _latency_table(latency_table)
        if target is not None:
            if table.data["target"]["name"] != want:
                raise LatencyError(f"latency table {latency_table} is for target {table.data['target']['name']}, "
                                   f"not {want}")
    elif target is not None:
        t_out = Path(out).with_suffix(".latency.json") if out else None
        echo(f"latency table of {model} for {target} (batch {latency_batch}; cached measurements are reused)")
        table = build_table(model, target, t_out, batch=latency_batch, remote=remote, grid=latency_grid, data=data,
                            data_dir=data_dir,
                            calib_batches=calib_batches, cache_dir=cache_dir, timeout=timeout, log=echo)
    elif rpc is not None:
        raise LatencyError("--rpc needs --target (the target the boards run)")
    return table


def _measure_final(plan, model, table, target, remote, out, data, data_dir, calib_batches, timeout, echo,
                   rcfg=None) -> None:
    """Compile and measure the search's final plan and the fp32 model on the target; the numbers go into
    ``plan.meta["latency"]``, the plan file and, as a last ``{"final": true}`` line, the search log.
    ``rcfg``: the final plan's weight rounding (a RoundingConfig, or None: nearest), which the kept
    artifact gets (the codes do not change the latency)."""
    import json

    from .latency import measure_plans

    echo("compiling and measuring the final plan and the fp32 model")
    name = Path(out).stem if out else "search"
    res = measure_plans(model, [(plan, name)], target, batch=int(table.data["batch"]), remote=remote, table=table,
                        data=data, data_dir=data_dir, calib_batches=calib_batches, timeout=timeout,
                        artifacts_dir=Path(out).parent if out else None, log=echo,
                        rounding=rcfg if rcfg is not None else "nearest")
    r = res["plans"][0]
    plan.meta["latency"].update(
        measured_s=r["measured_s"], measured_fp32_s=res["fp32_s"], measured_ratio=r["measured_ratio"],
        rel_error=r["rel_error"], round_medians_s=r["round_medians_s"],
        fp32_round_medians_s=res["fp32_round_medians_s"], measured_where=res["where"], board=r["board"],
        artifact=r.get("artifact"))
    if out:
        plan.save(out)
    log_p = plan.meta["search"].get("log")
    if log_p:
        with open(log_p, "a") as f:
            f.write(json.dumps({"final": True, "episode": plan.meta["search"]["episodes"], "plan": out,
                                "latency": plan.meta["latency"]}) + "\n")


def bench(artifact: str, device: str | None = None, rpc: str | None = None, key: str | None = None,
          warmup: int = 10, repeat: int = 100, number: int = 0, batch: int = 1, timeout: float = 60.0,
          threads: int | None = None, log=None) -> dict:
    """Time a compiled artifact (an .onnx file: onnxruntime) here or on a board behind an RPC tracker
    (``rpc="HOST:PORT"``, ``key``): median, p90, min, stddev (seconds) and the input shapes.
    ``threads``: runtime threads for a local measurement (default: the physical cores)."""
    from .bench import bench as _bench, parse_rpc

    return _bench(artifact, device, parse_rpc(rpc, key), warmup=warmup, repeat=repeat, number=number, batch=batch,
                  timeout=timeout, threads=threads, log=log)


def latency_table(model: str, target: str = "llvm", out: str | None = None, rpc: str | None = None,
                  key: str | None = None, batch: int = 1, grid: int = 2, data=None,
                  data_dir: str | None = None, cache_dir: str | None = None, checks=(), repeat: int = 100,
                  timeout: float = 60.0, boards: int | None = None, jobs: int | None = None, log=None):
    """Per-layer latency table of a model for a target (a :class:`cwhawq.latency.LatencyTable`, the
    cost model of ``latency:R`` budgets), measured here or on the boards behind an RPC tracker."""
    from .bench import parse_rpc
    from .latency import build_table

    return build_table(model, target, out, batch=batch, remote=parse_rpc(rpc, key), grid=grid, data=data,
                       data_dir=data_dir, cache_dir=cache_dir, checks=checks, repeat=repeat, timeout=timeout,
                       max_boards=boards, jobs=jobs, log=log)


def compile_onnx(onnx_path, target: str = "llvm", out=None, arch: str | None = None, batch: int | None = None,
            tune_trials: int = 0, kernels: bool = True, log=None):
    """``cwhawq compile``: :func:`cwhawq.backends.tvm.compile_model` after checking, before any work, that
    the artifact and its manifest can be written and overwrite neither the ONNX input nor each other."""
    from .backends.tvm import compile_model, manifest_path
    from .checks import check_outputs

    src = Path(onnx_path)
    if src.is_dir():
        raise ModelError(f"{src} is a directory, not an ONNX file")
    art = Path(out) if out is not None else src.with_suffix(".so")
    check_outputs([("--out", art), ("its manifest", manifest_path(art))], [("MODEL.onnx", src)])
    return compile_model(onnx_path, target=target, out=out, arch=arch, batch=batch, tune_trials=tune_trials,
                         kernels=kernels, log=log)


def plan_from_onnx(onnx_path, out=None) -> "Plan":
    """``cwhawq plan from-onnx``: the plan an exported ONNX file holds, written to ``out``."""
    from .checks import check_outputs
    from .onnx_plan import plan_from_onnx as _from_onnx

    check_outputs([("--out", out)], [("MODEL.onnx", onnx_path)])
    plan = _from_onnx(onnx_path)
    if out:
        plan.save(out)
    return plan
