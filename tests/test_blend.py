"""Overlap mode (`inference.blend: overlap`): many chunks equal one pass over the whole bbox,
the blend is idempotent under chaos, temporary data goes away, and the demo shows no seam."""
import json
import random

import numpy as np
import pytest
import torch
import yaml

from voxflow.grids import OverlapGrid
from voxflow.cli import main
from voxflow.config import load_config, parse_config
from voxflow.geometry import Box
from voxflow.inference import SlidingWindow
from voxflow.models import Model
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.volume import Volume

from conftest import SmallConv, chaos, make_layer, sigkill, worker_pids, write_config

INLINE = {"inference": "local://0", "blend": "local://0", "downsample": "local://0"}


# -- geometry -----------------------------------------------------------------------------

def _random_layout(rng: random.Random):
    storage = [rng.randint(2, 9) for _ in range(3)]
    patch = [rng.randint(3, 12) for _ in range(3)]
    overlap = [rng.randint(0, p - 1) for p in patch]
    chunk = [s * rng.randint(1, 5) for s in storage]
    origin = [rng.randint(-5, 5) for _ in range(3)]
    start = [o + rng.randint(0, 6) for o in origin]
    bbox = Box.from_shape(start, [rng.randint(1, 40) for _ in range(3)])
    return OverlapGrid(bbox, patch, overlap, (0, 0, 0), chunk, storage, origin), storage, origin


def test_layout_each_patch_once_and_one_writer_per_storage_chunk():
    rng = random.Random(1)
    for _ in range(150):
        grid, storage, origin = _random_layout(rng)
        bbox = grid.bbox
        for ax in grid.axes:                   # tasks are blocks: every patch in exactly one
            assert ax.blocks[0] == 0 and ax.blocks[-1] == len(ax.starts)
            assert all(a < b for a, b in zip(ax.blocks, ax.blocks[1:]))
        writes = [pc.box for i in range(len(grid)) for pc in grid.pieces(i) if pc.cell is None]
        writes += [grid.bands.cell_box(c) for j in range(len(grid.bands))
                   for c in grid.bands.cells(j)]
        owner = np.full(tuple(reversed(bbox.shape)), -1)
        for k, box in enumerate(writes):       # final writes tile the bbox exactly once
            sl = box.zyx_slices(bbox.start)
            assert (owner[sl] == -1).all()
            owner[sl] = k
        assert (owner >= 0).all()
        chunk_id = np.zeros_like(owner)        # ... and never share a storage chunk
        for axis, n in enumerate(reversed(bbox.shape)):
            a = 2 - axis
            cells = (np.arange(bbox.start[a], bbox.stop[a]) - origin[a]) // storage[a]
            chunk_id = chunk_id * 1000 + cells.reshape([-1 if i == axis else 1 for i in range(3)])
        for c in np.unique(chunk_id):
            assert len(np.unique(owner[chunk_id == c])) == 1
        written = {(pc.cell, i): pc.box for i in range(len(grid)) for pc in grid.pieces(i)
                   if pc.cell is not None}    # the partials a blend task reads exist
        read = {(c, t): box for j in range(len(grid.bands)) for c in grid.bands.cells(j)
                for t, box in grid.bands.sources(c)}
        assert written == read


@pytest.mark.parametrize("patch,overlap", [((256, 256, 20), (64, 64, 4)),
                                           ((64, 64, 16), (16, 16, 4))])
def test_temporary_ratio_at_default_sizes(patch, overlap):
    """Default chunk and storage chunk, float32 output, 16 chunks per axis."""
    cfg = parse_config({"input": "gs://b/in", "output": "gs://b/out",
                        "model": {"path": "m.pt", "input_patch": list(patch),
                                  "output_channels": 1},
                        "inference": {"patch_overlap": list(overlap)}})
    assert cfg.inference.blend == "overlap"
    bbox = Box.from_shape((0, 0, 0), [16 * c for c in cfg.inference.chunk])
    grid = OverlapGrid(bbox, patch, overlap, (0, 0, 0), cfg.inference.chunk,
                       cfg.storage_chunk, (0, 0, 0))
    assert grid.temporary_voxels() / bbox.size <= 0.25


# -- equivalence ---------------------------------------------------------------------------

def _case(seed: int) -> dict:
    """A random configuration: sizes that do not divide each other, a voxel offset."""
    rng = random.Random(seed)
    offset = [rng.randint(1, 9) for _ in range(3)]
    shape = [rng.randint(40, 70), rng.randint(30, 60), rng.randint(14, 24)]
    storage = [rng.choice([6, 7, 8, 10]), rng.choice([5, 8, 9]), rng.choice([3, 4, 5])]
    ip = [rng.choice([9, 11, 13]), rng.choice([8, 10, 12]), rng.choice([5, 6, 7])]
    op = [p - 2 * rng.randint(0, 1) for p in ip]
    overlap = [rng.randint(1, o // 2) for o in op]
    chunk = [s * rng.randint(2, 3) for s in storage]
    start = [o + rng.randint(0, 5) for o in offset]
    stop = [o + n - rng.randint(0, 5) for o, n in zip(offset, shape)]
    return dict(offset=offset, shape=shape, storage=storage, input_patch=ip, output_patch=op,
                overlap=overlap, chunk=chunk, bbox={"start": start, "stop": stop},
                weighting=rng.choice(["bump", "gaussian"]))


def _layer_and_model(tmp_path, case):
    img = (np.random.default_rng(3).random((1, *reversed(case["shape"]))) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, offset=case["offset"], chunk=(16, 16, 4))
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))


def _config(tmp_path, case, name, chunk, **extra):
    inference = {"chunk": chunk, "patch_overlap": case["overlap"],
                 "weighting": case["weighting"], "batch_size": 3, **extra}
    return write_config(tmp_path / f"{name}.yaml", input="img", output=name, bbox=case["bbox"],
                        model={"path": "m.pt", "input_patch": case["input_patch"],
                               "output_patch": case["output_patch"], "output_channels": 2},
                        inference=inference, storage_chunk=case["storage"],
                        downsample={"mips": 0}, workers=INLINE)


def _short_z_case() -> dict:
    """Case 0 with a bbox 3 sections deep: shorter than the patch (one centred patch)."""
    case = _case(0)
    start, stop = case["bbox"]["start"], list(case["bbox"]["stop"])
    stop[2] = start[2] + 3
    return {**case, "bbox": {"start": start, "stop": stop}}


@pytest.mark.parametrize("seed", [*range(6), "short-z"])
def test_many_chunks_equal_one_chunk(tmp_path, seed):
    case = _short_z_case() if seed == "short-z" else _case(seed)
    _layer_and_model(tmp_path, case)
    bbox = Box(case["bbox"]["start"], case["bbox"]["stop"])
    whole = [s * -(-max(n, p) // s) for n, p, s in
             zip(bbox.shape, case["input_patch"], case["storage"])]
    many = _config(tmp_path, case, "many", case["chunk"])
    one = _config(tmp_path, case, "one", whole)
    assert len(plan(load_config(one)).grid) == 1
    p = plan(load_config(many))
    cells = sum(len(p.grid.bands.cells(j)) for j in range(len(p.grid.bands)))
    assert len(p.grid) >= 6 and cells >= 6                      # really cut, really blended
    assert main(["run", str(many), "--quiet"]) == 0
    assert main(["run", str(one), "--quiet"]) == 0
    got = Volume(f"file://{tmp_path}/many").read(bbox)
    want = Volume(f"file://{tmp_path}/one").read(bbox)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-5
    assert not any(tmp_path.glob("*.voxflow-tmp/*"))            # temporary data deleted
    # the one-chunk run is the plain sliding window over the bbox
    if all(n >= o for n, o in zip(bbox.shape, case["output_patch"])):
        margin = [(i - o) // 2 for i, o in zip(case["input_patch"], case["output_patch"])]
        image = Volume(f"file://{tmp_path}/img").read(bbox.grow(margin))
        window = SlidingWindow(Model(load_config(one).model), case["input_patch"],
                               case["output_patch"], case["overlap"], 3, case["weighting"])
        assert np.abs(window(image).numpy() - want).max() <= 1e-5


def test_uint8_is_the_rounded_float_run_and_keep_temporary(tmp_path):
    case = _case(0)
    _layer_and_model(tmp_path, case)
    bbox = Box(case["bbox"]["start"], case["bbox"]["stop"])
    f32 = _config(tmp_path, case, "f32", case["chunk"], keep_temporary=True)
    u8 = yaml.safe_load(f32.read_text())
    del u8["inference"]["keep_temporary"]
    u8 = write_config(tmp_path / "u8.yaml", **{**u8, "output": "u8", "output_dtype": "uint8"})
    assert main(["run", str(f32), "--quiet", "--run-id", "r32"]) == 0
    assert main(["run", str(u8), "--quiet"]) == 0
    prob = Volume(f"file://{tmp_path}/f32").read(bbox)
    got = Volume(f"file://{tmp_path}/u8").read(bbox)
    assert np.array_equal(got, np.round(255 * np.clip(prob, 0, 1)).astype(np.uint8))
    # kept on request: one object per (band cell, task), as many bytes as `plan` says
    kept = list((tmp_path / "f32.voxflow-tmp" / "r32").iterdir())
    p = plan(load_config(f32))
    n_partials = sum(len(p.grid.bands.sources(c)) for j in range(len(p.grid.bands))
                     for c in p.grid.bands.cells(j))
    assert len(kept) == n_partials
    payload = sum(np.load(f).nbytes for f in kept)
    assert payload == p.grid.temporary_voxels() * 2 * 4
    assert not any(tmp_path.glob("u8.voxflow-tmp/*"))


def test_plan_reports_blend_stage_and_temporary_bytes(tmp_path, capsys):
    case = _case(1)
    _layer_and_model(tmp_path, case)
    cfg = _config(tmp_path, case, "out", case["chunk"])
    assert main(["plan", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    p = plan(load_config(cfg))
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["blend"]["tasks"] == len(p.grid.bands) > 0
    assert stages["inference"]["patches"] == p.grid.patch_count()
    temp = p.grid.temporary_voxels() * 2 * 4
    assert report["blend"]["temporary_bytes"] == temp == stages["blend"]["bytes_read"]
    assert report["blend"]["temporary_ratio"] == round(temp / (p.bbox.size * 2 * 4), 4)
    assert main(["plan", str(cfg)]) == 0
    assert "blend   overlap: temporary" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# -- chaos ---------------------------------------------------------------------------------

def test_sigkill_during_inference_and_blend_output_bit_identical(tmp_path):
    img = (np.random.default_rng(5).random((1, 16, 144, 144)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, offset=(3, 3, 1), chunk=(16, 16, 4))
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))
    base = dict(input="img", model={"path": "m.pt", "input_patch": [16, 16, 8],
                                    "output_channels": 2},
                inference={"chunk": [32, 32, 8], "patch_overlap": [6, 6, 3]},
                storage_chunk=[16, 16, 4], downsample={"mips": 0},
                workers={"inference": {"group": "local://2", "min": 2},
                         "blend": {"group": "local://2", "min": 2}})
    ref = write_config(tmp_path / "ref.yaml", output="ref", **base)
    assert main(["run", str(ref), "--quiet"]) == 0          # fault-free, same worker groups

    queue_url = f"sqlite://{tmp_path}/q.db"
    cfg = write_config(tmp_path / "chaos.yaml", output="chaos",
                       queue={"url": queue_url, "lease_seconds": 2, "max_attempts": 8}, **base)
    q = open_queue(queue_url)
    kills = {"inference": 0, "blend": 0}

    def kill_busy_workers(stop):     # SIGKILL workers that hold a task: twice in each stage
        rng = random.Random(0)
        while not stop.wait(rng.uniform(0.02, 0.1)):
            for kind in kills:
                busy = q.busy_workers(kind) if kills[kind] < 2 else set()
                alive = worker_pids()                 # a killed worker's lease lingers
                pid = next((alive[w] for w in sorted(busy) if w in alive), None)
                if pid and sigkill(pid):
                    kills[kind] += 1

    with chaos(kill_busy_workers):
        assert main(["run", str(cfg), "--run-id", "chaos", "--quiet"]) == 0
    stats = q.stats("chaos")
    assert stats["blend"].total == 5 * 5 * 2 - 1        # a task per corner where chunks meet
    assert all(s.done == s.total and s.dead == 0 for s in stats.values()), stats
    assert kills["inference"] >= 1 and kills["blend"] >= 1, kills     # the chaos happened
    got, want = (Volume(f"file://{tmp_path}/{n}") for n in ("chaos", "ref"))
    got, want = got.read(got.bounds), want.read(want.bounds)
    assert np.array_equal(got, want), np.abs(got - want).max()
    assert not any(tmp_path.glob("*.voxflow-tmp/*"))
    assert worker_pids() == {}


# -- the demo volume -----------------------------------------------------------------------

def test_no_seam_on_the_demo_volume(tmp_path):
    """Where tasks meet, neighbouring planes differ no more than elsewhere."""
    from voxflow.demo.run import demo_config, write_image
    write_image(f"file://{tmp_path}/image")
    config = demo_config(f"file://{tmp_path}/image", f"file://{tmp_path}/boundary")
    config.update(downsample={"mips": 0}, output_dtype="float32", workers=INLINE)
    path = write_config(tmp_path / "demo.yaml", **config)
    p = plan(load_config(path))
    assert p.grid.counts == (2, 2, 1)
    assert main(["run", str(path), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/boundary")
    prob = out.read(out.bounds)[0].astype(np.float64)                  # z, y, x
    for axis, ax in ((2, p.grid.axes[0]), (1, p.grid.axes[1])):
        diff = np.abs(np.diff(prob, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2) if a != axis))
        (_, end), (begin, _) = ax.ranges                # the zone where the two tasks mix
        faces = [f for iv in ax.intervals for f in (iv.start, iv.stop) if 0 < f < len(diff)]
        meet = sorted({begin, (begin + end) // 2, end, *faces})
        meet = [f - 1 for f in meet]                    # diff[f - 1]: planes f - 1 and f
        elsewhere = np.delete(diff, meet)
        assert diff[meet].max() <= elsewhere.mean() + 3 * elsewhere.std(), (
            axis, diff[meet], elsewhere.mean(), elsewhere.std())
