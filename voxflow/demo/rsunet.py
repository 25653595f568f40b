"""A small residual symmetric U-Net (RSUNet) for membrane detection in 3D EM.

Follows the shape of Lee et al. 2017 ("Superhuman accuracy on the SNEMI3D
connectomics challenge"): residual blocks at every level, additive (not
concatenated) skip connections, and down/upsampling only in x and y, because
serial-section EM is ~5x coarser in z than in x/y.  Kept tiny (~102k
parameters) so the bundled weights are commit-sized and CPU inference is fast.

There is deliberately no normalisation layer: the network is a pure function
of its input patch, so tiled inference gives the same answer whatever the
batch composition, and export/tracing stays trivial.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RSUNet"]


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    """'Same'-padded 3D convolution (odd kernels only)."""
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel))


class _ResBlock(nn.Module):
    """1x3x3 channel-changing conv, then a residual pair of 3x3x3 convs.

    The in-plane first conv mirrors RSUNet: it changes width cheaply, and the
    3x3x3 residual pair gives the block its z context.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pre = _conv(cin, cout, (1, 3, 3))
        self.conv1 = _conv(cout, cout, (3, 3, 3))
        self.conv2 = _conv(cout, cout, (3, 3, 3))
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.pre(x))
        r = self.act(self.conv1(x))
        r = self.conv2(r)
        return self.act(x + r)


class RSUNet(nn.Module):
    """Anisotropic residual symmetric U-Net producing a boundary probability map.

    Input ``(n, 1, z, y, x)`` float32 in [0, 1]; output the same shape, the
    sigmoid probability that a voxel is membrane.  ``y`` and ``x`` must be
    multiples of ``2 ** (len(widths) - 1)`` (4 for the default); ``z`` is free.

    ``RSUNet()`` with no arguments is exactly the architecture of the bundled
    weights (``voxflow/demo/rsunet.safetensors``).
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32), in_channels: int = 1) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1:
            raise ValueError("widths must name at least one level")
        self.widths = widths
        # Wide in-plane embedding: cheap context before the first block.
        self.embed = _conv(in_channels, widths[0], (1, 5, 5))
        self.down = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.down.append(_ResBlock(cin, w))
            cin = w
        self.pool = nn.MaxPool3d((1, 2, 2))
        # Learned in-plane upsampling; output width matches the skip so the
        # join is a plain addition.
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], (1, 2, 2), stride=(1, 2, 2))
            for i in range(len(widths) - 1)
        )
        self.up = nn.ModuleList(_ResBlock(widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv3d(widths[0], 1, 1)
        self.act = nn.ELU()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores; training uses these for a numerically stable BCE."""
        x = self.act(self.embed(x))
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for level in reversed(range(len(self.up))):
            x = self.upsample[level](x) + skips[level]
            x = self.up[level](x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
