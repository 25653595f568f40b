"""The cost gate (`approve_above_usd`): a run estimated above it waits at an Airflow
human-in-the-loop approval task, showing the estimate, before anything is published or any
worker starts; approving runs it, rejecting ends it with nothing published."""
from __future__ import annotations

import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

from voxflow.queues import open_queue

REPO = Path(__file__).resolve().parents[1]
GATE = "approve_cost"


# -- the DAG -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    """Airflow, imported here, must not make itself a home in ~/airflow."""
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))


@pytest.fixture(scope="module")
def gate_dagbag(airflow_home, tmp_path_factory):
    """The repository's DAG loader over three copies of the demo pipeline: as shipped, with a
    gate, and with a gate Airflow must refuse."""
    from airflow.dag_processing.dagbag import DagBag
    dags = tmp_path_factory.mktemp("dags")
    (dags / "pipelines").mkdir()
    shutil.copy(REPO / "dags" / "voxflow_pipelines.py", dags)
    demo = (REPO / "dags" / "pipelines" / "demo.yaml").read_text()
    (dags / "pipelines" / "plain.yaml").write_text(demo)
    (dags / "pipelines" / "gated.yaml").write_text(demo + "approve_above_usd: 12.5\n")
    (dags / "pipelines" / "negative.yaml").write_text(demo + "approve_above_usd: -1\n")
    return DagBag(str(dags))


def test_the_gate_sits_between_plan_and_the_first_group_only_with_the_key(gate_dagbag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator
    from operators.dag_factory import KINDS
    plain, gated = gate_dagbag.dags["plain"], gate_dagbag.dags["gated"]
    down = {d: {t.task_id: t.downstream_task_ids for t in dag.tasks} for d, dag in
            (("plain", plain), ("gated", gated))}
    first = {f"{k}.publish" for k in KINDS} | {"finalize"}      # every group follows it
    assert GATE not in down["plain"] and down["plain"]["plan"] == first
    gate = gated.get_task(GATE)
    assert isinstance(gate, ApprovalOperator) and gate.approve_above_usd == 12.5
    assert gate.upstream_task_ids == {"plan"} and down["gated"][GATE] == first
    assert len(gate.params) == 0              # the HITL form asks for nothing but a choice
    # apart from the gate, the gated DAG is the plain one
    del down["gated"][GATE]
    down["gated"]["plan"] = first
    assert down["gated"] == down["plain"]
    # a negative threshold is refused, naming the file and the key; the others still load
    refused = gate_dagbag.dags["negative"]
    assert "refused" in refused.tags and GATE not in refused.task_dict
    assert "negative.yaml" in refused.description and "approve_above_usd" in refused.description


# -- the threshold -----------------------------------------------------------------------------
class _TI:
    id = "0199f6c1-0000-7000-8000-000000000000"

    def __init__(self, info: dict):
        self.info = info

    def xcom_pull(self, task_ids: str) -> dict:
        assert task_ids == "plan"
        return self.info


def _plan_info(tmp_path) -> dict:
    """What the plan task leaves in XCom for a small real layer (a real bill)."""
    from voxflow.config import parse_config
    from voxflow.cost import bill
    from voxflow.pipeline import plan
    from voxflow.volume import Volume
    Volume.create(f"file://{tmp_path}/image", num_channels=1, dtype="uint8",
                  resolution=(8, 8, 40), voxel_offset=(0, 0, 0), size=(64, 64, 8),
                  chunk=(32, 32, 8))
    config = parse_config({"input": f"{tmp_path}/image", "output": f"{tmp_path}/out",
                           "model": {"path": f"{tmp_path}/m.py", "input_patch": [32, 32, 8],
                                     "output_channels": 1},
                           "inference": {"chunk": [32, 32, 8], "blend": "crop"},
                           "storage_chunk": [32, 32, 8]})
    p = plan(config, check_model=False)
    return {"run": "out-0123456789", "config": config.model_dump_json(), "voxels": p.bbox.size,
            "model_digest": "sha256:x", "bill": bill(p)}


def test_at_or_below_the_threshold_nobody_is_asked(airflow_home, tmp_path, monkeypatch):
    """Below: execute returns at once and writes no HITL request. Above: the request carries
    the estimate and the task parks awaiting input."""
    import airflow.providers.standard.operators.hitl as hitl
    from airflow.sdk.exceptions import TaskAwaitingInput
    from operators.gate import CostGateOperator, usd
    info = _plan_info(tmp_path)
    total = info["bill"]["dollars"]["total"]
    asked = []
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: asked.append(kw))
    context = {"ti": _TI(info), "task_instance": _TI(info)}

    for threshold in (total, total * 2):
        out = CostGateOperator(task_id="g", approve_above_usd=threshold).execute(context)
        assert out["asked"] is False and out["estimate_usd"] == total
    assert asked == []

    with pytest.raises(TaskAwaitingInput):
        CostGateOperator(task_id="g", approve_above_usd=total / 2).execute(context)
    (request,) = asked
    assert request["options"] == ["Approve", "Reject"] and not request["multiple"]
    assert usd(total) in request["subject"] and "| inference | 4 |" in request["body"]


# -- a real Airflow ----------------------------------------------------------------------------
def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _until(what: str, probe, timeout: float):
    """Poll `probe` until it returns something true (Airflow's own state, read again)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


class Gated:
    """The `gated` DAG of the shared console Airflow (tests/console_support.py)."""

    def __init__(self, af):
        self.af = af
        self.queue_url = f"sqlite://{af.data}/gated-queue.db"
        self.home = Path(af.env["VOXFLOW_HOME"])

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        return self.af.api(method, path, body, token=self.af.tok)

    def trigger(self, conf: dict) -> str:
        return self.api("POST", "/dags/gated/dagRuns",
                        {"logical_date": None, "conf": conf})["dag_run_id"]

    def state(self, dag_run: str) -> str:
        return self.api("GET", f"/dags/gated/dagRuns/{_q(dag_run)}")["state"]

    def tis(self, dag_run: str) -> dict[str, str | None]:
        got = self.api("GET", f"/dags/gated/dagRuns/{_q(dag_run)}/taskInstances?limit=100")
        return {t["task_id"]: t["state"] for t in got["task_instances"]}

    def hitl(self, dag_run: str) -> dict:
        (detail,) = self.api("GET", f"/dags/gated/dagRuns/{_q(dag_run)}/hitlDetails")[
            "hitl_details"]
        assert detail["task_instance"]["task_id"] == GATE
        return detail

    def gate(self, dag_run: str) -> dict:
        return self.api("GET", f"/dags/gated/dagRuns/{_q(dag_run)}/taskInstances/{GATE}")

    def answer(self, dag_runs: dict[str, str], timeout: float) -> int:
        """Give each DAG run's gate its answer (`dag_runs`: DAG run -> option) and wait until
        every gate has finished; returns how many times Airflow asked again.

        Airflow 3.3.2 loses an answer given within seconds of the request on a loaded
        machine: the executor reports the parked process's exit after the resumed one has
        started, the scheduler takes that for a task killed externally and retries it, and
        the retry writes a fresh request. Nothing runs without an answer; a person (here,
        the test) answers the new try again."""
        answered: dict[str, set[int]] = {d: set() for d in dag_runs}
        deadline = time.monotonic() + timeout
        while True:
            waiting = False
            for dag_run, option in dag_runs.items():
                ti = self.gate(dag_run)
                if ti["state"] in ("success", "failed"):
                    continue
                waiting = True
                if ti["state"] == "awaiting_input" and ti["try_number"] not in answered[dag_run]:
                    try:
                        got = self.api("PATCH", f"/dags/gated/dagRuns/{_q(dag_run)}/"
                                       f"taskInstances/{GATE}/-1/hitlDetails",
                                       {"chosen_options": [option]})
                    except urllib.error.HTTPError as exc:   # the try moved on meanwhile
                        assert exc.code in (404, 409), exc
                        continue
                    assert got["chosen_options"] == [option]
                    answered[dag_run].add(ti["try_number"])
            if not waiting:
                return sum(len(tries) - 1 for tries in answered.values())
            assert time.monotonic() < deadline, f"gates still waiting: {answered}"
            time.sleep(0.5)

    def queue_run(self, dag_run: str):
        """The voxflow run the plan task registered for this DAG run, and its state."""
        queue = open_queue(self.queue_url, readonly=True)
        try:
            for run in queue.runs():
                state = queue.run_state(run)
                if state.meta.get("orchestrator", {}).get("dag_run_id") == dag_run:
                    return run, state
        finally:
            queue.close()
        raise AssertionError(f"no voxflow run for {dag_run}")

    def tasks_published(self, run: str) -> int:
        with sqlite3.connect(f"file:{self.af.data}/gated-queue.db?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM tasks WHERE run = ?", (run,)).fetchone()[0]

    def workers(self, run: str) -> list:
        """Pid files of the run's worker groups and live worker processes serving it."""
        pid_files = list((self.home / "groups" / run).rglob("*.pid"))
        procs = []
        for entry in Path("/proc").iterdir():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"worker" in cmd and run.encode() in cmd:
                procs.append(entry.name)
        return pid_files + procs

    def asset_events(self, dag_run: str) -> list:
        return self.api("GET", f"/assets/events?source_dag_id=gated&source_run_id={_q(dag_run)}"
                        )["asset_events"]


def _chunks(layer: Path) -> list[Path]:
    """The layer's chunk files (its `info` lies at the top; chunks in a folder per scale)."""
    return [f for f in layer.rglob("*") if f.is_file() and f.parent != layer]


def test_a_gated_run_waits_approve_runs_it_reject_publishes_nothing(console_airflow):
    from operators.gate import usd             # imports Airflow: not at collection time
    gated = Gated(console_airflow)
    data = console_airflow.data
    started = time.monotonic()
    approved = gated.trigger({"output": f"{data}/gated-approved", "downsample.mips": 0})
    rejected = gated.trigger({"output": f"{data}/gated-rejected"})

    for dag_run in (approved, rejected):
        _until(f"{dag_run}'s gate to await input",
               lambda: gated.tis(dag_run).get(GATE) == "awaiting_input", 90)
        tis = gated.tis(dag_run)
        assert tis["plan"] == "success" and gated.state(dag_run) == "running"
        # nothing past the gate ran: the groups the run needs wait, the plan skipped the
        # others (a crop run: no levels, blend or segmentation; mips 0: no downsample)
        needs = {"inference", "finalize"} | ({"downsample"} if dag_run == rejected else set())
        assert {t.split(".")[0] for t, s in tis.items() if s is None} == needs, tis
        assert {s for t, s in tis.items() if t.split(".")[0] not in needs | {"plan", GATE}
                } == {"skipped"}, tis
        run, state = gated.queue_run(dag_run)
        assert state.state == "active"
        # while it waits: nothing published, no worker group, no worker
        assert gated.tasks_published(run) == 0 and gated.workers(run) == []
        detail = gated.hitl(dag_run)
        assert detail["options"] == ["Approve", "Reject"] and not detail["response_received"]
        # the estimate the queue keeps for the run (the plan's bill) is what the person sees
        estimate = state.meta["estimate_usd"]
        per_teravoxel = estimate / (128 * 128 * 16 / 1e12)
        assert usd(estimate) in detail["subject"] and usd(estimate) in detail["body"]
        assert f"{usd(per_teravoxel)} per output teravoxel" in detail["body"]
        assert "| inference | 32 |" in detail["body"]         # 4 x 4 x 2 chunks of 32x32x8
        assert "worker-hours" in detail["body"]
    assert "downsample-0" in gated.hitl(rejected)["body"]
    assert "downsample-0" not in gated.hitl(approved)["body"]  # mips 0: no such stage
    waited = time.monotonic() - started

    asked_again = gated.answer({approved: "Approve", rejected: "Reject"}, 120)

    # rejected: the DAG run fails at the gate, nothing after it runs or publishes
    assert _until("the rejected run to end", lambda: gated.state(rejected) in
                  ("success", "failed") and gated.state(rejected), 90) == "failed"
    tis = gated.tis(rejected)
    assert tis[GATE] == "failed", tis
    assert all(s in ("upstream_failed", "skipped") for t, s in tis.items()
               if t not in ("plan", GATE)), tis
    run, state = gated.queue_run(rejected)
    assert state.state == "cancelled"
    assert gated.tasks_published(run) == 0 and gated.workers(run) == []
    assert (data / "gated-rejected" / "info").exists()       # plan made the layer, only that
    assert _chunks(data / "gated-rejected") == [] and gated.asset_events(rejected) == []
    assert gated.hitl(rejected)["chosen_options"] == ["Reject"]

    # approved: the run goes on to its output
    assert _until("the approved run to end", lambda: gated.state(approved) in
                  ("success", "failed") and gated.state(approved), 150) == "success"
    run, state = gated.queue_run(approved)
    assert state.state == "succeeded" and gated.tasks_published(run) == 32
    assert len(_chunks(data / "gated-approved")) == 32
    (event,) = gated.asset_events(approved)
    assert event["uri"].endswith("/gated-approved")
    print(f"cost gate: both waiting after {waited:.0f} s, done after "
          f"{time.monotonic() - started:.0f} s; Airflow asked again {asked_again} time(s)")
