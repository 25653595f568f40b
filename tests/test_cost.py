"""The bill `voxflow plan` prints: exact object counts (checked against real runs), a
petavoxel planned in seconds, dollars that follow the prices, and `voxflow bench-model`."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudfiles
import numpy as np
import pytest
import torch

from voxflow import cost
from voxflow.cli import main
from voxflow.config import load_config
from voxflow.pipeline import plan
from voxflow.volume import Volume

from conftest import Pointwise, SmallConv, make_layer, write_config

REPO = Path(__file__).resolve().parents[1]


def _files(path: Path) -> int:
    return sum(len(f) for _, _, f in os.walk(path)) if path.exists() else 0


def _layer(tmp_path, offset=(5, 7, 3), shape_zyx=(22, 90, 100)):
    img = (np.random.default_rng(0).random((1, *shape_zyx)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, offset=offset, chunk=(16, 16, 4))
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))


def _config(tmp_path, name, blend, bbox=None, **extra):
    cfg = dict(input="img", output=name,
               model={"path": "m.pt", "input_patch": [20, 20, 6], "output_patch": [16, 16, 4],
                      "output_channels": 2},
               inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1], "blend": blend,
                          "keep_temporary": True},
               storage_chunk=[16, 16, 4], **extra)
    if bbox:
        cfg["bbox"] = {"start": bbox[0], "stop": bbox[1]}
    return write_config(tmp_path / f"{name}.yaml", **cfg)


class ReadLog:
    """Every object cloud-files is asked for (cloud-volume's chunk reads and `Storage.get`
    both go through `CloudFiles.get`), by URL."""

    def __init__(self, monkeypatch):
        self.urls: list[str] = []
        real = cloudfiles.CloudFiles.get

        def get(files, paths, *args, **kwargs):
            many = paths if isinstance(paths, (list, tuple)) else [paths]
            for path in many:
                key = path["path"] if isinstance(path, dict) else path
                self.urls.append(f"{files.cloudpath.rstrip('/')}/{key}")
            return real(files, paths, *args, **kwargs)
        monkeypatch.setattr(cloudfiles.CloudFiles, "get", get)

    def under(self, url: str) -> int:
        return sum(u.startswith(url.rstrip("/") + "/") and not u.endswith(("/info", "/provenance"))
                   for u in self.urls)


CASES = {  # name: (blend, bbox, downsample)
    "overlap-whole": ("overlap", None, {"mips": 2}),
    "overlap-bbox": ("overlap", ([9, 10, 4], [97, 83, 24]), {"mips": 3, "memory_target": 10 ** 5}),
    "crop-whole": ("crop", None, {"mips": 2}),
    "crop-bbox": ("crop", ([9, 10, 4], [97, 83, 24]), {"mips": 3, "memory_target": 10 ** 5}),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_counts_exactly_the_objects_a_run_writes_and_reads(tmp_path, monkeypatch, case):
    blend, bbox, downsample = CASES[case]
    _layer(tmp_path)
    path = _config(tmp_path, "out", blend, bbox, downsample=downsample)
    p = plan(load_config(path))
    planned = cost.bill(p)
    if case.endswith("bbox"):
        assert len(p.downsample) == 3                     # one mip per pass
    reads = ReadLog(monkeypatch)
    assert main(["run", str(path), "--quiet"]) == 0
    out = Volume(f"file://{tmp_path}/out")
    written = [_files(tmp_path / "out" / s["key"]) for s in out.info["scales"]]
    assert written == planned["objects_written"]["output"]
    assert _files(tmp_path / "out.voxflow-tmp") == planned["objects_written"]["temporary"]
    assert (planned["objects_written"]["temporary"] > 0) == (blend == "overlap")
    assert planned["objects_read"]["temporary"] == (
        planned["objects_written"]["temporary"] if blend == "overlap" else 0)
    got = planned["objects_read"]
    assert reads.under(f"file://{tmp_path}/img") == got["input"]
    assert reads.under(f"file://{tmp_path}/out") == got["output"]
    assert reads.under(f"file://{tmp_path}/out.voxflow-tmp") == got["temporary"]
    stored = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*")
                 if f.parent != tmp_path / "out")
    assert stored == sum(planned["bytes_stored"]["output"])     # file:// chunks: raw


@pytest.mark.parametrize("blend", ["overlap", "crop"])
def test_sharded_object_counts_are_exact_too(tmp_path, monkeypatch, blend):
    """Sharded: one object per shard at every mip (shards a bbox cuts included), one pack per
    overlap task; packs are read twice per (shard, task) that meet; a downsample task reads
    each source shard with one GET."""
    _layer(tmp_path)
    bbox = ([9, 10, 4], [97, 83, 24]) if blend == "overlap" else None
    path = _config(tmp_path, "out", blend, bbox, downsample={"mips": 2}, sharding="on",
                   shard_bytes=16 * 16 * 4 * 8 * 8)
    p = plan(load_config(path))
    planned = cost.bill(p)
    reads = ReadLog(monkeypatch)
    assert main(["run", str(path), "--quiet"]) == 0
    assert reads.under(f"file://{tmp_path}/out") == planned["objects_read"]["output"] > 0
    out = Volume(f"file://{tmp_path}/out")
    written = [_files(tmp_path / "out" / s["key"]) for s in out.info["scales"]]
    assert written == planned["objects_written"]["output"] and min(written) >= 1
    assert all(n.endswith(".shard") for s in out.info["scales"]
               for n in os.listdir(tmp_path / "out" / s["key"]))
    packs = _files(tmp_path / "out.voxflow-tmp")
    assert packs == planned["objects_written"]["temporary"] == (
        len(p.grid) if blend == "overlap" else 0)
    if blend == "overlap":
        from voxflow.stages import stage_grid
        shards = stage_grid(p, "blend")
        meets = sum(len(p.grid.tasks_meeting(shards.box(i))) for i in range(len(shards)))
        assert planned["objects_read"]["temporary"] == 2 * meets


def test_run_summary_shows_what_was_spent_beside_the_estimate(tmp_path, capsys):
    _layer(tmp_path)
    path = _config(tmp_path, "out", "overlap", downsample={"mips": 1},
                   workers={"inference": "local://1", "blend": "local://1",
                            "downsample": "local://0"})
    t0 = time.monotonic()
    assert main(["run", str(path), "--quiet"]) == 0
    wall = time.monotonic() - t0
    text = capsys.readouterr().out
    inference = next(line for line in text.splitlines() if line.startswith("spent   inference"))
    hours = float(inference.split(": ")[1].split(" worker-hours")[0])
    assert 0 < hours * 3600 < wall and "(plan: " in inference
    assert "spent   blend:" in text and "spent   downsample:" in text
    p = plan(load_config(path))
    planned = cost.bill(p)["objects_written"]
    assert (f"output {sum(planned['output']):,} (plan {sum(planned['output']):,}), temporary "
            f"{planned['temporary']:,} (plan {planned['temporary']:,})") in text, text


def test_a_group_voxflow_does_not_run_is_measured_from_its_workers_reports(tmp_path):
    """external:// (as gce://) workers run elsewhere: no logs here, but each reports its
    session to the queue, and the summary prices those. Before any report: not measured."""
    _layer(tmp_path)
    path = _config(tmp_path, "out", "crop", queue={"url": f"sqlite://{tmp_path}/q.db"},
                   workers={"inference": "external://", "blend": "local://0",
                            "downsample": "local://0"})
    cfg = load_config(path)
    s = cost.spent(cfg, "no-such-run", tmp_path / "no-logs")
    assert s["workers"]["inference"]["measured"] is False
    from voxflow.runner import default_run_id
    run_id = default_run_id(cfg)
    workers = [subprocess.Popen([sys.executable, "-m", "voxflow", "worker", cfg.queue.url,
                                 "--kind", "inference", "--run", run_id, "--worker-id",
                                 f"elsewhere-{n}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for n in range(2)]
    try:
        t0 = time.time()
        assert main(["run", str(path), "--quiet"]) == 0    # ends the run: the workers exit
        for w in workers:
            w.wait(timeout=60)
        took = time.time() - t0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=30)
    inference = cost.spent(cfg, run_id, tmp_path / "no-logs")["workers"]["inference"]
    assert inference["measured"] and inference["workers"] == 2
    assert 0 < inference["busy_hours"] <= inference["hours"] < 2 * took / 3600
    assert "session reports" in inference["note"]


# -- a petavoxel -------------------------------------------------------------------------

PETA = (200_000, 200_000, 25_000)


@pytest.fixture(scope="module")
def petavoxel(tmp_path_factory):
    """An input `info` of 10^15 voxels (no data) and the README's example run over it."""
    root = tmp_path_factory.mktemp("peta")
    Volume.create(f"file://{root}/img", num_channels=1, dtype="uint8", resolution=(8, 8, 40),
                  voxel_offset=(0, 0, 0), size=PETA, chunk=(256, 256, 32))
    torch.jit.script(Pointwise(1, 3).eval()).save(str(root / "m.pt"))
    base = dict(input="img", model={"path": "m.pt", "input_patch": [256, 256, 20],
                                    "output_channels": 3, "precision": "bf16"},
                inference={"chunk": [1536, 1536, 192], "patch_overlap": [64, 64, 4]},
                output_dtype="uint8", downsample={"mips": 3, "factor": [2, 2, 1]})
    return root, base


@pytest.mark.parametrize("blend", ["overlap", "crop"])
def test_a_petavoxel_plans_in_seconds_and_little_memory(petavoxel, blend):
    """`voxflow plan` whole, in a fresh process — imports (torch: most of it) and the model
    check included — takes under 5 s of CPU and under 500 MiB. CPU time, not wall time:
    the development machines are shared, and a process waiting for a core is not slow (on
    an idle core, wall = CPU time here: the input is a local `info`)."""
    root, base = petavoxel
    path = write_config(root / f"{blend}.yaml", output=f"out-{blend}",
                        **{**base, "inference": {**base["inference"], "blend": blend}})
    # memory: the peak of this process's own address space (VmHWM); ru_maxrss would carry
    # the forking pytest process's size over the exec
    code = ("import re, resource, sys\nfrom voxflow.cli import main\n"
            f"rc = main(['plan', {str(path)!r}])\n"
            "r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]\n"
            "print('usage', r.ru_utime + r.ru_stime, hwm)\n"
            "sys.exit(rc)\n")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    out = done.stdout
    cpu, rss_kib = out.rsplit("usage", 1)[1].split()
    assert float(cpu) < 5.0, (float(cpu), wall, out)
    assert int(rss_kib) * 1024 < 500 * 2 ** 20, rss_kib
    assert "2248091 tasks" in out, out
    assert "objects (output by mip 30,517,578,125, 7,634,278,125, 1,911,012,500, " \
           "477,753,125;" in out
    assert "output 3.5 PiB" in out and "total: $" in out and "per output teravoxel" in out
    assert not (root / f"out-{blend}").exists()


def test_petavoxel_counts_follow_from_the_geometry(petavoxel):
    root, base = petavoxel
    cfg = load_config(write_config(root / "g.yaml", output="g", **base))
    t0 = time.perf_counter()
    p = plan(cfg, check_model=False)
    b = cost.bill(p)
    assert time.perf_counter() - t0 < 1.0          # the arithmetic itself: per axis, O(1)
    assert b["objects_written"]["output"] == [3125 ** 3, 1563 ** 2 * 3125, 782 ** 2 * 3125,
                                              391 ** 2 * 3125]
    assert b["bytes_stored"]["output"][0] == 10 ** 15 * 3
    assert b["tasks"]["inference"] == len(p.grid) == 131 ** 3
    assert b["objects_read"]["input"] > 10 ** 15 // (256 * 256 * 32)   # margins read twice


# -- prices ------------------------------------------------------------------------------

def _bill(tmp_path, capsys, name, **cost_section):
    path = _config(tmp_path, name, "overlap", downsample={"mips": 1}, cost=cost_section)
    assert main(["plan", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["bill"]


def test_dollars_follow_the_prices(tmp_path, capsys):
    _layer(tmp_path)
    base = _bill(tmp_path, capsys, "a")
    d = base["dollars"]
    assert d["total"] == pytest.approx(sum(v for k, v in d.items() if k not in (
        "total", "per_output_teravoxel", "output_storage_per_month")), abs=0.01)
    writes = sum(base["objects_written"]["output"]) + base["objects_written"]["temporary"] \
        + base["objects_written"]["queue"]
    assert d["object_writes"] == pytest.approx(writes / 1000 * 0.005, rel=1e-3)
    dear = _bill(tmp_path, capsys, "b", prices={"class_a_per_1000": 0.05, "gpu_hour": 3.4})
    assert dear["dollars"]["object_writes"] == pytest.approx(10 * d["object_writes"], rel=1e-3)
    assert dear["dollars"]["inference_workers"] == pytest.approx(
        10 * d["inference_workers"], rel=1e-3)
    assert dear["dollars"]["blend_workers"] == d["blend_workers"]
    slow = _bill(tmp_path, capsys, "c", throughput={"inference": 77e6 / 4})
    assert slow["worker_hours"]["inference"] == pytest.approx(
        4 * base["worker_hours"]["inference"])
    dated = _bill(tmp_path, capsys, "d", prices={"date": "2027-01-31"})
    assert dated["prices_date"] == "2027-01-31"


@pytest.mark.parametrize("key,value", [("prices.gpu_hour", -1), ("prices.pubsub_tib", "x"),
                                       ("throughput.inference", 0),
                                       ("throughput.blend", float("inf")),
                                       ("prices.storage_gb_mont", 1)])
def test_a_bad_price_or_throughput_is_refused_naming_the_field(tmp_path, capsys, key, value):
    _layer(tmp_path)
    section, leaf = key.split(".")
    path = _config(tmp_path, "out", "overlap", cost={section: {leaf: value}})
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"voxflow: error: cost.{key}:"), err
    assert not (tmp_path / "out").exists()


def test_cost_settings_do_not_change_the_run_identity(tmp_path):
    from voxflow.identity import run_identity
    _layer(tmp_path)
    a = load_config(_config(tmp_path, "out", "overlap"))
    b = load_config(_config(tmp_path, "out", "overlap", cost={"prices": {"gpu_hour": 9}}))
    assert run_identity(a).digest == run_identity(b).digest


# -- bench-model -------------------------------------------------------------------------

def test_bench_model_prints_a_throughput_that_plan_then_uses(tmp_path, capsys):
    _layer(tmp_path)
    path = _config(tmp_path, "out", "crop", downsample={"mips": 0})
    assert main(["bench-model", str(path), "--seconds", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "Mvox/s per worker" in text and "cost: {throughput: {inference: " in text
    assert main(["bench-model", str(path), "--seconds", "0.2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["patches"] > 0 and m["throughput"] > 0 and m["device"] == "cpu"
    cfg = load_config(path)
    assert m["throughput"] == pytest.approx(
        m["patches_per_second"] * 32 * 32 * 8 / cost.chunk_patches(cfg))
    cfg.cost.throughput.inference = m["throughput"]
    p = plan(cfg)
    hours = cost.bill(p)["worker_hours"]["inference"]
    assert hours * 3600 == pytest.approx(cost.inference_patches(p) / m["patches_per_second"])
    assert not (tmp_path / "out").exists()
