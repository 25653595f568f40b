"""The operators of a voxflow pipeline DAG: plan, publish, scale, wait (deferrable), finalize.

Each is a thin shell over the core library. The plan task validates the run's parameters (the
trigger form's values), reads the input's metadata, creates the output layers and registers
the run — its effective config — with the queue; every later task rebuilds what it needs
from that stored config. Nothing here runs at DAG parse time.

These tasks and the wait's trigger are the run's driver: they heart-beat. Finalize ends the
run as succeeded, a wait that finds dead tasks as failed, and marking the DAG run failed
(`on_kill` of the deferred trigger or of a running task) as cancelled: the run's workers give
it up at once, even when the `scale_down` teardown never runs; and if no driver heart-beats
for `queue.driver_timeout_seconds` (the triggerer is gone), they give it up too.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Optional

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from .params import config_from_params

PLAN_TASK = "plan"


def _run(context) -> tuple[str, Any]:
    from voxflow.config import RunConfig
    info = context["ti"].xcom_pull(task_ids=PLAN_TASK)
    if not info:
        raise AirflowFailException("the plan task left no run (did it fail?)")
    return info["run"], RunConfig.model_validate_json(info["config"])


def _stages_of(config, kind: str) -> list[str]:
    from voxflow.pipeline import plan
    from voxflow.stages import stage_kind, stage_names
    return [s for s in stage_names(plan(config, check_model=False)) if stage_kind(s) == kind]


def _open_queue(config):
    from voxflow.queues import open_queue
    from voxflow.runner import queue_options
    return open_queue(config.queue.url, **queue_options(config))


def _group(config, run: str, kind: str):
    """The run's worker group for `kind`; its members survive between tasks (pid files).

    local://0 (the CLI driver works the queue itself) means one local worker process here:
    an Airflow task cannot host a worker for the whole stage."""
    from voxflow.config import voxflow_home
    from voxflow.groups import open_stage_group
    workers = getattr(config.workers, kind)
    if workers.group == "local://0":
        workers = workers.model_copy(update={"group": "local://1", "max": max(workers.max, 1)})
        config = config.model_copy(update={"workers": config.workers.model_copy(
            update={kind: workers})})
    return open_stage_group(config, kind, run,
                            state_dir=voxflow_home() / "groups" / run / kind), workers


def end_run(context, state: str) -> None:
    """Tell the run's workers that the run is over (they give it up at once)."""
    try:
        run, config = _run(context)
    except AirflowFailException:
        return                                       # never planned: no workers
    queue = _open_queue(config)
    try:
        queue.end_run(run, state)
    finally:
        queue.close()


class PlanRunOperator(BaseOperator):
    """Validate the run's params, plan, create the output layers, register the run.

    The run id follows the run's content (model digest, input, byte-determining parameters;
    `voxflow.identity`), so a DAG run with the same content resumes the work done before and
    one with a retrained model recomputes."""

    ui_color = "#e8f0fe"

    def __init__(self, *, base_dir: str, fixed: Optional[dict] = None,
                 groups: Optional[dict[str, list[str]]] = None, **kwargs):
        super().__init__(**kwargs)
        self.base_dir = base_dir
        self.fixed = fixed or {}             # what the form does not show (`fixed_config`)
        self.groups = groups                 # the DAG's stage groups: kind -> task ids

    def execute(self, context) -> dict:
        from voxflow.cli import bill_lines
        from voxflow.config import ConfigError, parse_config
        from voxflow.cost import bill
        from voxflow.pipeline import plan
        from voxflow.runner import register
        from voxflow.stages import stage_kind, stage_names
        try:
            config = parse_config(config_from_params(context["params"], self.fixed),
                                  base_dir=self.base_dir)
            p = plan(config)
            kinds = {stage_kind(s) for s in stage_names(p)}
            missing = sorted(kinds - set(self.groups)) if self.groups is not None else []
            if missing:
                raise ConfigError(missing[0], f"this DAG has no {missing[0]} group")
        except ConfigError as exc:
            # kept for the console's DAG-run tab: the refusal where the user looks
            from .listeners import REFUSED_KEY       # the DAG run's note (listeners.py)
            context["ti"].xcom_push(key=REFUSED_KEY, value={"field": exc.field,
                                                            "message": exc.message})
            raise AirflowFailException(f"refused, nothing published: {exc}") from None
        estimate = bill(p)                     # before anything is written
        self.log.info("the bill, before anything runs:\n%s", "\n".join(bill_lines(estimate)))
        run, meta = register(config, p, estimate=estimate, orchestrator={
            "driver": "airflow", "dag_id": context["dag"].dag_id,
            "dag_run_id": context["run_id"]})
        self.log.info("run %s: %s voxels, stages %s, output %s, model %s", run, p.bbox.size,
                      stage_names(p), config.output, meta["model_digest"])
        result = {"run": run, "config": config.model_dump_json(), "stages": stage_names(p),
                  "voxels": p.bbox.size, "started": time.time(),
                  "model_digest": meta["model_digest"], "bill": estimate}
        unneeded = [task for kind, tasks in (self.groups or {}).items() if kind not in kinds
                    for task in tasks]
        if unneeded:
            # the groups this run has no stage of are skipped now, by the scheduler: no
            # task process starts only to find out (a publish still skips itself when a
            # cleared DAG run reaches it)
            from airflow.sdk.exceptions import DownstreamTasksSkipped
            context["ti"].xcom_push(key="return_value", value=result)
            raise DownstreamTasksSkipped(tasks=unneeded)
        return result


class PublishStageOperator(BaseOperator):
    """Publish the first stage of a kind (later passes are published by the wait task).

    Every DAG has a group for every kind, because the trigger form may ask for stages its
    YAML does not have (`blend: overlap` over a crop pipeline, `mips: 2` over `mips: 0`); the
    plan task skips the groups of kinds the run has no stage of (crop mode, no mips, nothing
    to blend), and this task skips its group too if a cleared DAG run reaches it."""

    def __init__(self, *, kind: str, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def execute(self, context) -> dict:
        from voxflow.pipeline import plan
        from voxflow.runner import publish_stage
        run, config = _run(context)
        stages = _stages_of(config, self.kind)
        if not stages:                # skipped: so are this group's other tasks
            raise AirflowSkipException(f"this run has no {self.kind} stage")
        queue = _open_queue(config)
        try:
            skipped = publish_stage(queue, run, plan(config, check_model=False), stages[0])
            total = queue.stats(run)[stages[0]].total
        finally:
            queue.close()
        self.log.info("published %s: %d tasks, %d already done", stages[0], total, skipped)
        return {"stage": stages[0], "tasks": total, "skipped": skipped}


class ScaleWorkersOperator(BaseOperator):
    """Size the run's worker group: `auto` (the autoscaler's target) or a number (0 = stop)."""

    def __init__(self, *, kind: str, size: str | int = "auto", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.size = size

    def execute(self, context) -> int:
        self._context = context
        run, config = _run(context)
        return scale(config, run, self.kind, self.size)

    def on_kill(self) -> None:
        """Marked failed while starting workers: the run's workers stop at once."""
        if self.size != 0 and getattr(self, "_context", None):
            end_run(self._context, "cancelled")


def scale(config, run: str, kind: str, size: str | int) -> int:
    from voxflow.groups import Autoscaler
    from voxflow.stages import stage_kind
    group, workers = _group(config, run, kind)
    if size == 0:
        group.close()
        return 0
    queue = _open_queue(config)
    try:
        queue.heartbeat(run)
        backlog = sum(s.open for name, s in queue.stats(run).items() if stage_kind(name) == kind)
        busy = queue.busy_workers(kind)
    finally:
        queue.close()
    scaler = Autoscaler(group, workers.min, workers.max, workers.tasks_per_worker)
    target = scaler.step(backlog, busy) if size == "auto" else int(size)
    if size != "auto":
        group.resize(target, busy)
    if hasattr(group, "status"):                     # cloud groups: target vs actual
        logging.getLogger(__name__).info("%s workers: %s", kind, group.status())
    return target


class WaitForStageOperator(BaseOperator):
    """Wait, deferred, until every stage of a kind is done; fail naming dead tasks.

    On each trigger event: a drained stage with dead tasks fails the task; a drained stage
    followed by another pass of the same kind (downsample-1, ...) publishes it and waits on;
    a tick re-sizes the group (dead workers replaced) and waits on.
    """

    def __init__(self, *, kind: str, poll_seconds: float = 2.0, tick_seconds: float = 30.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.poll_seconds = poll_seconds
        self.tick_seconds = tick_seconds

    def execute(self, context, event: Optional[dict] = None) -> dict:
        from voxflow.pipeline import plan
        from voxflow.runner import RunFailed, heartbeat, publish_stage
        from .triggers import StageTrigger
        self._context = context
        run, config = _run(context)
        p = plan(config, check_model=False)
        queue = _open_queue(config)
        try:
            heartbeat(queue, run, p)                 # republishes what may have expired
            stats = queue.stats(run)
            for name in _stages_of(config, self.kind):
                if name not in stats:
                    publish_stage(queue, run, p, name)
                    stats = queue.stats(run)
                s = stats[name]
                if s.open:
                    break
                if s.dead:
                    queue.end_run(run, "failed")
                    raise AirflowFailException(str(RunFailed(run, name, queue.dead_letters(run),
                                                             s.dead)))
            else:
                return {n: vars(s) for n, s in stats.items()}
        finally:
            queue.close()
        scale(config, run, self.kind, "auto")
        self.defer(trigger=StageTrigger(config.queue.url, run, name, self.poll_seconds,
                                        self.tick_seconds, config.queue.retention_seconds),
                   method_name="execute", timeout=timedelta(days=7))

    def on_kill(self) -> None:
        """Marked failed (or cleared) while running: the run's workers stop at once."""
        if getattr(self, "_context", None):
            end_run(self._context, "cancelled")


def _check_complete(config, run: str, info: dict) -> None:
    """Refuse to call a run succeeded unless every stage the plan listed has all its planned
    tasks done (none open, none dead): whatever the DAG's wiring or a person's clicks let
    run, success means every voxel asked for was computed. Nothing is deleted first."""
    queue = _open_queue(config)
    try:
        stats = queue.stats(run)
    finally:
        queue.close()
    planned = (info.get("bill") or {}).get("tasks", {})
    for name in info["stages"]:
        s = stats.get(name)
        want = planned.get(name, s.total if s else None)
        if s is None or s.open or s.dead or s.done != s.total or s.total != want:
            got = f"{s.done} of {s.total} done, {s.open} open, {s.dead} dead" if s else \
                "never published"
            raise AirflowFailException(f"run {run} is not complete: stage {name}: {got} "
                                       f"(planned {want}); it is not declared succeeded and "
                                       "its temporary data is kept")


class FinalizeOperator(BaseOperator):
    """The run's summary: voxels, tasks per stage, duration, what was spent beside the
    plan's bill, where to look. Deletes an overlap-mode run's temporary partial sums (unless
    `inference.keep_temporary`)."""

    @property
    def operator_extra_links(self):
        from .links import NeuroglancerLink
        return (NeuroglancerLink(),)

    def execute(self, context) -> dict:
        from airflow.sdk import Asset
        from voxflow.cli import spent_lines
        from voxflow.cost import spent
        from voxflow.runner import delete_temporary, has_temporary
        from voxflow.view import neuroglancer_link, view_link
        info = context["ti"].xcom_pull(task_ids=PLAN_TASK)
        run, config = _run(context)
        _check_complete(config, run, info)
        used = spent(config, run)                # counts the partial sums: before deleting
        if has_temporary(config) and not config.inference.keep_temporary:
            delete_temporary(config, run)
        queue = _open_queue(config)
        try:
            stages = {n: vars(s) for n, s in queue.stats(run).items()}
            queue.finish(run)
            queue.end_run(run, "succeeded")
        finally:
            queue.close()
        for alias in self.outlets:       # the output layer was updated: downstream pipelines
            context["outlet_events"][alias].add(Asset(uri=config.output, name=config.output),
                                                extra={"run": run,
                                                       "model_digest": info["model_digest"]})
        seconds = time.time() - info["started"]
        local = config.output.startswith("file://")
        summary = {
            "run": run, "output": config.output, "model_digest": info["model_digest"],
            "voxels": info["voxels"],
            "seconds": round(seconds, 1), "voxels_per_second": round(info["voxels"] / seconds),
            "stages": stages, "bill": info.get("bill"), "spent": used,
            # local layers: the link of `voxflow view` (the command below serves them)
            "neuroglancer": (view_link([config.input, config.output]) if local else
                             neuroglancer_link({"image": config.input, "output": config.output})),
            "view_command": f"voxflow view {config.input} {config.output}" if local else None,
        }
        self.log.info("summary: %s", summary)
        if info.get("bill"):
            self.log.info("spent:\n%s", "\n".join(spent_lines(used, info["bill"])))
        return summary
