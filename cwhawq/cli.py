"""The ``cwhawq`` command line: thin click wrappers over the Python API.

Errors caused by input (CwhawqError) print one line on stderr and exit with code 2; ``--debug``
shows the traceback instead.

Under torchrun (``torchrun --nproc-per-node N -m cwhawq analyze|eval|search ...``, docs/scale-out.md)
the process group is joined before the command runs; only rank 0 prints results and progress, and
the other ranks' errors carry their rank.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from . import __version__
from .baselines import PLANNERS
from .errors import CwhawqError
from .quantizers import ACT_SCALE_MODES

_DEBUG = {"on": False}
# the commands torchrun may run on several processes (cwhawq.dist)
DISTRIBUTED_COMMANDS = ("analyze", "eval", "search")


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch."""
    if "cwhawq.dist" not in sys.modules:
        return 0
    return sys.modules["cwhawq.dist"].rank()


def _fail(msg: str, code: int = 2):
    r = _rank()
    if r and msg.startswith(f"rank {r}: "):
        msg = msg[len(f"rank {r}: "):]
    click.echo(f"{f'rank {r}: ' if r else ''}error: {msg}", err=True)
    sys.exit(code)


def handled(fn):
    """Map user errors to one line + exit 2, and Ctrl-C to exit 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CwhawqError as e:
            if _DEBUG["on"]:
                raise
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:   # a file named on the command line that cannot be read or written
            if _DEBUG["on"] or e.filename is None:
                raise
            _fail(f"{e.strerror}: {e.filename}")
    return wrapper


class _Group(click.Group):
    """Usage errors (a missing option, a value out of range, an unknown option) are one line on stderr,
    ``error: ...``, exit code 2, like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:   # `cwhawq`, `cwhawq plan`: the help, as click does
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            msg = " ".join(e.format_message().split())
            _fail(msg + hint, e.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def emit(obj: dict, as_json: bool, text: str) -> None:
    if _rank() == 0:
        click.echo(json.dumps(obj) if as_json else text)


def _threads(n: int | None) -> None:
    """--threads: torch's intra-op threads for this process (default: torch's own choice)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


threads_option = click.option("--threads", "threads", default=None, type=click.IntRange(1),
                              help="Torch threads of this process (with torchrun: of each process).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cwhawq")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """cwhawq: channel-wise mixed-precision quantization (CW-HAWQ).

    Pipeline: analyze (Hessian sensitivity) -> plan / search (bit plans) -> eval -> export (ONNX)
    -> compile (TVM) -> bench. MODEL is zoo:NAME or a torch.export .pt2 archive; DATA is
    fashion-mnist, a directory of IDX files, or an .npz file.

    Data-parallel on several processes or machines: torchrun --nproc-per-node N -m cwhawq
    analyze|eval|search ... (docs/scale-out.md).
    """
    _DEBUG["on"] = debug
    from . import dist

    if dist.launched() and ctx.invoked_subcommand is not None:
        if ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
            _fail(f"cwhawq {ctx.invoked_subcommand} runs in one process; torchrun runs "
                  f"{', '.join(DISTRIBUTED_COMMANDS)}")
        try:
            dist.init()
        except CwhawqError as e:
            _fail(str(e).splitlines()[0], e.exit_code)
        ctx.call_on_close(lambda: _leave_group(dist))


def _leave_group(dist) -> None:
    """End of a torchrun command: leave the process group; after a normal end also skip the
    interpreter's teardown (its outputs are written and closed): on rank 1 of 2-process runs that
    had ended normally, PyTorch's C++ teardown at interpreter exit aborted the process
    ("terminate called without an active exception", exit -6) after the group was destroyed, in 2
    of 5 full test-suite runs on a 2-core machine, never alone."""
    ok = _ended_normally()
    dist.finish(sync=ok)
    if ok:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _ended_normally() -> bool:
    """In a context's close callbacks: the command returned (or exited with code 0)."""
    e = sys.exc_info()[1]
    return e is None or (isinstance(e, SystemExit) and e.code in (0, None))


data_option = click.option("--data", "data_spec", default=None,
                           help="Dataset spec: fashion-mnist, a directory of IDX files, or an .npz file. "
                                "Default: a zoo model's own dataset; required for any other model.")
data_dir_option = click.option("--data-dir", default=None, envvar="CWHAWQ_DATA",
                               help="Directory of the Fashion-MNIST IDX files (env CWHAWQ_DATA).")


def _rounding_help(what: str) -> str:
    return (f"Weight rounding {what}: learned (AdaRound-style reconstruction of every weight's rounding on "
            f"the calibration samples, docs/rounding.md; the default, except with --finetune-epochs) or "
            f"nearest.")


class _RoundingItersOption(click.Option):
    """--rounding-iters, whose help names the default steps when the help is shown (cwhawq.rounding
    loads torch, which importing the CLI does not)."""

    def get_help_record(self, ctx):
        from .rounding import DEFAULT_ITERS

        self.help = f"Optimisation steps per block of the learned rounding (default {DEFAULT_ITERS})."
        return super().get_help_record(ctx)


def _rounding_options(what: str):
    def deco(fn):
        fn = click.option("--rounding-seed", default=0, show_default=True, type=int,
                          help="Seed of the learned rounding (batch order).")(fn)
        fn = click.option("--rounding-iters", cls=_RoundingItersOption, default=None, type=click.IntRange(0),
                          help="Optimisation steps per block of the learned rounding.")(fn)
        fn = click.option("--rounding", default=None, type=click.Choice(["learned", "nearest"]),
                          help=_rounding_help(what))(fn)
        return fn
    return deco


def _rounding_text(r: dict | None) -> str:
    if not r or r.get("method") != "learned":
        return "nearest rounding"
    return (f"learned rounding, {r['seconds']:.1f} s" + (", reused" if r.get("cached") else ""))


def _log_err(m):
    click.echo(m, err=True)


@cli.command("eval")
@click.argument("model")
@data_option
@data_dir_option
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1))
@click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate a seeded subset of N samples.")
@click.option("--plan", "plan_path", default=None, help="Bit plan (JSON) to simulate.")
@click.option("--calib-batches", default=4, show_default=True, type=click.IntRange(1),
              help="Batches of the train split used to calibrate activation ranges (with --plan).")
@click.option("--act-scale", default="pow2", show_default=True, type=click.Choice(ACT_SCALE_MODES),
              help="Activation scale representation (with --plan): pow2 (S * 2^k per channel), migrate (the "
                   "same codes, the 2^k moved into the weights before they are quantized: one 8-bit digit "
                   "in the kernels) or free.")
@click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(0),
              help="Quantization-aware fine-tuning epochs (STE) with the plan fixed.")
@_rounding_options("(with --plan)")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handled
def eval_cmd(model, data_spec, data_dir, split, batch_size, limit, plan_path, calib_batches, act_scale,
             finetune_epochs, rounding, rounding_iters, rounding_seed, threads, as_json):
    """Accuracy of MODEL (zoo:NAME, .pt2 or .onnx) on a split of DATA, optionally under a bit plan.

    A .pt2 (or an .onnx not exported from a zoo model) needs --data. Under torchrun each process
    evaluates its share of the split."""
    from . import api

    _threads(threads)
    t0 = time.time()
    rep = api.evaluate(model, data_spec, split=split, data_dir=data_dir, batch_size=batch_size, limit=limit,
                       plan=plan_path, calib_batches=calib_batches, act_scale=act_scale,
                       finetune_epochs=finetune_epochs, rounding=rounding, rounding_iters=rounding_iters,
                       rounding_seed=rounding_seed, progress=not as_json and sys.stderr.isatty(),
                       log=None if as_json else _log_err)
    rep["seconds"] = round(time.time() - t0, 3)
    emit(rep, as_json, f"{rep['model']} on {rep['data']}:{rep['split']} (n={rep['n']}): "
                       f"accuracy {rep['accuracy'] * 100:.2f}%"
                       + (f" with plan {plan_path} ({_rounding_text(rep.get('rounding'))})" if plan_path else ""))


@cli.command("compile")
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("--target", default="llvm", show_default=True,
              help="llvm, aarch64, aarch64-dotprod, cuda, jetson-orin, raspberry-pi-4, or a TVM target JSON.")
@click.option("--arch", default=None, help="CUDA architecture, e.g. sm_80, sm_87 (CUDA targets).")
@click.option("--out", "out", default=None, help="Artifact path: .so (shared library) or .tar (objects to "
              "link on the board). Default: MODEL.so.")
@click.option("--batch", default=None, type=click.IntRange(1), help="Fix a symbolic batch dimension.")
@click.option("--tune", "tune_trials", default=0, show_default=True, type=click.IntRange(0),
              help="MetaSchedule trials per remaining operator (cached tuning database).")
@click.option("--no-kernels", is_flag=True, help="Let TVM compile every layer in fp32 (a baseline).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@handled
def compile_cmd(onnx_path, target, arch, out, batch, tune_trials, no_kernels, as_json):
    """Compile an ONNX model with TVM: quantized layers on packed low-bit kernels."""
    from . import api
    from .backends.cli_commands import compile_text

    res = api.compile_onnx(onnx_path, target=target, out=out, arch=arch, batch=batch, tune_trials=tune_trials,
                           kernels=not no_kernels, log=lambda m: click.echo(m, err=True))
    emit(res.manifest, as_json, compile_text(res))


@cli.command("run")
@click.argument("artifact")
@click.option("--input", "inputs", multiple=True, required=True,
              help="Input .npy (in order), or NAME=FILE.npy; an .npz gives inputs by name. The dtype must "
                   "be the artifact's (float64 is cast to float32; integer arrays are refused).")
@click.option("--out", "out", required=True, help="Output .npy (one output) or .npz (several).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handled
def run_cmd(artifact, inputs, out, as_json):
    """Run a compiled ARTIFACT (.so + manifest) on the local CPU or GPU."""
    from .backends.cli_commands import run_files

    rep = run_files(artifact, inputs, out)
    emit(rep, as_json, f"wrote {', '.join(o['name'] + str(o['shape']) for o in rep['outputs'])} to {out} "
                       f"({rep['seconds'] * 1e3:.2f} ms on {rep['device']})")


@cli.command("analyze")
@click.argument("model")
@data_option
@data_dir_option
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "val", "test", "all"]),
              help="Split of DATA the samples come from (all: every sample of an x,y .npz).")
@click.option("--out", required=True, help="Sensitivity JSON to write (docs/sensitivity.md).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--batches", default=1, show_default=True, type=click.IntRange(1))
@click.option("--max-probes", default=512, show_default=True, type=click.IntRange(1))
@click.option("--tol", default=0.01, show_default=True, type=click.FloatRange(0, min_open=False),
              help="Stop when every layer trace's standard error is below tol x |trace|.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--scheme", default="auto", show_default=True,
              help="Probing scheme: auto (piecewise-linear nets: exact or ggn, whichever needs fewer backward "
                   "passes; else layer), exact, ggn, layer, network, interleave:K, channel (docs/hessian.md).")
@click.option("--plot", default=None, help="Write a plot of the per-layer channel-trace distributions.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handled
def analyze_cmd(model, data_spec, data_dir, split, out, batch_size, batches, max_probes, tol, seed, scheme, plot,
                threads, as_json):
    """Channel-wise Hessian traces and trace-weighted sensitivities (Omega) of MODEL on BATCHES x BATCH_SIZE
    samples of a split of DATA (a .pt2 needs --data).

    Without a terminal, a line per stage and per tenth of the probes goes to stderr. Under torchrun
    each process takes its share of every batch's samples."""
    from . import api

    _threads(threads)
    tty = sys.stderr.isatty()
    sens = api.analyze(model, data_spec, out=out, data_dir=data_dir, split=split, batch_size=batch_size,
                       batches=batches,
                       max_probes=max_probes, tol=tol, seed=seed, scheme=scheme, plot=plot,
                       progress=not as_json and tty, log=None if as_json or tty else _log_err)
    if sens is None:   # a rank other than 0 under torchrun: rank 0 reports
        return
    summary = {k: sens[k] for k in ("model", "scheme", "probes", "hvps", "converged", "worst_rel_stderr", "loss",
                                    "seconds")}
    summary["layers"] = len(sens["layers"])
    summary["out"] = out
    emit(summary, as_json, f"analyzed {len(sens['layers'])} layers of {model} ({sens['scheme']}, "
                           f"{sens['probes']} probes, {sens['seconds']:.1f} s, worst layer rel. stderr "
                           f"{sens['worst_rel_stderr']:.3g}) -> {out}")


@cli.group("plan")
def plan_group():
    """Make bit plans: baselines on a budget (uniform, hawq-v3, cw-greedy)."""


def _plan_options(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print the plan's metrics as JSON.")(fn)
    fn = click.option("--out", required=True, help="Plan JSON to write (docs/plans.md).")(fn)
    fn = click.option("--a-bits", default="8", show_default=True,
                      help="Activation bits: N for all channels, or 'mixed' (chosen with the weights).")(fn)
    fn = click.option("--bits", default="2,4,8", show_default=True, help="Bit set.")(fn)
    fn = click.option("--latency-table", default=None,
                      help="Latency table (cwhawq latency-table) for latency:R budgets.")(fn)
    fn = click.option("--budget", default=None, help="size:R, bits:B, bops:R or latency:R (with --latency-table).")(fn)
    return fn


def _report_plan(plan, out, as_json):
    m = plan.metrics
    emit({"method": plan.method, "out": out, **m}, as_json,
         f"{plan.method}: avg weight bits {m['avg_w_bits']:.3f}, avg act bits {m['avg_a_bits']:.3f}, size "
         f"{m['weight_bytes'] / 1024:.1f} KiB ({m['size_ratio']:.4f} of fp32), BOPs ratio {m['bops_ratio']:.5f}"
         + (f", predicted latency {m['latency_ratio']:.3f} x fp32" if "latency_ratio" in m else "")
         + ("" if m.get("meets_budget", True) else "  [does NOT meet the budget]") + f" -> {out}")


# one command per registered planner that works from a sensitivity file (uniform has its own, below)
for _method in [p.name for p in PLANNERS.values() if p.needs_sens]:
    def _make(method):
        @plan_group.command(method, help=f"{method} plan for MODEL under --budget, from --sens.")
        @click.argument("model")
        @click.option("--sens", required=True, help="Sensitivity JSON from cwhawq analyze.")
        @_plan_options
        @handled
        def cmd(model, sens, budget, latency_table, bits, a_bits, out, as_json):
            from . import api

            plan = api.make_plan(method, model, sens=sens, budget=budget, bits=bits, a_bits=a_bits, out=out,
                                 latency_table=latency_table)
            _report_plan(plan, out, as_json)
        return cmd
    _make(_method)


@plan_group.command("uniform")
@click.argument("model")
@click.option("--w-bits", default=8, show_default=True, type=int)
@_plan_options
@handled
def plan_uniform(model, w_bits, budget, latency_table, bits, a_bits, out, as_json):
    """Every channel at --w-bits / --a-bits (reports whether --budget is met)."""
    from . import api

    plan = api.make_plan("uniform", model, budget=budget, bits=bits, w_bits=w_bits, a_bits=a_bits, out=out,
                         latency_table=latency_table)
    _report_plan(plan, out, as_json)


@plan_group.command("from-onnx")
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("--out", required=True, help="Plan JSON to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@handled
def plan_from_onnx_cmd(onnx_path, out, as_json):
    """Rebuild the bit plan of an exported ONNX file from its annotations (docs/export.md)."""
    from . import api

    plan = api.plan_from_onnx(onnx_path, out)
    n = sum(len(lp.w_bits) for lp in plan.layers)
    emit(plan.to_dict(), as_json, f"plan of {len(plan.layers)} layers ({n} weight channels, method "
                                  f"{plan.method}, budget {plan.budget}) from {onnx_path} -> {out}")


@cli.command("export")
@click.argument("model")
@click.option("--plan", "plan_path", default=None, help="Bit plan (JSON) to export (required unless --fp32).")
@click.option("--fp32", is_flag=True, help="Export the float model instead (batch norms folded, no QDQ).")
@click.option("--out", required=True, help="ONNX file to write (e.g. model.q.onnx).")
@click.option("--format", "fmt", default="qdq", show_default=True, type=click.Choice(["qdq", "int8-container"]),
              help="qdq: INT8/INT4/INT2 weight groups; int8-container: every group INT8 (opset 17+).")
@click.option("--opset", default=None, type=int, help="ONNX opset (default: the lowest the plan's bits need).")
@data_option
@data_dir_option
@click.option("--calib-batches", default=4, show_default=True, type=click.IntRange(1),
              help="Batches of the train split calibrating activation ranges (as eval --plan).")
@click.option("--act-scale", default="pow2", show_default=True, type=click.Choice(ACT_SCALE_MODES),
              help="Activation scales (as eval --plan): pow2, migrate (exponents in the weights) or free.")
@click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(0),
              help="Quantization-aware fine-tuning epochs before export (as eval --plan).")
@click.option("--sens", default=None, help="Sensitivity JSON (cwhawq analyze) summarised in the annotations.")
@click.option("--verify", default=64, show_default=True, type=click.IntRange(0),
              help="Calibration samples run through onnxruntime and compared with the simulation (0: skip).")
@click.option("--eval", "eval_split", default=None, type=click.Choice(["train", "val", "test", "all"]),
              help="Also measure simulated and onnxruntime accuracy on this split (recorded in the file).")
@_rounding_options("of the exported codes (as eval --plan; recorded in cwhawq.rounding)")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handled
def export_cmd(model, plan_path, fp32, out, fmt, opset, data_spec, data_dir, calib_batches, act_scale,
               finetune_epochs, sens, verify, eval_split, rounding, rounding_iters, rounding_seed, as_json):
    """Export MODEL (zoo:NAME or .pt2) under a bit plan to ONNX (QDQ, per-channel mixed precision).

    The plan's activation ranges are calibrated on DATA (a .pt2 needs --data); the file records which
    data (cwhawq.calibration)."""
    from .export import export_fp32, export_onnx, summary_text

    if fp32 == (plan_path is not None):
        raise CwhawqError("export: give either --plan PLAN or --fp32")
    if fp32:
        export_fp32(model, out)
        emit({"out": out, "fp32": True}, as_json, f"fp32 model -> {out}")
        return

    rep = export_onnx(model, plan_path, out, data=data_spec, fmt=fmt, opset=opset, data_dir=data_dir,
                      calib_batches=calib_batches, act_scale=act_scale, finetune_epochs=finetune_epochs,
                      sens=sens, verify=verify, eval_split=eval_split, rounding=rounding,
                      rounding_iters=rounding_iters, rounding_seed=rounding_seed,
                      progress=not as_json and sys.stderr.isatty(), log=None if as_json else _log_err)
    emit(rep, as_json, summary_text(rep))


@cli.command("demo")
@click.option("--out", "out_dir", default="demo_out", show_default=True, help="Directory for the report and files.")
@click.option("--model", default="zoo:resnet20-fmnist", show_default=True)
@data_option
@data_dir_option
@click.option("--budget", default="bits:3", show_default=True, help="Budget of the searched and baseline plans.")
@click.option("--episodes", default=200, show_default=True, type=click.IntRange(1), help="DDPG episodes.")
@click.option("--quick", is_flag=True, help="A shorter run: at most 60 episodes, 2000 test images, at most 32 "
                                            "Hessian probes, only the CW-HAWQ plan compiled. Most of its minutes "
                                            "are the learned rounding of the five plans (--rounding nearest "
                                            "skips it).")
@click.option("--no-compile", is_flag=True, help="Skip TVM compilation and latency (a model the compiler "
                                                 "refuses skips them with a warning).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True,
              help="Continue the search of an interrupted demo (same --out) from its checkpoint.")
@click.option("--rounding", default="learned", show_default=True, type=click.Choice(["learned", "nearest"]),
              help="Weight rounding of every plan (the report also gives each plan's nearest-rounding accuracy).")
@click.option("--rounding-iters", default=None, type=click.IntRange(0),
              help="Steps per block of the learned rounding (default: as eval --plan; 100 with --quick).")
@handled
def demo_cmd(out_dir, model, data_spec, data_dir, budget, episodes, quick, no_compile, seed, resume, rounding,
             rounding_iters):
    """The whole pipeline: analyze, search, export, compile, bench, and a report in --out."""
    from .demo import DemoConfig, run_demo

    res = run_demo(DemoConfig(out=out_dir, model=model, data=data_spec, data_dir=data_dir, budget=budget,
                              episodes=episodes, quick=quick, seed=seed, compile=not no_compile, resume=resume,
                              rounding=rounding, rounding_iters=rounding_iters),
                   echo=click.echo)
    click.echo(f"report written to {res['report']}")


@cli.command("search")
@click.argument("model")
@data_option
@data_dir_option
@click.option("--sens", required=True, help="Sensitivity JSON from cwhawq analyze.")
@click.option("--budget", required=True,
              help="size:R, bits:B, bops:R or latency:R (R: fraction of the fp32 model's latency on --target).")
@click.option("--episodes", default=300, show_default=True, type=click.IntRange(1))
@click.option("--out", required=True, help="Plan JSON to write; the log (.jsonl) and checkpoint (.ckpt) go beside it.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an interrupted search.")
@click.option("--bits", default="2,4,8", show_default=True, help="Weight bit set.")
@click.option("--a-bits", default="8", show_default=True,
              help="Activation bits: N for all channels, 'mixed' (the bit set) or a list such as 4,8.")
@click.option("--log", default=None, help="JSONL log, one line per episode (default: OUT with .jsonl).")
@click.option("--checkpoint", default=None, help="Checkpoint file (default: OUT with .ckpt).")
@click.option("--checkpoint-every", default=5, show_default=True, type=click.IntRange(1))
@click.option("--val-samples", default=1000, show_default=True, type=click.IntRange(1),
              help="Fixed subset of the val split the reward is measured on.")
@click.option("--reward", default="acc", show_default=True, type=click.Choice(["acc", "loss"]))
@click.option("--finetune-steps", default=0, show_default=True, type=click.IntRange(0),
              help="Very short QAT fine-tune (SGD steps) before each evaluation.")
@click.option("--enforce", default="omega", show_default=True, type=click.Choice(["omega", "layers"]),
              help="Order in which over-budget plans are lowered (docs/search.md).")
@click.option("--action-margin", default=0.0, show_default=True, type=click.FloatRange(0, 0.5, max_open=True),
              help="Saturate actions within this margin of 0 and 1 (pure bit levels reachable).")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(0), help="Random-action episodes.")
@click.option("--hidden", default=300, show_default=True, type=click.IntRange(1))
@click.option("--lr-actor", default=1e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--lr-critic", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--tau", default=0.01, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Soft target update rate.")
@click.option("--discount", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--buffer-size", default=20000, show_default=True, type=click.IntRange(1))
@click.option("--sigma", default=0.3, show_default=True, type=click.FloatRange(0), help="Initial exploration noise.")
@click.option("--sigma-decay", default=0.985, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--baseline-alpha", default=0.1, show_default=True, type=click.FloatRange(0, 1))
@click.option("--greedy-every", default=0, show_default=True, type=click.IntRange(0),
              help="N > 0: the first episode after warm-up and every N-th after it act without noise.")
@click.option("--target", default=None,
              help="Latency on this target: measure its per-layer latency table (cached), price latency:R "
                   "budgets with it, then compile and measure the final plan (docs/search.md).")
@click.option("--rpc", default=None, metavar="HOST:PORT", help="Measure on boards behind this TVM RPC tracker.")
@click.option("--key", default=None, help="Device key the boards registered with (rpc_server --key).")
@click.option("--latency-table", default=None, help="A table from cwhawq latency-table instead of measuring one.")
@click.option("--latency-batch", default=1, show_default=True, type=click.IntRange(1),
              help="Batch size the latency table is measured at.")
@click.option("--latency-grid", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Bit-mix grid of the latency table (cwhawq latency-table --grid).")
@click.option("--cache", "cache_dir", default=None,
              help="Latency measurement cache (default $CWHAWQ_CACHE or ~/.cache/cwhawq/latency).")
@click.option("--latency-weight", default=None, type=click.FloatRange(0),
              help="Reward += WEIGHT x (1 - predicted latency / fp32 latency). Default: 1 with a latency "
                   "table, else 0.")
@click.option("--no-measure", is_flag=True, help="Do not compile and measure the final plan on --target.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds allowed for each remote measurement step.")
@_rounding_options("of the final plan, measured on the validation subset after the search (every episode's "
                   "reward uses nearest rounding)")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handled
def search_cmd(model, data_spec, data_dir, sens, budget, episodes, out, seed, resume, bits, a_bits, log, checkpoint,
               checkpoint_every, val_samples, reward, finetune_steps, enforce, action_margin, warmup, hidden,
               lr_actor, lr_critic, tau, discount, batch_size, buffer_size, sigma, sigma_decay, baseline_alpha,
               greedy_every, target, rpc, key, latency_table, latency_batch, latency_grid, cache_dir, latency_weight,
               no_measure, timeout, rounding, rounding_iters, rounding_seed, threads,
               as_json):
    """DDPG search of a channel-wise mixed-precision plan for MODEL under --budget (docs/search.md).

    Under torchrun each process measures every episode's plan on its share of the validation subset."""
    from . import api

    _threads(threads)

    plan = api.search(model, data_spec, sens=sens, budget=budget, episodes=episodes, out=out, seed=seed,
                      resume=resume, bits=bits, a_bits=a_bits, data_dir=data_dir, log=log, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, val_samples=val_samples, reward=reward,
                      finetune_steps=finetune_steps, enforce=enforce, action_margin=action_margin,
                      progress=not as_json and sys.stderr.isatty(),
                      target=target, rpc=rpc, key=key, latency_table=latency_table, latency_batch=latency_batch,
                      latency_grid=latency_grid, cache_dir=cache_dir,
                      latency_weight=latency_weight,
                      measure=not no_measure, timeout=timeout, echo=lambda m: click.echo(m, err=True),
                      warmup=warmup,
                      hidden=hidden, lr_actor=lr_actor, lr_critic=lr_critic, tau=tau, discount=discount,
                      batch_size=batch_size, buffer_size=buffer_size, sigma=sigma, sigma_decay=sigma_decay,
                      baseline_alpha=baseline_alpha, greedy_every=greedy_every, rounding=rounding,
                      rounding_iters=rounding_iters, rounding_seed=rounding_seed)
    s, m = plan.meta["search"], plan.metrics
    summary = {"out": out, "episodes": s["episodes"], "best_episode": s["best_episode"],
               "val_accuracy": s["val_accuracy"], "fp32_val_accuracy": s["fp32_val_accuracy"],
               "best_reward": s["best_reward"], "seconds": s["seconds"], "budget": s["budget"],
               **{k: m[k] for k in ("size_ratio", "avg_w_bits", "avg_a_bits", "bops_ratio")}}
    text = (f"ddpg: best of {s['episodes']} episodes (episode {s['best_episode']}): val accuracy (nearest rounding) "
            f"{s['val_accuracy'] * 100:.2f}% (fp32 {s['fp32_val_accuracy'] * 100:.2f}%), avg weight "
            f"bits {m['avg_w_bits']:.3f}, avg act bits {m['avg_a_bits']:.3f}, size ratio "
            f"{m['size_ratio']:.4f}, BOPs ratio {m['bops_ratio']:.5f} [{s['budget']}] -> {out}")
    rr = s.get("rounding") or {}
    summary["rounding"] = rr
    if rr.get("method") == "learned":
        text += (f"\nfinal plan with learned rounding: val accuracy {rr['val_accuracy'] * 100:.2f}% (nearest "
                 f"{s['val_accuracy'] * 100:.2f}%), reconstruction {rr['seconds']:.1f} s")
    lat = plan.meta.get("latency")
    if lat:
        summary["latency"] = lat
        text += f"\nlatency: predicted {lat['predicted_ratio']:.3f} x fp32"
        if "predicted_s" in lat:
            text += f" ({lat['predicted_s'] * 1e3:.3f} ms on {lat['target']}, batch {lat['batch']})"
        if "measured_s" in lat:
            text += (f"; measured {lat['measured_s'] * 1e3:.3f} ms = {lat['measured_ratio']:.3f} x fp32 "
                     f"{lat['measured_fp32_s'] * 1e3:.3f} ms (prediction {lat['rel_error'] * 100:+.1f}%)")
    emit(summary, as_json, text)


_rpc_options = [
    click.option("--rpc", default=None, metavar="HOST:PORT",
                 help="Measure on boards behind this TVM RPC tracker (python -m tvm.exec.rpc_tracker)."),
    click.option("--key", default=None, help="Device key the boards registered with (rpc_server --key)."),
    click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
                 help="Seconds allowed for each remote step before the board counts as dead."),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@cli.command("bench")
@click.argument("artifact")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
              help="Device to run on (default: the artifact's).")
@_with(_rpc_options)
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0), help="Warm-up calls.")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(1), help="Measurements.")
@click.option("--number", default=0, show_default=True, type=click.IntRange(0),
              help="Calls averaged per measurement (0: enough for 1 ms).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1),
              help="Batch size for a symbolic batch dimension.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="Threads of the runtime measured here (default: $TVM_NUM_THREADS, else the physical "
                   "cores; onnxruntime: its default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handled
def bench_cmd(artifact, device, rpc, key, timeout, warmup, repeat, number, batch, threads, as_json):
    """Time ARTIFACT (compiled .so/.tar + manifest; an .onnx runs in onnxruntime) here or on a board."""
    from . import api
    from .bench import bench_text

    rep = api.bench(artifact, device=device, rpc=rpc, key=key, warmup=warmup, repeat=repeat, number=number,
                    batch=batch, timeout=timeout, threads=threads,
                    log=lambda m: click.echo(m, err=True) if not as_json else None)
    emit(rep, as_json, bench_text(rep))


@cli.command("latency-table")
@click.argument("model")
@click.option("--target", default="llvm", show_default=True, help="Compilation target (as cwhawq compile).")
@_with(_rpc_options)
@click.option("--boards", default=None, type=click.IntRange(1), help="Use at most N boards (default: all free).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1),
              help="Batch size compiled and measured (DATA only calibrates activation ranges).")
@click.option("--grid", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Weight-mix grid: ratios of 8/4/2-bit channels in steps of 1/N.")
@data_option
@data_dir_option
@click.option("--cache", "cache_dir", default=None,
              help="Measurement cache directory (default $CWHAWQ_CACHE or ~/.cache/cwhawq/latency).")
@click.option("--check", "checks", multiple=True,
              help="Plan file (or uniform:W) to compile whole and compare with the prediction; repeatable.")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(1), help="Measurements per cell.")
@click.option("--jobs", default=None, type=click.IntRange(1), help="Compile processes (default 2).")
@click.option("--out", required=True, help="Latency table JSON to write.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handled
def latency_table_cmd(model, target, rpc, key, timeout, boards, batch, grid, data_spec, data_dir, cache_dir, checks,
                      repeat, jobs, out, as_json):
    """Per-layer latency table of MODEL for a target: the cost model of latency:R budgets."""
    from . import api
    from .latency import table_text

    table = api.latency_table(model, target, out, rpc=rpc, key=key, batch=batch, grid=grid, data=data_spec,
                              data_dir=data_dir, cache_dir=cache_dir, checks=checks, repeat=repeat, timeout=timeout,
                              boards=boards, jobs=jobs, log=lambda m: click.echo(m, err=True))
    emit(dict(table.summary(), out=out), as_json, table_text(table) + f"\n-> {out}")


def main():
    cli(prog_name="cwhawq")


if __name__ == "__main__":
    main()
