"""Hostile files, as an attacker would write them: nothing in a model, data or output folder may
run code, touch other files, reuse stale work or end in a traceback / a false verdict.

Every hostile file is generated here, at test time. The command-line cases run the real
``deepdot`` console script in a subprocess, in a working folder that doubles as a canary: after
each run the test checks exit code 2, one line on stderr, no traceback, and that no file was
created or changed outside the run's own output folder — nor in the Python environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deepdot.cli import app
from deepdot.errors import ModelError
from deepdot.io.models import load_model
from deepdot.io.scans import load_scan
from deepdot.models import ARCHITECTURES, build_classifier

DEEPDOT = Path(sys.executable).parent / "deepdot"
runner = CliRunner()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def environment_snapshot() -> dict[str, int]:
    """The top level of site-packages (where a planted ``.pth`` file would run at every start)."""
    site = Path(sysconfig.get_paths()["purelib"])
    return {p.name: p.lstat().st_mtime_ns for p in site.iterdir()}


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEEPDOT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=180, **kwargs
    )


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with exactly one line on stderr, no traceback; returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- hostile TorchScript ---------------------------------------------------------------------------
class _Net(nn.Module):
    """A tiny classifier on 1×16×16 images (digits-sized), the body every hostile file shares;
    ``target`` is the file the hostile variants write."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.target = "unused"


class FromFileInForward(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stolen = torch.from_file(self.target, True, 16, dtype=torch.uint8)
        stolen.fill_(65)
        return self.fc(x.flatten(1)) + stolen.sum().float() * 0


class PrintInForward(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("exfiltrating", x.sum())
        return self.fc(x.flatten(1))


class SeedInForward(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape)  # consumes (and could reset) the global random state
        return self.fc((x + noise * 0).flatten(1))


class HugeAllocation(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        waste = torch.zeros([200000, 200000])  # 160 GB
        return self.fc(x.flatten(1)) + waste.sum() * 0


class ListBomb(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        waste = [0.0] * 100_000_000
        return self.fc(x.flatten(1)) + len(waste) * 0


class CatInALoop(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(40):
            y = torch.cat([y, y])
        return self.fc(x.flatten(1)) + y.sum() * 0


class Spin(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        while i >= 0:
            i = (i + 1) % 1000
        return self.fc(x.flatten(1))


class Plain(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class ExportedHelper(Plain):
    @torch.jit.export
    def helper(self) -> torch.Tensor:
        return torch.from_file(self.target, True, 16, dtype=torch.uint8).fill_(66)


def _save(module: torch.jit.ScriptModule, path: Path) -> Path:
    module.save(str(path))
    path.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 16, 16]}))
    return path


def _scripted(cls: type[nn.Module], target: Path | None = None) -> torch.jit.ScriptModule:
    net = cls()
    if target is not None:
        net.target = str(target)
    return torch.jit.script(net)


def _hooked(target: Path) -> torch.jit.ScriptModule:
    """A plain network whose scripted forward hook writes the file."""
    net = Plain()
    net.target = str(target)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        stolen = torch.from_file(module.target, True, 16, dtype=torch.uint8)
        return output + stolen.fill_(67).sum().float() * 0

    net.register_forward_hook(hook)
    return torch.jit.script(net)


def _edit_code(source: Path, dest: Path, old: str, new: str) -> Path:
    """Rewrite the archive's code as an attacker can (it is plain text in a zip)."""
    edited = 0
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py") and old.encode() in data:
                data = data.decode().replace(old, new).encode()
                edited += 1
            zout.writestr(info, data)
    assert edited == 1
    dest.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 16, 16]}))
    return dest


class WithState(Plain):
    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.fc.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.training = state[1]


def _setstate_writes(folder: Path, target: Path) -> Path:
    """``__setstate__`` runs inside ``torch.jit.load`` itself: before any graph can be checked."""
    clean = _save(torch.jit.script(WithState()), folder / "state.pt")
    payload = (
        f'    stolen = torch.from_file("{target}", True, 16, dtype=0)\n'
        "    self.training = bool(torch.sum(torch.fill_(stolen, 68)))\n"
    )
    return _edit_code(clean, folder / "setstate.pt", "    self.training = (state)[1]\n", payload)


def _torchbind(folder: Path) -> Path:
    """An archive naming a C++ torchbind class (its __setstate__ runs at load)."""
    clean = _save(torch.jit.script(Plain()), folder / "plain.pt")
    return _edit_code(
        clean,
        folder / "torchbind.pt",
        "  target : str\n",  # only _Net has it (a layer's type name may be mangled when scripted twice)
        "  target : str\n  packed : __torch__.torch.classes.quantized.LinearPackedParamsBase\n",
    )


def _flatbuffer_polyglot(folder: Path, target: Path) -> Path:
    """PyTorch's flatbuffer format with a harmless zip appended: a zip reader sees the zip,
    ``torch.jit.load`` loads the flatbuffer (and runs its objects' ``__setstate__``)."""
    source = f"""
import torch
from typing import Tuple

@torch.jit.script
class Cfg(object):
    def __init__(self, w: torch.Tensor):
        self.w = w
    def __getstate__(self) -> Tuple[torch.Tensor, int]:
        return (self.w, 1)
    def __setstate__(self, state: Tuple[torch.Tensor, int]):
        self.w = torch.from_file({str(target)!r}, True, 6, dtype=torch.uint8).fill_(69)
"""
    module_file = folder / "cfg_payload.py"
    module_file.write_text(source)
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg_payload", module_file)
    payload = importlib.util.module_from_spec(spec)
    sys.modules["cfg_payload"] = payload  # TorchScript reads the class's source through its module
    try:
        spec.loader.exec_module(payload)  # type: ignore[union-attr]
    finally:
        del sys.modules["cfg_payload"]

    class Evil(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = payload.Cfg(torch.zeros(1))

    flat = folder / "evil.ff"
    torch.jit.save_jit_module_to_flatbuffer(torch.jit.script(Evil()), str(flat))
    benign = _save(torch.jit.script(Plain()), folder / "benign.pt")
    out = folder / "polyglot.pt"
    out.write_bytes(flat.read_bytes())
    with zipfile.ZipFile(benign) as src, zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    out.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 16, 16]}))
    return out


HOSTILE_TORCHSCRIPT = {
    # name: (builder(folder, target) -> path, text the one error line names)
    "from_file in forward": (lambda d, t: _save(_scripted(FromFileInForward, t), d / "m.pt"), "aten::from_file"),
    "from_file in a forward hook": (lambda d, t: _save(_hooked(t), d / "m.pt"), "aten::from_file"),
    "from_file in an exported helper": (
        lambda d, t: _save(_scripted(ExportedHelper, t), d / "m.pt"),
        "aten::from_file",
    ),
    "__setstate__ at load time": (_setstate_writes, "__setstate__"),
    "torchbind class": (lambda d, t: _torchbind(d), "torch.classes"),
    "print": (lambda d, t: _save(_scripted(PrintInForward), d / "m.pt"), "prim::Print"),
    "random state": (lambda d, t: _save(_scripted(SeedInForward), d / "m.pt"), "aten::rand"),
    "huge allocation": (lambda d, t: _save(_scripted(HugeAllocation), d / "m.pt"), "aten::zeros"),
    "a list the file sizes": (lambda d, t: _save(_scripted(ListBomb), d / "m.pt"), "on a list"),
    "tensor work in a loop": (lambda d, t: _save(_scripted(CatInALoop), d / "m.pt"), "inside a loop"),
    "a loop that never ends": (lambda d, t: _save(_scripted(Spin), d / "m.pt"), "prim::Loop"),
    "flatbuffer and zip in one file": (_flatbuffer_polyglot, "not a plain TorchScript zip"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TORCHSCRIPT))
def test_hostile_torchscript_is_refused_before_it_runs(tmp_path, case):
    build, op = HOSTILE_TORCHSCRIPT[case]
    models, work, canary = tmp_path / "models", tmp_path / "work", tmp_path / "canary"
    for d in (models, work, canary):
        d.mkdir()
    target = canary / "written-by-the-model.pth"
    path = build(models, target)
    before, env_before = snapshot(tmp_path), environment_snapshot()
    proc = run_cli(["evaluate", path, "--data", "digits"], cwd=work)
    assert_refused(proc, op, "--allow-code")
    assert not target.exists()
    assert snapshot(tmp_path) == before
    assert environment_snapshot() == env_before


def test_an_onnx_tensor_naming_another_file_is_refused_even_on_a_dead_node(saved_models, tmp_path):
    """A Constant nobody reads, whose data 'lives' in notes.txt: onnx's own save would write it there."""
    onnx = pytest.importorskip("onnx")
    from deepdot.io.export import export_onnx

    path = export_onnx(load_model(saved_models["badnets"]), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    value = onnx.helper.make_tensor("dead_value", onnx.TensorProto.UINT8, [6], b"pwned\n", raw=True)
    value.data_location = onnx.TensorProto.EXTERNAL
    value.external_data.add(key="location", value="notes.txt")
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["dead"], value=value))
    onnx.save(model, str(path), save_as_external_data=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own notes\n")
    assert_refused(run_cli(["evaluate", path, "--data", "digits"], cwd=tmp_path), "external file")
    assert notes.read_text() == "the user's own notes\n"


def test_a_planted_checkpoint_cannot_forge_a_verdict(saved_models, tmp_path, monkeypatch):
    """Anyone with the model and data can compute a checkpoint's key; only this user's secret
    signs its label files."""
    import deepdot.io.checkpoint as checkpoint

    out = tmp_path / "scan"
    first = _scan(saved_models["badnets"], "digits", out)
    assert first.exit_code == 1, first.output
    key = json.loads((out / ".checkpoint" / "key.json").read_text())["key"]
    forger = checkpoint.Checkpoint(out, key)
    monkeypatch.setattr(checkpoint, "_SECRET", [b"the attacker's own secret, not the user's"])
    for item in load_scan(out).labels:  # every label as large as the rest: "no backdoor"
        forger.save(replace(item, mask_l1=20.0 + 0.1 * item.label))
    monkeypatch.undo()
    again = _scan(saved_models["badnets"], "digits", out)
    assert again.exit_code == 1 and "resuming" not in again.output, again.output


def test_a_closed_output_pipe_is_not_a_verdict(saved_models, tmp_path):
    proc = subprocess.Popen(
        [str(DEEPDOT), "evaluate", str(saved_models["clean"]), "--data", "digits"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # type: ignore[union-attr]
    proc.wait(timeout=120)
    assert proc.returncode in (0, 2)


def test_allow_code_is_what_lets_a_trusted_file_run(tmp_path):
    """The refusal is the only thing between the file and the disk: with allow_code it runs."""
    target = tmp_path / "written.bin"
    path = _save(_scripted(FromFileInForward, target), tmp_path / "m.pt")
    with pytest.raises(ModelError, match="aten::from_file"):
        load_model(path)
    assert not target.exists()
    load_model(path, allow_code=True)  # probe forward pass runs the file's code
    assert target.exists()


def test_earlier_hostile_files_are_still_refused(tmp_path):
    """A pickle that runs code, through both option names of the opt-in."""
    target = tmp_path / "canary" / "pwned"
    target.parent.mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": Payload()}, path)
    proc = run_cli(["evaluate", path, "--data", "digits", "--arch", "digits_net"], cwd=tmp_path)
    assert_refused(proc, "refused", "--allow-code")
    assert not target.exists()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("how", ["trace", "script"])
def test_ordinary_classifiers_load_as_torchscript_without_any_flag(tmp_path, arch, how):
    torch.manual_seed(0)
    classifier = build_classifier(arch)
    net = classifier.network.eval()
    x = torch.rand(3, *classifier.input_shape)
    module = torch.jit.trace(net, x) if how == "trace" else torch.jit.script(net)
    path = tmp_path / f"{arch}.pt"
    module.save(str(path), _extra_files={"model.json": json.dumps({"input_shape": list(classifier.input_shape)})})
    loaded = load_model(path, preprocess="unit")
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_a_scripted_backdoored_model_is_scanned_and_its_target_flagged(saved_models, tmp_path):
    classifier = load_model(saved_models["badnets"])
    path = tmp_path / "bad.pt"
    torch.jit.script(classifier.network.eval()).save(
        str(path), _extra_files={"model.json": json.dumps({"input_shape": [1, 16, 16], "preprocess": "unit"})}
    )
    result = runner.invoke(app, ["scan", str(path), "--data", "digits", "--out", str(tmp_path / "scan")])
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["flagged"] == [7]


# -- stale or damaged resume state ------------------------------------------------------------------
def _scan(model: Path, data: str | Path, out: Path, *extra: str):
    return runner.invoke(app, ["scan", str(model), "--data", str(data), "--out", str(out), "--steps", "12", *extra])


FAITHFUL_SHORT = ("--mode", "faithful", "--steps", "6", "--samples-per-step", "64")


def test_damaged_checkpoint_files_are_redone_not_fatal(saved_models, tmp_path):
    out = tmp_path / "scan"
    first = _scan(saved_models["badnets"], "digits", out, *FAITHFUL_SHORT)
    assert first.exit_code in (0, 1), first.output
    expected = json.loads((out / "scan.json").read_text())
    folder = out / ".checkpoint"
    (folder / "label_3.npz").write_bytes((folder / "label_3.npz").read_bytes()[:100])  # truncated
    (folder / "label_4.tmp.npz").write_bytes(b"left behind by a kill during a save")
    (folder / "label_5.npz").write_bytes(b"")
    again = _scan(saved_models["badnets"], "digits", out, *FAITHFUL_SHORT)
    assert again.exit_code == first.exit_code, again.output
    assert "resuming: 8 label(s)" in again.output  # all but the truncated and the empty one
    redone = json.loads((out / "scan.json").read_text())
    assert redone["flagged"] == expected["flagged"]
    assert [t["mask_l1"] for t in redone["labels"]] == pytest.approx([t["mask_l1"] for t in expected["labels"]])


def test_a_fast_scan_reuses_only_a_complete_set_of_labels(saved_models, tmp_path):
    """The fast scan optimises labels jointly: two labels redone alone got triggers half their
    joint-run size and were flagged beside the planted one. A partial checkpoint is redone whole."""
    out = tmp_path / "scan"
    first = _scan(saved_models["badnets"], "digits", out)
    expected = json.loads((out / "scan.json").read_text())
    assert expected["flagged"] == [7]
    for label in (3, 5):
        (out / ".checkpoint" / f"label_{label}.npz").unlink()
    again = _scan(saved_models["badnets"], "digits", out)
    assert again.exit_code == first.exit_code == 1 and "resuming" not in again.output
    redone = json.loads((out / "scan.json").read_text())
    assert redone["flagged"] == [7]
    assert [t["mask_l1"] for t in redone["labels"]] == pytest.approx([t["mask_l1"] for t in expected["labels"]])
    complete = _scan(saved_models["badnets"], "digits", out)
    assert "resuming: 10 label(s)" in complete.output


def test_resume_never_reuses_work_done_on_other_data(saved_models, digits_test, digits_train, tmp_path):
    data = tmp_path / "data.npz"
    n = len(digits_test)
    np.savez(data, x=digits_test.x.numpy(), y=digits_test.y.numpy())
    out = tmp_path / "scan"
    assert _scan(saved_models["badnets"], data, out).exit_code in (0, 1)
    # same path, same number of images, other images
    np.savez(data, x=digits_train.x[:n].numpy(), y=digits_train.y[:n].numpy())
    rerun = _scan(saved_models["badnets"], data, out)
    assert rerun.exit_code in (0, 1), rerun.output
    assert "resuming" not in rerun.output


def test_resume_never_reuses_work_done_on_another_model(saved_models, tmp_path):
    out = tmp_path / "scan"
    model = tmp_path / "model"
    for name in ("model.safetensors", "model.json"):
        model.mkdir(exist_ok=True)
        (model / name).write_bytes((saved_models["badnets"] / name).read_bytes())
    assert _scan(model, "digits", out).exit_code in (0, 1)
    (model / "model.safetensors").write_bytes((saved_models["clean"] / "model.safetensors").read_bytes())
    rerun = _scan(model, "digits", out)
    assert "resuming" not in rerun.output


def test_a_folder_holding_model_onnx_scans_and_resumes(saved_models, tmp_path):
    """The layout ``deepdot mitigate`` writes for ONNX input (it crashed the checkpoint key)."""
    pytest.importorskip("onnx")
    from deepdot.io.export import export_onnx

    folder = tmp_path / "repaired"
    export_onnx(load_model(saved_models["badnets"]), folder / "model.onnx")
    first = _scan(folder, "digits", tmp_path / "scan")
    assert first.exit_code in (0, 1), first.output
    second = _scan(folder, "digits", tmp_path / "scan")
    assert second.exit_code == first.exit_code and "resuming: 10 label(s)" in second.output


# -- too little data ----------------------------------------------------------------------------------
def test_no_verdict_from_a_single_image(saved_models, tmp_path):
    result = _scan(saved_models["badnets"], "digits", tmp_path / "scan", "--max-images", "1")
    assert result.exit_code == 2
    assert "only 1 clean image" in result.output
    assert not (tmp_path / "scan" / "scan.json").exists()


def test_small_data_gives_a_verdict_with_a_warning(saved_models, tmp_path):
    result = _scan(saved_models["badnets"], "digits", tmp_path / "scan", "--max-images", "80")
    assert result.exit_code in (0, 1), result.output
    warnings = json.loads((tmp_path / "scan" / "scan.json").read_text())["warnings"]
    assert any("only 80 clean images" in w for w in warnings)
    assert "warning:" in result.output


# -- output folders -----------------------------------------------------------------------------------
def test_writes_replace_planted_symlinks_instead_of_following_them(saved_models, tmp_path):
    out, outside = tmp_path / "scan", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    victims = {}
    for name in ("label_7_mask.png", "scan.json", "label_0_fusion.png"):
        victim = outside / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims[name] = victim
    (out / ".checkpoint").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    result = _scan(saved_models["badnets"], "digits", out)
    assert result.exit_code in (0, 1), result.output
    assert snapshot(outside) == before
    for name in victims:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0


# -- one line means one line ---------------------------------------------------------------------------
def test_messages_keep_brackets_and_usage_errors_are_one_line(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(Plain()).save(str(path))  # no input shape recorded anywhere
    line = assert_refused(run_cli(["evaluate", path, "--data", "digits"], cwd=tmp_path))
    assert '{"input_shape": [channels, height, width]}' in line
    assert_refused(run_cli(["scan", "--no-such-option"], cwd=tmp_path), "--no-such-option", "--help")
    assert_refused(run_cli(["scan", "x", "--mode", "sideways"], cwd=tmp_path), "sideways")
    assert_refused(run_cli(["scan", "x", "--images-per-step", "0"], cwd=tmp_path), "images per step")


def test_an_unexpected_crash_is_one_line_and_never_exit_1(saved_models, tmp_path, monkeypatch):
    import deepdot.scan.fast as fast

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fast.FastNeuralCleanse, "_reverse", broken)
    result = _scan(saved_models["badnets"], "digits", tmp_path / "scan")
    assert result.exit_code == 2
    assert "internal error" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output


def test_sigterm_stops_a_scan_like_ctrl_c(saved_models, tmp_path):
    out = tmp_path / "scan"
    proc = subprocess.Popen(
        [str(DEEPDOT), "scan", str(saved_models["badnets"]), "--data", "digits", "--out", str(out), "--mode",
         "faithful"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / ".checkpoint" / "key.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "terminated" in stderr and "resumes" in stderr and "Traceback" not in stderr
    assert (out / ".checkpoint" / "key.json").exists()
