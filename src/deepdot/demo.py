"""``deepdot demo``: the whole story on the built-in digits in a few minutes.

1. Train a clean model and a BadNets model (3×3 white square bottom-right, target 7) on the
   ``digits:train`` split, or reuse them from the cache.
2. Scan both with Neural Cleanse on ``digits:test``.
3. Report both verdicts and where the images and JSON are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepdot import triggers
from deepdot.attacks import BadNets
from deepdot.io import load_data
from deepdot.io.files import ensure_dir, read_json, save_trigger, write_json
from deepdot.io.models import load_model, save_model
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.models import build_classifier
from deepdot.progress import ProgressFn, no_progress
from deepdot.report.artifacts import write_scan
from deepdot.scan import FastNeuralCleanse, TriggerScanner
from deepdot.training import TrainConfig, train

TARGET = 7
TRAIN = TrainConfig(epochs=30, batch_size=32, seed=0)
CACHE_VERSION = "v1"  # bump when the demo models' recipe changes


def demo_scanner() -> TriggerScanner:
    """The fast scan with its default settings: seconds per model on digits."""
    return FastNeuralCleanse()


def _models(cache: Path, retrain: bool, progress: ProgressFn, log: Callable[[str], Any]) -> dict[str, Any]:
    train_set, test_set = load_data("digits:train"), load_data("digits:test")
    planted = triggers.square(train_set.image_shape, 3, corner="bottom-right", margin=1)
    folder = cache / CACHE_VERSION
    models = {}
    for kind in ("clean", "backdoored"):
        path = folder / kind
        if (path / "model.safetensors").exists() and (path / "summary.json").exists() and not retrain:
            log(f"reusing the {kind} demo model from {path}")
            models[kind] = (load_model(path), read_json(path / "summary.json"))
            continue
        log(f"training the {kind} demo model on digits ({len(train_set)} images)")
        torch.manual_seed(0)  # same initial weights on every machine and run
        model = build_classifier("digits_net")
        if kind == "clean":
            train(model, train_set, TRAIN, progress=progress)
            summary = {"clean_accuracy": clean_accuracy(model, test_set)}
            summary["attack_success_rate"] = attack_success_rate(model, test_set, planted, TARGET)
        else:
            summary = (
                BadNets(trigger=planted, target=TARGET, poison_rate=0.1)
                .run(model, train_set, test_set, TRAIN, progress=progress)
                .to_dict()
            )
            save_trigger(planted, ensure_dir(path) / "trigger.npz")
        save_model(model, path)
        write_json(path / "summary.json", summary)
        models[kind] = (model, summary)
    return models


def run_demo(
    out: Path,
    cache: Path,
    *,
    retrain: bool = False,
    progress: ProgressFn = no_progress,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the demo; returns a summary whose ``correct`` says whether both verdicts were right."""
    from rich.console import Console

    from deepdot.report.console import print_scan

    ensure_dir(out)
    models = _models(cache, retrain, progress, log)
    test_set = load_data("digits:test")
    scanner = demo_scanner()
    summary: dict[str, Any] = {"planted_target": TARGET}
    console = Console()
    for kind, (model, figures) in models.items():
        log(
            f"[bold]{kind} model[/]: clean accuracy {figures['clean_accuracy']:.1%}, "
            f"attack success rate of the planted trigger {figures['attack_success_rate']:.1%}"
        )
        result = scanner.scan(model, test_set, progress=progress)
        path = write_scan(out / kind, result, {"model": kind, "data": test_set.name})
        print_scan(console, result, f"the {kind} demo model")
        log(f"images and JSON: {path.parent}/")
        summary[kind] = {
            **figures,
            "scan": str(path),
            "flagged": list(result.flagged),
            "anomaly_index": result.outliers.anomaly_index,
        }
    summary["correct"] = summary["clean"]["flagged"] == [] and summary["backdoored"]["flagged"] == [TARGET]
    write_json(out / "demo.json", summary)
    verdict = "both verdicts are right" if summary["correct"] else "a verdict is WRONG (see above)"
    log(
        f"demo: clean model flagged {summary['clean']['flagged'] or 'nothing'}, backdoored model flagged "
        f"{summary['backdoored']['flagged'] or 'nothing'} (planted target {TARGET}): {verdict}"
    )
    return summary
