"""deepdot: find, explain and remove backdoors in image classifiers."""

__version__ = "0.1.0"
