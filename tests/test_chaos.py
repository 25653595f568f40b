"""Runs survive workers vanishing at any moment, and resume after the whole run is killed."""
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from voxflow.cli import main
from voxflow.queues import open_queue
from voxflow.volume import Volume

from conftest import Pointwise, chaos, make_layer, worker_pids, write_config


def _setup(tmp_path, n_chunks_z=8):
    img = (np.random.default_rng(7).random((1, 2 * n_chunks_z, 160, 160)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(32, 32, 2))
    torch.jit.script(Pointwise().eval()).save(str(tmp_path / "m.pt"))
    return dict(input="img", model={"path": "m.pt", "input_patch": [16, 16, 2],
                                    "output_channels": 2},
                inference={"chunk": [32, 32, 2], "patch_overlap": [4, 4, 0], "blend": "crop"},
                storage_chunk=[32, 32, 2], downsample={"mips": 1})


def _layer(path):
    out = Volume(f"file://{path}")
    return [out.at_mip(m).read(out.at_mip(m).bounds) for m in (0, 1)]


def test_chaos_killed_and_stopped_workers_output_identical(tmp_path):
    base = _setup(tmp_path)
    workers = {"inference": {"group": "local://4", "min": 4},
               "downsample": {"group": "local://4", "min": 4}}
    ref = write_config(tmp_path / "ref.yaml", output="ref", workers=workers, **base)
    assert main(["run", str(ref), "--quiet"]) == 0     # fault-free, same workers

    queue_url = f"sqlite://{tmp_path}/q.db"
    cfg = write_config(tmp_path / "chaos.yaml", output="chaos",
                       queue={"url": queue_url, "lease_seconds": 3, "max_attempts": 6},
                       workers=workers, **base)
    kills = []

    def kill_a_random_worker(stop):      # SIGKILL and SIGTERM (mid-write: pipelined) in turn
        rng = random.Random(0)
        while not stop.wait(rng.uniform(1.5, 2.5)):
            pids = list(worker_pids().values())
            if pids:
                victim = rng.choice(pids)
                how = signal.SIGKILL if len(kills) % 2 == 0 else signal.SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, how)
                    kills.append((victim, how))

    with chaos(kill_a_random_worker):
        assert main(["run", str(cfg), "--run-id", "chaos", "--quiet"]) == 0
    q = open_queue(queue_url)
    stats = q.stats("chaos")
    assert stats["inference"].total == 5 * 5 * 8 >= 200
    assert all(s.done == s.total and s.dead == 0 for s in stats.values()), stats
    assert len(kills) >= 3, kills                      # the chaos really happened
    for got, want in zip(_layer(tmp_path / "chaos"), _layer(tmp_path / "ref")):
        assert np.array_equal(got, want)
    assert worker_pids() == {}                   # the group scaled to zero


def test_resume_after_killing_driver_and_workers(tmp_path, voxflow_home):
    base = _setup(tmp_path)
    base["inference"]["batch_size"] = 1
    queue_url = f"sqlite://{tmp_path}/q.db"
    (tmp_path / "slow.py").write_text(
        "import time, torch\n"
        "class Slow(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        time.sleep(0.02)\n"
        "        return torch.sigmoid(x)\n")
    base["model"]["path"] = "slow.py"
    base["model"]["output_channels"] = 1
    cfg = write_config(tmp_path / "run.yaml", output="out",
                       queue={"url": queue_url, "lease_seconds": 2},
                       workers={"inference": "local://2", "downsample": "local://2"}, **base)
    driver = subprocess.Popen([sys.executable, "-m", "voxflow", "run", str(cfg), "--run-id",
                               "resume", "--quiet"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    q = open_queue(queue_url)
    deadline = time.monotonic() + 180
    while True:                                        # (the stage row exists before its tasks)
        s = q.stats("resume").get("inference")
        if s and s.total and s.done >= s.total // 2:
            break
        assert time.monotonic() < deadline, "the run never got half way"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)              # driver and workers, all at once
    driver.wait()
    time.sleep(0.5)
    done_at_kill = q.stats("resume")["inference"].done
    total = q.stats("resume")["inference"].total
    assert 0 < done_at_kill < total
    logs = voxflow_home / "logs" / "resume"
    done_events = lambda: sum(f.read_text().count('"event": "task_done"')  # noqa: E731
                              for f in logs.glob("*.log"))
    before = done_events()

    assert main(["run", str(cfg), "--run-id", "resume", "--quiet"]) == 0
    s = q.stats("resume")["inference"]
    assert s.done == total and s.dead == 0
    # every task done in the rerun was a missing one: the count is exact
    new_done = done_events() - before
    downsample_total = q.stats("resume")["downsample-0"].total
    assert new_done == (total - done_at_kill) + downsample_total
    # and the output equals a run that was never interrupted
    ref = write_config(tmp_path / "ref.yaml", output="ref", **base)   # in-process workers
    assert main(["run", str(ref), "--quiet"]) == 0
    for got, want in zip(_layer(tmp_path / "out"), _layer(tmp_path / "ref")):
        assert np.array_equal(got, want)
