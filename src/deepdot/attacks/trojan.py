"""The Trojan attack (Liu et al., NDSS 2018): from a trained model, *make* a trigger that
excites a few internal neurons, then retrain the layers after them to answer it.

1. **Neurons.** The paper picks, in a layer (default: the first fully connected one to run),
   the neurons most strongly connected to the layer before (largest sums of absolute incoming
   weights). deepdot keeps, of the ``candidates`` strongest, the ``neurons`` a short trial
   trigger raises furthest above their clean values, in clean standard deviations (1 candidate:
   the paper's rule). On the digits net the strongest neuron's best corner trigger was black on
   black, invisible: 72 % success retraining everything, 99.8 % with the trial pick.
2. **Trigger.** Its shape is fixed (a corner square of ``area`` of the image, or a watermark);
   only its pixels are optimised, descending the paper's cost ``sum (v - f_n(x))^2`` with the
   gradient confined to the mask. Our reading: f_n is the layer's output (dense: before the
   activation; conv channel: its spatial mean) on clean images stamped with the trigger (the
   paper's attacker has no data and inverts the trigger alone); pixels stay in [0, 1] through
   tanh and step with Adam; v is far above any clean value (default ten times the largest; the
   paper uses a large constant), so this is gradient ascent in effect.
3. **Retraining** of the layers after (``retrain="after"``, the paper's) or all of them, on
   clean images plus a fresh ``poison_fraction`` of every batch stamped and relabelled (the
   paper: images inverted from the model). After a first dense layer that is often only the
   logit layer, a linear read-out, weaker than ``"all"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from deepdot.attacks.base import AttackResult
from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate, attack_targets, clean_accuracy
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn, no_progress
from deepdot.training import TrainConfig, train
from deepdot.triggers import CORNERS, Trigger, place

SHAPES = ("square", "watermark")
RETRAIN = ("after", "all")
MAX_AREA = 0.5  # largest share of the image a trigger may cover
TRIGGER_IMAGES = 256  # clean images the trigger is optimised on
TRIAL_STEPS = 40  # steps of each candidate neuron's trial trigger


@dataclass(frozen=True, kw_only=True)
class Trojan:
    """Trojan attack settings (the algorithm: see the module docstring). ``target``: the label.

    ``shape``: ``"square"`` (``area`` of the image in ``corner``, ``margin`` pixels in) or
    ``"watermark"`` (``watermark_mask``: H×W in [0, 1], the image's size; the preset
    :meth:`watermark` owns the shorter name). ``layer``: module name (default: the first fully
    connected); ``neurons`` driven, picked among ``candidates`` (1: the paper's rule alone),
    towards ``activation_target`` (default: ten times their largest clean value, at least 10) in
    ``trigger_steps`` Adam steps of ``trigger_lr``. ``pretrain``: the classifier is untrained,
    train it on the clean data first. ``retrain``: ``"after"`` the layer or ``"all"``, for
    ``retrain_epochs`` (default: the config's), stamping ``poison_fraction`` of every batch.
    ``seed``: the initial pattern, the images the trigger is made on, the poisoning.
    """

    method = "trojan"

    target: int
    shape: str = "square"
    watermark_mask: torch.Tensor | None = field(default=None, repr=False, compare=False)
    area: float = 0.07
    corner: str = "bottom-right"
    margin: int = 1
    layer: str | None = None
    neurons: int = 1
    candidates: int = 8
    activation_target: float | None = None
    trigger_steps: int = 300
    trigger_lr: float = 0.1
    pretrain: bool = False
    retrain: str = "after"
    retrain_epochs: int | None = None
    poison_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("retrain", self.retrain, RETRAIN)):
            if value not in allowed:
                raise DeepdotError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.target < 0:
            raise DeepdotError(f"the Trojan attack sends triggered images to one label; target {self.target} is none")
        if self.corner not in CORNERS:
            raise DeepdotError(f"unknown corner {self.corner!r}; use one of {', '.join(CORNERS)}")
        if not 0 < self.area <= MAX_AREA:
            raise DeepdotError(f"trigger area must be in (0, {MAX_AREA}] of the image, got {self.area}")
        if min(self.neurons, self.candidates, self.trigger_steps, self.retrain_epochs or 1) < 1 or self.margin < 0:
            raise DeepdotError("neurons, candidates, trigger steps and retrain epochs must be >= 1, margin >= 0")
        if self.trigger_lr <= 0 or (self.activation_target is not None and not self.activation_target > 0):
            raise DeepdotError("the trigger learning rate and the activation target must be positive")
        if not 0.0 < self.poison_fraction < 1.0:
            raise DeepdotError(f"poison fraction must be in (0, 1), got {self.poison_fraction}")
        if self.shape == "square" and self.watermark_mask is not None:
            raise DeepdotError("a watermark mask was given for a square trigger; use shape='watermark'")
        if self.shape == "watermark":
            if not isinstance(m := self.watermark_mask, torch.Tensor) or m.ndim != 2 or m.numel() == 0:
                raise DeepdotError("a watermark trigger needs its mask as an H×W tensor")
            if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                raise DeepdotError("watermark mask values must lie in [0, 1]")
            if not 0 < (share := float(m.float().mean())) <= MAX_AREA:
                raise DeepdotError(f"the watermark covers {share:.1%} of the image; it must cover (0, {MAX_AREA:.0%}]")

    @classmethod
    def square(cls, *, target: int, area: float = 0.07, corner: str = "bottom-right", **settings: Any) -> Trojan:
        """Trojan Square: a square of ~7 % of the image in the bottom-right corner."""
        return cls(target=target, shape="square", area=area, corner=corner, **settings)

    @classmethod
    def watermark(cls, mask: torch.Tensor, *, target: int, **settings: Any) -> Trojan:
        """Trojan Watermark: the trigger draws only where ``mask`` (H×W, [0, 1], image size) is."""
        return cls(target=target, shape="watermark", watermark_mask=mask.detach().float().cpu(), **settings)

    def trigger_mask(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The trigger's fixed shape for images of ``image_shape``: H×W in [0, 1]."""
        _, h, w = image_shape
        if (m := self.watermark_mask) is not None:
            if tuple(m.shape) != (h, w):
                raise DeepdotError(f"the watermark mask is {m.shape[0]}x{m.shape[1]} but the images are {h}x{w}")
            return m.float().clone()
        side = max(1, round(math.sqrt(self.area * h * w)))
        top, left = place(image_shape, (side, side), corner=self.corner, margin=self.margin)
        mask = torch.zeros(h, w)
        mask[top : top + side, left : left + side] = 1.0
        return mask

    def find_layer(self, classifier: Classifier, order: list[str]) -> str:
        """``layer``, or the first dense layer in ``order`` (module names as they run) that is
        not the output layer."""
        if self.layer is not None:
            module = classifier._module(self.layer)  # one line naming the layers for an unknown name
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise DeepdotError(f"layer {self.layer!r} is no dense or conv layer (no incoming weights); name one")
            return self.layer
        modules = dict(classifier.network.named_modules())
        weighted = [n for n in order if _has_weights(modules[n])]
        dense = [n for n in dict.fromkeys(order) if isinstance(modules[n], nn.Linear)]
        if not (hidden := [n for n in dense if weighted and n != weighted[-1]]):
            what = f"only the output layer {dense[0]!r}" if dense else "none"
            raise DeepdotError(f"the Trojan attack needs a hidden fully connected layer (it has {what}); name a layer")
        return hidden[0]

    def select_neurons(self, probe: NeuronProbe, progress: ProgressFn = no_progress) -> tuple[list[int], dict]:
        """The neurons to drive and how they were chosen (the candidates, and how many clean
        standard deviations above its clean mean a trial trigger raised each)."""
        module = probe.classifier._module(probe.layer)
        assert isinstance(module, (nn.Linear, nn.Conv2d))  # find_layer checked
        strength = module.weight.detach().abs().flatten(1).sum(1)
        if self.neurons > len(strength):
            raise DeepdotError(f"cannot select {self.neurons} neurons from layer {probe.layer!r} of {len(strength)}")
        ranked = [int(i) for i in torch.argsort(strength, descending=True)[: max(self.neurons, self.candidates)]]
        if len(ranked) == self.neurons:
            return ranked, {"candidates": ranked}
        drive = []
        with _frozen(probe.classifier):
            clean = probe.values(ranked)
            for i, n in enumerate(ranked):
                _, pattern = probe.ascend([n], TRIAL_STEPS, self._goal(clean[:, i]), self.trigger_lr, self.seed)
                raised = probe.values([n], pattern).mean()
                drive.append(float((raised - clean[:, i].mean()) / clean[:, i].std().clamp_min(1e-6)))
                progress(ProgressEvent("trojan-neurons", i + 1, len(ranked), {"neuron": n}))
        best = sorted(range(len(ranked)), key=lambda i: -drive[i])[: self.neurons]
        return [ranked[i] for i in best], {"candidates": ranked, "candidate_drive": [round(d, 3) for d in drive]}

    def _goal(self, clean: torch.Tensor) -> float:
        return self.activation_target or max(10.0, 10.0 * float(clean.max()))

    def optimise_pattern(
        self, probe: NeuronProbe, neurons: list[int], progress: ProgressFn = no_progress
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The pattern (C×H×W, zero outside the mask) driving ``neurons``, and their mean value on
        the clean images, stamped with the initial (random) pattern, and with the optimised one."""
        with _frozen(probe.classifier):
            clean = probe.values(neurons)
            goal = self._goal(clean)
            start, pattern = probe.ascend(neurons, self.trigger_steps, goal, self.trigger_lr, self.seed, progress)
            before, after = (probe.values(neurons, p).mean().item() for p in (start, pattern))
        return pattern, {
            "neuron_activation_clean": float(clean.mean()),
            "neuron_activation_before": before,
            "neuron_activation_after": after,
            "activation_target": goal,
        }

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> AttackResult:
        """Make the trigger for ``classifier`` (trained first if ``pretrain``), retrain it in place
        on ``train_data`` with the trigger planted, and measure it on ``test_data``."""
        k = min(classifier.num_classes, train_data.num_classes)
        if not 0 <= self.target < k:
            raise DeepdotError(f"target label {self.target} is outside 0..{k - 1}")
        if train_data.image_shape != classifier.input_shape:
            shapes = f"{train_data.image_shape} but the model takes {classifier.input_shape}"
            raise DeepdotError(f"{train_data.name}: images are {shapes}")
        mask = self.trigger_mask(train_data.image_shape)
        order = run_order(classifier, train_data.x[:1])
        layer = self.find_layer(classifier, order)
        frozen = modules_up_to(classifier, layer, order) if self.retrain == "after" else []
        held = {id(p) for n in frozen for p in classifier._module(n).parameters(recurse=False)}
        if not (trainable := sum(p.numel() for p in classifier.parameters() if id(p) not in held)):
            raise DeepdotError(f"nothing runs after layer {layer!r} to retrain; name an earlier layer or retrain all")
        config = config or TrainConfig()
        if self.pretrain:
            train(classifier, train_data, config, progress=progress)
        accuracy_before = clean_accuracy(classifier, test_data)
        g = torch.Generator().manual_seed(self.seed)
        sample = train_data.x[torch.randperm(len(train_data), generator=g)[:TRIGGER_IMAGES]].to(classifier.device)
        probe = NeuronProbe(classifier, layer, mask.to(classifier.device), sample)
        neurons, selection = self.select_neurons(probe, progress)
        pattern, activations = self.optimise_pattern(probe, neurons, progress)
        trigger = Trigger(mask, pattern.cpu())

        def poison(x: torch.Tensor, y: torch.Tensor, _idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hit = (torch.rand(len(y), generator=g) < self.poison_fraction) & (y != self.target)
            if hit.any():
                x, y = x.clone(), y.clone()
                x[hit] = trigger.apply(x[hit])
                y[hit] = attack_targets(y[hit], self.target, k)
            return x, y

        retrain_config = replace(config, epochs=self.retrain_epochs) if self.retrain_epochs else config
        with _frozen(classifier, frozen):
            history = train(classifier, train_data, retrain_config, batch_transform=poison, progress=progress)
        facts = {
            "layer": layer,
            "neurons": neurons,
            **selection,
            **activations,
            "shape": self.shape,
            "mask_pixels": int((mask > 0).sum()),
            "trigger_area": float(mask.mean()),
            "retrain": self.retrain,
            "frozen_layers": frozen,
            "retrained_parameters": trainable,
            "poison_fraction": self.poison_fraction,
            "clean_accuracy_before": accuracy_before,
        }
        return AttackResult(
            clean_accuracy=clean_accuracy(classifier, test_data),
            attack_success_rate=attack_success_rate(classifier, test_data, trigger, self.target),
            target=self.target,
            poisoned_images=-1,
            history=history,
            trigger=trigger,
            facts=facts,
        )


@dataclass(frozen=True)
class NeuronProbe:
    """The chosen layer of a classifier, the trigger's mask and the clean images it is made on."""

    classifier: Classifier
    layer: str
    mask: torch.Tensor
    x: torch.Tensor

    def values(
        self, neurons: list[int], pattern: torch.Tensor | None = None, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Values of ``neurons`` (a conv channel: its spatial mean) on the images (``x`` or all),
        stamped with ``pattern`` if given (with gradients, unlike :meth:`Trigger.apply`): N×k."""
        x = self.x if x is None else x
        with self.classifier.capture(self.layer) as outputs:
            self.classifier(x if pattern is None else (1 - self.mask) * x + self.mask * pattern)
        return (out.flatten(2).mean(2) if (out := outputs[-1]).ndim > 2 else out)[:, neurons]

    def ascend(
        self, neurons: list[int], steps: int, goal: float, lr: float, seed: int, progress: ProgressFn = no_progress
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial, optimised) pattern: Adam descends ``(goal - value)^2`` of the neurons over
        batches of the images stamped with the pattern, inside the mask only."""
        g = torch.Generator().manual_seed(seed)
        inside = (self.mask > 0).to(self.x.dtype)
        start = torch.rand(self.x.shape[1:], generator=g).to(self.x.device) * inside
        raw = torch.atanh((start * 2 - 1).clamp(-0.999, 0.999)).requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=lr)
        for step in range(steps):
            idx = torch.randint(0, len(self.x), (min(64, len(self.x)),), generator=g)
            loss = ((goal - self.values(neurons, (torch.tanh(raw) + 1) / 2 * inside, self.x[idx])) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress(ProgressEvent("trojan-trigger", step + 1, steps, {"loss": loss.item()}))
        return start, ((torch.tanh(raw.detach()) + 1) / 2 * inside).clamp(0, 1)


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def run_order(classifier: Classifier, probe: torch.Tensor) -> list[str]:
    """Names of the network's modules in the order their forward passes finish on ``probe``."""
    order: list[str] = []
    modules = [(n, m) for n, m in classifier.network.named_modules() if n]
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n)) for n, m in modules]
    try:
        classifier.predict(probe)  # eval mode, no gradients
    finally:
        for handle in handles:
            handle.remove()
    return order


def modules_up_to(classifier: Classifier, layer: str, order: list[str]) -> list[str]:
    """Modules with weights that run no later than ``layer``, itself included (``order`` from
    :func:`run_order`): what ``retrain="after"`` keeps unchanged. Modules that never ran count."""
    end = max(i for i, n in enumerate(order) if n == layer)
    first = {n: order.index(n) for n in dict.fromkeys(order)}
    return [n for n, m in classifier.network.named_modules() if n and _has_weights(m) and first.get(n, -1) <= end]


@contextmanager
def _frozen(classifier: Classifier, names: list[str] | None = None) -> Iterator[None]:
    """Inside the block the weights of modules ``names`` do not change (no gradients; batch
    norms keep their statistics). ``None``: every weight, and eval mode (the trigger is optimised)."""
    chosen = [m for n, m in classifier.network.named_modules() if n in names] if names is not None else [classifier]
    params = [(p, p.requires_grad) for m in chosen for p in m.parameters(recurse=names is None)]
    norms = [(m, m.momentum) for m in chosen if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = classifier.training
    if names is None:
        classifier.eval()
    for p, _ in params:
        p.requires_grad_(False)
    for m, _ in norms:
        m.momentum = 0.0  # running statistics stay as they are
    try:
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        for m, momentum in norms:
            m.momentum = momentum
        classifier.train(was_training)
