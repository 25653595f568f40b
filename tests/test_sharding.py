"""Sharded output: the same bytes as an unsharded run at every mip, one writer per shard, a
resumed run skips done shards, and every layer reads the same with tensorstore (an
independent reader of the format). Real layers on disk and in a GCS emulator."""
import os
import threading

import numpy as np
import pytest
import torch

from voxflow.config import ConfigError, load_config
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.runner import publish_stage, register, run
from voxflow.sharding import shard_grid
from voxflow.stages import StageCache, stage_grid, stage_names
from voxflow.volume import Volume
from voxflow.worker import Worker

from conftest import SmallConv, make_layer, write_config

ts = pytest.importorskip("tensorstore")

SHAPE_ZYX = (32, 96, 128)            # 2 x 3 x 4 shards of 32x32x16 (below)
SHARD_BYTES = 8 * 16 * 16 * 8 * 2    # 8 storage chunks of 16x16x8, 2 uint8 channels


@pytest.fixture
def layer(tmp_path, torchscript_model):
    img = (np.random.default_rng(7).random((1, *SHAPE_ZYX)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8))
    torchscript_model(SmallConv(1, 2).eval())
    return img


def _config(tmp_path, name, blend, sharding, dtype="uint8", **extra):
    return load_config(write_config(
        tmp_path / f"{name}.yaml", input="img", output=name,
        model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
        inference={"chunk": [64, 32, 16], "patch_overlap": [4, 4, 2], "blend": blend},
        storage_chunk=[16, 16, 8], output_dtype=dtype, downsample={"mips": 2},
        sharding=sharding, shard_bytes=SHARD_BYTES * (4 if dtype == "float32" else 1),
        queue={"url": f"sqlite://{tmp_path}/{name}.db"}, **extra))


def _layer_data(url, mips=3):
    out = []
    for m in range(mips):
        v = Volume(url, m)
        out.append(v.read(v.bounds))
    return out


def _tensorstore(url, mip):
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": url + "/",
                     "scale_index": mip}).result()
    return np.asarray(store.read().result()).transpose(3, 2, 1, 0)


@pytest.mark.parametrize("blend", ["crop", "overlap"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_sharded_run_equals_unsharded_at_every_mip(tmp_path, layer, blend, dtype):
    sharded = _config(tmp_path, "sharded", blend, "on", dtype)
    p = plan(sharded)
    assert p.shard_shapes[0] == (32, 32, 16)
    run(sharded)
    run(_config(tmp_path, "flat", blend, "off", dtype))
    got, want = _layer_data(f"file://{tmp_path}/sharded"), _layer_data(f"file://{tmp_path}/flat")
    for m, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.dtype(dtype) and np.array_equal(g, w), m
        assert Volume(f"file://{tmp_path}/sharded", m).shard_shape is not None
        assert Volume(f"file://{tmp_path}/flat", m).shard_shape is None
        # an independent reader of the format sees the same voxels, sharded or not
        assert np.array_equal(_tensorstore(f"file://{tmp_path}/sharded", m), w), m
        assert np.array_equal(_tensorstore(f"file://{tmp_path}/flat", m), w), m
    mip0 = os.listdir(tmp_path / "sharded" / Volume(f"file://{tmp_path}/sharded").key)
    assert all(n.endswith(".shard") for n in mip0) and len(mip0) == len(
        shard_grid(p.input_bounds, p.shard_shapes[0]))
    flat = os.listdir(tmp_path / "flat" / Volume(f"file://{tmp_path}/flat").key)
    assert not [n for n in flat if n.endswith(".gz")]      # plain names other readers find


def _shards_of(box, bounds, shape):
    return {b.start for b in shard_grid(bounds, shape, box)}


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_no_shard_has_two_writers(tmp_path, layer, blend):
    """From the plan: the tasks of every stage that writes the layer cover disjoint sets of
    whole shards (overlap inference writes none: it packs)."""
    p = plan(_config(tmp_path, "sharded", blend, "on"))
    from voxflow.downsample import mip_bounds
    writers = {m: {} for m in range(3)}
    for name in stage_names(p):
        if name == "inference" and blend == "overlap":
            continue
        grid = stage_grid(p, name)
        for i in range(len(grid)):
            if name.startswith("downsample"):
                ps = p.downsample[int(name.split("-")[1])]
                written = [(ps.source_mip + k, ps.target_box(grid.box(i),
                                                             p.config.downsample.factor, k))
                           for k in range(1, ps.mips + 1)]
            else:
                written = [(0, grid.box(i))]
            for mip, box in written:
                bounds = mip_bounds(p.input_bounds, p.config.downsample.factor, mip)
                assert box == box.intersect(bounds)
                for shard in _shards_of(box, bounds, p.shard_shapes[mip]):
                    assert shard not in writers[mip], (name, i, shard, writers[mip][shard])
                    writers[mip][shard] = (name, i)
    for mip in range(3):                                  # and every shard has one
        bounds = mip_bounds(p.input_bounds, p.config.downsample.factor, mip)
        assert len(writers[mip]) == len(shard_grid(bounds, p.shard_shapes[mip]))


def test_a_resumed_sharded_run_skips_done_shards(tmp_path, layer):
    cfg = _config(tmp_path, "sharded", "overlap", "on")
    p = plan(cfg)
    run_id, _ = register(cfg, p)
    q = open_queue(cfg.queue.url)
    for name in ("inference", "blend"):
        publish_stage(q, run_id, p, name)
    worker = Worker(q, StageCache(q), ["inference", "blend"], "w", runs=[run_id])

    def stop_after_some_shards(stop):
        while not stop.wait(0.05):
            if q.stats(run_id)["blend"].done >= 5:
                worker.stop.set()                        # "killed" after 5 of 24 shards
                return
    thread = threading.Thread(target=stop_after_some_shards, args=(threading.Event(),),
                              daemon=True)
    thread.start()
    worker.run()
    thread.join(timeout=30)
    done = q.stats(run_id)["blend"].done
    assert 5 <= done < len(stage_grid(p, "blend"))
    summary = run(cfg)
    assert summary.run == run_id
    blend = next(s for s in summary.stages if s.name == "blend")
    assert blend.skipped == done and blend.tasks == len(stage_grid(p, "blend"))
    run(_config(tmp_path, "flat", "overlap", "off"))
    for g, w in zip(_layer_data(f"file://{tmp_path}/sharded"),
                    _layer_data(f"file://{tmp_path}/flat")):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_a_bbox_that_cuts_shards_keeps_what_lies_outside_it(tmp_path, layer, blend,
                                                            torchscript_model):
    """A second run over part of the layer (another model): shards the bbox cuts are merged
    by their one writer, so the voxels outside the bbox keep the first run's values —
    exactly as the unsharded layer keeps them."""
    bbox = {"start": [16, 16, 8], "stop": [112, 80, 32]}       # cuts shards on x and y
    for name, sharding in (("sharded", "on"), ("flat", "off")):
        torchscript_model(SmallConv(1, 2).eval())
        run(_config(tmp_path, name, blend, sharding))
        net = SmallConv(1, 2)
        with torch.no_grad():
            for q in net.parameters():
                q.mul_(-1.0)
        torchscript_model(net.eval())
        if blend == "crop":
            bbox = {"start": [32, 32, 0], "stop": [128, 96, 32]}  # crop tasks own shards
        run(_config(tmp_path, name, blend, sharding, bbox=bbox))
    for m, (g, w) in enumerate(zip(_layer_data(f"file://{tmp_path}/sharded"),
                                   _layer_data(f"file://{tmp_path}/flat"))):
        assert np.array_equal(g, w), m


def test_crop_chunks_shape_the_shards(tmp_path, layer):
    """A crop task writes whole shards: a chunk of 48 (3 storage chunks) along x gets
    shards one storage chunk wide there, at every mip, however large shard_bytes is."""
    p = plan(load_config(write_config(
        tmp_path / "c.yaml", input="img", output="c",
        model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
        inference={"chunk": [48, 32, 16], "blend": "crop"}, storage_chunk=[16, 16, 8],
        downsample={"mips": 1}, sharding="on", shard_bytes=SHARD_BYTES * 64)))
    assert p.shard_shapes[0][0] == 16 and not any(
        c % s for c, s in zip([48, 32, 16], p.shard_shapes[0]))
    assert p.shard_bytes == 16 * 16 * 8 * 2 * 4               # 4 chunks: 16 x 32 x 16
    run(p.config)
    assert Volume(f"file://{tmp_path}/c").shard_shape == p.shard_shapes[0]
    assert Volume(f"file://{tmp_path}/c", 1).shard_shape == p.shard_shapes[1]


def test_sharding_refuses_an_output_of_another_layout(tmp_path, layer):
    run(_config(tmp_path, "flat", "crop", "off"))
    with pytest.raises(ConfigError, match=r"^sharding: on does not fit .* unsharded"):
        plan(_config(tmp_path, "flat", "crop", "on"))
    with pytest.raises(ConfigError, match=r"^shard_bytes: .*existing output"):
        run(_config(tmp_path, "sh", "overlap", "on"))
        plan(_config(tmp_path, "sh", "overlap", "on").model_copy(
            update={"shard_bytes": SHARD_BYTES * 8}))


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_sharded_run_on_gs_writes_each_shard_once(tmp_path, layer, blend, gcs, monkeypatch):
    """On the GCS emulator (`sharding: auto` shards a gs:// output): a stage at a time, one
    task at a time, the shard objects whose generation changed are recorded after every
    task — each shard's generation changes exactly once in the whole run; the output equals
    the unsharded run on disk and reads the same with tensorstore's gcs driver."""
    url = gcs.path("sharded")
    cfg = _config(tmp_path, "unused", blend, "auto")
    cfg = cfg.model_copy(update={"output": url})
    p = plan(cfg)
    assert p.shard_shapes is not None
    run_id, _ = register(cfg, p)
    q = open_queue(cfg.queue.url)
    bucket = gcs.client().bucket(gcs.bucket)
    prefix = url.removeprefix(f"gs://{gcs.bucket}/") + "/"
    seen: dict[str, int] = {}
    writes: dict[str, list] = {}

    def record(task):
        for blob in bucket.client.list_blobs(gcs.bucket, prefix=prefix):
            if blob.name.endswith(".shard") and seen.get(blob.name) != blob.generation:
                seen[blob.name] = blob.generation
                writes.setdefault(blob.name, []).append(task)

    cache = StageCache(q)

    class Recording:
        def __init__(self, stage, name):
            self.stage, self.name = stage, name

        def __getattr__(self, attr):
            return getattr(self.stage, attr)

        def write(self, index, computed):
            self.stage.write(index, computed)
            record((self.name, index))

    for name in stage_names(p):
        publish_stage(q, run_id, p, name)
        worker = Worker(q, lambda r, s: Recording(cache(r, s), s), None, "w", runs=[run_id],
                        prefetch=False)
        worker.run(exit_when_idle=0.5)
        assert q.stats(run_id)[name].done == len(stage_grid(p, name))
    shards = sum(len(shard_grid(Volume(url, m).bounds, p.shard_shapes[m])) for m in range(3))
    assert len(writes) == shards and all(len(w) == 1 for w in writes.values()), writes
    run(_config(tmp_path, "flat", blend, "off"))
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs.url)
    for m, want in enumerate(_layer_data(f"file://{tmp_path}/flat")):
        v = Volume(url, m)
        assert np.array_equal(v.read(v.bounds), want), m
        store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": m,
                         "kvstore": {"driver": "gcs", "bucket": gcs.bucket,
                                     "path": prefix}}).result()
        assert np.array_equal(np.asarray(store.read().result()).transpose(3, 2, 1, 0), want)


def test_shards_with_empty_chunks_at_the_layer_end_read_back(tmp_path):
    """A shard clipped at the layer's end with all-zero chunks of two shapes (cloud-volume
    12's encoder gives them all the first one's bytes; voxflow encodes each chunk)."""
    from voxflow.geometry import Box
    v = Volume.create(f"file://{tmp_path}/l", num_channels=2, dtype="uint8",
                      resolution=(8, 8, 40), voxel_offset=(5, 7, 3), size=(100, 90, 22),
                      chunk=(16, 16, 4), shard_bytes=16 * 16 * 4 * 8 * 8)
    data = (np.random.default_rng(0).random((2, 22, 90, 100)) * 255).astype(np.uint8)
    box = Box((9, 10, 4), (97, 83, 24))
    inside = (slice(None), *box.zyx_slices(v.bounds.start))
    v.write(box, data[inside])
    want = np.zeros_like(data)
    want[inside] = data[inside]
    assert np.array_equal(Volume(f"file://{tmp_path}/l").read(v.bounds), want)
    assert np.array_equal(_tensorstore(f"file://{tmp_path}/l", 0), want)
