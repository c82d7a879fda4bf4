"""One rank of the two-process runs of tests/test_scale_out.py (started with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Runs analyze (exact and ggn), eval (float and under a
plan) and a search that is interrupted after 2 episodes and resumed to 3, through the Python API,
and has rank 0 write what they returned to ``DIR/results.json``; then ``cwhawq analyze`` through the
command line, writing ``DIR/cli.json``. Usage: ``dist_worker.py DIR``."""
import json
import sys
from pathlib import Path

import torch

from cwhawq import api, dist
from cwhawq.cli import main

torch.set_num_threads(1)
d = Path(sys.argv[1])
model, data, sens = str(d / "tiny.pt2"), str(d / "data.npz"), str(d / "sens.json")
dist.init()
res = {"world": dist.world()}
for scheme in ("exact", "ggn"):
    s = api.analyze(model, data, out=str(d / f"dist-{scheme}.json"), batch_size=25, batches=2, scheme=scheme,
                    max_probes=10, tol=0.0, seed=3)
    res[scheme] = None if s is None else {k: s[k] for k in ("probes", "loss", "processes")}
res["eval"] = api.evaluate(model, data, split="val", batch_size=16, limit=101)["accuracy"]
res["eval_plan"] = api.evaluate(model, data, split="val", batch_size=16, limit=101, plan=str(d / "uniform4.json"),
                                rounding="nearest")["accuracy"]
kw = dict(sens=sens, budget="size:0.2", seed=5, warmup=1, val_samples=90, out=str(d / "dist-plan.json"),
          rounding="nearest", batch_size=4, checkpoint_every=1)
api.search(model, data, episodes=2, **kw)
plan = api.search(model, data, episodes=3, resume=True, **kw)
res["search"] = plan.meta["search"]["best_reward"]
if dist.is_main():
    (d / "results.json").write_text(json.dumps(res))
sys.argv = ["cwhawq", "analyze", model, "--data", data, "--out", str(d / "cli.json"), "--batch-size", "30",
            "--scheme", "exact", "--threads", "1"]
main()   # exits; leaves the process group on the way out
