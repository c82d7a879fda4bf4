"""Helpers behind ``cwhawq compile`` and ``cwhawq run`` (the click commands live in cwhawq/cli.py):
the compile report text and reading/writing the run's .npy/.npz files."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import CwhawqError


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def compile_text(res) -> str:
    """Human summary of a compilation: what was lowered (layers, bits, packed bytes), what fell back."""
    man, rep = res.manifest, res.report
    lines = [f"compiled {man['source']['file']} for {man['target']['name']} "
             f"(isa {man['target'].get('isa') or 'tvm'}) -> {res.artifact} "
             f"({_kib(man['size_bytes'])}) + {res.manifest_path.name}"]
    lowered = rep["lowered"]
    if lowered:
        lines.append(f"lowered {len(lowered)} layer(s) to packed kernels:")
        width = max(len(s["layer"]) for s in lowered)
        for s in lowered:
            bits = " ".join(f"{b}b:{n}" for b, n in s["w_bits"].items())
            act = ""
            kern = s.get("kernel") or {}
            if s["act"]:
                if s["act"]["integer"] and kern.get("act") in ("i16", "u8", "s8"):
                    nd = kern.get("digits") or 1
                    act = f" act {kern['act']}" + (f" x{nd} digits" if nd > 1 else "")
                    if kern.get("exponent_classes"):
                        act += f" ({kern['exponent_classes']} exponent classes)"
                elif s["act"]["integer"]:
                    act = " act int (float kernel)"
                else:
                    act = " act fake-quant float"
            if kern.get("kernel"):
                act += f" [{'/'.join(kern['kernel'])}]"
            fused = f" +{'+'.join(s['fused'])}" if s["fused"] else ""
            lines.append(f"  {s['layer']:<{width}}  {s['kind']:<9} {s['mode']:<5} w[{bits}] packed "
                         f"{_kib(s['packed_bytes'])} (fp32 {_kib(s['fp32_bytes'])}){act}{fused}")
        lines.append(f"weights packed: {_kib(rep['packed_bytes'])} vs fp32 {_kib(rep['fp32_bytes'])}")
    fp32 = [s["layer"] for s in lowered if s["mode"] == "fp32"]
    if fp32:
        lines.append(f"fp32 layers (our fp32 kernels): {', '.join(fp32)}")
    fb = rep["fallback_to_tvm_fp32"]
    if fb:
        lines.append("fell back to TVM fp32:")
        lines += [f"  {f['node']} ({f['op']}): {f['reason']}" for f in fb]
    elif not fp32:
        lines.append("nothing fell back to fp32")
    sf = rep.get("schedule_fallbacks") or []
    if sf:
        lines.append("CPU schedule rules that could not apply (the operator went to the next rule):")
        lines += [f"  {f['function']}: {f['rule']}: {f['error']}" for f in sf]
    return "\n".join(lines)


def _load_inputs(specs: list[dict], args: tuple[str, ...]) -> dict:
    named, ordered = {}, []
    for a in args:
        if "=" in a and not Path(a).exists():
            k, v = a.split("=", 1)
            named[k] = v
        else:
            ordered.append(a)
    out = {}
    for path in ordered:
        if path.endswith(".npz"):
            with np.load(path) as z:
                out.update({k: z[k] for k in z.files})
            ordered = [p for p in ordered if p != path]
    names = [s["name"] for s in specs if s["name"] not in out and s["name"] not in named]
    if len(ordered) > len(names):
        raise CwhawqError(f"too many inputs: the artifact takes {', '.join(s['name'] for s in specs)}")
    for name, path in list(zip(names, ordered)) + list(named.items()):
        try:
            out[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CwhawqError(f"cannot read input {name} from {path}: {exc}") from None
    return out


def run_files(artifact: str, inputs: tuple[str, ...], out: str) -> dict:
    """Load inputs from files, run the artifact, write the outputs; returns a summary."""
    from .tvm import load_artifact  # noqa: PLC0415

    art = load_artifact(artifact)
    feeds = _load_inputs(art.inputs, inputs)
    t0 = time.perf_counter()
    ys = art.run(feeds)
    dt = time.perf_counter() - t0
    names = [o["name"] for o in art.outputs]
    if out.endswith(".npz"):
        np.savez(out, **dict(zip(names, ys)))
    else:
        if len(ys) != 1:
            raise CwhawqError(f"the artifact has {len(ys)} outputs: write them to an .npz file")
        np.save(out, ys[0])
    return {"artifact": artifact, "device": art.device_kind, "seconds": dt,
            "outputs": [{"name": n, "shape": list(y.shape), "dtype": str(y.dtype)} for n, y in zip(names, ys)]}
