"""segmentation: one id per connected object of the whole volume, whatever the task boxes.

The library's passes over in-memory arrays first (against cc3d on the whole array), then the
stage through the real runner: SQLite queue, inline and process workers, file:// layers."""
import contextlib
import os
import signal
import sqlite3
from pathlib import Path
from typing import Optional

import cc3d
import numpy as np
import pytest
import torch
import yaml
from scipy.ndimage import gaussian_filter

from voxflow import cost
from voxflow.cli import main
from voxflow.config import ConfigError, load_config, parse_config
from voxflow.downsample import downsample
from voxflow.geometry import Box
from voxflow.grids import ChunkGrid
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.segmentation import SegmentationOverflow, directions, merge, segment_in_memory
from voxflow.volume import Volume

from conftest import chaos, make_layer, worker_pids, write_config

SHAPE = (32, 96, 96)                     # z, y, x
GRID = ChunkGrid(Box((0, 0, 0), (96, 96, 32)), (32, 32, 16))      # 3 x 3 x 2 tasks


def blobs(seed: int = 0, shape=SHAPE, sigma: float = 2.0) -> np.ndarray:
    """Smoothed noise, shifted so that 13% lies above 0.5: there, ~200 blobs, the largest
    crossing many task boxes."""
    field = gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return np.clip(0.5 + (field - np.quantile(field, 0.87)) / (8 * field.std()), 0, 1
                   ).astype(np.float32)


def diagonal_contacts() -> np.ndarray:
    """Short bars that touch the bar in the next task only diagonally: across a face (by an
    edge step and by a corner step), across a task edge (both signs of y) and across a task
    corner (both signs of y). 6-connectivity keeps every bar apart; 26 joins each pair."""
    v = np.zeros(SHAPE, np.float32)

    def bar(x, y, z, dx):              # 3 voxels from (x, y, z) away from the boundary in x
        for k in range(3):
            v[z, y, x + k * dx] = 1.0

    contacts = [((31, 10, 5), (32, 11, 5)), ((31, 20, 5), (32, 21, 6)),   # across a face
                ((31, 31, 8), (32, 32, 8)), ((31, 64, 8), (32, 63, 8)),   # across an edge
                ((31, 31, 15), (32, 32, 16)), ((63, 64, 15), (64, 63, 16))]  # a corner
    for a, b in contacts:
        bar(*a, -1)
        bar(*b, +1)
    return v


def assert_same_objects(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to a relabelling: the same background, and a bijection between the ids."""
    assert np.array_equal(got == 0, want == 0)
    pairs = np.unique(np.stack([got[got > 0], want[want > 0]]).astype(np.uint64), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_passes_equal_cc3d_on_the_whole_array(connectivity):
    values = blobs()
    got = segment_in_memory(values, GRID, 0.5, connectivity=connectivity)
    want = cc3d.connected_components(values > 0.5, connectivity=connectivity)
    assert_same_objects(got, want)
    ids = np.unique(got)
    assert np.array_equal(ids, np.arange(len(ids)))          # final ids are 1..N
    boxes = [len({(x // 32, y // 32, z // 16) for z, y, x in np.argwhere(got == i)})
             for i in ids[1:]]
    assert max(boxes) >= 6                                   # objects cross many boxes


def test_diagonal_contacts_across_faces_edges_and_corners():
    values = diagonal_contacts()
    six = segment_in_memory(values, GRID, connectivity=6)
    assert six.max() == 12
    for connectivity, objects in ((18, 9), (26, 6)):       # 18: edge steps only
        got = segment_in_memory(values, GRID, connectivity=connectivity)
        assert_same_objects(got, cc3d.connected_components(values > 0.5,
                                                           connectivity=connectivity))
        assert got.max() == objects
    assert len(directions(6)) == 3 and len(directions(18)) == 9 and len(directions(26)) == 13


def test_min_size_applies_to_whole_objects_and_uneven_boxes():
    values = blobs(1, (29, 70, 83))              # boxes clipped at the far end of each axis
    grid = ChunkGrid(Box((0, 0, 0), (83, 70, 29)), (32, 32, 16))
    for connectivity in (6, 26):
        want = cc3d.dust(cc3d.connected_components(values > 0.5, connectivity=connectivity),
                         threshold=300, connectivity=connectivity)
        got = segment_in_memory(values, grid, 0.5, connectivity=connectivity, min_size=300)
        assert_same_objects(got, want)
        assert 0 < got.max() < cc3d.connected_components(values > 0.5).max()


def test_invert_uint8_thresholds_and_uint64_ids():
    values = blobs(2)
    got = segment_in_memory(values, GRID, 0.4, invert=True, connectivity=26, dtype="uint64")
    assert got.dtype == np.uint64
    assert_same_objects(got, cc3d.connected_components(values < 0.4, connectivity=26))
    as_uint8 = np.round(values * 255).astype(np.uint8)
    got = segment_in_memory(as_uint8, GRID, 0.5, connectivity=6)
    assert_same_objects(got, cc3d.connected_components(as_uint8 >= 128, connectivity=6))


def test_ids_overflowing_the_dtype_fail_naming_the_field():
    counts = [np.ones(200, np.uint64), np.ones(100, np.uint64)]
    offsets, table, objects = merge(counts, [[], []], dtype="uint16")
    assert objects == 300 and list(offsets) == [0, 200, 300] and table.max() == 300
    with pytest.raises(SegmentationOverflow, match=r"^segmentation\.dtype: 300 objects"):
        merge(counts, [[], []], dtype="uint8")


# -- the stage, through the runner ----------------------------------------------------------
INLINE = {k: "local://0" for k in ("inference", "blend", "segmentation", "downsample")}


class Identity(torch.nn.Module):
    """The output is the input: the segmentation sees exactly the values given."""

    def forward(self, x):
        return x


def _config(tmp_path, values: np.ndarray, name: str = "run", workers=INLINE,
            queue: Optional[dict] = None, top: Optional[dict] = None, **seg) -> Path:
    if not (tmp_path / "img").exists():
        make_layer(tmp_path / "img", values[None], chunk=(32, 32, 8))
        torch.jit.script(Identity().eval()).save(str(tmp_path / "id.pt"))
    config = dict(
        input="img", output=f"{name}-out",
        model={"path": "id.pt", "input_patch": [32, 32, 16], "output_channels": 1},
        inference={"chunk": [32, 32, 16], "patch_overlap": [0, 0, 0], "blend": "crop"},
        storage_chunk=[16, 16, 8], downsample={"mips": 1},
        segmentation={"output": f"{name}-seg", "threshold": 0.5, **seg},
        queue={"url": f"sqlite://{tmp_path}/{name}.db", **(queue or {})}, workers=workers)
    return write_config(tmp_path / f"{name}.yaml", **{**config, **(top or {})})


def _segmentation(tmp_path, name: str = "run") -> list[np.ndarray]:
    seg = Volume(f"file://{tmp_path}/{name}-seg")
    return [seg.at_mip(m).read(seg.at_mip(m).bounds)[0] for m in (0, 1)]


def _files(layer: Path) -> dict[str, bytes]:
    """Every file of a layer but its info, by path."""
    return {str(p.relative_to(layer)): p.read_bytes() for p in sorted(layer.rglob("*"))
            if p.is_file() and p.name != "info"}


@pytest.mark.parametrize("values, connectivity, min_size", [
    ("blobs", 6, 0), ("blobs", 26, 50), ("diagonal", 26, 0)])
def test_stage_equals_cc3d_on_the_whole_output(tmp_path, values, connectivity, min_size):
    values = blobs(3) if values == "blobs" else diagonal_contacts()
    cfg = _config(tmp_path, values, connectivity=connectivity, min_size=min_size)
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/run-out").read(Box((0, 0, 0), (96, 96, 32)))[0]
    want = cc3d.dust(cc3d.connected_components(out > 0.5, connectivity=connectivity),
                     threshold=min_size, connectivity=connectivity)
    got, mip1 = _segmentation(tmp_path)
    assert got.dtype == np.uint32 and got.max() == len(np.unique(want)) - 1 >= 6
    assert_same_objects(got, want)
    assert np.array_equal(mip1, downsample(got[None], (2, 2, 1), 1, True)[0][0])   # mode
    assert not (tmp_path / "run-out.voxflow-tmp").exists()     # its objects are deleted


def test_reruns_and_killed_workers_give_identical_bytes(tmp_path):
    """Two runs write the same bytes; so does one whose segmentation workers are SIGKILLed
    and SIGTERMed while they hold tasks of every pass (leases expire, tasks run again)."""
    values = blobs(4)
    small = {"connectivity": 26, "min_size": 20, "chunk": [16, 16, 8]}   # 144 tasks a pass
    for name in ("a", "b"):
        assert main(["run", str(_config(tmp_path, values, name, **small)), "--quiet"]) == 0
    want = _files(tmp_path / "a-seg")
    assert want == _files(tmp_path / "b-seg") and len(want) == 144 + 36

    workers = {**INLINE, "segmentation": {"group": "local://2", "min": 2}}
    cfg = _config(tmp_path, values, "chaos", workers,
                  queue={"lease_seconds": 2, "max_attempts": 8}, **small)
    queue_url = f"sqlite://{tmp_path}/chaos.db"
    kills = []

    def kill_while_busy(stop):       # one kill per pass, while a worker holds its tasks
        while not stop.wait(0.05):
            try:
                queue = open_queue(queue_url, readonly=True)
            except FileNotFoundError:
                continue
            try:
                stats = queue.stats("chaos")
            except sqlite3.OperationalError:    # the file exists, its tables not yet
                continue
            finally:
                queue.close()
            busy = [n for n, s in stats.items() if n.startswith("segmentation-") and s.leased
                    and n not in {k[0] for k in kills}]
            pids = list(worker_pids().values())
            if busy and pids:
                how = signal.SIGKILL if len(kills) % 2 == 0 else signal.SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[0], how)
                    kills.append((busy[0], how))

    with chaos(kill_while_busy):
        assert main(["run", str(cfg), "--run-id", "chaos", "--quiet"]) == 0
    assert len(kills) >= 3, kills
    stats = open_queue(queue_url).stats("chaos")
    assert all(s.done == s.total and s.dead == 0 for s in stats.values()), stats
    assert _files(tmp_path / "chaos-seg") == want
    assert worker_pids() == {}


def test_bad_parameters_are_refused_naming_the_field(tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, blobs(0), channel=1).read_text())
    assert main(["plan", str(tmp_path / "run.yaml")]) == 2       # the output has 1 channel
    assert "voxflow: error: segmentation.channel: 1 is not a channel of the output (it has " \
        "channels 0..0)" in capsys.readouterr().err
    for seg, field in (({"connectivity": 8}, "segmentation.connectivity"),
                       ({"threshold": float("nan")}, "segmentation.threshold"),
                       ({"output": cfg["output"]}, "segmentation.output"),
                       ({"output": "http://lab/seg"}, "segmentation.output"),
                       ({"chunk": [24, 16, 8]}, "segmentation.chunk"),
                       ({"dtype": "uint16"}, "segmentation.dtype")):
        with pytest.raises(ConfigError) as err:
            parse_config({**cfg, "segmentation": {**cfg["segmentation"], **seg}}, tmp_path)
        assert err.value.field == field, err.value


@pytest.mark.parametrize("sharding", ["off", "on"])
def test_plan_counts_the_objects_the_stage_writes_and_reads(tmp_path, monkeypatch, sharding):
    """Unsharded over a bbox off the storage grid (relabel writes that cut chunks read them
    first); sharded, every mip one object per shard. Counted against the run's files."""
    from test_cost import ReadLog
    top = {"sharding": sharding, "shard_bytes": 16 * 16 * 8 * 4 * 4,
           "inference": {"chunk": [32, 32, 16], "patch_overlap": [0, 0, 0], "blend": "crop",
                         "keep_temporary": True}}
    if sharding == "off":
        top["bbox"] = {"start": [5, 3, 2], "stop": [90, 91, 30]}
    cfg = _config(tmp_path, blobs(5), top=top, connectivity=18)
    planned = cost.bill(plan(load_config(cfg)))
    reads = ReadLog(monkeypatch)
    assert main(["run", str(cfg), "--quiet"]) == 0
    seg = Volume(f"file://{tmp_path}/run-seg")
    written = [len(list((tmp_path / "run-seg" / s["key"]).iterdir())) for s in seg.info["scales"]]
    assert written == planned["objects_written"]["segmentation"] and min(written) >= 1
    if sharding == "on":
        assert seg.shard_shape is not None and written[0] < 6 * 6 * 4     # < chunks
    temporary = list((tmp_path / "run-out.voxflow-tmp").rglob("*"))
    assert sum(p.is_file() for p in temporary) == planned["objects_written"]["temporary"]
    got = planned["objects_read"]
    assert reads.under(f"file://{tmp_path}/run-out") == got["output"]
    assert reads.under(f"file://{tmp_path}/run-seg") == got["segmentation"] > 0
    # (the relabel tasks' two range reads of the table bypass cloud-files on file://)
    assert reads.under(f"file://{tmp_path}/run-out.voxflow-tmp") == got["temporary"] - 2 * 18
    assert planned["worker_hours"]["segmentation"] > 0
    assert len(planned["bytes_stored"]["segmentation"]) == 2
    box = Box(*(top["bbox"].values())) if "bbox" in top else seg.bounds
    out = Volume(f"file://{tmp_path}/run-out").read(box)[0]
    assert_same_objects(seg.read(box)[0], cc3d.connected_components(out > 0.5, connectivity=18))


def test_every_dag_has_a_segmentation_group_that_its_plan_may_skip(tmp_path):
    """The trigger form can ask for a segmentation whatever the YAML says, so every DAG has
    the group, in run order; the plan task names each group's tasks, to skip those of the
    kinds a run does not need (tests/test_airflow.py runs it)."""
    from operators.dag_factory import build_dag
    cfg = yaml.safe_load(_config(tmp_path, blobs(0)).read_text())
    (tmp_path / "with.yaml").write_text(yaml.safe_dump(cfg))
    del cfg["segmentation"]
    (tmp_path / "without.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("with", "without"):
        dag = build_dag(tmp_path / f"{name}.yaml")
        up = {t.task_id: t.upstream_task_ids for t in dag.tasks}
        # a group's publish follows the plan and the waits of every group before it
        before = {k: {t.split(".")[0] for t in up[f"{k}.publish"] if t != "plan"}
                  for k in dag.get_task("plan").groups}
        order = sorted(before, key=lambda k: len(before[k]))
        assert order == ["levels", "inference", "blend", "segmentation", "downsample"]
        assert all(before[k] == set(order[:i]) for i, k in enumerate(order))
        skips = dag.get_task("plan").groups
        assert {t for tasks in skips.values() for t in tasks} | {"plan", "finalize"} == \
            set(dag.task_dict)


def test_segmentation_parameters_are_part_of_the_run_identity(tmp_path):
    from voxflow.identity import run_identity
    ids = {}
    for name, seg, workers in (("base", {}, INLINE), ("t", {"threshold": 0.6}, INLINE),
                               ("w", {}, {**INLINE, "segmentation": "local://3"})):
        cfg = yaml.safe_load(_config(tmp_path, blobs(0), **seg, workers=workers).read_text())
        ids[name] = run_identity(parse_config(cfg, tmp_path)).digest
    assert ids["t"] != ids["base"] == ids["w"]      # worker groups are operational


def test_no_objects_outside_the_mask(tmp_path):
    """Outside `mask:` the output is 0, which `invert: true` would call foreground: the
    segmentation leaves it background."""
    tissue = np.zeros((1, *SHAPE), np.uint8)
    tissue[..., :40] = 1                                   # x < 40: 2 of 3 task columns run
    make_layer(tmp_path / "tissue", tissue, chunk=(32, 32, 8))
    cfg = _config(tmp_path, blobs(6), invert=True, connectivity=6,
                  top={"mask": {"layer": "tissue"}})
    assert main(["run", str(cfg), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/run-out").read(Box((0, 0, 0), (96, 96, 32)))[0]
    got = _segmentation(tmp_path)[0]
    assert not got[..., 40:].any() and got.max() > 0
    assert_same_objects(got, cc3d.connected_components((out < 0.5) & (tissue[0] > 0),
                                                       connectivity=6))
