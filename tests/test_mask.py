"""Skipping work: a tissue mask keeps tasks outside it from ever running and zeroes the output
there, while the output inside equals the unmasked run's (crop and overlap mode, blending
exact); `skip_empty` skips tasks whose input is all one value. Real layers, a real conv model,
the real SQLite queue and inline workers; counts come from the workers' own logs."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from voxflow.config import ConfigError, load_config
from voxflow.cost import bill
from voxflow.pipeline import plan
from voxflow.progress import RateMeter, chunk_map, stage_rows
from voxflow.queues import DONE, SKIPPED, open_queue
from voxflow.runner import run
from voxflow.volume import Volume

from conftest import SmallConv, make_layer, queue_url_for, write_config

TISSUE_X = 40          # the mask's tissue: x < 40 (of 128)
EMPTY_X = 64           # the input is 0 for x >= 64 (an unimaged slab)


@pytest.fixture
def layers(tmp_path, torchscript_model):
    img = np.random.default_rng(7).integers(1, 256, (1, 16, 64, 128), dtype=np.uint8)
    img[..., EMPTY_X:] = 0
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8))
    mask = np.zeros((1, 16, 64, 128), np.uint8)
    mask[..., :TISSUE_X] = 255
    make_layer(tmp_path / "mask", mask, chunk=(16, 16, 8), mips=1)   # mip 1: 16 x 16 x 40
    torchscript_model(SmallConv(1, 2))
    return img


def _config(tmp_path, output: str, blend: str, **extra):
    cfg = dict(input="img", output=output,
               model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
               inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 2], "blend": blend},
               storage_chunk=[16, 16, 8], downsample={"mips": 1},
               queue={"url": f"sqlite://{tmp_path}/queue.db"}, **extra)
    return load_config(write_config(tmp_path / f"{output}.yaml", **cfg))


def _done_events(home: Path, run_id: str) -> list[dict]:
    """The inference task_done events of a run, from its workers' JSON logs."""
    events = []
    for log in (home / "logs" / run_id).glob("*.log"):
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "task_done" and event.get("stage") == "inference":
                events.append(event)
    return events


def _output(tmp_path, name: str) -> np.ndarray:
    vol = Volume(f"file://{tmp_path}/{name}")
    return vol.read(vol.bounds)


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_mask_skips_tasks_outside_it_and_zeroes_the_output_there(tmp_path, layers, blend,
                                                                 voxflow_home):
    full = run(_config(tmp_path, "full", blend))
    config = _config(tmp_path, "masked", blend, mask={"layer": "mask", "mip": 1})
    p = plan(config)
    grid = p.grid
    meets = {i for i in range(len(grid)) if grid.box(i).start[0] < TISSUE_X}
    assert 0 < len(meets) < len(grid)
    estimate = bill(p)
    assert estimate["skipped"] == {"inference": len(grid) - len(meets)}
    assert estimate["tasks"]["inference"] == len(meets)
    unmasked = bill(plan(_config(tmp_path, "full", blend)))
    assert estimate["worker_hours"]["inference"] < unmasked["worker_hours"]["inference"]

    masked = run(config)
    ran = [e["index"] for e in _done_events(voxflow_home, masked.run)]
    assert sorted(ran) == sorted(meets)                 # each ran once; none outside the mask
    assert len(_done_events(voxflow_home, full.run)) == len(grid)
    inference = masked.stages[0]
    assert (inference.tasks, inference.masked) == (len(meets), len(grid) - len(meets))
    queue = open_queue(config.queue.url)
    rows = stage_rows(queue, masked.run, RateMeter(), {"inference": len(meets)},
                      {"inference": p.masked})
    assert rows[0]["skipped"] == len(grid) - len(meets)
    assert rows[0]["done"] == rows[0]["total"] == len(meets)
    cells = chunk_map(queue, masked.run, "inference", grid, runs=p.tissue.tasks)
    codes = "".join(cells["bands"])                     # x fastest, one band per z task
    assert {codes[i] for i in meets} == {str(DONE)}     # the console's map: skipped apart
    assert {codes[i] for i in set(range(len(grid))) - meets} == {str(SKIPPED)}
    assert cells["counts"]["skipped"] == len(grid) - len(meets)
    queue.close()

    ref, out = _output(tmp_path, "full"), _output(tmp_path, "masked")
    assert np.array_equal(out[..., :TISSUE_X], ref[..., :TISSUE_X])   # blending exact too
    assert not out[..., TISSUE_X:].any()
    assert ref[..., TISSUE_X:EMPTY_X].any()
    down = Volume(f"file://{tmp_path}/masked", 1)       # the pyramid over unwritten chunks
    assert not down.read(down.bounds)[..., TISSUE_X // 2:].any()


@pytest.mark.parametrize("blend", ["crop", "overlap"])
def test_skip_empty_skips_tasks_whose_input_is_all_one_value(tmp_path, layers, blend,
                                                             voxflow_home):
    full = run(_config(tmp_path, "full", blend))
    config = _config(tmp_path, "skipping", blend, skip_empty=True)
    grid = plan(config).grid
    empty = {i for i in range(len(grid)) if grid.read_box(i).start[0] >= EMPTY_X}
    assert 0 < len(empty) < len(grid)

    summary = run(config)
    events = _done_events(voxflow_home, summary.run)
    assert sorted(e["index"] for e in events) == list(range(len(grid)))    # all acked
    assert {e["index"] for e in events if e["skipped"]} == empty
    assert summary.stages[0].empty == len(empty)
    queue = open_queue(config.queue.url)
    stats = queue.stats(summary.run)["inference"]
    assert (stats.done, stats.skipped) == (len(grid), len(empty))
    queue.close()

    ref, out = _output(tmp_path, "full"), _output(tmp_path, "skipping")
    by_skipped, by_run = np.zeros(ref.shape[1:], bool), np.zeros(ref.shape[1:], bool)
    for i in range(len(grid)):                          # overlap mode: boxes share bands
        (by_skipped if i in empty else by_run)[grid.box(i).zyx_slices()] = True
    computed, only_skipped = by_run & ~by_skipped, by_skipped & ~by_run
    assert computed.any() and only_skipped.any()
    assert np.array_equal(out[:, computed], ref[:, computed])
    assert not out[:, only_skipped].any() and ref[:, only_skipped].all()


@pytest.mark.parametrize("backend", ["sqlite", "pubsub"])
def test_a_skipped_ack_is_counted_apart_and_once(tmp_path, request, backend):
    q = open_queue(queue_url_for(backend, tmp_path, request), lease_seconds=30)
    q.register_run("r", "{}")
    q.publish("r", "inference", "inference", ((i, f"body-{i}") for i in range(4)))
    leases, deadline = [], time.monotonic() + 20
    while len(leases) < 4 and time.monotonic() < deadline:     # Pub/Sub may deliver in parts
        leases += q.pull(["inference"], 4 - len(leases), "w")
    assert sorted(lease.index for lease in leases) == [0, 1, 2, 3]
    q.ack(leases[0], skipped=True)
    q.ack(leases[1], skipped=True)
    q.ack(leases[1], skipped=True)                       # re-acked: counted once
    q.ack(leases[2])
    s = q.stats("r")["inference"]
    assert (s.done, s.skipped, s.leased, s.total) == (3, 2, 1, 4)
    q.heartbeat("r")                                     # Pub/Sub: the journal is compacted
    q.ack(leases[3], skipped=True)
    s = q.stats("r")["inference"]
    assert (s.done, s.skipped, s.open) == (4, 3, 0)
    q.heartbeat("r")
    assert q.stats("r")["inference"].skipped == 3
    q.close()


def test_a_bad_mask_is_refused_at_plan_naming_the_field(tmp_path, layers):
    with pytest.raises(ConfigError, match=r"^mask\.layer: no precomputed layer"):
        plan(_config(tmp_path, "o", "crop", mask={"layer": "nothing-here"}))
    with pytest.raises(ConfigError, match=r"^mask\.mip: 3 is not a mip of the mask layer"):
        plan(_config(tmp_path, "o", "crop", mask={"layer": "mask", "mip": 3}))
    small = np.full((1, 16, 64, 64), 255, np.uint8)         # half the input's width
    make_layer(tmp_path / "small", small, chunk=(16, 16, 8))
    with pytest.raises(ConfigError, match=r"^mask\.layer: .* covers .* needs"):
        plan(_config(tmp_path, "o", "crop", mask={"layer": "small"}))
    with pytest.raises(ConfigError, match=r"^mask\.layer"):
        _config(tmp_path, "o", "crop", mask={"layer": ""})


def test_pubsub_counts_skipped_tasks_for_one_get_per_poll(pubsub_url_for_mask):
    """Skipped tasks are journalled beside the done ones (one listing) and compacted into
    one record: a poll of a stage with skipped tasks costs one request more, not one per
    task."""
    from voxflow.storage import RequestCounter
    q = open_queue(pubsub_url_for_mask, lease_seconds=30)
    q.register_run("r", "{}")
    q.publish("r", "inference", "inference", ((i, f"body-{i}") for i in range(40)))
    leases, deadline = [], time.monotonic() + 20
    while len(leases) < 40 and time.monotonic() < deadline:
        leases += q.pull(["inference"], 40 - len(leases), "w")
    for lease in leases[:20]:
        q.ack(lease)
    for lease in leases[20:]:
        q.ack(lease, skipped=True)
    q.heartbeat("r")
    calls = RequestCounter(q.ledger)
    s = q.stats("r")["inference"]
    assert (s.done, s.skipped) == (40, 20)
    # 7 without skipped tasks (tests/test_queue.py): stages, record, leases, journal,
    # compact + GET, dead; + the skipped record's GET
    assert calls.count == 8, calls.count
    q.close()


@pytest.fixture
def pubsub_url_for_mask(request, tmp_path):
    return queue_url_for("pubsub", tmp_path, request)
