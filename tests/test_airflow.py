"""The pipeline as Airflow DAGs: parsing, the trigger form, and real runs through a real
Airflow (api-server, scheduler, dag-processor, triggerer) started here on a loopback port."""
import copy
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.parse
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


def test_every_pipeline_yaml_is_a_dag_with_every_stage_kind(dagbag):
    """Every DAG can run every kind of stage (the trigger form may ask for stages the YAML
    lacks); the plan skips the groups a run does not need, so each group (and finalize)
    follows the plan and every earlier group, on none_failed: a skipped group in between
    never lets a later one start early."""
    from operators.dag_factory import KINDS
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == sorted(p.stem for p in PIPELINES) and PIPELINES
    for path in PIPELINES:
        dag = dagbag.dags[path.stem]
        expected = {"plan", "finalize"} | {f"{k}.{t}" for k in KINDS
                                           for t in ("publish", "scale_up", "wait", "scale_down")}
        assert {t.task_id for t in dag.tasks} == expected
        down = {t.task_id: t.downstream_task_ids for t in dag.tasks}
        assert down["plan"] == {f"{k}.publish" for k in KINDS} | {"finalize"}
        assert dag.get_task("plan").groups == {
            k: [f"{k}.{t}" for t in ("publish", "scale_up", "wait", "scale_down")] for k in KINDS}
        for i, k in enumerate(KINDS):
            assert down[f"{k}.publish"] == {f"{k}.scale_up", f"{k}.scale_down"}
            assert down[f"{k}.scale_up"] == {f"{k}.wait", f"{k}.scale_down"}
            assert dag.get_task(f"{k}.scale_down").is_teardown
            # both are setups: the teardown runs if either succeeded (a cancel during
            # scale_up marks it failed after it may have started workers)
            assert dag.get_task(f"{k}.publish").is_setup and dag.get_task(
                f"{k}.scale_up").is_setup
            assert dag.get_task(f"{k}.publish").trigger_rule == "none_failed"
            assert down[f"{k}.wait"] - {f"{k}.scale_down"} == \
                {f"{later}.publish" for later in KINDS[i + 1:]} | {"finalize"}
        finalize = dag.get_task("finalize")
        assert finalize.trigger_rule == "none_failed"
        assert [o.name for o in finalize.outlets] == [f"voxflow-output-{path.stem}"]
    durations = [s.duration for s in dagbag.dagbag_stats]
    assert sum(d.total_seconds() if hasattr(d, "total_seconds") else d
               for d in durations) < 2.0                  # nothing heavy at parse time


def test_trigger_form_params_come_from_the_config(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError
    dag = dagbag.dags["demo"]
    params = dag.params
    data = yaml.safe_load((REPO / "dags" / "pipelines" / "demo.yaml").read_text())
    assert params["inference.chunk"] == " ".join(map(str, data["inference"]["chunk"]))
    assert params["model.input_patch"] == " ".join(map(str, data["model"]["input_patch"]))
    assert params["output_dtype"] == "uint8"
    raw = params.get_param("inference.blend")
    assert raw.schema["enum"] == ["crop", "overlap"] and raw.schema["section"] == "inference"
    assert raw.description
    bad = params.get_param("model.precision")
    with pytest.raises(ParamValidationError):
        bad.resolve("fp8")
    chunk = copy.deepcopy(params.get_param("inference.chunk"))    # resolve keeps the value
    for wrong in ([1, 2], "1 2", "a b c"):
        with pytest.raises(ParamValidationError):
            chunk.resolve(wrong)
    assert chunk.resolve([64, 64, 8]) == [64, 64, 8] and chunk.resolve("64, 64 8")


def test_the_form_holds_per_run_fields_in_run_order_and_the_yaml_keeps_the_rest(dagbag):
    """No queue, prices or worker machines in the form (they are the deployment's); the
    plan task lays the form's values over the YAML's fixed part, so the effective config
    of an untouched form is the YAML's, and a one-line "x y z" becomes the list."""
    from operators.params import SECTIONS, config_from_params
    from voxflow.config import parse_config
    from voxflow.pipeline_file import load_pipeline
    dag = dagbag.dags["demo"]
    keys = list(dag.params.keys())
    assert not [k for k in keys if k.startswith(("queue.", "cost.")) or ".gce." in k
                or (k.startswith("workers.") and not k.endswith(".max"))]
    sections = [dag.params.get_param(k).schema["section"] for k in keys]
    order = [name for name, _ in SECTIONS]
    assert sections == sorted(sections, key=order.index)
    # The form is for what a person changes per run (issue 14 cut it from 100 keys to 37;
    # the mask section made 42). Issue 13's optional stages add their switch and per-run
    # knobs only: normalize 3, segmentation 6 (its dtype, chunk and the new groups' sizes
    # stay in the YAML). A new key must earn its place.
    assert len(keys) <= 51
    plan = dag.get_task("plan")
    assert set(plan.fixed) == {"queue", "workers", "cost"}
    yaml_config = load_pipeline(REPO / "dags" / "pipelines" / "demo.yaml")[1]
    form = {k: dag.params[k] for k in keys}
    effective = parse_config(config_from_params(form, plan.fixed))
    # (the default queue's path follows VOXFLOW_HOME where the DAG was parsed)
    assert effective.queue.url == plan.fixed["queue"]["url"]
    assert effective == yaml_config.model_copy(update={"queue": effective.queue})
    form["inference.chunk"] = "[256, 256, 32]"
    form["inference.patch_overlap"] = "8,8 2"
    changed = parse_config(config_from_params(form, plan.fixed))
    assert changed.inference.chunk == [256, 256, 32]
    assert changed.inference.patch_overlap == [8, 8, 2]
    assert changed.workers == yaml_config.workers and changed.queue == effective.queue


def test_the_form_turns_optional_sections_on_by_their_switch(dagbag):
    """demo.yaml has no segmentation: the form shows its keys with the config's defaults, an
    empty `segmentation.output` leaves it out (so the untouched form is the YAML), a layer
    there turns it on with the form's values; the same for `normalize.per_section`."""
    from operators.params import config_from_params
    from voxflow.config import SegmentationConfig, parse_config
    dag = dagbag.dags["demo"]
    plan = dag.get_task("plan")
    knobs = ("channel", "threshold", "invert", "connectivity", "min_size")
    seg = [k for k in dag.params if k.startswith("segmentation.")]
    assert seg == ["segmentation.output"] + [f"segmentation.{k}" for k in knobs]
    assert {dag.params.get_param(k).schema["section"] for k in seg} == {"segmentation"}
    assert dag.params["segmentation.output"] is None
    assert [dag.params[f"segmentation.{k}"] for k in knobs] == [
        SegmentationConfig.model_fields[k].default for k in knobs]
    assert dag.params.get_param("segmentation.connectivity").schema["enum"] == [6, 18, 26]
    assert dag.params["normalize.per_section"] is False
    form = {k: dag.params[k] for k in dag.params}
    base = REPO / "dags" / "pipelines"

    def effective(**changed):
        return parse_config(config_from_params({**form, **changed}, plan.fixed), base)
    assert effective().segmentation is None and effective().normalize is None
    assert effective(**{"segmentation.output": ""}).segmentation is None
    on = effective(**{"segmentation.output": "/tmp/seg", "segmentation.threshold": 0.3,
                      "segmentation.invert": True, "normalize.per_section": True})
    assert on.segmentation.output == "file:///tmp/seg" and on.segmentation.threshold == 0.3
    assert on.segmentation.invert and on.segmentation.connectivity == 6
    assert on.normalize.clip_percent == [1.0, 99.0]


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
# A crop pipeline without a pyramid: its DAG still has blend and downsample groups.
CROP = PIPELINE.replace("output: {data}/out-default", "output: {data}/out-crop").replace(
    "patch_overlap: [8, 8, 2]}}", "patch_overlap: [8, 8, 2], blend: crop}}").replace(
    "downsample: {{mips: 1}}", "downsample: {{mips: 0}}")
# Its queue is Pub/Sub (the emulator) with a file:// ledger: the console lists its runs too.
PUBSUB = PIPELINE.replace("output: {data}/out-default", "output: {data}/out-pubsub").replace(
    "queue: sqlite://{data}/queue.db",
    'queue: "pubsub://test-project/af?ledger=file://{data}/ledger"')
# Follows its model: replacing the model file starts a run by itself.
WATCHED = PIPELINE.replace("output: {data}/out-default", "output: {data}/out-watched").replace(
    "path: {data}/model.py", "path: {data}/watched.py") + "watch: [model]\nwatch_seconds: 1\n"

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
    (data / "watched.py").write_text(MODEL.format(delay=0))
    dags = root / "dags"
    (dags / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "voxflow_pipelines.py", dags)
    for name, text in (("e2e", PIPELINE), ("crop", CROP), ("watched", WATCHED),
                       ("pubsub", PUBSUB)):
        (dags / "pipelines" / f"{name}.yaml").write_text(text.format(data=data))
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
        while {d["dag_id"] for d in af.api("GET", "/dags", token=af.tok)["dags"]} < {
                "e2e", "crop", "watched", "pubsub"}:
            assert time.monotonic() < deadline, "the pipeline DAGs never appeared"
            time.sleep(1)
        yield af
    finally:
        af.stop()


def _trigger(af, conf, dag="e2e"):
    return af.api("POST", f"/dags/{dag}/dagRuns", {"logical_date": None, "conf": conf},
                  token=af.tok)["dag_run_id"]


def _follow(af, run, timeout=300, dag="e2e"):
    """Poll a run to its end; returns (state, {task: set of states seen})."""
    seen: dict[str, set] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = af.api("GET", f"/dags/{dag}/dagRuns/{run}", token=af.tok)["state"]
        for ti in af.api("GET", f"/dags/{dag}/dagRuns/{run}/taskInstances",
                         token=af.tok)["task_instances"]:
            seen.setdefault(ti["task_id"], set()).add(ti["state"])
        if state in ("success", "failed"):
            return state, seen
        time.sleep(0.5)
    raise AssertionError(f"run {run} did not finish: {seen}")


def _plan_info(af, run, dag="e2e", timeout=180):
    """The plan task's XCom: the voxflow run id, the effective config, the model digest."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return af.api("GET", f"/dags/{dag}/dagRuns/{run}/taskInstances/plan/xcomEntries/"
                          "return_value", token=af.tok)["value"]
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and time.monotonic() < deadline, "plan left no XCom"
            time.sleep(0.5)


def _log(af, run, task, dag="e2e"):
    """The task's log, every try."""
    tries = af.api("GET", f"/dags/{dag}/dagRuns/{run}/taskInstances/{task}",
                   token=af.tok)["try_number"]
    text = []
    for n in range(1, max(tries, 1) + 1):
        req = urllib.request.Request(
            f"{af.url}/api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}/logs/{n}"
            "?full_content=true",
            headers={"Authorization": f"Bearer {af.tok}", "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text.append(json.dumps(json.loads(r.read())))
    return "\n".join(text)


def test_two_concurrent_runs_succeed_and_wait_is_deferred(airflow):
    from voxflow.queues import open_queue
    from voxflow.volume import Volume
    a = _trigger(airflow, {"output": f"{airflow.data}/out-a",      # seconds of work per task
                           "model.path": f"{airflow.data}/medium.py"})
    b = _trigger(airflow, {"output": f"{airflow.data}/out-b", "inference.chunk": [128, 64, 8],
                           "output_dtype": "uint8"})
    state_a, seen_a = _follow(airflow, a)
    state_b, _ = _follow(airflow, b)
    assert (state_a, state_b) == ("success", "success"), seen_a
    # held no worker slot while it waited (its log, not a poll that may miss the state)
    assert "Pausing task as DEFERRED" in _log(airflow, a, "inference.wait")
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
        stats = q.stats(_plan_info(airflow, run)["run"])
        assert stats["inference"].done == stats["inference"].total == n
    summary = airflow.api("GET", f"/dags/e2e/dagRuns/{a}/taskInstances/finalize/xcomEntries/"
                          "return_value", token=airflow.tok)["value"]
    assert summary["voxels"] == 128 * 128 * 16 and summary["output"].endswith("out-a")
    assert summary["model_digest"].startswith("sha256:")
    bill = _plan_info(airflow, a)["bill"]                # the plan task's XCom holds the bill
    assert bill["objects_written"]["output"] == [
        sum(len(f) for _, _, f in os.walk(airflow.data / "out-a" / s["key"]))
        for s in out_a.info["scales"]] and bill["dollars"]["total"] > 0
    assert summary["bill"] == bill and summary["spent"]["workers"]["inference"]["hours"] > 0
    # finalize announced the output layer: pipelines scheduled on it run next
    events = airflow.api("GET", "/assets/events?limit=100", token=airflow.tok)["asset_events"]
    assert any(e["uri"] == f"file://{airflow.data}/out-a" and e["source_dag_id"] == "e2e"
               and e["source_run_id"] == a for e in events), events
    # a local output: the link `voxflow view` serves (the same on this machine), its command
    layers = [f"file://{airflow.data}/image", f"file://{airflow.data}/out-a"]
    assert summary["view_command"] == f"voxflow view {' '.join(layers)}"
    with pytest.MonkeyPatch.context() as env:           # the Airflow components' home
        env.setenv("VOXFLOW_HOME", str(airflow.voxflow_home))
        from voxflow.view import view_link
        assert summary["neuroglancer"] == view_link(layers)
    assert summary["neuroglancer"].startswith("https://neuroglancer-demo.appspot.com/#!")
    links = airflow.api("GET", f"/dags/e2e/dagRuns/{a}/taskInstances/finalize/links",
                        token=airflow.tok)
    assert links["extra_links"] == {"Neuroglancer": summary["neuroglancer"]}


def test_a_run_on_the_pubsub_queue(airflow):
    """A pipeline on Pub/Sub: the deferrable wait polls the ledger's counts, finalize
    deletes the run's topics and subscriptions, and the console lists the run (its queue
    is the pipeline's) with its stages and a chunk map read from the ledger."""
    from google.cloud import pubsub_v1
    from voxflow.queues import open_queue
    from voxflow.volume import Volume
    url = f"pubsub://test-project/af?ledger=file://{airflow.data}/ledger"
    dag_run = _trigger(airflow, {}, dag="pubsub")
    state, seen = _follow(airflow, dag_run, dag="pubsub")
    assert state == "success", seen
    out = Volume(f"file://{airflow.data}/out-pubsub")
    img = Volume(f"file://{airflow.data}/image").read(out.bounds)
    want = 1 / (1 + np.exp(-(8 * img.astype(np.float32) / 255 - 4)))
    assert np.abs(out.read(out.bounds) - want).max() < 1e-5
    run = _plan_info(airflow, dag_run, dag="pubsub")["run"]
    stats = open_queue(url).stats(run)
    assert stats["inference"].done == stats["inference"].total == 2 * 2 * 2
    assert all(s.open == 0 and s.dead == 0 for s in stats.values())
    topics = [t.name for t in pubsub_v1.PublisherClient().list_topics(
        request={"project": "projects/test-project"}) if "/topics/af-" in t.name]
    assert topics == []
    (listed,) = [r for r in _plugin_get(airflow, "/voxflow/api/runs") if r["run"] == run]
    assert listed["queue"] == url and listed["state"] == "succeeded"
    assert listed["orchestrator"]["dag_run_id"] == dag_run
    assert [(s["stage"], s["done"], s["total"]) for s in listed["stages"]][0] == \
        ("inference", 8, 8)
    chunk_map = _plugin_get(airflow, f"/voxflow/api/runs/{run}/map/inference?queue="
                            + urllib.parse.quote(url, safe=""))
    assert chunk_map["counts"]["done"] == 8 and chunk_map["shape"] == [2, 2, 2]
    assert chunk_map["bands"] == ["2222", "2222"]


def test_bad_parameter_fails_at_plan_naming_the_field(airflow):
    from voxflow.queues import open_queue
    run = _trigger(airflow, {"output": f"{airflow.data}/out-bad",
                             "inference.patch_overlap": [32, 8, 2]})
    state, seen = _follow(airflow, run)
    assert state == "failed" and "failed" in seen["plan"]
    assert "inference.patch_overlap" in _log(airflow, run, "plan")
    assert "success" not in seen.get("inference.publish", set())
    runs = open_queue(f"sqlite://{airflow.data}/queue.db").runs()
    assert not [r for r in runs if r.startswith("out-bad-")]
    assert not (airflow.data / "out-bad").exists()


def _states(af, run, dag="e2e"):
    return {ti["task_id"]: ti["state"] for ti in af.api(
        "GET", f"/dags/{dag}/dagRuns/{run}/taskInstances", token=af.tok)["task_instances"]}


def test_form_values_that_need_stages_the_yaml_lacks(airflow, tmp_path):
    """crop.yaml has no blend stage, no pyramid and no segmentation. Triggered with `blend:
    overlap`, `mips: 2` and a `segmentation.output` its run blends, builds both mips and the
    segmentation layer with its pyramid — equal to the CLI run of the same parameters — and
    its plain run skips those groups."""
    from voxflow.cli import main
    from voxflow.volume import Volume
    from conftest import INLINE
    asked = _trigger(airflow, {"output": f"{airflow.data}/out-crop-form",
                               "inference.blend": "overlap", "downsample.mips": 2,
                               "segmentation.output": f"{airflow.data}/seg-crop-form",
                               "segmentation.invert": True}, dag="crop")
    plain = _trigger(airflow, {}, dag="crop")
    state, seen = _follow(airflow, asked, timeout=600, dag="crop")   # 4 more passes, 2 mips
    assert state == "success", seen
    states = _states(airflow, asked, "crop")
    assert states["blend.wait"] == states["downsample.wait"] == "success", states
    assert states["segmentation.wait"] == "success" and states["levels.wait"] == "skipped"
    state, _ = _follow(airflow, plain, dag="crop")
    states = _states(airflow, plain, "crop")
    assert state == "success" and states["finalize"] == "success", states
    assert {states[f"{k}.{t}"] for k in ("levels", "blend", "segmentation", "downsample")
            for t in ("publish", "scale_up", "wait", "scale_down")} == {"skipped"}, states
    started = {ti["task_id"] for ti in airflow.api(                 # tried: a process ran
        "GET", f"/dags/crop/dagRuns/{plain}/taskInstances", token=airflow.tok)[
        "task_instances"] if ti["try_number"]}
    assert not {t for t in started if t.split(".")[0] in ("levels", "blend", "segmentation",
                                                           "downsample")}, started  # by plan
    assert not Volume(f"file://{airflow.data}/out-crop").num_mips > 1
    config = json.loads(_plan_info(airflow, asked, dag="crop")["config"])
    assert config["inference"]["blend"] == "overlap" and config["downsample"]["mips"] == 2
    assert config["segmentation"]["invert"] is True
    config["segmentation"]["output"] = str(tmp_path / "cli-seg")
    config.update(output=str(tmp_path / "cli-out"), queue=f"sqlite://{tmp_path}/queue.db",
                  workers={**INLINE, "segmentation": "local://0"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--quiet"]) == 0
    for layer, cli in (("out-crop-form", "cli-out"), ("seg-crop-form", "cli-seg")):
        for mip in (0, 1, 2):
            got = Volume(f"file://{airflow.data}/{layer}", mip)
            want = Volume(f"file://{tmp_path}/{cli}", mip)
            assert got.bounds == want.bounds
            assert np.array_equal(got.read(got.bounds), want.read(want.bounds)), (layer, mip)
    seg = Volume(f"file://{airflow.data}/seg-crop-form")
    assert seg.dtype == np.uint32 and seg.read(seg.bounds).max() > 0


def _alive_workers(group):
    from voxflow.groups.local import _alive
    return {wid: pid for wid, pid in ((p.stem, int(p.read_text())) for p in group.glob("*.pid"))
            if _alive(pid, wid)}


def test_cancelling_a_run_stops_its_workers_even_without_the_teardown(airflow):
    """Marked failed while its wait is deferred: the trigger's on_kill ends the run and the
    workers stop by themselves, with the scheduler — which would run the scale_down
    teardown — frozen the whole time."""
    from voxflow.queues import open_queue
    run = _trigger(airflow, {"output": f"{airflow.data}/out-cancel",   # minutes of work
                             "model.path": f"{airflow.data}/slow.py",
                             "inference.chunk": [32, 32, 8], "inference.batch_size": 1})
    vrun = _plan_info(airflow, run)["run"]
    q = open_queue(f"sqlite://{airflow.data}/queue.db")
    group = airflow.voxflow_home / "groups" / vrun / "inference"
    deadline = time.monotonic() + 240
    while _states(airflow, run).get("inference.wait") != "deferred" or not \
            _alive_workers(group):
        assert time.monotonic() < deadline, "workers never started, or wait never deferred"
        time.sleep(0.5)
    beat = q.run_state(vrun).heartbeat
    while q.run_state(vrun).heartbeat <= beat:       # the trigger itself is running
        assert time.monotonic() < deadline, "the trigger never heart-beat"
        time.sleep(0.5)
    workers = _alive_workers(group)
    scheduler = airflow.procs["scheduler"].pid
    os.killpg(scheduler, signal.SIGSTOP)
    try:
        for attempt in range(5):                     # the frozen scheduler may hold the DB
            try:
                airflow.api("PATCH", f"/dags/e2e/dagRuns/{run}", {"state": "failed"},
                            token=airflow.tok)
                break
            except urllib.error.HTTPError:
                os.killpg(scheduler, signal.SIGCONT)
                time.sleep(0.5)
                os.killpg(scheduler, signal.SIGSTOP)
        else:
            raise AssertionError("could not mark the run failed")
        t0 = time.monotonic()
        while _alive_workers(group):
            assert time.monotonic() - t0 < 30, "the run's workers outlived its cancellation"
            time.sleep(0.2)
        assert _states(airflow, run)["inference.scale_down"] != "success"   # never ran
    finally:
        os.killpg(scheduler, signal.SIGCONT)
    from voxflow.groups.local import _alive
    assert not any(_alive(pid, wid) for wid, pid in workers.items())
    assert q.run_state(vrun).state == "cancelled"
    stats = q.stats(vrun)["inference"]
    assert stats.pending > 0 and stats.leased == 0     # stopped with work left, leases given back
    deadline = time.monotonic() + 180                  # leave Airflow calm for the next tests
    while _states(airflow, run)["inference.scale_down"] not in ("success", "failed", "skipped",
                                                                "upstream_failed"):
        assert time.monotonic() < deadline
        time.sleep(1)


def test_a_watched_model_starts_a_run_when_it_changes(airflow):
    """watched.yaml watches its model file. A run of the old model first; replacing the file
    starts a run by itself, which recomputes every task with the new model (a new run
    identity), and exactly one such run (a rerun of the same content skipping every task:
    the same identity, tests/test_runs.py; publishing skips done tasks, test_pipeline.py)."""
    from voxflow.volume import Volume
    deadline = time.monotonic() + 180
    while True:
        assets = airflow.api("GET", "/assets?name_pattern=voxflow-watch-watched",
                             token=airflow.tok)["assets"]
        if assets:
            store = airflow.api("GET", f"/assets/{assets[0]['id']}/state-store",
                                token=airflow.tok)
            if any(e["key"] == "digests" for e in store["asset_state_store"]):
                break                                  # the watcher took its baseline
        assert time.monotonic() < deadline, "the model watcher never started"
        time.sleep(1)
    first = _trigger(airflow, {}, dag="watched")
    assert _follow(airflow, first, dag="watched")[0] == "success"
    old = _plan_info(airflow, first, dag="watched")
    retrained = airflow.data / "watched.py.new"     # replaced at once, as a save would
    retrained.write_text(MODEL.format(delay=0).replace("8 * x - 4", "3 - 6 * x"))
    os.replace(retrained, airflow.data / "watched.py")
    deadline = time.monotonic() + 180

    def runs():
        return [r["dag_run_id"] for r in airflow.api("GET", "/dags/watched/dagRuns",
                                                     token=airflow.tok)["dag_runs"]]
    while len(runs()) < 2:
        assert time.monotonic() < deadline, "no run started after the model changed"
        time.sleep(1)
    (started,) = set(runs()) - {first}
    state, seen = _follow(airflow, started, dag="watched")
    assert state == "success", seen
    new = _plan_info(airflow, started, dag="watched")
    assert new["model_digest"] != old["model_digest"] and new["run"] != old["run"]
    published = airflow.api("GET", f"/dags/watched/dagRuns/{started}/taskInstances/"
                            "inference.publish/xcomEntries/return_value",
                            token=airflow.tok)["value"]
    assert published["skipped"] == 0 and published["tasks"] > 0
    out = Volume(f"file://{airflow.data}/out-watched")
    img = Volume(f"file://{airflow.data}/image").read(out.bounds).astype(np.float32) / 255
    assert np.abs(out.read(out.bounds) - 1 / (1 + np.exp(-(3 - 6 * img)))).max() < 1e-5
    assert len(runs()) == 2                                   # the watcher fired once


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


def test_runs_page_opens_only_the_deployments_queues(airflow, tmp_path):
    unknown = tmp_path / "elsewhere" / "queue.db"
    for url in (f"sqlite://{unknown}", "pubsub://other-project/x?ledger=gs://theirs/l"):
        for path in ("/voxflow/api/runs", "/voxflow/api/runs/x"):
            with pytest.raises(urllib.error.HTTPError) as err:
                _plugin_get(airflow, f"{path}?queue={url}")
            assert err.value.code == 404
    assert not unknown.parent.exists()
    default = airflow.voxflow_home / "queue.db"         # embedded default: no run used it
    assert not default.exists()
    assert [r for r in _plugin_get(airflow, "/voxflow/api/runs?queue=sqlite://"
                                   f"{default}")] == []
    assert not default.exists()                         # a GET changes nothing


def test_plugin_runs_page_needs_login_and_shows_progress(airflow):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{airflow.url}/voxflow/api/runs", timeout=30)
    assert err.value.code in (401, 403)
    runs = [r for r in _plugin_get(airflow, "/voxflow/api/runs") if
            r["queue"] == f"sqlite://{airflow.data}/queue.db"]
    assert runs and all(r["stages"][0]["stage"] == "inference" and
                        r["stages"][0]["total"] > 0 for r in runs)
    assert {r["orchestrator"]["dag_id"] for r in runs} <= {"e2e", "crop", "watched"}
    page = _plugin_get(airflow, "/voxflow/", raw=True)
    assert "voxflow runs" in page and "/static/console.js" in page
    plugins = airflow.api("GET", "/plugins", token=airflow.tok)["plugins"]
    mine = [p for p in plugins if p["name"] == "voxflow"]
    assert mine and mine[0]["fastapi_apps"]
    assert {v["destination"] for v in mine[0]["external_views"]} == {"nav", "dag_run"}


def _plugin_get(af, path, raw=False):
    req = urllib.request.Request(f"{af.url}{path}",
                                 headers={"Authorization": f"Bearer {af.tok}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read().decode()
    return body if raw else json.loads(body)


def test_finalize_refuses_a_run_with_a_stage_not_complete(tmp_path):
    """Whatever ran before it, finalize declares success only when every planned task of
    every stage is done: here one of two inference tasks is still pending, then a stage
    the plan listed was never published."""
    from airflow.exceptions import AirflowFailException
    from operators.pipeline import _check_complete
    from voxflow.config import parse_config
    from voxflow.queues import open_queue
    config = parse_config({"input": "file:///nowhere/img", "output": "file:///nowhere/out",
                           "model": {"path": "m.py", "input_patch": [8, 8, 8],
                                     "output_channels": 1},
                           "queue": {"url": f"sqlite://{tmp_path}/queue.db"}})
    q = open_queue(config.queue.url)
    q.register_run("r", "{}")
    q.publish("r", "inference", "inference", [(0, "a"), (1, "b")])
    first = q.pull(["inference"], 1, "w")[0]
    q.ack(first)
    info = {"stages": ["inference", "downsample-0"],
            "bill": {"tasks": {"inference": 2, "downsample-0": 1}}}
    with pytest.raises(AirflowFailException, match="stage inference: 1 of 2 done, 1 open"):
        _check_complete(config, "r", info)
    q.ack(q.pull(["inference"], 1, "w")[0])
    with pytest.raises(AirflowFailException, match="stage downsample-0: never published"):
        _check_complete(config, "r", info)
    q.publish("r", "downsample-0", "downsample", [(0, "c")])
    q.ack(q.pull(["downsample"], 1, "w")[0])
    _check_complete(config, "r", info)                  # complete: no error
    q.close()
