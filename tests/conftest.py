"""Shared test setup: float64 is enabled so references can run in double precision.

Every test names its dtypes explicitly; nothing relies on the default float.
"""

import jax

jax.config.update("jax_enable_x64", True)
