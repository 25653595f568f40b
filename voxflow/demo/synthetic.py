"""Synthetic serial-section EM volumes of "neural tissue" with exact ground truth.

The demo and the bundled model need data that looks enough like anisotropic
EM (think 8x8x40 nm voxels) to make a boundary detector meaningful, without
shipping any real data set.  Cells are a warped 3D power diagram whose seeds
drift slowly through z, so each cell is a tube-like object whose cross-section
changes a little from section to section.  The image is then rendered from the
geometry: dark 2-3 voxel membranes, textured grey cytoplasm with vesicle
clusters, blur, shot/read noise and per-section brightness jitter.

Only numpy and scipy are used so this can run anywhere the package runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["SyntheticVolume", "make_em_volume"]

# Geometry knobs, in xy-voxel units.  Kept module-level so tests / docs can
# refer to them, but they are not part of the public API.
_CELL_DIAMETER = 34.0  # typical cell cross-section, voxels
_Z_SCALE = 0.9  # one z section counts as this many xy voxels when tessellating
_WARP_AMPLITUDE = 5.0  # voxels of smooth displacement -> curved membranes
_MEMBRANE_HALF_WIDTH = (1.0, 1.5)  # half thickness range -> 2-3 voxel membranes


@dataclass
class SyntheticVolume:
    """A rendered volume plus its ground truth, all arrays in (z, y, x) order.

    ``labels`` assigns every voxel (membrane voxels included) to the cell it
    lies in, so it can be used both for segmentation scoring and for deriving
    other boundary definitions; ``boundary`` is the membrane mask the image was
    rendered from.
    """

    image: np.ndarray  # uint8
    boundary: np.ndarray  # float32 in {0, 1}; 1 on membrane voxels
    labels: np.ndarray  # uint32 cell ids, 1..n

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape shared by all arrays."""
        return tuple(self.image.shape)  # type: ignore[return-value]


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]
) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise (Gaussian-filtered white noise)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma, mode="wrap")
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _sample_seeds(
    rng: np.random.Generator, nx: int, ny: int, nz: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed positions, per-section drift, z centre and power weight per cell.

    Seeds are thrown with a minimum spacing (dart throwing) so cell sizes are
    varied but not absurdly so, and extend past the volume so border cells
    are cut off naturally rather than squeezed.
    """
    margin = _CELL_DIAMETER
    zlen = nz * _Z_SCALE
    lo = np.array([-margin, -margin, -margin])
    hi = np.array([nx + margin, ny + margin, zlen + margin])
    box = np.prod(hi - lo)
    n_target = int(box / (0.55 * _CELL_DIAMETER**3)) + 8
    min_dist = 0.55 * _CELL_DIAMETER

    pts: list[np.ndarray] = []
    tree_pts = np.empty((0, 3))
    tries = 0
    while len(pts) < n_target and tries < 50 * n_target:
        batch = lo + rng.random((256, 3)) * (hi - lo)
        for p in batch:
            tries += 1
            if tree_pts.shape[0] and np.min(np.sum((tree_pts - p) ** 2, axis=1)) < min_dist**2:
                continue
            pts.append(p)
            tree_pts = np.vstack([tree_pts, p])
            if len(pts) >= n_target:
                break
    seeds = np.array(pts)
    xy = seeds[:, :2]
    zc = seeds[:, 2]
    # Neurites run obliquely through the sections: slow xy drift per z section.
    drift = rng.normal(0.0, 0.6, size=(len(seeds), 2))
    # Power weights give a mix of thin axons and fat dendrites.
    radius = _CELL_DIAMETER * 0.35 * rng.lognormal(0.0, 0.35, size=len(seeds))
    weight = radius**2
    return xy, drift, zc, weight


def make_em_volume(
    shape: tuple[int, int, int] = (256, 256, 32), seed: int = 0
) -> SyntheticVolume:
    """Render an EM-like volume of shape ``(x, y, z)``; arrays come back (z, y, x).

    Deterministic for a given ``seed``.  A 256x256x32 volume takes 2-3 s on
    one core; cost grows roughly linearly with the number of voxels.
    """
    nx, ny, nz = (int(s) for s in shape)
    if min(nx, ny, nz) < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    rng = np.random.default_rng(seed)

    xy, drift, zc, weight = _sample_seeds(rng, nx, ny, nz)

    # Smooth 3D displacement of the sampling grid -> wavy, non-convex cells.
    # Its z smoothness keeps consecutive sections consistent.
    wsig = (4.0, 14.0, 14.0)
    warp_x = _WARP_AMPLITUDE * _smooth_noise(rng, (nz, ny, nx), wsig)
    warp_y = _WARP_AMPLITUDE * _smooth_noise(rng, (nz, ny, nx), wsig)

    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    labels = np.zeros((nz, ny, nx), dtype=np.uint32)
    dist = np.zeros((nz, ny, nx), dtype=np.float32)  # distance to nearest membrane midline
    for z in range(nz):
        zs = z * _Z_SCALE
        centres = xy + drift * (z - zc[:, None] / _Z_SCALE)
        # Power distance |p - c|^2 + (dz)^2 - w  ==  Euclidean distance in a
        # lifted 3D space with height sqrt(k - min k); that lets a KD-tree do
        # the (otherwise brute-force) nearest-seed search.
        k = (zs - zc) ** 2 - weight
        h = np.sqrt(k - k.min())
        tree = cKDTree(np.column_stack([centres, h]))
        q = np.column_stack(
            [(xx + warp_x[z]).ravel(), (yy + warp_y[z]).ravel(), np.zeros(nx * ny)]
        )
        d2, idx = tree.query(q, k=2)
        i1, i2 = idx[:, 0], idx[:, 1]
        p1, p2 = d2[:, 0] ** 2, d2[:, 1] ** 2
        sep = np.linalg.norm(centres[i1] - centres[i2], axis=1)
        # Distance from p to the power bisector of its two best seeds.
        dist[z] = ((p2 - p1) / (2.0 * np.maximum(sep, 1e-6))).reshape(ny, nx)
        labels[z] = (i1 + 1).reshape(ny, nx)

    # The warp stretches/squeezes distances; divide by the local gradient so
    # ``dist`` is (to first order) a true distance in voxels and membranes get
    # the intended thickness everywhere.
    gy, gx = np.gradient(dist, axis=(1, 2))
    dist /= np.clip(np.hypot(gy, gx), 0.5, 2.0)

    # Renumber to consecutive ids 1..n (seeds that never show up get no id).
    present = np.zeros(len(xy) + 1, dtype=bool)
    present[labels.ravel()] = True
    remap = np.cumsum(present).astype(np.uint32)
    labels = remap[labels]
    n_cells = int(remap[-1])

    # Membrane thickness varies smoothly between 2 and 3 voxels.
    lo_w, hi_w = _MEMBRANE_HALF_WIDTH
    tvar = _smooth_noise(rng, (nz, ny, nx), (3.0, 20.0, 20.0))
    half_width = lo_w + (hi_w - lo_w) * (0.5 + 0.5 * np.tanh(tvar))
    boundary = (dist < half_width).astype(np.float32)

    image = _render(rng, labels, dist, half_width, n_cells)
    return SyntheticVolume(image=image, boundary=boundary, labels=labels)


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    half_width: np.ndarray,
    n_cells: int,
) -> np.ndarray:
    """Turn geometry into a plausible EM intensity volume (uint8)."""
    nz, ny, nx = labels.shape

    # Cytoplasm: per-cell grey level plus low-frequency "staining" variation
    # and a little fine texture.
    cell_grey = rng.normal(0.66, 0.05, size=n_cells + 1)
    img = cell_grey[labels]
    img += 0.05 * _smooth_noise(rng, (nz, ny, nx), (2.0, 10.0, 10.0))
    img += 0.03 * _smooth_noise(rng, (nz, ny, nx), (0.7, 1.5, 1.5))

    # Vesicle clusters: small dark blobs in a subset of cells, kept off the
    # membranes so the ground truth stays unambiguous.
    _add_vesicles(rng, img, labels, dist, n_cells)

    # Membranes: dark core with a soft edge matching the labelled width.
    edge = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
    mem_depth = rng.uniform(0.45, 0.55, size=n_cells + 1)[labels]
    img -= mem_depth * edge

    # Optics: blur mostly in xy (sections are imaged independently).
    img = ndimage.gaussian_filter(img, (0.0, 0.8, 0.8))

    # Per-section brightness/contrast jitter (section thickness, charging).
    gain = rng.normal(1.0, 0.05, size=(nz, 1, 1))
    offset = rng.normal(0.0, 0.03, size=(nz, 1, 1))
    img = img * gain + offset

    # Shot noise (Poisson on a modest electron count) plus read noise.
    photons = 60.0
    img = rng.poisson(np.clip(img, 0.0, None) * photons) / photons
    img += rng.normal(0.0, 0.03, size=img.shape)

    return np.clip(img * 255.0, 0, 255).round().astype(np.uint8)


def _add_vesicles(
    rng: np.random.Generator,
    img: np.ndarray,
    labels: np.ndarray,
    dist: np.ndarray,
    n_cells: int,
) -> None:
    """Darken clusters of small ~4-voxel blobs (synaptic vesicles, in spirit).

    Blobs stay >= 4 voxels from any membrane and inside the cluster's own cell,
    so they are distractors for a boundary detector without blurring the
    ground truth.
    """
    nz, ny, nx = img.shape
    safe = np.flatnonzero(dist.ravel() > 6.0)
    if len(safe) == 0:
        return
    n_clusters = max(1, int(nz * ny * nx / 12000))
    centres = np.array(np.unravel_index(rng.choice(safe, n_clusters), img.shape)).T
    per = rng.integers(8, 30, size=n_clusters)
    owner = np.repeat(np.arange(n_clusters), per)
    spread = np.array([0.8, 6.0, 6.0])
    pos = centres[owner] + rng.normal(0.0, 1.0, size=(len(owner), 3)) * spread
    pos = np.rint(pos).astype(int)
    pos = np.clip(pos, 0, np.array(img.shape) - 1)
    z, y, x = pos.T
    cz, cy, cx = centres[owner].T
    keep = (labels[z, y, x] == labels[cz, cy, cx]) & (dist[z, y, x] > 4.0)
    blobs = np.zeros(img.shape, dtype=np.float32)
    blobs[z[keep], y[keep], x[keep]] = rng.uniform(0.7, 1.0, size=int(keep.sum()))
    # A point blurred to ~4 voxels across; small z sigma (thin sections).
    blobs = ndimage.gaussian_filter(blobs, (0.5, 1.3, 1.3))
    img -= 0.35 * np.clip(blobs / 0.05, 0.0, 1.0)
