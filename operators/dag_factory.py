"""One DAG per pipeline YAML: `dags/pipelines/NAME.yaml` becomes DAG `NAME`.

A pipeline file is a run config (docs/config.md) plus pipeline keys
(`voxflow.pipeline_file`): `schedule`, `assets`, `watch`, `watch_seconds`, `catchup`,
`description`, `tags`. Parsing reads the YAML and validates it without I/O: no storage or
queue calls at parse time.

Every DAG has a task group for every kind of stage, whatever its YAML says: the trigger
form can ask for stages the YAML does not have (`blend: overlap` over a crop pipeline,
`mips: 2` over `mips: 0`), and a run must produce exactly what its effective parameters
ask. A group the run does not need skips itself (its publish task raises a skip), so the
next group and finalize run on `none_failed`.

A bad pipeline file takes down only its own DAG: the others load, and Airflow shows one
import error on the DAG folder's loader naming each bad file and field.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, AssetAlias, AssetWatcher, TaskGroup

from voxflow.config import ConfigError
from voxflow.pipeline_file import PipelineKeys, load_pipeline, watched_urls

from .params import config_params
from .pipeline import (FinalizeOperator, PlanRunOperator, PublishStageOperator,
                       ScaleWorkersOperator, WaitForStageOperator)
from .triggers import FileDigestTrigger

KINDS = ("inference", "blend", "downsample")
START = datetime(2026, 1, 1)
# Every voxflow task is idempotent, so a retry is always safe; it also rides out an
# executor hiccup (a deferred task resumed while its previous process's exit is still being
# reported has been seen to be failed by Airflow on a loaded 2-core machine). Refused
# parameters fail at once (AirflowFailException) without retrying.
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=5)}


def output_alias(dag_id: str) -> AssetAlias:
    """Finalize emits the output layer's asset event through this alias (the output a run
    writes is its effective parameter, known only when it runs)."""
    return AssetAlias(f"voxflow-output-{dag_id}")


def _schedule(dag_id: str, keys: PipelineKeys, watched: list[str]) -> Any:
    assets = [Asset(uri) for uri in keys.assets]
    if watched:
        trigger = FileDigestTrigger(watched, keys.watch_seconds)
        assets.append(Asset(name=f"voxflow-watch-{dag_id}", uri=watched[0],
                            watchers=[AssetWatcher(name=f"voxflow-watch-{dag_id}",
                                                   trigger=trigger)]))
    if assets and keys.schedule:
        from airflow.timetables.assets import AssetOrTimeSchedule
        from airflow.timetables.trigger import CronTriggerTimetable
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(keys.schedule, timezone="UTC"),
                                   assets=assets)
    return assets or keys.schedule


def build_dag(path: Path) -> DAG:
    path = Path(path)
    keys, config = load_pipeline(path)
    dag_id = path.stem
    description = keys.description or f"voxflow: {config.input} -> {config.output}"
    watched = watched_urls(keys, config, path.parent)
    with DAG(dag_id, schedule=_schedule(dag_id, keys, watched), start_date=START,
             catchup=keys.catchup, params=config_params(config), description=description,
             tags=["voxflow", *keys.tags], max_active_runs=4,
             doc_md=f"Pipeline `{path.name}`. {description}", default_args=DEFAULT_ARGS) as dag:
        previous = PlanRunOperator(task_id="plan", base_dir=str(path.parent.resolve()))
        for kind in KINDS:
            with TaskGroup(kind) as group:
                publish = PublishStageOperator(task_id="publish", kind=kind,
                                               trigger_rule="none_failed")
                scale_up = ScaleWorkersOperator(task_id="scale_up", kind=kind, size="auto")
                wait = WaitForStageOperator(task_id="wait", kind=kind)
                scale_down = ScaleWorkersOperator(task_id="scale_down", kind=kind, size=0)
                # publish is a setup too: a teardown runs when at least one of its setups
                # succeeded, and a run cancelled while scale_up is still running marks
                # scale_up failed after it may have started workers
                publish >> scale_up >> wait >> scale_down.as_teardown(setups=[publish, scale_up])
            previous >> group
            previous = group
        previous >> FinalizeOperator(task_id="finalize", trigger_rule="none_failed",
                                     outlets=[output_alias(dag_id)])
    return dag


class PipelineErrors(Exception):
    """The pipeline files that could not become DAGs, each with its error."""


class _Refused(DAG):
    """Carries the bad files' errors into Airflow: the DAG bag refuses this DAG when it
    validates it and records the error as an import error of the loader file, while the
    loader's other DAGs are bagged as usual."""

    def validate(self):
        raise PipelineErrors(self.description)


def build_dags(folder: Path) -> dict[str, DAG]:
    """Every `*.yaml` in `folder`, by DAG id; bad files are collected, not raised: one
    `_Refused` entry names each file and field."""
    dags, errors = {}, []
    for path in sorted(Path(folder).glob("*.yaml")):
        where = f"{path.parent.name}/{path.name}"
        try:
            dags[path.stem] = build_dag(path)
        except ConfigError as exc:
            errors.append(f"{where}: {exc}")
        except Exception as exc:                      # e.g. a trigger form Airflow refuses
            errors.append(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    if errors:
        text = f"{len(errors)} voxflow pipeline file(s) refused: " + "; ".join(errors)
        dags["voxflow_pipeline_errors"] = _Refused("voxflow_pipeline_errors", schedule=None,
                                                   description=text[:4000])
    return dags
