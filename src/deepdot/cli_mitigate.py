"""``deepdot mitigate`` and ``deepdot filter`` (Neural Cleanse mitigations, Fine-Pruning).

Not implemented yet: see the mitigation issue.
"""
