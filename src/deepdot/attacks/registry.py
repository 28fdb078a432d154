"""The one list of attacks: their names (``deepdot attack --method``), settings classes, and how
the command line's common options map onto each class's settings.

The command line, the zoo and the benchmarks build attacks through :func:`build_attack`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from deepdot.attacks.badnets import BadNets
from deepdot.attacks.pruning_aware import PruningAware
from deepdot.attacks.trojan import Trojan
from deepdot.attacks.xiong import XiongRandom, XiongReconstructed
from deepdot.errors import DeepdotError
from deepdot.triggers import Trigger

#: method name -> settings class
ATTACKS: dict[str, type] = {
    "badnets": BadNets,
    "trojan": Trojan,
    "xiong-reconstructed": XiongReconstructed,
    "xiong-random": XiongRandom,
    "pruning-aware": PruningAware,
}

#: the attacks that stamp a trigger given to them (the others make their own)
GIVEN_TRIGGER = ("badnets", "pruning-aware")


def build_attack(
    name: str, *, target: int, trigger: Trigger | None = None, poison_rate: float | None = None, **settings: Any
) -> Any:
    """The attack called ``name`` with these settings; ``None`` keeps a default, and a setting the
    method has no field for is ignored (e.g. ``sampling_rate`` for BadNets). ``poison_rate`` is
    the share of training images stamped and relabelled: ``poison_rate`` of BadNets and the
    pruning-aware attack, ``poison_fraction`` of Trojan and Xiong et al.'s attacks.

    Raises:
        DeepdotError: an unknown name, a missing trigger, or a value the method refuses.
    """
    if name not in ATTACKS:
        raise DeepdotError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    names = {f.name for f in fields(cls)}
    if "trigger" in names and trigger is None:
        raise DeepdotError(f"the {name} attack needs a trigger")
    wanted = {
        "target": target,
        "trigger": trigger,
        "poison_rate" if "poison_rate" in names else "poison_fraction": poison_rate,
        **settings,
    }
    return cls(**{k: v for k, v in wanted.items() if v is not None and k in names})
