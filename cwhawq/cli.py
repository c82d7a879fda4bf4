"""The ``cwhawq`` command line: thin click wrappers over the Python API.

Errors caused by input (CwhawqError) print one line on stderr and exit with code 2; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import functools
import json
import sys
import time

import click

from . import __version__
from .errors import CwhawqError

_DEBUG = {"on": False}


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
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
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            if _DEBUG["on"]:
                raise
            _fail(f"{e.strerror}: {e.filename}")
    return wrapper


def emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cwhawq")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug):
    """cwhawq: channel-wise mixed-precision quantization (CW-HAWQ).

    Pipeline: analyze (Hessian sensitivity) -> plan / search (bit plans) -> eval -> export (ONNX)
    -> compile (TVM) -> bench. MODEL is zoo:NAME or a torch.export .pt2 archive; DATA is
    fashion-mnist, a directory of IDX files, or an .npz file.
    """
    _DEBUG["on"] = debug


data_option = click.option("--data", "data_spec", default="fashion-mnist", show_default=True,
                           help="Dataset spec: fashion-mnist, a directory of IDX files, or an .npz file.")
data_dir_option = click.option("--data-dir", default=None, envvar="CWHAWQ_DATA",
                               help="Directory of the Fashion-MNIST IDX files (env CWHAWQ_DATA).")


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
@click.option("--act-scale", default="pow2", show_default=True, type=click.Choice(["pow2", "free"]),
              help="Activation scale representation (with --plan).")
@click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(0),
              help="Quantization-aware fine-tuning epochs (STE) with the plan fixed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handled
def eval_cmd(model, data_spec, data_dir, split, batch_size, limit, plan_path, calib_batches, act_scale,
             finetune_epochs, as_json):
    """Accuracy of MODEL (zoo:NAME, .pt2 or .onnx) on a split of DATA, optionally under a bit plan."""
    from . import api

    t0 = time.time()
    rep = api.evaluate(model, data_spec, split=split, data_dir=data_dir, batch_size=batch_size, limit=limit,
                       plan=plan_path, calib_batches=calib_batches, act_scale=act_scale,
                       finetune_epochs=finetune_epochs)
    rep["seconds"] = round(time.time() - t0, 3)
    emit(rep, as_json, f"{rep['model']} on {rep['data']}:{rep['split']} (n={rep['n']}): "
                       f"accuracy {rep['accuracy'] * 100:.2f}%"
                       + (f" with plan {plan_path}" if plan_path else ""))


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
    from .backends.cli_commands import compile_text
    from .backends.tvm import compile_model

    res = compile_model(onnx_path, target=target, out=out, arch=arch, batch=batch, tune_trials=tune_trials,
                        kernels=not no_kernels, log=lambda m: click.echo(m, err=True))
    emit(res.manifest, as_json, compile_text(res))


@cli.command("run")
@click.argument("artifact")
@click.option("--input", "inputs", multiple=True, required=True,
              help="Input .npy (in order), or NAME=FILE.npy; an .npz gives inputs by name.")
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
@click.option("--out", required=True, help="Sensitivity JSON to write (docs/sensitivity.md).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--batches", default=1, show_default=True, type=click.IntRange(1))
@click.option("--max-probes", default=512, show_default=True, type=click.IntRange(1))
@click.option("--tol", default=0.01, show_default=True, type=click.FloatRange(0, min_open=False),
              help="Stop when every layer trace's standard error is below tol x |trace|.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--scheme", default="auto", show_default=True,
              help="Probing scheme: auto, exact, ggn, layer, network, interleave:K, channel (docs/hessian.md).")
@click.option("--plot", default=None, help="Write a plot of the per-layer channel-trace distributions.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handled
def analyze_cmd(model, data_spec, data_dir, out, batch_size, batches, max_probes, tol, seed, scheme, plot, as_json):
    """Channel-wise Hessian traces and trace-weighted sensitivities (Omega) of MODEL."""
    from . import api

    sens = api.analyze(model, data_spec, out=out, data_dir=data_dir, batch_size=batch_size, batches=batches,
                       max_probes=max_probes, tol=tol, seed=seed, scheme=scheme, plot=plot,
                       progress=not as_json and sys.stderr.isatty())
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
    fn = click.option("--budget", default=None, help="size:R, bits:B or bops:R.")(fn)
    return fn


def _report_plan(plan, out, as_json):
    m = plan.metrics
    emit({"method": plan.method, "out": out, **m}, as_json,
         f"{plan.method}: avg weight bits {m['avg_w_bits']:.3f}, avg act bits {m['avg_a_bits']:.3f}, size "
         f"{m['weight_bytes'] / 1024:.1f} KiB ({m['size_ratio']:.4f} of fp32), BOPs ratio {m['bops_ratio']:.5f}"
         + ("" if m.get("meets_budget", True) else "  [does NOT meet the budget]") + f" -> {out}")


for _method in ("hawq-v3", "cw-greedy"):
    def _make(method):
        @plan_group.command(method, help=f"{method} plan for MODEL under --budget, from --sens.")
        @click.argument("model")
        @click.option("--sens", required=True, help="Sensitivity JSON from cwhawq analyze.")
        @_plan_options
        @handled
        def cmd(model, sens, budget, bits, a_bits, out, as_json):
            from . import api

            plan = api.make_plan(method, model, sens=sens, budget=budget, bits=bits, a_bits=a_bits, out=out)
            _report_plan(plan, out, as_json)
        return cmd
    _make(_method)


@plan_group.command("uniform")
@click.argument("model")
@click.option("--w-bits", default=8, show_default=True, type=int)
@_plan_options
@handled
def plan_uniform(model, w_bits, budget, bits, a_bits, out, as_json):
    """Every channel at --w-bits / --a-bits (reports whether --budget is met)."""
    from . import api

    plan = api.make_plan("uniform", model, budget=budget, bits=bits, w_bits=w_bits, a_bits=a_bits, out=out)
    _report_plan(plan, out, as_json)


def main():
    cli(prog_name="cwhawq")


if __name__ == "__main__":
    main()
