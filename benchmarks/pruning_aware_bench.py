"""Does a pruning-aware backdoor survive the pruning defence and fine-pruning? (Fine-Pruning, Liu
et al., RAID 2018: the pruning-aware attack, then the defence that answers it.)

    OMP_NUM_THREADS=1 python benchmarks/pruning_aware_bench.py
    OMP_NUM_THREADS=1 python benchmarks/pruning_aware_bench.py --replicas digits --step 1

For each replica (digits, MNIST): the plain BadNets model from the zoo (``benchmarks/zoo.py``,
built when missing) and a pruning-aware twin (``deepdot.attacks.pruning_aware.PruningAware``,
same architecture, training settings, trigger, target and poison rate; cached under
``--out``, default ``~/.cache/deepdot/pruning-aware``, never in git). Then, for both:

* the pruning curve: last-conv channels switched off in increasing mean activation on the
  replica's validation split (the defender's clean data; the ranking of
  ``deepdot.mitigate.FinePruning``), with clean accuracy and the planted trigger's attack success
  on the test split after each step; "channels off until success < 50 % / < 10 %" reads it;
* the pruning defence alone, ``FinePruning(fine_tune_epochs=0)`` (prune until clean accuracy on
  the validation split drops 4 points), measured on the test split;
* ``FinePruning()`` with its defaults, given the validation split as clean data and the *planted*
  trigger as the "recovered" one (its ranking and pruning never look at the trigger; only its
  fine-tuning guard reads it, to keep the best epoch and stop early, so this is the defender's
  best case), measured on the test split; "within 2 pts" compares with the model's own clean
  accuracy before the defence.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path

import torch

from deepdot import triggers
from deepdot.attacks.pruning_aware import PruningAware
from deepdot.io.files import ensure_dir, load_trigger, read_json, save_trigger, write_json
from deepdot.io.models import load_model, save_model
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.mitigate import FinePruning, RecoveredBackdoor
from deepdot.mitigate.layers import resolve_layer, unit_activations, units_off
from deepdot.models import build_classifier
from zoo import REPLICAS, build, log_epochs, splits

ZOO = Path(os.environ.get("DEEPDOT_ZOO", "~/.cache/deepdot/zoo")).expanduser()
OUT = Path("~/.cache/deepdot/pruning-aware").expanduser()


def pruning_aware_model(name: str, out: Path, force: bool, attack: PruningAware):
    """The replica's pruning-aware model and its ``attack.json`` (trained, or read from ``out``)."""
    folder = out / f"{name}-pruning-aware"
    if (folder / "attack.json").exists() and not force:
        return load_model(folder), read_json(folder / "attack.json")
    replica = REPLICAS[name]
    train, _, test = splits(name)
    torch.manual_seed(0)
    model = build_classifier(replica.arch, num_classes=test.num_classes, input_shape=test.image_shape)
    start = time.perf_counter()
    result = attack.run(model, train, test, replica.config, progress=log_epochs)
    summary = {
        **result.to_dict(),
        "method": attack.method,
        "replica": name,
        "wall_seconds": time.perf_counter() - start,
    }
    ensure_dir(folder)
    save_model(model, folder)
    save_trigger(attack.trigger, folder / "trigger.npz")
    write_json(folder / "attack.json", summary)
    return model, summary


def curve(model, val, test, trigger, target: int, step: int) -> list[tuple[int, float, float]]:
    """(channels off, clean accuracy, attack success) on ``test``, last-conv channels switched off
    in increasing mean activation on ``val`` (the defender's ranking), ``step`` at a time."""
    layer = resolve_layer(model, "last_conv")
    order = torch.argsort(unit_activations(model, val.take(2000).x, layer).mean(0), stable=True)
    points = []
    for n in [*range(0, len(order), step), len(order)]:
        with units_off(model, layer, order[:n]):
            points.append((n, clean_accuracy(model, test), attack_success_rate(model, test, trigger, target)))
    return points


def survives(points: list[tuple[int, float, float]], below: float) -> int:
    """Channels switched off when attack success first falls below ``below`` (every channel
    off leaves a constant model, whose "success" is 0 unless it predicts the target)."""
    return next((n for n, _, asr in points if asr < below), points[-1][0] + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", nargs="*", default=["digits", "mnist"], choices=["digits", "mnist", "gtsrb"])
    parser.add_argument("--zoo", type=Path, default=ZOO)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--force", action="store_true", help="retrain the pruning-aware models")
    parser.add_argument("--step", type=int, default=2, help="channels per point of the printed curve")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    curves, summaries, defences = {}, [], []
    for name in args.replicas:
        replica = REPLICAS[name]
        size, corner, margin = replica.trigger
        _, val, test = splits(name)
        if not (args.zoo / f"{name}-badnets" / "attack.json").exists():
            build(replica, args.zoo, kinds=("badnets",))
        planted = load_trigger(args.zoo / f"{name}-badnets" / "trigger.npz")
        assert torch.equal(planted.mask, triggers.square(test.image_shape, size, corner=corner, margin=margin).mask)
        attack = PruningAware(
            trigger=planted, target=replica.target, poison_rate=replica.poison_rate, resample=replica.resample
        )
        models = {
            "BadNets": (
                load_model(args.zoo / f"{name}-badnets"),
                read_json(args.zoo / f"{name}-badnets" / "attack.json"),
            ),
            "pruning-aware": pruning_aware_model(name, args.out, args.force, attack),
        }
        for kind, (model, summary) in models.items():
            points = curve(model, val, test, planted, replica.target, 1)
            curves[name, kind] = points
            backdoor = RecoveredBackdoor(replica.target, planted)
            pruning = FinePruning(fine_tune_epochs=0).apply(model, backdoor, val)
            pruned_only = (
                len(pruning.pruning.pruned_units) if pruning.pruning else 0,
                clean_accuracy(pruning.classifier, test),
                attack_success_rate(pruning.classifier, test, planted, replica.target),
            )
            summaries.append((name, kind, points, summary, pruned_only))
            start = time.perf_counter()
            result = FinePruning().apply(model, backdoor, val)
            fixed = result.classifier
            defences.append(
                (
                    name,
                    kind,
                    points[0],
                    len(result.pruning.pruned_units) if result.pruning else 0,
                    len(points) - 1,
                    clean_accuracy(fixed, test),
                    attack_success_rate(fixed, test, planted, replica.target),
                    time.perf_counter() - start,
                )
            )
            print(f"{name} {kind}: done", flush=True)

    threads = torch.get_num_threads()
    print(f"\npruning-aware benchmark, {date.today()}, {threads} thread(s); figures on each replica's test split\n")
    print(
        "| replica | model | clean acc | attack success | attacker: pruned / clean acc → after its pruning "
        "| channels off until success < 50 % / < 10 % | pruning defence: pruned / acc / success | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, kind, points, summary, (off, acc, asr) in summaries:
        facts = summary.get("pruned_channels")
        attacker = (
            f"{facts['count']} of {summary['units']} / {summary['clean_accuracy_before_poisoning']:.4f} → "
            f"{summary['accuracy_after_pruning']:.4f}"
            if facts
            else "—"
        )
        units = len(points) - 1
        until = [survives(points, b) for b in (0.5, 0.1)]
        print(
            f"| {name} | {kind} | {points[0][1]:.4f} | {points[0][2]:.4f} | {attacker} "
            f"| {' / '.join(f'{u} (all)' if u >= units else str(u) for u in until)} "
            f"| {off} / {acc:.4f} / {asr:.4f} | {summary.get('train_seconds', 0):.0f} |"
        )
    for name in args.replicas:
        bad, aware = curves[name, "BadNets"], curves[name, "pruning-aware"]
        print(f"\n{name}: pruning curve (channels off → clean accuracy / attack success)\n")
        print("| channels off | BadNets acc | BadNets success | pruning-aware acc | pruning-aware success |")
        print("|---|---|---|---|---|")
        shown = sorted({*range(0, len(bad), args.step), len(bad) - 1})
        for i in shown:
            print(f"| {bad[i][0]} | {bad[i][1]:.4f} | {bad[i][2]:.4f} | {aware[i][1]:.4f} | {aware[i][2]:.4f} |")
    print("\nFinePruning() defaults (validation split as clean data, planted trigger as the recovered one)\n")
    print(
        "| replica | model | clean acc before → after | attack success before → after | pruned | success < 10 % within 2 pts | s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, kind, before, pruned, units, acc, asr, seconds in defences:
        ok = asr < 0.1 and acc >= before[1] - 0.02
        print(
            f"| {name} | {kind} | {before[1]:.4f} → {acc:.4f} | {before[2]:.4f} → {asr:.4f} "
            f"| {pruned} of {units} | {'yes' if ok else 'no'} | {seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
