"""Study the fast scan's budget: record every label's full trajectory once, replay stopping rules.

    python benchmarks/fast_policy.py record gtsrb-badnets --steps 200 --out traces/
    python benchmarks/fast_policy.py record gtsrb-badnets --model ~/.cache/deepdot/exports/gtsrb-badnets/model.h5 --out traces/
    python benchmarks/fast_policy.py replay traces/*.json --steps 120 --smoothing 4 --warmup 70

In the batched scan the labels are independent (each has its own mask, pattern, Adam state and
cost schedule, and all see the same image stream), so a label's trajectory does not depend on
when the others stop. ``record`` runs :class:`FastNeuralCleanse` with every label active for all
steps (no drop, no early stop) and stores each step's success, mask L1 and cost per label.
``replay`` then applies a bookkeeping and stopping rule to those trajectories and prints the
verdict, anomaly index and image passes the rule would have given: exactly what a scan with that
rule would report (checked against real scans), at no model cost. This is how the defaults of
2026-11-24 were chosen (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from deepdot.io.models import load_model
from deepdot.progress import ProgressEvent
from deepdot.scan import FastNeuralCleanse
from deepdot.scan.outliers import outlier_test
from zoo import splits

ZOO = Path(os.environ.get("DEEPDOT_ZOO", "~/.cache/deepdot/zoo")).expanduser()


def record(args: argparse.Namespace) -> None:
    native = load_model(ZOO / args.replica_model)
    model = load_model(args.model, preprocess=native.preprocess) if args.model else native
    data = splits(args.replica_model.rsplit("-", 1)[0])[2]
    scanner = FastNeuralCleanse(
        seed=args.seed,
        steps=args.steps,
        init_cost=args.init_cost,
        warmup_steps=args.steps + 1,
        early_stop_patience=None,
    )
    steps: list[dict] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == "step":
            steps.append({k: event.info[k] for k in ("labels", "success", "l1", "cost")})

    result = scanner.scan(model, data, progress=on_progress)
    images, batches, _ = scanner.plan(model.num_classes)
    name = f"{args.replica_model}-{Path(args.model).name if args.model else 'native'}-seed{args.seed}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(
        json.dumps(
            {
                "labels": [t.label for t in result.labels],
                "images_per_step": images * batches,
                "settings": scanner.settings(),
                "steps": steps,
            }
        )
    )
    print(f"wrote {args.out / name}: {len(steps)} steps, {result.image_passes:,} image passes")


def replay_one(trace: dict, *, steps: int, smoothing: int, warmup: int | None, drop_margin: float,
               patience: int | None, threshold: float = 0.99) -> tuple:  # fmt: skip
    """The fast scan's bookkeeping and stopping, vectorised over labels, on a recorded trace."""
    labels = sorted(trace["labels"])
    col = {label: i for i, label in enumerate(labels)}
    k, n = len(labels), min(steps, len(trace["steps"]))
    success, l1, cost = (np.zeros((n, k)) for _ in range(3))
    for t, s in enumerate(trace["steps"][:n]):
        cols = [col[v] for v in s["labels"]]
        success[t, cols], l1[t, cols], cost[t, cols] = s["success"], s["l1"], s["cost"]
    best, value = np.full(k, math.inf), np.full(k, math.inf)
    stop_best, stop_count = np.full(k, math.inf), np.zeros(k, int)
    up, down = np.zeros(k, bool), np.zeros(k, bool)
    active, ran = np.ones(k, bool), np.zeros(k, int)
    for t in range(n):
        a = active.copy()
        ran[a] += 1
        lo = max(0, t - smoothing + 1)
        s_avg, l_avg = success[lo : t + 1].mean(0), l1[lo : t + 1].mean(0)
        better = a & (s_avg >= threshold) & (l_avg < best)
        best[better], value[better] = l_avg[better], l1[t, better]  # the kept mask is this step's
        gain = best < stop_best
        stop_count = np.where(a & (best < math.inf), np.where(gain, 0, stop_count + 1), stop_count)
        stop_best = np.minimum(stop_best, best)
        if t + 1 < n:
            nxt = cost[t + 1]
            fired = (cost[t] == 0) & (nxt > 0)
            up = np.where(fired, False, up | ((nxt > cost[t]) & (cost[t] > 0)))
            down = np.where(fired, False, down | ((nxt < cost[t]) & (nxt > 0)))
        if patience is not None:
            active &= ~(up & down & (stop_count >= patience))
        if warmup is not None and t + 1 >= warmup and (t + 1 - warmup) % 10 == 0:
            est = np.where(best < math.inf, best, l1[t])
            med = np.median(est)
            spread = 1.4826 * np.median(np.abs(est - med))
            active &= ~((est > med + drop_margin * spread) & (best < math.inf))
    sizes = {label: float(value[i] if value[i] < math.inf else l1[n - 1, i]) for label, i in col.items()}
    return outlier_test(sizes), int(ran.sum()) * trace["images_per_step"], sizes


def replay(args: argparse.Namespace) -> None:
    print(
        f"steps {args.steps}, smoothing {args.smoothing}, warm-up {args.warmup}, drop margin {args.drop_margin}, "
        f"early-stop patience {args.patience}"
    )
    print("| trace | flagged | anomaly index | median | MAD | image passes | smallest (L1, label) |")
    print("|---|---|---|---|---|---|---|")
    for path in args.traces:
        stats, passes, sizes = replay_one(
            json.loads(Path(path).read_text()),
            steps=args.steps,
            smoothing=args.smoothing,
            warmup=args.warmup,
            drop_margin=args.drop_margin,
            patience=args.patience,
        )
        low = sorted((round(v, 1), label) for label, v in sizes.items())[:3]
        print(
            f"| {Path(path).stem} | {list(stats.flagged) or 'none'} | {stats.anomaly_index:.2f} | {stats.median:.1f} "
            f"| {stats.mad:.1f} | {passes:,} | {low} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run a scan with every label for every step; store the trajectories")
    rec.add_argument("replica_model", help="zoo model folder name, e.g. gtsrb-badnets (data and preprocessing)")
    rec.add_argument(
        "--model", help="scan this file instead (e.g. the exported .h5), with the zoo model's preprocessing"
    )
    rec.add_argument("--steps", type=int, default=200)
    rec.add_argument("--init-cost", type=float, default=FastNeuralCleanse.init_cost)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--out", type=Path, default=Path("~/.cache/deepdot/traces").expanduser())
    rep = sub.add_parser("replay", help="apply a stopping rule to recorded trajectories")
    rep.add_argument("traces", nargs="+")
    rep.add_argument("--steps", type=int, default=FastNeuralCleanse.steps)
    rep.add_argument("--smoothing", type=int, default=FastNeuralCleanse.smoothing_steps)
    rep.add_argument("--warmup", type=int, default=FastNeuralCleanse.warmup_steps, help="-1: never drop labels")
    rep.add_argument("--drop-margin", type=float, default=FastNeuralCleanse.drop_margin)
    rep.add_argument("--patience", type=int, default=None, help="per-label early stop (default: off)")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args)
    else:
        args.warmup = None if args.warmup is not None and args.warmup < 0 else args.warmup
        replay(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
