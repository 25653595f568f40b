"""`local://N`: worker subprocesses on this machine.

Each worker is `python -m voxflow worker QUEUE --kind KIND --worker-id ID --run RUN`, its
JSON log appended to a file; it serves only its run and exits by itself once the run has
ended or its driver went quiet (so the group empties even when no one closes it). A worker that died (killed, crashed) is reaped and, while the target
asks for it, replaced by a new one. Scale-down sends SIGTERM to idle workers only; close()
stops all, SIGKILL after a grace period. Torch threads are split between workers.

`local://auto` is one worker per GPU this machine shows (`visible_gpus`), each with its own
`CUDA_VISIBLE_DEVICES`, the cores split between them; on a machine without one, a single
worker with every core.

With a `state_dir`, members are recorded as pid files and started in their own session, so
the group outlives the process that started it: the next Airflow task (scale down, the
teardown) opens the same group from the same folder.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

GRACE_SECONDS = 5.0


def visible_gpus(env: Optional[dict] = None) -> list[str]:
    """The GPUs workers here may use, as `CUDA_VISIBLE_DEVICES` entries: what that variable
    lists when it is set (empty or -1: none), else one per NVIDIA device file. Cheap (no
    CUDA, no torch): the driver and Airflow's tasks call it."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        return [] if not ids or ids[0].startswith("-") else ids
    count = sum(1 for f in Path("/dev").glob("nvidia*") if f.name[6:].isdigit())
    return [str(i) for i in range(count)]


def local_capacity(url: str) -> int:
    """The most workers `local://N` or `local://auto` starts here."""
    n = url[len("local://"):]
    return max(len(visible_gpus()), 1) if n == "auto" else int(n)


def _alive(pid: int, wid: str) -> bool:
    """A live, non-zombie process whose command line names the worker (pids get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and wid.encode() in cmdline


TARGET_FILE = "target"


def group_state(state_dir: Path) -> dict:
    """What a local group with a state folder (one an Airflow run drives) holds: its live
    workers and the size it was last given. Read by the console, without the group."""
    state_dir = Path(state_dir)
    running = 0
    for f in state_dir.glob("*.pid"):
        try:
            running += _alive(int(f.read_text().split()[0]), f.stem)
        except (OSError, ValueError, IndexError):
            continue
    try:
        target: Optional[int] = int((state_dir / TARGET_FILE).read_text())
    except (OSError, ValueError):
        target = None
    return {"running": running, "target": target}


class LocalGroup:
    def __init__(self, queue_url: str, kind: str, log_dir: Optional[Path] = None,
                 lease_seconds: Optional[float] = None, capacity: Optional[int] = None,
                 exit_when_idle: float = 60.0, state_dir: Optional[Path] = None,
                 run: Optional[str] = None, devices: Optional[list[str]] = None,
                 threads: Optional[int] = None):
        self.queue_url = queue_url
        self.kind = kind
        self.run = run
        self.log_dir = Path(log_dir) if log_dir else None
        self.lease_seconds = lease_seconds
        self.capacity = capacity
        self.exit_when_idle = exit_when_idle
        self.state_dir = Path(state_dir) if state_dir else None
        self.threads = threads
        self.devices = list(devices) if devices else None   # one worker per device
        if self.devices:
            self.capacity = min(capacity or len(self.devices), len(self.devices))
        self.members: dict[str, int] = {}                 # worker id -> pid
        self.device_of: dict[str, str] = {}               # worker id -> its device
        self._popen: dict[str, subprocess.Popen] = {}
        self._stopping: dict[str, float] = {}
        self.died = 0
        self._ids = itertools.count()
        self._tag = uuid.uuid4().hex[:6]
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            for f in self.state_dir.glob("*.pid"):
                pid, *device = f.read_text().split()
                self.members[f.stem] = int(pid)
                if device:
                    self.device_of[f.stem] = device[0]

    def _threads(self) -> int:
        """Cores split by the group's capacity, not its current size: every worker of a
        group computes with the same thread count, so results are bit-identical whichever
        worker runs a task (float reductions differ across thread counts). Or as set."""
        return self.threads or max(1, (os.cpu_count() or 1) // max(self.capacity or 1, 1))

    def _spawn(self, threads: int) -> None:
        wid = f"{self.kind}-{self._tag}-{next(self._ids)}"
        cmd = [sys.executable, "-m", "voxflow", "worker", self.queue_url, "--kind", self.kind,
               "--worker-id", wid, "--threads", str(threads),
               "--exit-when-idle", str(self.exit_when_idle)]
        if self.lease_seconds:
            cmd += ["--lease-seconds", str(self.lease_seconds)]
        if self.run:
            cmd += ["--run", self.run]
        out = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{wid}.log", "ab")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        device = None
        if self.devices:
            used = {self.device_of.get(w) for w in self.members}
            device = next(d for d in self.devices if d not in used)
            env["CUDA_VISIBLE_DEVICES"] = device
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=self.state_dir is not None)
        if out is not subprocess.DEVNULL:
            out.close()
        self.members[wid] = proc.pid
        self._popen[wid] = proc
        if device is not None:
            self.device_of[wid] = device
        if self.state_dir:
            (self.state_dir / f"{wid}.pid").write_text(f"{proc.pid} {device or ''}".strip())

    def _is_alive(self, wid: str) -> bool:
        proc = self._popen.get(wid)
        if proc is not None:
            return proc.poll() is None
        return _alive(self.members[wid], wid)

    def _forget(self, wid: str) -> None:
        self.members.pop(wid, None)
        self.device_of.pop(wid, None)
        self._popen.pop(wid, None)
        if self.state_dir:
            (self.state_dir / f"{wid}.pid").unlink(missing_ok=True)

    def _reap(self) -> None:
        for wid in list(self.members):
            if self._is_alive(wid):
                continue
            proc = self._popen.get(wid)
            crashed = proc is None or proc.returncode != 0
            if self._stopping.pop(wid, None) is None and crashed:
                self.died += 1
            self._forget(wid)

    def size(self) -> int:
        self._reap()
        return len(self.members) - len(self._stopping)

    def pids(self) -> dict[str, int]:
        self._reap()
        return {w: p for w, p in self.members.items() if w not in self._stopping}

    def resize(self, target: int, busy: set[str]) -> None:
        if self.capacity is not None:
            target = min(target, self.capacity)
        if self.state_dir:                     # for the console (`group_state`)
            (self.state_dir / TARGET_FILE).write_text(str(target))
        alive = self.size()
        if target > alive:
            threads = self._threads()
            for _ in range(target - alive):
                self._spawn(threads)
        elif target < alive:
            idle = [w for w in self.members if w not in busy and w not in self._stopping]
            for wid in idle[:alive - target]:
                self._stop(wid)

    def _stop(self, wid: str) -> None:
        self._stopping[wid] = time.monotonic()
        try:
            os.kill(self.members[wid], signal.SIGTERM)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Scale to zero: SIGTERM every worker (leases released), SIGKILL the stragglers."""
        if self.state_dir:
            (self.state_dir / TARGET_FILE).write_text("0")
        self._reap()
        for wid in list(self.members):
            if wid not in self._stopping:
                self._stop(wid)
        deadline = time.monotonic() + GRACE_SECONDS
        while any(self._is_alive(w) for w in self.members) and time.monotonic() < deadline:
            time.sleep(0.05)
        for wid, pid in list(self.members.items()):
            if self._is_alive(wid):
                os.kill(pid, signal.SIGKILL)
            proc = self._popen.get(wid)
            if proc is not None:
                proc.wait()
            self._forget(wid)
        self._stopping.clear()
