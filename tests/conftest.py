"""Shared fixtures: real precomputed layers on disk and small real models."""
from __future__ import annotations

import os
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
import yaml

from voxflow.volume import Volume


def make_layer(path: Path, data: np.ndarray, offset: Sequence[int] = (0, 0, 0),
               resolution: Sequence[float] = (8, 8, 40), chunk: Sequence[int] = (32, 32, 8),
               mips: int = 0, factor: Sequence[int] = (2, 2, 1)) -> str:
    """A precomputed image layer holding `data` (c, z, y, x) at mip 0, plus `mips` scales
    made by plain striding-free averaging (written independently of voxflow's downsampler)."""
    url = f"file://{path}"
    c, z, y, x = data.shape
    vol = Volume.create(url, num_channels=c, dtype=str(data.dtype), resolution=resolution,
                        voxel_offset=offset, size=(x, y, z), chunk=chunk)
    vol.write(vol.bounds, data)
    if mips:
        vol.ensure_mips(factor, mips)
        level = data.astype(np.float64)
        for m in range(1, mips + 1):
            fz, fy, fx = factor[2], factor[1], factor[0]
            cz, cy, cx = (-(-n // f) for n, f in zip(level.shape[1:], (fz, fy, fx)))
            pad = [(0, 0), (0, cz * fz - level.shape[1]), (0, cy * fy - level.shape[2]),
                   (0, cx * fx - level.shape[3])]
            level = np.pad(level, pad, mode="edge").reshape(c, cz, fz, cy, fy, cx, fx)
            level = level.mean(axis=(2, 4, 6))
            Volume(url, m).write(Volume(url, m).bounds, level.astype(data.dtype))
    return url


class Pointwise(torch.nn.Module):
    """1x1x1 conv + sigmoid: output at a voxel depends on that voxel only."""

    def __init__(self, cin: int = 1, cout: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv3d(cin, cout, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-3, 4, cin * cout).reshape(cout, cin, 1, 1, 1))
            self.conv.bias.copy_(torch.linspace(-1, 0.5, cout))

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


class SmallConv(torch.nn.Module):
    """Two 3x3x3 convs ('same' padding): a receptive field of 5 voxels per axis."""

    def __init__(self, cin: int = 1, cout: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv3d(cin, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, cout, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return torch.sigmoid(self.b(torch.relu(self.a(x))))


@pytest.fixture
def torchscript_model(tmp_path):
    def save(module: torch.nn.Module, name: str = "model.pt") -> Path:
        path = tmp_path / name
        torch.jit.script(module.eval()).save(str(path))
        return path
    return save


@pytest.fixture(autouse=True)
def voxflow_home(tmp_path, monkeypatch):
    """Every test gets its own embedded queue and logs (never ~/.voxflow)."""
    home = tmp_path / "voxflow-home"
    monkeypatch.setenv("VOXFLOW_HOME", str(home))
    return home


INLINE = {"inference": "local://0", "blend": "local://0", "downsample": "local://0"}


def write_config(path: Path, **config) -> Path:
    """A YAML run config. Unless the test names worker groups, the driver works the queue
    itself (local://0): the queue, messages and Worker are the same, minus process start-up;
    tests of worker processes name local://N."""
    config.setdefault("workers", INLINE)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def worker_pids() -> dict[str, int]:
    """worker id -> PID of the `voxflow worker` processes this test process started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and "worker" in cmd and "--worker-id" in cmd:
            found[cmd[cmd.index("--worker-id") + 1]] = int(entry.name)
    return found


def sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def chaos(step: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run `step(stop)` on a thread for the duration of the block; `step` loops until
    `stop` is set (killing workers as it sees fit)."""
    stop = threading.Event()
    thread = threading.Thread(target=step, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def queue_url_for(backend: str, tmp_path, request) -> str:
    """A fresh queue URL on `backend`: a SQLite file, or Pub/Sub (the emulator, a unique topic
    prefix, the ledger on disk)."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/queue.db"
    request.getfixturevalue("pubsub")
    return f"pubsub://test-project/t{uuid.uuid4().hex[:8]}?ledger=file://{tmp_path}/ledger"


# Session fixtures of the emulators (tests/ is on sys.path under pytest's default import mode)
from gcs_emulator import gcs  # noqa: E402,F401
from pubsub_emulator import pubsub  # noqa: E402,F401


@pytest.fixture(scope="session")
def console_airflow(tmp_path_factory):
    """A real Airflow with the console tests' pipelines (tests/console_support.py)."""
    from console_support import start_console_airflow
    yield from start_console_airflow(tmp_path_factory)


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium through Playwright (never a downloaded browser)."""
    from console_support import start_browser
    yield from start_browser()


# `make test` runs the suite on two xdist workers. Tests that start an Airflow share one
# worker (module and session fixtures start it once there, not once per worker); the
# worker-process tests spread over both, beside them.
AIRFLOW_MODULES = {"test_airflow.py", "test_console.py", "test_console_pipelines.py",
                   "test_cost_gate.py", "test_restarts.py"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.name in AIRFLOW_MODULES:
            item.add_marker(pytest.mark.xdist_group("airflow"))
