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
    # activation integers wider than one 8-bit digit (the kernels then run several digits, exponent
    # classes or, on AVX2, int16 operands)
    wide = [s["layer"] for s in lowered if s["act"] and s["act"]["integer"]
            and "depthwise" not in ((s.get("kernel") or {}).get("kernel") or ())   # float products
            and ((s["act"].get("digits") or 1) > 1 or (s.get("kernel") or {}).get("digits", 1) > 1
                 or (s.get("kernel") or {}).get("exponent_classes"))]
    if wide:
        lines.append(f"note: {len(wide)} layer(s) have activation integers wider than 8 bits (the pow2 exponents "
                     "widen the codes: several 8-bit digits, exponent classes or int16 operands); exported with "
                     "`--act-scale migrate` each would be one 8-bit digit (faster; accuracy: docs/results.md)")
    notes: dict[str, list[str]] = {}
    for s in lowered:
        for n in (s.get("kernel") or {}).get("notes") or ():
            notes.setdefault(n, []).append(s["layer"])
    for n, layers in notes.items():
        lines.append(f"note: {len(layers)} layer(s): {n}")
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


def _read_npy(name: str, path: str) -> np.ndarray:
    p = Path(path)
    if p.is_dir():
        raise CwhawqError(f"input {name}: {p} is a directory, not an .npy file")
    if not p.is_file():
        raise CwhawqError(f"input {name}: file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except EOFError:
        raise CwhawqError(f"input {name}: {p} is empty (not an .npy file)") from None
    except (OSError, ValueError) as exc:
        raise CwhawqError(f"cannot read input {name} from {p} as .npy: {str(exc).splitlines()[0]}") from None
    if not isinstance(arr, np.ndarray):   # an .npz archive under another name
        arr.close()
        raise CwhawqError(f"input {name}: {p} is an .npz archive; pass it as --input FILE.npz")
    return arr


def _read_npz(path: str) -> dict:
    import zipfile

    p = Path(path)
    if p.is_dir():
        raise CwhawqError(f"input {p} is a directory, not an .npz file")
    if not p.is_file():
        raise CwhawqError(f"input file not found: {p}")
    if not zipfile.is_zipfile(p):
        raise CwhawqError(f"input {p} is not an .npz archive (not a zip file; truncated or corrupt?)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CwhawqError(f"cannot read {p} as .npz: {str(exc).splitlines()[0]}") from None


def _load_inputs(specs: list[dict], args: tuple[str, ...]) -> dict:
    """Arrays by input name from ``--input`` arguments (FILE.npy in order, NAME=FILE.npy, FILE.npz)."""
    named, ordered = {}, []
    for a in args:
        if "=" in a and not Path(a).exists():
            k, v = a.split("=", 1)
            named[k] = v
        else:
            ordered.append(a)
    out = {}
    for path in [p for p in ordered if p.endswith(".npz")]:
        out.update(_read_npz(path))
    ordered = [p for p in ordered if not p.endswith(".npz")]
    known = [s["name"] for s in specs]
    unknown = [k for k in list(named) + list(out) if k not in known]
    if unknown:
        raise CwhawqError(f"the artifact has no input {unknown[0]!r}; its inputs: {', '.join(known)}")
    names = [n for n in known if n not in out and n not in named]
    if len(ordered) > len(names):
        raise CwhawqError(f"too many inputs: the artifact takes {', '.join(known)}")
    for name, path in list(zip(names, ordered)) + list(named.items()):
        out[name] = _read_npy(name, path)
    missing = [n for n in known if n not in out]
    if missing:
        raise CwhawqError(f"missing input(s): {', '.join(missing)} (the artifact takes {', '.join(known)})")
    return out


def check_inputs(specs: list[dict], feeds: dict) -> dict:
    """Each array against its input spec: the shape, and the dtype. Floating-point arrays of another
    width are cast (float64 -> float32); integer or boolean arrays are refused for a float input rather
    than cast (a uint8 image is 0..255, while cwhawq's data loader feeds models 0..1)."""
    out = {}
    for s in specs:
        name, arr = s["name"], np.asarray(feeds[s["name"]])
        want = s["shape"]
        if arr.ndim != len(want) or any(isinstance(w, int) and w != a for w, a in zip(want, arr.shape)):
            raise CwhawqError(f"input {name!r} has shape {list(arr.shape)}, the artifact expects {want}")
        if arr.size == 0:
            raise CwhawqError(f"input {name!r} is empty (shape {list(arr.shape)})")
        dt = np.dtype(s.get("dtype", "float32"))
        if arr.dtype != dt:
            if np.issubdtype(dt, np.floating) and np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(dt)
            elif np.issubdtype(dt, np.floating):
                hint = " (images: x.astype('float32') / 255, as cwhawq's data loader scales uint8)" \
                    if arr.dtype == np.uint8 else ""
                raise CwhawqError(f"input {name!r} is {arr.dtype}, the artifact takes {dt}: convert it "
                                  f"first{hint}")
            else:
                raise CwhawqError(f"input {name!r} is {arr.dtype}, the artifact takes {dt}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise CwhawqError(f"input {name!r} contains NaN or inf")
        out[name] = arr
    return out


def _read_manifest(artifact: str) -> dict:
    import json

    from .tvm import manifest_path  # noqa: PLC0415

    a = Path(artifact)
    if a.is_dir():
        raise CwhawqError(f"artifact {a} is a directory")
    if not a.is_file():
        raise CwhawqError(f"artifact not found: {a}")
    mp = manifest_path(a)
    if not mp.is_file():
        raise CwhawqError(f"manifest not found next to the artifact: {mp}")
    try:
        man = json.loads(mp.read_text())
        if not isinstance(man, dict):
            raise ValueError("not a JSON object")
        specs = man["inputs"]
        if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s and "shape" in s
                                                  for s in specs):
            raise ValueError("malformed 'inputs'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CwhawqError(f"cannot read manifest {mp}: {exc}") from None
    return man


def run_files(artifact: str, inputs: tuple[str, ...], out: str) -> dict:
    """Load inputs from files, run the artifact, write the outputs (atomically); returns a summary.

    Everything about the files (the output path, every input file, its shape and dtype against the
    manifest) is checked before the artifact is loaded."""
    from ..checks import check_outputs
    from ..io import atomic_path
    from .tvm import load_artifact, manifest_path  # noqa: PLC0415

    input_files = [a.split("=", 1)[1] if "=" in a and not Path(a).exists() else a for a in inputs]
    check_outputs([("--out", out)], [("--input", f) for f in input_files]
                  + [("ARTIFACT", artifact), ("its manifest", manifest_path(artifact))])
    if not str(out).endswith((".npy", ".npz")):
        raise CwhawqError(f"--out {out}: write the outputs to an .npy (one output) or .npz file")
    man = _read_manifest(artifact)
    feeds = check_inputs(man["inputs"], _load_inputs(man["inputs"], inputs))
    art = load_artifact(artifact)
    n_out = len(art.outputs)
    if not out.endswith(".npz") and n_out != 1:
        raise CwhawqError(f"the artifact has {n_out} outputs: write them to an .npz file")
    t0 = time.perf_counter()
    ys = art.run(feeds)
    dt = time.perf_counter() - t0
    names = [o["name"] for o in art.outputs]
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        if out.endswith(".npz"):
            np.savez(f, **dict(zip(names, ys)))
        else:
            np.save(f, ys[0])
    return {"artifact": artifact, "device": art.device_kind, "seconds": dt,
            "outputs": [{"name": n, "shape": list(y.shape), "dtype": str(y.dtype)} for n, y in zip(names, ys)]}
