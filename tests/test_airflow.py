"""The pipeline as Airflow DAGs: parsing, the trigger form, and real runs through a real
Airflow (api-server, scheduler, dag-processor, triggerer) started here on a loopback port."""
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "dags" / "pipelines").glob("*.yaml"))


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    import os
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    from airflow.dag_processing.dagbag import DagBag
    return DagBag(str(REPO / "dags"))


def test_every_pipeline_yaml_is_a_dag_with_the_stage_tasks(dagbag):
    from operators.dag_factory import stage_kinds
    from voxflow.config import parse_config
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == sorted(p.stem for p in PIPELINES) and PIPELINES
    for path in PIPELINES:
        dag = dagbag.dags[path.stem]
        data = yaml.safe_load(path.read_text())
        kinds = stage_kinds(parse_config({k: v for k, v in data.items() if k not in
                                          ("schedule", "assets", "catchup", "description",
                                           "tags")}, base_dir=path.parent))
        expected = {"plan", "finalize"} | {f"{k}.{t}" for k in kinds
                                           for t in ("publish", "scale_up", "wait", "scale_down")}
        assert {t.task_id for t in dag.tasks} == expected
        down = {t.task_id: t.downstream_task_ids for t in dag.tasks}
        assert down["plan"] == {f"{kinds[0]}.publish"}
        for k, nxt in zip(kinds, kinds[1:] + [None]):
            assert down[f"{k}.publish"] == {f"{k}.scale_up", f"{k}.scale_down"}
            assert down[f"{k}.scale_up"] == {f"{k}.wait", f"{k}.scale_down"}
            assert dag.get_task(f"{k}.scale_down").is_teardown
            # both are setups: the teardown runs if either succeeded (a cancel during
            # scale_up marks it failed after it may have started workers)
            assert dag.get_task(f"{k}.publish").is_setup and dag.get_task(
                f"{k}.scale_up").is_setup
            after = f"{nxt}.publish" if nxt else "finalize"
            assert after in down[f"{k}.wait"]
    durations = [s.duration for s in dagbag.dagbag_stats]
    assert sum(d.total_seconds() if hasattr(d, "total_seconds") else d
               for d in durations) < 2.0                  # nothing heavy at parse time


def test_trigger_form_params_come_from_the_config(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError
    dag = dagbag.dags["demo"]
    params = dag.params
    data = yaml.safe_load((REPO / "dags" / "pipelines" / "demo.yaml").read_text())
    assert params["inference.chunk"] == data["inference"]["chunk"]
    assert params["model.input_patch"] == data["model"]["input_patch"]
    assert params["output_dtype"] == "uint8"
    raw = params.get_param("inference.blend")
    assert raw.schema["enum"] == ["crop", "overlap"] and raw.schema["section"] == "inference"
    assert raw.description
    bad = params.get_param("model.precision")
    with pytest.raises(ParamValidationError):
        bad.resolve("fp8")
    with pytest.raises(ParamValidationError):
        params.get_param("inference.chunk").resolve([1, 2])


# -- a real Airflow ---------------------------------------------------------------------

PIPELINE = """
input: {data}/image
output: {data}/out-default
model:
  path: {data}/model.py
  input_patch: [32, 32, 8]
  output_channels: 1
inference: {{chunk: [64, 64, 8], patch_overlap: [8, 8, 2]}}
storage_chunk: [32, 32, 8]
downsample: {{mips: 1}}
queue: sqlite://{data}/queue.db
workers:
  inference: {{group: local://2, tasks_per_worker: 2}}
  downsample: local://1
"""

MODEL = """
import time, torch

class Net(torch.nn.Module):
    def forward(self, x):
        time.sleep({delay})
        return torch.sigmoid(8 * x - 4)
"""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, pubsub):
    """A real Airflow; its components inherit PUBSUB_EMULATOR_HOST (the `pubsub` fixture)."""
    from operators.local import start
    from voxflow.volume import Volume
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    data.mkdir()
    img = (np.random.default_rng(0).random((1, 16, 128, 128)) * 255).astype(np.uint8)
    vol = Volume.create(f"file://{data}/image", num_channels=1, dtype="uint8",
                        resolution=(8, 8, 40), voxel_offset=(0, 0, 0), size=(128, 128, 16),
                        chunk=(32, 32, 8))
    vol.write(vol.bounds, img)
    (data / "model.py").write_text(MODEL.format(delay=0))
    (data / "slow.py").write_text(MODEL.format(delay=5.0))
    (data / "medium.py").write_text(MODEL.format(delay=1.0))
    dags = root / "dags"
    (dags / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "voxflow_pipelines.py", dags)
    (dags / "pipelines" / "e2e.yaml").write_text(PIPELINE.format(data=data))
    import os
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    try:
        af = start(root / "home", voxflow_home=root / "voxflow-home")
    finally:
        del os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    af.data = data
    af.voxflow_home = root / "voxflow-home"
    try:
        af.tok = af.token()
        deadline = time.monotonic() + 120
        while not af.api("GET", "/dags?dag_id_pattern=e2e", token=af.tok)["dags"]:
            assert time.monotonic() < deadline, "the e2e DAG never appeared"
            time.sleep(1)
        yield af
    finally:
        af.stop()


def _trigger(af, conf):
    return af.api("POST", "/dags/e2e/dagRuns", {"logical_date": None, "conf": conf},
                  token=af.tok)["dag_run_id"]


def _follow(af, run, timeout=300):
    """Poll a run to its end; returns (state, {task: set of states seen})."""
    seen: dict[str, set] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = af.api("GET", f"/dags/e2e/dagRuns/{run}", token=af.tok)["state"]
        for ti in af.api("GET", f"/dags/e2e/dagRuns/{run}/taskInstances",
                         token=af.tok)["task_instances"]:
            seen.setdefault(ti["task_id"], set()).add(ti["state"])
        if state in ("success", "failed"):
            return state, seen
        time.sleep(0.5)
    raise AssertionError(f"run {run} did not finish: {seen}")


def _log(af, run, task):
    req = urllib.request.Request(
        f"{af.url}/api/v2/dags/e2e/dagRuns/{run}/taskInstances/{task}/logs/1?full_content=true",
        headers={"Authorization": f"Bearer {af.tok}", "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.dumps(json.loads(r.read()))


def test_two_concurrent_runs_succeed_and_wait_is_deferred(airflow):
    from operators.pipeline import run_id_for
    from voxflow.queues import open_queue
    from voxflow.volume import Volume
    a = _trigger(airflow, {"output": f"{airflow.data}/out-a",      # seconds of work per task
                           "model.path": f"{airflow.data}/medium.py"})
    b = _trigger(airflow, {"output": f"{airflow.data}/out-b", "inference.chunk": [128, 64, 8],
                           "output_dtype": "uint8"})
    state_a, seen_a = _follow(airflow, a)
    state_b, _ = _follow(airflow, b)
    assert (state_a, state_b) == ("success", "success"), seen_a
    assert "deferred" in seen_a["inference.wait"]            # held no worker slot
    out_a = Volume(f"file://{airflow.data}/out-a")
    out_b = Volume(f"file://{airflow.data}/out-b")
    assert out_a.dtype == np.float32 and out_b.dtype == np.uint8
    img = Volume(f"file://{airflow.data}/image").read(out_a.bounds)
    want = 1 / (1 + np.exp(-(8 * img.astype(np.float32) / 255 - 4)))
    assert np.abs(out_a.read(out_a.bounds) - want).max() < 1e-5
    assert np.abs(out_b.read(out_b.bounds).astype(int) - np.round(want * 255)).max() <= 1
    assert out_a.at_mip(1).read(out_a.at_mip(1).bounds).any()  # downsampled
    q = open_queue(f"sqlite://{airflow.data}/queue.db")
    for run, n in ((a, 2 * 2 * 2), (b, 1 * 2 * 2)):
        stats = q.stats(run_id_for("e2e", run))
        assert stats["inference"].done == stats["inference"].total == n
    summary = airflow.api("GET", f"/dags/e2e/dagRuns/{a}/taskInstances/finalize/xcomEntries/"
                          "return_value", token=airflow.tok)["value"]
    assert summary["voxels"] == 128 * 128 * 16 and summary["output"].endswith("out-a")
    assert summary["neuroglancer"].startswith("voxflow view ")     # a local output
    links = airflow.api("GET", f"/dags/e2e/dagRuns/{a}/taskInstances/finalize/links",
                        token=airflow.tok)
    assert links["extra_links"] == {"Neuroglancer": "/voxflow/"}


def test_a_run_on_the_pubsub_queue(airflow):
    """The form switches the queue to Pub/Sub: the deferrable wait polls the ledger's counts,
    and finalize deletes the run's topics and subscriptions."""
    from google.cloud import pubsub_v1
    from operators.pipeline import run_id_for
    from voxflow.queues import open_queue
    from voxflow.volume import Volume
    url = f"pubsub://test-project/af?ledger=file://{airflow.data}/ledger"
    run = _trigger(airflow, {"output": f"{airflow.data}/out-pubsub", "queue.url": url})
    state, seen = _follow(airflow, run)
    assert state == "success", seen
    out = Volume(f"file://{airflow.data}/out-pubsub")
    img = Volume(f"file://{airflow.data}/image").read(out.bounds)
    want = 1 / (1 + np.exp(-(8 * img.astype(np.float32) / 255 - 4)))
    assert np.abs(out.read(out.bounds) - want).max() < 1e-5
    stats = open_queue(url).stats(run_id_for("e2e", run))
    assert stats["inference"].done == stats["inference"].total == 2 * 2 * 2
    assert all(s.open == 0 and s.dead == 0 for s in stats.values())
    topics = [t.name for t in pubsub_v1.PublisherClient().list_topics(
        request={"project": "projects/test-project"}) if "/topics/af-" in t.name]
    assert topics == []


def test_bad_parameter_fails_at_plan_naming_the_field(airflow):
    from operators.pipeline import run_id_for
    from voxflow.queues import open_queue
    run = _trigger(airflow, {"output": f"{airflow.data}/out-bad",
                             "inference.patch_overlap": [32, 8, 2]})
    state, seen = _follow(airflow, run)
    assert state == "failed" and "failed" in seen["plan"]
    assert "inference.patch_overlap" in _log(airflow, run, "plan")
    assert "success" not in seen.get("inference.publish", set())
    assert open_queue(f"sqlite://{airflow.data}/queue.db").stats(run_id_for("e2e", run)) == {}
    assert not (airflow.data / "out-bad").exists()


def test_cancelling_a_run_scales_its_workers_to_zero(airflow):
    from operators.pipeline import run_id_for
    from voxflow.groups.local import _alive
    from voxflow.queues import open_queue
    run = _trigger(airflow, {"output": f"{airflow.data}/out-cancel",   # minutes of work
                             "model.path": f"{airflow.data}/slow.py",
                             "inference.chunk": [32, 32, 8], "inference.batch_size": 1})
    group = airflow.voxflow_home / "groups" / run_id_for("e2e", run) / "inference"
    deadline = time.monotonic() + 180
    while not (group.exists() and list(group.glob("*.pid"))):
        assert time.monotonic() < deadline, "workers never started"
        time.sleep(0.2)
    workers = {p.stem: int(p.read_text()) for p in group.glob("*.pid")}
    assert any(_alive(pid, wid) for wid, pid in workers.items())
    airflow.api("PATCH", f"/dags/e2e/dagRuns/{run}", {"state": "failed"}, token=airflow.tok)
    deadline = time.monotonic() + 180          # the scheduler can be slow on 2 loaded cores
    # the teardown stops the workers, then removes their pid files: wait for both
    while any(_alive(pid, wid) for wid, pid in workers.items()) or list(group.glob("*.pid")):
        assert time.monotonic() < deadline, "the run's workers outlived its cancellation"
        time.sleep(0.5)
    # stopped with work left: the teardown scaled them down (a worker only exits on its own
    # after 60 s with nothing to pull, and there was plenty)
    stats = open_queue(f"sqlite://{airflow.data}/queue.db").stats(run_id_for("e2e", run))
    assert stats["inference"].pending > 0
    tis = {ti["task_id"]: ti["state"] for ti in airflow.api(
        "GET", f"/dags/e2e/dagRuns/{run}/taskInstances", token=airflow.tok)["task_instances"]}
    assert tis["inference.scale_down"] == "success"


def test_schedule_and_asset_triggers(tmp_path):
    from operators.dag_factory import build_dag
    common = {"input": "/data/img", "output": "/data/out",
              "model": {"path": "/models/net.pt2", "input_patch": [64, 64, 16],
                        "output_channels": 1}}

    def dag_for(name, **pipeline):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**common, **pipeline}))
        return build_dag(path)

    nightly = dag_for("nightly", schedule="0 3 * * *")
    assert nightly.dag_id == "nightly" and not nightly.catchup
    assert nightly.schedule == "0 3 * * *"
    on_model = dag_for("on_model", assets=["file:///models/net.pt2"])
    assert "file:///models/net.pt2" in repr(on_model.timetable.asset_condition)
    both = dag_for("both", schedule="@daily", assets=["file:///models/net.pt2"])
    assert "file:///models/net.pt2" in repr(both.timetable.asset_condition)
    assert both.timetable.timetable.description == "At 00:00"
    assert dag_for("caught_up", schedule="@daily", catchup=True).catchup


def test_plugin_runs_page_needs_login_and_shows_progress(airflow):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{airflow.url}/voxflow/runs", timeout=30)
    assert err.value.code in (401, 403)
    runs = [r for r in _plugin_get(airflow, "/voxflow/runs?queue="
                                   f"sqlite://{airflow.data}/queue.db") if "inference" in r["stages"]]
    assert runs and all(r["stages"]["inference"]["total"] > 0 for r in runs)
    page = _plugin_get(airflow, f"/voxflow/?queue=sqlite://{airflow.data}/queue.db", raw=True)
    assert "voxflow runs" in page and runs[0]["run"] in page
    plugins = airflow.api("GET", "/plugins", token=airflow.tok)["plugins"]
    mine = [p for p in plugins if p["name"] == "voxflow"]
    assert mine and mine[0]["fastapi_apps"] and mine[0]["external_views"]


def _plugin_get(af, path, raw=False):
    req = urllib.request.Request(f"{af.url}{path}",
                                 headers={"Authorization": f"Bearer {af.tok}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read().decode()
    return body if raw else json.loads(body)
