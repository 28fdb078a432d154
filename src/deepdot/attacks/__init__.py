"""Backdoor injection (data poisoning + training)."""

from deepdot.attacks.badnets import AttackResult, BadNets

__all__ = ["AttackResult", "BadNets"]
