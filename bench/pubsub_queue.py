"""Pub/Sub queue (`voxflow.queues.pubsub.PubSubQueue`) against the tests' emulator on loopback.

  publish   --rss-tasks counts, each in a fresh process: messages/s and peak RSS of the
            publishing process (ru_maxrss). Streaming publish with flow control should not
            grow with the task count: the ratio of the two peaks is the figure.
  pull_ack  --workers processes pull 1 / ack 1 (how a worker works) on --pull-tasks messages
            until the stage is done; total tasks/s, and every task acked exactly once
            (the ledger's done count equals the tasks, no dead letters).
The emulator (cloudbox, in Python) is the bottleneck here, not the client: these figures
bound what the tests can do, not what Google's service does.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from task_queue import RUN, STAGE, KIND, machine, messages  # noqa: E402

from voxflow.queues.pubsub import PubSubQueue  # noqa: E402


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish_child(tasks: int, url: str) -> None:
    """(A fresh process.) Publish `tasks` messages; print figures as JSON."""
    q = PubSubQueue(url)
    q.register_run(RUN, "{}")
    before = maxrss_mib()
    t0 = time.perf_counter()
    sent = q.publish(RUN, STAGE, KIND, messages(tasks))
    seconds = time.perf_counter() - t0
    q.close()
    print(json.dumps({"tasks": tasks, "sent": sent, "seconds": seconds,
                      "rate": tasks / seconds, "rss_before_mib": before,
                      "rss_peak_mib": maxrss_mib()}))


def consume(url: str, worker: str, ready, out) -> None:
    q = PubSubQueue(url)
    acked = []
    ready.wait()
    idle = 0
    while idle < 3:
        leases = q.pull([KIND], 1, worker)
        if not leases:
            idle += 1
            time.sleep(0.2)
            continue
        idle = 0
        q.ack(leases[0])
        acked.append(leases[0].index)
    q.close()
    out.put(acked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rss-tasks", type=int, nargs=2, default=[10_000, 100_000])
    ap.add_argument("--pull-tasks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--publish-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish_child:
        publish_child(int(args.publish_child[0]), args.publish_child[1])
        return

    import pubsub_emulator
    emulator = pubsub_emulator.start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    tmp = Path(tempfile.mkdtemp(prefix="voxflow-pubsub-bench-"))
    m = machine()
    print(f"machine  {m['platform']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
          f"Python {m['python']}; emulator cloudbox on {emulator.host}", flush=True)
    try:
        peaks = []
        for i, n in enumerate(args.rss_tasks):
            url = f"pubsub://bench-project/p{i}?ledger=file://{tmp}/ledger-p{i}"
            out = subprocess.run([sys.executable, __file__, "--publish-child", str(n), url],
                                 check=True, capture_output=True, text=True)
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            assert fig["sent"] == n, fig
            peaks.append(fig["rss_peak_mib"])
            print(f"publish  {n} tasks: {fig['rate']:.0f} msg/s, peak RSS "
                  f"{fig['rss_peak_mib']:.0f} MiB (before publishing "
                  f"{fig['rss_before_mib']:.0f} MiB)", flush=True)
        print(f"rss      peak({args.rss_tasks[1]}) / peak({args.rss_tasks[0]}) = "
              f"{peaks[1] / peaks[0]:.2f}")

        url = f"pubsub://bench-project/c?ledger=file://{tmp}/ledger-c"
        q = PubSubQueue(url)
        q.register_run(RUN, "{}")
        q.publish(RUN, STAGE, KIND, messages(args.pull_tasks))
        ctx = mp.get_context("spawn")
        ready, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=consume, args=(url, f"w{i}", ready, out))
                 for i in range(args.workers)]
        for p in procs:
            p.start()
        time.sleep(3)                                  # let them import and connect
        t0 = time.perf_counter()
        ready.set()
        acked = [i for _ in procs for i in out.get(timeout=600)]
        seconds = time.perf_counter() - t0 - 0.6       # minus the idle tail (3 × 0.2 s)
        for p in procs:
            p.join()
        s = q.stats(RUN)[STAGE]
        q.close()
        assert sorted(set(acked)) == list(range(args.pull_tasks)), "a task was lost"
        assert (s.done, s.dead, s.open) == (args.pull_tasks, 0, 0), s
        print(f"pull_ack {args.workers} processes, {args.pull_tasks} tasks: "
              f"{args.pull_tasks / seconds:.0f} tasks/s; {len(acked) - args.pull_tasks} "
              "duplicate deliveries; ledger done == tasks")
    finally:
        pubsub_emulator.stop(emulator)


if __name__ == "__main__":
    main()
