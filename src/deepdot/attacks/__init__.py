"""Backdoor injection (data poisoning + training). Every attack is a settings object with a
``run`` method (:class:`~deepdot.attacks.base.Attack`) returning an :class:`AttackResult`; the
registry (:data:`ATTACKS`, :func:`build_attack`) lists them all."""

from deepdot.attacks.badnets import BadNets
from deepdot.attacks.base import Attack, AttackResult
from deepdot.attacks.pruning_aware import PruningAware
from deepdot.attacks.registry import ATTACKS, build_attack
from deepdot.attacks.trojan import Trojan
from deepdot.attacks.xiong import XiongRandom, XiongReconstructed

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "BadNets",
    "PruningAware",
    "Trojan",
    "XiongRandom",
    "XiongReconstructed",
    "build_attack",
]
