"""Storage faults (issue 15, item 1): gs:// runs through a fault proxy in front of a GCS
emulator of their own (`fault_proxy`): 503/429 answers, connection resets before and after a
request was served, added latency, a full outage and a restart of the emulator (its data on
disk, kept). Requests are retried by `voxflow.retry`'s one policy — each injected fault is
exactly one retry, none hidden in the libraries — and the runs' outputs equal the fault-free
runs' object for object, no task dead, the retries in the workers' logs. A request whose
budget is spent fails its task, which is not acked and is retried by the queue.

The outage lasts OUTAGE_SECONDS (8 s, not the issue's 30 s, for the suite's time), under the
default 60 s budget; delays are capped at 1 s here (default 8 s) for the same reason."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.api_core import exceptions as api_exceptions

from voxflow import retry
from voxflow.cli import main
from voxflow.config import load_config
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.storage import Storage
from voxflow.volume import Volume

from conftest import Pointwise, SmallConv, write_config
from fault_proxy import Emulator, FaultProxy

BUCKET = "voxflow-faults"
OUTAGE_SECONDS = 8.0
FAST = {"VOXFLOW_STORAGE_RETRY_INITIAL": "0.1", "VOXFLOW_STORAGE_RETRY_MAX": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Emulator (filesystem backend) behind a fault proxy; STORAGE_EMULATOR_HOST points at
    the proxy for the module (cloud-files' cached clients dropped on the way in and out);
    an input layer and two models written once."""
    import os
    from cloudfiles.interfaces import reset_connection_pools
    root = tmp_path_factory.mktemp("faults")
    emulator = Emulator(root / "gcs")
    proxy = FaultProxy(emulator.url, seed=15)
    emulator.external_url = proxy.url
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    emulator.start()
    try:
        proxy.start()
        emulator.create_bucket(BUCKET)
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
        reset_connection_pools()
        img = (np.random.default_rng(15).random((1, 12, 44, 72)) * 255).astype(np.uint8)
        url = f"gs://{BUCKET}/input"
        vol = Volume.create(url, num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                            voxel_offset=(3, 5, 1), size=(72, 44, 12), chunk=(16, 16, 4))
        vol.write(vol.bounds, img)
        torch.jit.script(Pointwise().eval()).save(str(root / "pointwise.pt"))
        torch.jit.script(SmallConv().eval()).save(str(root / "smallconv.pt"))
        yield dict(emulator=emulator, proxy=proxy, input=url, root=root, refs={})
    finally:
        proxy.stop()
        emulator.stop()
        if before is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before
        reset_connection_pools()


@pytest.fixture
def proxy(world):
    world["proxy"].clear()
    yield world["proxy"]
    world["proxy"].clear()


def _config(world, tmp_path: Path, mode: str, output: str, **extra) -> Path:
    model = "pointwise.pt" if mode == "crop" else "smallconv.pt"
    config = dict(input=world["input"], output=output, sharding="off",
                  model={"path": str(world["root"] / model), "input_patch": [16, 16, 8],
                         "output_channels": 2},
                  inference={"chunk": [32, 32, 8], "patch_overlap": [6, 6, 3],
                             "blend": mode},
                  storage_chunk=[16, 16, 4], downsample={"mips": 1 if mode == "overlap" else 0})
    config.update(extra)
    return write_config(tmp_path / f"{mode}-{output.rsplit('/', 1)[-1]}.yaml", **config)


def _layer(world, url: str) -> dict[str, bytes]:
    prefix = url.removeprefix(f"gs://{BUCKET}/") + "/"
    return world["emulator"].objects(BUCKET, prefix)


def _logs(home: Path, run: str) -> list[dict]:
    return [json.loads(line) for path in sorted((home / "logs" / run).glob("*.log"))
            for line in path.read_text().splitlines() if line.strip()]


def _reference(world, tmp_path: Path, mode: str) -> dict[str, bytes]:
    """The fault-free run's objects (through the proxy, no faults), computed once."""
    if mode not in world["refs"]:
        out = f"gs://{BUCKET}/ref-{mode}"
        before = world["proxy"].forwarded
        assert main(["run", str(_config(world, tmp_path, mode, out)), "--quiet",
                     "--run-id", f"ref-{mode}"]) == 0
        objects = _layer(world, out)
        assert _layer(world, out + ".voxflow-tmp") == {}
        world["refs"][mode] = (objects, world["proxy"].forwarded - before)
    return world["refs"][mode][0]


# -- the policy, request by request ----------------------------------------------------

def test_transient_errors_are_told_from_permanent_ones():
    import requests
    import urllib3
    for exc in (api_exceptions.ServiceUnavailable("x"), api_exceptions.TooManyRequests("x"),
                api_exceptions.InternalServerError("x"), api_exceptions.GatewayTimeout("x"),
                ConnectionResetError(), ConnectionRefusedError(), TimeoutError(),
                requests.ConnectionError(), requests.ReadTimeout(),
                urllib3.exceptions.ProtocolError("Connection aborted.")):
        assert retry.transient(exc), exc
    for exc in (api_exceptions.NotFound("x"), api_exceptions.Forbidden("x"),
                api_exceptions.BadRequest("x"), ValueError(), FileNotFoundError(),
                AttributeError(), retry.RetryBudgetExceeded("spent")):
        assert not retry.transient(exc), exc
    import random
    policy, r = retry.RetryPolicy(budget=60, initial=0.5, maximum=8), random.Random(0)
    for n, cap in ((1, 0.5), (2, 1), (3, 2), (5, 8), (9, 8)):
        d = [policy.delay(n, r) for _ in range(200)]
        assert cap / 2 <= min(d) and max(d) <= cap and max(d) - min(d) > cap / 4


def test_every_injected_fault_is_exactly_one_retry(world, proxy, monkeypatch):
    """503/429, resets before and after the request was served: each costs one retry, none is
    retried inside google-cloud-storage or cloud-files (the count would fall short), and
    every object reads back as written."""
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    store = Storage(f"gs://{BUCKET}/exact")
    blobs = {f"k/{i}": bytes([i]) * (100 + i) for i in range(30)}
    before, faults = retry.retry_count(), proxy.faults()
    # object requests only: a bucket's own metadata (GET /storage/v1/b/BUCKET, which
    # google-cloud-storage may make while listing) is retried inside that library
    proxy.set(error_rate=0.2, reset_rate=0.1, lost_rate=0.1,
              match=r"^\S+ /(upload/|download/)?storage/v1/b/[^/?]+/o")
    for key, blob in blobs.items():
        store.put(key, blob)
    got = {key: store.get(key) for key in blobs}
    listed = sorted(store.list("k/"))
    store.delete(["k/0", "k/1"])
    injected = proxy.faults() - faults
    proxy.clear()
    assert got == blobs and listed == sorted(blobs)
    assert store.get("k/0") is None and store.get("k/2") == blobs["k/2"]
    assert proxy.injected["503"] and proxy.injected["429"] and proxy.injected["reset"] \
        and proxy.injected["lost"]
    assert retry.retry_count() - before == injected >= 15


def test_permanent_errors_fail_at_once(world, proxy):
    store = Storage(f"gs://{BUCKET}/permanent")
    before, t0 = retry.retry_count(), time.monotonic()
    proxy.set(error_rate=1.0, statuses=(403,))
    with pytest.raises(api_exceptions.Forbidden):
        store.put("a", b"1")
    assert retry.retry_count() == before and time.monotonic() - t0 < 2
    proxy.clear()
    t0 = time.monotonic()          # a missing object's digest: None (cloud-files retried 7x)
    assert store.digest("never-written") is None and time.monotonic() - t0 < 2


def test_a_spent_budget_raises_naming_the_object(world, proxy, monkeypatch):
    monkeypatch.setenv("VOXFLOW_STORAGE_RETRY_SECONDS", "1.5")
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    store = Storage(f"gs://{BUCKET}/budget")
    seen = []

    def listener(**fields):
        seen.append(fields)
    retry.add_listener(listener)
    proxy.set(error_rate=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(retry.RetryBudgetExceeded, match=r"budget/key.*gave up after"):
            store.put("key", b"x")
    finally:
        retry.remove_listener(listener)
    spent = time.monotonic() - t0
    # no attempt starts after the budget; it gives up as soon as the next (jittered) pause
    # would pass it, so it may stop well before 1.5 s (seen: 0.94 s) — no lower bound
    assert spent <= 2.0, spent
    assert len(seen) >= 3 and all(f["op"] == "put_file" for f in seen)
    assert [f["attempt"] for f in seen] == list(range(1, len(seen) + 1))
    proxy.clear()
    assert store.get("key") is None                    # nothing half-written


# -- whole runs ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["crop", "overlap"])
def test_run_through_faults_equals_fault_free_run(world, proxy, tmp_path, voxflow_home,
                                                  monkeypatch, mode):
    """Error answers and resets all along, latency, an outage of OUTAGE_SECONDS once a
    quarter of the run's requests went through, a restart of the emulator at 60%."""
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    reference = _reference(world, tmp_path, mode)
    expected_requests = world["refs"][mode][1]
    out = f"gs://{BUCKET}/faulty-{mode}"
    cfg = _config(world, tmp_path, mode, out)
    emulator = world["emulator"]
    start, events, stop = proxy.forwarded, {}, threading.Event()

    def chaos():
        for name, share in (("outage", 0.25), ("restart", 0.6)):
            while proxy.forwarded - start < share * expected_requests:
                if stop.wait(0.02):
                    return
            events[name] = time.time()
            if name == "outage":
                proxy.down()
                time.sleep(OUTAGE_SECONDS)
                proxy.up()
            else:
                emulator.restart(down_seconds=1.0)
            events[name + "_end"] = time.time()
    thread = threading.Thread(target=chaos, daemon=True)
    before, restarts, faults = retry.retry_count(), emulator.restarts, proxy.faults()
    proxy.set(error_rate=0.08, reset_rate=0.03, lost_rate=0.03, latency=0.005)
    thread.start()
    try:
        code = main(["run", str(cfg), "--quiet", "--run-id", f"faulty-{mode}"])
        ended = time.time()
    finally:
        stop.set()
        thread.join()
        injected = proxy.faults() - faults
        proxy.clear()
    assert code == 0
    assert "restart_end" in events and events["restart_end"] < ended, events  # mid-run
    assert emulator.restarts == restarts + 1
    got = _layer(world, out)
    assert sorted(got) == sorted(reference) and len(got) > 10
    assert all(got[name] == reference[name] for name in reference)        # bit for bit
    assert _layer(world, out + ".voxflow-tmp") == {}
    stats = open_queue(load_config(cfg).queue.url).stats(f"faulty-{mode}")
    assert all(s.dead == 0 and s.pending == 0 and s.done > 0 for s in stats.values()), stats
    logs = _logs(voxflow_home, f"faulty-{mode}")
    logged = [e for e in logs if e["event"] == "storage_retry"]
    assert not [e for e in logs if e["event"] == "task_failed"]
    assert len(logged) == sum(e["storage_retries"] for e in logs
                              if e["event"] == "worker_stopped")
    outage = [e for e in logged if events["outage"] <= e["ts"] <= events["outage_end"] + 1
              and e["error"].startswith("ConnectionError")]
    assert outage, "no retry logged during the outage"
    assert retry.retry_count() - before >= injected > 0
    assert len(logged) >= injected * 0.5                   # most requests are the workers'


def test_a_spent_budget_fails_the_task_and_the_queue_retries_it(world, proxy, tmp_path,
                                                                 voxflow_home, monkeypatch):
    """Every upload of the output's chunks fails until a task has failed: that task's first
    attempt gives up after the budget (1.5 s here), is not acked, and a later attempt
    writes it; the output equals the fault-free run's."""
    monkeypatch.setenv("VOXFLOW_STORAGE_RETRY_SECONDS", "1.5")
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    reference = _reference(world, tmp_path, "crop")
    out = f"gs://{BUCKET}/budget-crop"
    cfg = _config(world, tmp_path, "crop", out, queue={"max_attempts": 5})
    run = "budget-crop"
    log_dir, stop = voxflow_home / "logs" / run, threading.Event()

    def clear_after_a_failure():
        while not stop.wait(0.02):
            if any('"task_failed"' in p.read_text() for p in log_dir.glob("*.log")):
                proxy.clear()
                return
    proxy.set(error_rate=1.0, match='"name": "' + re.escape("budget-crop/") + r"\d")
    watcher = threading.Thread(target=clear_after_a_failure, daemon=True)
    watcher.start()
    try:
        code = main(["run", str(cfg), "--quiet", "--run-id", run])
    finally:
        stop.set()
        watcher.join()
        proxy.clear()
    assert code == 0
    logs = _logs(voxflow_home, run)
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert failed and all("RetryBudgetExceeded" in e["error"] and "gave up after" in e["error"]
                          for e in failed), failed
    done = {e["index"]: e["attempt"] for e in logs if e["event"] == "task_done"}
    first = failed[0]
    assert first["attempt"] == 1 and done[first["index"]] > 1      # retried, then done
    for e in failed:                        # never acked on an attempt that failed
        assert done[e["index"]] > e["attempt"]
    stats = open_queue(load_config(cfg).queue.url).stats(run)
    assert stats["inference"].dead == 0 and stats["inference"].done == len(
        plan(load_config(cfg)).grid)
    got = _layer(world, out)
    assert sorted(got) == sorted(reference) and all(got[k] == reference[k] for k in got)
