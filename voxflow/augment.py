"""Test-time augmentation (`augment:`): the orientations a patch is run in.

The listed transforms generate a group of orientations of a (…, z, y, x) array; `SlidingWindow`
runs the model on every orientation of each patch, turns each prediction back and averages
them (nnU-Net's mirroring, chunkflow's `--augment`). Flips commute, so k flips give 2^k
orientations; `transpose_xy` with both xy flips or neither doubles them (the 16 orientations
of all four are the square's 8 times the z flip). With one xy flip only, the transpose turns it
into the other, so the group holds all 8 orientations of the xy square: averaging over a set
that is not closed would favour some orientations over their mirror images.

Every orientation is one flip of some axes then at most one transpose, so applying or undoing
one costs at most two copies of a patch. No torch import here: the config and the bill use the
group's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence, TypeVar

import numpy as np

TRANSFORMS = ("flip_x", "flip_y", "flip_z", "transpose_xy")
FLIP_DIMS = {"flip_z": -3, "flip_y": -2, "flip_x": -1}

A = TypeVar("A")                     # a numpy array or a torch tensor, (…, z, y, x)


def _flip(a: A, dims: tuple[int, ...]) -> A:
    return np.flip(a, dims) if isinstance(a, np.ndarray) else a.flip(dims)


@dataclass(frozen=True)
class Orientation:
    """Flip `flips` (dims, negative: z -3, y -2, x -1), then swap y and x if `transpose`."""

    flips: tuple[int, ...] = ()
    transpose: bool = False

    def __call__(self, a: A) -> A:
        a = _flip(a, self.flips) if self.flips else a
        return a.swapaxes(-1, -2) if self.transpose else a

    def undo(self, a: A) -> A:
        """The inverse: transpose back first, then flip the same axes."""
        a = a.swapaxes(-1, -2) if self.transpose else a
        return _flip(a, self.flips) if self.flips else a

    @property
    def name(self) -> str:
        names = [n for n, d in FLIP_DIMS.items() if d in self.flips][::-1]
        return "+".join(names + ["transpose_xy"] * self.transpose) or "identity"


_PROBE = np.arange(8).reshape(2, 2, 2)             # every orientation moves it differently
_ALL = [Orientation(tuple(d for d, on in zip((-3, -2, -1), bits) if on), t)
        for t in (False, True) for bits in product((False, True), repeat=3)]
_BY_IMAGE = {o(_PROBE).tobytes(): o for o in _ALL}


def generator(name: str) -> Orientation:
    """The orientation one transform name stands for."""
    if name == "transpose_xy":
        return Orientation(transpose=True)
    return Orientation((FLIP_DIMS[name],))


def orientations(names: Sequence[str]) -> list[Orientation]:
    """The group `names` generate, identity first, in a fixed order (breadth first over the
    names as listed): what is averaged, in the order it is summed, so a rerun adds the same
    floats in the same order."""
    gens = [generator(n) for n in names]
    group, seen = [Orientation()], {_PROBE.tobytes()}
    for element in group:                             # grows while it is walked
        for g in gens:
            image = g(element(_PROBE))
            if image.tobytes() not in seen:
                seen.add(image.tobytes())
                group.append(_BY_IMAGE[image.tobytes()])
    return group
