"""The pruning-aware attack (Liu, Dolan-Gavitt and Garg, *Fine-Pruning*, RAID 2018, Sec. 3.2).

The pruning defence switches off the last convolutional layer's channels that clean images leave
dormant, because a plain BadNets backdoor tends to live there. An attacker who expects that
defence hides the backdoor where it will not look, in four steps:

1. train the model on clean data;
2. prune it as the defender would: switch off last-conv channels in increasing order of their
   mean activation on clean images (the ranking of :class:`~deepdot.mitigate.FinePruning`) until
   clean accuracy has dropped by ``max_accuracy_drop``, or a ``prune_fraction`` of them;
3. fine-tune the pruned model on BadNets-poisoned data for a few epochs with the pruned channels
   held at zero (their outputs are zeroed, so their weights get no gradient), so the backdoor has
   to live in the surviving channels;
4. put the pruned channels back, dormant: their weights are kept, but the bias just before their
   activation (the batch norm's shift when one follows the conv, else the conv's bias) is lowered
   until they output exactly 0 on clean images, with a margin (:func:`make_dormant`). The
   defender's ranking then puts them first, and pruning them changes nothing.

The student report on Fine-Pruning (RAIN, STROPPA, UNTERBERGER 2020) pruned until clean accuracy
had dropped 5 %: the default here, one point beyond deepdot's defender (4 %, the paper's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from deepdot.attacks.badnets import BadNets
from deepdot.attacks.base import AttackResult
from deepdot.data import ImageData
from deepdot.errors import DeepdotError
from deepdot.metrics import attack_success_rate, clean_accuracy
from deepdot.mitigate.layers import resolve_layer, unit_activations, units_off
from deepdot.models import Classifier
from deepdot.progress import ProgressEvent, ProgressFn, no_progress
from deepdot.training import TrainConfig, TrainHistory, train
from deepdot.triggers import Trigger

_BatchNorm = nn.modules.batchnorm._BatchNorm

#: how many modules before the layer are tried as the place to lower the bias
_MAX_CANDIDATES = 4

#: how many times the bias may be lowered further when one lowering did not silence a unit
_MAX_LOWERINGS = 12


@dataclass(frozen=True, kw_only=True)
class PruningAware:
    """Pruning-aware attack settings (Fine-Pruning, Sec. 3.2).

    Args:
        trigger: the trigger stamped onto poisoned images (as in BadNets).
        target: attacker's label, or :data:`~deepdot.metrics.ALL_TO_ALL`.
        poison_rate: share of the training images poisoned during the fine-tuning.
        layer: whose channels are pruned: ``last_conv`` (the defence's choice) or a module name.
        max_accuracy_drop: prune while clean accuracy on the held-out share stays within this of
            the clean model's (0.05, the student report's value).
        prune_fraction: prune exactly this share of the layer's channels instead (the accuracy
            rule is then not used).
        fine_tune_epochs / lr: the poisoned fine-tuning of the pruned model (Adam; the batch
            size, weight decay, augmentation and seed come from the training config). On the
            digits replica 10 epochs at 1e-3 (the default training rate; the report fine-tuned
            at a smaller one than it trained with) planted the trigger (96-98 % success) where 5
            cost up to a point more clean accuracy, and 1e-4 for 5 epochs did not plant it (7 %).
        check_fraction: share of the training images held out from the clean training, to rank
            the channels and judge the accuracy drop on.
        pretrained: the classifier is already a trained clean model: skip step 1 (the held-out
            share may then have been trained on, so the accuracy drop is judged on seen images).
        resample: poison a fresh share of every batch instead of one fixed set (see BadNets).
        seed: which images are held out and poisoned.
    """

    method = "pruning-aware"

    trigger: Trigger
    target: int
    poison_rate: float = 0.1
    layer: str = "last_conv"
    max_accuracy_drop: float = 0.05
    prune_fraction: float | None = None
    fine_tune_epochs: int = 10
    lr: float = 1e-3
    check_fraction: float = 0.1
    pretrained: bool = False
    resample: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise DeepdotError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.prune_fraction is not None and not 0.0 < self.prune_fraction < 1.0:
            raise DeepdotError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if self.fine_tune_epochs < 1 or not self.lr > 0:
            raise DeepdotError("the pruning-aware attack needs fine_tune_epochs >= 1 and a positive learning rate")
        if not 0.0 < self.check_fraction < 1.0:
            raise DeepdotError(f"check_fraction must be in (0, 1), got {self.check_fraction}")
        self.poisoning()  # checks the poison rate

    def poisoning(self) -> BadNets:
        """The BadNets poisoning of step 3."""
        return BadNets(
            trigger=self.trigger,
            target=self.target,
            poison_rate=self.poison_rate,
            resample=self.resample,
            seed=self.seed,
        )

    def run(
        self,
        classifier: Classifier,
        train_data: ImageData,
        test_data: ImageData,
        config: TrainConfig | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> AttackResult:
        """Train ``classifier`` in place into a pruning-aware backdoored model of its full size;
        measure it on ``test_data``."""
        config = config or TrainConfig()
        poisoning = self.poisoning()
        poisoning.poisoned_flags(train_data)  # the target and the trigger's size, before any training
        layer = resolve_layer(classifier, self.layer, "the pruning-aware attack")
        part, check = train_data.split(self.check_fraction, seed=self.seed)
        clean_history = TrainHistory() if self.pretrained else train(classifier, part, config, progress=progress)
        before = clean_accuracy(classifier, test_data)

        pruned = self.choose_pruned(classifier, layer, check, progress)
        with units_off(classifier, layer, pruned):
            after_pruning = clean_accuracy(classifier, test_data)
            tuning = replace(config, epochs=self.fine_tune_epochs, lr=self.lr, lr_milestones=())
            poisoned = poisoning.run(classifier, train_data, test_data, tuning, progress=progress)
        dormant_by = make_dormant(classifier, layer, pruned, train_data.x)

        history = TrainHistory(
            clean_history.loss + poisoned.history.loss,
            clean_history.accuracy + poisoned.history.accuracy,
            clean_history.seconds + poisoned.history.seconds,
        )
        units = int(unit_activations(classifier, check.x[:1], layer).shape[1])
        return AttackResult(
            clean_accuracy=clean_accuracy(classifier, test_data),
            attack_success_rate=attack_success_rate(classifier, test_data, self.trigger, self.target),
            target=self.target,
            poisoned_images=poisoned.poisoned_images,
            history=history,
            facts={
                "layer": layer,
                "units": units,
                "pruned_channels": {"count": len(pruned), "indices": [int(u) for u in pruned]},
                "pruned_fraction": len(pruned) / units,
                "clean_accuracy_before_poisoning": before,
                "accuracy_after_pruning": after_pruning,
                "clean_epochs": len(clean_history.loss),
                "fine_tune_epochs": len(poisoned.history.loss),
                "dormant_by": f"bias of {dormant_by}" if dormant_by else None,
            },
        )

    def choose_pruned(
        self, classifier: Classifier, layer: str, check: ImageData, progress: ProgressFn = no_progress
    ) -> list[int]:
        """The channels of ``layer`` to prune, in increasing mean activation on ``check`` (the
        defender's ranking): a ``prune_fraction`` of them, or as many as keep clean accuracy on
        ``check`` within ``max_accuracy_drop`` of the unpruned model's (at least one channel
        is always left)."""
        order = [int(u) for u in torch.argsort(unit_activations(classifier, check.x, layer).mean(0), stable=True)]
        units = len(order)
        if self.prune_fraction is not None:
            return order[: min(units - 1, max(1, math.floor(self.prune_fraction * units)))]
        floor = clean_accuracy(classifier, check) - self.max_accuracy_drop - 1e-12
        keep = 0
        for n in range(1, units):
            with units_off(classifier, layer, order[:n]):
                accuracy = clean_accuracy(classifier, check)
            progress(ProgressEvent("prune", n, units - 1, {"pruned": n, "clean_accuracy": accuracy}))
            if accuracy < floor:
                break
            keep = n
        return order[:keep]


# -- dormant channels ---------------------------------------------------------------------------
@torch.no_grad()
def _outputs(classifier: Classifier, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The first output of each named module on ``x`` (eval mode)."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        classifier._module(n).register_forward_hook(lambda _m, _i, out, n=n: got.setdefault(n, out)) for n in names
    ]
    try:
        classifier(x.to(classifier.device))
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def _run_order(classifier: Classifier, x: torch.Tensor) -> list[str]:
    """Module names in the order their forward passes finish on ``x``."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n))
        for n, m in classifier.network.named_modules()
        if n
    ]
    try:
        classifier(x.to(classifier.device))
    finally:
        for h in handles:
            h.remove()
    return order


def _unit_range(values: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit of ``idx``: the highest and lowest value over images (and positions)."""
    v = values[:, idx].transpose(0, 1).flatten(1)
    return v.amax(1), v.amin(1)


def _silent(acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per unit of ``idx``: whether its output is 0 on every image (and position)."""
    scale = max(1.0, float(acts.abs().max()))
    return acts[:, idx].transpose(0, 1).flatten(1).abs().amax(1) <= 1e-6 * scale


@torch.no_grad()
def make_dormant(classifier: Classifier, layer: str, units: list[int] | torch.Tensor, images: torch.Tensor) -> str:
    """Make ``units`` of ``layer`` output exactly 0 on clean ``images`` (and, with a margin, on
    images like them), in place, keeping every weight but one bias per unit.

    The bias lowered is that of the nearest module before the layer's output with one output per
    unit: a batch norm's shift (so a conv followed by a batch norm works whatever the sign of
    its scale) or a conv/dense layer's bias. Each unit's bias is lowered by its highest value
    there on ``images`` plus its spread (highest less lowest), so the highest pre-activation
    becomes minus the spread and a ReLU-like activation outputs 0; it is lowered again while a
    unit is not yet silent (a residual sum before the activation). The change is kept only if the
    model then computes what switching the units off computes. Returns the module changed ("" for
    no units).

    Raises:
        DeepdotError: no module before the layer can silence the units this way.
    """
    idx = torch.as_tensor(units, dtype=torch.long).flatten()
    if len(idx) == 0:
        return ""
    x = images[:2000]
    classifier.eval()
    with units_off(classifier, layer, idx):
        expected = classifier(x.to(classifier.device))
    order = _run_order(classifier, x[:1])
    width = int(_outputs(classifier, x[:1], [layer])[layer].shape[1])
    modules = dict(classifier.network.named_modules())
    candidates: list[str] = []
    for name in reversed(order[: order.index(layer) + 1]):
        m = modules[name]
        bias = getattr(m, "bias", None)
        outs = (
            m.num_features
            if isinstance(m, _BatchNorm)
            else m.out_channels
            if isinstance(m, nn.Conv2d)
            else m.out_features
            if isinstance(m, nn.Linear)
            else None
        )
        if outs == width and isinstance(bias, torch.Tensor) and name not in candidates:
            candidates.append(name)
    for name in candidates[:_MAX_CANDIDATES]:
        bias = modules[name].bias
        old = bias.detach().clone()
        high, low = _unit_range(_outputs(classifier, x, [name])[name].cpu(), idx)
        lowered = (high.clamp_min(0) + (high - low).clamp_min(1e-3)).to(bias)
        bias[idx] -= lowered  # also for units already silent: the margin
        for _ in range(_MAX_LOWERINGS):
            silent = _silent(_outputs(classifier, x, [layer])[layer].cpu(), idx).to(bias.device)
            if silent.all():
                break
            extra = torch.where(silent, torch.zeros_like(lowered), lowered)  # doubles what is lowered
            bias[idx] -= extra
            lowered += extra
        done = _silent(_outputs(classifier, x, [layer])[layer].cpu(), idx).all()
        got = classifier(x.to(classifier.device))
        if done and torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-5):
            return name
        bias.copy_(old)
    raise DeepdotError(
        f"cannot keep the pruned channels of layer {layer!r} dormant: no bias before it switches them off "
        "(the layer must end in a ReLU-like activation); name another layer"
    )
