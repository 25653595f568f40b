"""`pubsub://PROJECT/PREFIX?ledger=URL`: Google Cloud Pub/Sub carries the tasks; a run
ledger in object storage (gs://, file://) records what Pub/Sub cannot tell.

Pub/Sub delivers messages at least once with an ack deadline, but keeps no per-task state a
driver can read: no done count, no error text, no way to list dead tasks. So:

- **Pub/Sub** holds the open tasks. Per run and stage: a topic and a pull subscription named
  `PREFIX-KIND-RUN-HASH-STAGE` (created when the stage is published, deleted by `finish` /
  `forget_run`), ack deadline = the lease; leases are extended with modify_ack_deadline and
  released with deadline 0. Workers pull from every subscription of their kind (listed and
  cached a few seconds), or of the runs they serve (the run's token is in the name). A
  dead-letter topic `…-dead` with a subscription is the backstop: Pub/Sub forwards a message
  there after `max_delivery_attempts` deliveries (releases included), and `heartbeat` moves
  such messages into the ledger's dead letters.
- **Retention**: both subscriptions keep unacknowledged messages `retention_seconds` (at most
  Pub/Sub's 7 days) and never expire (Pub/Sub's default deletes a subscription inactive for
  31 days; one created before keeps what it was created with). A message older than
  retention is dropped unseen, while the stage record still says it was sent; so the record
  keeps when its messages were published (`queued_at`), `heartbeat` names the stages with
  open tasks that are about to reach retention (`republish_margin` ahead), and publishing
  such a stage re-sends every task neither done nor dead. The copies still in the
  subscription are duplicates, which are harmless: a redelivery of a finished task is
  acknowledged on pull.
- **The ledger** (`ledger.py`: its layout and why progress costs O(1) per poll) holds the
  run's parameters and state, one done marker per finished task (how a redelivery is
  recognised) plus a journal compacted into done bitmaps by `heartbeat` (how progress is
  counted), dead letters with their error and body, per-task release/failure counts, and one
  small lease record per held task (who holds it until when; how `extend` learns that a lease
  was lost and how `busy_workers` and `leased` are known).
- **Done wins over dead**: a task given up (dead) whose worker still finishes it gets a done
  marker next to its dead marker; counting checks the (few) dead indices against the done
  bitmap, and `dead_letters` and `retry_dead` against the done markers, so it counts done
  only.

Attempts are counted by voxflow, not by Pub/Sub's dead-letter policy: attempt = Pub/Sub's
delivery_attempt − releases. A task whose attempt would exceed `max_attempts` (its workers
were lost each time) and a task nacked at its last attempt go to the ledger's dead letters
with their error, exactly like the SQLite queue. (The dead-letter policy is also what makes
Pub/Sub fill in delivery_attempt; the test emulator fills it in regardless and ignores the
policy.) Reads (`stats`, `dead_letters`, `runs`, `run_state`, `run_params`) write nothing; a
queue opened `readonly` refuses every method that writes or creates resources.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import (ACTIVE, DEAD, DONE, LEASED, PENDING, UNPUBLISHED, DeadLetter, Lease, RunState,
               StageStats, check_end_state, writes)
from .ledger import Bitmap, Ledger, Ranges, run_token

MAX_DEADLINE = 600                      # Pub/Sub's limit for an ack deadline, seconds
MIN_RETENTION, MAX_RETENTION = 600, 604_800     # Pub/Sub's limits for message retention
# How long a worker trusts its list of subscriptions: listing is an admin operation with a
# per-project quota, so a worker that keeps finding work re-lists rarely; one whose last pull
# came back empty looks every few seconds for a new stage (jittered: a fleet lists out of step).
LIST_SECONDS_BUSY, LIST_SECONDS_IDLE = 60.0, 5.0
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_.~+-]{0,59}$")


def _seconds(value: float) -> int:
    """Pub/Sub deadlines are whole seconds in [1, 600]: round a lease up."""
    return max(1, min(MAX_DEADLINE, math.ceil(value)))


def republish_margin(retention_seconds: float) -> float:
    """How long before its messages reach retention a stage is published again: an hour
    (time to re-send a 10^7-task stage at a few thousand messages a second before the old
    copies go, so workers never run dry), or a tenth of a shorter retention (so a stage is
    not re-sent all the time). Being early costs only duplicates."""
    return min(3600.0, retention_seconds / 10)


def dead_letter_attempts(max_attempts: int) -> int:
    """Pub/Sub's backstop: counts releases too, so it is set well above voxflow's limit."""
    return max(5, min(100, 3 * max_attempts + 10))


@dataclass(frozen=True)
class PubSubURL:
    project: str
    prefix: str
    ledger: str

    @classmethod
    def parse(cls, url: str) -> "PubSubURL":
        parts = urlsplit(url)
        ledger = parse_qs(parts.query).get("ledger", [""])[0]
        prefix = parts.path.strip("/")
        if parts.scheme != "pubsub" or not _PROJECT.match(parts.netloc):
            raise ValueError(f"{url!r}: expected pubsub://PROJECT/PREFIX?ledger=URL with a "
                             "Google Cloud project id")
        if not _PREFIX.match(prefix):
            raise ValueError(f"{url!r}: the prefix must start with a letter and use letters, "
                             "digits and - _ . ~ + (at most 60)")
        if not ledger:
            raise ValueError(f"{url!r}: add ?ledger=gs://bucket/path (where the run ledger "
                             "lives: parameters, done markers, dead letters)")
        return cls(parts.netloc, prefix, ledger)


class PubSubQueue:
    """`TaskQueue` over Pub/Sub topics and subscriptions plus a storage ledger."""

    poll_seconds = 2.0                  # drivers: a poll costs a few storage calls

    def __init__(self, url: str, lease_seconds: float = 60.0, max_attempts: int = 3,
                 pull_timeout: float = 5.0, retention_seconds: int = MAX_RETENTION,
                 readonly: bool = False, clock: Callable[[], float] = time.time):
        if not MIN_RETENTION <= retention_seconds <= MAX_RETENTION:
            raise ValueError(f"retention_seconds must be in [{MIN_RETENTION}, "
                             f"{MAX_RETENTION}] (Pub/Sub's limits), not {retention_seconds}")
        self.url = url
        self.where = PubSubURL.parse(url)
        self.retention_seconds = retention_seconds
        self.readonly = readonly
        self.clock = clock
        self.ledger = Ledger(self.where.ledger)
        self.lease_seconds = lease_seconds
        self.default_max_attempts = max_attempts
        self.pull_timeout = pull_timeout
        self._publisher = None
        self._subscriber = None
        self._subs: tuple[float, list[str]] = (-1e9, [])   # (listed at, names)
        self._idle = True                                  # the last pull found nothing

    # -- clients and names -----------------------------------------------------------------
    @property
    def publisher(self):
        if self._publisher is None:
            from google.cloud import pubsub_v1
            self._publisher = pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000,
                                                              max_latency=0.05),
                publisher_options=pubsub_v1.types.PublisherOptions(
                    flow_control=pubsub_v1.types.PublishFlowControl(
                        message_limit=5_000, byte_limit=32 << 20,
                        limit_exceeded_behavior=pubsub_v1.types.LimitExceededBehavior.BLOCK)))
        return self._publisher

    @property
    def subscriber(self):
        if self._subscriber is None:
            from google.cloud import pubsub_v1
            self._subscriber = pubsub_v1.SubscriberClient()
        return self._subscriber

    def resource(self, run: str, stage: str, kind: str) -> str:
        """The id shared by a stage's topic and subscription."""
        return f"{self.where.prefix}-{kind}-{run_token(run)}-{stage}"

    def _topic(self, rid: str) -> str:
        return f"projects/{self.where.project}/topics/{rid}"

    def _subscription(self, rid: str) -> str:
        return f"projects/{self.where.project}/subscriptions/{rid}"

    # -- runs ------------------------------------------------------------------------------
    @writes
    def register_run(self, run: str, params: str, max_attempts: Optional[int] = None,
                     meta: Optional[dict] = None) -> None:
        now = self.clock()
        self.ledger.register(run, {"run": run, "params": params, "created": now,
                                   "max_attempts": max_attempts or self.default_max_attempts},
                             {"state": ACTIVE, "heartbeat": now, "meta": meta or {}})

    def _update_state(self, run: str, **values) -> None:
        state = self.ledger.state(run)
        if state is None:
            raise KeyError(f"run {run!r} is not registered in {self.url}")
        self.ledger.write(self.ledger.state_key(run), {**state, **values})

    def run_state(self, run: str) -> Optional[RunState]:
        state = self.ledger.state(run)
        return RunState(state["state"], state["heartbeat"], state["meta"]) if state else None

    @writes
    def heartbeat(self, run: str) -> list[str]:
        """The driver is alive: the run is active again. Also moves what Pub/Sub's backstop
        forwarded into the ledger's dead letters, compacts the done journal, and returns the
        stages whose open tasks are about to reach retention (publish them again)."""
        self._update_state(run, state=ACTIVE, heartbeat=self.clock())
        stages = self.ledger.stages(run)
        self._drain_dead_letters(run, stages)
        done = {stage: self.ledger.compact(run, stage) for stage in stages}
        return [stage for stage, record in stages.items()
                if self._expiring(run, stage, record, done[stage])]

    @writes
    def end_run(self, run: str, state: str) -> None:
        self._update_state(run, state=check_end_state(state))

    def _attempt_limit(self, run: str) -> int:
        record = self.ledger.run(run)
        return record["max_attempts"] if record else self.default_max_attempts

    @writes
    def record_session(self, run: str, session: dict) -> None:
        self.ledger.write(f"{self.ledger.data(run)}/sessions/{session['worker']}-"
                          f"{session['started']:.3f}.json", session)

    def sessions(self, run: str) -> list[dict]:
        records = self.ledger.records(f"{self.ledger.data(run)}/sessions/")
        return sorted(records.values(), key=lambda r: r["started"])

    def run_params(self, run: str) -> str:
        record = self.ledger.run(run)
        if record is None:
            raise KeyError(f"run {run!r} is not registered in {self.url}")
        return record["params"]

    def runs(self) -> list[str]:
        return self.ledger.runs()

    @writes
    def finish(self, run: str) -> None:
        """Delete the run's topics and subscriptions (the ledger stays: status, resume)."""
        from google.api_core import exceptions
        for stage, record in self.ledger.stages(run).items():
            rid = self.resource(run, stage, record["kind"])
            for name in (rid, rid + "-dead"):
                for delete, path in ((self.subscriber.delete_subscription,
                                      {"subscription": self._subscription(name)}),
                                     (self.publisher.delete_topic,
                                      {"topic": self._topic(name)})):
                    try:
                        delete(request=path)
                    except exceptions.NotFound:
                        pass
        self._subs = (-1e9, [])

    @writes
    def forget_run(self, run: str) -> int:
        """Delete the run's topics, subscriptions and ledger records (not its parameters)."""
        stages = self.ledger.stages(run)
        self.finish(run)
        n = self.ledger.delete_prefix(self.ledger.data(run) + "/")
        for kind in {r["kind"] for r in stages.values()}:
            self.ledger.delete_prefix(f"leases/{kind}/{run_token(run)}/")
        return n

    # -- publishing ------------------------------------------------------------------------
    def _ensure(self, run: str, stage: str, kind: str) -> bool:
        """Create the stage's topics and subscriptions; True if the subscription existed."""
        from google.api_core import exceptions
        rid = self.resource(run, stage, kind)
        for name in (rid + "-dead", rid):
            try:
                self.publisher.create_topic(request={"name": self._topic(name)})
            except exceptions.AlreadyExists:
                pass
        self._create_subscription(rid + "-dead")
        try:                     # looked up first: emulators may not raise AlreadyExists
            self.subscriber.get_subscription(request={"subscription": self._subscription(rid)})
            return True
        except exceptions.NotFound:
            pass
        if not self._create_subscription(
                rid, ack_deadline_seconds=self._sub_deadline(),
                dead_letter_policy={
                    "dead_letter_topic": self._topic(rid + "-dead"),
                    "max_delivery_attempts": dead_letter_attempts(self._attempt_limit(run))},
                labels={"voxflow-kind": kind}):
            return True
        self._subs = (-1e9, [])
        return False

    def _create_subscription(self, rid: str, **fields) -> bool:
        """Subscribe `rid` to the topic of the same name, keeping messages
        `retention_seconds` and never expiring (by default Pub/Sub deletes a subscription
        inactive for 31 days: a stage can wait longer). False if it existed."""
        from google.api_core import exceptions
        try:
            self.subscriber.create_subscription(request={
                "name": self._subscription(rid), "topic": self._topic(rid),
                "message_retention_duration": {"seconds": self.retention_seconds},
                "expiration_policy": {},             # a policy without a ttl: never expires
                **fields})
        except exceptions.AlreadyExists:
            return False
        return True

    def _stale(self, record: dict) -> bool:
        """Whether the stage's messages may soon reach retention (a record from before
        `queued_at` was kept may be as old as any)."""
        limit = self.retention_seconds - republish_margin(self.retention_seconds)
        return record.get("queued_at", 0.0) < self.clock() - limit

    def _expiring(self, run: str, stage: str, record: dict, done: Bitmap) -> bool:
        """Whether the stage is stale and still has open tasks. A stale stage with none gets
        a fresh `queued_at` (nothing of it can be lost now), so it is not counted every
        heartbeat (messages a later retry_dead sends are younger still)."""
        if not self._stale(record):
            return False
        finished = len(done) + len(self.ledger.dead_only(run, stage, done))
        if finished < Ranges(record["tasks"]).total:
            return True
        self.ledger.write(self.ledger.stage_key(run, stage),
                          {**record, "queued_at": self.clock()})
        return False

    @writes
    def publish(self, run: str, stage: str, kind: str,
                messages: Iterable[tuple[int, str]], batch: int = 50_000) -> int:
        """Publish the stage's tasks, streaming (the client's flow control bounds what is in
        flight). Skips finished tasks and, while the subscription exists and its messages
        are not about to reach retention, tasks already published to it. The stage record
        (index ranges, not indices; when its queued messages were published) is saved every
        `batch` messages once they are confirmed, so a crash re-sends at most a batch."""
        existed = self._ensure(run, stage, kind)
        record_key = self.ledger.stage_key(run, stage)
        old = self.ledger.read(record_key)
        tasks = Ranges(old.get("tasks", []))
        kept = existed and not self._stale(old)
        queued = Ranges(old["queued"] if kept else [])
        queued_at = old["queued_at"] if kept else self.clock()
        done = self.ledger.done(run, stage)                # a bitmap: stage size / 8 bytes
        dead = set(self.ledger.dead_only(run, stage, done))
        topic = self._topic(self.resource(run, stage, kind))
        sent = _Outstanding()

        def save() -> None:
            sent.wait()
            self.ledger.write(record_key, {"kind": kind, "tasks": tasks.ranges,
                                           "queued": queued.ranges, "queued_at": queued_at})

        for index, body in messages:
            tasks.add(index)
            if index in queued or index in done or index in dead:
                continue
            sent.add(self.publisher.publish(topic, body.encode(), run=run, stage=stage,
                                            kind=kind, index=str(index)))
            queued.add(index)
            if sent.count % batch == 0:
                save()
        save()
        return sent.count

    # -- leasing ---------------------------------------------------------------------------
    def _subscriptions(self, kinds: Optional[Iterable[str]], runs: Optional[Collection[str]],
                       skip_runs: Collection[str]) -> list[str]:
        listed_at, names = self._subs
        trust = LIST_SECONDS_BUSY if names and not self._idle else LIST_SECONDS_IDLE
        if time.monotonic() - listed_at > trust * random.uniform(0.8, 1.0):
            names = [s.name for s in self.subscriber.list_subscriptions(
                request={"project": f"projects/{self.where.project}"})
                if s.name.rsplit("/", 1)[1].startswith(self.where.prefix + "-")
                and not s.name.endswith("-dead")]
            self._subs = (time.monotonic(), names)
        if kinds is not None:
            starts = tuple(f"{self.where.prefix}-{k}-" for k in kinds)
            names = [n for n in names if n.rsplit("/", 1)[1].startswith(starts)]
        wanted, skipped = _run_marks(runs or ()), _run_marks(skip_runs)
        names = [n for n in names if (runs is None or any(m in n for m in wanted))
                 and not any(m in n for m in skipped)]
        return random.sample(names, len(names))     # spread workers over stages and runs

    @writes
    def pull(self, kinds: Optional[Iterable[str]] = None, n: int = 1, worker: str = "",
             lease_seconds: Optional[float] = None, runs: Optional[Collection[str]] = None,
             skip_runs: Collection[str] = ()) -> list[Lease]:
        from google.api_core import exceptions
        seconds = _seconds(lease_seconds or self.lease_seconds)
        out: list[Lease] = []
        for sub in self._subscriptions(kinds, runs, skip_runs):
            if len(out) >= n:
                break
            try:
                response = self.subscriber.pull(
                    request={"subscription": sub, "max_messages": n - len(out)},
                    timeout=self.pull_timeout, retry=None)
            except exceptions.NotFound:
                self._subs = (-1e9, [])
                continue
            except exceptions.DeadlineExceeded:
                continue
            for received in response.received_messages:
                lease = self._admit(sub, received, worker, seconds)
                if lease:
                    out.append(lease)
        self._idle = not out
        return out

    def _admit(self, sub: str, received, worker: str, seconds: int) -> Optional[Lease]:
        """Turn one delivery into a lease, or settle it at once (done before, or dead)."""
        attrs = received.message.attributes
        try:
            run, stage, kind, index = (attrs["run"], attrs["stage"], attrs["kind"],
                                       int(attrs["index"]))
        except (KeyError, ValueError):
            self.subscriber.acknowledge(request={"subscription": sub,
                                                 "ack_ids": [received.ack_id]})
            return None                              # not a voxflow task: nothing to attribute
        done_key = self.ledger.prefix(run, "done", stage) + str(index)
        state_key = self.ledger.prefix(run, "tasks", stage) + str(index)
        found = self.ledger.get_many([done_key, state_key])
        ack_id = received.ack_id
        if found[done_key] is not None:              # a redelivery of a finished task
            self.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [ack_id]})
            return None
        state = json.loads(found[state_key] or b"{}")
        # at least 1: a message published again (retention) counts its deliveries afresh
        attempt = max(received.delivery_attempt - state.get("released", 0), 1)
        body = received.message.data.decode()
        if attempt > self._attempt_limit(run):
            lost = attempt - 1 - state.get("failed", 0)
            error = f"lease expired {lost} times: the worker was lost each time"
            if state.get("error"):
                error += f"; last error: {state['error']}"
            self.ledger.dead(run, stage, index, attempt - 1, error, body)
            self.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [ack_id]})
            return None
        if seconds != self._sub_deadline():
            self.subscriber.modify_ack_deadline(request={
                "subscription": sub, "ack_ids": [ack_id], "ack_deadline_seconds": seconds})
        self.ledger.write(self.ledger.lease_key(kind, run, stage, index), {
            "token": _lease_token(ack_id), "worker": worker, "run": run, "stage": stage,
            "expires": self.clock() + seconds})
        return Lease(run, stage, index, body, attempt, f"{kind} {ack_id}")

    def _sub_deadline(self) -> int:
        """The subscription's own ack deadline (Pub/Sub's minimum is 10 s)."""
        return max(10, _seconds(self.lease_seconds))

    def _handle(self, lease: Lease) -> tuple[str, str, str]:
        """The lease's subscription, ack id and lease-record key (its token is
        "KIND ACK_ID")."""
        kind, ack_id = lease.token.split(" ", 1)
        return (self._subscription(self.resource(lease.run, lease.stage, kind)), ack_id,
                self.ledger.lease_key(kind, lease.run, lease.stage, lease.index))

    def _holder(self, lease: Lease) -> tuple[str, Optional[dict]]:
        """The lease record's key and content, if this lease still holds the task."""
        _, ack_id, key = self._handle(lease)
        record = self.ledger.read(key)
        return key, record if record.get("token") == _lease_token(ack_id) else None

    @writes
    def extend(self, lease: Lease, seconds: Optional[float] = None) -> bool:
        """Push the deadline out; False once another worker holds the task."""
        key, record = self._holder(lease)
        if record is None:
            return False
        seconds_ = _seconds(seconds or self.lease_seconds)
        sub, ack_id, _ = self._handle(lease)
        self.subscriber.modify_ack_deadline(request={
            "subscription": sub, "ack_ids": [ack_id], "ack_deadline_seconds": seconds_})
        record["expires"] = self.clock() + seconds_
        self.ledger.write(key, record)
        return True

    @writes
    def ack(self, lease: Lease, skipped: bool = False) -> None:
        """Record the task done (and, `skipped`, that it did not run), then acknowledge it.
        Idempotent."""
        self.ack_many([lease], skipped=skipped)

    @writes
    def ack_many(self, leases: Iterable[Lease], skipped: bool = False) -> None:
        leases = list(leases)
        self.ledger.mark_done(((l.run, l.stage, l.index) for l in leases), skipped=skipped)
        by_sub: dict[str, list[str]] = {}
        for lease in leases:
            key, record = self._holder(lease)
            if record is not None:
                self.ledger.delete([key])
            sub, ack_id, _ = self._handle(lease)
            by_sub.setdefault(sub, []).append(ack_id)
        for sub, ack_ids in by_sub.items():
            self.subscriber.acknowledge(request={"subscription": sub, "ack_ids": ack_ids})

    def _settle(self, lease: Lease, error: Optional[str]) -> None:
        key, record = self._holder(lease)
        if record is None:
            return                                   # lease lost: someone else has it
        state_key = self.ledger.prefix(lease.run, "tasks", lease.stage) + str(lease.index)
        state = self.ledger.read(state_key)
        sub, ack_id, _ = self._handle(lease)
        if error is not None and lease.attempt >= self._attempt_limit(lease.run):
            self.ledger.dead(lease.run, lease.stage, lease.index, lease.attempt, error,
                             lease.body)
            self.ledger.delete([key])
            self.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [ack_id]})
            return
        if error is None:
            state["released"] = state.get("released", 0) + 1
        else:
            state["failed"] = state.get("failed", 0) + 1
            state["error"] = error
        self.ledger.write(state_key, state)          # before anyone can pull it
        self.ledger.delete([key])
        self.subscriber.modify_ack_deadline(request={
            "subscription": sub, "ack_ids": [ack_id], "ack_deadline_seconds": 0})

    @writes
    def nack(self, lease: Lease, error: str) -> None:
        """The task failed: retry it, or dead-letter it at its last attempt."""
        self._settle(lease, error)

    @writes
    def release(self, lease: Lease) -> None:
        """Give the task back at once (preemption); not counted as an attempt."""
        self._settle(lease, None)

    # -- inspection ------------------------------------------------------------------------
    def _drain_dead_letters(self, run: str, stages: dict[str, dict]) -> None:
        """Move what Pub/Sub's dead-letter policy forwarded into the ledger (the
        heartbeat's job: reads change nothing)."""
        from google.api_core import exceptions
        for stage, record in stages.items():
            sub = self._subscription(self.resource(run, stage, record["kind"]) + "-dead")
            try:
                with warnings.catch_warnings():      # deprecated, but exactly what a drain wants
                    warnings.simplefilter("ignore", DeprecationWarning)
                    response = self.subscriber.pull(
                        request={"subscription": sub, "max_messages": 1000,
                                 "return_immediately": True},
                        timeout=self.pull_timeout, retry=None)
            except (exceptions.NotFound, exceptions.DeadlineExceeded):
                continue
            if not response.received_messages:
                continue
            for received in response.received_messages:
                attrs = received.message.attributes
                self.ledger.dead(run, stage, int(attrs["index"]), dead_letter_attempts(
                    self._attempt_limit(run)), "Pub/Sub forwarded it to the dead-letter topic "
                    "(too many deliveries)", received.message.data.decode())
            self.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [
                r.ack_id for r in response.received_messages]})

    def stats(self, run: str) -> dict[str, StageStats]:
        """Per stage: the done bitmap and journal, the dead markers (few), the leases (as
        many as workers): a bounded number of storage calls whatever the task count."""
        stages = self.ledger.stages(run)
        leased = Counter(r["stage"] for r in self.ledger.leases(
            {r["kind"] for r in stages.values()}, run, self.clock()))
        out = {}
        for stage, record in stages.items():
            finished, skipped = self.ledger.progress(run, stage)
            done, dead = len(finished), len(self.ledger.dead_only(run, stage, finished))
            total = Ranges(record["tasks"]).total
            held = min(leased[stage], total - done - dead)
            out[stage] = StageStats(max(total - done - dead - held, 0), max(held, 0), done, dead,
                                    len(skipped))
        return out

    def dead_letters(self, run: str, limit: int = 100) -> list[DeadLetter]:
        return [DeadLetter(run, stage, index, record["attempts"], record["error"])
                for _, stage, index, record in self.ledger.dead_letters(run, limit)]

    @writes
    def retry_dead(self, run: str, stage: Optional[str] = None,
                   index: Optional[int] = None) -> int:
        """Publish the run's dead tasks (of `stage`, or its task `index`) again with a fresh
        set of attempts (a dead task that was done after all just loses its dead marker)."""
        stages = self.ledger.stages(run)
        self.ledger.delete(k for k, done in self.ledger.dead_markers(run) if done)
        letters = [(key, name, i, record) for key, name, i, record in
                   self.ledger.dead_letters(run)
                   if stage in (None, name) and (index is None or index == i)]
        for key, name, i, record in letters:
            kind = stages[name]["kind"]
            self._ensure(run, name, kind)
            self.ledger.delete([self.ledger.prefix(run, "tasks", name) + str(i), key])
            self.publisher.publish(self._topic(self.resource(run, name, kind)),
                                   record["body"].encode(), run=run, stage=name, kind=kind,
                                   index=str(i)).result()
        return len(letters)

    def task_states(self, run: str, stage: str, size: int) -> np.ndarray:
        """From the ledger: the published ranges, the done bitmap, the dead markers and the
        unexpired leases (a bounded number of calls, as `stats`)."""
        out = np.full(size, UNPUBLISHED, np.uint8)
        record = self.ledger.stages(run).get(stage)
        if record is None:
            return out
        for start, stop in Ranges(record["tasks"]).ranges:
            out[start:min(stop, size)] = PENDING
        now = self.clock()
        prefix = self.ledger.lease_key(record["kind"], run, stage, 0)[:-1]
        for key, lease in self.ledger.records(prefix).items():
            index = int(key.rsplit("/", 1)[1])
            if lease["expires"] >= now and index < size:
                out[index] = LEASED
        done = self.ledger.done(run, stage)
        for i in self.ledger.dead_only(run, stage, done):
            if i < size:
                out[i] = DEAD
        bits = np.unpackbits(np.frombuffer(bytes(done.bits), np.uint8), bitorder="little")
        out[np.flatnonzero(bits[:size])] = DONE
        return out

    def busy_workers(self, kind: Optional[str] = None, run: Optional[str] = None) -> set[str]:
        """Workers holding an unexpired lease (of `kind`, of `run`), from the ledger's lease
        records."""
        kinds = [kind] if kind else {k.split("/")[1] for k in self.ledger.list("leases/")}
        return {r["worker"] for r in self.ledger.leases(kinds, run, self.clock())}

    def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
        if self._publisher is not None:
            self._publisher.transport.close()


def _run_marks(runs: Iterable[str]) -> tuple[str, ...]:
    """What a subscription of one of the runs has in its name: "-TOKEN-"."""
    return tuple(f"-{run_token(run)}-" for run in runs)


def _lease_token(ack_id: str) -> str:
    return hashlib.sha1(ack_id.encode()).hexdigest()[:16]


class _Outstanding:
    """Counts published messages and waits for them without keeping their futures."""

    def __init__(self):
        self.count = 0
        self._open = 0
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()

    def add(self, future) -> None:
        with self._cond:
            self.count += 1
            self._open += 1
        future.add_done_callback(self._done)

    def _done(self, future) -> None:
        error = future.exception()
        with self._cond:
            self._open -= 1
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._open == 0)
        if self._error is not None:
            raise RuntimeError(f"publishing failed: {self._error}") from self._error
