"""Globally consistent connected components over a chunked volume (`segmentation:`).

Per-chunk labelling (chunkflow's) gives an object a new id in every chunk it crosses. Here,
in the style of igneous's multi-pass CCL, the run's boxes are labelled independently and then
joined, so every connected object of the whole thresholded volume gets one id:

1. **label** (a task per box): threshold the channel, cc3d labels the box (ids 1..n, local);
   the box's six face planes and each label's voxel count go to one small object.
2. **pairs** (a task per box): its face planes against those of its forward neighbours (face,
   edge and corner neighbours, as far as the connectivity reaches): the label pairs that
   touch across the boundary, plus its counts, to one small object.
3. **merge** (one task): union-find over every pair (scipy's connected components of the
   label graph), object sizes, `min_size` on whole objects, final ids 1..N in the order of
   each object's smallest provisional id (task index, then cc3d's label: both deterministic),
   and the table provisional -> final, stored with the run.
4. **relabel** (a task per box): labels the box again — cc3d gives the same labels for the
   same input, so nothing provisional is stored as a volume — maps them through its slice
   of the table with fastremap and writes the final layer, whose pyramid (mode) follows.

Every task is idempotent: the same input gives the same bytes. Functions here work on numpy
arrays; the stages (`voxflow.stages`) do the I/O.
"""
from __future__ import annotations

import itertools
import json
import zlib
from typing import Iterable, Optional, Sequence

import cc3d
import fastremap
import numpy as np

from .geometry import Vec3

from .grids import ChunkGrid

STEPS = ("label", "pairs", "merge", "relabel")          # stage `segmentation-STEP`, in order
_REACH = {6: 1, 18: 2, 26: 3}    # most nonzero components of a neighbour offset
_MAGIC = b"voxflow-arrays-1\n"


class SegmentationOverflow(ValueError):
    """More objects than the segmentation layer's dtype holds."""


# -- pass 1: label ------------------------------------------------------------------------
def foreground(values: np.ndarray, threshold: float, invert: bool = False) -> np.ndarray:
    """Voxels above `threshold` (below it with `invert`, e.g. for boundary maps). A uint8
    output stores round(255 p), so its threshold is on value / 255. Compared in float64
    (a float16 output would round the threshold otherwise); NaN is background."""
    t = np.float64(threshold * 255 if values.dtype == np.uint8 else threshold)
    return np.less(values, t) if invert else np.greater(values, t)


def label(fg: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """cc3d labels (uint32, ids 1..n in cc3d's deterministic order) of a (z, y, x) mask."""
    labels, n = cc3d.connected_components(np.ascontiguousarray(fg), connectivity=connectivity,
                                          return_N=True, out_dtype=np.uint32)
    return np.ascontiguousarray(labels), int(n)


def voxel_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels of each label 1..n (uint64)."""
    return np.bincount(labels.reshape(-1), minlength=n + 1)[1:].astype(np.uint64)


def face_planes(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The six faces of a (z, y, x) box: `x0` = its first x plane, `x1` its last, ...; each
    keeps the other two axes in (z, y, x) order. Edges and corners are inside them."""
    out = {}
    for axis, name in enumerate("zyx"):
        out[f"{name}0"] = np.ascontiguousarray(np.take(labels, 0, axis=axis))
        out[f"{name}1"] = np.ascontiguousarray(np.take(labels, -1, axis=axis))
    return out


# -- pass 2: pairs ------------------------------------------------------------------------
def directions(connectivity: int) -> list[Vec3]:
    """Task offsets (x, y, z) to the forward neighbours a box can touch: faces, and under
    18/26 connectivity edges, under 26 corners. Forward = a later task in index order (z,
    then y, then x decides), so each neighbouring pair is looked at once."""
    reach = _REACH[connectivity]
    return [d for d in itertools.product((-1, 0, 1), repeat=3)
            if 0 < sum(map(bool, d)) <= reach and (d[2], d[1], d[0]) > (0, 0, 0)]


def boundary(planes: dict[str, np.ndarray], d: Sequence[int]) -> np.ndarray:
    """A box's voxels on its side towards the neighbour at task offset `d` (x, y, z): a
    plane (face), a line (edge) or one voxel (corner), over the axes where d is 0, in
    (z, y, x) order."""
    first = next(a for a in range(3) if d[a])
    plane = planes[f"{'xyz'[first]}{int(d[first] > 0)}"]
    index = []
    for axis in (2, 1, 0):                      # the plane's array axes are z, y, x minus one
        if axis == first:
            continue
        index.append(slice(None) if d[axis] == 0 else (-1 if d[axis] > 0 else 0))
    return np.asarray(plane[tuple(index)])


def touching(a: np.ndarray, b: np.ndarray, d: Sequence[int], connectivity: int) -> np.ndarray:
    """Label pairs (label in box t, label in box u = t + d), unique and sorted, of voxels
    that are neighbours under `connectivity` across the boundary: `a` is t's side towards u,
    `b` u's side towards t (`boundary`). Across it a voxel steps by d; along the boundary's
    own axes it may step by -1, 0 or 1 too, as long as the whole step has at most 1 (6), 2
    (18) or 3 (26) nonzero components."""
    spare = _REACH[connectivity] - sum(map(bool, d))
    found = []
    for e in itertools.product((-1, 0, 1), repeat=a.ndim):
        if sum(map(bool, e)) > spare:
            continue
        sa = tuple(slice(max(0, -k), n - max(0, k)) for k, n in zip(e, a.shape))
        sb = tuple(slice(max(0, k), n - max(0, -k)) for k, n in zip(e, b.shape))
        x, y = np.asarray(a[sa]).reshape(-1), np.asarray(b[sb]).reshape(-1)
        both = (x != 0) & (y != 0)
        found.append((x[both].astype(np.uint64) << np.uint64(32)) | y[both])
    keys = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    return np.stack([keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)], 1).astype(np.uint32)


def neighbours(grid: ChunkGrid, index: int, connectivity: int) -> list[tuple[Vec3, int]]:
    """(offset, task index) of task `index`'s forward neighbours that exist in `grid`."""
    pos = grid.position(index)
    out = []
    for d in directions(connectivity):
        q = [p + k for p, k in zip(pos, d)]
        if all(0 <= v < n for v, n in zip(q, grid.counts)):
            out.append((d, grid.index(q)))
    return out


def task_pairs(planes: dict[str, np.ndarray], others: Iterable[tuple[Vec3, int, dict]],
               connectivity: int) -> list[tuple[int, np.ndarray]]:
    """(neighbour task, label pairs) for each forward neighbour (offset, task, its planes)."""
    neg = lambda d: tuple(-k for k in d)                             # noqa: E731
    return [(u, touching(boundary(planes, d), boundary(theirs, neg(d)), d, connectivity))
            for d, u, theirs in others]


# -- pass 3: merge ------------------------------------------------------------------------
def merge(counts: Sequence[np.ndarray], pairs: Sequence[Sequence[tuple[int, np.ndarray]]],
          min_size: int = 0, dtype: str = "uint32") -> tuple[np.ndarray, np.ndarray, int]:
    """The final ids of every provisional label: (offsets, table, objects).

    Task t's label k (1-based) is provisional id offsets[t] + k, table[offsets[t] + k - 1]
    its final id (0: dropped by `min_size`). Objects are numbered 1..N by their smallest
    provisional id, so the numbering follows only the task order and cc3d's. Raises
    SegmentationOverflow, naming `segmentation.dtype`, when N does not fit `dtype`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    offsets = np.zeros(len(counts) + 1, np.uint64)
    offsets[1:] = np.cumsum([len(c) for c in counts], dtype=np.uint64)
    total, base = int(offsets[-1]), offsets.astype(np.int64) - 1     # base + k: node id
    if total >= np.iinfo(np.int32).max:
        raise SegmentationOverflow(f"segmentation: {total} provisional labels exceed what one "
                                   "merge task handles (2^31); use a higher threshold or "
                                   "min_size")
    src, dst = [], []
    for t, links in enumerate(pairs):
        for u, p in links:
            src.append(base[t] + p[:, 0].astype(np.int64))
            dst.append(base[u] + p[:, 1].astype(np.int64))
    src = np.concatenate(src).astype(np.int64) if src else np.zeros(0, np.int64)
    dst = np.concatenate(dst).astype(np.int64) if dst else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(total, total)).tocsr()
    n, comp = connected_components(graph, directed=False)
    size = np.bincount(comp, weights=np.concatenate(counts).astype(np.float64) if total
                       else None, minlength=n)
    _, first = np.unique(comp, return_index=True)       # each object's smallest label
    order = np.argsort(first, kind="stable")
    kept = (size >= min_size)[order]
    final = np.zeros(n, np.uint64)
    final[order] = np.cumsum(kept, dtype=np.uint64) * kept
    objects = int(kept.sum())
    if objects > np.iinfo(dtype).max:
        raise SegmentationOverflow(f"segmentation.dtype: {objects} objects do not fit "
                                   f"{dtype}; use dtype: uint64")
    return offsets, final[comp].astype(dtype), objects


# -- pass 4: relabel ----------------------------------------------------------------------
def relabel(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Local labels 1..n -> final ids (`table[k - 1]`), 0 stays 0; fastremap, in place
    where the dtype allows."""
    lut = np.concatenate([np.zeros(1, table.dtype), table])
    out = np.ascontiguousarray(labels, dtype=table.dtype)
    return fastremap.remap_from_array(out.reshape(-1), lut).reshape(labels.shape)


def segment_in_memory(values: np.ndarray, grid: ChunkGrid, threshold: float = 0.5,
                      invert: bool = False, connectivity: int = 6, min_size: int = 0,
                      dtype: str = "uint32") -> np.ndarray:
    """The four passes over a (z, y, x) array cut by `grid` (origin: the array's voxel 0),
    without storage: what the stages compute, for tests and benchmarks."""
    labelled, planes, counts = [], [], []
    for i in range(len(grid)):
        lab, n = label(foreground(values[grid.box(i).zyx_slices()], threshold, invert),
                       connectivity)
        labelled.append(lab)
        planes.append(face_planes(lab))
        counts.append(voxel_counts(lab, n))
    pairs = [task_pairs(planes[i], [(d, u, planes[u]) for d, u in
                                    neighbours(grid, i, connectivity)], connectivity)
             for i in range(len(grid))]
    offsets, table, _ = merge(counts, pairs, min_size, dtype)
    out = np.zeros(values.shape, dtype)
    for i, lab in enumerate(labelled):
        out[grid.box(i).zyx_slices()] = relabel(lab, table[offsets[i]:offsets[i + 1]])
    return out


# -- what the passes leave for each other -------------------------------------------------
def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one object: a JSON header, then each array zlib-compressed. The same
    arrays give the same bytes (np.savez stamps the time into its zip)."""
    blobs, entries, at = [], {}, 0
    for name, array in arrays.items():
        blob = zlib.compress(np.ascontiguousarray(array).tobytes(), 1)
        entries[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "at": at,
                         "size": len(blob)}
        blobs.append(blob)
        at += len(blob)
    header = json.dumps(entries, separators=(",", ":")).encode()
    return b"".join([_MAGIC, len(header).to_bytes(8, "little"), header, *blobs])


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    if not data.startswith(_MAGIC):
        raise ValueError("not an array pack")
    start = len(_MAGIC) + 8
    base = start + int.from_bytes(data[len(_MAGIC):start], "little")
    return {name: np.frombuffer(zlib.decompress(data[base + e["at"]:base + e["at"] + e["size"]]),
                                e["dtype"]).reshape(e["shape"])
            for name, e in json.loads(data[start:base]).items()}


class SegmentationStore:
    """A run's segmentation objects under `<temporary>/<run>/segmentation/`: per task its
    faces (pass 1) and pairs (pass 2), and the merge's table (raw, so that a relabel task
    reads its slice with two range reads)."""

    def __init__(self, url: str):
        from .storage import Storage           # (not at import: the console reads STEPS)
        self.storage = Storage(url)
        self.url = self.storage.url

    def _get(self, key: str) -> bytes:
        data = self.storage.get(key)
        if data is None:
            raise FileNotFoundError(f"segmentation data {self.url}/{key} is missing")
        return data

    def put_faces(self, task: int, counts: np.ndarray, planes: dict[str, np.ndarray]) -> None:
        self.storage.put(f"faces/task-{task}", pack_arrays({"counts": counts, **planes}))

    def faces(self, task: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        arrays = unpack_arrays(self._get(f"faces/task-{task}"))
        return arrays.pop("counts"), arrays

    def put_pairs(self, task: int, counts: np.ndarray,
                  pairs: Sequence[tuple[int, np.ndarray]]) -> None:
        arrays = {"counts": counts, **{f"with-{u}": p for u, p in pairs}}
        self.storage.put(f"pairs/task-{task}", pack_arrays(arrays))

    def all_pairs(self, tasks: int) -> tuple[list[np.ndarray], list[list[tuple[int, np.ndarray]]]]:
        """Every task's counts and pairs, read in parallel."""
        keys = [f"pairs/task-{t}" for t in range(tasks)]
        got = self.storage.get_many(keys)
        counts, pairs = [], []
        for key in keys:
            if got[key] is None:
                raise FileNotFoundError(f"segmentation data {self.url}/{key} is missing")
            arrays = unpack_arrays(got[key])
            counts.append(arrays.pop("counts"))
            pairs.append([(int(name[len("with-"):]), p) for name, p in arrays.items()])
        return counts, pairs

    def put_table(self, offsets: np.ndarray, table: np.ndarray, objects: int) -> None:
        """The table first, the summary last: a summary means the table is whole."""
        self.storage.put("offsets", offsets.astype("<u8").tobytes())
        self.storage.put("table", table.astype(table.dtype.newbyteorder("<")).tobytes())
        self.storage.put("summary.json", json.dumps(
            {"objects": objects, "labels": len(table), "dtype": str(table.dtype)}).encode())

    def summary(self) -> Optional[dict]:
        data = self.storage.get("summary.json")
        return None if data is None else json.loads(data)

    def table_slice(self, task: int, dtype: str) -> np.ndarray:
        """Task `task`'s part of the table: final ids of its labels 1..n."""
        raw = self.storage.get_range("offsets", 8 * task, 8 * task + 16)
        if raw is None or len(raw) != 16:
            raise FileNotFoundError(f"segmentation table {self.url}/offsets is missing")
        lo, hi = (int(v) for v in np.frombuffer(raw, "<u8"))
        size = np.dtype(dtype).itemsize
        data = self.storage.get_range("table", lo * size, hi * size) if hi > lo else b""
        if data is None or len(data) != (hi - lo) * size:
            raise FileNotFoundError(f"segmentation table {self.url}/table is missing or short")
        return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)
