"""Softmax-family primitives for JAX with analytic reverse-mode rules."""

from ._attention import dot_product_attention as dot_product_attention
from ._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from ._cross_entropy import (
  softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from ._linear_cross_entropy import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from ._softmax import log_softmax as log_softmax
from ._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = [
  "dot_product_attention",
  "linear_softmax_cross_entropy",
  "log_softmax",
  "softmax",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
]
