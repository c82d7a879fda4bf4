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


def main():
    cli(prog_name="cwhawq")


if __name__ == "__main__":
    main()
