"""The Trojan attack (Liu et al., NDSS 2018) on the zoo's clean models, and what the fast Neural
Cleanse scan makes of it: the Trojan Square and Trojan Watermark models of the Neural Cleanse
paper, rebuilt on the digits and MNIST replicas.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trojan_bench.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trojan_bench.py --replicas digits --retrain all

Each attack starts from the replica's clean model (``~/.cache/deepdot/zoo/<replica>-clean`` when
``benchmarks/zoo.py`` built it, else trained here with the zoo's recipe) and retrains with the
replica's training config; the attacked models, their triggers and the figures are kept under
``~/.cache/deepdot/trojan`` (``--cache``) and reused unless ``--force``. The watermark is
``armory/watermarking.png`` (the text "John Smith, LLC", like the Trojan paper's text
watermark): its alpha channel box-resized to the image, the 7 % of pixels it covers most.

The table: attack success and clean accuracy against the clean model's; the fast scan's verdict
(flagged labels, the model's anomaly index, the target's own index, the clean twin's index for
reference); the recovered target trigger's mask L1 against the planted one's, and the IoU of the
two masks binarised at 0.5.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from deepdot.attacks.trojan import Trojan
from deepdot.io.files import ensure_dir, load_trigger, read_json, save_trigger, write_json
from deepdot.io.images import open_image
from deepdot.io.models import load_model, save_model
from deepdot.metrics import clean_accuracy
from deepdot.models import build_classifier
from deepdot.scan import FastNeuralCleanse
from deepdot.training import train
from deepdot.triggers import mask_iou
from zoo import REPLICAS, SHARED, log_epochs, splits

ZOO = Path(os.environ.get("DEEPDOT_ZOO", "~/.cache/deepdot/zoo")).expanduser()
CACHE = Path("~/.cache/deepdot/trojan").expanduser()
WATERMARK = SHARED / "triggers" / "armory" / "watermarking.png"


def watermark_mask(path: Path, size: tuple[int, int], area: float = 0.07) -> torch.Tensor:
    """The picture's alpha (or darkness, without alpha) box-resized to ``size`` (H, W); the
    ``area`` share of pixels it covers most become the mask (1), the rest 0."""
    from PIL import Image

    h, w = size
    with open_image(path) as im:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            alpha = rgba.convert("L").point(lambda v: 255 - v)
        soft = torch.from_numpy(np.asarray(alpha.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0)
    k = max(1, round(area * h * w))
    keep = torch.topk(soft.flatten(), k).indices
    mask = torch.zeros(h * w)
    mask[keep] = 1.0
    return mask.view(h, w)


def clean_model(name: str, train_data, test, force: bool):
    """The replica's clean model: the zoo's, or trained here with the zoo's recipe (cached)."""
    replica = REPLICAS[name]
    for folder in (ZOO / f"{name}-clean", CACHE / f"{name}-clean"):
        if (folder / "model.safetensors").exists() and not (force and folder.parent == CACHE):
            return load_model(folder), str(folder)
    folder = ensure_dir(CACHE / f"{name}-clean")
    model = build_classifier(replica.arch, num_classes=test.num_classes, input_shape=test.image_shape)
    train(model, train_data, replica.config, progress=log_epochs)
    save_model(model, folder)
    return model, str(folder)


def scan_summary(model, data, target: int | None, planted=None) -> dict:
    result = FastNeuralCleanse().scan(model, data, suspected=[target] if target is not None else ())
    out = {
        "flagged": list(result.flagged),
        "anomaly_index": result.outliers.anomaly_index,
        "median_l1": result.outliers.median,
        "scan_seconds": round(result.seconds, 1),
    }
    if target is not None:
        index = dict(zip(result.outliers.labels, result.outliers.indices, strict=True))
        recovered = result.trigger_for(target)
        out.update(
            target_anomaly_index=index[target],
            target_l1=recovered.mask_l1,
            planted_l1=planted.mask_l1,
            iou=mask_iou(recovered.mask, planted.mask, 0.5),
        )
    return out


def attack_row(name: str, preset: str, retrain: str, clean, splits_, args) -> dict:
    train_data, _, test = splits_
    replica = REPLICAS[name]
    folder = CACHE / f"{name}-trojan-{preset}-{retrain}"
    if (folder / "row.json").exists() and not args.force:
        return read_json(folder / "row.json")
    ensure_dir(folder)
    if preset == "square":
        attack = Trojan.square(target=replica.target, retrain=retrain)
    else:
        attack = Trojan.watermark(
            watermark_mask(args.watermark, test.image_shape[1:]), target=replica.target, retrain=retrain
        )
    model = copy.deepcopy(clean)
    start = time.perf_counter()
    result = attack.run(model, train_data, test, replica.config, progress=log_epochs)
    seconds = time.perf_counter() - start
    save_model(model, folder)
    save_trigger(result.trigger, folder / "trigger.npz")
    row = {"replica": name, "preset": preset, **{k: v for k, v in result.to_dict().items() if k != "train_loss"}}
    row["attack_seconds"] = round(seconds, 1)
    row.update(scan_summary(model, test, replica.target, load_trigger(folder / "trigger.npz")))
    write_json(folder / "row.json", row)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", nargs="*", default=["digits", "mnist"], choices=["digits", "mnist"])
    parser.add_argument("--presets", nargs="*", default=["square", "watermark"], choices=["square", "watermark"])
    parser.add_argument("--retrain", nargs="*", default=["after", "all"], choices=["after", "all"])
    parser.add_argument("--watermark", type=Path, default=WATERMARK)
    parser.add_argument("--force", action="store_true", help="rebuild and rescan even if cached")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.replicas:
        parts = splits(name)
        clean, source = clean_model(name, parts[0], parts[2], args.force)
        base_path = CACHE / f"{name}-clean-scan.json"
        if base_path.exists() and not args.force:
            base = read_json(base_path)
        else:
            ensure_dir(CACHE)
            base = {"clean_accuracy": clean_accuracy(clean, parts[2]), "source": source}
            base.update(scan_summary(clean, parts[2], None))
            write_json(base_path, base)
        print(f"{name} clean ({source}): {base}", flush=True)
        for preset in args.presets:
            for retrain in args.retrain:
                row = attack_row(name, preset, retrain, clean, parts, args)
                row["clean_model"] = base
                print({k: v for k, v in row.items() if k != "clean_model"}, flush=True)
                rows.append(row)
    print(f"\nTrojan attack vs fast Neural Cleanse ({date.today().isoformat()})\n")
    print(
        "| replica | trigger | retrain | layer: neurons | activation clean / before / after | area | "
        "clean acc (clean model) | attack success | flagged | anomaly index (clean twin) | target index | "
        "target L1 (planted) | IoU |"
    )
    print("|" + "---|" * 13)
    for r in rows:
        b = r["clean_model"]
        flagged = ", ".join(map(str, r["flagged"])) or "none"
        print(
            f"| {r['replica']} | {r['preset']} | {r['retrain']} | {r['layer']}: {r['neurons']} | "
            f"{r['neuron_activation_clean']:.1f} / {r['neuron_activation_before']:.1f} / "
            f"{r['neuron_activation_after']:.1f} | {r['trigger_area']:.1%} | "
            f"{r['clean_accuracy']:.4f} ({b['clean_accuracy']:.4f}) | {r['attack_success_rate']:.4f} | {flagged} "
            f"(target {r['target']}) | {r['anomaly_index']:.2f} ({b['anomaly_index']:.2f}) | "
            f"{r['target_anomaly_index']:.2f} | {r['target_l1']:.1f} ({r['planted_l1']:.0f}) | {r['iou']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
