"""The resume checkpoint of a scan (``OUT/.checkpoint``) and the digests that key it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
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

    The key can be computed by anyone who has the model and the data, so a checkpoint planted in
    the output folder could otherwise forge a verdict. Each label file therefore carries an HMAC
    over the key's digest and its contents, made with a secret only this user can read
    (:func:`secret`); a file without a valid one is redone.
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
                    mask, pattern, text = z["mask"], z["pattern"], str(z["info"])
                    if not hmac.compare_digest(str(z["mac"]), self._mac(mask, pattern, text)):
                        continue  # not written by this user's deepdot for this key
                    trigger = Trigger(torch.from_numpy(mask), torch.from_numpy(pattern))
                item = LabelTrigger(trigger=trigger, **json.loads(text))
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
        mask, pattern, text = item.trigger.mask.numpy(), item.trigger.pattern.numpy(), json.dumps(info)
        mac = self._mac(mask, pattern, text)
        with replacing(self.folder / f"label_{item.label}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, mask=mask, pattern=pattern, info=np.array(text), mac=np.array(mac))

    def _mac(self, mask: np.ndarray, pattern: np.ndarray, info: str) -> str:
        h = hmac.new(secret(), digestmod=hashlib.sha256)
        for part in (self.digest.encode(), info.encode(), *(_array_bytes(a) for a in (mask, pattern))):
            h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()


def _array_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return str(a.shape).encode() + a.tobytes()


_SECRET: list[bytes] = []


def secret() -> bytes:
    """This user's checkpoint secret: 32 random bytes in ``~/.cache/deepdot/checkpoint.key``
    (``$DEEPDOT_CACHE``), created readable by the user alone. Where it cannot be kept, a secret
    for this process only (checkpoints then resume within the run, not across runs)."""
    if _SECRET:
        return _SECRET[0]
    folder = Path(os.environ.get("DEEPDOT_CACHE", "~/.cache/deepdot")).expanduser()
    path = folder / "checkpoint.key"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            if path.is_symlink() or path.stat().st_mode & 0o077:
                raise OSError(f"{path} is not private to this user") from None
            value = path.read_bytes()
        else:
            value = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
        if len(value) < 32:
            raise OSError(f"{path} is too short")
    except OSError:
        value = secrets.token_bytes(32)
    _SECRET.append(value)
    return value
