"""One DAG per pipeline YAML: `dags/pipelines/NAME.yaml` becomes DAG `NAME`.

A pipeline file is a run config (docs/config.md) plus pipeline keys
(`voxflow.pipeline_file`): `schedule`, `assets`, `watch`, `watch_seconds`, `catchup`,
`description`, `tags`, `approve_above_usd`. Parsing reads the YAML and validates it without
I/O: no storage or queue calls at parse time.

Every DAG has a task group for every kind of stage, in run order (`KINDS`), whatever its
YAML says: the trigger form can ask for stages the YAML does not have (`blend: overlap` over
a crop pipeline, `mips: 2` over `mips: 0`, a `normalize.per_section` or
`segmentation.output` over a YAML without them), and a run must produce exactly what its
effective parameters ask. The plan task skips the groups the run does not need (every task
of them, in one call to the scheduler: no task process starts for them), so the next group
and finalize run on `none_failed`; a publish task reached anyway (a cleared DAG run) skips
its group itself.

A pipeline with `approve_above_usd` has one more task, the cost gate (`operators/gate.py`),
between `plan` and the first group: a run estimated above it waits for a person's approval.

A bad pipeline file takes down only its own DAG: it becomes a DAG of the same name tagged
`refused` whose description names the file and field and whose one task fails with that
error; the other files' DAGs are untouched (an import error would mark them all stale).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, AssetAlias, AssetWatcher, BaseOperator, TaskGroup
from airflow.sdk.exceptions import AirflowFailException

from voxflow.config import ConfigError
from voxflow.pipeline_file import PipelineKeys, load_pipeline, watched_urls

from .gate import GATE_TASK, CostGateOperator
from .params import config_params, fixed_config
from .pipeline import (FinalizeOperator, PlanRunOperator, PublishStageOperator,
                       ScaleWorkersOperator, WaitForStageOperator)
from .triggers import FileDigestTrigger

KINDS = ("levels", "inference", "blend", "segmentation", "downsample")  # groups, run order
GROUP_TASKS = ("publish", "scale_up", "wait", "scale_down")
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
        groups = {kind: [f"{kind}.{task}" for task in GROUP_TASKS] for kind in KINDS}
        previous = PlanRunOperator(task_id="plan", base_dir=str(path.parent.resolve()),
                                   fixed=fixed_config(config), groups=groups)
        if keys.approve_above_usd is not None:      # the cost gate, before anything starts
            gate = CostGateOperator(task_id=GATE_TASK, approve_above_usd=keys.approve_above_usd)
            previous >> gate
            previous = gate
        start, groups_before = previous, []
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
            # after the start and after *every* earlier group, not only the one before: the
            # plan skips the groups a run does not need, and a group after a skipped one
            # must still wait for the groups that run (none_failed counts skipped as done)
            [start, *groups_before] >> group
            groups_before.append(group)
        [start, *groups_before] >> FinalizeOperator(task_id="finalize",
                                                    trigger_rule="none_failed",
                                                    outlets=[output_alias(dag_id)])
    return dag


class RefusedPipelineOperator(BaseOperator):
    """The one task of a pipeline file that could not become its DAG: a run of it fails at
    once, naming the file and field (there is nothing it could run)."""

    ui_color = "#fde2e2"

    def __init__(self, *, error: str, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def execute(self, context):
        raise AirflowFailException(f"refused, nothing runs: {self.error}")


def refused_dag(path: Path, error: str) -> DAG:
    """A bad pipeline file's DAG: its name, its error in the description and the docs, the
    tag `refused`, no schedule. Not an import error: Airflow marks every DAG of a file with
    an import error stale (3.3: `has_import_errors`, `is_stale`), and every pipeline comes
    from the one loader file, so one bad file would hide them all."""
    where = f"{path.parent.name}/{path.name}"
    with DAG(path.stem, schedule=None, start_date=START, catchup=False,
             description=f"refused: {where}: {error}"[:1000], tags=["voxflow", "refused"],
             doc_md=f"**The pipeline file `{where}` was refused**, so this DAG runs nothing "
             f"until it is fixed:\n\n    {error}\n\n`voxflow validate {where}` checks "
             "it.") as dag:
        RefusedPipelineOperator(task_id="refused", error=f"{where}: {error}", retries=0)
    return dag


def build_dags(folder: Path) -> dict[str, DAG]:
    """Every `*.yaml` in `folder`, by DAG id; a bad file becomes a `refused_dag` naming its
    field, and the other files' DAGs are untouched."""
    dags = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            dags[path.stem] = build_dag(path)
        except ConfigError as exc:
            dags[path.stem] = refused_dag(path, str(exc))
        except Exception as exc:                      # e.g. a trigger form Airflow refuses
            dags[path.stem] = refused_dag(path, f"{type(exc).__name__}: "
                                          f"{' '.join(str(exc).split())}")
    return dags
