"""A run produces what it was asked for: identity by content, a changed model is never passed
off as done, missing input is an error, a run's workers stop when the run ends, pipeline files
fail one by one. Real layers, real models, real SQLite, real worker processes."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from voxflow.cli import main
from voxflow.config import load_config
from voxflow.geometry import Box
from voxflow.identity import run_identity
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.runner import RunFailed, publish_stage, register, run
from voxflow.volume import Volume

from conftest import Pointwise, make_layer, write_config

REPO = Path(__file__).resolve().parents[1]


def _scaled(factor: float) -> torch.nn.Module:
    net = Pointwise(1, 2)
    with torch.no_grad():
        net.conv.weight.mul_(factor)
    return net.eval()


@pytest.fixture
def layer(tmp_path):
    img = (np.random.default_rng(3).random((1, 16, 64, 64)) * 255).astype(np.uint8)
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8))
    return img


def _config(tmp_path, **extra):
    base = dict(input="img", output="out",
                model={"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
                inference={"chunk": [32, 32, 16], "patch_overlap": [4, 4, 2]},
                storage_chunk=[16, 16, 8], downsample={"mips": 1},
                queue={"url": f"sqlite://{tmp_path}/queue.db"})
    base.update(extra)
    return write_config(tmp_path / "run.yaml", **base)


def test_operational_settings_keep_the_identity_and_byte_settings_change_it(tmp_path, layer,
                                                                            torchscript_model):
    torchscript_model(_scaled(1.0))
    base = run_identity(load_config(_config(tmp_path)))
    same = run_identity(load_config(_config(
        tmp_path, queue={"url": f"sqlite://{tmp_path}/other.db", "lease_seconds": 7},
        workers={"inference": {"group": "local://3", "max": 2}, "downsample": "local://1"})))
    assert same.digest == base.digest
    for changed in (dict(output_dtype="uint8"), dict(downsample={"mips": 2}),
                    dict(inference={"chunk": [48, 48, 16], "patch_overlap": [4, 4, 2]}),
                    dict(input_missing="zeros")):
        assert run_identity(load_config(_config(tmp_path, **changed))).digest != base.digest
    torchscript_model(_scaled(2.0))                    # retrained, saved over the same path
    assert run_identity(load_config(_config(tmp_path))).model_digest != base.model_digest
    # the model moved to another folder: same bytes, same identity
    torchscript_model(_scaled(1.0))
    (tmp_path / "models").mkdir()
    shutil.move(tmp_path / "model.pt", tmp_path / "models" / "model.pt")
    moved = run_identity(load_config(_config(tmp_path, model={
        "path": "models/model.pt", "input_patch": [16, 16, 8], "output_channels": 2})))
    assert moved.digest == base.digest


def test_rerun_with_only_workers_changed_skips_every_task(tmp_path, layer, torchscript_model):
    torchscript_model(_scaled(1.0))
    first = run(load_config(_config(tmp_path)))
    again = run(load_config(_config(tmp_path, workers={
        "inference": {"group": "local://0", "max": 5}, "blend": "local://0",
        "downsample": "local://0"}, queue={"url": f"sqlite://{tmp_path}/queue.db",
                                           "lease_seconds": 13})))
    assert again.run == first.run
    assert [s.skipped for s in again.stages] == [s.tasks for s in first.stages]
    assert all(s.tasks > 0 for s in again.stages)


def test_a_model_saved_over_the_old_one_is_recomputed(tmp_path, layer, torchscript_model,
                                                      capsys):
    torchscript_model(_scaled(1.0))
    old = run(load_config(_config(tmp_path)))
    torchscript_model(_scaled(-1.5))                   # other weights, same model.path
    new = run(load_config(_config(tmp_path)))
    assert new.run != old.run and new.model_digest != old.model_digest
    assert all(s.skipped == 0 for s in new.stages)
    got = {m: Volume(f"file://{tmp_path}/out", m).read(Volume(f"file://{tmp_path}/out",
                                                              m).bounds) for m in (0, 1)}
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(tmp_path / "img", fresh / "img")
    shutil.copy(tmp_path / "model.pt", fresh / "model.pt")
    run(load_config(_config(fresh)))
    for m in (0, 1):
        want = Volume(f"file://{fresh}/out", m)
        assert np.array_equal(got[m], want.read(want.bounds)), m
    capsys.readouterr()
    assert main(["status", new.run, "--queue", f"sqlite://{tmp_path}/queue.db"]) == 0
    assert f"model {new.model_digest}" in capsys.readouterr().out


def test_a_model_changed_mid_run_is_refused_by_workers(tmp_path, layer, torchscript_model,
                                                       capsys):
    """Plan saw one model; the file is overwritten before the workers load it: every
    inference task fails naming model.path, none is computed with the other model."""
    torchscript_model(_scaled(1.0))
    cfg = load_config(_config(tmp_path, queue={"url": f"sqlite://{tmp_path}/queue.db",
                                               "max_attempts": 1}))
    p = plan(cfg)
    run_id, _ = register(cfg, p)
    q = open_queue(cfg.queue.url)
    publish_stage(q, run_id, p, "inference")
    torchscript_model(_scaled(3.0))
    from voxflow.stages import StageCache
    from voxflow.worker import Worker
    w = Worker(q, StageCache(q), ["inference"], "w", runs=[run_id])
    w.run(exit_when_idle=0.5)
    s = q.stats(run_id)["inference"]
    assert s.done == 0 and s.dead == s.total > 0
    assert all("model.path" in d.error and "changed since run" in d.error
               for d in q.dead_letters(run_id))


def test_a_missing_input_chunk_is_an_error_naming_it(tmp_path, layer, torchscript_model):
    torchscript_model(_scaled(1.0))
    chunk = tmp_path / "img" / "8_8_40" / "16-32_32-48_8-16"
    assert chunk.exists()
    chunk.unlink()
    with pytest.raises(RunFailed) as err:
        run(load_config(_config(tmp_path, queue={"url": f"sqlite://{tmp_path}/queue.db",
                                                 "max_attempts": 1})))
    assert "8_8_40/16-32_32-48_8-16" in str(err.value) and "is missing" in str(err.value)
    # zeros on purpose: the run completes and reads the hole as 0
    run(load_config(_config(tmp_path, input_missing="zeros", output="out-zeros")))
    out = Volume(f"file://{tmp_path}/out-zeros")
    hole = out.read(Box((16, 32, 8), (32, 48, 16)))
    net = _scaled(1.0)
    with torch.no_grad():
        zero = net(torch.zeros(1, 1, 1, 1, 1))[0, :, 0, 0, 0].numpy()
    assert np.allclose(hole, zero[:, None, None, None], atol=1e-6)


# -- a run's workers stop when the run ends -----------------------------------------------

SLOW = '''
import time, torch
class Slow(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.3)
        return torch.sigmoid(4 * x - 2)
'''


def _slow_run(tmp_path, timeout, batch_size=1):
    """32 crop tasks of 8 patches, 0.3 s per batch: 2.4 s per task at batch_size 1."""
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = load_config(_config(tmp_path, model={"path": "slow.py", "input_patch": [16, 16, 8],
                                               "output_channels": 1},
                              inference={"chunk": [16, 16, 8], "batch_size": batch_size,
                                         "blend": "crop"},
                              queue={"url": f"sqlite://{tmp_path}/queue.db",
                                     "driver_timeout_seconds": timeout}))
    p = plan(cfg)
    run_id, _ = register(cfg, p)
    q = open_queue(cfg.queue.url)
    publish_stage(q, run_id, p, "inference")
    return q, run_id


def _worker_process(queue_url, run_id, wid, log):
    """A worker process logging to a file (a pipe nobody reads until it exits would fill
    and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "voxflow", "worker", queue_url,
                                 "--kind", "inference", "--worker-id", wid, "--run", run_id],
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_exit(proc, seconds):
    t0 = time.monotonic()
    proc.wait(timeout=seconds)
    return time.monotonic() - t0


@pytest.mark.parametrize("how", ["cancelled", "driver_gone"])
def test_workers_give_a_run_up_when_it_ends(tmp_path, layer, how):
    q, run_id = _slow_run(tmp_path, timeout=4.0)
    log = tmp_path / "w1.log"
    worker = _worker_process(q.url, run_id, "w1", log)
    try:
        deadline = time.monotonic() + 60
        while q.stats(run_id)["inference"].done < 2:     # it works while the driver beats
            assert time.monotonic() < deadline, log.read_text()
            q.heartbeat(run_id)
            time.sleep(0.2)
        if how == "cancelled":
            q.end_run(run_id, "cancelled")
            limit = 8.0                                  # checks every 2 s, one task in flight
        else:
            limit = 4.0 + 8.0                            # the timeout, then as above
        assert _wait_exit(worker, limit + 20) < limit
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    assert worker.returncode == 0
    s = q.stats(run_id)["inference"]
    assert s.leased == 0 and s.pending > 0 and s.dead == 0   # given back, not lost
    assert '"event": "runs_ended"' in log.read_text()


def test_a_worker_keeps_a_run_whose_driver_beats(tmp_path, layer):
    """The run lasts many driver timeouts: beating, it is never given up."""
    q, run_id = _slow_run(tmp_path, timeout=2.0, batch_size=8)
    worker = _worker_process(q.url, run_id, "w2", tmp_path / "w2.log")
    try:
        deadline = time.monotonic() + 120
        while q.stats(run_id)["inference"].open:
            assert time.monotonic() < deadline and worker.poll() is None
            q.heartbeat(run_id)
            time.sleep(0.5)
    finally:
        worker.kill()                  # never leave it to the next test (worker_pids sees it)
        worker.wait(timeout=30)
    assert q.stats(run_id)["inference"].done == 32


# -- pipeline files ------------------------------------------------------------------------

def _bad_pipeline(folder):
    good = yaml.safe_load((REPO / "dags" / "pipelines" / "demo.yaml").read_text())
    bad = {**good, "inference": {**good["inference"], "patch_overlap": [64, 16, 4]}}
    (folder / "broken.yaml").write_text(yaml.safe_dump(bad))
    (folder / "typo.yaml").write_text(yaml.safe_dump({**good, "schedul": "@daily"}))


def test_validate_checks_pipeline_files_one_by_one(tmp_path, layer, torchscript_model,
                                                   capsys):
    torchscript_model(_scaled(1.0))
    folder = tmp_path / "pipelines"
    folder.mkdir()
    good = yaml.safe_load(_config(tmp_path).read_text())
    good.update(input=str(tmp_path / "img"), output=str(tmp_path / "out"),
                model={**good["model"], "path": str(tmp_path / "model.pt")},
                schedule="0 3 * * *", watch=["model"], tags=["nightly"])
    (folder / "good.yaml").write_text(yaml.safe_dump(good))
    (folder / "bad-cron.yaml").write_text(yaml.safe_dump({**good, "schedule": "at 3"}))
    _bad_pipeline(folder)
    code = main(["validate", *sorted(str(p) for p in folder.glob("*.yaml"))])
    out, err = capsys.readouterr()
    assert code == 2
    assert out.strip() == f"ok: {folder / 'good.yaml'}"
    assert "broken.yaml: inference.patch_overlap" in err
    assert "typo.yaml: schedul: unknown key" in err
    assert "bad-cron.yaml: schedule: 'at 3' is neither a cron expression" in err


def test_one_broken_pipeline_file_leaves_the_others_in_airflow(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow-home"))
    dags = tmp_path / "dags"
    (dags / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "voxflow_pipelines.py", dags)
    demo = (REPO / "dags" / "pipelines" / "demo.yaml").read_text()
    (dags / "pipelines" / "demo.yaml").write_text(demo.replace("../../", f"{REPO}/"))
    _bad_pipeline(dags / "pipelines")
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(str(dags))
    assert bag.import_errors == {}         # an import error would make Airflow hide them all
    assert sorted(bag.dags) == ["broken", "demo", "typo"]
    assert "refused" not in bag.dags["demo"].tags
    for name, error in (("broken", "pipelines/broken.yaml: inference.patch_overlap"),
                        ("typo", "pipelines/typo.yaml: schedul: unknown key")):
        dag = bag.dags[name]
        assert "refused" in dag.tags and error in dag.description
        assert dag.schedule is None and [t.task_id for t in dag.tasks] == ["refused"]
        with pytest.raises(Exception, match="refused, nothing runs: " + error):
            dag.get_task("refused").execute({})
