"""Mitigate zoo models with every method and measure them with the planted trigger.

    python benchmarks/mitigation_bench.py --models gtsrb-badnets
    python benchmarks/mitigation_bench.py --models mnist-badnets --methods unlearn prune-last-conv
    python benchmarks/mitigation_bench.py --methods fine-tune unlearn --set fine-tune.lr=1e-3 unlearn.lr=5e-4

For each infected zoo model: the recovered trigger comes from the model's fast scan (read from
``--work``/<model>/fast as written by ``scan_bench.py``; scanned here when it is missing), the
defender's clean data is the replica's **validation split** (a held-out part of the training
data, never seen in training; GTSRB: split by track), and every figure is measured on the
replica's **test set** with the planted trigger (attack success on test images whose true label
is not the target). Nothing here uses poisoned data to repair. Prints one table (method, clean
accuracy and planted/recovered attack success before and after, share of the layer pruned,
filter FPR/FNR, whether the repair is within the default budget of ``deepdot mitigate``:
recovered attack success at most 5 %, clean accuracy lost at most 1 point on the test set,
seconds) and writes ``<work>/<model>/mitigation.json``. ``--set METHOD.FIELD=VALUE``
changes one setting of a method for this run (the table then names the changed settings).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from deepdot.errors import DeepdotError
from deepdot.io.files import ensure_dir, load_trigger, read_json, write_json
from deepdot.io.models import load_model
from deepdot.io.scans import load_recovered
from deepdot.mitigate import PlantedBackdoor, build_mitigation, measure, repair
from deepdot.mitigate.registry import AUTO_METHODS
from deepdot.report.artifacts import write_scan
from deepdot.scan import FastNeuralCleanse
from zoo import REPLICAS, splits

ZOO = Path(os.environ.get("DEEPDOT_ZOO", "~/.cache/deepdot/zoo")).expanduser()

#: the methods compared, as (row name, algorithm from deepdot's registry with the settings compared)
METHODS = {
    "filter": build_mitigation("filter"),
    "prune-last-conv": build_mitigation("prune", layer="last_conv"),
    "prune-penultimate": build_mitigation("prune", layer="penultimate"),
    "unlearn": build_mitigation("unlearn"),
    "fine-tune": build_mitigation("fine-tune"),
    "fine-prune": build_mitigation("fine-prune"),
}


#: what ``--methods auto`` tries: the registry's auto methods with their defaults
AUTO = {name: build_mitigation(name) for name in AUTO_METHODS}


def with_settings(methods: dict, assignments: list[str]) -> dict:
    """``methods`` with ``METHOD.FIELD=VALUE`` assignments applied (values read as Python
    literals: ``1e-3``, ``None``, ``0.005``)."""
    methods = dict(methods)
    for assignment in assignments:
        target, _, raw = assignment.partition("=")
        method, _, name = target.partition(".")
        if method not in methods or not name or not raw:
            raise SystemExit(f"--set {assignment!r}: expected METHOD.FIELD=VALUE with METHOD one of {list(methods)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            methods[method] = dataclasses.replace(methods[method], **{name: value})
        except (TypeError, DeepdotError) as exc:  # unknown field, or a value the method refuses
            raise SystemExit(f"--set {assignment!r}: {exc}") from None
    return methods


def recovered(name: str, model, scan_data, work: Path, labels: list[int] | None = None):
    """The flagged labels' (or ``labels``') recovered backdoors from the model's fast scan
    (scanning if needed)."""
    scan_dir = work / name / "fast"
    if not (scan_dir / "scan.json").exists():
        print(f"{name}: no fast scan in {scan_dir}; scanning", flush=True)
        write_scan(ensure_dir(scan_dir), FastNeuralCleanse().scan(model, scan_data), {"model": name})
    _, backdoors = load_recovered(scan_dir, model.input_shape, labels)
    return backdoors, read_json(scan_dir / "scan.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ZOO)
    parser.add_argument("--models", nargs="*", default=["gtsrb-badnets"], help="infected zoo models")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=[*METHODS, "auto"],
        help="auto: as `mitigate --method auto`",
    )
    parser.add_argument("--work", type=Path, default=Path("~/.cache/deepdot/bench").expanduser())
    parser.add_argument(
        "--labels", nargs="*", type=int, help="mitigate these labels' recovered triggers (default: the flagged ones)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.FIELD=VALUE", help="change a method's setting")
    parser.add_argument(
        "--tag", help="write <work>/<model>/mitigation-TAG.json (default: mitigation.json, or a tag built from --set)"
    )
    args = parser.parse_args(argv)
    methods = with_settings(METHODS, args.set)
    tag = args.tag or "_".join(a.replace("=", "-") for a in args.set)

    table = []
    for name in args.models:
        folder = args.zoo / name
        replica = name.rsplit("-", 1)[0]
        if replica not in REPLICAS or not (folder / "trigger.npz").exists():
            print(f"skipping {name}: not an infected zoo model (build it with zoo.py)", file=sys.stderr)
            continue
        model = load_model(folder)
        summary = read_json(folder / "attack.json")
        planted = PlantedBackdoor(int(summary["target"]), load_trigger(folder / "trigger.npz"))
        _, repair_set, test = splits(replica)
        backdoors, scan = recovered(name, model, test, args.work, args.labels)
        before = measure(model, test, backdoors, planted)
        print(f"{name}: flagged {scan['flagged']}, repair on {len(repair_set)} clean images, measured on {len(test)}")
        print(f"  before: {json.dumps(before.to_dict())}", flush=True)
        rows = {}
        for method in args.methods:
            start = time.perf_counter()
            report = repair(
                model, backdoors, repair_set, test, method="auto" if method == "auto" else methods[method].method,
                mitigations=AUTO if method == "auto" else {method: methods[method]}, planted=planted,
            )  # fmt: skip
            result = report.result
            row = {
                "seconds": time.perf_counter() - start,
                "details": result.to_dict(),
                "after": report.after.to_dict(),
                "within_budget": report.within_budget,
            }
            if report.filter is not None:
                row["filter"] = report.filter.to_dict()
            if result.pruning is not None:
                row["pruned_fraction"] = result.pruning.pruned_fraction
            row["settings"] = [a for a in args.set if a.startswith(method + ".")]
            if report.auto is not None:
                row["auto_winner"] = report.auto.winner
                row["candidates_after"] = {k: v.to_dict() for k, v in report.candidates_after.items()}
            rows[method] = row
            print(f"  {method}: {json.dumps({k: v for k, v in row.items() if k != 'details'})}", flush=True)
        write_json(
            ensure_dir(args.work / name) / (f"mitigation-{tag}.json" if tag else "mitigation.json"),
            {"model": name, "flagged": scan["flagged"], "before": before.to_dict(), "methods": rows},
        )
        table.append((name, before, rows))

    print(f"\nmitigation benchmark, {date.today()}, {torch.get_num_threads()} threads")
    print(
        "| model | method | clean acc before → after | planted ASR before → after | recovered ASR after "
        "| pruned | filter FPR / FNR (planted) | within budget | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, before, rows in table:
        for method, row in rows.items():
            after, flt = row["after"], row.get("filter")
            pruned = f"{row['pruned_fraction']:.1%}" if "pruned_fraction" in row else "—"
            screen = f"{flt['false_positive_rate']:.1%} / {flt['planted_false_negative_rate']:.1%}" if flt else "—"
            cells = [
                name,
                " ".join([method, *row["settings"]])
                + (f" (kept {row['auto_winner']})" if "auto_winner" in row else ""),
                f"{before.clean_accuracy:.4f} → {after['clean_accuracy']:.4f}",
                f"{before.planted_attack_success_rate:.4f} → {after['planted_attack_success_rate']:.4f}",
                f"{after['attack_success_rate']:.4f}",
                pruned,
                screen,
                "yes" if row["within_budget"] else "**no**",
                f"{row['seconds']:.0f}",
            ]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
