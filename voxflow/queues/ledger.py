"""The Pub/Sub queue's run ledger: what Pub/Sub cannot tell, as objects under one storage URL
(gs://, file://), written and read through `Storage`.

Layout (TOKEN = `run_token(run)`, D = `data/TOKEN`):

- `runs/TOKEN.json` (parameters, max_attempts, created) and `state/TOKEN.json` (active or how
  the run ended, the driver's last heartbeat, its identity: small, so the heartbeat rewrites
  only it and `run_state` is one read).
- `D/stages/STAGE.json`: the stage's kind, its published indices as `Ranges`, when queued.
- `D/done/STAGE/INDEX`: one empty marker per finished task: a redelivery is checked against
  it by key (one GET) and acknowledged on sight.
- `D/journal/STAGE/INDEX` and `D/compact/STAGE/ID`: progress (below). A task acked as
  skipped (it did not run: an empty input) also has `D/journal/STAGE/s/INDEX`, which the
  same listing returns, compacted into `D/compact/STAGE/s-ID` records (bitmaps of the
  skipped tasks, folded like the done ones): counting skipped tasks costs a poll nothing
  until one exists, then one GET.
- `D/dead/STAGE/INDEX` (dead letters: attempts, error, body), `D/tasks/STAGE/INDEX` (releases,
  failures, last error), `leases/KIND/TOKEN/STAGE/INDEX` (who holds a task until when).

**Progress at O(1) per poll.** Counting done markers lists the whole stage (a list call
returns 1000 keys: 10^4 calls per poll at 10^7 tasks), and drivers, the triggerer and the UI
poll every few seconds. So done is also kept in a form that is cheap to read:

- An ack writes a *journal entry* named like its marker, before the marker: a re-ack rewrites
  the same key (idempotent), a listing gives the indices without reading any object, and a
  marker implies its entry was written, so a redelivery acknowledged on sight is counted.
- The driver's `heartbeat` *compacts*: it reads the stage's compact records (zlib-compressed
  done bitmaps; 10^7 tasks are 1.25 MB raw, a few KB when most are done), lists the journal,
  writes their union as a **new** record (a fresh name; records are never overwritten), and
  only then deletes the records it read and the entries it listed. Whatever is deleted is in
  a record written before, and a union is an OR: a crash at any point leaves extra objects
  whose union is still exact (nothing lost, nothing counted twice), and two racing compactors
  (two DAG runs of the same content share a run) each write their own superset and delete
  only what it holds: the next compaction merges both. Overwriting one record would need
  generation preconditions, which `Storage` (and file://) do not offer; immutable records
  need none. Counts are derived from the bitmap, never stored, so they cannot disagree.
- A poll lists the journal (acks since the last heartbeat), then the records (normally one;
  one listed but gone when read was merged into a newer one: list again), so an entry
  compacted in between is in a record that exists when they are listed. Every bit is a task
  that is done, so a poll never counts high; one that races a compaction (a listing that
  misses both the new record and the old one it replaced) may count low, and the next poll
  counts right: a driver waits one poll more, a publish re-sends a duplicate. A stage never
  compacted — new, or from a ledger older than the journal — has no record: its done markers
  are listed instead, and its first compaction folds them in.

Per stage a poll costs 3 list calls, one GET per record and one more list call per 1000
journal entries, whatever the task count. Done wins over dead: dead indices (few) are
checked against the done bitmap.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
import uuid
import zlib
from typing import Iterable, Iterator, Optional

from . import ACTIVE
from ..storage import Storage

RECORD_READS = 3        # listings tried while compactions keep merging the records away
SKIP_ENTRY = "s/"       # journal/STAGE/s/INDEX: the task was acked as skipped
SKIP_RECORD = "s-"      # compact/STAGE/s-ID: a bitmap of skipped tasks


def run_token(run: str) -> str:
    """The run's name in resource and object names: readable, unique, Pub/Sub-safe."""
    safe = re.sub(r"[^A-Za-z0-9_.~+-]", "-", run)[:120]
    return f"{safe}-{hashlib.sha1(run.encode()).hexdigest()[:8]}"


class Ranges:
    """A set of task indices as sorted, disjoint [start, stop) ranges: a stage's grid is
    one range, however many tasks it has."""

    def __init__(self, ranges: list[list[int]]):
        self.ranges = [list(r) for r in ranges]

    def _find(self, index: int) -> int:
        """Position of the first range whose stop is > index."""
        return bisect.bisect_right(self.ranges, index, key=lambda r: r[1])

    def __contains__(self, index: int) -> bool:
        i = self._find(index)
        return i < len(self.ranges) and self.ranges[i][0] <= index

    def add(self, index: int) -> None:
        if self.ranges and self.ranges[-1][1] == index:          # the common case: in order
            self.ranges[-1][1] += 1
            return
        if index in self:
            return
        i = self._find(index)
        self.ranges.insert(i, [index, index + 1])
        if i + 1 < len(self.ranges) and self.ranges[i + 1][0] == index + 1:
            self.ranges[i][1] = self.ranges.pop(i + 1)[1]
        if i > 0 and self.ranges[i - 1][1] == index:
            self.ranges[i - 1][1] = self.ranges.pop(i)[1]

    @property
    def total(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


class Bitmap:
    """A set of task indices, one bit each (any order, unlike `Ranges`): memory is the
    stage's size / 8, and a union is an OR, so folding an index twice changes nothing."""

    def __init__(self, data: bytes = b""):
        self.bits = bytearray(data)

    def add(self, index: int) -> None:
        if index < 0:
            raise ValueError(f"task index {index} < 0")
        byte = index >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        self.bits[byte] |= 1 << (index & 7)

    def __contains__(self, index: int) -> bool:
        byte = index >> 3
        return 0 <= byte < len(self.bits) and bool(self.bits[byte] >> (index & 7) & 1)

    def __ior__(self, other: Bitmap) -> Bitmap:
        size = max(len(self.bits), len(other.bits))
        union = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits = bytearray(union.to_bytes(size, "little"))
        return self

    def __len__(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def encode(self) -> bytes:
        return zlib.compress(bytes(self.bits))

    @classmethod
    def decode(cls, data: bytes) -> Bitmap:
        return cls(zlib.decompress(data))


class Ledger(Storage):
    """A `Storage` with the run ledger's layout and records (module docstring)."""

    def __init__(self, url: str):
        super().__init__(url)
        self._runs: dict[str, dict] = {}         # run records: written once per registration

    # -- keys and JSON records ---------------------------------------------------------------
    @staticmethod
    def data(run: str) -> str:
        return f"data/{run_token(run)}"

    @staticmethod
    def run_key(run: str) -> str:
        return f"runs/{run_token(run)}.json"

    @staticmethod
    def state_key(run: str) -> str:
        return f"state/{run_token(run)}.json"

    def stage_key(self, run: str, stage: str) -> str:
        return f"{self.data(run)}/stages/{stage}.json"

    def prefix(self, run: str, what: str, stage: str) -> str:
        """Where a stage's per-task objects of one kind live: done, journal, compact, dead,
        tasks."""
        return f"{self.data(run)}/{what}/{stage}/"

    @staticmethod
    def lease_key(kind: str, run: str, stage: str, index: int) -> str:
        return f"leases/{kind}/{run_token(run)}/{stage}/{index}"

    def read(self, key: str) -> dict:
        """A JSON record; {} when missing."""
        return json.loads(self.get(key) or b"{}")

    def write(self, key: str, record: dict) -> None:
        self.put(key, json.dumps(record).encode())

    def records(self, prefix: str) -> dict[str, dict]:
        """The JSON records under a prefix, by key (read in parallel)."""
        found = self.get_many(list(self.list(prefix)))
        return {k: json.loads(v) for k, v in found.items() if v}

    # -- runs and stages ---------------------------------------------------------------------
    def register(self, run: str, record: dict, state: dict) -> None:
        self.write(self.run_key(run), record)
        self.write(self.state_key(run), state)
        self._runs[run] = record

    def run(self, run: str) -> Optional[dict]:
        """The run's record (parameters, max_attempts, created); None if not registered."""
        if run not in self._runs:
            data = self.get(self.run_key(run))
            if data is None:
                return None
            self._runs[run] = json.loads(data)
        return self._runs[run]

    def state(self, run: str) -> Optional[dict]:
        """The run's state object; a run registered before there were any reads as active
        since its registration."""
        data = self.get(self.state_key(run))
        if data is not None:
            return json.loads(data)
        record = self.run(run)
        return record and {"state": ACTIVE, "heartbeat": record["created"], "meta": {}}

    def runs(self) -> list[str]:
        """Registered runs, oldest first."""
        records = self.records("runs/").values()
        return [r["run"] for r in sorted(records, key=lambda r: r["created"])]

    def stages(self, run: str) -> dict[str, dict]:
        prefix = f"{self.data(run)}/stages/"
        return {k[len(prefix):-len(".json")]: v for k, v in self.records(prefix).items()}

    def _indices(self, run: str, what: str, stage: str) -> Iterator[int]:
        """The indices of a stage's per-task objects of one kind, as listed."""
        return (int(k.rsplit("/", 1)[1]) for k in self.list(self.prefix(run, what, stage)))

    # -- done ------------------------------------------------------------------------------
    def mark_done(self, tasks: Iterable[tuple[str, str, int]], skipped: bool = False) -> None:
        """Record (run, stage, index) tasks done: journal entries, then markers (a marker
        implies its entry). A task named twice is written once. `skipped` (finished without
        running): an entry `journal/STAGE/s/INDEX` first, which the same listing finds."""
        tasks = set(tasks)
        kinds = (("journal", SKIP_ENTRY), ("journal", ""), ("done", "")) if skipped else \
            (("journal", ""), ("done", ""))
        for what, sub in kinds:
            self.put_many((self.prefix(run, what, stage) + sub + str(index), b"")
                          for run, stage, index in tasks)

    def done(self, run: str, stage: str) -> Bitmap:
        """The stage's done indices, as a poll reads them: journal before records."""
        return self.progress(run, stage)[0]

    def progress(self, run: str, stage: str) -> tuple[Bitmap, Bitmap]:
        """The stage's done indices and, of them, the skipped ones: the journal (a skipped
        task's two entries, one listing), then the compact records."""
        prefix = self.prefix(run, "journal", stage)
        journal = list(self.list(prefix))
        keys, done, _, skipped = self._compacted(run, stage)
        for key in journal:
            index = int(key.rsplit("/", 1)[1])
            done.add(index)
            if key[len(prefix):].startswith(SKIP_ENTRY):
                skipped.add(index)
        if not keys:
            for index in self._indices(run, "done", stage):
                done.add(index)
        return done, skipped

    def compact(self, run: str, stage: str) -> Bitmap:
        """Fold the stage's journal into one compact record (the heartbeat's job); returns
        the stage's done indices."""
        prefix = self.prefix(run, "journal", stage)
        entries = list(self.list(prefix))
        skipped = [int(k.rsplit("/", 1)[1]) for k in entries
                   if k[len(prefix):].startswith(SKIP_ENTRY)]
        return self.fold(run, stage, (int(k.rsplit("/", 1)[1]) for k in entries), entries,
                         skipped)

    def fold(self, run: str, stage: str, indices: Iterable[int], entries: list[str],
             skipped: Iterable[int] = ()) -> Bitmap:
        """Write the union of the stage's records and `indices` as a new record, then delete
        the records read and the journal `entries` (which `indices` must cover); `skipped`
        indices likewise into a skipped record (named `s-…`, beside the done ones)."""
        keys, done, skip_keys, skips = self._compacted(run, stage)
        before, skips_before = len(done), len(skips)
        if not keys:                        # never compacted: fold the markers in too
            indices = itertools.chain(indices, self._indices(run, "done", stage))
        for index in indices:
            done.add(index)
        for index in skipped:
            skips.add(index)
        base = self.prefix(run, "compact", stage)
        if len(skips) > skips_before or len(skip_keys) > 1:
            self.put(base + SKIP_RECORD + uuid.uuid4().hex, skips.encode())
            self.delete(skip_keys)
        if len(done) > before or len(keys) > 1:
            self.put(base + uuid.uuid4().hex, done.encode())
            self.delete(keys)
        self.delete(entries)
        return done

    def _compacted(self, run: str, stage: str) -> tuple[list[str], Bitmap, list[str], Bitmap]:
        """The stage's compact records that could be read and their union: done records,
        then skipped ones. One listed but gone when read was merged into a newer record by
        a compaction: list again."""
        prefix = self.prefix(run, "compact", stage)
        for _ in range(RECORD_READS):
            found = self.get_many(list(self.list(prefix)))
            if all(v is not None for v in found.values()):
                break
        done, skipped = Bitmap(), Bitmap()
        keys: list[str] = []
        skip_keys: list[str] = []
        for key, data in found.items():
            if data is None:
                continue
            if key[len(prefix):].startswith(SKIP_RECORD):
                skipped |= Bitmap.decode(data)
                skip_keys.append(key)
            else:
                done |= Bitmap.decode(data)
                keys.append(key)
        return keys, done, skip_keys, skipped

    # -- dead letters ------------------------------------------------------------------------
    def dead(self, run: str, stage: str, index: int, attempts: int, error: str,
             body: str) -> None:
        self.write(self.prefix(run, "dead", stage) + str(index),
                   {"attempts": attempts, "error": error, "body": body})

    def dead_only(self, run: str, stage: str, done: Bitmap) -> list[int]:
        """The stage's dead indices whose tasks are not done (done wins over dead)."""
        return [i for i in self._indices(run, "dead", stage) if i not in done]

    def dead_markers(self, run: str) -> Iterator[tuple[str, bool]]:
        """The run's dead-marker keys in (stage, index) order, each with whether its task
        has a done marker too (done wins over dead). Done markers are read a chunk at a
        time, so a caller that stops early reads few."""
        base = self.data(run)
        prefix = f"{base}/dead/"
        keys = sorted(self.list(prefix),
                      key=lambda k: (k[len(prefix):].split("/")[0], int(k.rsplit("/", 1)[1])))
        for start in range(0, len(keys), 100):
            pairs = [(k, f"{base}/done/{k[len(prefix):]}") for k in keys[start:start + 100]]
            done = self.get_many(d for _, d in pairs)
            yield from ((k, done[d] is not None) for k, d in pairs)

    def dead_letters(self, run: str, limit: Optional[int] = None
                     ) -> list[tuple[str, str, int, dict]]:
        """(key, stage, index, record) of the run's dead tasks that are not done, in (stage,
        index) order, at most `limit`."""
        prefix = f"{self.data(run)}/dead/"
        keys = list(itertools.islice((k for k, done in self.dead_markers(run) if not done),
                                     limit))
        found = self.get_many(keys)
        out = []
        for key in keys:
            stage, index = key[len(prefix):].split("/")
            out.append((key, stage, int(index), json.loads(found[key])))
        return out

    # -- leases ------------------------------------------------------------------------------
    def leases(self, kinds: Iterable[str], run: Optional[str], now: float) -> Iterator[dict]:
        """Unexpired lease records of `kinds` (of one run, or all)."""
        for kind in kinds:
            prefix = f"leases/{kind}/" + (f"{run_token(run)}/" if run else "")
            for record in self.records(prefix).values():
                if record["expires"] >= now:
                    yield record
