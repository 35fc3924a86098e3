"""Softmax-family primitives for JAX with analytic reverse-mode rules."""

from ._attention import dot_product_attention as dot_product_attention
from ._softmax import log_softmax as log_softmax
from ._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = ["dot_product_attention", "log_softmax", "softmax"]
