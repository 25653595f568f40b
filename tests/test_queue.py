"""TaskQueue behaviour, one suite run against every backend: SQLite, and Pub/Sub through an
emulator on 127.0.0.1 (tests/pubsub_emulator.py) with its ledger on a local disk.

Pub/Sub deadlines are whole seconds, so lease times here are too."""
import multiprocessing as mp
import random
import time

import pytest

from voxflow.geometry import Box
from voxflow.messages import MalformedMessage, decode, encode
from voxflow.queues import open_queue
from voxflow.queues.pubsub import Ranges

from conftest import queue_url_for


@pytest.fixture(params=["sqlite", "pubsub"])
def queue_url(request, tmp_path):
    return queue_url_for(request.param, tmp_path, request)


@pytest.fixture
def queue(queue_url):
    q = open_queue(queue_url, lease_seconds=30, max_attempts=3)
    q.register_run("run-a", "{}")
    yield q
    q.close()


def _publish(q, n, run="run-a", stage="inference", kind="inference"):
    return q.publish(run, stage, kind, ((i, f"body-{i}") for i in range(n)))


def test_publish_is_idempotent_and_counted(queue):
    assert _publish(queue, 1000) == 1000
    assert _publish(queue, 1200) == 200               # only the new indices
    s = queue.stats("run-a")["inference"]
    assert (s.pending, s.leased, s.done, s.dead, s.total) == (1200, 0, 0, 0, 1200)


def test_pull_leases_distinct_tasks(queue):
    _publish(queue, 10)
    first = queue.pull(["inference"], 4, "w1")
    second = queue.pull(["inference"], 10, "w2")
    assert len(first) == 4 and len(second) == 6
    assert {l.index for l in first}.isdisjoint({l.index for l in second})
    assert all(l.attempt == 1 and l.body == f"body-{l.index}" for l in first + second)
    assert queue.pull(["inference"], 1, "w3") == []
    assert queue.stats("run-a")["inference"].leased == 10
    assert queue.busy_workers("inference") == {"w1", "w2"}


def test_expired_lease_is_redelivered_and_extend_keeps_it(queue):
    _publish(queue, 2)
    a, b = queue.pull(None, 2, "w1", lease_seconds=1)
    assert queue.extend(a, 5.0)
    time.sleep(1.3)
    again = queue.pull(None, 5, "w2")
    assert [l.index for l in again] == [b.index] and again[0].attempt == 2
    assert not queue.extend(b)                        # b's lease was lost to w2
    assert queue.extend(a)


def test_ack_records_done_once(queue):
    _publish(queue, 3)
    leases = queue.pull(None, 3, "w")
    queue.ack(leases[0])
    queue.ack(leases[0])                              # duplicate ack: harmless
    queue.ack_many(leases[1:])
    s = queue.stats("run-a")["inference"]
    assert (s.pending, s.leased, s.done) == (0, 0, 3)
    assert _publish(queue, 3) == 0                    # republishing keeps them done
    assert queue.pull(None, 1, "w") == []


def test_nack_retries_then_dead_letters_with_error(queue):
    _publish(queue, 1)
    for attempt in (1, 2, 3):
        (lease,) = queue.pull(None, 1, "w")
        assert lease.attempt == attempt
        queue.nack(lease, f"ValueError: boom {attempt}")
    assert queue.pull(None, 1, "w") == []
    s = queue.stats("run-a")["inference"]
    assert (s.pending, s.dead) == (0, 1)
    (dead,) = queue.dead_letters("run-a")
    assert (dead.index, dead.attempts, dead.error) == (0, 3, "ValueError: boom 3")
    assert queue.retry_dead("run-a") == 1
    (lease,) = queue.pull(None, 1, "w")
    assert lease.attempt == 1


def test_release_returns_at_once_without_counting(queue):
    _publish(queue, 1)
    for _ in range(5):                                # more than max_attempts releases
        (lease,) = queue.pull(None, 1, "w")
        assert lease.attempt == 1
        queue.release(lease)
    assert queue.stats("run-a")["inference"].pending == 1


def test_lost_worker_counts_as_attempt(queue):
    """A task whose worker dies every time (lease expires) still ends in dead letters."""
    _publish(queue, 1)
    for _ in range(3):
        assert len(queue.pull(None, 1, "w", lease_seconds=1)) == 1
        time.sleep(1.2)
    assert queue.pull(None, 1, "w") == []
    (dead,) = queue.dead_letters("run-a")
    assert "lease expired 3 times" in dead.error


def test_runs_and_kinds_are_namespaced(queue):
    queue.register_run("run-b", "{}")
    _publish(queue, 5, run="run-a")
    _publish(queue, 5, run="run-b")
    queue.publish("run-b", "downsample-0", "downsample", ((i, "d") for i in range(3)))
    down = queue.pull(["downsample"], 10, "cpu")
    assert {(l.run, l.stage) for l in down} == {("run-b", "downsample-0")} and len(down) == 3
    queue.ack_many(down)
    leases = queue.pull(["inference"], 10, "gpu")
    assert {l.run for l in leases} == {"run-a", "run-b"} and len(leases) == 10
    queue.ack_many([l for l in leases if l.run == "run-a"])
    assert queue.stats("run-a")["inference"].done == 5
    assert queue.stats("run-b") == {
        "inference": type(queue.stats("run-b")["inference"])(0, 5, 0, 0),
        "downsample-0": type(queue.stats("run-b")["inference"])(0, 0, 3, 0)}


def test_run_params_are_stored(queue):
    queue.register_run("run-c", '{"x": 1}')
    assert queue.run_params("run-c") == '{"x": 1}'
    with pytest.raises(KeyError):
        queue.run_params("nope")


def _drain(url, worker, out):
    q = open_queue(url)
    got = []
    while True:
        leases = q.pull(None, 1, worker)
        if not leases:
            break
        q.ack(leases[0])
        got.append(leases[0].index)
    out.put(got)


def test_processes_share_one_file_each_task_delivered_once(queue, queue_url):
    _publish(queue, 2000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(queue_url, f"p{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    everything = [i for r in results for i in r]
    assert sorted(everything) == list(range(2000))    # every task once, none twice
    assert sum(1 for r in results if r) >= 2          # they really did share the work
    assert queue.stats("run-a")["inference"].done == 2000


def test_messages_round_trip_and_refuse_garbage():
    body = encode("run-a", "inference", 7, Box([1, 2, 3], [4, 5, 6]))
    msg = decode(body)
    assert (msg.run, msg.stage, msg.index, msg.bbox) == ("run-a", "inference", 7,
                                                         Box([1, 2, 3], [4, 5, 6]))
    for bad in ("not json", '{"v": 2, "run": "r", "stage": "s", "index": 1, '
                '"box": [[0,0,0],[1,1,1]]}', body.replace('"index":7', '"index":-1'),
                body[:-1] + ',"exec":"rm -rf /"}'):
        with pytest.raises(MalformedMessage):
            decode(bad)


def test_ranges_hold_any_set_of_indices():
    """The Pub/Sub stage record keeps published indices as ranges; any insertion order."""
    rng = random.Random(0)
    for _ in range(200):
        ranges, reference = Ranges([]), set()
        for _ in range(60):
            i = rng.randrange(40)
            ranges.add(i)
            reference.add(i)
        assert ranges.total == len(reference)
        assert all((i in ranges) == (i in reference) for i in range(-2, 45))
        assert all(a[1] < b[0] for a, b in zip(ranges.ranges, ranges.ranges[1:]))
