"""TALLY: multi-domain long-tailed learning platform."""

__version__ = "0.1.0"
