"""The orchestrator dies mid-stage and the run still completes with the same bytes.

A real Airflow (the console tests' session fixture) runs the `restarts` pipeline
(tests/console_support.py: a model that sleeps per patch). Once its inference stage has some
tasks done but not all, and its wait task is deferred in the triggerer, the scheduler and the
triggerer are SIGKILLed together (their whole process groups) and started again. The run must
finish on its own: the new triggerer adopts the orphaned trigger once the dead one's heartbeat
is stale, the new scheduler resumes the DAG run and runs the rest of it. Its output
layer's chunk files must equal, byte for byte, those of `voxflow run` of the same config, and
each stage's tasks in the queue must be exactly the plan's (no stage published twice or
partly). The CLI driver killed and restarted is tests/test_chaos.py
(`test_resume_after_killing_driver_and_workers`)."""
import json
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from voxflow.queues import open_queue

DAG = "restarts"


def _dag_run(af, dag_run: str) -> dict:
    return af.api("GET", f"/dags/{DAG}/dagRuns/{urllib.parse.quote(dag_run)}", token=af.tok)


def _task_state(af, dag_run: str, task_id: str) -> str:
    return af.api("GET", f"/dags/{DAG}/dagRuns/{urllib.parse.quote(dag_run)}/taskInstances/"
                         f"{task_id}", token=af.tok)["state"]


def _chunk_files(layer: Path) -> dict[str, bytes]:
    """Every chunk file of every mip (the `info` file aside), by path."""
    return {str(p.relative_to(layer)): p.read_bytes() for p in sorted(layer.rglob("*"))
            if p.is_file() and p.parent != layer}


def test_scheduler_and_triggerer_killed_mid_stage(console_airflow, tmp_path):
    af = console_airflow
    pipeline = af.data.parent / "dags" / "pipelines" / f"{DAG}.yaml"
    deadline = time.monotonic() + 120
    while DAG not in {d["dag_id"] for d in af.api("GET", "/dags", token=af.tok)["dags"]}:
        assert time.monotonic() < deadline, "the restarts DAG never appeared"
        time.sleep(1)

    # the reference: `voxflow run` of the same config into another layer, on its own queue,
    # in the background (the model mostly sleeps)
    config = yaml.safe_load(pipeline.read_text())
    del config["description"]
    config["output"] = str(tmp_path / "reference")
    config["queue"] = {"url": f"sqlite://{tmp_path}/reference.db"}
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump(config))
    reference = subprocess.Popen([sys.executable, "-m", "voxflow", "run",
                                  str(tmp_path / "reference.yaml"), "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        dag_run = af.api("POST", f"/dags/{DAG}/dagRuns", {"logical_date": None, "conf": {}},
                         token=af.tok)["dag_run_id"]
        queue_url = f"sqlite://{af.data}/restarts/queue.db"

        # the system's own signals: the wait task is deferred (no task process of the
        # scheduler runs), its trigger runs in the triggerer (it heart-beats the run in the
        # queue after the deferral was seen), and the stage's counts show work done and left
        deadline, deferred_at = time.monotonic() + 180, None
        while True:
            assert time.monotonic() < deadline, "the inference stage never got under way"
            assert _dag_run(af, dag_run)["state"] in ("queued", "running")
            s = None
            try:
                queue = open_queue(queue_url, readonly=True)
            except FileNotFoundError:                  # not yet created by the plan task
                queue = None
            if queue is not None:
                try:
                    (run,) = queue.runs()
                    s, beat = queue.stats(run).get("inference"), queue.run_state(run).heartbeat
                except (ValueError, sqlite3.OperationalError):     # not yet registered
                    pass
                finally:
                    queue.close()
            if s and s.total:
                assert s.done < s.total - 2, "the stage ended before its trigger ran"
                if deferred_at is None and \
                        _task_state(af, dag_run, "inference.wait") == "deferred":
                    deferred_at = time.time()
                if deferred_at and beat > deferred_at and s.done >= 2:
                    break
            time.sleep(0.2)
        old = {name: af.procs[name].pid for name in ("scheduler", "triggerer")}
        with ThreadPoolExecutor(2) as pool:          # killed together, back when healthy
            for restarted in [pool.submit(af.restart, name) for name in old]:
                restarted.result()
        assert all(af.procs[n].pid != pid and af.procs[n].poll() is None
                   for n, pid in old.items())

        deadline = time.monotonic() + 240
        while (state := _dag_run(af, dag_run)["state"]) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"the DAG run is still {state}"
            time.sleep(1)
        assert state == "success"
        assert reference.wait(timeout=240) == 0, reference.stdout.read()
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    # the same bytes as an uninterrupted run: every chunk file of every mip
    got, want = _chunk_files(af.data / "restarts" / "out"), _chunk_files(tmp_path / "reference")
    assert len(want) == 32 and got.keys() == want.keys()
    assert all(got[name] == want[name] for name in want)

    # each stage holds exactly the plan's tasks, every one done once in the queue
    queue, ref_queue = open_queue(queue_url, readonly=True), \
        open_queue(f"sqlite://{tmp_path}/reference.db", readonly=True)
    stats = queue.stats(run)
    (ref_run,) = ref_queue.runs()
    ref_stats = ref_queue.stats(ref_run)
    assert {k: v.total for k, v in stats.items()} == {k: v.total for k, v in ref_stats.items()}
    assert all(v.done == v.total and v.dead == 0 for v in stats.values()), stats
    queue.close()
    ref_queue.close()
    # work redone across the restarts is allowed (at-least-once) but every task was done
    done = Counter()
    for log in (Path(af.env["VOXFLOW_HOME"]) / "logs" / run).glob("*.log"):
        for line in log.read_text().splitlines():
            if '"task_done"' in line:
                event = json.loads(line)
                done[(event["stage"], event["index"])] += 1
    assert {stage for stage, _ in done} == set(stats)
    assert all(sum(1 for k in done if k[0] == stage) == v.total for stage, v in stats.items())
