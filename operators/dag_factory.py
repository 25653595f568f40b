"""One DAG per pipeline YAML: `dags/pipelines/NAME.yaml` becomes DAG `NAME`.

A pipeline YAML is a run config (see docs/config.md) plus pipeline keys: `schedule` (cron
or preset), `assets` (URIs whose update triggers a run), `catchup` (default false),
`description`, `tags`. Parsing reads the YAML and validates it without I/O: no storage or
queue calls at parse time.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import DAG, Asset, TaskGroup

from voxflow.config import RunConfig, parse_config

from .params import config_params
from .pipeline import (FinalizeOperator, PlanRunOperator, PublishStageOperator,
                       ScaleWorkersOperator, WaitForStageOperator)

PIPELINE_KEYS = ("schedule", "assets", "catchup", "description", "tags")
START = datetime(2026, 1, 1)
# Every voxflow task is idempotent, so a retry is always safe; it also rides out an
# executor hiccup (a deferred task resumed while its previous process's exit is still being
# reported has been seen to be failed by Airflow on a loaded 2-core machine). Refused
# parameters fail at once (AirflowFailException) without retrying.
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=5)}


def _schedule(pipeline: dict) -> Any:
    cron, assets = pipeline.get("schedule"), pipeline.get("assets") or []
    if assets and cron:
        from airflow.timetables.assets import AssetOrTimeSchedule
        from airflow.timetables.trigger import CronTriggerTimetable
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"),
                                   assets=[Asset(uri) for uri in assets])
    if assets:
        return [Asset(uri) for uri in assets]
    return cron


def stage_kinds(config: RunConfig) -> list[str]:
    """The worker kinds a run of this pipeline may go through, in order (decided without I/O;
    a kind a run turns out not to need — no chunk boundary to blend — is a quick no-op)."""
    kinds = ["inference"]
    if config.inference.blend == "overlap":
        kinds.append("blend")
    if config.downsample.mips:
        kinds.append("downsample")
    return kinds


def build_dag(path: Path) -> DAG:
    data = yaml.safe_load(Path(path).read_text()) or {}
    pipeline = {k: data.pop(k) for k in PIPELINE_KEYS if k in data}
    config = parse_config(data, base_dir=Path(path).parent)
    description = pipeline.get("description") or f"voxflow: {config.input} -> {config.output}"
    with DAG(Path(path).stem, schedule=_schedule(pipeline), start_date=START,
             catchup=bool(pipeline.get("catchup", False)), params=config_params(config),
             description=description, tags=["voxflow", *pipeline.get("tags", [])],
             max_active_runs=4, doc_md=f"Pipeline `{Path(path).name}`. {description}",
             default_args=DEFAULT_ARGS) as dag:
        plan = PlanRunOperator(task_id="plan", base_dir=str(Path(path).parent.resolve()))
        previous = plan
        for kind in stage_kinds(config):
            with TaskGroup(kind) as group:
                publish = PublishStageOperator(task_id="publish", kind=kind)
                scale_up = ScaleWorkersOperator(task_id="scale_up", kind=kind, size="auto")
                wait = WaitForStageOperator(task_id="wait", kind=kind)
                scale_down = ScaleWorkersOperator(task_id="scale_down", kind=kind, size=0)
                # publish is a setup too: a teardown runs when at least one of its setups
                # succeeded, and a run cancelled while scale_up is still running marks
                # scale_up failed after it may have started workers
                publish >> scale_up >> wait >> scale_down.as_teardown(setups=[publish, scale_up])
            previous >> group
            previous = group
        previous >> FinalizeOperator(task_id="finalize")
    return dag


def build_dags(folder: Path) -> dict[str, DAG]:
    """Every `*.yaml` in `folder`, by DAG id."""
    return {p.stem: build_dag(p) for p in sorted(Path(folder).glob("*.yaml"))}
