"""Export a deepdot model to ONNX and Keras .h5, check parity, and (optionally) scan all three.

    python benchmarks/export_formats.py ~/.cache/deepdot/zoo/gtsrb-badnets
    python benchmarks/export_formats.py ~/.cache/deepdot/zoo/gtsrb-badnets --scan

The acceptance check of the model-formats work: the GTSRB replica exported to ONNX and to a
Keras-style ``.h5`` must scan to the same verdict and flagged labels as the native model.

1. Exports (``deepdot.io.export``): ``model.onnx`` (the bare network, ``torch.onnx.export`` with
   ``dynamo=False``, preprocessing and input shape in the ONNX metadata) and ``model.h5`` (a real
   Keras 3 Sequential model on the PyTorch backend: Conv2D/MaxPooling2D/Dropout/Flatten/Dense,
   channels-last, final softmax, as Neural Cleanse's Keras models; no preprocessing recorded).
2. Parity on ``--parity-images`` real test images: each export loaded back with
   ``deepdot.io.models.load_model`` against the native model (max |Δ| of logits and of
   log-probabilities, argmax agreement), plus Keras' own forward pass of the ``.h5`` against the
   native softmax (so an export error cannot hide behind a matching loader error).
3. With ``--scan``: ``deepdot scan`` on native, ONNX and ``.h5`` (``--preprocess raw`` for the
   ``.h5``, which does not record it), ``--jobs`` at a time with ``OMP_NUM_THREADS=1``, then a
   table of verdicts, flagged labels, anomaly indices, seconds and image passes. A scan whose
   ``scan.json`` already exists is reused (``--rescan`` to redo it).

Files go to ``OUT`` (default ``~/.cache/deepdot/exports/<model folder name>``), never the repo.
Figures are also written to ``OUT/parity.json`` and ``OUT/scans.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepdot.io import load_data  # noqa: E402
from deepdot.io.export import export_keras_h5, export_onnx  # noqa: E402
from deepdot.io.models import load_model  # noqa: E402
from deepdot.models.classifier import preprocess_tensor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gtsrb32" / "gtsrb32_test.npz"
DEEPDOT = Path(sys.executable).with_name("deepdot")


def parity(native, other, x: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = native(x), other(x)
    return {
        "max_abs_logits": float((a - b).abs().max()),
        "max_abs_log_probs": float((a.log_softmax(1) - b.log_softmax(1)).abs().max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
    }


def keras_parity(native, h5: Path, x: torch.Tensor) -> dict:
    """Keras' own forward pass of the exported file against the native model's softmax."""
    import keras

    model = keras.saving.load_model(str(h5), compile=False)
    raw = preprocess_tensor(x, native.preprocess)  # the Keras model takes preprocessed pixels
    probs = np.asarray(model(raw.permute(0, 2, 3, 1).numpy(), training=False).detach().cpu())
    with torch.no_grad():
        ref = native(x).softmax(1).numpy()
    log_diff = np.abs(np.log(np.clip(probs, 1e-30, None)) - np.log(np.clip(ref, 1e-30, None)))
    return {
        "max_abs_probs": float(np.abs(probs - ref).max()),
        "max_abs_log_probs": float(log_diff.max()),
        "argmax_agreement": float((probs.argmax(1) == ref.argmax(1)).mean()),
    }


def run_scans(jobs: list[tuple[str, list[str], Path]], parallel: int, rescan: bool) -> dict[str, dict]:
    """Run ``deepdot scan`` commands, ``parallel`` at a time; {name: result summary}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen, Path, float]] = []
    codes: dict[str, int | None] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, out = pending.pop(0)
            if (out / "scan.json").exists() and not rescan:
                print(f"[{name}] reusing {out / 'scan.json'}", flush=True)
                codes[name] = None
                continue
            out.mkdir(parents=True, exist_ok=True)
            print(f"[{name}] {' '.join(cmd)}", flush=True)
            log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
            running.append(
                (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, time.time())
            )
        time.sleep(2)
        for item in list(running):
            name, proc, _, start = item
            if proc.poll() is not None:
                codes[name] = proc.returncode
                print(f"[{name}] exit code {proc.returncode} after {time.time() - start:.0f} s", flush=True)
                running.remove(item)
    results = {}
    for name, cmd, out in jobs:
        summary: dict = {"command": " ".join(cmd), "exit_code": codes.get(name)}
        path = out / "scan.json"
        if path.exists():
            scan = json.loads(path.read_text())
            summary.update(
                {k: scan.get(k) for k in ("infected", "flagged", "anomaly_index", "seconds", "image_passes")}
            )
            summary["objective"] = scan.get("objective")
            summary["clean_accuracy"] = scan.get("clean_accuracy")
        results[name] = summary
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="deepdot model folder (model.safetensors + model.json)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default ~/.cache/deepdot/exports/NAME)")
    parser.add_argument("--data", type=Path, default=DATA, help="test data for parity and scans")
    parser.add_argument("--parity-images", type=int, default=256)
    parser.add_argument("--scan", action="store_true", help="also scan native, ONNX and .h5 and compare")
    parser.add_argument("--max-images", type=int, default=2000, help="deepdot scan --max-images")
    parser.add_argument("--jobs", type=int, default=2, help="scans run at once")
    parser.add_argument("--rescan", action="store_true", help="redo scans whose scan.json exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model_dir = args.model.expanduser().resolve()
    out = (args.out or Path("~/.cache/deepdot/exports") / model_dir.name).expanduser().resolve()
    if out == REPO or REPO in out.parents:
        parser.error(f"--out {out} is inside the git tree; pick a folder outside {REPO}")
    out.mkdir(parents=True, exist_ok=True)

    native = load_model(model_dir)
    start = time.time()
    onnx_path = export_onnx(native, out / "model.onnx")
    h5_path = export_keras_h5(native, out / "model.h5")
    print(f"exported {onnx_path} and {h5_path} in {time.time() - start:.1f} s")

    x = load_data(args.data).x[: args.parity_images]
    from_onnx = load_model(onnx_path)
    from_h5 = load_model(h5_path, preprocess=native.preprocess)
    figures = {
        "model": str(model_dir),
        "images": len(x),
        "onnx": {
            "output_kind": from_onnx.output_kind,
            "preprocess": from_onnx.preprocess.to_json(),
            **parity(native, from_onnx, x),
        },
        "h5": {
            "output_kind": from_h5.output_kind,
            "softmax_removed": from_h5.softmax_removed,
            **parity(native, from_h5, x),
        },
        "h5_keras_forward": keras_parity(native, h5_path, x),
    }
    print(f"parity on {len(x)} images of {args.data} (loaded back with deepdot.io.models.load_model):")
    for name in ("onnx", "h5"):
        f = figures[name]
        print(
            f"  {name:5} max|Δ logits| {f['max_abs_logits']:.3g}  max|Δ log-probs| {f['max_abs_log_probs']:.3g}  "
            f"argmax agreement {f['argmax_agreement']:.4f}  ({f['output_kind']})"
        )
    k = figures["h5_keras_forward"]
    print(
        f"  Keras' own forward of model.h5 vs native softmax: max|Δ probs| {k['max_abs_probs']:.3g}  "
        f"max|Δ log-probs| {k['max_abs_log_probs']:.3g}  argmax agreement {k['argmax_agreement']:.4f}"
    )
    (out / "parity.json").write_text(json.dumps(figures, indent=2) + "\n")

    if not args.scan:
        return 0
    common = ["--data", str(args.data), "--max-images", str(args.max_images)]
    jobs = [
        (
            "native",
            [str(DEEPDOT), "scan", str(model_dir), *common, "--out", str(out / "scan-native")],
            out / "scan-native",
        ),
        ("onnx", [str(DEEPDOT), "scan", str(onnx_path), *common, "--out", str(out / "scan-onnx")], out / "scan-onnx"),
    ]
    h5_cmd = [str(DEEPDOT), "scan", str(h5_path), *common, "--out", str(out / "scan-h5")]
    jobs.append(("h5", [*h5_cmd, "--preprocess", str(native.preprocess)], out / "scan-h5"))
    results = run_scans(jobs, args.jobs, args.rescan)
    (out / "scans.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'model':7} {'verdict':9} {'flagged':10} {'anomaly':>8} {'seconds':>8} {'image passes':>13}  objective")
    for name, r in results.items():
        if "infected" not in r:
            print(f"{name:7} no scan.json (exit code {r['exit_code']})")
            continue
        verdict = "infected" if r["infected"] else "clean"
        print(
            f"{name:7} {verdict:9} {str(r['flagged']):10} {r['anomaly_index']:8.3f} {r['seconds']:8.0f} "
            f"{r['image_passes']:13,}  {str(r['objective']).split(' (')[0]}"
        )
    done = [r for r in results.values() if "infected" in r]
    same = len(done) == len(results) and len({(r["infected"], tuple(r["flagged"] or ())) for r in done}) == 1
    print("same verdict and flagged labels: " + ("yes" if same else "NO"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
