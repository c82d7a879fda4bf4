"""The search loop: episodes, JSONL log, atomic checkpoints, resume, and the final plan.

One episode: the agent acts layer by layer (warm-up: random), the environment builds the plan and
enforces the budget, the evaluator measures the plan on the fixed validation subset, the effective
transitions go to the replay buffer, and (after warm-up) the agent takes one update per layer.

Files (defaults derived from ``out``, e.g. ``plan.json``):
- ``plan.jsonl``: one JSON line per finished episode (episode, reward, accuracy, loss, cost and plan
  metrics, per-layer ratios after enforcement, demotions, noise sigma, best so far, timings);
- ``plan.ckpt``: written atomically every ``checkpoint_every`` episodes, after the last one, and when
  Ctrl-C stops the run (the current episode is finished first; a second Ctrl-C aborts at once). It
  holds the agent (networks, targets, optimizers), the replay buffer, the random-generator state,
  the episode count, the timings and the best plan. ``resume=True`` continues from it: the log is cut
  back to the checkpoint's episodes and the episodes after it are replayed, deterministically, so
  the final plan is the one an uninterrupted run with the same seed gives. ``episodes`` may be raised
  on resume (the noise schedule depends only on the episode index).

Under torchrun (:mod:`cwhawq.dist`) the agent lives on rank 0: each episode it acts, broadcasts its
actions, and every rank builds the same plan from them and measures it on its share of the
validation subset; the evaluator sums the shares, so the reward is the same number on every rank
and equals one process's. Only rank 0 updates the agent and writes the log, the checkpoints and the
plan; on resume it reads the checkpoint and broadcasts where the search stands.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import data as D
from .. import dist
from ..checks import check_labels, check_same_model, load_sensitivity, model_classes, model_identity, require_data
from ..errors import CwhawqError
from ..evaluate import check_input_shape
from ..graph import qmodel_from_loaded
from ..io import atomic_path, write_text
from ..models import load_model
from ..plan import Budget, parse_budget, plan_from_dict, plan_metrics
from ..quantize import Quantizer
from ..simulate import calibration_set, parse_bits
from .costs import make_cost_model
from .ddpg import DDPG, DDPGConfig
from .env import ENFORCE_MODES, QuantSearchEnv, sensitivity_by_layer
from .reward import REWARDS, PlanEvaluator

CHECKPOINT_FORMAT = "cwhawq-search-checkpoint"
CHECKPOINT_VERSION = 1
PHASES = ("plan", "quantize", "evaluate", "update", "io")
# options added after version 1 checkpoints were first written: their values in older checkpoints
CONFIG_DEFAULTS = {"action_margin": 0.0, "latency_weight": 0.0, "latency": None}
AGENT_DEFAULTS = {"greedy_every": 0}
_TABLE_ID = ("model", "target", "batch", "where", "grid", "fp32", "shapes", "layers")  # what a latency table predicts from


class SearchError(CwhawqError):
    """A search that cannot run or resume as asked."""


def parse_a_bits(a_bits, bit_set) -> tuple[int, ...]:
    """``8`` (all channels), ``mixed`` (the weight bit set) or a list such as ``4,8``."""
    if isinstance(a_bits, int):
        return parse_bits([a_bits])
    if str(a_bits).strip() == "mixed":
        return tuple(bit_set)
    return parse_bits(a_bits)


@contextlib.contextmanager
def _deferred_sigint():
    """Ctrl-C sets a flag (checked between episodes); a second Ctrl-C interrupts immediately."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _sha1_json(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _round(x, nd=6):
    return None if x is None else round(float(x), nd)


@dataclass
class SearchConfig:
    """One search run (:func:`search`): what ``cwhawq search`` and :func:`cwhawq.api.search` pass on.

    ``agent``: :class:`DDPGConfig` fields (warmup, hidden, lr_actor, lr_critic, tau, discount, batch_size,
    buffer_size, sigma, sigma_decay, sigma_min, init_action, baseline_alpha, updates_per_step,
    greedy_every). ``latency``: a measured latency model, a :class:`cwhawq.latency.LatencyTable` or a
    cost model (see :mod:`cwhawq.search.costs`): needed by ``latency:`` budgets, and by
    ``latency_weight`` > 0, which adds ``latency_weight * (1 - T/T_fp32)`` (the predicted latency ratio)
    to the reward (see :mod:`cwhawq.search.reward`). ``reward``: a name of
    :data:`cwhawq.search.reward.REWARDS`; ``enforce`` (a name of :data:`cwhawq.search.env.ENFORCE_MODES`)
    and ``action_margin``: see :mod:`cwhawq.search.env`. ``on_episode(record)`` is called after every
    episode. Every episode's reward is measured with nearest rounding (fast); ``rounding`` (a
    :class:`cwhawq.rounding.RoundingConfig`, or None: nearest) then learns the weight rounding of the
    best plan on the calibration samples and measures it on the same validation subset
    (``plan.meta["search"]["rounding"]``; ``log_line`` gets its progress lines). Neither is part of
    the checkpoint's identity: the episodes do not depend on them.
    """

    model: str
    data: str | None = None
    sens: object = None
    budget: object = "size:0.125"
    episodes: int = 300
    out: str | None = None
    seed: int = 0
    resume: bool = False
    bits: object = "2,4,8"
    a_bits: object = "8"
    data_dir: str | None = None
    log: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 5
    val_samples: int = 1000
    reward: str = "acc"
    finetune_steps: int = 0
    calib_batches: int = 4
    act_scale: str = "pow2"
    enforce: str = "omega"
    action_margin: float = 0.0
    latency: object = None
    latency_weight: float = 0.0
    progress: bool = False
    on_episode: object = None
    rounding: object = None
    log_line: object = None
    agent: dict = field(default_factory=dict)

    @classmethod
    def of(cls, *args, **kwargs) -> "SearchConfig":
        """The config of a call in the keyword style (``search(model, data, sens=..., warmup=20, ...)``):
        arguments in field order, agent options (:class:`DDPGConfig` fields) as extra keywords."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "agent"]
        if len(args) > len(names):
            raise TypeError(f"search() takes at most {len(names)} positional arguments")
        given = dict(zip(names, args))
        for k in kwargs:
            if k in given:
                raise TypeError(f"search() got multiple values for argument {k!r}")
        own = {k: v for k, v in kwargs.items() if k in names}
        agent = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**given, **own, agent=agent)


def search(*args, **kwargs):
    """DDPG search of a channel-wise mixed-precision plan under a budget: ``search(SearchConfig(...))``,
    or the same fields as arguments (``search(model, data, sens=..., budget=..., warmup=20)``, see
    :meth:`SearchConfig.of`).

    Returns the best plan found (a :class:`cwhawq.plan.Plan`, method ``ddpg``, meeting the budget),
    written to ``out`` when given.
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], SearchConfig):
        cfg = args[0]
    else:
        cfg = SearchConfig.of(*args, **kwargs)
    return _Search(cfg).run()


def _check_range(cfg: DDPGConfig) -> None:
    if cfg.batch_size < 1 or cfg.buffer_size < 1 or cfg.hidden < 1 or cfg.warmup < 0:
        raise SearchError("batch_size, buffer_size and hidden must be >= 1, warmup >= 0")
    for name, lo, hi, lo_open in (("lr_actor", 0, math.inf, True), ("lr_critic", 0, math.inf, True),
                                  ("tau", 0, 1, True), ("discount", 0, 1, False), ("sigma", 0, math.inf, False),
                                  ("sigma_decay", 0, 1, True), ("sigma_min", 0, math.inf, False),
                                  ("baseline_alpha", 0, 1, False), ("init_action", 0, 1, False)):
        v = float(getattr(cfg, name))
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            raise SearchError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")


class _Search:
    """One run: :meth:`_options` (cheap checks), :meth:`_setup` (model, data, environment, agent),
    :meth:`_resume`, :meth:`_episodes`, :meth:`_best_plan`."""

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg

    def run(self):
        t_start = time.perf_counter()
        self._options()
        self._setup()
        self._resume()
        self.setup_seconds = time.perf_counter() - t_start
        if self.log_p is not None and dist.is_main():
            _truncate_log(self.log_p, self.start)
        self._episodes()
        return self._best_plan()

    # ---- options (cheap checks first)
    def _options(self) -> None:
        c = self.cfg
        self.bud = c.budget if isinstance(c.budget, Budget) else parse_budget(c.budget)
        self.w_set = parse_bits(c.bits)
        self.a_set = parse_a_bits(c.a_bits, self.w_set)
        if c.episodes < 1:
            raise SearchError("episodes must be >= 1")
        if c.checkpoint_every < 1:
            raise SearchError("checkpoint_every must be >= 1")
        if c.enforce not in ENFORCE_MODES:
            raise SearchError(f"enforce must be one of {', '.join(ENFORCE_MODES)}, got {c.enforce!r}")
        if c.reward not in REWARDS:
            raise SearchError(f"reward must be one of {', '.join(REWARDS)}, got {c.reward!r}")
        if not (math.isfinite(c.latency_weight) and c.latency_weight >= 0):
            raise SearchError(f"latency_weight must be >= 0, got {c.latency_weight}")
        if c.latency_weight and c.latency is None:
            raise SearchError("a latency weight needs a latency table (--target T or --latency-table FILE)")
        unknown = set(c.agent) - set(DDPGConfig.__dataclass_fields__)
        if unknown:
            raise SearchError(f"unknown agent option(s): {', '.join(sorted(unknown))}")
        self.agent_cfg = DDPGConfig(**c.agent)
        _check_range(self.agent_cfg)
        if c.sens is None:
            raise SearchError("the search needs a sensitivity file (--sens, from cwhawq analyze)")
        self.sens_d = load_sensitivity(c.sens)
        self.sens_src = "sensitivity" if isinstance(c.sens, dict) else str(c.sens)
        out_p = Path(c.out) if c.out else None
        self.out_p = out_p
        self.log_p = Path(c.log) if c.log else (out_p.with_suffix(".jsonl") if out_p else None)
        self.ckpt_p = Path(c.checkpoint) if c.checkpoint else (out_p.with_suffix(".ckpt") if out_p else None)
        if c.resume and self.ckpt_p is None:
            raise SearchError("resume needs a checkpoint path (--checkpoint, or --out to derive it)")

    # ---- model, data, environment
    def _setup(self) -> None:
        c = self.cfg
        loaded = self.loaded = load_model(c.model)
        check_same_model(self.sens_d.get("model"), self.sens_d.get("model_sha256"), loaded,
                         "the sensitivity" if isinstance(c.sens, dict) else f"sensitivity file {c.sens}")
        data = self.data = require_data(loaded, c.data, "search on")
        qm = self.qm = qmodel_from_loaded(loaded)
        infos = self.infos = qm.layer_infos
        sensitivity_by_layer(self.sens_d, infos, self.sens_src)
        all_bits = tuple(sorted(set(self.w_set) | set(self.a_set)))
        latency = c.latency
        self.table = table = latency if hasattr(latency, "cost_model") else None
        if table is not None:
            latency = table.cost_model(infos)
        self.latency = latency
        self.lat_cost = None if latency is None else make_cost_model(Budget("latency", 1.0), infos, latency, all_bits)
        self.cost = make_cost_model(self.bud, infos, latency, all_bits)
        if not 0.0 <= c.action_margin < 0.5:
            raise SearchError(f"action_margin must be in [0, 0.5), got {c.action_margin}")
        self.env = QuantSearchEnv(infos, self.sens_d, self.bud, self.cost, self.w_set, self.a_set, enforce=c.enforce,
                                  action_margin=c.action_margin)
        val = self.val = D.load(data, "val", c.data_dir).subset(c.val_samples)
        check_input_shape(loaded.input_shape, val)
        check_labels(val, model_classes(loaded))
        val_share = dist.shard_dataset(val)   # this rank's share (all of it on one process)
        calib = self.calib = calibration_set(data, c.data_dir, c.calib_batches)
        quantizer = self.quantizer = Quantizer(qm, calib, act_scale=c.act_scale)
        train = D.load(data, "train", c.data_dir) if c.finetune_steps else None
        if train is not None:
            check_labels(train, model_classes(loaded))
        self.evaluator = PlanEvaluator(qm, quantizer, val_share, c.reward, finetune_steps=c.finetune_steps, train=train,
                                       w_bits=self.w_set)
        self.agent = DDPG(self.env.state_dim, self.env.action_dim, self.agent_cfg, seed=c.seed)
        self.config = {
            "model": c.model, "data": data, "budget": str(self.bud), "w_bits": list(self.w_set),
            "a_bits": list(self.a_set), "seed": int(c.seed), "reward": c.reward, "val_samples": int(c.val_samples),
            "finetune_steps": int(c.finetune_steps), "calib_batches": int(c.calib_batches), "act_scale": c.act_scale,
            "enforce": c.enforce, "action_margin": float(c.action_margin), "agent": self.agent_cfg.to_dict(),
            "latency_weight": float(c.latency_weight),
            "latency": None if latency is None else (_sha1_json({k: table.data.get(k) for k in _TABLE_ID})
                                                      if table is not None else "model"),
            "layers": [i.name for i in infos],
            "sens_sha1": _sha1_json([[l.get("name"), l.get("weight", {}).get("trace"),
                                      l.get("activation", {}).get("trace")] for l in self.sens_d["layers"]])}

    # ---- resume from the checkpoint
    def _resume(self) -> None:
        self.start, self.best, self.totals, self.prev_elapsed = 0, None, {p: 0.0 for p in PHASES}, 0.0
        if not dist.active():
            self._resume_here()
            return
        err = None
        if dist.is_main():   # rank 0 holds the checkpoint (and the agent); the others learn where it stands
            try:
                self._resume_here()
            except SearchError as e:
                err = str(e)
        err, self.start, self.best, self.totals, self.prev_elapsed = dist.broadcast(
            (err, self.start, self.best, self.totals, self.prev_elapsed))
        if err is not None:
            raise SearchError(err)

    def _resume_here(self) -> None:
        ckpt_p, config = self.ckpt_p, self.config
        if not (self.cfg.resume and ckpt_p.is_file()):
            return
        ck = _load_checkpoint(ckpt_p)
        old = dict(ck["config"])
        if isinstance(old.get("agent"), dict):
            old["agent"] = {**AGENT_DEFAULTS, **old["agent"]}
        diff = [k for k in config if old.get(k, CONFIG_DEFAULTS.get(k)) != config[k]]
        if diff:
            k = diff[0]
            there, here = old.get(k, CONFIG_DEFAULTS.get(k)), config[k]
            if k == "agent" and isinstance(there, dict):
                k = next(f for f in here if there.get(f) != here[f])
                there, here = there.get(k), here[k]
            raise SearchError(f"checkpoint {ckpt_p} belongs to another search ({k}: {there!r} there, {here!r} "
                              f"here); delete it or run without --resume")
        self.agent.load_state_dict(ck["agent"])
        self.start, self.best = int(ck["episode"]), ck["best"]
        self.totals, self.prev_elapsed = dict(ck["times"]), float(ck["elapsed"])

    # ---- episodes
    def _episodes(self) -> None:
        c, cfg = self.cfg, self.agent_cfg
        episodes, best, totals = c.episodes, self.best, self.totals
        bar = None
        main = dist.is_main()
        if c.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=episodes, initial=min(self.start, episodes), desc="ddpg search", unit="ep", leave=False,
                       dynamic_ncols=True)
            if best is not None:
                bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy'] * 100:.2f}%")
        t_loop = time.perf_counter()
        ep = self.start
        try:
            logctx = open(self.log_p, "a") if self.log_p is not None and main else contextlib.nullcontext()
            with _deferred_sigint() as sigint, logctx as logf:
                while ep < episodes:
                    rec, plan_d = _episode(ep, self.env, self.agent, self.evaluator, self.bud, cfg, self.lat_cost,
                                           c.latency_weight)
                    for p in PHASES[:-1]:
                        totals[p] += rec["time"][p]
                    key = (rec["reward"], -rec["loss"])
                    if best is None or key > (best["reward"], -best["loss"]):
                        best = {"episode": ep, "reward": rec["reward"], "loss": rec["loss"],
                                "accuracy": rec["accuracy"], "cost": rec["cost"],
                                "latency_ratio": rec.get("latency_ratio"), "plan": plan_d}
                    self.best = best
                    rec["best_reward"], rec["best_episode"] = _round(best["reward"]), best["episode"]
                    t_io = time.perf_counter()
                    if logf is not None:
                        logf.write(json.dumps(rec) + "\n")
                        logf.flush()
                    ep += 1
                    self.ep = ep
                    stop = sigint["hit"]
                    if dist.active():   # Ctrl-C as rank 0 saw it: every rank stops after the same episode
                        stop = dist.broadcast(stop)
                    if self.ckpt_p is not None and main and (ep % c.checkpoint_every == 0 or ep == episodes or stop):
                        elapsed = self.prev_elapsed + time.perf_counter() - t_loop
                        _save_checkpoint(self.ckpt_p, self.config, ep, self.agent, best, totals, elapsed)
                    totals["io"] += time.perf_counter() - t_io
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy'] * 100:.2f}%")
                    if c.on_episode is not None and main:
                        c.on_episode(rec)
                    if stop:
                        raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()
        self.ep = ep
        self.run_seconds = time.perf_counter() - t_loop

    # ---- the best plan
    def _best_plan(self):
        c, best, ep, bud, cost, table = self.cfg, self.best, self.ep, self.bud, self.cost, self.table
        if best is None:  # resumed a finished checkpoint with fewer episodes: nothing ran, nothing saved
            raise SearchError("no episode was run")
        plan = plan_from_dict(best["plan"], "search")
        plan.model, plan.method, plan.budget = c.model, "ddpg", str(bud)
        plan.model_sha256 = model_identity(self.loaded)[1]
        metrics = plan_metrics(plan, self.infos)
        metrics[cost.metric] = cost.exact(plan)
        if not bud.satisfied(metrics):  # cannot happen: every plan is enforced exactly
            raise SearchError(f"internal error: the best plan does not meet {bud} ({metrics[cost.metric]})")
        metrics["meets_budget"] = True
        plan.metrics = metrics
        n_done = max(ep, 1)
        plan.meta = {"search": {
            "algorithm": "ddpg", "episodes": ep, "seed": int(c.seed), "budget": str(bud), "w_bits": list(self.w_set),
            "a_bits": list(self.a_set), "reward": c.reward, "val_samples": len(self.val),
            "finetune_steps": int(c.finetune_steps), "enforce": c.enforce, "action_margin": float(c.action_margin),
            "latency_weight": float(c.latency_weight), "best_episode": best["episode"],
            "best_reward": best["reward"], "val_accuracy": best["accuracy"], "val_loss": best["loss"],
            "fp32_val_accuracy": self.evaluator.fp32_accuracy, "fp32_val_loss": self.evaluator.fp32_loss,
            "seconds": self.prev_elapsed + self.run_seconds, "setup_seconds": self.setup_seconds,
            "seconds_per_episode": {p: self.totals[p] / n_done for p in PHASES}, "agent": self.agent_cfg.to_dict(),
            "log": str(self.log_p) if self.log_p else None,
            "checkpoint": str(self.ckpt_p) if self.ckpt_p else None}}
        if self.start > 0:
            plan.meta["search"]["resumed_at"] = self.start
        if c.rounding is not None:
            plan.meta["search"]["rounding"] = _final_rounding(plan, self.qm, self.quantizer, self.evaluator,
                                                              self.calib, c.rounding, c.progress, c.log_line)
        else:
            plan.meta["search"]["rounding"] = {"method": "nearest"}
        if self.lat_cost is not None:
            lat = {"predicted_ratio": self.lat_cost.exact(plan)}
            if table is not None:
                # predicted_ratio is the figure the budget was enforced on (the table's separable sum);
                # predicted_s and table_ratio are the table's whole-model prediction, floored at its
                # slowest layer alone: they differ from it only where measurement noise put the sum
                # below that floor (a tiny model on a fast CPU: the sum can even be negative)
                lat.update(predicted_s=table.predict(plan), table_ratio=table.ratio(plan),
                           table_fp32_s=table.fp32_seconds, target=table.data["target"]["name"],
                           batch=table.data["batch"], where=table.data["where"])
            plan.meta["latency"] = lat
        if self.out_p is not None and dist.is_main():
            plan.save(self.out_p)
        return plan


def _final_rounding(plan, qm, quantizer, evaluator, calib, cfg, progress, log_line) -> dict:
    """Learned rounding of the final plan and its accuracy on the search's validation subset."""
    from ..rounding import learn_rounding

    sim = quantizer.apply(plan)
    try:
        rep = learn_rounding(sim, calib, cfg, progress=progress, log=log_line)
        acc, loss = evaluator._measure()
    finally:
        qm.reset()
    return {"method": "learned", "val_accuracy": acc, "val_loss": loss, "seconds": rep["seconds"],
            "iters": rep["iters"], "seed": rep["seed"], "mode": rep["mode"], "inputs": rep["inputs"],
            "samples": rep["samples"]}


@contextlib.contextmanager
def _one_thread():
    """The agent's networks are tiny: several threads only add synchronisation (badly so on busy cores)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _episode(ep: int, env: QuantSearchEnv, agent: DDPG, evaluator: PlanEvaluator, bud: Budget, cfg: DDPGConfig,
             lat_cost=None, latency_weight: float = 0.0):
    t0 = time.perf_counter()
    s = env.reset()
    main = dist.is_main()
    if main:   # the agent acts on rank 0 only; under torchrun the other ranks replay its actions
        actions = []
        with _one_thread():
            while s is not None:
                a = agent.act(s, ep)
                actions.append(a)
                s = env.step(a)
        if dist.active():
            dist.broadcast(actions)
    else:
        for a in dist.broadcast(None):
            s = env.step(a)
    plan, info = env.finish()
    eff = env.effective_actions()
    states = env.states_for(eff)
    t1 = time.perf_counter()
    ev = evaluator(plan)
    t2 = time.perf_counter()
    R = ev["reward"]
    # the environment already priced the plan when the budget is the latency itself
    lat = None if lat_cost is None else info["cost"] if lat_cost is env.cost else lat_cost.exact(plan)
    if latency_weight:
        R = R + latency_weight * (1.0 - lat)
    L = env.L
    losses = None
    for t in range(L if main else 0):
        nxt = states[t + 1] if t + 1 < L else np.zeros_like(states[t])
        agent.observe(states[t], eff[t], R, nxt, t == L - 1)
    if main:
        agent.update_baseline(R)
    if ep >= cfg.warmup and main:
        with _one_thread():
            for _ in range(L * cfg.updates_per_step):
                losses = agent.update() or losses
    t3 = time.perf_counter()
    m = plan_metrics(plan, env.infos)
    rec = {"episode": ep, "reward": _round(R, 8), "accuracy": ev["accuracy"], "loss": _round(ev["loss"], 8),
           "cost": _round(info["cost"], 8), "budget": str(bud), "latency_ratio": _round(lat),
           "metrics": {k: _round(m[k], 6) for k in ("size_ratio", "avg_w_bits", "avg_a_bits", "bops_ratio")},
           "w_ratios": info["w_ratios"], "a_ratios": info["a_ratios"], "demotions": info["demotions"],
           "explore": "random" if ep < cfg.warmup else ("greedy" if agent.greedy(ep) else "noise"),
           "sigma": None if ep < cfg.warmup else _round(agent.sigma(ep)), "cached": ev["cached"],
           "critic_loss": None if losses is None else _round(losses[0], 6),
           "time": {"plan": t1 - t0, "quantize": ev["t_quantize"], "evaluate": ev["t_evaluate"],
                    "update": t3 - t2}}
    rec["time"] = {k: round(v, 5) for k, v in rec["time"].items()}
    if not (math.isfinite(R)):
        rec["reward"] = None
    return rec, plan.to_dict()


def _truncate_log(path: Path, keep: int) -> None:
    """Keep the log's lines of episodes < keep (a fresh run keeps none)."""
    if not path.exists():
        if keep == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        return
    lines = []
    if keep > 0:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["episode"] < keep:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                break   # a torn last line from a killed process
    write_text(path, "".join(line + "\n" for line in lines))


def _save_checkpoint(path: Path, config, episode, agent, best, totals, elapsed) -> None:
    obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "episode": episode,
           "agent": agent.state_dict(), "best": best, "times": totals, "elapsed": elapsed}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SearchError(f"checkpoint {path} is unreadable ({why}); "
                          f"delete it to start over") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise SearchError(f"{path} is not a cwhawq search checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise SearchError(f"checkpoint {path} has version {ck.get('version')}, this cwhawq reads {CHECKPOINT_VERSION}")
    return ck
