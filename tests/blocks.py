"""Random parameter blocks for the weight-linearity kernel tests: linear drifts with noise, plus
parameters that each filter catches."""

from __future__ import annotations

import numpy as np


def random_block(steps, seed: int, n: int = 1001) -> np.ndarray:
    """Linear drifts with noise, plus parameters that each filter catches."""
    rng = np.random.default_rng(seed)
    k = len(steps)
    values = 0.02 * rng.normal(size=n) + np.multiply.outer(np.asarray(steps, float), 1e-4 * rng.normal(size=n))
    values += rng.normal(size=(k, n)) * 1e-3 * rng.uniform(0, 1, size=n)
    values[:, :100] = values[:1, :100]  # constant
    values[:, 100:200] = values[:1, 100:200] + rng.integers(0, 2, size=(k, 100)) * 2.0**-17  # change below 1e-4
    values[:, 200:400] = 1.0 + rng.integers(0, 3, size=(k, 200)) * 2.0**-6  # at most 3 distinct values
    values[:, 400] = -0.0
    values[::2, 400] = 0.0  # -0 == +0: constant
    values[:, 401] = np.asarray(steps, float) * 2.0**-10  # exactly linear: R² 1, the top bin
    return values
