"""Scan the benchmark zoo with the fast and the faithful Neural Cleanse, in one run.

    python benchmarks/scan_bench.py                       # every zoo model, both modes
    python benchmarks/scan_bench.py --models gtsrb-badnets --modes faithful

Prints one table: model, planted truth, then per mode anomaly index, flagged labels, seconds
(and processor seconds: run with OMP_NUM_THREADS=1 on a shared machine and compare those), image
passes, the recovered target trigger's L1 and IoU with the planted one, and the ratios
faithful/fast. It also measures the model's plain forward+backward throughput at the batch the
fast scan uses, so the scan's own efficiency is visible (both per processor second, which stays
fair when other jobs share the machine). Faithful scans use the seed notebook's
settings (500 steps, 500 samples per step, batch 32) and checkpoint per label under
``--work``: an interrupted run resumes. Build the zoo first with ``benchmarks/zoo.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from deepdot.io.checkpoint import Checkpoint, file_digest
from deepdot.io.files import ensure_dir, load_trigger, read_json, write_json
from deepdot.io.models import load_model
from deepdot.report.artifacts import write_scan
from deepdot.scan import FastNeuralCleanse, NeuralCleanse
from deepdot.scan.base import frozen_weights
from deepdot.triggers import mask_iou
from zoo import REPLICAS, splits

ZOO = Path(os.environ.get("DEEPDOT_ZOO", "~/.cache/deepdot/zoo")).expanduser()


def scanners(args: argparse.Namespace) -> dict:
    return {
        "fast": FastNeuralCleanse(seed=args.seed),
        "faithful": NeuralCleanse(
            steps=args.faithful_steps, samples_per_step=args.faithful_samples, batch_size=32, seed=args.seed
        ),
    }


def throughput(model, shape, batch: int, seconds: float = 3.0) -> tuple[float, float]:
    """Plain forward+backward images per second (gradient w.r.t. the input, weights frozen),
    measured for at least ``seconds`` after one warm-up pass: per wall second and per processor
    second. The latter is the fair one on a shared machine (and compares with a scan's
    ``cpu_seconds``, whenever the scan ran)."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, *shape, requires_grad=True)
    target = torch.zeros(batch, dtype=torch.long)
    torch.nn.functional.cross_entropy(model(x), target).backward()  # warm-up
    start, cpu_start, images = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds:
        x.grad = None
        torch.nn.functional.cross_entropy(model(x), target).backward()
        images += batch
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def run_workers(argv: list[str], name: str, workers: int) -> None:
    """Run this script's faithful scan of ``name`` in ``workers`` one-thread processes, each on
    every ``workers``-th label, all writing to the same per-label checkpoint."""
    base, skip = [], False
    for a in argv:  # drop --workers N / --workers=N
        if skip or a.startswith("--workers"):
            skip = a == "--workers" and not skip
            continue
        base.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *base, "--models", name, "--modes", "faithful", "--worker", f"{i}/{workers}"],
            env=env,
        )
        for i in range(workers)
    ]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit(f"a faithful scan worker for {name} failed")


def scan_data(replica: str):
    """The clean data the defender scans with: the replica's test split (GTSRB: the official
    test set, as Neural Cleanse does)."""
    return splits(replica)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ZOO)
    parser.add_argument("--models", nargs="*", help="zoo model folders, e.g. gtsrb-badnets (default: all built)")
    parser.add_argument("--modes", nargs="*", default=["fast", "faithful"], choices=["fast", "faithful"])
    parser.add_argument("--faithful-steps", type=int, default=500)
    parser.add_argument("--faithful-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("~/.cache/deepdot/bench").expanduser())
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="faithful scans: run labels in this many processes of one thread each (labels are independent; "
        "the scan's seconds stay the sum of the labels' own times, i.e. one core's worth)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "i/n": internal, one share of the labels
    args = parser.parse_args(argv)

    names = args.models or sorted(p.name for p in args.zoo.iterdir() if (p / "model.safetensors").exists())
    rows = []
    for name in names:
        folder = args.zoo / name
        replica = name.rsplit("-", 1)[0]
        if replica not in REPLICAS:
            print(f"skipping {name}: not a zoo replica", file=sys.stderr)
            continue
        model = load_model(folder)
        data = scan_data(replica)
        summary = read_json(folder / ("attack.json" if (folder / "attack.json").exists() else "train.json"))
        planted = load_trigger(folder / "trigger.npz") if (folder / "trigger.npz").exists() else None
        truth = summary.get("target") if planted is not None else None
        row = {
            "model": name,
            "planted_target": truth,
            "clean_accuracy": summary["clean_accuracy"],
            "attack_success_rate": summary.get("attack_success_rate"),
        }
        for mode in args.modes:
            scanner = scanners(args)[mode]
            out = ensure_dir(args.work / name / mode)
            checkpoint = Checkpoint(
                out,
                {
                    "model": file_digest(folder / "model.safetensors"),
                    "settings": scanner.settings(),
                    "images": len(data),
                },
            )
            done = checkpoint.load()
            checkpoint.start()
            if args.worker:  # one share of a faithful scan's labels, into the shared checkpoint
                i, n = map(int, args.worker.split("/"))
                share = [v for v in range(model.num_classes) if v % n == i and v not in done]
                with frozen_weights(model):
                    for label in share:
                        checkpoint.save(scanner.reverse_engineer(model, data.x, label))
                continue
            if mode == "faithful" and args.workers > 1:
                run_workers(argv or sys.argv[1:], name, args.workers)
                done = checkpoint.load()
            print(f"{name}: {mode} scan ({len(done)} labels from checkpoint)", flush=True)
            result = scanner.scan(
                model, data, suspected=[truth] if truth is not None else (), done=done, on_label=checkpoint.save
            )
            write_scan(out, result, {"model": name})
            entry = {
                "anomaly_index": result.outliers.anomaly_index,
                "flagged": list(result.flagged),
                "seconds": result.seconds,
                "cpu_seconds": result.cpu_seconds,
                "image_passes": result.image_passes,
                "median": result.outliers.median,
                "mad": result.outliers.mad,
            }
            if truth is not None:
                recovered = result.trigger_for(truth)
                entry["target_mask_l1"] = recovered.mask_l1
                entry["target_iou"] = mask_iou(recovered.mask, planted.mask)
            row[mode] = entry
            print(f"  {json.dumps(entry)}", flush=True)
        if args.worker:
            continue
        if "fast" in row:
            # at the size of the fast scan's own forward/backward passes
            images, _, labels_per_pass = FastNeuralCleanse().plan(model.num_classes)
            row["pass_images"] = images * min(labels_per_pass, model.num_classes)
            wall, cpu = throughput(model, model.input_shape, row["pass_images"])
            row["plain_images_per_second"], row["plain_images_per_cpu_second"] = wall, cpu
            row["fast_images_per_second"] = row["fast"]["image_passes"] / row["fast"]["seconds"]
            if row["fast"].get("cpu_seconds"):
                row["fast_images_per_cpu_second"] = row["fast"]["image_passes"] / row["fast"]["cpu_seconds"]
        if "fast" in row and "faithful" in row:
            row["passes_ratio"] = row["faithful"]["image_passes"] / row["fast"]["image_passes"]
            row["time_ratio"] = row["faithful"]["seconds"] / row["fast"]["seconds"]
            if row["faithful"]["cpu_seconds"] > 0:  # 0: labels checkpointed before processor time was recorded
                row["cpu_time_ratio"] = row["faithful"]["cpu_seconds"] / row["fast"]["cpu_seconds"]
        rows.append(row)
        write_json(args.work / f"{name}.json", row)

    if args.worker:
        return 0
    print(f"\nscan benchmark, {date.today()}, {torch.get_num_threads()} threads")
    head = (
        "| model | planted | "
        + " | ".join(f"{m} AI | {m} flagged | {m} s (cpu s) | {m} passes | {m} target L1 | {m} IoU" for m in args.modes)
        + " | passes ratio | time ratio (cpu) | fast / plain images per processor second |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["model"], str(r["planted_target"] if r["planted_target"] is not None else "clean")]
        for m in args.modes:
            e = r[m]
            cells += [
                f"{e['anomaly_index']:.2f}",
                str(e["flagged"] or "none"),
                f"{e['seconds']:.0f} ({e.get('cpu_seconds', float('nan')):.0f})",
                f"{e['image_passes']:,}",
                f"{e.get('target_mask_l1', float('nan')):.1f}",
                f"{e.get('target_iou', float('nan')):.2f}",
            ]
        cells += [
            f"{r.get('passes_ratio', float('nan')):.1f}",
            f"{r.get('time_ratio', float('nan')):.1f} ({r.get('cpu_time_ratio', float('nan')):.1f})",
        ]
        if "fast_images_per_cpu_second" in r:  # processor time: fair whatever else ran beside
            fast, plain = r["fast_images_per_cpu_second"], r["plain_images_per_cpu_second"]
            cells.append(f"{fast:.0f} / {plain:.0f} ({fast / plain:.0%})")
        else:
            cells.append("")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
