"""TaskQueue behaviour, one suite run against every backend: SQLite, and Pub/Sub through an
emulator on 127.0.0.1 (tests/pubsub_emulator.py) with its ledger on a local disk.

Pub/Sub deadlines are whole seconds, so lease times here are too."""
import json
import multiprocessing as mp
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from voxflow.geometry import Box
from voxflow.messages import MalformedMessage, decode, encode
from voxflow.queues import RunState, StageStats, open_queue
from voxflow.queues.pubsub import Ranges, run_token
from voxflow.storage import RequestCounter

from conftest import queue_url_for


@pytest.fixture(params=["sqlite", "pubsub"])
def queue_url(request, tmp_path):
    return queue_url_for(request.param, tmp_path, request)


@pytest.fixture
def pubsub_url(request, tmp_path):
    return queue_url_for("pubsub", tmp_path, request)


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


# -- run state ---------------------------------------------------------------------------
def test_run_state_follows_register_heartbeat_and_end(queue):
    assert queue.run_state("run-x") is None
    t0 = time.time()
    queue.register_run("run-x", '{"p": 1}', meta={"model": "sha256:abc"})
    first = queue.run_state("run-x")
    assert first.state == "active" and first.meta == {"model": "sha256:abc"}
    assert t0 <= first.heartbeat <= time.time()
    queue.end_run("run-x", "cancelled")
    assert queue.run_state("run-x") == RunState("cancelled", first.heartbeat,
                                                {"model": "sha256:abc"})
    time.sleep(0.01)
    assert queue.heartbeat("run-x") == []             # a live driver owns the run again
    again = queue.run_state("run-x")
    assert again.state == "active" and again.heartbeat > first.heartbeat
    queue.end_run("run-x", "succeeded")
    queue.register_run("run-x", '{"p": 2}')           # re-registering: active, new identity
    assert (queue.run_state("run-x").state, queue.run_state("run-x").meta) == ("active", {})
    with pytest.raises(ValueError):
        queue.end_run("run-x", "paused")
    for call in (lambda: queue.heartbeat("nope"), lambda: queue.end_run("nope", "failed")):
        with pytest.raises(KeyError):
            call()
    _publish(queue, 3, run="run-x")
    queue.forget_run("run-x")                          # tasks go, the registration stays
    assert queue.run_state("run-x").state == "active"
    assert queue.run_params("run-x") == '{"p": 2}' and "run-x" in queue.runs()


def test_sqlite_file_from_before_run_state_is_migrated(tmp_path):
    """A queue file written before runs had state, heartbeat and meta: read-only it reads
    as it is, opened for writing it gains the columns; its runs read as active since
    registration."""
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (run TEXT PRIMARY KEY, params TEXT NOT NULL, "
               "max_attempts INTEGER NOT NULL, created REAL NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO runs VALUES ('old', '{}', 3, 1000.0)")
    db.commit()
    db.close()
    old = RunState("active", 1000.0, {})
    ro = open_queue(f"sqlite://{path}", readonly=True)
    assert ro.run_state("old") == old and ro.runs() == ["old"]
    ro.close()
    def columns():
        db = sqlite3.connect(path)
        try:
            return [r[1] for r in db.execute("PRAGMA table_info(runs)")]
        finally:
            db.close()
    assert columns() == ["run", "params", "max_attempts", "created"]
    q = open_queue(f"sqlite://{path}")
    assert columns()[4:] == ["state", "heartbeat", "meta"]
    assert q.run_state("old") == old
    q.end_run("old", "failed")
    assert q.run_state("old") == RunState("failed", 1000.0, {})
    q.register_run("new", "{}", meta={"k": [1]})
    assert q.run_state("new").meta == {"k": [1]} and q.runs() == ["old", "new"]
    q.close()


def test_pubsub_run_registered_before_state_objects_reads_active(pubsub_url):
    q = open_queue(pubsub_url)
    q.register_run("run-a", "{}")
    created = json.loads(q.ledger.get(f"runs/{run_token('run-a')}.json"))["created"]
    q.ledger.delete([f"state/{run_token('run-a')}.json"])     # as an older voxflow left it
    assert q.run_state("run-a") == RunState("active", created, {})
    q.end_run("run-a", "failed")
    assert q.run_state("run-a").state == "failed"
    q.close()


# -- Pub/Sub retention -------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _drain_all(q):
    while leases := q.pull(None, 10, "w"):
        q.ack_many(leases)


def test_short_retention_stage_still_drains(pubsub_url):
    """Messages older than retention vanish while the stage record says they were sent: the
    heartbeat names the stage before that, and publishing it again re-sends what is open."""
    from google.pubsub_v1.types import Subscription
    clock = FakeClock()
    q = open_queue(pubsub_url, lease_seconds=30, retention_seconds=600, clock=clock)
    q.register_run("run-a", "{}")
    sent = []
    create = q.subscriber.create_subscription
    q.subscriber.create_subscription = lambda request: sent.append(request) or create(
        request=request)
    assert _publish(q, 20) == 20
    for request in sent:                    # the emulator drops both fields: check the request
        pb = Subscription.pb(Subscription(request))
        assert pb.message_retention_duration.seconds == 600
        assert pb.HasField("expiration_policy") and not pb.expiration_policy.HasField("ttl")
    assert sorted(r["name"].rsplit("-", 1)[-1] for r in sent) == ["dead", "inference"]
    q.ack_many(q.pull(None, 5, "w"))
    assert q.heartbeat("run-a") == []

    rid = q.resource("run-a", "inference", "inference")      # the rest expire unseen
    q.subscriber.seek(request={"subscription": f"projects/test-project/subscriptions/{rid}",
                               "time": datetime.now(timezone.utc) + timedelta(minutes=1)})
    assert q.pull(None, 20, "w") == []
    assert q.stats("run-a")["inference"].pending == 15
    assert _publish(q, 20) == 0                       # within retention: taken as queued

    clock.now += 600 - 60                             # the republish margin: 10% of 600 s
    assert q.heartbeat("run-a") == []
    clock.now += 1
    assert q.heartbeat("run-a") == ["inference"]
    assert _publish(q, 20) == 15                      # every task neither done nor dead
    assert q.heartbeat("run-a") == []                 # queued_at is fresh again
    _drain_all(q)
    s = q.stats("run-a")["inference"]
    assert (s.done, s.dead, s.open) == (20, 0, 0)
    clock.now += 600
    assert q.heartbeat("run-a") == []                 # nothing open: nothing to republish
    q.close()


# -- done wins over dead -----------------------------------------------------------------
def test_late_success_after_lost_lease_counts_done_not_dead(queue_url):
    q = open_queue(queue_url, lease_seconds=30, max_attempts=1)
    q.register_run("run-a", "{}")
    _publish(q, 2)
    slow, other = q.pull(None, 2, "w1", lease_seconds=1)
    q.ack(other)
    time.sleep(1.3)
    assert q.pull(None, 1, "w2") == []                # the redelivery is counted dead ...
    assert q.stats("run-a")["inference"].dead == 1
    q.ack(slow)                                       # ... but its first worker finishes
    s = q.stats("run-a")["inference"]
    assert (s.done, s.dead, s.open) == (2, 0, 0)
    assert q.dead_letters("run-a") == [] and q.retry_dead("run-a") == 0
    assert q.pull(None, 1, "w2") == []
    q.close()


def test_late_success_after_dead_letter_backstop_counts_done(pubsub_url):
    """Pub/Sub's dead-letter policy forwards a message delivered too often (the emulator
    ignores the policy, so it is forwarded by hand); the heartbeat records it dead; the
    worker that still held it acks it: done, not dead."""
    q = open_queue(pubsub_url, lease_seconds=30, max_attempts=3)
    q.register_run("run-a", "{}")
    _publish(q, 3)
    (lease,) = q.pull(None, 1, "w")
    _forward_to_dead_letter_topic(q, lease)
    assert q.stats("run-a")["inference"].dead == 0    # stats does not drain
    assert q.heartbeat("run-a") == []
    assert q.stats("run-a")["inference"].dead == 1
    assert [d.index for d in q.dead_letters("run-a")] == [lease.index]
    q.ack(lease)
    s = q.stats("run-a")["inference"]
    assert (s.done, s.dead, s.pending) == (1, 0, 2)
    assert q.dead_letters("run-a") == [] and q.retry_dead("run-a") == 0
    # retry_dead dropped the superseded dead marker
    assert list(q.ledger.list(f"data/{run_token('run-a')}/dead/")) == []
    _drain_all(q)
    assert q.stats("run-a")["inference"].done == 3
    q.close()


def _forward_to_dead_letter_topic(q, lease) -> None:
    rid = q.resource(lease.run, lease.stage, "inference")
    q.publisher.publish(f"projects/test-project/topics/{rid}-dead", lease.body.encode(),
                        run=lease.run, stage=lease.stage, kind="inference",
                        index=str(lease.index)).result()


# -- reads that change nothing -----------------------------------------------------------
def _stored(q) -> dict[str, bytes]:
    """What the queue keeps on disk: the SQLite file and its WAL (not the shared-memory
    index, where readers take read marks), or the Pub/Sub ledger."""
    root = q.path.parent if hasattr(q, "path") else Path(q.ledger.url[len("file://"):])
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith("-shm")}


def test_reads_change_nothing(queue, queue_url):
    _publish(queue, 1)
    for _ in range(3):
        queue.nack(queue.pull(None, 1, "w")[0], "boom")
    _publish(queue, 4)
    (held,) = queue.pull(None, 1, "w")
    pubsub = queue_url.startswith("pubsub")
    if pubsub:                                        # waiting in the dead-letter subscription
        _forward_to_dead_letter_topic(queue, held)
    before = _stored(queue)
    reader = open_queue(queue_url)
    for q in (queue, reader):
        assert q.stats("run-a") == {"inference": StageStats(2, 1, 0, 1)}
        assert [d.error for d in q.dead_letters("run-a")] == ["boom"]
        assert q.runs() == ["run-a"] and q.run_params("run-a") == "{}"
        assert q.run_state("run-a").state == "active" and q.run_state("nope") is None
        assert q.busy_workers() == {"w"}
    assert _stored(queue) == before
    queue.heartbeat("run-a")
    assert queue.stats("run-a")["inference"].dead == (2 if pubsub else 1)
    reader.close()


def test_readonly_queue_reads_and_refuses_writes(queue, queue_url):
    _publish(queue, 3)
    queue.ack(queue.pull(None, 1, "w")[0])
    before = _stored(queue)
    ro = open_queue(queue_url, readonly=True, retention_seconds=600)
    assert ro.stats("run-a") == queue.stats("run-a") and ro.run_state("run-a").state == "active"
    for write in (lambda: ro.register_run("run-b", "{}"), lambda: ro.heartbeat("run-a"),
                  lambda: ro.end_run("run-a", "failed"), lambda: ro.pull(None, 1, "w"),
                  lambda: _publish(ro, 1, stage="other"), lambda: ro.retry_dead("run-a"),
                  lambda: ro.forget_run("run-a"), lambda: ro.finish("run-a")):
        with pytest.raises(PermissionError, match="read-only"):
            write()
    ro.close()
    assert _stored(queue) == before
    assert set(queue.stats("run-a")) == {"inference"}


def test_readonly_sqlite_on_a_missing_file_creates_nothing(tmp_path):
    path = tmp_path / "nowhere" / "queue.db"
    with pytest.raises(FileNotFoundError, match=str(path)):
        open_queue(f"sqlite://{path}", readonly=True)
    assert list(tmp_path.iterdir()) == []


# -- pulling for some runs ---------------------------------------------------------------
def test_pull_serves_chosen_runs_and_skips_given_up_ones(queue):
    for run in ("run-a", "run-b", "run-c"):
        queue.register_run(run, "{}")
        _publish(queue, 4, run=run)
    got = queue.pull(["inference"], 10, "w", runs={"run-b"})
    assert {l.run for l in got} == {"run-b"} and len(got) == 4
    assert queue.pull(None, 10, "w", runs=["run-a"], skip_runs=["run-a"]) == []
    assert queue.pull(None, 10, "w", runs=[]) == []
    got = queue.pull(None, 10, "w", skip_runs=("run-a",))
    assert {l.run for l in got} == {"run-c"} and len(got) == 4
    got = queue.pull(None, 10, "w", runs=["run-a", "nope"])
    assert {l.run for l in got} == {"run-a"} and len(got) == 4


def test_sqlite_pull_for_a_run_skips_another_runs_backlog(tmp_path):
    """100 000 pending tasks of another run of the same kind lie ahead in the (kind, due)
    index; a pull for one run, or skipping that one, still reads only a few index rows."""
    q = open_queue(f"sqlite://{tmp_path}/queue.db")
    q.publish("big", "inference", "inference", ((i, "b") for i in range(100_000)))
    q.publish("small", "inference", "inference", ((i, "s") for i in range(10)))
    steps = []
    q._db.set_progress_handler(lambda: steps.append(1) and 0, 100)  # every 100 VM steps
    for pull in (dict(runs=["small"]), dict(skip_runs=["big"])):
        steps.clear()
        (lease,) = q.pull(["inference"], 1, "w", **pull)
        assert lease.run == "small" and len(steps) < 20, (pull, len(steps))
    q.close()


# -- Pub/Sub progress: journal and compact records ---------------------------------------
def _progress_objects(q, run="run-a", stage="inference") -> tuple[int, int]:
    """How many journal entries and compact records the stage has."""
    return tuple(len(list(q.ledger.list(q.ledger.prefix(run, what, stage))))
                 for what in ("journal", "compact"))


def test_pubsub_counts_exactly_under_redelivery_and_a_lost_ack(pubsub_url):
    """One task acked by two workers (its lease expired while the first still worked), one
    recorded done by a worker killed before it acknowledged (redelivered, acknowledged on
    sight): each counted once, before and after compaction."""
    q = open_queue(pubsub_url, lease_seconds=30, max_attempts=3)
    q.register_run("run-a", "{}")
    _publish(q, 3)
    slow, killed = q.pull(None, 2, "w1", lease_seconds=1)
    q.ledger.mark_done([(killed.run, killed.stage, killed.index)])   # what ack writes first
    time.sleep(1.3)                                   # ... then w1 is gone: no acknowledge
    again = q.pull(None, 3, "w2")
    assert {l.index for l in again} == {0, 1, 2} - {killed.index}
    q.ack(next(l for l in again if l.index == slow.index))
    assert q.stats("run-a")["inference"] == StageStats(0, 1, 2, 0)
    assert q.heartbeat("run-a") == [] and _progress_objects(q) == (0, 1)
    q.ack(slow)                                       # the first worker finishes after all
    assert _progress_objects(q) == (1, 1)             # journaled again, already compacted
    assert q.stats("run-a")["inference"] == StageStats(0, 1, 2, 0)
    q.ack(next(l for l in again if l.index != slow.index))
    q.heartbeat("run-a")
    assert q.stats("run-a")["inference"] == StageStats(0, 0, 3, 0)
    assert _progress_objects(q) == (0, 1) and _publish(q, 3) == 0
    q.close()


def test_pubsub_interrupted_compaction_loses_nothing_and_counts_nothing_twice(pubsub_url):
    """Compactions killed after writing their record, before deleting what it folded: the
    leftovers (journal entries, older records) overlap the new record, and stats still
    count each task once; the next compaction cleans up."""
    q = open_queue(pubsub_url, lease_seconds=30)
    q.register_run("run-a", "{}")
    _publish(q, 10)
    delete = q.ledger.delete

    def killed(keys):
        keys = list(keys)
        if any("/journal/" in k or "/compact/" in k for k in keys):
            raise OSError("killed")
        delete(keys)
    q.ledger.delete = killed
    for n, objects in ((4, (4, 1)), (3, (7, 2))):
        q.ack_many(q.pull(None, n, "w"))
        with pytest.raises(OSError, match="killed"):
            q.heartbeat("run-a")
        assert _progress_objects(q) == objects
        assert q.stats("run-a")["inference"].done == objects[0]
    q.ledger.delete = delete
    assert q.heartbeat("run-a") == [] and _progress_objects(q) == (0, 1)
    assert q.stats("run-a")["inference"] == StageStats(3, 0, 7, 0)
    q.close()


def test_pubsub_racing_compactions_lose_nothing(pubsub_url):
    """Two drivers of one run heartbeat at once: A reads the journal, B acks more, compacts
    and deletes the entries it folded, then A writes its (older) union. Records are never
    overwritten, so B's survives, and the next compaction merges both."""
    a, b = open_queue(pubsub_url), open_queue(pubsub_url)
    b.register_run("run-a", "{}")
    _publish(b, 6)
    b.ack_many(b.pull(None, 2, "w"))
    reached, go = threading.Event(), threading.Event()
    put = a.ledger.put

    def paused(key, data):
        if "/compact/" in key:
            reached.set()
            go.wait(30)
        put(key, data)
    a.ledger.put = paused
    with ThreadPoolExecutor(1) as pool:
        beat = pool.submit(a.heartbeat, "run-a")
        assert reached.wait(30)
        b.ack_many(b.pull(None, 2, "w"))
        b.heartbeat("run-a")
        assert _progress_objects(b) == (0, 1)
        go.set()
        beat.result()
    assert _progress_objects(b) == (0, 2)
    assert b.stats("run-a")["inference"] == StageStats(2, 0, 4, 0)
    b.heartbeat("run-a")
    assert _progress_objects(b) == (0, 1)
    assert a.stats("run-a")["inference"] == StageStats(2, 0, 4, 0)
    a.close()
    b.close()


def test_pubsub_stats_cost_a_few_storage_calls_whatever_the_task_count(pubsub_url):
    """20 000 done tasks, compacted by a heartbeat: a poll costs 7 storage requests. Counting
    the done markers (the design before the journal) lists 20 pages for them alone."""
    n = 20_000
    q = open_queue(pubsub_url)
    q.register_run("run-a", "{}")
    token = run_token("run-a")
    q.ledger.put(f"data/{token}/stages/inference.json", json.dumps(
        {"kind": "inference", "tasks": [[0, n]], "queued": [[0, n]],
         "queued_at": time.time()}).encode())
    root = Path(q.ledger.url[len("file://"):]) / "data" / token
    for what in ("journal", "done"):       # what n acks leave (written straight to disk)
        (root / what / "inference").mkdir(parents=True)
        for i in range(n):
            (root / what / "inference" / str(i)).touch()
    q.heartbeat("run-a")
    calls = RequestCounter(q.ledger)
    assert q.stats("run-a") == {"inference": StageStats(0, 0, n, 0)}
    assert calls.count <= 8, calls.count  # 7: stages, record, leases, journal, compact + GET, dead
    q.close()


def test_worker_sessions_are_recorded_per_run(queue):
    """What a run's summary prices for workers on other machines (gce VMs, external)."""
    a = {"worker": "vm-1", "kind": "inference", "started": 10.0, "stopped": 20.0,
         "booted": 5.0, "busy_seconds": 7.5}
    queue.record_session("run-a", {**a, "stopped": 15.0})
    queue.record_session("run-a", a)                       # re-reported: replaces
    queue.record_session("run-a", {**a, "worker": "vm-2", "started": 8.0})
    queue.register_run("run-b", "{}")
    queue.record_session("run-b", {**a, "worker": "vm-3"})
    assert queue.sessions("run-a") == [{**a, "worker": "vm-2", "started": 8.0}, a]
    assert [s["worker"] for s in queue.sessions("run-b")] == ["vm-3"]
    assert queue.sessions("run-c") == []
