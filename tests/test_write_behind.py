"""The worker's pipeline: the next task computes while the previous one writes, a task is
acked only after its writes, a failed write is retried, and a stop loses nothing."""
import json
import threading
import time

import pytest

from voxflow.geometry import Box
from voxflow.messages import encode
from voxflow.queues import open_queue
from voxflow.worker import WRITE_GRACE_SECONDS, JsonLog, Worker


class _SlowWrites:
    """A stage whose compute and writes take fixed times (writes as to a slow store), and
    which records when each phase of each task starts and ends, and how many tasks the
    queue counted done when each write began."""

    name = kind = "inference"

    def __init__(self, queue, compute_s, write_s, fail_first_write_of=None, block=None):
        self.queue = queue
        self.compute_s, self.write_s = compute_s, write_s
        self.fail_first_write_of = fail_first_write_of
        self.block = block                      # an Event a write waits for, if given
        self.events = []                        # (time, phase, index)
        self.done_when_write_began = {}
        self._failed = False

    def box(self, index):
        return Box([index, 0, 0], [index + 1, 1, 1])

    def load(self, index):
        return index

    def compute(self, index, loaded):
        self.events.append((time.monotonic(), "compute_start", index))
        time.sleep(self.compute_s)
        return index

    def write(self, index, computed):
        assert computed == index
        self.done_when_write_began[index] = self.queue.stats("r")["inference"].done
        self.events.append((time.monotonic(), "write_start", index))
        if self.block is not None:
            self.block.wait()
        time.sleep(self.write_s)
        if index == self.fail_first_write_of and not self._failed:
            self._failed = True
            raise OSError("the store refused the write")
        self.events.append((time.monotonic(), "write_end", index))

    def when(self, phase, index):
        return next(t for t, p, i in self.events if p == phase and i == index)


def _queue(tmp_path, n):
    q = open_queue(f"sqlite://{tmp_path}/q.db")
    q.register_run("r", "{}")
    q.publish("r", "inference", "inference",
              ((i, encode("r", "inference", i, Box([i, 0, 0], [i + 1, 1, 1]))) for i in range(n)))
    return q


def _worker(q, stage, tmp_path, wid="w"):
    log = open(tmp_path / f"{wid}.log", "a")
    return Worker(q, lambda run, name: stage, ["inference"], wid, log=JsonLog(wid, log))


def _log(tmp_path, wid="w"):
    return [json.loads(line) for line in open(tmp_path / f"{wid}.log")]


def test_the_next_compute_starts_before_the_previous_writes_end_and_acks_follow_writes(
        tmp_path):
    n, compute_s, write_s = 5, 0.15, 0.3
    q = _queue(tmp_path, n)
    stage = _SlowWrites(q, compute_s, write_s)
    worker = _worker(q, stage, tmp_path)
    t0 = time.monotonic()
    assert worker.run(exit_when_idle=0.0) == n
    elapsed = time.monotonic() - t0
    worker.shutdown()
    assert q.stats("r")["inference"].done == n
    order = sorted(range(n), key=lambda i: stage.when("compute_start", i))
    for a, b in zip(order, order[1:]):          # b computes while a writes
        assert stage.when("compute_start", b) < stage.when("write_end", a)
    # acks only after writes: when a task's write begins, exactly the tasks whose writes
    # already ended are done (one write at a time), never the task itself
    for k, i in enumerate(order):
        assert stage.done_when_write_began[i] == k
    assert elapsed < 0.8 * n * (compute_s + write_s), elapsed      # serial would be the sum
    assert elapsed >= n * write_s                                   # the writer is the limit


def test_a_full_writer_makes_compute_wait_rather_than_queue(tmp_path):
    """Writes slower than compute: at most one computed task waits for the writer, so a
    compute never starts while another computed task is still waiting."""
    n = 5
    q = _queue(tmp_path, n)
    stage = _SlowWrites(q, 0.02, 0.25)
    worker = _worker(q, stage, tmp_path)
    assert worker.run(exit_when_idle=0.0) == n
    worker.shutdown()
    order = sorted(range(n), key=lambda i: stage.when("compute_start", i))
    for a, c in zip(order, order[2:]):          # task c computes only once a was written
        assert stage.when("compute_start", c) >= stage.when("write_end", a)


def test_a_failed_write_fails_the_task_which_is_retried_never_acked(tmp_path):
    n = 4
    q = _queue(tmp_path, n)
    stage = _SlowWrites(q, 0.01, 0.01, fail_first_write_of=2)
    worker = _worker(q, stage, tmp_path)
    worker.run(exit_when_idle=0.5)
    worker.shutdown()
    assert q.stats("r")["inference"].done == n
    log = _log(tmp_path)
    failed = [e for e in log if e["event"] == "task_failed"]
    assert [(e["index"], e["attempt"]) for e in failed] == [(2, 1)]
    assert "the store refused the write" in failed[0]["error"]
    done = {e["index"]: e["attempt"] for e in log if e["event"] == "task_done"}
    assert done == {0: 1, 1: 1, 2: 2, 3: 1}       # acked once, after the write that worked


def _run_in_thread(worker):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("done", worker.run()),
                              daemon=True)
    thread.start()
    return thread, result


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("write_finishes", [True, False])
def test_a_stop_during_a_write_acks_it_only_if_it_finishes_and_releases_the_rest(
        tmp_path, write_finishes):
    n = 3
    q = _queue(tmp_path, n)
    block = threading.Event()
    stage = _SlowWrites(q, 0.05, 0.2 if write_finishes else 0.0, block=block)
    worker = _worker(q, stage, tmp_path)
    if write_finishes:
        block.set()                              # a 0.2 s write: within the grace
    thread, result = _run_in_thread(worker)
    _until(lambda: any(p == "write_start" for _, p, _ in stage.events), 10, "a write")
    _until(lambda: q.stats("r")["inference"].leased >= 2, 10, "the next task to compute")
    t0 = time.monotonic()
    worker.stop.set()
    thread.join(WRITE_GRACE_SECONDS + 2)
    stopped = time.monotonic() - t0
    assert not thread.is_alive()
    s = q.stats("r")["inference"]
    assert s.leased == 0                         # every lease given back, none lost
    if write_finishes:
        written = sum(p == "write_end" for _, p, _ in stage.events)
        assert stopped < 1.0 and result["done"] == s.done == written >= 1
        assert s.pending == n - written
    else:                                        # never acked half-written
        assert stopped < WRITE_GRACE_SECONDS + 1 and s.done == 0 and s.pending == n
    block.set()
    worker.shutdown()
    # released, not failed: another worker takes the rest at once, no attempt was spent
    rest = _SlowWrites(q, 0.0, 0.0)
    other = _worker(q, rest, tmp_path, "w2")
    other.run(exit_when_idle=0.0)
    other.shutdown()
    assert q.stats("r")["inference"].done == n
    assert all(e["attempt"] == 1 for e in _log(tmp_path, "w2") if e["event"] == "task_done")
