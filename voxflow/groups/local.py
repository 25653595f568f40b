"""`local://N`: worker subprocesses on this machine.

Each worker is `python -m voxflow worker QUEUE --kind KIND --worker-id ID`, its JSON log
appended to a file. A worker that died (killed, crashed) is reaped and, while the target
asks for it, replaced by a new one. Scale-down sends SIGTERM to idle workers only; close()
stops all, SIGKILL after a grace period. Torch threads are split between workers.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

GRACE_SECONDS = 5.0


class LocalGroup:
    def __init__(self, queue_url: str, kind: str, log_dir: Optional[Path] = None,
                 lease_seconds: Optional[float] = None, capacity: Optional[int] = None,
                 exit_when_idle: float = 60.0):
        self.queue_url = queue_url
        self.kind = kind
        self.log_dir = Path(log_dir) if log_dir else None
        self.lease_seconds = lease_seconds
        self.capacity = capacity
        self.exit_when_idle = exit_when_idle
        self.procs: dict[str, subprocess.Popen] = {}
        self.died = 0
        self._ids = itertools.count()
        self._stopping: dict[str, float] = {}

    def _threads(self) -> int:
        """Cores split by the group's capacity, not its current size: every worker of a
        group computes with the same thread count, so results are bit-identical whichever
        worker runs a task (float reductions differ across thread counts)."""
        return max(1, (os.cpu_count() or 1) // max(self.capacity or 1, 1))

    def _spawn(self, threads: int) -> None:
        wid = f"{self.kind}-{os.getpid()}-{next(self._ids)}"
        cmd = [sys.executable, "-m", "voxflow", "worker", self.queue_url, "--kind", self.kind,
               "--worker-id", wid, "--threads", str(threads),
               "--exit-when-idle", str(self.exit_when_idle)]
        if self.lease_seconds:
            cmd += ["--lease-seconds", str(self.lease_seconds)]
        out = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{wid}.log", "ab")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.procs[wid] = subprocess.Popen(cmd, stdout=out, stderr=out, env=env,
                                           stdin=subprocess.DEVNULL)
        if out is not subprocess.DEVNULL:
            out.close()

    def _reap(self) -> None:
        for wid, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[wid]
            if self._stopping.pop(wid, None) is None and code != 0:
                self.died += 1

    def size(self) -> int:
        self._reap()
        return len(self.procs) - len(self._stopping)

    def pids(self) -> dict[str, int]:
        self._reap()
        return {wid: p.pid for wid, p in self.procs.items() if wid not in self._stopping}

    def resize(self, target: int, busy: set[str]) -> None:
        if self.capacity is not None:
            target = min(target, self.capacity)
        alive = self.size()
        if target > alive:
            threads = self._threads()
            for _ in range(target - alive):
                self._spawn(threads)
        elif target < alive:
            idle = [w for w in self.procs if w not in busy and w not in self._stopping]
            for wid in idle[:alive - target]:
                self._stop(wid)

    def _stop(self, wid: str) -> None:
        self._stopping[wid] = time.monotonic()
        try:
            self.procs[wid].send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for wid in list(self.procs):
            if wid not in self._stopping:
                self._stop(wid)
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self._stopping.clear()
