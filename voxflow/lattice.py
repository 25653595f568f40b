"""The patch lattice and its blending weights: where patches start along an axis, and each
patch's separable weight (bump or Gaussian). Shared by the sliding window (inference.py),
the overlap grid (grids.py) and the planner's cost model; numpy only, so planning and the
orchestrator's tasks never import torch."""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Weighting = Literal["bump", "gaussian"]
WEIGHT_FLOOR = 1e-6  # per axis, so a 3D weight never underflows float32


def bump_profile(n: int) -> np.ndarray:
    """chunkflow's bump along one axis: exp(-1 / (1 - t^2)), t in (-1, 1), peak scaled to 1."""
    t = (np.arange(n, dtype=np.float64) + 1.0) / (n + 1.0) * 2.0 - 1.0
    w = np.exp(-1.0 / (1.0 - t * t) + 1.0)
    return np.maximum(w / w.max(), WEIGHT_FLOOR)


def gaussian_profile(n: int) -> np.ndarray:
    """A Gaussian along one axis with sigma = n / 8 (nnU-Net's choice), peak 1."""
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    sigma = max(n / 8.0, 1e-3)
    return np.maximum(np.exp(-0.5 * (x / sigma) ** 2), WEIGHT_FLOOR)


PROFILES = {"bump": bump_profile, "gaussian": gaussian_profile}


def patch_weights(shape_zyx: Sequence[int], weighting: Weighting = "bump") -> np.ndarray:
    """The 3D patch weight (z, y, x), float64: the outer product of per-axis profiles."""
    z, y, x = (PROFILES[weighting](n) for n in shape_zyx)
    return z[:, None, None] * y[None, :, None] * x[None, None, :]


def axis_lattice(lo: int, hi: int, patch: int, stride: int) -> tuple[int, ...]:
    """Patch starts along one axis of `[lo, hi)`: lo, lo + stride, ... and a last patch
    snapped to `hi`; one centred patch when the extent is shorter than the patch."""
    length = hi - lo
    if length <= patch:
        return (lo - (patch - length) // 2,)
    return tuple(range(lo, hi - patch, stride)) + (hi - patch,)


def lattice_size(length: int, patch: int, stride: int) -> int:
    """`len(axis_lattice(0, length, patch, stride))`, in O(1): the planner counts patches of
    lattices it never lists."""
    return 1 + max(-(-(length - patch) // stride), 0)
