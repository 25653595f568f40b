"""Volume I/O through cloud-volume: the one place where x, y, z meets (c, z, y, x).

`Volume` opens a precomputed layer at a mip; `read` returns (c, z, y, x) arrays for any box,
padding what lies outside the layer; `write` takes (c, z, y, x) arrays. Paths are cloud-volume
URLs (`file://`, `gs://`, ...): nothing here assumes a local disk. Every request cloud-volume
makes to a bucket is retried by `voxflow.retry`'s policy (installed at the cloud-files level,
below cloud-volume's many threads), so a read or write here either completes or raises.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
from cloudvolume import Bbox, CloudVolume, chunks
from cloudvolume.exceptions import EmptyVolumeException, InfoUnavailableError
from cloudvolume.paths import ALLOWED_FORMATS

from . import retry
from .geometry import Box, Vec3, vec3
from .sharding import shard_shape, shards_meeting, sharding_spec, spec_bytes
from .storage import Storage

retry.install()

Pad = Literal["zeros", "mirror"]
IMAGE_DTYPES = ("uint8", "uint16", "float16", "float32")
SEGMENTATION_DTYPES = ("uint32", "uint64")


class LayerNotFound(FileNotFoundError):
    """No precomputed layer (no readable `info`) at a path."""


class MissingChunk(FileNotFoundError):
    """A chunk file of a layer opened with `fill_missing=False` does not exist."""


def _precomputed(url: str) -> str:
    """The URL with an explicit `precomputed://` format. Without one, cloud-volume probes a
    layer without an `info` for a zarr layer too, with `exists` calls that are GCS batch
    requests on gs://: a GCS emulator has no batch API, and cloud-files retries them for
    about 15 s before the missing layer is reported."""
    return url if url.split("://", 1)[0] in ALLOWED_FORMATS else "precomputed://" + url


def _open(url: str, mip: int, fill_missing: bool = True) -> CloudVolume:
    # file://: chunk files uncompressed under their plain names. cloud-volume would gzip them
    # as NAME.gz, which no other reader of the format (tensorstore, Neuroglancer's own
    # server) looks for: they read zeros. (Shards carry gzip inside the format.)
    # cdn_cache=False: cloud-volume 12 sends its default (True) raw as the shards'
    # Cache-Control header, which stalls uploads on the GCS emulator.
    local = url.removeprefix("precomputed://").startswith("file://")
    return CloudVolume(_precomputed(url), mip=mip, fill_missing=fill_missing, bounded=False,
                       progress=False, non_aligned_writes=True,
                       compress=False if local else None, cdn_cache=False)


class Volume:
    """A precomputed layer opened at one mip.

    `fill_missing=False` (how inputs are read unless a run says `input_missing: zeros`) makes
    a missing chunk file an error naming it, not zeros that a model turns into output that
    looks valid."""

    def __init__(self, url: str, mip: int = 0, fill_missing: bool = True):
        try:
            self._cv = _open(url, mip, fill_missing)
        except InfoUnavailableError:
            raise LayerNotFound(f"no precomputed layer at {url}") from None
        self.url = url
        self.mip = mip
        self.fill_missing = fill_missing

    @classmethod
    def exists(cls, url: str) -> bool:
        try:
            cls(url)
        except LayerNotFound:
            return False
        return True

    @classmethod
    def create(cls, url: str, *, num_channels: int, dtype: str, resolution: Sequence[float],
               voxel_offset: Sequence[int], size: Sequence[int], chunk: Sequence[int],
               layer_type: Literal["image", "segmentation"] = "image",
               encoding: Optional[str] = None, shard_bytes: Optional[int] = None
               ) -> "Volume":
        """Write the `info` of a new layer (mip 0 only) and open it; with `shard_bytes`, a
        sharded one (`voxflow.sharding`)."""
        allowed = IMAGE_DTYPES if layer_type == "image" else SEGMENTATION_DTYPES
        if dtype not in allowed:
            raise ValueError(f"dtype {dtype} is not one of {allowed} for a {layer_type} layer")
        if encoding is None:
            encoding = "raw" if layer_type == "image" else "compressed_segmentation"
        info = CloudVolume.create_new_info(
            num_channels=int(num_channels), layer_type=layer_type, data_type=dtype,
            encoding=encoding, resolution=[int(r) if float(r).is_integer() else float(r)
                                              for r in resolution],
            voxel_offset=list(vec3(voxel_offset)), volume_size=list(vec3(size)),
            chunk_size=list(vec3(chunk)))
        if shard_bytes:
            info["scales"][0]["sharding"] = sharding_spec(
                size, chunk, int(num_channels) * np.dtype(dtype).itemsize, shard_bytes)
        cv = CloudVolume(url, info=info, progress=False)
        cv.commit_info()
        return cls(url)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def bounds(self) -> Box:
        b = self._cv.meta.bounds(self.mip)
        return Box(b.minpt, b.maxpt)

    @property
    def voxel_offset(self) -> Vec3:
        return vec3(self._cv.meta.voxel_offset(self.mip))

    @property
    def resolution(self) -> tuple[float, float, float]:
        return tuple(float(r) for r in self._cv.meta.resolution(self.mip))

    @property
    def chunk(self) -> Vec3:
        """Storage chunk size at this mip."""
        return vec3(self._cv.meta.chunk_size(self.mip))

    @property
    def num_channels(self) -> int:
        return int(self._cv.meta.num_channels)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._cv.meta.data_type)

    @property
    def layer_type(self) -> str:
        return self._cv.meta.layer_type

    @property
    def key(self) -> str:
        """The scale's folder in the layer (e.g. `8_8_40`)."""
        return self._cv.meta.key(self.mip)

    @property
    def shard_shape(self) -> Optional[Vec3]:
        """Voxels per shard at this mip; None for an unsharded scale."""
        spec = self._cv.meta.scale(self.mip).get("sharding")
        if not spec:
            return None
        return shard_shape(spec, self.bounds.shape, self.chunk)

    @property
    def num_mips(self) -> int:
        return len(self._cv.meta.available_mips)

    @property
    def info(self) -> dict:
        """The layer's `info` (all scales)."""
        return self._cv.info

    def at_mip(self, mip: int) -> "Volume":
        return Volume(self.url, mip, self.fill_missing)

    # -- data ------------------------------------------------------------------------------
    def read(self, box: Box, pad: Pad = "zeros") -> np.ndarray:
        """Voxels of `box` as (c, z, y, x); outside the layer: zeros or a mirror image."""
        inside = box.intersect(self.bounds)
        if inside.is_empty():
            if pad == "mirror":
                raise ValueError(f"cannot mirror: box {box} lies outside {self.bounds}")
            return np.zeros((self.num_channels, *reversed(box.shape)), dtype=self.dtype)
        data = self._read_shards(inside, box)
        if data is None:
            try:
                cut = self._cv.download(Bbox(inside.start, inside.stop), mip=self.mip)
            except EmptyVolumeException as exc:
                chunk = Bbox.create(exc.args[0]).to_filename() if exc.args else "?"
                self._missing(chunk, box)
            data = np.ascontiguousarray(np.asarray(cut).transpose(3, 2, 1, 0))
        if inside == box:
            return data
        before = [a - b for a, b in zip(inside.start, box.start)]
        after = [a - b for a, b in zip(box.stop, inside.stop)]
        widths = [(0, 0)] + [(b, a) for b, a in zip(reversed(before), reversed(after))]
        if pad == "mirror":
            return np.pad(data, widths, mode="reflect" if min(data.shape[1:]) > 1 else "edge")
        return np.pad(data, widths)

    def _missing(self, what: str, box: Box):
        raise MissingChunk(f"chunk {self.url}/{self.key}/{what} of the input is missing "
                           f"(reading {box}); `input_missing: zeros` reads missing chunks "
                           "as 0") from None

    def _read_shards(self, inside: Box, box: Box) -> Optional[np.ndarray]:
        """A read made of whole shards, one GET per shard — not cloud-volume's range read
        per chunk, which a downsample task of a sharded layer would pay thousands of times.
        None when the scale is unsharded or the box cuts a shard (cloud-volume reads it)."""
        shape = self.shard_shape
        if shape is None:
            return None
        shards = shards_meeting(self.bounds, shape, inside)
        if any(shard.intersect(inside) != shard for shard in shards):
            return None
        meta, image, mip = self._cv.meta, self._cv.image, self.mip
        reader = image.shard_reader(mip)
        store = Storage(f"{self.url}/{self.key}")
        chunk, offset = np.array(meta.chunk_size(mip)), np.array(meta.voxel_offset(mip))
        out = np.zeros((self.num_channels, *reversed(inside.shape)), self.dtype)
        for shard in shards:
            gpts, codes = image.morton_codes(Bbox(shard.start, shard.stop), mip=mip)
            name = reader.get_filename(codes[0])
            blob = store.get(name)
            parts = reader.disassemble_shard(blob) if blob is not None else {}
            for pt, code in zip(gpts, codes):
                cbox = Box(offset + pt * chunk, offset + (pt + 1) * chunk).intersect(shard)
                if code not in parts:
                    if not self.fill_missing:
                        self._missing(f"{name} (chunk {cbox})", box)
                    continue
                values = chunks.decode(
                    parts[code], meta.encoding(mip), shape=(*cbox.shape, self.num_channels),
                    dtype=self.dtype, block_size=meta.compressed_segmentation_block_size(mip))
                out[(slice(None), *cbox.zyx_slices(inside.start))] = values.transpose(3, 2,
                                                                                      1, 0)
        return out

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write (c, z, y, x) `data` to `box`, which must lie inside the layer. On a sharded
        scale each shard the box meets is written whole, once: a shard the box covers only
        in part is read first and keeps its other voxels."""
        expected = (self.num_channels, *reversed(box.shape))
        if data.shape != expected:
            raise ValueError(f"data of shape {data.shape} does not fit box {box} "
                             f"(expected {expected})")
        if not self.bounds.contains(box):
            raise ValueError(f"box {box} is outside layer bounds {self.bounds}")
        data = data.astype(self.dtype, copy=False)
        shape = self.shard_shape
        if shape is None:
            self._upload(box, data)
            return
        for shard in shards_meeting(self.bounds, shape, box):
            part = shard.intersect(box)
            values = data[(slice(None), *part.zyx_slices(box.start))]
            if part != shard:                      # the rest of the shard stays as it was
                whole = self.read(shard)
                whole[(slice(None), *part.zyx_slices(shard.start))] = values
                values = whole
            self._upload(shard, values)

    def _upload(self, box: Box, data: np.ndarray) -> None:
        """Unsharded: one cloud-volume upload of any box. Sharded: `box` is one whole shard,
        encoded chunk by chunk and written as one object."""
        if self.shard_shape is None:
            self._cv.image.upload(data.transpose(3, 2, 1, 0), Bbox(box.start, box.stop).minpt,
                                  self.mip, parallel=self._cv.parallel)
            return
        # Every chunk encoded on its own: cloud-volume 12's make_shard_chunks gives every
        # all-background chunk of a shard the first one's bytes whatever its shape, so
        # chunks clipped at the layer's end would decode wrong (found here).
        meta, image = self._cv.meta, self._cv.image
        bbox = Bbox(box.start, box.stop)
        gpts, codes = image.morton_codes(bbox, mip=self.mip)
        chunk, size = np.array(meta.chunk_size(self.mip)), np.array(meta.volume_size(self.mip))
        img = data.transpose(3, 2, 1, 0)
        anchor = gpts[0] * chunk
        labels = {}
        for pt, code in zip(gpts, codes):
            lo, hi = pt * chunk, np.minimum((pt + 1) * chunk, size)
            cut = img[tuple(slice(a, b) for a, b in zip(lo - anchor, hi - anchor))]
            labels[code] = chunks.encode(
                cut, meta.encoding(self.mip),
                block_size=meta.compressed_segmentation_block_size(self.mip),
                compression_params=meta.compression_params(self.mip),
                num_threads=meta.config.codec_threads)
        name, shard = image.make_shard(labels, bbox, self.mip)
        Storage(f"{self.url}/{self.key}").put(name, shard)

    # -- pyramid ---------------------------------------------------------------------------
    def ensure_mips(self, factor: Sequence[int], mips: int) -> None:
        """Add scales 1..mips (each `factor` times coarser than the one before) if missing;
        sharded like mip 0 (each scale's own spec, for its own grid)."""
        cv = _open(self.url, 0)
        spec0 = cv.meta.scale(0).get("sharding")
        voxel_bytes = self.num_channels * self.dtype.itemsize
        if spec0:                     # as many chunks per shard as mip 0 (or its whole grid)
            shard_bytes = spec_bytes(spec0, cv.meta.chunk_size(0), voxel_bytes)
        changed = False
        for m in range(1, mips + 1):
            total = [f ** m for f in factor]
            if m < len(cv.meta.available_mips):
                have = [r / r0 for r, r0 in zip(cv.meta.resolution(m), cv.meta.resolution(0))]
                if not np.allclose(have, total):
                    raise ValueError(f"{self.url} mip {m} has factor {have}, not {total}")
                continue
            scale = cv.meta.add_scale(total, chunk_size=cv.meta.chunk_size(0))
            if spec0:
                scale["sharding"] = sharding_spec(scale["size"], scale["chunk_sizes"][0],
                                                  voxel_bytes, shard_bytes)
            changed = True
        if changed:
            cv.commit_info()
        self._cv = _open(self.url, self.mip)
