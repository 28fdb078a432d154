"""Backdoor injection (data poisoning + training). Every attack is a settings object with a
``run`` method (:class:`~deepdot.attacks.base.Attack`) returning an :class:`AttackResult`."""

from deepdot.attacks.badnets import BadNets
from deepdot.attacks.base import Attack, AttackResult

__all__ = ["Attack", "AttackResult", "BadNets"]
