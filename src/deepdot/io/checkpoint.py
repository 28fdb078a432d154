"""The resume checkpoint of a scan (``OUT/.checkpoint``) and the digests that key it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdot.data import ImageData
from deepdot.io.files import ensure_dir, replacing, write_json
from deepdot.results import LabelTrigger
from deepdot.triggers import Trigger


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(data: ImageData) -> str:
    """SHA-256 of the images and labels themselves (not of where they came from)."""
    h = hashlib.sha256()
    for t in (data.x, data.y):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_LABEL_FILE = re.compile(r"label_(\d+)\.npz")


class Checkpoint:
    """Per-label results of an interrupted scan, in ``OUT/.checkpoint``.

    A checkpoint belongs to one *key*: everything that changes a label's result (the digest of
    the model's bytes, the digest of the data's pixels and labels, the preprocessing, every
    scanner setting). A rerun with another key starts afresh, so work done on other bytes is
    never reused. Each finished label is written to a temporary file and renamed to
    ``label_<k>.npz``; a damaged or half-written file is ignored and that label is redone.
    """

    def __init__(self, out: Path, key: dict[str, Any]) -> None:
        self.folder = out / ".checkpoint"
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def load(self) -> dict[int, LabelTrigger]:
        """Labels already done under the same key (empty if none, or if the key differs)."""
        key_file = self.folder / "key.json"
        if not key_file.exists():
            return {}
        try:
            if json.loads(key_file.read_text()).get("digest") != self.digest:
                return {}
        except (OSError, json.JSONDecodeError):
            return {}
        done: dict[int, LabelTrigger] = {}
        for f in sorted(self.folder.iterdir()):
            name = _LABEL_FILE.fullmatch(f.name)
            if name is None or not f.is_file() or f.is_symlink():
                continue  # temporary files of a save cut short, and anything else
            try:
                with np.load(f, allow_pickle=False) as z:
                    info = json.loads(str(z["info"]))
                    trigger = Trigger(torch.from_numpy(z["mask"]), torch.from_numpy(z["pattern"]))
                item = LabelTrigger(trigger=trigger, **info)
            except Exception:  # noqa: BLE001 - any damage (truncation, bad zip, wrong keys): redo the label
                continue
            if item.label == int(name.group(1)):
                done[item.label] = item
        return done

    def start(self) -> None:
        """Begin (or continue) a checkpoint for this key, discarding one for another key."""
        key_file = self.folder / "key.json"
        if key_file.exists():
            try:
                same = json.loads(key_file.read_text()).get("digest") == self.digest
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.is_symlink():  # planted: never write through it to somewhere else
            self.folder.unlink()
        ensure_dir(self.folder)
        write_json(key_file, {"digest": self.digest, "key": self.key})

    def save(self, item: LabelTrigger) -> None:
        info = {k: v for k, v in item.to_dict().items()}
        info["seconds"] = item.seconds
        info["cpu_seconds"] = item.cpu_seconds
        with replacing(self.folder / f"label_{item.label}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f, mask=item.trigger.mask.numpy(), pattern=item.trigger.pattern.numpy(), info=np.array(json.dumps(info))
            )
