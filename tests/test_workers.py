"""Worker processes, preemption, poison tasks and worker groups, with real processes."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from voxflow.cli import main
from voxflow.config import load_config
from voxflow.groups import Autoscaler
from voxflow.groups.local import LocalGroup
from voxflow.pipeline import create_layers, plan
from voxflow.queues import open_queue
from voxflow.runner import publish_stage, run
from voxflow.volume import Volume

from conftest import Pointwise, make_layer, queue_url_for, worker_pids, write_config

SLOW_MODEL = '''
import time
import torch

class Slow(torch.nn.Module):
    """Pointwise, and slow: 0.5 s per batch."""
    def forward(self, x):
        time.sleep(0.5)
        return torch.sigmoid(4 * x - 2)
'''

POISON_MODEL = '''
import torch

class Poison(torch.nn.Module):
    """Pointwise; refuses any patch holding a saturated voxel, every time."""
    def forward(self, x):
        if bool((x >= 1.0).any()):
            raise ValueError("poison voxel in this patch")
        return torch.sigmoid(4 * x - 2)
'''


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _worker(queue_url, wid, *extra):
    return subprocess.Popen([sys.executable, "-m", "voxflow", "worker", queue_url, "--kind",
                             "inference", "--worker-id", wid, "--lease-seconds", "60", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("backend", ["sqlite", "pubsub"])
def test_sigterm_releases_lease_at_once_and_exits(tmp_path, backend, request):
    img = (np.random.default_rng(0).random((1, 8, 32, 32)) * 200).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 4))
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    queue_url = queue_url_for(backend, tmp_path, request)
    cfg_path = write_config(tmp_path / "run.yaml", input="img", output="out",
                            model={"path": "slow.py", "input_patch": [16, 16, 4],
                                   "output_channels": 1},
                            inference={"chunk": [32, 32, 8], "batch_size": 1, "blend": "crop"},
                            storage_chunk=[16, 16, 4], downsample={"mips": 0},
                            queue={"url": queue_url, "lease_seconds": 60})
    cfg = load_config(cfg_path)
    p = plan(cfg)
    create_layers(p)
    q = open_queue(queue_url)
    q.register_run("slow", cfg.model_dump_json())
    publish_stage(q, "slow", p, "inference")          # one task: ~16 patches, 8 s of work

    a = _worker(queue_url, "A")
    _until(lambda: q.busy_workers("inference") == {"A"}, 60, "A to lease the task")
    time.sleep(1.0)                                   # A is mid-task
    t0 = time.monotonic()
    a.send_signal(signal.SIGTERM)
    a.wait(timeout=10)
    exit_seconds = time.monotonic() - t0
    assert exit_seconds < 5, exit_seconds
    assert a.returncode == 0
    s = q.stats("slow")["inference"]
    assert (s.pending, s.leased) == (1, 0)            # released at once, not expired
    log = a.stdout.read()
    assert '"event": "released"' in log and '"index": 0' in log

    t1 = time.monotonic()
    b = _worker(queue_url, "B")
    try:
        _until(lambda: q.busy_workers("inference") == {"B"}, 30, "B to take the task")
        assert time.monotonic() - t1 < 30             # long before A's 60 s lease expiry
        _until(lambda: q.stats("slow")["inference"].done == 1, 60, "B to finish")
    finally:
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=10)
    assert q.dead_letters("slow") == []


@pytest.mark.parametrize("backend", ["sqlite", "pubsub"])
def test_poison_and_malformed_tasks_end_dead_and_run_fails(tmp_path, capsys, backend, request):
    img = (np.random.default_rng(1).random((1, 16, 64, 96)) * 200).astype(np.uint8)
    img[0, 12, 48, 80] = 255                          # centre of chunk (2, 1, 1): index 11
    make_layer(tmp_path / "img", img, chunk=(16, 16, 4))
    (tmp_path / "poison.py").write_text(POISON_MODEL)
    queue_url = queue_url_for(backend, tmp_path, request)
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": "poison.py", "input_patch": [16, 16, 4],
                              "output_channels": 1},
                       inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1],
                                  "blend": "crop"},
                       storage_chunk=[16, 16, 4], downsample={"mips": 0},
                       queue={"url": queue_url, "max_attempts": 2})
    create_layers(plan(load_config(cfg)))    # output exists: the run keeps this queue's rows
    q = open_queue(queue_url)
    q.publish("poison", "inference", "inference", [(1_000_000, "{not json")])
    assert main(["run", str(cfg), "--run-id", "poison", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2 task(s) of stage inference are dead" in err
    assert "#11 after 2 attempt(s): ValueError: poison voxel in this patch" in err
    assert "#1000000 after 2 attempt(s): MalformedMessage" in err
    s = q.stats("poison")["inference"]
    assert (s.done, s.dead, s.pending, s.leased) == (3 * 2 * 2 - 1, 2, 0, 0)
    assert main(["status", "poison", "--queue", queue_url]) == 0
    assert "dead: inference #11 after 2 attempt(s)" in capsys.readouterr().out
    assert main(["retry-dead", "poison", "--queue", queue_url]) == 0
    assert q.stats("poison")["inference"].pending == 2


def test_external_group_runs_on_workers_started_elsewhere(tmp_path):
    """external://: voxflow starts no worker; one started by hand serves every stage."""
    img = (np.random.default_rng(2).random((1, 8, 32, 48)) * 200).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 4))
    torch.jit.script(Pointwise().eval()).save(str(tmp_path / "m.pt"))
    queue_url = f"sqlite://{tmp_path}/q.db"
    cfg = write_config(tmp_path / "run.yaml", input="img", output="out",
                       model={"path": "m.pt", "input_patch": [16, 16, 4], "output_channels": 2},
                       inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1]},
                       storage_chunk=[16, 16, 4], downsample={"mips": 1},
                       queue={"url": queue_url},
                       workers={k: "external://" for k in ("inference", "blend", "downsample")})
    config = load_config(cfg)
    assert (config.workers.inference.group, config.workers.inference.max) == ("external://", 0)
    outside = subprocess.Popen([sys.executable, "-m", "voxflow", "worker", queue_url,
                                "--worker-id", "outside"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    seen = set()

    class Watch:
        def begin(self, run, queue): pass
        def start(self, stage, total, skipped): pass
        def finish(self): pass

        def update(self, done, dead):
            seen.update(worker_pids())

    try:
        summary = run(config, reporter=Watch(), run_id="ext")
    finally:
        outside.send_signal(signal.SIGTERM)
        outside.wait(timeout=10)
    assert seen == {"outside"}                        # the only worker was the one started here
    assert [s.name for s in summary.stages] == ["inference", "blend", "downsample-0"]
    q = open_queue(queue_url)
    assert all(s.done == s.total > 0 for s in q.stats("ext").values())
    out = Volume(f"file://{tmp_path}/out", 0)
    assert np.abs(out.read(out.bounds) - Pointwise().eval()(
        torch.from_numpy(img[None].astype(np.float32) / 255)).detach().numpy()[0]).max() < 1e-5


def test_autoscaler_target():
    scaler = Autoscaler(group=None, minimum=1, maximum=8, tasks_per_worker=4)
    assert [scaler.desired(b) for b in (0, 1, 4, 5, 31, 32, 33, 10_000)] == \
        [0, 1, 1, 2, 8, 8, 8, 8]
    assert Autoscaler(None, 0, 3, 10).desired(25) == 3


def test_local_group_replaces_dead_and_stops_only_idle(tmp_path):
    queue_url = f"sqlite://{tmp_path}/q.db"
    open_queue(queue_url).close()
    group = LocalGroup(queue_url, "inference", log_dir=tmp_path / "logs")
    try:
        group.resize(3, set())
        assert group.size() == 3
        victim_id, victim_pid = next(iter(group.pids().items()))
        os.kill(victim_pid, signal.SIGKILL)
        _until(lambda: group.size() == 2, 10, "the dead worker to be reaped")
        assert group.died == 1
        group.resize(3, set())                         # the autoscaler's next step
        assert group.size() == 3 and victim_id not in group.pids()
        keep = sorted(group.pids())[1]
        group.resize(1, busy={keep})                   # keep is working: never stopped
        _until(lambda: list(group.pids()) == [keep], 10, "the idle workers to stop")
        assert group.died == 1                         # stopped on purpose: not a death
    finally:
        group.close()
    assert group.size() == 0


def _environ(pid):
    """A worker's environment, once it is the worker: until its exec completes /proc shows
    the environment of the process that spawned it."""
    _until(lambda: b"--worker-id" in open(f"/proc/{pid}/cmdline", "rb").read(), 10,
           f"process {pid} to exec the worker")
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def test_local_auto_starts_one_worker_per_visible_gpu(tmp_path, monkeypatch):
    """local://auto with three GPUs visible (CUDA_VISIBLE_DEVICES names them; the workers
    then find no CUDA here and compute on the CPU): three workers, each given one of them
    and the same share of the cores; a fourth is never started; a dead worker's GPU goes to
    its replacement. Without GPUs: one worker, every core."""
    from voxflow.groups import open_group
    from voxflow.groups.local import local_capacity, visible_gpus
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    queue_url = f"sqlite://{tmp_path}/q.db"
    open_queue(queue_url).close()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert local_capacity("local://auto") == 3
    from voxflow.config import WorkersConfig
    assert WorkersConfig().inference.group == "local://auto"     # the default
    assert WorkersConfig().inference.max == 3
    group = open_group("local://auto", queue_url, "inference", log_dir=tmp_path / "logs",
                       capacity=3)
    try:
        group.resize(4, set())
        pids = group.pids()
        assert len(pids) == 3
        envs = {w: _environ(p) for w, p in pids.items()}
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs.values()) == ["0", "1", "2"]
        threads = {e["OMP_NUM_THREADS"] for e in envs.values()}
        assert threads == {str(max(1, (os.cpu_count() or 1) // 3))}
        victim = next(iter(pids))
        freed = envs[victim]["CUDA_VISIBLE_DEVICES"]
        os.kill(pids[victim], signal.SIGKILL)
        _until(lambda: group.size() == 2, 10, "the dead worker to be reaped")
        group.resize(3, set())
        (new,) = set(group.pids()) - set(pids)
        assert _environ(group.pids()[new])["CUDA_VISIBLE_DEVICES"] == freed
    finally:
        group.close()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = open_group("local://auto", queue_url, "inference", log_dir=tmp_path / "logs",
                     capacity=local_capacity("local://auto"))
    try:
        cpu.resize(2, set())
        (pid,) = cpu.pids().values()
        assert _environ(pid)["OMP_NUM_THREADS"] == str(os.cpu_count())
    finally:
        cpu.close()


def test_a_groups_thread_count_is_settable(tmp_path):
    from voxflow.config import GroupConfig
    from voxflow.groups import open_stage_group
    from types import SimpleNamespace
    queue_url = f"sqlite://{tmp_path}/q.db"
    open_queue(queue_url).close()
    workers = GroupConfig(group="local://2", threads=3)
    config = SimpleNamespace(workers=SimpleNamespace(inference=workers),
                             queue=SimpleNamespace(url=queue_url, lease_seconds=60.0))
    group = open_stage_group(config, "inference", "r")
    try:
        group.resize(2, set())
        assert {_environ(p)["OMP_NUM_THREADS"] for p in group.pids().values()} == {"3"}
    finally:
        group.close()


class _TimedStage:
    """A stage whose load (I/O) and compute each take a fixed time; writes take none."""

    name = kind = "inference"

    def __init__(self, seconds):
        self.seconds = seconds
        self.loaded_not_processed = 0
        self.most_in_memory = 0

    def box(self, index):
        from voxflow.geometry import Box
        return Box([index, 0, 0], [index + 1, 1, 1])

    def load(self, index):
        time.sleep(self.seconds)
        self.loaded_not_processed += 1
        self.most_in_memory = max(self.most_in_memory, self.loaded_not_processed)
        return index

    def compute(self, index, loaded):
        assert loaded == index
        time.sleep(self.seconds)
        self.loaded_not_processed -= 1
        return index

    def write(self, index, computed):
        assert computed == index


@pytest.mark.parametrize("prefetch", [True, False])
def test_worker_prefetches_one_task_ahead(tmp_path, prefetch):
    from voxflow.geometry import Box
    from voxflow.messages import encode
    from voxflow.worker import JsonLog, Worker
    q = open_queue(f"sqlite://{tmp_path}/q.db")
    q.register_run("r", "{}")
    n = 6
    q.publish("r", "inference", "inference",
              ((i, encode("r", "inference", i, Box([i, 0, 0], [i + 1, 1, 1]))) for i in range(n)))
    stage = _TimedStage(0.2)
    log = open(tmp_path / "w.log", "w")
    worker = Worker(q, lambda run, name: stage, ["inference"], "w", prefetch=prefetch,
                    log=JsonLog("w", log))
    t0 = time.monotonic()
    assert worker.run(exit_when_idle=0.0) == n
    elapsed = time.monotonic() - t0
    worker.shutdown()
    assert q.stats("r")["inference"].done == n
    serial = 2 * 0.2 * n                                   # load then process, one by one
    if prefetch:
        assert elapsed < 0.75 * serial, elapsed             # loads overlap computing
        assert stage.most_in_memory <= 2                    # current + one ahead, no more
    else:
        assert elapsed >= serial * 0.95 and stage.most_in_memory == 1


def test_a_stop_signal_is_safe_while_the_main_thread_holds_the_stop_events_lock():
    """The handler runs in the main thread between bytecodes — possibly inside `stop.wait`,
    holding the event's lock. It must not take that lock: here the lock is held while the
    handler runs, and the handler returns at once and the event is set once it is let go
    (the old handler, `stop.set()`, hung forever right there)."""
    import threading
    from voxflow.worker import stop_on_signals
    stop = threading.Event()
    before = signal.getsignal(signal.SIGUSR1)
    stop_on_signals(stop, signals=(signal.SIGUSR1,))
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        returned = threading.Event()
        with stop._cond:                                  # as inside Event.wait
            runner = threading.Thread(target=lambda: (handler(signal.SIGUSR1, None),
                                                      returned.set()), daemon=True)
            runner.start()
            assert returned.wait(5), "the signal handler blocked on the event's lock"
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGUSR1, before)


ALLOCATE_AND_FREE = """
import resource, sys, torch
from voxflow.worker import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):                                  # a batch's activations, again and again
    torch.empty(32 * 2**20).fill_(1.0)               # 128 MiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_activations_are_reused_not_faulted_in_again():
    """What a worker process applies at start (`keep_freed_memory`): the same large
    allocation made and freed 16 times faults its pages in once or twice, not 16 times
    (glibc's default unmaps it on every free)."""
    faults = {how: int(subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, how],
                                      capture_output=True, text=True, check=True).stdout)
              for how in ("default", "keep")}
    assert faults["keep"] * 4 < faults["default"], faults      # (pages or huge pages)
