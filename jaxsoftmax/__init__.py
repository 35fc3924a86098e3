"""Softmax-family primitives for JAX with analytic reverse-mode rules."""

from ._softmax import log_softmax as log_softmax
from ._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = ["log_softmax", "softmax"]
