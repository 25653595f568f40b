"""`SlidingWindow`: run a model over an array patch by patch and blend the patches.

The patch lattice covers the array; neighbouring output patches overlap by `overlap` and the
last patch along each axis is snapped to the end. Every patch's output is multiplied by a
weight (bump or Gaussian) and summed; the sum is divided by the summed weights. Both stay on the
model's device. Weights are separable and the lattice is a product of per-axis lattices, so the
weight sum is an outer product of three 1D sums: no per-patch work for it.

Test-time augmentation (`augment`) happens here, the one place the model meets patches: each
patch is run in every orientation of the group (`voxflow.augment`), each prediction turned
back, and the weighted mean is what is summed. So the blend (crop and overlap mode alike) sees
one averaged prediction per patch and stays exact; the copies of a patch go through the model
together, `batch_size` of them per forward.
"""
from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import numpy as np
import torch

from .augment import orientations
from .geometry import ceil_div, vec3
from .lattice import PROFILES, Weighting, axis_lattice, patch_weights
from .models import Model

def balanced_batches(items: Sequence, batch_size: int) -> list[Sequence]:
    """`items` in the fewest batches of at most `batch_size`, their sizes differing by at most
    one: 125 patches at 4 are 29 x 4 + 3 x 3, not 31 x 4 + a batch of 1 (on the CPU a
    batch of one falls into torch's slow conv3d path for plain nn.Conv3d models)."""
    n = len(items)
    count = ceil_div(n, batch_size)
    sizes = [n // count + (k < n % count) for k in range(count)]
    return [items[end - size:end] for size, end in zip(sizes, accumulate(sizes))]


class SlidingWindow:
    """Patch lattice + weighted blending of a model's output, kept on the model's device.

    Sizes are x, y, z (as in the config); arrays are (c, z, y, x). The output covers the input
    minus the model's patch margin, (input_patch - output_patch) / 2, on each side.
    `augment`: transform names (`voxflow.augment.TRANSFORMS`); the mean over the orientations
    they generate replaces each patch's prediction, and `batch_size` counts each orientation
    of a patch as one patch of a forward pass.
    """

    def __init__(self, model: Model, input_patch: Sequence[int],
                 output_patch: Sequence[int] | None = None,
                 overlap: Sequence[int] = (0, 0, 0), batch_size: int = 4,
                 weighting: Weighting = "bump", augment: Sequence[str] = ()):
        self.model = model
        self.input_patch = tuple(reversed(vec3(input_patch)))          # z, y, x
        self.output_patch = tuple(reversed(vec3(output_patch or input_patch)))
        self.overlap = tuple(reversed(vec3(overlap)))
        self.margin = tuple((i - o) // 2 for i, o in zip(self.input_patch, self.output_patch))
        self.stride = tuple(o - v for o, v in zip(self.output_patch, self.overlap))
        if any(s <= 0 for s in self.stride):
            raise ValueError("overlap must be smaller than the output patch")
        self.batch_size = batch_size
        self.weighting = weighting
        self.orientations = orientations(augment)
        if any(o.transpose for o in self.orientations) and any(
                p[1] != p[2] for p in (self.input_patch, self.output_patch)):
            raise ValueError("transpose_xy needs patches square in x and y")
        self._profiles = [PROFILES[weighting](n) for n in self.output_patch]
        # the mean's 1/n folded into the weight: n is a power of two, so this is exact
        self._weight = torch.from_numpy((patch_weights(self.output_patch, weighting)
                                         / len(self.orientations)).astype(np.float32)
                                        ).to(model.device)

    def output_shape(self, input_shape_zyx: Sequence[int]) -> tuple[int, int, int]:
        return tuple(n - 2 * m for n, m in zip(input_shape_zyx, self.margin))

    def patches(self, input_shape_zyx: Sequence[int]) -> list[tuple[int, int, int]]:
        """Output-space starts (z, y, x) of every patch; input patches start at the same index."""
        per_axis = self.starts(self.output_shape(input_shape_zyx))
        return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]

    def starts(self, out_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per axis (z, y, x), the patch starts over an output of `out_shape`."""
        for n, p in zip(out_shape, self.output_patch):
            if n < p:
                raise ValueError(f"output extent {n} is smaller than the patch {p}")
        return [axis_lattice(0, n, p, s) for n, p, s in
                zip(out_shape, self.output_patch, self.stride)]

    def _weight_sum(self, out_shape: Sequence[int]) -> torch.Tensor:
        sums = []
        for n, p, prof, starts in zip(out_shape, self.output_patch, self._profiles,
                                      self.starts(out_shape)):
            acc = np.zeros(n)
            for a in starts:
                acc[a:a + p] += prof
            sums.append(acc)
        total = sums[0][:, None, None] * sums[1][None, :, None] * sums[2][None, None, :]
        return torch.from_numpy(total.astype(np.float32)).to(self.model.device)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blend the model over `image` (c, z, y, x); returns (C, z', y', x') on the device."""
        x = self._prepare(image)
        out_shape = self.output_shape(x.shape[1:])
        acc = self.weighted_sum(x, self.starts(out_shape))
        acc /= self._weight_sum(out_shape)
        return acc

    def _prepare(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = image if isinstance(image, torch.Tensor) else self.model.normalize(image)
        if x.ndim != 4:
            raise ValueError(f"expected a (c, z, y, x) array, got shape {tuple(x.shape)}")
        if any(n < p for n, p in zip(self.output_shape(x.shape[1:]), self.output_patch)):
            raise ValueError(f"input {tuple(x.shape[1:])} (z, y, x) is smaller than the "
                             f"input patch {self.input_patch}")
        return x

    @torch.inference_mode()
    def weighted_sum(self, image: np.ndarray | torch.Tensor,
                     starts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Sum of weight x prediction over the patches whose output starts, per axis (z, y,
        x), are `starts` (relative to the output, which covers `image` minus the patch
        margin); not normalised, because overlap mode divides by the whole run's weight sum,
        not by this array's."""
        x = self._prepare(image)
        out_shape = self.output_shape(x.shape[1:])
        grid = [(z, y, xx) for z in starts[0] for y in starts[1] for xx in starts[2]]
        # (patch, orientation): a patch's orientations in a row, so they share a forward
        items = [(start, o) for start in grid for o in self.orientations]
        augmented = len(self.orientations) > 1
        acc = None
        pz, py, px = self.input_patch
        oz, oy, ox = self.output_patch
        mz, my, mx = self.margin
        size = (self.batch_size if isinstance(self.batch_size, int)
                else self.model.resolve_batch(x.shape[0]))
        for group in balanced_batches(items, size):
            batch = torch.stack([o(x[:, z:z + pz, y:y + py, xx:xx + px])
                                 for (z, y, xx), o in group])
            pred = self.model(batch)
            if tuple(pred.shape[2:]) == self.input_patch and self.input_patch != self.output_patch:
                pred = pred[:, :, mz:mz + oz, my:my + oy, mx:mx + ox]
            if acc is None:
                acc = torch.zeros((pred.shape[1], *out_shape), dtype=torch.float32,
                                  device=self.model.device)
            if augmented:                               # each prediction turned back
                pred = torch.stack([o.undo(p) for p, (_, o) in zip(pred, group)])
            pred = pred * self._weight
            for k, ((z, y, xx), _) in enumerate(group):
                acc[:, z:z + oz, y:y + oy, xx:xx + ox] += pred[k]
        return acc
